//! The docs cannot drift from the command lines: every `scm-security`, `scm-proxy`, `scm-device`
//! and `cargo xtask` command line that README.md or docs/*.md show (in code spans and code
//! blocks) names subcommands and `--flags` that the binary's own `--help` lists, at that
//! subcommand or above it; and every `--flag` the docs name on its own exists in one of them.
//!
//! The binaries' command trees are read from their `--help` (the "Commands:" and "Options:"
//! sections clap writes), walked recursively: nothing here repeats what the binaries define.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use scm_e2e::stack::{binaries, workspace_root};

/// One command of a binary's tree, as its `--help` describes it.
#[derive(Debug, Default)]
struct Cmd {
    /// `--flag` names (without the dashes), each with whether it takes a value.
    flags: BTreeMap<String, bool>,
    subcommands: BTreeMap<String, Cmd>,
    /// Whether it takes positional arguments (an "Arguments:" section).
    positionals: bool,
}

impl Cmd {
    /// Reads `program args... --help`, then each subcommand's, recursively.
    fn read(program: &Path, args: &[String]) -> Cmd {
        let out = Command::new(program)
            .args(args)
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("running {} {args:?} --help: {e}", program.display()));
        assert!(
            out.status.success(),
            "{} {args:?} --help failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut cmd = Cmd::default();
        let mut section = "";
        for line in help.lines() {
            if !line.starts_with(' ') && line.ends_with(':') {
                section = line;
                continue;
            }
            if !line.starts_with(' ') && !line.is_empty() {
                section = "";
            }
            match section {
                "Commands:" => {
                    if let Some(name) = line.split_whitespace().next()
                        && line.starts_with("  ")
                        && !line.starts_with("   ")
                        && name != "help"
                    {
                        let mut sub = args.to_vec();
                        sub.push(name.to_owned());
                        cmd.subcommands
                            .insert(name.to_owned(), Cmd::read(program, &sub));
                    }
                }
                "Arguments:" => cmd.positionals = true,
                "Options:" => {
                    if let Some((name, takes_value)) = option_line(line) {
                        cmd.flags.insert(name, takes_value);
                    }
                }
                _ => {}
            }
        }
        cmd
    }

    /// Every flag of this command and below.
    fn all_flags(&self, into: &mut BTreeSet<String>) {
        into.extend(self.flags.keys().cloned());
        for sub in self.subcommands.values() {
            sub.all_flags(into);
        }
    }
}

/// `      --state <STATE>  ...` or `  -q, --quiet  ...`: the long name, and whether a value follows.
fn option_line(line: &str) -> Option<(String, bool)> {
    let rest = line.trim_start();
    let rest = match rest.strip_prefix('-') {
        Some(r) if !r.starts_with('-') => r.get(1..)?.strip_prefix(", ")?,
        _ => rest,
    };
    let rest = rest.strip_prefix("--")?;
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .unwrap_or(rest.len());
    let name = &rest[..end];
    let after = &rest[end..];
    let takes_value = after.starts_with(" <") || after.starts_with("=<") || after.starts_with(" [");
    (!name.is_empty()).then(|| (name.to_owned(), takes_value))
}

/// The code spans and code-block lines of a Markdown text, with their line numbers; a block's
/// lines ending in `\` are joined with the next.
fn code_of(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            let (start, mut joined) = pending.take().unwrap_or((n, String::new()));
            joined.push_str(line.trim_end_matches('\\'));
            joined.push(' ');
            if line.ends_with('\\') {
                pending = Some((start, joined));
            } else {
                out.push((start, joined));
            }
            continue;
        }
        for (k, span) in line.split('`').enumerate() {
            if k % 2 == 1 {
                out.push((n, span.to_owned()));
            }
        }
    }
    out
}

/// What a doc's command line claims that the binary does not have.
fn check_line(bin: &str, tree: &Cmd, tokens: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut path: Vec<&Cmd> = vec![tree];
    let mut names: Vec<&str> = vec![bin];
    let mut i = 0;
    while i < tokens.len() {
        let raw = tokens[i];
        i += 1;
        if ["|", "&&", "||", ";", "#", ">", "<", "2>&1", "&"].contains(&raw) || raw.starts_with('#')
        {
            break;
        }
        let tok = raw.trim_matches(|c| matches!(c, '[' | ']' | '(' | ')' | ',' | '.' | ':' | '"'));
        let here = *path.last().unwrap();
        if let Some(flag) = tok.strip_prefix("--") {
            let (name, inline_value) = match flag.split_once('=') {
                Some((n, _)) => (n, true),
                None => (flag, false),
            };
            if name.is_empty() || name.contains("...") || name.chars().any(|c| c.is_uppercase()) {
                continue;
            }
            match path.iter().rev().find_map(|c| c.flags.get(name)) {
                Some(&takes_value) => {
                    if takes_value && !inline_value {
                        i += 1;
                    }
                }
                None => problems.push(format!("`{} --{name}`: no such flag", names.join(" "))),
            }
            continue;
        }
        if tok.starts_with('-') || tok.is_empty() {
            continue;
        }
        if let Some(sub) = here.subcommands.get(tok) {
            path.push(sub);
            names.push(tok);
            continue;
        }
        // A bare lower-case word where the command takes no arguments but has subcommands must
        // be one of them (a placeholder such as `...` or `ARGS` is not a word).
        let word = tok.chars().all(|c| c.is_ascii_lowercase() || c == '-') && tok.len() > 1;
        if word && !here.subcommands.is_empty() && !here.positionals {
            problems.push(format!("`{} {tok}`: no such subcommand", names.join(" ")));
            break;
        }
    }
    problems
}

