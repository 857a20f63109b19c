//! A logged-in session: login (challenge, proof of the shared key, session key derivation),
//! opening connections through a proxy (TLS 1.3, then the preamble bound to that connection's
//! exporter), and logout.
//!
//! A session spreads its connections over the site's proxies by one policy, the same as the
//! Security URL list's ([`scm_proto::failover`], "preferred order with failback"): connections go
//! to the current proxy, the next ones are tried when it cannot be reached (a TCP connect bounded
//! by [`PROXY_CONNECT_TIMEOUT`], so a dead host costs seconds, not the whole exchange's bound), and
//! while away from the first proxy it is tried again at most once per failback interval, becoming
//! current again when it answers.

use std::sync::Arc;
use std::time::Duration;

use scm_proto::failover::{DEFAULT_FAILBACK, Failover, SwitchKind};

use scm_proto::api::{
    ChallengeResponse, LoginRequest, LoginResponse, PATH_CHALLENGE, PATH_LOGIN, PATH_LOGOUT,
};
use scm_proto::crypto::{
    LoginTranscript, SessionId, SessionKey, SessionTag, b64, decode_fixed, derive_session_key,
    login_mac, random_bytes,
};
use scm_proto::preamble::{Preamble, REPLY_HEADER_LEN, Reply, Status};
use scm_proto::{BINDING_EXPORTER_LABEL, BINDING_EXPORTER_LEN};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::device::Device;
use crate::error::DeviceError;

/// A TLS connection to a proxy that accepted the preamble: bytes written go to the resource.
pub type ProxyStream = tokio_rustls::client::TlsStream<TcpStream>;

/// How long a proxy has to accept TCP, finish TLS and answer the preamble.
const PROXY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a proxy has to accept the TCP connection before the next one is tried.
pub const PROXY_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The failover state of a login answer's proxy list.
fn proxy_failover(login: &LoginResponse) -> Arc<Failover> {
    Arc::new(Failover::new(login.proxy_urls.len(), DEFAULT_FAILBACK))
}

/// What the CLI saves between commands (holds the session id and key: mode 0600): the login
/// answer as it came, and the session key derived from it. Flattened, so the saved JSON has the
/// answer's fields beside `session_key`.
#[derive(Clone, Serialize, Deserialize)]
pub struct SavedSession {
    /// The derived session key, base64.
    pub session_key: String,
    /// The login answer (session id, user, groups, site, proxies, expiries).
    #[serde(flatten)]
    pub login: LoginResponse,
}

impl std::fmt::Debug for SavedSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is what a thief needs; the answer's own Debug redacts the id and shows its tag.
        f.debug_struct("SavedSession")
            .field("session_key", &scm_proto::redact::Redacted)
            .field("login", &self.login)
            .finish()
    }
}

impl Device {
    /// Logs in (see [`Session::login`]). Defined here rather than in `device.rs` so that the
    /// device module does not depend on the session module that depends on it.
    pub async fn login(&self, password: &str) -> Result<Session, DeviceError> {
        Session::login(self, password).await
    }
}

/// A live session of an enrolled device.
#[derive(Clone)]
pub struct Session {
    device: Device,
    id: SessionId,
    key: SessionKey,
    saved: SavedSession,
    /// Which of the site's proxies connections go to; shared by the session's clones.
    proxies: Arc<Failover>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("tag", &self.id.tag())
            .field("user", &self.saved.login.user)
            .field("proxies", &self.saved.login.proxy_urls)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Logs in: a fresh challenge, a MAC over it with the shared key, and the session key derived
    /// from both nonces. Each challenge is good for one attempt.
    pub async fn login(device: &Device, password: &str) -> Result<Self, DeviceError> {
        let ch: ChallengeResponse = device
            .api
            .post("challenge", PATH_CHALLENGE, &serde_json::json!({}), None)
            .await?;
        let server_nonce = decode_fixed::<32>("server nonce", &ch.server_nonce)?;
        let client_nonce = random_bytes::<32>();
        let e = &device.enrollment;
        let transcript = LoginTranscript {
            challenge_id: &ch.challenge_id,
            server_nonce: &server_nonce,
            client_nonce: &client_nonce,
            username: &e.username,
            key_id: &e.key_id,
            device_id: &e.config.device_id,
            app_id: &e.config.app_id,
            app_version: &e.config.app_version,
        };
        let mac = login_mac(&device.shared_key, &transcript);
        let req = LoginRequest {
            username: e.username.clone(),
            password: password.to_owned(),
            key_id: e.key_id.clone(),
            device_id: e.config.device_id.clone(),
            app_id: e.config.app_id.clone(),
            app_version: e.config.app_version.clone(),
            challenge_id: ch.challenge_id,
            client_nonce: b64(&client_nonce),
            mac: b64(&mac),
        };
        let resp: LoginResponse = device.api.post("login", PATH_LOGIN, &req, None).await?;
        let id = SessionId::parse(&resp.session_id).ok_or(DeviceError::BadAnswer {
            what: "login",
            why: "the session id is not 43 base64url characters".into(),
        })?;
        let key = derive_session_key(&device.shared_key, &server_nonce, &client_nonce, &id);
        Ok(Self {
            device: device.clone(),
            proxies: proxy_failover(&resp),
            saved: SavedSession {
                session_key: key.to_b64(),
                login: resp,
            },
            id,
            key,
        })
    }

