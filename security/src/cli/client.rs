//! The admin CLI's HTTP client of the admin API (token, TLS, JSON errors) and its input helpers.

use std::io::BufRead as _;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use scm_proto::api::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::admin_types::ADMIN_PREFIX;
use crate::config::AdminArgs;
use crate::error::Error;

/// What a command prints: the JSON answer (`--json`) and the table.
pub(super) type Output = (Value, String);

/// A failure of an admin command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Local setup (files, TLS).
    #[error(transparent)]
    Setup(#[from] Error),
    /// The request did not get an answer.
    #[error("{url}: {source}")]
    Http {
        /// URL asked.
        url: String,
        /// Transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The server refused.
    #[error("server answered {status}: {code}: {message}")]
    Refused {
        /// Status.
        status: StatusCode,
        /// Stable code.
        code: String,
        /// Explanation.
        message: String,
    },
    /// Bad local input.
    #[error("{0}")]
    Input(String),
}

/// A connection to the admin API with the token.
pub(super) struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub(super) fn new(args: &AdminArgs) -> Result<Self, CliError> {
        let tls = crate::tls::client_config(&args.ca, None)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| CliError::Http {
                url: args.url.clone(),
                source: e,
            })?;
        Ok(Self {
            http,
            base: format!("{}{ADMIN_PREFIX}", args.url.trim_end_matches('/')),
            token: crate::admin_token::read_token_file(&args.token_file)?,
        })
    }

    pub(super) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<reqwest::Body>,
        json: bool,
    ) -> Result<Value, CliError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req
                .header(
                    reqwest::header::CONTENT_TYPE,
                    if json {
                        "application/json"
                    } else {
                        "application/octet-stream"
                    },
                )
                .body(b);
        }
        let resp = req.send().await.map_err(|e| CliError::Http {
            url: url.clone(),
            source: e,
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CliError::Http { url, source: e })?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => (b.code, b.message),
                Err(_) => (
                    "unknown".into(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                ),
            };
            return Err(CliError::Refused {
                status,
                code,
                message,
            });
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| CliError::Input(format!("bad answer: {e}")))
    }

    pub(super) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(Value, T), CliError> {
        let body = body
            .map(|b| serde_json::to_vec(b).map(reqwest::Body::from))
            .transpose()
            .map_err(|e| CliError::Input(e.to_string()))?;
        let v = self.send(method, path, body, true).await?;
        let t = serde_json::from_value(v.clone())
            .map_err(|e| CliError::Input(format!("unexpected answer: {e}")))?;
        Ok((v, t))
    }
}

/// The password, one line on stdin.
pub(super) fn read_password() -> Result<String, CliError> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::Input(format!("reading the password from stdin: {e}")))?;
    let pw = line.trim_end_matches(['\r', '\n']).to_owned();
    if pw.is_empty() {
        return Err(CliError::Input("empty password on stdin".into()));
    }
    Ok(pw)
}

/// Percent-encodes a path segment.
pub(super) fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
