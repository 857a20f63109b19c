//! The Security server's device API over TLS, trying each configured URL in turn: a transport
//! failure or a 5xx moves on to the next one (users log in again there; nobody re-enrolls), and
//! the first URL is tried again every failback interval until it answers
//! ([`scm_proto::failover`], the same policy as the proxy's).

use std::sync::Arc;
use std::time::Duration;

use scm_proto::api::ErrorBody;
use scm_proto::failover::{DEFAULT_FAILBACK, Failover, SwitchKind};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::DeviceError;

/// How long a Security server may take to begin its answer (status and headers; a login runs
/// argon2id there) before the call moves on to the next server. Bodies (a package download) may
/// take longer, up to the client's overall 120 s.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of the device API of one or more Security servers.
#[derive(Clone)]
pub struct SecurityApi {
    urls: Arc<Vec<String>>,
    failover: Arc<Failover>,
    answer_timeout: Duration,
    http: reqwest::Client,
}

impl std::fmt::Debug for SecurityApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityApi")
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

impl SecurityApi {
    /// A client for `urls` (e.g. `https://127.0.0.1:8443`, in order of preference) trusting the
    /// given TLS config, trying the first URL again every [`DEFAULT_FAILBACK`] while away from it.
    pub fn new(urls: Vec<String>, tls: &rustls::ClientConfig) -> Result<Self, DeviceError> {
        if urls.is_empty() {
            return Err(DeviceError::Usage("no Security server URL given".into()));
        }
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls.clone())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(DeviceError::Client)?;
        Ok(Self {
            failover: Arc::new(Failover::new(urls.len(), DEFAULT_FAILBACK)),
            answer_timeout: ANSWER_TIMEOUT,
            urls: Arc::new(
                urls.into_iter()
                    .map(|u| u.trim_end_matches('/').to_owned())
                    .collect(),
            ),
            http,
        })
    }

    /// The same client trying the first URL again every `failback` (instead of
    /// [`DEFAULT_FAILBACK`]) while away from it; starts on the first URL.
    pub fn with_failback(mut self, failback: Duration) -> Self {
        self.failover = Arc::new(Failover::new(self.urls.len(), failback));
        self
    }

    /// The same client waiting at most `timeout` (instead of [`ANSWER_TIMEOUT`]) for a server's
    /// answer to begin before moving on to the next server.
    pub fn with_answer_timeout(mut self, timeout: Duration) -> Self {
        self.answer_timeout = timeout;
        self
    }

    /// The configured URLs.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The URL calls go to first (the one that last answered).
    pub fn current_url(&self) -> &str {
        &self.urls[self.failover.current()]
    }

    /// Sends the request built by `build` to each server in turn (the current one first, or the
    /// first URL when its retry is due) until one answers below 500.
    pub async fn send(
        &self,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, DeviceError> {
        let plan = self.failover.plan();
        let mut last = String::new();
        for &idx in &plan.order {
            let url = &self.urls[idx];
            let answer = tokio::time::timeout(self.answer_timeout, build(&self.http, url).send());
            match answer.await {
                Err(_) => last = format!("{url}: no answer within {:?}", self.answer_timeout),
                Ok(Ok(r)) if !r.status().is_server_error() => {
                    if let Some(sw) = self.failover.succeeded(plan.from, idx) {
                        let (from, to) = (&self.urls[sw.from], &self.urls[sw.to]);
                        match sw.kind {
                            SwitchKind::Failover => {
                                tracing::info!(%from, %to, "failed over to another Security server")
                            }
                            SwitchKind::Failback => {
                                tracing::info!(%from, %to, "failed back to the first Security server")
                            }
                        }
                    }
                    return Ok(r);
                }
                Ok(Ok(r)) => last = format!("{url}: HTTP {}", r.status()),
                Ok(Err(e)) => last = format!("{url}: {}", chain(&e)),
            }
        }
        Err(DeviceError::SecurityUnavailable {
            tried: plan.order.len(),
            last,
        })
    }

    /// POSTs JSON and decodes the JSON answer, turning error answers into [`DeviceError::Refused`].
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        what: &'static str,
        path: &str,
        body: &B,
        bearer: Option<&str>,
    ) -> Result<T, DeviceError> {
        let resp = self
            .send(|c, base| {
                let r = c.post(format!("{base}{path}")).json(body);
                match bearer {
                    Some(t) => r.bearer_auth(t),
                    None => r,
                }
            })
            .await?;
        decode(what, resp).await
    }

    /// GETs a JSON answer.
    pub async fn get<T: DeserializeOwned>(
        &self,
        what: &'static str,
        path_and_query: &str,
        bearer: Option<&str>,
    ) -> Result<T, DeviceError> {
        let resp = self
            .send(|c, base| {
                let r = c.get(format!("{base}{path_and_query}"));
                match bearer {
                    Some(t) => r.bearer_auth(t),
                    None => r,
                }
            })
            .await?;
        decode(what, resp).await
    }
}

