//! The load generator: one client for every system under test. It opens TCP, TLS 1.3 (X25519,
//! AES-128-GCM only) and, for scm-proxy, sends the preamble with the channel-binding MAC of that
//! very connection; then it runs one of the [`Mode`]s and returns a [`LoadResult`].
//!
//! Every loop is bounded by a deadline and a count, so a run stops by itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs::{cipher_suite, kx_group};
use rustls_pki_types::ServerName;
use scm_proto::crypto::SessionKey;
use scm_proto::preamble::{Preamble, REPLY_HEADER_LEN, Reply, Status};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;

use crate::backend::{CHUNK, Command};
use crate::hist::{Latency, LatencySummary, due_offset};
use crate::http1::{Conn, HttpError, get_request};

/// A failure of the load generator or of the system under test.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// TLS configuration or handshake error.
    #[error("tls: {0}")]
    Tls(#[from] rustls::Error),
    /// HTTP exchange error.
    #[error("http: {0}")]
    Http(#[from] HttpError),
    /// The server answered with a status other than 200.
    #[error("http status {0}")]
    Status(u16),
    /// scm-proxy refused the preamble.
    #[error("scm-proxy refused the preamble: {status}: {reason}")]
    Refused {
        /// The reply's status.
        status: Status,
        /// The reply's reason.
        reason: String,
    },
    /// The spec cannot be run.
    #[error("bad load spec: {0}")]
    Spec(String),
    /// A step took longer than its deadline.
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

/// What the client needs to speak for a logged-in scm device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScmCredentials {
    /// Session id from login (secret).
    pub session_id: String,
    /// Session key, base64.
    pub session_key: String,
    /// App id the session was created for.
    pub app_id: String,
    /// App version.
    pub app_version: String,
    /// Device id.
    pub device_id: String,
}

/// What is spoken after TCP connects.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Proto {
    /// Nothing: plain TCP (the machine's ceiling).
    Tcp,
    /// TLS 1.3 (nginx http and stream).
    Tls,
    /// TLS 1.3, then scm's preamble for `resource`.
    Scm {
        /// The device's session.
        creds: ScmCredentials,
        /// The resource asked for.
        resource: String,
    },
}

/// What to do once connected.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    /// Closed loop: every connection sends its next request as soon as the last one is answered.
    Max {
        /// Connections.
        connections: usize,
        /// Seconds to run.
        secs: f64,
        /// Stop after this many requests in all.
        max_requests: u64,
    },
    /// Open loop at a fixed rate; latency counts from when a request was due, not sent.
    Rate {
        /// Connections.
        connections: usize,
        /// Requests per second in all.
        rate: f64,
        /// Seconds to run.
        secs: f64,
    },
    /// One connection moves `bytes` through the bulk back end.
    Bulk {
        /// How many bytes.
        bytes: u64,
        /// Client to server (else server to client).
        upload: bool,
    },
    /// New connections, each with its handshake, its session check and one request.
    Connect {
        /// Connections being opened at once.
        concurrency: usize,
        /// Seconds to run.
        secs: f64,
        /// Stop after this many connections.
        max_connections: u64,
        /// Offer TLS session resumption.
        resume: bool,
    },
    /// Open `connections` and hold them until stdin closes or has a line, or `hold_secs` pass.
    Idle {
        /// Connections.
        connections: usize,
        /// Longest hold.
        hold_secs: f64,
    },
}

/// One run of the load generator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSpec {
    /// Where the system under test listens.
    pub addr: SocketAddr,
    /// TLS server name (the certificate's).
    pub server_name: String,
    /// CA certificate (PEM) that signs the server's certificate.
    pub ca_pem: Option<PathBuf>,
    /// Protocol after TCP.
    pub proto: Proto,
    /// HTTP path requested (`Max`, `Rate`, `Connect`); empty: no request in `Connect`.
    pub path: String,
    /// `Authorization` header value, if any.
    pub authorization: Option<String>,
    /// Client certificate chain and key (PEM files) to present, for a server that requires
    /// one (scm-security's forward-auth listener).
    #[serde(default)]
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// What to do.
    pub mode: Mode,
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Requests, connections or transfers that succeeded.
    pub ok: u64,
    /// Ones that failed.
    pub errors: u64,
    /// The first failure, for the log.
    pub first_error: Option<String>,
    /// Seconds measured.
    pub secs: f64,
    /// `ok / secs`.
    pub per_sec: f64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Connections that resumed a TLS session.
    pub resumed: u64,
    /// Latency of requests (or of whole connections in `Connect`).
    pub latency: Option<LatencySummary>,
}

