//! App packages on disk: content-addressed files under DATA_DIR/apps, written while hashing the
//! upload, served with single HTTP byte ranges. Which version a device may run is
//! [`crate::app_policy`]'s.

use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use futures_util::StreamExt as _;
use scm_proto::api::{AppRelease, HEADER_SHA256};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};

use crate::error::{ApiError, Error};

/// Directory of package files.
pub(crate) fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("apps")
}

/// Whether `text` is a lowercase hex SHA-256: the only file name a package has. Every path
/// built from a release's sha256 is checked with this first, so a bad row (a restored one, say)
/// can never name a file outside the packages folder.
pub(crate) fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The path of the package named `sha256` under `dir`, or None if that is not a package name.
pub(crate) fn package_path(dir: &Path, sha256: &str) -> Option<PathBuf> {
    is_sha256_hex(sha256).then(|| dir.join(sha256))
}

/// Streams `body` into a temporary file in `dir`, hashing it; returns (temp path, sha256 hex,
/// size). Refuses bodies over `max` bytes.
pub(crate) async fn receive(
    dir: &Path,
    body: Body,
    max: u64,
) -> Result<(PathBuf, String, u64), ApiError> {
    let tmp = dir.join(format!(
        "upload-{}.tmp",
        hex::encode(scm_proto::crypto::random_bytes::<8>())
    ));
    let result = async {
        // Mode 0600 like everything the server writes.
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(crate::fsmode::FILE_MODE)
            .open(&tmp)
            .await
            .map_err(|e| ApiError::from(Error::io(&tmp, e)))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|_| ApiError::bad_request("bad_body", "the upload was interrupted"))?;
            size += chunk.len() as u64;
            if size > max {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the package exceeds the limit of {max} bytes"),
                ));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| ApiError::from(Error::io(&tmp, e)))?;
        }
        file.sync_all()
            .await
            .map_err(|e| ApiError::from(Error::io(&tmp, e)))?;
        if size == 0 {
            return Err(ApiError::bad_request(
                "empty_package",
                "the package is empty",
            ));
        }
        Ok((hex::encode(hasher.finalize()), size))
    }
    .await;
    match result {
        Ok((sha, size)) => Ok((tmp, sha, size)),
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            Err(e)
        }
    }
}

/// Moves a received temp file to its content address.
pub(crate) async fn commit(dir: &Path, tmp: &Path, sha256: &str) -> Result<(), Error> {
    let dest = package_path(dir, sha256)
        .ok_or_else(|| Error::Invalid(format!("{sha256:?} is not a package name")))?;
    tokio::fs::rename(tmp, &dest)
        .await
        .map_err(|e| Error::io(&dest, e))
}

/// A parsed `Range: bytes=...` header: a single range, inclusive.
fn parse_range(text: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = text.strip_prefix("bytes=")?;
    if spec.contains(',') {
        // Several ranges: serve the whole file instead (allowed by RFC 9110).
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let r = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || size == 0 {
            return Some(Err(()));
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>().ok()?.min(size.saturating_sub(1))
        };
        if start >= size || end < start {
            return Some(Err(()));
        }
        (start, end)
    };
    Some(Ok(r))
}

/// Serves a package file, whole or one range, with its SHA-256 header.
pub(crate) async fn download(
    dir: &Path,
    rel: &AppRelease,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let Some(path) = package_path(dir, &rel.sha256) else {
        tracing::error!(
            app = %rel.app_id, version = %rel.version, platform = %rel.platform,
            "release row has a sha256 that is not 64 hex digits; refusing to serve it"
        );
        return Err(ApiError::not_found(
            "unknown_release",
            "no package for this release",
        ));
    };
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::from(Error::io(&path, e)))?;
    let size = rel.size;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|t| parse_range(t, size));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, size.saturating_sub(1)),
        Some(Ok((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
        Some(Err(())) => {
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the package has {size} bytes"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(r);
        }
    };
    let len = end + 1 - start;
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| ApiError::from(Error::io(&path, e)))?;
    let stream = tokio_util::io::ReaderStream::new(file.take(len));
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Ok(v) = HeaderValue::from_str(&rel.sha256) {
        h.insert(HEADER_SHA256, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", rel.sha256)) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}"))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_are_sha256_hex_only() {
        let good = "a".repeat(64);
        assert!(is_sha256_hex(&good));
        assert!(package_path(Path::new("/d"), &good).is_some());
        for bad in [
            "/etc/passwd".to_string(),
            "../".repeat(21) + "x",
            "A".repeat(64),
            "a".repeat(63),
            "a".repeat(65),
            format!("{}/", "a".repeat(63)),
            String::new(),
        ] {
            assert!(!is_sha256_hex(&bad), "{bad}");
            assert!(package_path(Path::new("/d"), &bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Some(Ok((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=9-1", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=x-1", 100), None);
    }
}
