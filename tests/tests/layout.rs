//! The source layout: no two modules of any crate of the workspace import each other, directly
//! or round a loop. [`import_cycles`] reads a crate's `src/` (std only, no parser crate); the
//! test runs it over every crate the root `Cargo.toml` lists.
//!
//! Nodes are source files (`a/mod.rs` and `a.rs` both stand for module `a`); an edge is any path
//! written in code (a `use` tree or an inline path) that starts with `crate::`, `super::`,
//! `self::`, or the name of a child module the file declares, resolved to the file that holds
//! the longest prefix of it. A `mod child;` declaration is not an edge: a parent may declare
//! children that use it. Comments and string literals are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One import: where it is written.
#[derive(Debug, Clone)]
pub struct Edge {
    /// File (relative to `src/`) and line of the first reference.
    pub at: String,
    /// The path as written.
    pub path: String,
}

/// The module graph of one crate root: file -> (file it references -> first reference).
pub type Graph = BTreeMap<String, BTreeMap<String, Edge>>;

/// Every loop of imports among the files of the crate(s) rooted in `src` (`lib.rs` and
/// `main.rs`, each its own crate), each described on one line: `a.rs -> b.rs (a.rs:3 crate::b::X)
/// -> a.rs (b.rs:9 crate::a::Y)`. Empty when the layout has no circle.
pub fn import_cycles(src: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for root in ["lib.rs", "main.rs"] {
        if src.join(root).is_file() {
            let g = graph(src, root);
            out.extend(cycles(&g));
        }
    }
    out
}

/// A module of the crate: its path (`["api", "admin"]`) and file.
#[derive(Debug, Clone)]
struct Module {
    path: Vec<String>,
    file: PathBuf,
}

/// Builds the graph of the crate whose root file is `src/root`.
pub fn graph(src: &Path, root: &str) -> Graph {
    let mut modules: Vec<Module> = Vec::new();
    let mut todo = vec![Module {
        path: vec![],
        file: src.join(root),
    }];
    let mut texts: BTreeMap<PathBuf, String> = BTreeMap::new();
    while let Some(m) = todo.pop() {
        let Ok(raw) = std::fs::read_to_string(&m.file) else {
            continue;
        };
        let text = blank_comments_and_strings(&raw);
        for child in declared_children(&text) {
            // `a.rs` and `a/mod.rs` (and the root) keep children in `a/`; the root in `src/`.
            let dir = if m.path.is_empty() || m.file.ends_with("mod.rs") {
                m.file.parent().unwrap_or(src).to_path_buf()
            } else {
                m.file.with_extension("")
            };
            let flat = dir.join(format!("{child}.rs"));
            let nested = dir.join(&child).join("mod.rs");
            let file = if flat.is_file() { flat } else { nested };
            let mut path = m.path.clone();
            path.push(child);
            todo.push(Module { path, file });
        }
        texts.insert(m.file.clone(), text);
        modules.push(m);
    }
    let by_path: BTreeMap<Vec<String>, String> = modules
        .iter()
        .map(|m| (m.path.clone(), rel(src, &m.file)))
        .collect();
    let mut g = Graph::new();
    for m in &modules {
        let name = rel(src, &m.file);
        let text = &texts[&m.file];
        let children = declared_children(text);
        let edges = g.entry(name.clone()).or_default();
        for (line, inline_mods, written) in references(text) {
            // Inline `mod tests { .. }` blocks are part of this file: `super::` inside one
            // names the file's own module.
            let mut here = m.path.clone();
            here.extend(inline_mods.iter().cloned());
            let Some(target) = resolve(&written, &here, &children, &m.path) else {
                continue;
            };
            // The longest prefix of the target that is a module with a file of its own.
            let mut p = target;
            let file = loop {
                if let Some(f) = by_path.get(&p) {
                    break f.clone();
                }
                if p.pop().is_none() {
                    break by_path[&Vec::new()].clone();
                }
            };
            if file != name {
                edges.entry(file).or_insert_with(|| Edge {
                    at: format!("{name}:{line}"),
                    path: written.clone(),
                });
            }
        }
    }
    g
}

fn rel(src: &Path, file: &Path) -> String {
    file.strip_prefix(src)
        .unwrap_or(file)
        .to_string_lossy()
        .into_owned()
}

/// Resolves a written path to an absolute module path (segments), or None if it leaves the
/// crate (another crate, std, a local name).
fn resolve(
    written: &str,
    here: &[String],
    file_children: &[String],
    file_path: &[String],
) -> Option<Vec<String>> {
    let segs: Vec<&str> = written.split("::").map(str::trim).collect();
    let mut at: Vec<String>;
    let mut rest = &segs[..];
    match segs[0] {
        "crate" => {
            at = vec![];
            rest = &segs[1..];
        }
        "self" => {
            at = here.to_vec();
            rest = &segs[1..];
        }
        "super" => {
            at = here.to_vec();
            while rest.first() == Some(&"super") {
                at.pop()?;
                rest = &rest[1..];
            }
        }
        first if here.len() == file_path.len() && file_children.iter().any(|c| c == first) => {
            at = file_path.to_vec();
        }
        _ => return None,
    }
    at.extend(rest.iter().map(|s| (*s).to_owned()));
    Some(at)
}

