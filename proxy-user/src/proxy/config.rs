//! Command-line flags (each with an `SCM_PROXY_...` environment twin) and the typed configuration
//! they become. Nothing else in the proxy reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::limiter::FailurePolicy;

/// How the proxy encrypts the device side after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsPath {
    /// kTLS when the kernel accepts the TLS upper-layer protocol and the connection's cipher,
    /// user-space rustls otherwise (decided per connection).
    Auto,
    /// Always user-space rustls (the kernel is never asked).
    Userspace,
    /// As `auto`, but refuse to start unless the kernel supports kTLS (a connection whose cipher
    /// the kernel lacks still goes on in user space, counted).
    Ktls,
}

/// `scm-proxy serve`: terminate device TLS, check sessions with the Security server, relay.
///
/// Every connection goes: TLS 1.3 handshake -> preamble (session id, app context, resource,
/// binding MAC) -> session validation (cached, revocations pushed by the Security server) ->
/// channel binding, app policy and group checks -> a one-frame reply -> relaying (tcp mode) or an
/// HTTP/1.1 reverse proxy with identity headers (http mode).
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example:\n  scm-proxy serve --listen 127.0.0.1:9443 \\\n    --tls-cert certs/proxy.pem --tls-key certs/proxy.key \\\n    --security-url https://127.0.0.1:8444 --security-ca certs/ca.pem \\\n    --client-cert certs/proxy-client.pem --client-key certs/proxy-client.key \\\n    --metrics-listen 127.0.0.1:9100"
)]
pub struct ServeArgs {
    /// Address devices connect to (TLS 1.3).
    #[arg(long, env = "SCM_PROXY_LISTEN", default_value = "127.0.0.1:9443")]
    pub listen: SocketAddr,

    /// PEM certificate chain the proxy presents to devices. SIGHUP reads it and --tls-key
    /// again: new handshakes get the new pair, open connections are kept; a bad pair is refused
    /// and the old one stays (under --workers the supervisor checks it, then every worker
    /// reloads in place).
    #[arg(long, env = "SCM_PROXY_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "SCM_PROXY_TLS_KEY")]
    pub tls_key: PathBuf,