    /// Rebuilds a session saved by [`Session::saved`].
    pub fn restore(device: &Device, saved: SavedSession) -> Result<Self, DeviceError> {
        let id = SessionId::parse(&saved.login.session_id)
            .ok_or_else(|| DeviceError::Usage("the saved session id is malformed".into()))?;
        Ok(Self {
            device: device.clone(),
            key: SessionKey::from_b64(&saved.session_key)?,
            proxies: proxy_failover(&saved.login),
            id,
            saved,
        })
    }

    /// The same session trying its site's first proxy again every `failback` while away from it
    /// (default [`DEFAULT_FAILBACK`]).
    pub fn with_proxy_failback(mut self, failback: Duration) -> Self {
        self.proxies = Arc::new(Failover::new(self.saved.login.proxy_urls.len(), failback));
        self
    }

    /// The proxy connections go to first now.
    pub fn current_proxy(&self) -> Option<&str> {
        self.saved
            .login
            .proxy_urls
            .get(self.proxies.current())
            .map(String::as_str)
    }

    /// The saved form.
    pub fn saved(&self) -> &SavedSession {
        &self.saved
    }

    /// The device this session belongs to.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The session's non-secret tag (as in the proxy's logs).
    pub fn tag(&self) -> SessionTag {
        self.id.tag()
    }

    /// The session id (secret; tests use it to play an attacker).
    pub fn id(&self) -> &SessionId {
        &self.id
    }

    /// A copy of this session that reports another app version in its preambles.
    pub fn with_app_version(&self, version: &str) -> Self {
        let mut s = self.clone();
        s.device = s.device.with_app_version(version);
        s
    }

    /// The site's proxies, in order of preference.
    pub fn proxies(&self) -> &[String] {
        &self.saved.login.proxy_urls
    }