/// The `mod name;` declarations of a file (inline `mod name { .. }` blocks excluded).
fn declared_children(text: &str) -> Vec<String> {
    let toks = tokens(text);
    let mut out = Vec::new();
    for w in toks.windows(3) {
        if w[0].1 == "mod" && is_ident(&w[1].1) && w[2].1 == ";" {
            out.push(w[1].1.clone());
        }
    }
    out
}

fn is_ident(t: &str) -> bool {
    t.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && t.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// (line, inline module stack, path) of every path in the file that may name a module of the
/// crate: each leaf of a `use` tree, and each `a::b::c` path in code.
fn references(text: &str) -> Vec<(usize, Vec<String>, String)> {
    let toks = tokens(text);
    let mut out = Vec::new();
    let mut depth = 0usize;
    // (name, brace depth inside it)
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let (line, t) = (toks[i].0, toks[i].1.as_str());
        let stack = || inline.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        match t {
            "{" => depth += 1,
            "}" => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            "mod" if toks.get(i + 2).is_some_and(|t| t.1 == "{") => {
                inline.push((toks[i + 1].1.clone(), depth + 1));
            }
            "use" => {
                let end = toks[i..]
                    .iter()
                    .position(|t| t.1 == ";")
                    .map_or(toks.len(), |p| i + p);
                let tree: Vec<&str> = toks[i + 1..end].iter().map(|t| t.1.as_str()).collect();
                for p in expand_use(&tree) {
                    out.push((line, stack(), p));
                }
                i = end;
            }
            _ if is_ident(t) && toks.get(i + 1).is_some_and(|n| n.1 == "::") => {
                let prev_is_sep = i > 0 && toks[i - 1].1 == "::";
                if !prev_is_sep {
                    let mut p = t.to_owned();
                    let mut j = i + 1;
                    while toks.get(j).is_some_and(|n| n.1 == "::")
                        && toks.get(j + 1).is_some_and(|n| is_ident(&n.1))
                    {
                        p.push_str("::");
                        p.push_str(&toks[j + 1].1);
                        j += 2;
                    }
                    out.push((line, stack(), p));
                    i = j;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The leaf paths of a `use` tree given as tokens: `a::{b, c::{d, e as f}}` -> a::b, a::c::d,
/// a::c::e.
fn expand_use(toks: &[&str]) -> Vec<String> {
    fn walk(toks: &[&str], i: &mut usize, prefix: &str, out: &mut Vec<String>) {
        let mut cur = prefix.to_owned();
        while *i < toks.len() {
            match toks[*i] {
                "{" => {
                    *i += 1;
                    loop {
                        walk(toks, i, &cur, out);
                        match toks.get(*i) {
                            Some(&",") => *i += 1,
                            Some(&"}") => {
                                *i += 1;
                                break;
                            }
                            _ => break,
                        }
                        if toks.get(*i) == Some(&"}") {
                            *i += 1;
                            break;
                        }
                    }
                    return;
                }
                "," | "}" => break,
                "::" => cur.push_str("::"),
                "as" => *i += 1,
                "*" => {}
                // `as` skips its alias above.
                t if is_ident(t) => cur.push_str(t),
                _ => {}
            }
            *i += 1;
        }
        let cur = cur.trim_end_matches("::").to_owned();
        if !cur.is_empty() && cur != "self" {
            out.push(cur.strip_suffix("::self").unwrap_or(&cur).to_owned());
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    // `pub use`, `pub(crate) use`: the caller starts after `use`.
    walk(toks, &mut i, "", &mut out);
    out
}

/// Tokens with their line: identifiers, `::`, and single punctuation characters.
fn tokens(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut line = 1;
    let b: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let s = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            out.push((line, b[s..i].iter().collect()));
        } else if c == ':' && b.get(i + 1) == Some(&':') {
            out.push((line, "::".into()));
            i += 2;
        } else {
            out.push((line, c.to_string()));
            i += 1;
        }
    }
    out
}

/// `text` with comments, string and char literals replaced by spaces (newlines kept, so line
/// numbers stay right).
fn blank_comments_and_strings(text: &str) -> String {
    let b: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut nest = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    nest += 1;
                    out.push_str("  ");
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    nest -= 1;
                    out.push_str("  ");
                    i += 2;
                    if nest == 0 {
                        break;
                    }
                } else {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !prev_ident(&b, i) {
            // Raw string r"..." / r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &b[i..j.min(b.len())] {
                out.push(blank(ch));
            }
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(blank(b[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): only blank the former.
            let end = if next == Some('\\') {
                b.get(i + 3..)
                    .and_then(|r| r.iter().position(|&x| x == '\''))
                    .map(|p| i + 3 + p)
            } else if b.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    for _ in i..=e {
                        out.push(' ');
                    }
                    i = e + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_ident(b: &[char], i: usize) -> bool {
    i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_')
}

/// Every strongly connected set of more than one file, as one loop through it.
fn cycles(g: &Graph) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for start in g.keys() {
        if seen.contains(start) {
            continue;
        }
        // Shortest path from a successor of `start` back to `start` (BFS).
        let Some(path) = shortest_loop(g, start) else {
            continue;
        };
        let mut line = start.clone();
        let mut prev = start.clone();
        for n in &path {
            let e = &g[&prev][n];
            let _ = write!(line, " -> {n} ({} {})", e.at, e.path);
            prev = n.clone();
        }
        // Report each loop once: mark its members.
        seen.extend(path.iter().cloned());
        out.push(line);
    }
    out
}

fn shortest_loop(g: &Graph, start: &str) -> Option<Vec<String>> {
    let mut back: BTreeMap<String, String> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::new();
    for n in g.get(start)?.keys() {
        if !back.contains_key(n) {
            back.insert(n.clone(), start.to_owned());
            queue.push_back(n.clone());
        }
    }
    while let Some(n) = queue.pop_front() {
        if n == start {
            let mut path = vec![n.clone()];
            let mut cur = back[&n].clone();
            while cur != start {
                path.push(cur.clone());
                cur = back[&cur].clone();
            }
            path.reverse();
            return Some(path);
        }
        for m in g.get(&n).into_iter().flat_map(|e| e.keys()) {
            if !back.contains_key(m) {
                back.insert(m.clone(), n.clone());
                queue.push_back(m.clone());
            }
        }
    }
    None
}

/// The workspace's member folders, read from the root `Cargo.toml`'s `members = [...]`.
fn members(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(root.join("Cargo.toml")).expect("reading Cargo.toml");
    let start = text.find("members = [").expect("a members list") + "members = [".len();
    let end = start
        + text[start..]
            .find(']')
            .expect("the end of the members list");
    text[start..end]
        .split(',')
        .filter_map(|m| {
            let m = m.trim().trim_matches('"');
            (!m.is_empty()).then(|| root.join(m))
        })
        .collect()
}

#[test]
fn no_crate_of_the_workspace_has_an_import_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf();
    let crates = members(&root);
    // The list is read, not assumed: the crates of every layer must be in it.
    for must in [
        "security",
        "proxy-user",
        "device",
        "proto",
        "proxy-common",
        "proxy-ebpf",
    ] {
        assert!(
            crates.iter().any(|c| c.ends_with(must)),
            "{must} is not among the members read from Cargo.toml: {crates:?}"
        );
    }
    let mut report = String::new();
    for krate in &crates {
        let src = krate.join("src");
        assert!(src.is_dir(), "{} has no src/", krate.display());
        for l in import_cycles(&src) {
            let _ = writeln!(report, "{}: {l}", krate.display());
        }
    }
    assert!(
        report.is_empty(),
        "modules import each other; move what both need into a module of its own:\n{report}"
    );
}

#[test]
fn the_checker_sees_direct_nested_and_parent_loops() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let w = |p: &str, t: &str| {
        let f = src.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, t).unwrap();
    };
    w("lib.rs", "mod a;\npub mod b;\nmod api;\nmod leaf;\n");
    w(
        "a.rs",
        "use crate::{b::{self, X}, leaf::Y};\n// crate::leaf in a comment\n",
    );
    w(
        "b.rs",
        "fn f() { let s = \"crate::a::Z\"; crate::a::g(); }\n",
    );
    w(
        "leaf.rs",
        "//! nothing\n#[cfg(test)]\nmod tests { use super::*; }\n",
    );
    w("api/mod.rs", "mod x;\npub fn h() { x::run() }\n");
    w("api/x.rs", "use super::h;\n");
    let loops = import_cycles(src);
    assert_eq!(loops.len(), 2, "{loops:#?}");
    assert!(
        loops[0].starts_with("a.rs -> b.rs (a.rs:1 crate::b) -> a.rs (b.rs:1 crate::a::g)"),
        "{loops:#?}"
    );
    assert!(
        loops[1].contains("api/mod.rs -> api/x.rs (api/mod.rs:2 x::run) -> api/mod.rs"),
        "{loops:#?}"
    );
    // Break both: no loop left, and the test module's `super` stays in its file.
    w("b.rs", "fn f() { let s = \"crate::a::Z\"; }\n");
    w("api/x.rs", "pub fn run() {}\n");
    assert_eq!(import_cycles(src), Vec::<String>::new());
    assert_eq!(
        graph(src, "lib.rs")["a.rs"].keys().collect::<Vec<_>>(),
        ["b.rs", "leaf.rs"]
    );
}