/// Any stream the client speaks over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The TLS client configuration every system gets: TLS 1.3, X25519, AES-128-GCM; with
/// `identity` (certificate chain, key), a client certificate.
pub fn tls_config(
    ca_pem: Option<&PathBuf>,
    identity: Option<&(PathBuf, PathBuf)>,
    resume: bool,
) -> Result<Arc<ClientConfig>, LoadError> {
    let mut roots = rustls::RootCertStore::empty();
    let pem_err = |e: scm_proto::tls::TlsError| LoadError::Spec(e.to_string());
    if let Some(path) = ca_pem {
        for cert in scm_proto::tls::load_certs(path).map_err(pem_err)? {
            roots.add(cert)?;
        }
    }
    // The workspace's provider narrowed to one suite and group, the same as nginx is given.
    let provider = CryptoProvider {
        cipher_suites: vec![cipher_suite::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![kx_group::X25519],
        ..Arc::unwrap_or_clone(scm_proto::tls::provider())
    };
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(scm_proto::tls::TLS13_ONLY)?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = scm_proto::tls::load_certs(cert).map_err(pem_err)?;
            let key = scm_proto::tls::load_key(key).map_err(pem_err)?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    config.resumption = if resume {
        Resumption::in_memory_sessions(4096)
    } else {
        Resumption::disabled()
    };
    Ok(Arc::new(config))
}

/// Connection-making state shared by all tasks of a run.
pub struct Client {
    spec: LoadSpec,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    session_key: Option<SessionKey>,
    request: Vec<u8>,
}

impl Client {
    /// Prepares a client for `spec`.
    pub fn new(spec: LoadSpec) -> Result<Self, LoadError> {
        let resume = matches!(spec.mode, Mode::Connect { resume: true, .. });
        let connector = TlsConnector::from(tls_config(
            spec.ca_pem.as_ref(),
            spec.client_identity.as_ref(),
            resume,
        )?);
        let server_name = ServerName::try_from(spec.server_name.clone())
            .map_err(|_| LoadError::Spec(format!("bad server name {}", spec.server_name)))?;
        let session_key = match &spec.proto {
            Proto::Scm { creds, .. } => Some(
                SessionKey::from_b64(&creds.session_key)
                    .map_err(|e| LoadError::Spec(e.to_string()))?,
            ),
            _ => None,
        };
        let request = get_request(&spec.path, &spec.server_name, spec.authorization.as_deref());
        Ok(Self {
            spec,
            connector,
            server_name,
            session_key,
            request,
        })
    }

    /// Opens one connection through every layer; says whether TLS resumed a session.
    pub async fn open(&self) -> Result<(Box<dyn Io>, bool), LoadError> {
        self.open_with(&self.connector).await
    }

    /// A connector of its own (with its own session store), for one task of the resumption test.
    pub fn own_connector(&self) -> Result<TlsConnector, LoadError> {
        let resume = matches!(self.spec.mode, Mode::Connect { resume: true, .. });
        Ok(TlsConnector::from(tls_config(
            self.spec.ca_pem.as_ref(),
            self.spec.client_identity.as_ref(),
            resume,
        )?))
    }

    /// [`Client::open`] through `connector`.
    pub async fn open_with(
        &self,
        connector: &TlsConnector,
    ) -> Result<(Box<dyn Io>, bool), LoadError> {
        let tcp = TcpStream::connect(self.spec.addr).await?;
        tcp.set_nodelay(true)?;
        if matches!(self.spec.proto, Proto::Tcp) {
            return Ok((Box::new(tcp), false));
        }
        let mut tls = connector.connect(self.server_name.clone(), tcp).await?;
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        if let (Proto::Scm { creds, resource }, Some(key)) = (&self.spec.proto, &self.session_key) {
            let exporter = tls.get_ref().1.export_keying_material(
                [0u8; scm_proto::BINDING_EXPORTER_LEN],
                scm_proto::BINDING_EXPORTER_LABEL,
                None,
            )?;
            let frame = Preamble {
                session_id: creds.session_id.clone(),
                app_id: creds.app_id.clone(),
                app_version: creds.app_version.clone(),
                device_id: creds.device_id.clone(),
                resource: resource.clone(),
                mac: [0; 32],
            }
            .signed(key, &exporter)
            .encode()
            .map_err(|e| LoadError::Spec(e.to_string()))?;
            tls.write_all(&frame).await?;
            tls.flush().await?;
            let mut header = [0u8; REPLY_HEADER_LEN];
            tls.read_exact(&mut header).await?;
            let (status, len) = Reply::decode_header(&header)
                .map_err(|e| LoadError::Spec(format!("bad preamble reply: {e}")))?;
            let mut reason = vec![0u8; len];
            tls.read_exact(&mut reason).await?;
            if status != Status::Ok {
                return Err(LoadError::Refused {
                    status,
                    reason: String::from_utf8_lossy(&reason).into_owned(),
                });
            }
        }
        Ok((Box::new(tls), resumed))
    }
}

/// Per-task tallies, merged at the end.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    bytes: u64,
    resumed: u64,
    latency: Latency,
}

