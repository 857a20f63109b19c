//! The proxy's client of the Security server's proxies' API, over mutual TLS: session validation,
//! the resource catalog, the app policy and the revocation stream. Several Security URLs can be
//! given, in order of preference; a call that fails at the transport, times out or gets a 5xx
//! moves on to the next one and stays there while it answers, and the first URL is tried again
//! every `--security-failback` until it answers ([`scm_proto::failover`], the same policy as the
//! device's).

use std::sync::Arc;
use std::time::{Duration, Instant};

use scm_proto::api::{
    AppPolicy, BindingProof, ErrorBody, PATH_PROXY_APPS, PATH_PROXY_RESOURCES,
    PATH_PROXY_REVOCATIONS, PATH_PROXY_VALIDATE, ProxyEvent, Resource, ValidateRequest,
    ValidateResponse,
};
use scm_proto::crypto::SessionId;
use scm_proto::failover::{Failover, Switch, SwitchKind};
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
pub(super) enum Validation {
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

/// An open revocation stream and the server it comes from.
pub(super) struct RevocationStream {
    /// Index of the server in the configured list.
    pub idx: usize,
    /// Its base URL.
    pub url: String,
    /// The streaming answer (newline-delimited JSON `ProxyEvent`s).
    pub resp: reqwest::Response,
}

/// Client of one or more Security servers, preferring the one that last answered and coming back
/// to the first when it answers again.
pub(super) struct SecurityClient {
    urls: Vec<String>,
    failover: Failover,
    http: reqwest::Client,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl SecurityClient {
    /// A client for `urls` (base URLs such as `https://127.0.0.1:8444`), in order of preference,
    /// trying the first again every `failback` while away from it.
    pub(super) fn new(
        urls: Vec<String>,
        tls: rustls::ClientConfig,
        timeout: Duration,
        failback: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SecurityError> {
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(SecurityError::Client)?;
        metrics.security_current.set(0);
        Ok(Self {
            failover: Failover::new(urls.len(), failback),
            urls: urls
                .into_iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            http,
            timeout,
            metrics,
        })
    }

    /// The URL calls go to first.
    #[cfg(test)]
    pub(super) fn current_url(&self) -> &str {
        &self.urls[self.failover.current()]
    }

    /// Index of the server calls go to first.
    #[cfg(test)]
    pub(super) fn current(&self) -> usize {
        self.failover.current()
    }

    /// Whether the revocation stream, on server `stream_idx`, should try the first server now:
    /// the request path is back on it already, or the first server's retry is due.
    pub(super) fn stream_should_fail_back(&self, stream_idx: usize) -> bool {
        stream_idx != 0
            && (self.failover.current() == 0 || self.failover.failback_due_at(Instant::now()))
    }

    /// Logs and counts a change of server.
    fn note(&self, switch: Option<Switch>) {
        let Some(sw) = switch else { return };
        let (from, to) = (&self.urls[sw.from], &self.urls[sw.to]);
        self.metrics.security_current.set(sw.to as i64);
        match sw.kind {
            SwitchKind::Failover => {
                self.metrics.security_failovers.inc();
                tracing::info!(%from, %to, "failed over to another Security server");
            }
            SwitchKind::Failback => {
                self.metrics.security_failbacks.inc();
                tracing::info!(%from, %to, "failed back to the first Security server");
            }
        }
    }

    /// Sends one request to server `idx`; `Ok` unless the transport failed, the answer's headers
    /// took longer than the timeout, or the answer is a 5xx.
    async fn send_to(
        &self,
        idx: usize,
        path: &'static str,
        build: &impl Fn(&reqwest::Client, String) -> reqwest::RequestBuilder,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, String> {
        let url = &self.urls[idx];
        let mut req = build(&self.http, format!("{url}{path}"));
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        // The whole-request timeout cannot apply to a stream; its headers must come in time.
        match tokio::time::timeout(self.timeout, req.send()).await {
            Ok(Ok(resp)) if !resp.status().is_server_error() => Ok(resp),
            Ok(Ok(resp)) => Err(format!("{url}: HTTP {}", resp.status())),
            Ok(Err(e)) => Err(format!("{url}: {e}")),
            Err(_) => Err(format!("{url}: no answer within {:?}", self.timeout)),
        }
    }

    /// Sends a request to each server in the failover plan's order (the current one first, or
    /// the first one when its retry is due) until one answers with something other than a 5xx.
    async fn call(
        &self,
        path: &'static str,
        build: impl Fn(&reqwest::Client, String) -> reqwest::RequestBuilder,
        timeout: Option<Duration>,
    ) -> Result<(usize, String, reqwest::Response), SecurityError> {
        let plan = self.failover.plan();
        let mut last = String::new();
        for &idx in &plan.order {
            match self.send_to(idx, path, &build, timeout).await {
                Ok(resp) => {
                    self.note(self.failover.succeeded(plan.from, idx));
                    return Ok((idx, self.urls[idx].clone(), resp));
                }
                Err(e) => last = e,
            }
            tracing::debug!(%last, "Security server call failed");
        }
        Err(SecurityError::AllFailed {
            tried: plan.order.len(),
            last,
        })
    }

    /// Asks whether a session is live. With `binding` (a new connection being admitted) the
    /// Security server checks the device's binding MAC before the validation counts as activity,
    /// and answers `binding_failed` if it does not hold; without it (a revalidation of a session
    /// whose connections are already bound) the validation counts as activity.
    pub(super) async fn validate(
        &self,
        id: &SessionId,
        binding: Option<BindingProof>,
    ) -> Result<Validation, SecurityError> {
        let body = ValidateRequest {
            session_id: id.expose().to_owned(),
            binding,
        };
        let started = std::time::Instant::now();
        let answer = self
            .post::<_, ValidateResponse>(PATH_PROXY_VALIDATE, &body)
            .await;
        self.metrics
            .validation_seconds
            .observe(started.elapsed().as_secs_f64());
        match answer? {
            Answer::Ok(url, v) => {
                let info = SessionInfo::from_response(v).map_err(|e| SecurityError::BadAnswer {
                    url,
                    path: PATH_PROXY_VALIDATE,
                    why: e.to_string(),
                })?;
                Ok(Validation::Valid(Arc::new(info)))
            }
            Answer::Refused(url, status, body) => {
                if matches!(status, 400 | 401 | 403 | 404 | 410) {
                    // A refusal whose body does not parse still ends the session.
                    Ok(Validation::Invalid(body.unwrap_or(ErrorBody {
                        code: "invalid_session".into(),
                        message: format!("HTTP {status}"),
                    })))
                } else {
                    Err(refusal_error(url, PATH_PROXY_VALIDATE, status, body))
                }
            }
        }
    }

    /// Asks for a signed identity assertion of a session for one resource: `Ok(Err(_))` when
    /// the Security server refuses (session ended, resource not allowed).
    pub(super) async fn assertion(
        &self,
        id: &SessionId,
        resource: &str,
    ) -> Result<Result<scm_proto::api::AssertionResponse, ErrorBody>, SecurityError> {
        use scm_proto::api::{AssertionRequest, PATH_PROXY_ASSERTION};
        let body = AssertionRequest {
            session_id: id.expose().to_owned(),
            resource: resource.to_owned(),
        };
        match self.post(PATH_PROXY_ASSERTION, &body).await? {
            Answer::Ok(_, a) => Ok(Ok(a)),
            Answer::Refused(_, 403 | 404, Some(body)) => Ok(Err(body)),
            Answer::Refused(url, status, body) => {
                Err(refusal_error(url, PATH_PROXY_ASSERTION, status, body))
            }
        }
    }

    /// POSTs `body` as JSON to `path` (over the URL list): the parsed answer of a success, or
    /// the status and (if it parses) the error body of anything else.
    async fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &'static str,
        body: &B,
    ) -> Result<Answer<T>, SecurityError> {
        let (_, url, resp) = self
            .call(path, |c, u| c.post(u).json(body), Some(self.timeout))
            .await?;
        let status = resp.status();
        if status.is_success() {
            return match resp.json().await {
                Ok(v) => Ok(Answer::Ok(url, v)),
                Err(e) => Err(SecurityError::BadAnswer {
                    url,
                    path,
                    why: e.to_string(),
                }),
            };
        }
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str::<ErrorBody>(&text).ok();
        Ok(Answer::Refused(url, status.as_u16(), body))
    }

    async fn list<T: serde::de::DeserializeOwned>(
        &self,
        path: &'static str,
    ) -> Result<Vec<T>, SecurityError> {
        let (_, url, resp) = self.call(path, |c, u| c.get(u), Some(self.timeout)).await?;
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
    pub(super) async fn resources(&self) -> Result<Vec<Resource>, SecurityError> {
        self.list(PATH_PROXY_RESOURCES).await
    }

    /// The app policy.
    pub(super) async fn apps(&self) -> Result<Vec<AppPolicy>, SecurityError> {
        self.list(PATH_PROXY_APPS).await
    }

    /// Opens the revocation stream (newline-delimited JSON `ProxyEvent`s) wherever the failover
    /// plan finds a server; the caller reads it.
    pub(super) async fn revocations(&self) -> Result<RevocationStream, SecurityError> {
        let (idx, url, resp) = self
            .call(PATH_PROXY_REVOCATIONS, |c, u| c.get(u), None)
            .await?;
        stream_answer(idx, url, resp)
    }

    /// Opens the revocation stream at the first (preferred) server only; when it answers, the
    /// request path moves back there too (a failback, logged and counted once).
    pub(super) async fn revocations_at_first(&self) -> Result<RevocationStream, SecurityError> {
        let from = self.failover.current();
        let build = |c: &reqwest::Client, u: String| c.get(u);
        let resp = self
            .send_to(0, PATH_PROXY_REVOCATIONS, &build, None)
            .await
            .map_err(|last| SecurityError::AllFailed { tried: 1, last })?;
        let stream = stream_answer(0, self.urls[0].clone(), resp)?;
        self.note(self.failover.succeeded(from, 0));
        Ok(stream)
    }
}

fn stream_answer(
    idx: usize,
    url: String,
    resp: reqwest::Response,
) -> Result<RevocationStream, SecurityError> {
    if !resp.status().is_success() {
        return Err(SecurityError::BadAnswer {
            url,
            path: PATH_PROXY_REVOCATIONS,
            why: format!("HTTP {}", resp.status()),
        });
    }
    Ok(RevocationStream { idx, url, resp })
}

/// Splits the revocation stream (NDJSON) into lines, none longer than [`Self::MAX_LINE`]:
/// `tokio_util`'s `LinesCodec` over the bytes received so far.
///
/// A line longer than the maximum is dropped whole (the codec discards up to its newline) and
/// the lines after it are read as usual: one oversized event does not take the stream down. A
/// line that is not UTF-8 is handed on as the replacement character, so it is counted and
/// logged as an unreadable event like any other line that does not parse.
#[derive(Debug)]
pub(super) struct LineBuffer {
    buf: bytes::BytesMut,
    codec: tokio_util::codec::LinesCodec,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self {
            buf: bytes::BytesMut::new(),
            codec: tokio_util::codec::LinesCodec::new_with_max_length(Self::MAX_LINE),
        }
    }
}

impl LineBuffer {
    /// Largest line kept; longer ones are dropped whole.
    pub(super) const MAX_LINE: usize = 64 * 1024;

    /// Feeds bytes, returning the complete lines they finish.
    pub(super) fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        use tokio_util::codec::{Decoder as _, LinesCodecError};
        self.buf.extend_from_slice(bytes);
        let mut lines = Vec::new();
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(line)) => lines.push(line.into_bytes()),
                Ok(None) => break,
                // The codec discards the rest of this line itself; read on.
                Err(LinesCodecError::MaxLineLengthExceeded) => {
                    tracing::warn!(
                        max = Self::MAX_LINE,
                        "revocation event longer than the maximum line; dropped"
                    );
                }
                // Not UTF-8: the codec has consumed the line.
                Err(LinesCodecError::Io(_)) => {
                    lines.push(char::REPLACEMENT_CHARACTER.to_string().into_bytes())
                }
            }
        }
        lines
    }
}

