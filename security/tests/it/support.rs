//! Test harness: a Security server on real loopback ports with real TLS (certificates from
//! `dev-certs`), HTTP clients for its three APIs, and a device that enrolls and logs in with the
//! proto's crypto.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser as _;
use reqwest::{Client, Method, StatusCode};
use scm_proto::api::{
    ChallengeResponse, EnrollRequest, EnrollResponse, ErrorBody, LoginRequest, LoginResponse,
    PATH_CHALLENGE, PATH_ENROLL, PATH_LOGIN,
};
use scm_proto::crypto::{self, LoginTranscript, Nonce, SessionId, SessionKey, SharedKey};
use scm_security::config::{Cli, Command, ServeArgs};
use scm_security::server::Running;
use serde_json::{Value, json};

/// Which database a test server uses.
#[derive(Debug, Clone)]
pub enum Db {
    /// The default SQLite file in the data dir.
    Sqlite,
    /// A fresh database on the harness's PostgreSQL server.
    Postgres(String),
}

/// A running test server with clients.
pub struct Server {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,

    pub device: Client,
    pub proxy: Client,
    pub admin: Client,
    pub device_url: String,
    pub proxy_url: String,
    pub admin_url: String,
    pub token: String,
}

/// Makes dev certificates in `dir/certs`.
pub fn certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    scm_security::devcerts::generate(&certs, &[], false).expect("dev-certs");
    certs
}