fn docs() -> Vec<(PathBuf, String)> {
    let root = workspace_root();
    let mut files = vec![root.join("README.md")];
    let mut dir: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    dir.sort();
    files.extend(dir);
    files
        .into_iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

/// `cargo build -p xtask` and the path of its binary.
fn xtask_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "-p",
            "xtask",
            "--bin",
            "xtask",
            "--message-format=json",
        ])
        .current_dir(workspace_root())
        .output()
        .expect("running cargo build -p xtask");
    assert!(
        out.status.success(),
        "cargo build -p xtask: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|m| {
            (m["target"]["name"] == "xtask")
                .then(|| m["executable"].as_str().map(PathBuf::from))
                .flatten()
        })
        .expect("cargo's messages name the xtask executable")
}

/// Whether a command begins after `before` (the tokens ahead of it on the line): at the start,
/// after a prompt, a shell operator or a wrapper, or after `VAR=value` assignments. A binary's
/// name elsewhere is prose (`cargo test -p scm-proxy`, a diagram's label) and names no flag.
fn starts_a_command(before: &[&str]) -> bool {
    match before.last() {
        None => true,
        Some(t)
            if [
                "$", "#", "|", "&&", "||", ";", "sudo", "exec", "time", "nice",
            ]
            .contains(t) =>
        {
            true
        }
        Some(t) if t.contains('=') && t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) => {
            starts_a_command(&before[..before.len() - 1])
        }
        _ => false,
    }
}

/// Flags the docs name on their own that belong to other programs (nginx, curl, cargo, ip, ...)
/// or to the tools of the benchmark, each with where it comes from.
const OTHER_PROGRAMS: &[&str] = &[
    // libtest's, in `cargo test -- --test-threads=1`.
    "test-threads",
];

#[test]
fn every_command_line_in_the_docs_exists_in_the_binaries_help() {
    let bins = binaries();
    let trees: Vec<(&str, Cmd)> = vec![
        ("scm-security", Cmd::read(&bins.security, &[])),
        ("scm-proxy", Cmd::read(&bins.proxy, &[])),
        ("scm-device", Cmd::read(&bins.device, &[])),
        ("cargo xtask", Cmd::read(&xtask_binary(), &[])),
    ];
    let mut known = BTreeSet::new();
    for (_, t) in &trees {
        t.all_flags(&mut known);
    }
    // The checks must see the trees: a walk that read nothing would pass everything.
    assert!(trees.iter().all(|(_, t)| !t.subcommands.is_empty()));
    assert!(known.contains("security-url") && known.contains("tls-cert"));

    let mut problems = Vec::new();
    let mut lines_checked = 0;
    for (path, text) in docs() {
        let shown = path
            .strip_prefix(workspace_root())
            .unwrap_or(&path)
            .display()
            .to_string();
        for (n, code) in code_of(&text) {
            let tokens: Vec<&str> = code.split_whitespace().collect();
            let mut named_a_binary = false;
            for start in 0..tokens.len() {
                if !starts_a_command(&tokens[..start]) {
                    continue;
                }
                for (bin, tree) in &trees {
                    let words: Vec<&str> = bin.split(' ').collect();
                    if tokens[start..].starts_with(&words) {
                        named_a_binary = true;
                        lines_checked += 1;
                        for p in check_line(bin, tree, &tokens[start + words.len()..]) {
                            problems.push(format!("{shown}:{n}: {p}"));
                        }
                    }
                }
            }
            if named_a_binary {
                continue;
            }
            // A flag named on its own, as in `--drain-timeout`.
            if let [only] = tokens.as_slice()
                && let Some(flag) = only.strip_prefix("--")
            {
                let name = flag.split(['=', ' ']).next().unwrap_or_default();
                if !name.is_empty() && !known.contains(name) && !OTHER_PROGRAMS.contains(&name) {
                    problems.push(format!(
                        "{shown}:{n}: `--{name}`: no scm binary has this flag"
                    ));
                }
            }
        }
    }
    assert!(
        lines_checked > 50,
        "only {lines_checked} command lines found in the docs"
    );
    assert!(
        problems.is_empty(),
        "{} claims in the docs that the binaries' --help does not back:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_check_catches_a_flag_and_a_subcommand_that_do_not_exist() {
    let tree = Cmd::read(&binaries().device, &[]);
    let ok = check_line("scm-device", &tree, &["--state", "a.json", "login"]);
    assert!(ok.is_empty(), "{ok:?}");
    let bad = check_line(
        "scm-device",
        &tree,
        &["--state", "a.json", "login", "--no-such-flag"],
    );
    assert_eq!(bad, ["`scm-device login --no-such-flag`: no such flag"]);
    let bad = check_line("scm-device", &tree, &["--state", "a.json", "teleport"]);
    assert_eq!(bad, ["`scm-device teleport`: no such subcommand"]);
}
