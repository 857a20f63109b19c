//! The hidden `generate` subcommand every scm binary carries (as ripgrep's `--generate`): man
//! pages, shell completions and the commented `EnvironmentFile` of a daemon, all written from the
//! binary's own clap definitions, so the packages can never ship a flag list that the binary does
//! not have. `cargo xtask package` runs it; operators never need to.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// What `generate` writes.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Generate {
    /// Man pages (roff, section 1): one for the command and one for each visible subcommand
    /// (`NAME.1`, `NAME-SUB.1`, ...), into DIR.
    Man {
        /// Folder to write into (created if missing).
        dir: PathBuf,
    },
    /// Shell completions for SHELL into DIR, named as the shell looks them up (bash: NAME.bash,
    /// zsh: _NAME, fish: NAME.fish).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
        /// Folder to write into (created if missing).
        dir: PathBuf,
    },
    /// A systemd `EnvironmentFile` for SUBCOMMAND: every flag that has an environment twin, as a
    /// commented `#NAME=default` line under its help text, and an active `NAME=value` line for
    /// each --set.
    Env {
        /// The subcommand the unit runs (e.g. `serve`).
        subcommand: String,
        /// File to write (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// NAME=VALUE: a variable the package sets (its paths), written uncommented. NAME must be
        /// the environment twin of one of SUBCOMMAND's flags. Repeatable.
        #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_set)]
        set: Vec<(String, String)>,
    },
}

/// Why `generate` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// A file or folder could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `generate env` named a subcommand the binary does not have.
    #[error("{bin} has no subcommand {name:?} (it has: {have})")]
    NoSubcommand {
        /// The binary.
        bin: String,
        /// The name asked for.
        name: String,
        /// The subcommands there are.
        have: String,
    },
    /// `--set NAME=...` where NAME is no flag's environment twin (a typo would otherwise ship a
    /// variable the daemon ignores).
    #[error("--set {name}: no flag of `{bin} {subcommand}` reads {name}")]
    UnknownVariable {
        /// The binary.
        bin: String,
        /// The subcommand.
        subcommand: String,
        /// The variable.
        name: String,
    },
}