/// An HTTPS client trusting the dev CA, optionally with a client certificate.
pub fn client(certs: &Path, identity: Option<(&str, &str)>) -> Client {
    let ca = certs.join("ca.pem");
    let id = identity.map(|(c, k)| (certs.join(c), certs.join(k)));
    let tls =
        scm_security::tls::client_config(&ca, id.as_ref().map(|(c, k)| (c.as_path(), k.as_path())))
            .expect("client TLS config");
    Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A client for the plain-HTTP listeners (`/metrics`). reqwest builds its TLS settings even for
/// `http://`, and with no default crypto provider compiled in it needs the shared profile.
pub fn plain_http() -> Client {
    let tls = scm_proto::tls::client_builder()
        .expect("TLS profile")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// `serve` flags for a server in `dir`, with `extra` flags appended.
pub fn serve_args(dir: &Path, certs: &Path, db: &Db, extra: &[&str]) -> ServeArgs {
    let mut argv: Vec<String> = vec![
        "scm-security".into(),
        "serve".into(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--tls-cert".into(),
        certs.join("security.pem").display().to_string(),
        "--tls-key".into(),
        certs.join("security.key").display().to_string(),
        "--client-ca".into(),
        certs.join("ca.pem").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--proxy-listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
    ];
    if let Db::Postgres(url) = db {
        argv.push("--database-url".into());
        argv.push(url.clone());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    match Cli::try_parse_from(argv)
        .expect("serve flags parse")
        .command
    {
        Command::Serve(a) => *a,
        _ => unreachable!("serve"),
    }
}

impl Server {
    /// Starts a server on `db` with extra `serve` flags.
    pub async fn start(db: Db, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        certs(dir.path());
        Self::start_in(dir, db, extra).await
    }

    /// Starts a server in `dir`, which holds `certs/` and maybe an existing `data/`.
    pub async fn start_in(dir: tempfile::TempDir, db: Db, extra: &[&str]) -> Server {
        let certs = dir.path().join("certs");
        let args = serve_args(dir.path(), &certs, &db, extra);
        let running = scm_security::server::start(&args)
            .await
            .expect("server starts");
        let token = std::fs::read_to_string(dir.path().join("data/admin.token"))
            .expect("admin token created on first start")
            .trim()
            .to_owned();
        Server {
            device_url: format!("https://localhost:{}", running.device_addr.port()),
            proxy_url: format!("https://localhost:{}", running.proxy_addr.port()),
            admin_url: format!("https://localhost:{}", running.admin_addr.port()),
            device: client(&certs, None),
            proxy: client(&certs, Some(("proxy-client.pem", "proxy-client.key"))),
            admin: client(&certs, None),
            running: Some(running),
            dir,

            token,
        }
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn state(&self) -> &scm_security::state::State {
        &self.running.as_ref().expect("running").state
    }

    /// Stops the server (and its database pool).
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// An admin API call; returns status and JSON (Null for empty bodies).
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .admin
            .request(method, format!("{}/v1/admin{path}", self.admin_url))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        send(req).await
    }

    /// An admin call that must succeed.
    pub async fn admin_ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.admin(method.clone(), path, body).await;
        assert!(s.is_success(), "{method} {path}: {s} {v}");
        v
    }

    /// Adds a local user.
    pub async fn add_user(&self, name: &str, password: &str, groups: &[&str]) {
        self.admin_ok(
            Method::POST,
            "/users",
            Some(json!({"name": name, "password": password, "groups": groups})),
        )
        .await;
    }

    /// POSTs JSON to the device API.
    pub async fn device_post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        send(
            self.device
                .post(format!("{}{path}", self.device_url))
                .json(body),
        )
        .await
    }

    /// POSTs JSON to the proxies' API.
    pub async fn proxy_post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        send(
            self.proxy
                .post(format!("{}{path}", self.proxy_url))
                .json(body),
        )
        .await
    }

    /// Validates a session over mutual TLS.
    pub async fn validate(&self, session_id: &str) -> (StatusCode, Value) {
        self.proxy_post(
            scm_proto::api::PATH_PROXY_VALIDATE,
            &json!({"session_id": session_id}),
        )
        .await
    }

    /// Rows in a table, straight from the database.
    pub async fn count(&self, table: &'static str) -> i64 {
        self.state().store.count(table).await.expect("count")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropping Running cancels its tasks.
        self.running.take();
    }
}

/// Sends a request; returns status and JSON body (Null if empty or not JSON).
pub async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.expect("request answered");
    let status = resp.status();
    let bytes = resp.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Asserts an error answer with a status and stable code, in the proto's ErrorBody shape.
#[track_caller]
pub fn assert_error(got: &(StatusCode, Value), status: u16, code: &str) {
    assert_eq!(got.0.as_u16(), status, "status of {}", got.1);
    let body: ErrorBody = serde_json::from_value(got.1.clone())
        .unwrap_or_else(|e| panic!("not an ErrorBody: {} ({e})", got.1));
    assert_eq!(body.code, code, "code: {}", body.message);
    assert!(!body.message.is_empty());
}

/// Anything that reaches a device API (an in-process server, or a server process).
pub trait DeviceApi {
    /// POSTs JSON to the device API.
    async fn device_post(&self, path: &str, body: &Value) -> (StatusCode, Value);
}

impl DeviceApi for Server {
    async fn device_post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        Server::device_post(self, path, body).await
    }
}

/// A device API at a URL.
pub struct Remote {
    pub client: Client,
    pub url: String,
}

impl DeviceApi for Remote {
    async fn device_post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        send(self.client.post(format!("{}{path}", self.url)).json(body)).await
    }
}

/// A device: one enrolled (user, device, app).
#[derive(Clone)]
pub struct Device {
    pub username: String,
    pub password: String,
    pub device_id: String,
    pub app_id: String,
    pub app_version: String,
    pub key_id: String,
    pub key: SharedKey,
}

/// A logged-in session as the device sees it.
pub struct Login {
    pub resp: LoginResponse,
    pub session_key: SessionKey,
}

impl Device {
    /// Enrolls with the server.
    pub async fn enroll(
        srv: &impl DeviceApi,
        username: &str,
        password: &str,
        device_id: &str,
    ) -> Device {
        Self::try_enroll(srv, username, password, device_id, None)
            .await
            .unwrap_or_else(|e| panic!("enroll {username}: {} {}", e.0, e.1))
    }

