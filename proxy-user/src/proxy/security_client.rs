//! The proxy's client of the Security server's proxies' API, over mutual TLS: session validation,
//! the resource catalog, the app policy and the revocation stream. Several Security URLs can be
//! given; a call that fails at the transport or gets a 5xx moves on to the next one and stays
//! there while it answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use scm_proto::api::{
    AppPolicy, ErrorBody, PATH_PROXY_APPS, PATH_PROXY_RESOURCES, PATH_PROXY_REVOCATIONS,
    PATH_PROXY_VALIDATE, Resource, ValidateRequest, ValidateResponse,
};
use scm_proto::crypto::SessionId;
use serde::Deserialize;

use super::cache::SessionInfo;
use super::metrics::Metrics;

/// A call to the Security servers that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecurityError {
    /// The HTTP client could not be built.
    #[error("building the Security client: {0}")]
    Client(reqwest::Error),
    /// Every Security server failed; the last failure is given.
    #[error("no Security server answered ({tried} tried); last: {last}")]
    AllFailed {
        /// How many URLs were tried.
        tried: usize,
        /// The last failure, with its URL.
        last: String,
    },
    /// A Security server answered something this proxy cannot read.
    #[error("Security server {url}: unexpected answer to {path}: {why}")]
    BadAnswer {
        /// The server.
        url: String,
        /// The API path.
        path: &'static str,
        /// What was wrong.
        why: String,
    },
}

/// The Security server's verdict on a session.
#[derive(Debug, Clone)]
pub enum Validation {
    /// Live: what the proxy needs to know about it.
    Valid(Arc<SessionInfo>),
    /// Unknown, expired, logged out or revoked.
    Invalid(ErrorBody),
}

/// Lists may come bare or wrapped in an object (`{"resources": [...]}`).
#[derive(Deserialize)]
#[serde(untagged)]
enum ListOf<T> {
    Bare(Vec<T>),
    Resources { resources: Vec<T> },
    Apps { apps: Vec<T> },
}

impl<T> ListOf<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            ListOf::Bare(v) | ListOf::Resources { resources: v } | ListOf::Apps { apps: v } => v,
        }
    }
}

/// Client of one or more Security servers, preferring the one that last answered.
pub struct SecurityClient {
    urls: Vec<String>,
    current: AtomicUsize,
    http: reqwest::Client,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl SecurityClient {
    /// A client for `urls` (base URLs such as `https://127.0.0.1:8444`), in order of preference.
    pub fn new(
        urls: Vec<String>,
        tls: rustls::ClientConfig,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SecurityError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(SecurityError::Client)?;
        Ok(Self {
            urls: urls
                .into_iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            current: AtomicUsize::new(0),
            http,
            timeout,
            metrics,
        })
    }

    /// The URL calls go to first.
    pub fn current_url(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    /// Sends a request to each server in turn, starting with the current one, until one answers
    /// with something other than a 5xx.
    async fn call(
        &self,
        path: &'static str,
        build: impl Fn(&reqwest::Client, String) -> reqwest::RequestBuilder,
        timeout: Option<Duration>,
    ) -> Result<(String, reqwest::Response), SecurityError> {
        let n = self.urls.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let url = &self.urls[idx];
            let mut req = build(&self.http, format!("{url}{path}"));
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            match req.send().await {
                Ok(resp) if !resp.status().is_server_error() => {
                    if idx != start % n {
                        self.current.store(idx, Ordering::Relaxed);
                        tracing::warn!(security = %url, "failed over to this Security server");
                    }
                    return Ok((url.clone(), resp));
                }
                Ok(resp) => last = format!("{url}: HTTP {}", resp.status()),
                Err(e) => last = format!("{url}: {e}"),
            }
            if n > 1 {
                self.metrics.security_failovers.inc();
            }
            tracing::debug!(%last, "Security server call failed");
        }
        Err(SecurityError::AllFailed { tried: n, last })
    }

    /// Asks whether a session is live.
    pub async fn validate(&self, id: &SessionId) -> Result<Validation, SecurityError> {
        let body = ValidateRequest {
            session_id: id.expose().to_owned(),
        };
        let (url, resp) = self
            .call(
                PATH_PROXY_VALIDATE,
                |c, u| c.post(u).json(&body),
                Some(self.timeout),
            )
            .await?;
        let status = resp.status();
        let bad = |why: String| SecurityError::BadAnswer {
            url: url.clone(),
            path: PATH_PROXY_VALIDATE,
            why,
        };
        if status.is_success() {
            let v: ValidateResponse = resp.json().await.map_err(|e| bad(e.to_string()))?;
            let info = SessionInfo::from_response(v).map_err(|e| bad(e.to_string()))?;
            return Ok(Validation::Valid(Arc::new(info)));
        }
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or(ErrorBody {
            code: "invalid_session".into(),
            message: format!("HTTP {status}"),
        });
        if matches!(status.as_u16(), 400 | 401 | 403 | 404 | 410) {
            Ok(Validation::Invalid(body))
        } else {
            Err(bad(format!("HTTP {status}: {}", body.message)))
        }
    }

    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        path: &'static str,
    ) -> Result<Vec<T>, SecurityError> {
        let (url, resp) = self.call(path, |c, u| c.get(u), Some(self.timeout)).await?;
        let bad = |why: String| SecurityError::BadAnswer {
            url: url.clone(),
            path,
            why,
        };
        if !resp.status().is_success() {
            return Err(bad(format!("HTTP {}", resp.status())));
        }
        let list: ListOf<T> = resp.json().await.map_err(|e| bad(e.to_string()))?;
        Ok(list.into_vec())
    }

