//! The error codes the Security server can answer are all documented in `docs/protocol.md`, the
//! contract clients are written from: a new `ApiError` code without its line there fails here.

use std::path::Path;

const DOC: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));

/// The first string literal inside the parentheses that open at `open`, if it looks like a code
/// (snake_case). Strings are skipped over so a `)` inside a message does not end the call.
fn first_code(src: &str, open: usize) -> Option<String> {
    let bytes = src.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return None;
                }
            }
            b'"' => {
                let end = i + 1 + src[i + 1..].find('"')?;
                let lit = &src[i + 1..end];
                let is_code =
                    !lit.is_empty() && lit.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                return is_code.then(|| lit.to_owned());
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Every code passed to an `ApiError` constructor in `dir`, with the file it is in.
fn codes_in(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            codes_in(&path, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") || path.ends_with("contract_tests.rs") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        let mut at = 0;
        while let Some(found) = src[at..].find("ApiError::") {
            let start = at + found + "ApiError::".len();
            at = start;
            let name_len = src[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(0);
            if src[start + name_len..].starts_with('(')
                && let Some(code) = first_code(&src, start + name_len)
            {
                out.push((code, path.display().to_string()));
            }
        }
    }
}

#[test]
fn every_error_code_is_in_the_protocol_document() {
    let mut codes = Vec::new();
    codes_in(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut codes,
    );
    // The scan must see the codes it is meant to check, or it proves nothing.
    for known in [
        "bad_mac",
        "unknown_challenge",
        "invalid_field",
        "rate_limited",
    ] {
        assert!(
            codes.iter().any(|(c, _)| c == known),
            "the scan missed {known}: {codes:?}"
        );
    }
    let missing: Vec<_> = codes
        .iter()
        .filter(|(code, _)| !DOC.contains(&format!("`{code}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "error codes answered by the server but not documented in docs/protocol.md: {missing:?}"
    );
}