    /// Enrolls, returning the error answer on failure.
    pub async fn try_enroll(
        srv: &impl DeviceApi,
        username: &str,
        password: &str,
        device_id: &str,
        activation_code: Option<&str>,
    ) -> Result<Device, (StatusCode, Value)> {
        let req = EnrollRequest {
            username: username.into(),
            password: password.into(),
            device_id: device_id.into(),
            app_id: "mail".into(),
            activation_code: activation_code.map(str::to_owned),
        };
        let (s, v) = srv
            .device_post(PATH_ENROLL, &serde_json::to_value(&req).unwrap())
            .await;
        if s != StatusCode::OK {
            return Err((s, v));
        }
        let r: EnrollResponse = serde_json::from_value(v).expect("EnrollResponse");
        Ok(Device {
            username: username.into(),
            password: password.into(),
            device_id: device_id.into(),
            app_id: "mail".into(),
            app_version: "1.0".into(),
            key_id: r.key_id,
            key: SharedKey::from_b64(&r.shared_key).expect("shared key"),
        })
    }

    /// Gets a challenge.
    pub async fn challenge(srv: &impl DeviceApi) -> ChallengeResponse {
        let (s, v) = srv.device_post(PATH_CHALLENGE, &json!({})).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        serde_json::from_value(v).expect("ChallengeResponse")
    }

    /// A login request over `ch`, MACed with `key`.
    pub fn login_request(&self, ch: &ChallengeResponse, key: &SharedKey) -> (LoginRequest, Nonce) {
        let server_nonce: Nonce = crypto::decode_fixed("n", &ch.server_nonce).unwrap();
        let client_nonce: Nonce = crypto::random_bytes();
        let t = LoginTranscript {
            challenge_id: &ch.challenge_id,
            server_nonce: &server_nonce,
            client_nonce: &client_nonce,
            username: &self.username,
            key_id: &self.key_id,
            device_id: &self.device_id,
            app_id: &self.app_id,
            app_version: &self.app_version,
        };
        let mac = crypto::login_mac(key, &t);
        (
            LoginRequest {
                username: self.username.clone(),
                password: self.password.clone(),
                key_id: self.key_id.clone(),
                device_id: self.device_id.clone(),
                app_id: self.app_id.clone(),
                app_version: self.app_version.clone(),
                challenge_id: ch.challenge_id.clone(),
                client_nonce: crypto::b64(&client_nonce),
                mac: crypto::b64(&mac),
            },
            client_nonce,
        )
    }

    /// Logs in, returning the raw answer.
    pub async fn try_login(&self, srv: &impl DeviceApi) -> Result<Login, (StatusCode, Value)> {
        let ch = Self::challenge(srv).await;
        let (req, client_nonce) = self.login_request(&ch, &self.key);
        let (s, v) = srv
            .device_post(PATH_LOGIN, &serde_json::to_value(&req).unwrap())
            .await;
        if s != StatusCode::OK {
            return Err((s, v));
        }
        let resp: LoginResponse = serde_json::from_value(v).expect("LoginResponse");
        let sid = SessionId::parse(&resp.session_id).expect("session id shape");
        let server_nonce: Nonce = crypto::decode_fixed("n", &ch.server_nonce).unwrap();
        let session_key = crypto::derive_session_key(&self.key, &server_nonce, &client_nonce, &sid);
        Ok(Login { resp, session_key })
    }

    /// Logs in; must succeed.
    pub async fn login(&self, srv: &impl DeviceApi) -> Login {
        self.try_login(srv)
            .await
            .unwrap_or_else(|e| panic!("login {}: {} {}", self.username, e.0, e.1))
    }
}

/// Waits until `f` is true, polling for at most `max`.
pub async fn eventually(max: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + max;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
/// Skips loudly for want of `what`, or fails under CI (the workspace's one rule). libtest names
/// each test's thread after the test, so the banner says which test skipped.
pub fn skip(what: &str, why: &str) {
    let thread = std::thread::current();
    scm_netns::skip::skip(thread.name().unwrap_or("a test"), what, why);
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