/// The error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s = format!("{s}: {x}");
        src = x.source();
    }
    s
}

/// Turns an error answer into [`DeviceError::Refused`].
pub async fn refused(what: &'static str, resp: reqwest::Response) -> DeviceError {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or_else(|_| ErrorBody {
        code: "http_error".into(),
        message: text.chars().take(200).collect(),
    });
    DeviceError::Refused { what, status, body }
}

async fn decode<T: DeserializeOwned>(
    what: &'static str,
    resp: reqwest::Response,
) -> Result<T, DeviceError> {
    if !resp.status().is_success() {
        return Err(refused(what, resp).await);
    }
    let bytes = resp.bytes().await.map_err(|e| DeviceError::BadAnswer {
        what,
        why: chain(&e),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| DeviceError::BadAnswer {
        what,
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A plain-HTTP server on `listener` answering every request with `status`, counting them.
    fn serve(
        listener: tokio::net::TcpListener,
        status: u16,
    ) -> Arc<std::sync::atomic::AtomicUsize> {
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        hits
    }

    async fn bind() -> (tokio::net::TcpListener, String) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        (l, url)
    }

    #[tokio::test]
    async fn a_server_that_does_not_answer_is_left_after_the_answer_timeout() {
        let tls = crate::tls::client_config(&[]).unwrap();
        // Accepts connections and never answers.
        let (silent, silent_url) = bind().await;
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let (good, good_url) = bind().await;
        let _ = serve(good, 200);
        let api = SecurityApi::new(vec![silent_url, good_url.clone()], &tls)
            .unwrap()
            .with_answer_timeout(Duration::from_millis(300));
        let started = std::time::Instant::now();
        api.get::<serde_json::Value>("test", "/x", None)
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(api.current_url(), good_url);
    }

    #[tokio::test]
    async fn fails_over_on_refused_and_5xx_then_back_to_the_first() {
        let tls = crate::tls::client_config(&[]).unwrap();
        // The first: nothing listens (its port is held back by dropping the listener).
        let (first, first_url) = bind().await;
        let first_addr = first.local_addr().unwrap();
        drop(first);
        let (broken, broken_url) = bind().await;
        let broken_hits = serve(broken, 503);
        let (good, good_url) = bind().await;
        let good_hits = serve(good, 200);
        let api = SecurityApi::new(vec![first_url.clone(), broken_url, good_url.clone()], &tls)
            .unwrap()
            .with_failback(Duration::from_millis(300));
        let get = |api: SecurityApi| async move {
            api.get::<serde_json::Value>("test", "/x", None).await
        };

        get(api.clone()).await.unwrap();
        assert_eq!(api.current_url(), good_url);
        assert_eq!(broken_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        // It sticks: neither the refused nor the 5xx server is asked again before the interval.
        get(api.clone()).await.unwrap();
        assert_eq!(broken_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(good_hits.load(std::sync::atomic::Ordering::SeqCst), 2);

        // The first comes back; within one interval the client is on it again.
        let first = tokio::net::TcpListener::bind(first_addr).await.unwrap();
        let first_hits = serve(first, 200);
        get(api.clone()).await.unwrap();
        assert_eq!(
            api.current_url(),
            good_url,
            "not before the failback interval"
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        get(api.clone()).await.unwrap();
        assert_eq!(api.current_url(), first_url);
        assert_eq!(first_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(good_hits.load(std::sync::atomic::Ordering::SeqCst), 3);

        // Everything down: a clear error after trying each once, and the client stays put.
        let (dead, dead_url) = bind().await;
        drop(dead);
        let (broken, broken_url) = bind().await;
        let _ = serve(broken, 500);
        let api = SecurityApi::new(vec![dead_url.clone(), broken_url], &tls).unwrap();
        match get(api.clone()).await {
            Err(DeviceError::SecurityUnavailable { tried: 2, last }) => {
                assert!(last.contains("HTTP 500"), "{last}")
            }
            other => panic!("expected SecurityUnavailable, got {other:?}"),
        }
        assert_eq!(api.current_url(), dead_url);
    }
}
