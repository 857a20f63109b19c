//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay test
//! (`tests/tests/fuzz_corpora.rs`): each hands arbitrary bytes to the code the Security server
//! runs on input from the network or from a snapshot, and panics only where that code broke a
//! property it promises.

use scm_proto::api::{AssertionRequest, EnrollRequest, LoginRequest, ValidateRequest};
use serde::de::DeserializeOwned;

use crate::admin_types::{
    ActivationCodeRequest, NewUser, PolicyUpdate, ResourceBody, SiteBody, UpdateUser,
};
use crate::api::decode;

/// The JSON bodies of the device, proxies' and admin APIs, decoded strictly as the server does
/// (`api::decode`); the first byte chooses the body type. An error is always one of the two
/// the API answers (422 `invalid_request`, 400 `malformed_json`). Whether the body decoded.
pub fn api_body(data: &[u8]) -> bool {
    let Some((&which, body)) = data.split_first() else {
        return false;
    };
    fn one<T: DeserializeOwned>(body: &[u8]) -> bool {
        match decode::<T>(body) {
            Ok(_) => true,
            Err(e) => {
                assert!(
                    matches!(e.code, "invalid_request" | "malformed_json"),
                    "{}: {}",
                    e.code,
                    e.message
                );
                false
            }
        }
    }
    match which % 10 {
        0 => one::<EnrollRequest>(body),
        1 => one::<LoginRequest>(body),
        2 => one::<ValidateRequest>(body),
        3 => one::<AssertionRequest>(body),
        4 => one::<NewUser>(body),
        5 => one::<UpdateUser>(body),
        6 => one::<ActivationCodeRequest>(body),
        7 => one::<PolicyUpdate>(body),
        8 => one::<ResourceBody>(body),
        _ => one::<SiteBody>(body),
    }
}

/// A snapshot's manifest, parsed and checked as a restore does.
pub fn backup_manifest(data: &[u8]) -> bool {
    crate::backup::parse_manifest(data, "manifest.json").is_ok()
}

/// A snapshot table's rows, parsed and checked as a restore does; the first byte chooses the
/// table.
pub fn backup_rows(data: &[u8]) -> bool {
    let Some((&which, rows)) = data.split_first() else {
        return false;
    };
    let tables: Vec<&str> = crate::backup::table_names().collect();
    let table = tables[usize::from(which) % tables.len()];
    crate::backup::parse_table_rows(table, rows).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_entry_point_tells_good_from_bad() {
        assert!(api_body(
            b"\x08{\"address\":\"10.0.0.1:80\",\"mode\":\"tcp\"}"
        ));
        assert!(api_body(b"\x09{\"proxy_urls\":[\"10.0.0.2:9443\"]}"));
        // An unknown field is refused (strict decoding), a syntax error too.
        assert!(!api_body(b"\x09{\"proxy_urls\":[],\"extra\":1}"));
        assert!(!api_body(b"\x01{not json"));
        assert!(!api_body(b""));
        assert!(!backup_manifest(b"{}"));
        assert!(!backup_rows(b"\x00[1,2"));
    }
}