    /// Opens TLS 1.3 to a proxy, without sending anything.
    pub async fn connect(&self, proxy: &str) -> Result<ProxyStream, DeviceError> {
        let name = crate::tls::server_name(proxy)?;
        let connector = tokio_rustls::TlsConnector::from(self.device.tls.clone());
        let fut = async {
            let tcp = tokio::time::timeout(PROXY_CONNECT_TIMEOUT, TcpStream::connect(proxy))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no TCP connection within {PROXY_CONNECT_TIMEOUT:?}"),
                    )
                })??;
            tcp.set_nodelay(true)?;
            connector.connect(name, tcp).await
        };
        match tokio::time::timeout(PROXY_TIMEOUT, fut).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(DeviceError::ProxyUnreachable {
                tried: 1,
                last: format!("{proxy}: {e}"),
            }),
            Err(_) => Err(DeviceError::ProxyUnreachable {
                tried: 1,
                last: format!("{proxy}: no TLS handshake within {PROXY_TIMEOUT:?}"),
            }),
        }
    }

    /// The channel-binding exporter of a proxy connection.
    pub fn exporter(stream: &ProxyStream) -> Result<[u8; BINDING_EXPORTER_LEN], DeviceError> {
        Ok(stream.get_ref().1.export_keying_material(
            [0u8; BINDING_EXPORTER_LEN],
            BINDING_EXPORTER_LABEL,
            None,
        )?)
    }

    /// The preamble asking for `resource`, bound to the connection whose exporter is given.
    pub fn preamble(&self, resource: &str, exporter: &[u8]) -> Preamble {
        let c = &self.device.enrollment.config;
        Preamble {
            session_id: self.id.expose().to_owned(),
            app_id: c.app_id.clone(),
            app_version: c.app_version.clone(),
            device_id: c.device_id.clone(),
            resource: resource.to_owned(),
            mac: [0; 32],
        }
        .signed(&self.key, exporter)
    }

    /// Sends raw preamble bytes and reads the proxy's reply.
    pub async fn exchange(stream: &mut ProxyStream, frame: &[u8]) -> Result<Reply, DeviceError> {
        let fut = async {
            stream
                .write_all(frame)
                .await
                .map_err(DeviceError::ProxyIo)?;
            stream.flush().await.map_err(DeviceError::ProxyIo)?;
            read_reply(stream).await
        };
        match tokio::time::timeout(PROXY_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(DeviceError::ProxyIo(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no reply to the preamble",
            ))),
        }
    }

    /// Opens `resource` through the given proxy.
    pub async fn open_via(&self, proxy: &str, resource: &str) -> Result<ProxyStream, DeviceError> {
        let mut stream = self.connect(proxy).await?;
        let exporter = Self::exporter(&stream)?;
        let frame = self.preamble(resource, &exporter).encode()?;
        let reply = Self::exchange(&mut stream, &frame).await?;
        if reply.status == Status::Ok {
            Ok(stream)
        } else {
            Err(DeviceError::ProxyRefused {
                status: reply.status,
                reason: reply.reason,
            })
        }
    }

    /// Opens `resource` through the site's proxies in the order of the failover policy (the
    /// current one first; the first again when its retry is due). A refusal is final (another
    /// proxy would refuse too); an unreachable proxy moves on to the next.
    pub async fn open(&self, resource: &str) -> Result<ProxyStream, DeviceError> {
        let urls = &self.saved.login.proxy_urls;
        let mut last = String::from("the site has no proxy");
        let plan = self.proxies.plan();
        for &idx in plan.order.iter().filter(|&&i| i < urls.len()) {
            match self.open_via(&urls[idx], resource).await {
                Err(DeviceError::ProxyUnreachable { last: l, .. }) => {
                    tracing::debug!(proxy = %urls[idx], error = %l, "proxy unreachable; trying the next");
                    last = l;
                }
                other => {
                    // A refusal is an answer too: the proxy is up.
                    if let Some(sw) = self.proxies.succeeded(plan.from, idx) {
                        let (from, to) = (&urls[sw.from], &urls[sw.to]);
                        match sw.kind {
                            SwitchKind::Failover => {
                                tracing::warn!(%from, %to, "proxy unreachable; connections go to the next one")
                            }
                            SwitchKind::Failback => {
                                tracing::info!(%from, %to, "the first proxy answers again; connections go back to it")
                            }
                        }
                    }
                    return other;
                }
            }
        }
        Err(DeviceError::ProxyUnreachable {
            tried: urls.len(),
            last,
        })
    }

    /// Ends the session on the Security server (which tells every proxy).
    pub async fn logout(&self) -> Result<(), DeviceError> {
        let id = self.id.expose().to_owned();
        let resp = self
            .device
            .api
            .send(|c, base| {
                c.post(format!("{base}{PATH_LOGOUT}"))
                    .bearer_auth(&id)
                    .json(&serde_json::json!({}))
            })
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(crate::api::refused("logout", resp).await)
        }
    }
}

/// Reads one reply frame.
pub async fn read_reply<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Reply, DeviceError> {
    let mut header = [0u8; REPLY_HEADER_LEN];
    stream
        .read_exact(&mut header)
        .await
        .map_err(DeviceError::ProxyIo)?;
    let (status, len) = Reply::decode_header(&header)?;
    let mut reason = vec![0u8; len];
    stream
        .read_exact(&mut reason)
        .await
        .map_err(DeviceError::ProxyIo)?;
    Ok(Reply {
        status,
        reason: String::from_utf8_lossy(&reason).into_owned(),
    })
}