    /// The resource catalog.
    pub async fn resources(&self) -> Result<Vec<Resource>, SecurityError> {
        self.list(PATH_PROXY_RESOURCES).await
    }

    /// The app policy.
    pub async fn apps(&self) -> Result<Vec<AppPolicy>, SecurityError> {
        self.list(PATH_PROXY_APPS).await
    }

    /// Opens the revocation stream (newline-delimited JSON `ProxyEvent`s); the caller reads it.
    pub async fn revocations(&self) -> Result<(String, reqwest::Response), SecurityError> {
        let (url, resp) = self
            .call(PATH_PROXY_REVOCATIONS, |c, u| c.get(u), None)
            .await?;
        if !resp.status().is_success() {
            return Err(SecurityError::BadAnswer {
                url,
                path: PATH_PROXY_REVOCATIONS,
                why: format!("HTTP {}", resp.status()),
            });
        }
        Ok((url, resp))
    }
}

/// Splits a byte stream into lines without letting one line grow past `max` bytes.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    overflowed: bool,
}

impl LineBuffer {
    /// Largest line kept; longer ones are dropped whole.
    pub const MAX_LINE: usize = 64 * 1024;

    /// Feeds bytes, returning the complete lines they finish.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        while let Some(pos) = bytes.iter().position(|b| *b == b'\n') {
            let (head, tail) = bytes.split_at(pos);
            if !self.overflowed && self.buf.len() + head.len() <= Self::MAX_LINE {
                self.buf.extend_from_slice(head);
                lines.push(std::mem::take(&mut self.buf));
            }
            self.buf.clear();
            self.overflowed = false;
            bytes = &tail[1..];
        }
        if self.buf.len() + bytes.len() > Self::MAX_LINE {
            self.overflowed = true;
            self.buf.clear();
        } else if !self.overflowed {
            self.buf.extend_from_slice(bytes);
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scm_proto::api::ProxyEvent;

    #[test]
    fn lines_across_chunks_and_overflow() {
        let mut lb = LineBuffer::default();
        assert!(lb.push(b"{\"type\":\"heart").is_empty());
        let lines = lb.push(b"beat\",\"at\":5}\n{\"type\":\"catalog_changed\"}\n");
        let events: Vec<ProxyEvent> = lines
            .iter()
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(
            events,
            vec![ProxyEvent::Heartbeat { at: 5 }, ProxyEvent::CatalogChanged]
        );
        let big = vec![b'x'; LineBuffer::MAX_LINE + 10];
        assert!(lb.push(&big).is_empty());
        assert!(lb.buf.is_empty());
        let lines = lb.push(b"tail\nok\n");
        assert_eq!(lines, vec![b"ok".to_vec()]);
    }

    #[test]
    fn lists_bare_or_wrapped() {
        let bare: ListOf<AppPolicy> =
            serde_json::from_str(r#"[{"app_id":"a","min_version":null,"revoked_versions":[]}]"#)
                .unwrap();
        assert_eq!(bare.into_vec().len(), 1);
        let wrapped: ListOf<AppPolicy> = serde_json::from_str(
            r#"{"apps":[{"app_id":"a","min_version":"1","revoked_versions":[]}]}"#,
        )
        .unwrap();
        assert_eq!(wrapped.into_vec()[0].min_version.as_deref(), Some("1"));
    }
}