    /// Base URL of the Security server's proxies' API (mutual TLS). Repeat the flag (or separate
    /// with commas in the environment) to give fail-over instances, in order of preference.
    #[arg(
        long = "security-url",
        env = "SCM_PROXY_SECURITY_URLS",
        value_delimiter = ',',
        required = true
    )]
    pub security_urls: Vec<String>,

    /// PEM CA certificate(s) that sign the Security servers' certificates.
    #[arg(long, env = "SCM_PROXY_SECURITY_CA")]
    pub security_ca: PathBuf,

    /// PEM client certificate the proxy presents to the Security server.
    #[arg(long, env = "SCM_PROXY_CLIENT_CERT")]
    pub client_cert: PathBuf,

    /// PEM private key of --client-cert.
    #[arg(long, env = "SCM_PROXY_CLIENT_KEY")]
    pub client_key: PathBuf,

    /// Address of the ops listener (plain HTTP): GET /metrics (Prometheus; a supervisor's merges
    /// its workers'), /ready (503 naming the failing check), /live, /status (`scm-proxy status`).
    /// Off when not given; keep it on loopback or a management network.
    #[arg(long, env = "SCM_PROXY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Record encryption after the handshake: auto (kTLS where the kernel takes the connection's
    /// cipher, user-space rustls otherwise), userspace, or ktls (as auto, but refuse to start
    /// without kernel TLS). On kTLS, tcp mode relays with splice(2), zero-copy.
    #[arg(long, env = "SCM_PROXY_TLS_PATH", value_enum, default_value = "auto")]
    pub tls_path: TlsPath,

    /// Time allowed for the TLS handshake.
    #[arg(long, env = "SCM_PROXY_HANDSHAKE_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub handshake_timeout: Duration,

    /// Time allowed for the whole preamble to arrive after the handshake (slow senders are cut).
    #[arg(long, env = "SCM_PROXY_PREAMBLE_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub preamble_timeout: Duration,

    /// How long a validated session is served from the cache before asking the Security server
    /// again. Revocations empty it at once; the TTL bounds staleness while the stream is down.
    #[arg(long, env = "SCM_PROXY_CACHE_TTL", value_parser = parse_duration, default_value = "30s")]
    pub cache_ttl: Duration,

    /// Time allowed for one call to a Security server before moving to the next.
    #[arg(long, env = "SCM_PROXY_SECURITY_TIMEOUT", value_parser = parse_duration, default_value = "3s")]
    pub security_timeout: Duration,

    /// While calls go to a fail-over Security server, how often the first --security-url is tried
    /// again; when it answers, calls and the revocation stream go back to it.
    #[arg(long, env = "SCM_PROXY_SECURITY_FAILBACK", value_parser = parse_duration, default_value = "10s")]
    pub security_failback: Duration,

    /// A revocation stream silent for this long is considered dead and reopened.
    #[arg(long, env = "SCM_PROXY_REVOCATION_STALL", value_parser = parse_duration, default_value = "15s")]
    pub revocation_stall: Duration,

    /// How often the resource catalog and app policy are fetched even without a change event.
    #[arg(long, env = "SCM_PROXY_CATALOG_REFRESH", value_parser = parse_duration, default_value = "60s")]
    pub catalog_refresh: Duration,

    /// Time allowed to connect to a back end.
    #[arg(long, env = "SCM_PROXY_CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub connect_timeout: Duration,

    /// A relayed connection with no bytes either way for this long is closed.
    #[arg(long, env = "SCM_PROXY_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "300s")]
    pub idle_timeout: Duration,

    /// Most bytes one relay read takes (1 KiB to 64 KiB); held per connection only while bytes wait.
    #[arg(long, env = "SCM_PROXY_BUFFER_SIZE", default_value_t = 16 * 1024)]
    pub buffer_size: usize,

    /// Most device connections open at once; further ones wait in the kernel's accept queue.
    #[arg(long, env = "SCM_PROXY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// How long open connections may take to finish when the process drains: on SIGTERM or
    /// SIGINT (the device listener closes at once, so a balancer's next connect fails fast; what
    /// is still open after this is closed and the process exits 0), and, under a supervisor, for
    /// each worker a SIGUSR2 rolling restart replaces. Keep a service manager's stop timeout
    /// (systemd TimeoutStopSec) above it.
    #[arg(long, env = "SCM_PROXY_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub drain_timeout: Duration,

    /// Close a session's open connections after this many revalidations in a row found no
    /// Security server to answer (fail closed; about one --cache-ttl apart, so the default 10
    /// keeps tunnels through a Security outage of about 5 minutes at the default TTL). 0: never
    /// close for that reason (fail open: tunnels live on until the absolute expiry, which is
    /// always enforced locally).
    #[arg(long, env = "SCM_PROXY_FAIL_CLOSED_AFTER", default_value_t = 10)]
    pub fail_closed_after: u32,

    /// The per-source failure limit of a single-process proxy (from the shared --block-after,
    /// --block-window, --block-for and --ipv6-prefix flags); `None` under a supervisor,
    /// whose workers feed the XDP blocklist instead.
    #[arg(skip)]
    pub source_limit: Option<FailurePolicy>,

    /// Do not send http back ends the signed identity assertion (`x-scm-assertion`, an ES256
    /// JWT from the Security server), only the bare identity headers. By default every request
    /// carries one, and a request gets 503 when none can be had (no Security server answers).
    #[arg(long, env = "SCM_PROXY_NO_IDENTITY_ASSERTION")]
    pub no_identity_assertion: bool,

    /// Addresses or CIDR blocks of the TCP balancers in front of this proxy (HAProxy with
    /// `send-proxy-v2`, ...), comma-separated or repeated. A connection from one of them must
    /// begin with a PROXY protocol v2 header, and the device address it names is the one the
    /// per-source limit, the logs and `x-forwarded-for` see; one without a header is closed. A
    /// connection from any other address is read as a device's, header or not. Off by default.
    #[arg(
        long = "proxy-protocol-from",
        env = "SCM_PROXY_PROXY_PROTOCOL_FROM",
        value_delimiter = ',',
        value_parser = parse_net
    )]
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

/// `10.0.0.5` (one address) or `10.0.0.0/24` (a block).
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Ok(ip.into());
    }
    text.parse::<ipnet::IpNet>().map_err(|_| {
        format!("{text:?} is neither an IP address nor a CIDR block (e.g. 10.0.0.5, 10.0.0.0/24)")
    })
}

/// The parser of every duration flag (`250ms`, `5s`, `2m`, `1h`, `1d`, a bare number of
/// seconds; at most [`scm_proto::duration::MAX_DURATION`]), shared with the Security server.
pub use scm_proto::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }
}
