//! Every fuzz target's committed corpus (`fuzz/corpus/<target>/`, and the inputs of fixed
//! crashes in `fuzz/regressions/<target>/`) replayed through the same crate function the target
//! wraps, on stable, in every test run: a parser that panics on an input once found keeps failing
//! here. The table below and `fuzz/fuzz_targets/` must name the same targets.

use std::path::{Path, PathBuf};

use scm_e2e::stack::workspace_root;

/// What a target feeds its input to.
type Entry = fn(&[u8]);

/// Each target and the function its `fuzz_targets/<name>.rs` calls.
const TARGETS: &[(&str, Entry)] = &[
    ("preamble", |d| {
        let _ = scm_proto::preamble::Preamble::decode(d);
    }),
    ("api_body", |d| {
        scm_security::fuzz::api_body(d);
    }),
    ("revocation_stream", |d| {
        scm_proxy::proxy::fuzz::revocation_stream(d);
    }),
    ("backup_manifest", |d| {
        scm_security::fuzz::backup_manifest(d);
    }),
    ("backup_rows", |d| {
        scm_security::fuzz::backup_rows(d);
    }),
    ("packet", |d| {
        let _ = proxy_common::parse::parse(d);
    }),
    ("http_head", |d| {
        scm_proxy::proxy::fuzz::http_head(d);
    }),
    ("duration", |d| {
        if let Ok(text) = std::str::from_utf8(d) {
            let _ = scm_proto::duration::parse_duration(text);
        }
    }),
];

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("a corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

#[test]
fn the_table_names_every_fuzz_target_and_each_has_a_corpus() {
    let mut on_disk: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_string_lossy().into_owned()))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(
        on_disk, listed,
        "fuzz/fuzz_targets/ and this test's table differ"
    );
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        assert!(
            corpus.len() >= 3,
            "fuzz/corpus/{name} has {} seeds",
            corpus.len()
        );
    }
}

#[test]
fn every_corpus_replays_without_a_panic() {
    let mut replayed = 0;
    for (name, run) in TARGETS {
        for dir in ["corpus", "regressions"] {
            for file in files(&fuzz_dir().join(dir).join(name)) {
                let data = std::fs::read(&file).unwrap();
                let r = std::panic::catch_unwind(|| run(&data));
                assert!(r.is_ok(), "{name}: {} panicked", file.display());
                replayed += 1;
            }
        }
    }
    assert!(
        replayed >= 3 * TARGETS.len(),
        "only {replayed} inputs replayed"
    );
}

/// A few seeds whose outcome is known, so a replay that silently stopped parsing would be seen.
#[test]
fn known_seeds_have_their_known_outcome() {
    let seed = |t: &str, f: &str| std::fs::read(fuzz_dir().join("corpus").join(t).join(f)).unwrap();
    assert!(scm_proto::preamble::Preamble::decode(&seed("preamble", "documented")).is_ok());
    assert!(scm_proto::preamble::Preamble::decode(&seed("preamble", "lying_length")).is_err());
    assert!(scm_proxy::proxy::fuzz::http_head(&seed(
        "http_head",
        "spoofed"
    )));
    assert_eq!(
        scm_proxy::proxy::fuzz::revocation_stream(&seed("revocation_stream", "events")),
        3
    );
    assert!(scm_security::fuzz::api_body(&seed("api_body", "site")));
    assert!(!scm_security::fuzz::api_body(&seed(
        "api_body",
        "unknown_field"
    )));
    assert!(!scm_security::fuzz::backup_manifest(&seed(
        "backup_manifest",
        "outside"
    )));
    let long = String::from_utf8(seed("duration", "d7")).unwrap();
    assert_eq!(long, "99999999999999999h");
    let err = scm_proto::duration::parse_duration(&long).unwrap_err();
    assert!(err.contains("too long"), "{err}");
    assert!(proxy_common::parse::parse(&seed("packet", "tcp_syn")[..]).is_ok());
}
