//! HTTP requests to an http-mode resource through a proxy. URLs name the resource as their host:
//! `http://intranet/path?q` asks the resource `intranet` for `/path?q`.

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::error::DeviceError;
use crate::session::Session;

/// Largest response body read into memory.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// A response from a resource.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// Splits `http://resource/path` into the resource and the path.
pub fn split_url(url: &str) -> Result<(String, String), DeviceError> {
    let bad = || DeviceError::Usage(format!("{url:?}: expected http://RESOURCE/PATH"));
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (resource, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if resource.is_empty() {
        return Err(bad());
    }
    Ok((resource.to_owned(), path.to_owned()))
}

impl Session {
    /// Sends `GET url` through a proxy and reads the whole response.
    pub async fn get(&self, url: &str) -> Result<HttpResponse, DeviceError> {
        let (resource, path) = split_url(url)?;
        let stream = self.open(&resource).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| DeviceError::Http(crate::api::chain(&e)))?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, resource)
            .body(Empty::<Bytes>::new())
            .map_err(|e| DeviceError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| DeviceError::Http(crate::api::chain(&e)))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_BODY)
            .collect()
            .await
            .map_err(|e| DeviceError::Http(e.to_string()))?
            .to_bytes();
        Ok(HttpResponse {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://wiki/a/b?c").unwrap(),
            ("wiki".into(), "/a/b?c".into())
        );
        assert_eq!(
            split_url("http://wiki").unwrap(),
            ("wiki".into(), "/".into())
        );
        assert!(split_url("https://wiki/").is_err());
        assert!(split_url("http:///x").is_err());
    }
}