fn parse_set(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("{name:?} is not an environment variable name"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// Runs `generate` for the binary whose clap definition is `cmd` (its `CommandFactory::command()`);
/// returns the files written (none when the env file went to standard output).
pub fn run(mut cmd: clap::Command, what: &Generate) -> Result<Vec<PathBuf>, GenerateError> {
    cmd.build();
    let bin = cmd.get_name().to_owned();
    match what {
        Generate::Man { dir } => man_pages(&cmd, dir),
        Generate::Completions { shell, dir } => {
            mkdir(dir)?;
            let path = clap_complete::generate_to(*shell, &mut cmd, &bin, dir)
                .map_err(|source| write_err(dir, source))?;
            Ok(vec![path])
        }
        Generate::Env {
            subcommand,
            out,
            set,
        } => {
            let text = env_file(&cmd, subcommand, set)?;
            match out {
                None => {
                    print!("{text}");
                    Ok(Vec::new())
                }
                Some(path) => {
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        mkdir(dir)?;
                    }
                    fs::write(path, text).map_err(|source| write_err(path, source))?;
                    Ok(vec![path.clone()])
                }
            }
        }
    }
}

/// [`run`], then one line per file written: the body of every binary's `generate` match arm.
pub fn main(cmd: clap::Command, what: &Generate) -> Result<(), GenerateError> {
    for path in run(cmd, what)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn write_err(path: &Path, source: std::io::Error) -> GenerateError {
    GenerateError::Write {
        path: path.to_owned(),
        source,
    }
}

fn mkdir(dir: &Path) -> Result<(), GenerateError> {
    fs::create_dir_all(dir).map_err(|source| write_err(dir, source))
}

/// One page per visible command, depth first; a subcommand's page is named `bin-sub-subsub.1`
/// and its synopsis names the full command line.
fn man_pages(cmd: &clap::Command, dir: &Path) -> Result<Vec<PathBuf>, GenerateError> {
    mkdir(dir)?;
    let mut written = Vec::new();
    let mut stack = vec![(
        cmd.clone(),
        cmd.get_name().to_owned(),
        cmd.get_name().to_owned(),
    )];
    while let Some((c, name, words)) = stack.pop() {
        for sub in c.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() == "help" {
                continue;
            }
            let sub_name = format!("{name}-{}", sub.get_name());
            let sub_words = format!("{words} {}", sub.get_name());
            // The page's title is the dashed name; the synopsis shows the words to type.
            let sub = sub.clone().bin_name(sub_words.clone());
            stack.push((sub, sub_name, sub_words));
        }
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(c.clone())
            .title(name.clone())
            .render(&mut page)
            .map_err(|source| write_err(&path, source))?;
        fs::write(&path, page).map_err(|source| write_err(&path, source))?;
        written.push(path);
    }
    written.sort();
    Ok(written)
}

/// The commented `EnvironmentFile` of `bin subcommand`.
fn env_file(
    cmd: &clap::Command,
    subcommand: &str,
    set: &[(String, String)],
) -> Result<String, GenerateError> {
    let bin = cmd.get_name().to_owned();
    let sub = cmd.find_subcommand(subcommand).ok_or_else(|| {
        let have: Vec<&str> = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(clap::Command::get_name)
            .collect();
        GenerateError::NoSubcommand {
            bin: bin.clone(),
            name: subcommand.to_owned(),
            have: have.join(", "),
        }
    })?;
    // `build()` has copied the parent's global flags (e.g. scm-device --state) into it.
    let args: Vec<&clap::Arg> = sub
        .get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_env().is_some())
        .collect();
    for (name, _) in set {
        if !args
            .iter()
            .any(|a| a.get_env().is_some_and(|e| e == name.as_str()))
        {
            return Err(GenerateError::UnknownVariable {
                bin,
                subcommand: subcommand.to_owned(),
                name: name.clone(),
            });
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Environment of `{bin} {subcommand}`, read by its systemd unit (EnvironmentFile=).\n\
         # Generated from `{bin} {subcommand} --help` by `{bin} generate env {subcommand}`: every\n\
         # flag with its environment twin. Commented lines show the built-in default; uncomment\n\
         # and edit to change one, then `systemctl restart` the unit. Lines without `#` are set\n\
         # by the package. A flag given on the unit's command line wins over this file.\n"
    );
    for a in args {
        let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
        let Some(env) = env else { continue };
        let flag = match (a.get_long(), a.get_value_names()) {
            (Some(l), Some(v)) if a.get_action().takes_values() => {
                let v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
                format!("--{l} <{}>", v.join(" "))
            }
            (Some(l), _) if a.get_action().takes_values() => {
                format!("--{l} <{}>", a.get_id().as_str().to_uppercase())
            }
            (Some(l), _) => format!("--{l}"),
            (None, _) => a.get_id().as_str().to_uppercase(),
        };
        let _ = writeln!(out, "# {flag}");
        let help = a
            .get_long_help()
            .or_else(|| a.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        for line in help.lines().flat_map(|l| wrap(l, 92)) {
            let _ = writeln!(out, "#   {line}");
        }
        let default: Vec<String> = a
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        match set.iter().find(|(n, _)| *n == env) {
            Some((_, value)) => {
                let _ = writeln!(out, "{env}={}\n", quote(value));
            }
            None => {
                let _ = writeln!(out, "#{env}={}\n", quote(&default.join(",")));
            }
        }
    }
    // Trim the help lines' trailing blanks that clap leaves on wrapped text.
    Ok(out
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        + "\n")
}

/// `line` cut at spaces into pieces of at most `width` characters (a longer word stays whole).
fn wrap(line: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in line.split(' ') {
        let cur = lines.last_mut().expect("never empty");
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(word.to_owned());
        } else {
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(word);
        }
    }
    lines
}

/// A value as systemd's EnvironmentFile parser reads it back unchanged: bare where it can be,
/// else double-quoted with `\` and `"` escaped.
fn quote(v: &str) -> String {
    if v.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-:,@+".contains(c))
    {
        v.to_owned()
    } else {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn daemon() -> Command {
        Command::new("scm-x")
            .arg(
                Arg::new("state")
                    .long("state")
                    .global(true)
                    .env("SCM_X_STATE")
                    .default_value("x.json")
                    .help("State file."),
            )
            .subcommand(
                Command::new("serve")
                    .arg(
                        Arg::new("listen")
                            .long("listen")
                            .env("SCM_X_LISTEN")
                            .default_value("127.0.0.1:1")
                            .help("Where to listen.\nSecond line."),
                    )
                    .arg(
                        Arg::new("json")
                            .long("log-json")
                            .env("SCM_X_LOG_JSON")
                            .action(ArgAction::SetTrue)
                            .help("JSON logs."),
                    )
                    .arg(Arg::new("no-env").long("no-env").help("Not in the file.")),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn env_file_lists_every_env_twin_commented_with_its_help() {
        let mut cmd = daemon();
        cmd.build();
        let text = env_file(&cmd, "serve", &[]).unwrap();
        assert!(text.contains("# --listen <LISTEN>\n#   Where to listen.\n#   Second line.\n#SCM_X_LISTEN=127.0.0.1:1\n"), "{text}");
        assert!(
            text.contains("# --log-json\n#   JSON logs.\n#SCM_X_LOG_JSON=false\n"),
            "{text}"
        );
        assert_eq!(text.matches("#SCM_X_STATE=x.json").count(), 1, "{text}");
        assert!(!text.contains("no-env"), "{text}");
    }

    #[test]
    fn env_file_sets_package_values_and_refuses_unknown_names() {
        let mut cmd = daemon();
        cmd.build();
        let set = vec![("SCM_X_LISTEN".to_owned(), "[::]:443".to_owned())];
        let text = env_file(&cmd, "serve", &set).unwrap();
        assert!(text.contains("\nSCM_X_LISTEN=\"[::]:443\"\n"), "{text}");
        let bad = vec![("SCM_X_LISTN".to_owned(), "x".to_owned())];
        let e = env_file(&cmd, "serve", &bad).unwrap_err().to_string();
        assert!(e.contains("SCM_X_LISTN"), "{e}");
        let e = env_file(&cmd, "serv", &[]).unwrap_err().to_string();
        assert!(e.contains("has: serve") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn man_pages_cover_visible_subcommands_only() {
        let dir = tempfile::tempdir().unwrap();
        let files = run(
            daemon(),
            &Generate::Man {
                dir: dir.path().to_owned(),
            },
        )
        .unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["scm-x-serve.1", "scm-x.1"]);
        let page = fs::read_to_string(dir.path().join("scm-x-serve.1")).unwrap();
        assert!(page.contains("listen"), "{page}");
    }

    #[test]
    fn long_help_lines_are_wrapped_at_spaces() {
        assert_eq!(wrap("aa bb cc", 5), ["aa bb", "cc"]);
        assert_eq!(wrap("", 5), [""]);
        assert_eq!(wrap("toolongword x", 5), ["toolongword", "x"]);
    }

    #[test]
    fn set_values_must_be_name_equals_value() {
        assert!(parse_set("A_B=1").is_ok());
        assert!(parse_set("A B=1").is_err());
        assert!(parse_set("nothing").is_err());
    }
}