impl Tally {
    fn error(&mut self, e: &LoadError) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        self.errors += o.errors;
        self.bytes += o.bytes;
        self.resumed += o.resumed;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.latency.merge(&o.latency);
    }

    fn finish(self, secs: f64, with_latency: bool) -> LoadResult {
        LoadResult {
            ok: self.ok,
            errors: self.errors,
            first_error: self.first_error,
            secs,
            per_sec: if secs > 0.0 {
                self.ok as f64 / secs
            } else {
                0.0
            },
            bytes: self.bytes,
            resumed: self.resumed,
            latency: (with_latency && self.latency.count() > 0).then(|| self.latency.summary()),
        }
    }
}

/// Longest wait for one connection to open or one request to be answered.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

async fn timed<T>(
    what: &'static str,
    f: impl std::future::Future<Output = Result<T, LoadError>>,
) -> Result<T, LoadError> {
    tokio::time::timeout(STEP_TIMEOUT, f)
        .await
        .map_err(|_| LoadError::Timeout(what))?
}

/// Runs `spec` to completion.
pub async fn run(spec: LoadSpec) -> Result<LoadResult, LoadError> {
    let mode = spec.mode.clone();
    let client = Arc::new(Client::new(spec)?);
    match mode {
        Mode::Max {
            connections,
            secs,
            max_requests,
        } => requests(client, connections, secs, None, max_requests).await,
        Mode::Rate {
            connections,
            rate,
            secs,
        } => {
            if rate <= 0.0 {
                return Err(LoadError::Spec("rate must be positive".into()));
            }
            let max = (rate * secs).ceil() as u64 + 1;
            requests(client, connections, secs, Some(rate), max).await
        }
        Mode::Bulk { bytes, upload } => bulk(&client, bytes, upload).await,
        Mode::Connect {
            concurrency,
            secs,
            max_connections,
            ..
        } => connects(client, concurrency, secs, max_connections).await,
        Mode::Idle {
            connections,
            hold_secs,
        } => idle(&client, connections, hold_secs).await,
    }
}

async fn open_many(client: &Arc<Client>, n: usize) -> (Vec<Box<dyn Io>>, Tally) {
    let mut tally = Tally::default();
    let mut conns = Vec::with_capacity(n);
    let mut set = JoinSet::new();
    let mut started = 0;
    // At most 256 handshakes in flight, so opening 10k connections does not look like a flood.
    while conns.len() + (tally.errors as usize) < n {
        while started < n && set.len() < 256 {
            let c = client.clone();
            set.spawn(async move { timed("connect", c.open()).await });
            started += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok((io, _)))) => conns.push(io),
            Some(Ok(Err(e))) => tally.error(&e),
            Some(Err(e)) => tally.error(&LoadError::Spec(format!("task failed: {e}"))),
            None => break,
        }
    }
    (conns, tally)
}

