//! The Security server's device API over TLS, trying each configured URL in turn: a transport
//! failure or a 5xx moves on to the next one (users log in again there; nobody re-enrols).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use scm_proto::api::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::DeviceError;

/// A client of the device API of one or more Security servers.
#[derive(Clone)]
pub struct SecurityApi {
    urls: Arc<Vec<String>>,
    current: Arc<AtomicUsize>,
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
    /// A client for `urls` (e.g. `https://127.0.0.1:8443`) trusting the given TLS config.
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
            urls: Arc::new(
                urls.into_iter()
                    .map(|u| u.trim_end_matches('/').to_owned())
                    .collect(),
            ),
            current: Arc::default(),
            http,
        })
    }

    /// The configured URLs.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Sends the request built by `build` to each server in turn until one answers below 500.
    pub async fn send(
        &self,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, DeviceError> {
        let n = self.urls.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let url = &self.urls[idx];
            match build(&self.http, url).send().await {
                Ok(r) if !r.status().is_server_error() => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(r);
                }
                Ok(r) => last = format!("{url}: HTTP {}", r.status()),
                Err(e) => last = format!("{url}: {}", chain(&e)),
            }
        }
        Err(DeviceError::SecurityUnavailable { tried: n, last })
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
