//! `cargo xtask fuzz TARGET --time 600`: one cargo-fuzz target run for a while on nightly
//! (libFuzzer, AddressSanitizer), its committed corpus as seeds, and a one-line account of what
//! it did: executions, speed, new inputs, crashes.
//!
//! New inputs go to `target/fuzz-corpus/TARGET` (the committed seeds in `fuzz/corpus/TARGET`
//! stay as they are); a crash is written to `fuzz/artifacts/TARGET/` by libFuzzer, and the
//! summary says to copy it to `fuzz/regressions/TARGET/`, where `tests/tests/fuzz_corpora.rs`
//! replays it on every test run.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Options of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Targets: the files of fuzz/fuzz_targets/ (e.g. preamble, api_body, \
    revocation_stream, backup_manifest, backup_rows, packet, http_head, duration).\n\n\
    Example:\n  cargo xtask fuzz preamble --time 600"
)]
pub struct FuzzArgs {
    /// The target to run (a file of fuzz/fuzz_targets/ without `.rs`).
    target: String,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    time: u64,
}

/// The targets, from `fuzz/fuzz_targets/`.
fn targets() -> Result<Vec<String>> {
    let dir = cmd::root().join("fuzz/fuzz_targets");
    let mut out: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| {
            let p = e.ok()?.path();
            if p.extension()? != "rs" {
                return None;
            }
            Some(p.file_stem()?.to_string_lossy().into_owned())
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Installs cargo-fuzz if it is missing.
fn ensure_cargo_fuzz() -> Result<()> {
    if cmd::output(Command::new("cargo").args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz (a minute or two)");
    cmd::run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// What libFuzzer's final statistics say.
#[derive(Debug, Default, PartialEq)]
struct Stats {
    executions: u64,
    per_second: u64,
    new_units: u64,
}

fn parse_stats(log: &str) -> Stats {
    let value = |key: &str| {
        log.lines()
            .rev()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or(0)
    };
    Stats {
        executions: value("stat::number_of_executed_units:"),
        per_second: value("stat::average_exec_per_sec:"),
        new_units: value("stat::new_units_added:"),
    }
}

/// Runs the target.
pub fn run(args: &FuzzArgs) -> Result<()> {
    let all = targets()?;
    if !all.contains(&args.target) {
        bail!(
            "no fuzz target {:?}; the targets are: {}",
            args.target,
            all.join(", ")
        );
    }
    ensure_cargo_fuzz()?;
    let root = cmd::root();
    let t = &args.target;
    let found = cmd::target_dir().join("fuzz-corpus").join(t);
    std::fs::create_dir_all(&found)?;
    let seeds = root.join("fuzz/corpus").join(t);
    let log = cmd::target_dir().join(format!("fuzz-{t}.log"));
    eprintln!(
        "fuzz: {t} for {} s (libFuzzer's output in {})",
        args.time,
        log.display()
    );
    let file = std::fs::File::create(&log)?;
    let started = Instant::now();
    let status = Command::new("cargo")
        .args(["+nightly", "fuzz", "run", t])
        .arg(&found)
        .arg(&seeds)
        .args([
            "--",
            &format!("-max_total_time={}", args.time),
            "-print_final_stats=1",
        ])
        .current_dir(&root)
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .context("running cargo fuzz (nightly)")?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let stats = parse_stats(&text);
    let secs = started.elapsed().as_secs();
    let artifacts: Vec<PathBuf> = std::fs::read_dir(root.join("fuzz/artifacts").join(t))
        .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz {t}: stopped with {status} after {secs} s and {} executions; the input that \
             broke it is in fuzz/artifacts/{t}/ ({} file(s)): fix the cause, then copy it into \
             fuzz/regressions/{t}/ so every test run replays it. libFuzzer's last lines:\n{}",
            stats.executions,
            artifacts.len(),
            tail.join("\n")
        );
    }
    println!(
        "fuzz {t}: {} executions in {secs} s ({} per second), {} new inputs kept in {}, 0 crashes",
        stats.executions,
        stats.per_second,
        stats.new_units,
        found.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_statistics_are_read() {
        let log = "#1024 DONE cov: 10\nDone 1024 runs in 2 second(s)\n\
                   stat::number_of_executed_units: 123456\nstat::average_exec_per_sec:     2057\n\
                   stat::new_units_added:          42\nstat::slowest_unit_time_sec:    0\n";
        assert_eq!(
            parse_stats(log),
            Stats {
                executions: 123_456,
                per_second: 2057,
                new_units: 42
            }
        );
        assert_eq!(parse_stats(""), Stats::default());
    }

    #[test]
    fn the_targets_are_the_files_of_fuzz_targets() {
        let t = targets().unwrap();
        assert!(t.contains(&"preamble".to_owned()), "{t:?}");
        assert!(t.len() >= 8, "{t:?}");
    }
}