async fn requests(
    client: Arc<Client>,
    connections: usize,
    secs: f64,
    rate: Option<f64>,
    max_requests: u64,
) -> Result<LoadResult, LoadError> {
    let connections = connections.max(1);
    let (conns, mut total) = open_many(&client, connections).await;
    if conns.is_empty() {
        return Err(LoadError::Spec(format!(
            "no connection could be opened: {}",
            total.first_error.unwrap_or_default()
        )));
    }
    // Errors while opening are reported but not counted against the requests.
    total.errors = 0;
    let n = conns.len();
    let budget = Arc::new(AtomicU64::new(max_requests));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut set = JoinSet::new();
    for (i, io) in conns.into_iter().enumerate() {
        let client = client.clone();
        let budget = budget.clone();
        set.spawn(async move {
            let mut tally = Tally::default();
            let mut conn = Conn::new(io);
            let mut k = 0u64;
            loop {
                let sent_at = match rate {
                    None => Instant::now(),
                    Some(rate) => {
                        let due = start + due_offset(i, n, k, rate);
                        k += 1;
                        if due >= deadline {
                            break;
                        }
                        let now = Instant::now();
                        if now < due {
                            // Idle connection: the timer's lateness is the client's, not the
                            // server's, so measure from the actual send.
                            tokio::time::sleep_until(due.into()).await;
                            Instant::now()
                        } else {
                            // Behind schedule: the wait counts (no coordinated omission).
                            due
                        }
                    }
                };
                if Instant::now() >= deadline
                    || budget
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                        .is_err()
                {
                    break;
                }
                let result = timed("request", async {
                    let (status, len) = conn.exchange(&client.request).await?;
                    if status != 200 {
                        return Err(LoadError::Status(status));
                    }
                    Ok(len)
                })
                .await;
                match result {
                    Ok(len) => {
                        tally.ok += 1;
                        tally.bytes += len;
                        tally.latency.record(sent_at.elapsed());
                    }
                    Err(e) => {
                        tally.error(&e);
                        if Instant::now() >= deadline {
                            break;
                        }
                        // The connection is spent; open another, or stop if none can be had.
                        match timed("reconnect", client.open()).await {
                            Ok((io, _)) => conn = Conn::new(io),
                            Err(e) => {
                                tally.error(&e);
                                break;
                            }
                        }
                    }
                }
            }
            tally
        });
    }
    while let Some(t) = set.join_next().await {
        match t {
            Ok(t) => total.merge(t),
            Err(e) => total.error(&LoadError::Spec(format!("task failed: {e}"))),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(total.finish(secs, true))
}

async fn bulk(client: &Client, bytes: u64, upload: bool) -> Result<LoadResult, LoadError> {
    let (mut io, _) = timed("connect", client.open()).await?;
    let command = if upload {
        Command::Upload(bytes)
    } else {
        Command::Download(bytes)
    };
    let start = Instant::now();
    io.write_all(command.line().as_bytes()).await?;
    let mut buf = vec![0u8; CHUNK];
    // A transfer that stalls for the step timeout fails; the whole one is bounded by its size.
    if upload {
        let mut left = bytes;
        while left > 0 {
            let k = left.min(CHUNK as u64) as usize;
            timed("upload", async { Ok(io.write_all(&buf[..k]).await?) }).await?;
            left -= k as u64;
        }
        io.flush().await?;
        let mut ok = [0u8; 3];
        timed("upload ack", async { Ok(io.read_exact(&mut ok).await?) }).await?;
        if &ok != b"OK\n" {
            return Err(LoadError::Spec("bulk back end did not acknowledge".into()));
        }
    } else {
        let mut left = bytes;
        while left > 0 {
            let n = timed("download", async { Ok(io.read(&mut buf).await?) }).await?;
            if n == 0 {
                return Err(LoadError::Http(HttpError::Closed));
            }
            left = left.saturating_sub(n as u64);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = io.shutdown().await;
    Ok(LoadResult {
        ok: 1,
        secs,
        per_sec: bytes as f64 / secs,
        bytes,
        ..LoadResult::default()
    })
}

async fn connects(
    client: Arc<Client>,
    concurrency: usize,
    secs: f64,
    max_connections: u64,
) -> Result<LoadResult, LoadError> {
    let budget = Arc::new(AtomicU64::new(max_connections));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut set = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let budget = budget.clone();
        // rustls keeps at most 8 TLS 1.3 tickets per server and each resumption uses one up: with
        // one store per task, each connection resumes from its task's previous one.
        let connector = client.own_connector()?;
        set.spawn(async move {
            let mut tally = Tally::default();
            while Instant::now() < deadline
                && budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                    .is_ok()
            {
                let t0 = Instant::now();
                let result = timed("connection", async {
                    let (io, resumed) = client.open_with(&connector).await?;
                    let mut conn = Conn::new(io);
                    if !client.spec.path.is_empty() {
                        let (status, _) = conn.exchange(&client.request).await?;
                        if status != 200 {
                            return Err(LoadError::Status(status));
                        }
                    }
                    let _ = conn.io.shutdown().await;
                    Ok(resumed)
                })
                .await;
                match result {
                    Ok(resumed) => {
                        tally.ok += 1;
                        tally.resumed += u64::from(resumed);
                        tally.latency.record(t0.elapsed());
                    }
                    Err(e) => {
                        tally.error(&e);
                        // Back off a little so a refusing server is not hammered.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            tally
        });
    }
    let mut total = Tally::default();
    while let Some(t) = set.join_next().await {
        match t {
            Ok(t) => total.merge(t),
            Err(e) => total.error(&LoadError::Spec(format!("task failed: {e}"))),
        }
    }
    Ok(total.finish(start.elapsed().as_secs_f64(), true))
}

async fn idle(
    client: &Arc<Client>,
    connections: usize,
    hold_secs: f64,
) -> Result<LoadResult, LoadError> {
    let start = Instant::now();
    let (conns, tally) = open_many(client, connections).await;
    let secs = start.elapsed().as_secs_f64();
    // The orchestrator reads this line, measures, then closes our stdin.
    println!("READY {} {}", conns.len(), tally.errors);
    let mut line = String::new();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let _ = tokio::time::timeout(
        Duration::from_secs_f64(hold_secs),
        tokio::io::AsyncBufReadExt::read_line(&mut stdin, &mut line),
    )
    .await;
    let ok = conns.len() as u64;
    drop(conns);
    Ok(LoadResult {
        ok,
        errors: tally.errors,
        first_error: tally.first_error,
        secs,
        per_sec: ok as f64 / secs,
        ..LoadResult::default()
    })
}
