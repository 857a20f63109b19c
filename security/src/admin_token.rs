//! The admin token: the bearer secret of the admin API, in a file of its own (created with the
//! data directory, mode 0600), read by the server and by the admin CLI.

use std::fs;
use std::path::Path;

use scm_proto::crypto::{self, KEY_LEN};

use crate::error::Error;
use crate::secrets::Secret;

/// The admin token the server compares bearer tokens with; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct AdminToken(Secret);

impl AdminToken {
    /// Reads the token file (see [`read_token_file`]).
    pub fn load(path: &Path) -> Result<Self, Error> {
        read_token_file(path).map(|t| Self(Secret(t)))
    }

    /// Whether `presented` is the token, compared in constant time.
    pub fn matches(&self, presented: &str) -> bool {
        crypto::ct_eq(presented.as_bytes(), self.0.0.as_bytes())
    }
}

/// A new random admin token in its file format.
pub fn new_admin_token_text() -> String {
    format!("{}\n", hex::encode(crypto::random_bytes::<KEY_LEN>()))
}

/// Reads a token file, trimmed; refuses an empty one.
pub fn read_token_file(path: &Path) -> Result<String, Error> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let token = text.trim().to_owned();
    if token.len() < 16 {
        return Err(Error::Invalid(format!(
            "{}: token must be at least 16 characters",
            path.display()
        )));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_matches_only_itself_and_is_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("admin.token");
        crate::secrets::write_secret_file(&p, &new_admin_token_text()).unwrap();
        let t = AdminToken::load(&p).unwrap();
        let text = read_token_file(&p).unwrap();
        assert!(t.matches(&text));
        assert!(!t.matches(&text[1..]));
        assert!(!format!("{t:?}").contains(&text));
        std::fs::write(&p, "short\n").unwrap();
        assert!(AdminToken::load(&p).is_err());
    }
}
