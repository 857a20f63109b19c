//! scm's device client: what a mobile app does, as a library (used by the CLI, the end-to-end
//! tests, the demo and the benchmarks).
//!
//! ```text
//! let device = Device::enroll(config, "alice", "password").await?;  // once: gets the shared key
//! let session = Session::login(&device, "password").await?;          // proof of the shared key
//! let stream = session.open("intranet").await?;                      // TLS to a proxy + preamble
//! session.logout().await?;
//! ```
//!
//! - [`api`]: the Security server's device API, with fail-over across several URLs.
//! - [`device`]: enrolment and the enrolled identity ([`Device`]).
//! - [`session`]: login, opening connections through a proxy, logout ([`Session`]).
//! - [`http`]: HTTP requests to an http-mode resource through a proxy.
//! - [`tunnel`]: a local listener forwarding to a tcp-mode resource (like `ssh -L`).
//! - [`state`]: the state file the CLI keeps between commands (mode 0600).
//! - [`update`]: "is there an update for me" and the checked download.

pub mod api;
pub mod device;
pub mod error;
pub mod http;
pub mod session;
pub mod state;
pub mod tls;
pub mod tunnel;
pub mod update;

pub use device::{Device, DeviceConfig, Enrollment};
pub use error::DeviceError;
pub use session::{ProxyStream, Session};

#[cfg(test)]
mod layout_tests {
    //! The module graph of this crate has no circle: each module may use the ones below it, never
    //! one that (directly or round a loop) uses it back.

    use std::collections::{BTreeMap, BTreeSet};

    /// `crate::<module>` references of each module's code (comments, doc links included, are
    /// not imports and are skipped).
    fn graph() -> BTreeMap<String, BTreeSet<String>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut modules = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).expect("reading src/") {
            let path = entry.expect("listing src/").path();
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if path.extension().is_none_or(|e| e != "rs") || name == "lib" || name == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("reading a module");
            let mut uses = BTreeSet::new();
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (i, _) in line.match_indices("crate::") {
                    let used: String = line[i + "crate::".len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !used.is_empty() && used != name {
                        uses.insert(used);
                    }
                }
            }
            modules.insert(name.to_owned(), uses);
        }
        modules
    }

    /// The first circle found, as the modules round it.
    fn circle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
        fn visit(
            g: &BTreeMap<String, BTreeSet<String>>,
            m: &str,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|p| p == m) {
                let mut c = path[at..].to_vec();
                c.push(m.to_owned());
                return Some(c);
            }
            if !done.insert(m.to_owned()) {
                return None;
            }
            path.push(m.to_owned());
            for next in g.get(m).into_iter().flatten() {
                if let Some(c) = visit(g, next, path, done) {
                    return Some(c);
                }
            }
            path.pop();
            None
        }
        let mut done = BTreeSet::new();
        g.keys()
            .find_map(|m| visit(g, m, &mut Vec::new(), &mut done))
    }

    #[test]
    fn no_two_modules_import_each_other() {
        let g = graph();
        assert!(g.contains_key("session") && g["session"].contains("device"));
        if let Some(c) = circle(&g) {
            panic!("module import circle: {}", c.join(" -> "));
        }
    }

    #[test]
    fn the_circle_finder_finds_circles() {
        let g: BTreeMap<String, BTreeSet<String>> =
            [("a", &["b"][..]), ("b", &["c"][..]), ("c", &["a"][..])]
                .into_iter()
                .map(|(m, u)| (m.into(), u.iter().map(|s| s.to_string()).collect()))
                .collect();
        assert_eq!(circle(&g).map(|c| c.len()), Some(4));
    }
}
