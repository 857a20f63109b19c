//! The HTTPS APIs: [`device`] (enroll, login, apps), [`proxy`] (validation, revocations, catalog;
//! mutual TLS), [`admin`] (token) and [`forward_auth`] (nginx `auth_request`; mutual TLS, opt-in). This module holds what they share: the strict JSON body
//! extractor and the JSON answers for unknown paths and methods.

pub(crate) mod admin;
pub(crate) mod device;
pub mod forward_auth;
pub(crate) mod proxy;

use std::net::IpAddr;
use std::time::Duration;

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::tls::Peer;

/// Largest JSON body accepted on any endpoint.
pub const MAX_BODY: usize = 64 * 1024;
/// Time a client has to send a body when the accept loop did not say.
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A JSON body, read with a size and time limit and decoded strictly. Rejections are JSON
/// `ErrorBody`s: `unsupported_media_type`, `payload_too_large`, `request_timeout`,
/// `malformed_json`, `invalid_request`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON (Content-Type: application/json)",
            ));
        }
        let bytes = read_body(req, MAX_BODY).await?;
        decode(&bytes).map(ApiJson)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads a whole body of at most `limit` bytes within the body timeout.
pub async fn read_body(req: Request, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body exceeds the limit of {limit} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    let timeout = req
        .extensions()
        .get::<crate::tls::IoTimeout>()
        .map_or(DEFAULT_BODY_TIMEOUT, |t| t.0);
    let body = http_body_util::Limited::new(req.into_body(), limit);
    match tokio::time::timeout(timeout, body.collect()).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the body did not arrive in time",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(ApiError::bad_request(
            "bad_body",
            "the body could not be read",
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Decodes JSON, telling syntax errors from missing or wrong fields.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                format!("the JSON does not have the expected fields: {e}"),
            ),
            _ => {
                ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
            }
        }
    })
}

/// The source address of a request (put there by the TLS accept loop).
pub fn peer_ip(req_ext: &axum::http::Extensions) -> IpAddr {
    req_ext
        .get::<Peer>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |p| p.0.ip())
}

/// The token of an `Authorization: Bearer` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// JSON 404 for paths no route serves.
pub async fn not_found() -> Response {
    ApiError::not_found("not_found", "no such endpoint").into_response()
}

/// JSON 405 for known paths asked with the wrong method.
pub async fn method_not_allowed() -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
    .into_response()
}

/// Turns a path-parameter rejection into a JSON error.
pub fn path_error(e: axum::extract::rejection::PathRejection) -> ApiError {
    ApiError::bad_request("invalid_path", e.body_text())
}

/// Turns a query rejection into a JSON error.
pub fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", e.body_text())
}

/// The answer to a source address that failed too often.
pub fn rate_limited() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many failures from this address; try again later",
    )
}

/// Refuses a source address the per-source limiter has blocked, before any other work.
pub fn admit(limiter: &crate::limits::SourceLimiter, ip: IpAddr) -> Result<(), ApiError> {
    if limiter.is_blocked(ip) {
        return Err(rate_limited());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code, reason = "only decoded")]
    struct T {
        a: u32,
    }

    #[test]
    fn json_errors_are_classified() {
        assert!(decode::<T>(br#"{"a":1}"#).is_ok());
        for (body, code) in [
            (&br#"{"a":"#[..], "malformed_json"),
            (b"nope", "malformed_json"),
            (b"", "malformed_json"),
            (b"{}", "invalid_request"),
            (br#"{"a":1,"b":2}"#, "invalid_request"),
            (br#"{"a":-1}"#, "invalid_request"),
        ] {
            assert_eq!(decode::<T>(body).unwrap_err().code, code, "{body:?}");
        }
    }

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert!(is_json(&h));
        h.insert(header::CONTENT_TYPE, "text/json".parse().unwrap());
        assert!(!is_json(&h));
    }
}