/// One line of the revocation stream as an event; `Ok(None)` for a blank line (keep-alive).
pub(super) fn parse_event(line: &[u8]) -> Result<Option<ProxyEvent>, serde_json::Error> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(line).map(Some)
}

/// What one POST to the Security server came back with (the URL that answered first).
enum Answer<T> {
    /// A success, parsed.
    Ok(String, T),
    /// Any other status, with its error body if it parses.
    Refused(String, u16, Option<ErrorBody>),
}

/// A refusal the caller does not expect: a bad answer naming the status and the server's words.
fn refusal_error(
    url: String,
    path: &'static str,
    status: u16,
    body: Option<ErrorBody>,
) -> SecurityError {
    let why = match body {
        Some(b) => format!("HTTP {status}: {}", b.message),
        None => format!("HTTP {status}"),
    };
    SecurityError::BadAnswer { url, path, why }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scm_proto::api::ProxyEvent;

    /// A plain-HTTP server answering every request with `status` and `body`.
    async fn serve_on(listener: tokio::net::TcpListener, status: u16, body: &'static str) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
    }

    async fn bind() -> (tokio::net::TcpListener, String) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        (l, url)
    }

    fn client(urls: Vec<String>, failback: Duration, metrics: Arc<Metrics>) -> SecurityClient {
        let tls = scm_proto::tls::client_builder()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        SecurityClient::new(urls, tls, Duration::from_secs(2), failback, metrics).unwrap()
    }

    #[tokio::test]
    async fn a_5xx_fails_over_and_a_failed_retry_stays() {
        let metrics = Arc::new(Metrics::default());
        let (first, first_url) = bind().await;
        serve_on(first, 503, "down for maintenance").await;
        let (second, second_url) = bind().await;
        serve_on(second, 200, "[]").await;
        let c = client(
            vec![first_url.clone(), second_url.clone()],
            Duration::from_millis(300),
            metrics.clone(),
        );
        // A 5xx moves on; the second answers and becomes current.
        assert!(c.resources().await.unwrap().is_empty());
        assert_eq!(c.current_url(), second_url);
        assert_eq!(metrics.security_failovers.get(), 1);
        assert_eq!(metrics.security_current.get(), 1);
        assert!(!c.stream_should_fail_back(0));
        // The stream on the second server may not retry the first before the interval.
        assert!(!c.stream_should_fail_back(1));
        // Still a 5xx at the first: the retry after the interval fails and nothing moves.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(c.resources().await.unwrap().is_empty());
        assert_eq!(c.current_url(), second_url);
        assert_eq!(metrics.security_failbacks.get(), 0);
        assert_eq!(metrics.security_current.get(), 1);
    }

    #[tokio::test]
    async fn a_server_that_does_not_answer_is_left_after_the_timeout() {
        let metrics = Arc::new(Metrics::default());
        // Accepts connections and never answers.
        let (silent, silent_url) = bind().await;
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let (good, good_url) = bind().await;
        serve_on(good, 200, "[]").await;
        let mut c = client(
            vec![silent_url, good_url.clone()],
            Duration::from_secs(10),
            metrics.clone(),
        );
        c.timeout = Duration::from_millis(300);
        let started = Instant::now();
        assert!(c.resources().await.unwrap().is_empty());
        // The stream's headers are bounded by the same timeout.
        c.failover = Failover::new(2, Duration::from_secs(10));
        let stream = c.revocations().await.unwrap();
        assert_eq!(stream.url, good_url);
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(metrics.security_failovers.get(), 2);
    }

    #[tokio::test]
    async fn refused_then_back_after_the_interval() {
        let metrics = Arc::new(Metrics::default());
        let (dead, dead_url) = bind().await;
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let (second, second_url) = bind().await;
        serve_on(second, 200, "[]").await;
        let c = client(
            vec![dead_url.clone(), second_url],
            Duration::from_millis(300),
            metrics.clone(),
        );
        assert!(c.apps().await.unwrap().is_empty());
        assert_eq!(c.current(), 1);
        let back = tokio::net::TcpListener::bind(dead_addr).await.unwrap();
        serve_on(back, 200, "[]").await;
        assert!(c.apps().await.unwrap().is_empty());
        assert_eq!(c.current(), 1, "not before the interval");
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(c.apps().await.unwrap().is_empty());
        assert_eq!(c.current_url(), dead_url);
        assert_eq!(metrics.security_failovers.get(), 1);
        assert_eq!(metrics.security_failbacks.get(), 1);
        assert_eq!(metrics.security_current.get(), 0);
    }

    #[tokio::test]
    async fn the_stream_retries_the_first_and_brings_the_calls_back() {
        let metrics = Arc::new(Metrics::default());
        let (dead, dead_url) = bind().await;
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let (second, second_url) = bind().await;
        serve_on(second, 200, "[]").await;
        let c = client(
            vec![dead_url.clone(), second_url],
            Duration::from_millis(200),
            metrics.clone(),
        );
        let stream = c.revocations().await.unwrap();
        assert_eq!(stream.idx, 1);
        // The first is still down: the stream's retry fails and nothing moves.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(c.stream_should_fail_back(stream.idx));
        assert!(c.revocations_at_first().await.is_err());
        assert_eq!(c.current(), 1);
        // It comes back: the stream's next retry opens there and the calls follow.
        let back = tokio::net::TcpListener::bind(dead_addr).await.unwrap();
        serve_on(back, 200, "").await;
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(c.stream_should_fail_back(stream.idx));
        let first = c.revocations_at_first().await.unwrap();
        assert_eq!((first.idx, first.url.as_str()), (0, dead_url.as_str()));
        assert_eq!(c.current(), 0);
        assert_eq!(metrics.security_failbacks.get(), 1);
        assert_eq!(metrics.security_current.get(), 0);
        // Everything down: an error naming the last failure, and the client stays where it was.
        let (a, a_url) = bind().await;
        drop(a);
        let (b, b_url) = bind().await;
        serve_on(b, 502, "bad gateway").await;
        let c = client(vec![a_url, b_url], Duration::ZERO, metrics);
        match c.resources().await {
            Err(SecurityError::AllFailed { tried: 2, last }) => {
                assert!(last.contains("HTTP 502"), "{last}")
            }
            Err(e) => panic!("expected AllFailed, got {e}"),
            Ok(_) => panic!("expected AllFailed"),
        }
        assert_eq!(c.current(), 0);
    }

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

    /// The limit is the codec's, at the same length as before: a line of exactly `MAX_LINE`
    /// bytes is kept, one byte more is dropped whole (in one chunk or across many), and the
    /// stream goes on with the next line; a line that is not UTF-8 comes out unreadable.
    #[test]
    fn line_limit_at_the_boundary_and_over_it() {
        let mut lb = LineBuffer::default();
        let mut exact = vec![b'a'; LineBuffer::MAX_LINE];
        exact.push(b'\n');
        assert_eq!(lb.push(&exact), vec![vec![b'a'; LineBuffer::MAX_LINE]]);
        let over = vec![b'b'; LineBuffer::MAX_LINE + 1];
        for piece in over.chunks(1000) {
            assert!(lb.push(piece).is_empty());
        }
        assert_eq!(
            lb.push(b"still the long line\n{\"type\":\"catalog_changed\"}\n"),
            vec![b"{\"type\":\"catalog_changed\"}".to_vec()]
        );
        let lines = lb.push(b"\xff\xfe\n{}\n");
        assert_eq!(lines.len(), 2);
        assert!(serde_json::from_slice::<ProxyEvent>(&lines[0]).is_err());
        assert_eq!(lines[1], b"{}".to_vec());
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
