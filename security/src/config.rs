//! The command line: every flag (with its `SCM_...` environment twin) and subcommand of
//! `scm-security`. Nothing else in the crate reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

const TOP_HELP: &str = "\
Examples:
  # A development CA and certificates for the Security server and the proxies:
  scm-security dev-certs --out ./certs
  # Master key and admin token (serve also creates them on first start if missing):
  scm-security init --data-dir ./data
  # Run it (SQLite file ./data/scm.db is created on first start):
  scm-security serve --data-dir ./data --tls-cert certs/security.pem --tls-key certs/security.key \\
      --client-ca certs/ca.pem
  # Manage it:
  echo s3cret | scm-security admin --ca certs/ca.pem --token-file data/admin.token \\
      users add alice --groups staff --password-stdin";

/// scm Security server: directory, device enrollment, sessions, app distribution and the proxies' API.
#[derive(Debug, Parser)]
#[command(name = "scm-security", version, after_help = TOP_HELP)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Security server: the device API, the proxies' API (mutual TLS) and the admin API.
    Serve(Box<ServeArgs>),
    /// Create the master key file and the admin token file (0600), refusing to overwrite them.
    Init(InitArgs),
    /// Make a development CA (ECDSA P-256) and leaf certificates for the Security server and proxies.
    DevCerts(DevCertsArgs),
    /// Manage a running server through its admin API.
    Admin(AdminArgs),
    /// Write a consistent snapshot of the database (and app packages) into a new folder.
    Backup(BackupArgs),
    /// Restore a snapshot into a fresh instance (empty database, same master key file).
    Restore(RestoreArgs),
    /// Man pages, shell completions, the unit's EnvironmentFile (`cargo xtask package`).
    #[command(hide = true, subcommand)]
    Generate(scm_proto::cli::Generate),
}

/// Flags of `scm-security backup`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Writes one NDJSON file per table, the app packages, manifest.json (time, schema version, row
counts, sha256 of every file) and manifest.mac (HMAC-SHA256 of the manifest under a key derived
from the master key) into --out, which must be missing or empty; folders 0700, files 0600. Safe
while `serve` runs, on a primary or a hot standby. Shared keys stay sealed under the master key:
back the master key file up separately (a restore needs it, also to check the MAC).

Example:
  scm-security backup --data-dir ./data --out /backups/scm-$(date +%F)")]
pub struct BackupArgs {
    /// Data directory of the instance (its SQLite file and app packages).
    #[arg(long, env = "SCM_DATA_DIR", default_value = "scm-data")]
    pub data_dir: PathBuf,
    /// Database URL (default: the SQLite file DATA_DIR/scm.db).
    #[arg(long, env = "SCM_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Folder to write the snapshot into (created; must be empty).
    #[arg(long)]
    pub out: PathBuf,
    /// The instance's master key, which authenticates the snapshot. Default: DATA_DIR/master.key.
    #[arg(long, env = "SCM_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
}

/// Flags of `scm-security restore`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Checks the manifest's MAC under the master key (a snapshot without manifest.mac is refused
unless --allow-unauthenticated), the manifest (format, schema version, file names), the size
and sha256 of every file, every row's fields as the admin API would check them, and that the
master key opens every sealed key of the snapshot; refuses a database that is not empty; then
loads everything in one transaction and writes the packages into DATA_DIR/apps (0700, files
0600). Put the master key file of the backed-up instance in place first (default
DATA_DIR/master.key, mode 0600).

Example:
  scm-security restore --from /backups/scm-backup-1764000000-042 --data-dir ./data")]
pub struct RestoreArgs {
    /// Snapshot folder (holding manifest.json).
    #[arg(long)]
    pub from: PathBuf,
    /// Data directory of the new instance (created if missing).
    #[arg(long, env = "SCM_DATA_DIR", default_value = "scm-data")]
    pub data_dir: PathBuf,
    /// Database URL of the new instance (default: the SQLite file DATA_DIR/scm.db).
    #[arg(long, env = "SCM_DATABASE_URL")]
    pub database_url: Option<String>,
    /// The master key of the instance that was backed up. Default: DATA_DIR/master.key.
    #[arg(long, env = "SCM_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Restore a snapshot that has no manifest.mac (written before snapshots were
    /// authenticated). Its files and rows are still checked, but a tampered manifest cannot be
    /// told apart: use it only for a snapshot kept where no one else could write.
    #[arg(long)]
    pub allow_unauthenticated: bool,
}

const SERVE_HELP: &str = "\
Listeners:
  --listen        device API (HTTPS): enroll, challenge, login, logout, app updates and downloads
  --proxy-listen  proxies' API (HTTPS, client certificate from --client-ca required)
  --admin-listen  admin API (HTTPS, bearer token from --admin-token-file); keep it on loopback
  --forward-auth-listen  off unless given: nginx auth_request (HTTPS, client certificate from
                  --forward-auth-client-ca, default --client-ca, required); rate-limited

Files created on first start if missing (mode 0600): the master key (32 random bytes, base64)
and the admin token. Shared keys are stored AES-256-GCM encrypted under the master key: losing
the master key means every device must enroll again.

Durations are written like 500ms, 30s, 15m, 12h, 1d.

Example:
  scm-security serve --data-dir ./data --tls-cert certs/security.pem --tls-key certs/security.key \\
      --client-ca certs/ca.pem --session-idle-timeout 15m --session-max-lifetime 12h
  # PostgreSQL instead of the SQLite file:
  scm-security serve ... --database-url postgres://scm:pw@127.0.0.1/scm";

/// Flags of `scm-security serve`.
#[derive(Debug, Clone, Args)]
#[command(after_help = SERVE_HELP)]
pub struct ServeArgs {
    /// Directory for the SQLite database, app packages, and (by default) the key and token files.
    #[arg(long, env = "SCM_DATA_DIR", default_value = "scm-data")]
    pub data_dir: PathBuf,

    /// Database URL: `sqlite://PATH` or `postgres://USER:PASS@HOST:PORT/DB`.
    /// Default: the SQLite file DATA_DIR/scm.db, created on first start.
    #[arg(long, env = "SCM_DATABASE_URL")]
    pub database_url: Option<String>,

    /// File holding the master key (base64 of 32 bytes). Default: DATA_DIR/master.key.
    #[arg(long, env = "SCM_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,

    /// File holding the admin API's bearer token. Default: DATA_DIR/admin.token.
    #[arg(long, env = "SCM_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// PEM certificate chain of this server (device and admin listeners, the proxies' one and
    /// forward-auth). SIGHUP reads it, --tls-key, --client-ca and the CRLs again: new handshakes
    /// get them, open connections are kept; a bad file is refused and the old ones stay.
    #[arg(long, env = "SCM_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "SCM_TLS_KEY")]
    pub tls_key: PathBuf,

    /// PEM CA certificate(s) that sign the proxies' client certificates.
    #[arg(long, env = "SCM_CLIENT_CA")]
    pub client_ca: PathBuf,

    /// Address of the device API.
    #[arg(long, env = "SCM_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,

    /// Address of the proxies' API (mutual TLS).
    #[arg(long, env = "SCM_PROXY_API_LISTEN", default_value = "127.0.0.1:8444")]
    pub proxy_listen: SocketAddr,

    /// Address of the admin API.
    #[arg(long, env = "SCM_ADMIN_LISTEN", default_value = "127.0.0.1:8445")]
    pub admin_listen: SocketAddr,

    /// A session ends after this long without activity (login or validation).
    #[arg(long, env = "SCM_SESSION_IDLE_TIMEOUT", default_value = "15m", value_parser = parse_duration)]
    pub session_idle_timeout: Duration,

    /// A session ends this long after login, whatever its activity.
    #[arg(long, env = "SCM_SESSION_MAX_LIFETIME", default_value = "12h", value_parser = parse_duration)]
    pub session_max_lifetime: Duration,

    /// At most this many live sessions; logins beyond it are refused (503).
    #[arg(long, env = "SCM_MAX_SESSIONS", default_value_t = 1_000_000)]
    pub max_sessions: usize,

    /// How long a login challenge stays usable (each serves one login attempt).
    #[arg(long, env = "SCM_CHALLENGE_TTL", default_value = "60s", value_parser = parse_duration)]
    pub challenge_ttl: Duration,

    /// Failed logins in a row after which a user is locked out.
    #[arg(long, env = "SCM_LOCKOUT_THRESHOLD", default_value_t = 5)]
    pub lockout_threshold: u32,

    /// How long a lockout lasts (admin `users unlock` ends it early).
    #[arg(long, env = "SCM_LOCKOUT_DURATION", default_value = "15m", value_parser = parse_duration)]
    pub lockout_duration: Duration,

    /// Failed logins or enrollments from one source address per --source-window before that
    /// address is refused (429) until the window passes.
    #[arg(long, env = "SCM_SOURCE_FAILURE_LIMIT", default_value_t = 30)]
    pub source_failure_limit: u32,

    /// Window of --source-failure-limit.
    #[arg(long, env = "SCM_SOURCE_WINDOW", default_value = "5m", value_parser = parse_duration)]
    pub source_window: Duration,

    /// Challenges one source address may ask for per minute (0: no limit). Challenges are
    /// stateless (a MAC'd id carrying its expiry), so asking for many stores nothing.
    #[arg(long, env = "SCM_CHALLENGE_RATE_LIMIT", default_value_t = 600)]
    pub challenge_rate_limit: u32,

    /// A user's failures are forgotten this long after the first of them when no lockout
    /// followed (failures decay instead of adding up for ever).
    #[arg(long, env = "SCM_LOCKOUT_WINDOW", default_value = "15m", value_parser = parse_duration)]
    pub lockout_window: Duration,

    /// Every per-source limit (failures, challenges, connections) counts an IPv6 source by this
    /// prefix length: one customer usually holds a whole /64. IPv4 sources count by address.
    #[arg(long, env = "SCM_SOURCE_PREFIX_V6", default_value_t = 64,
          value_parser = clap::value_parser!(u8).range(1..=128))]
    pub source_prefix_v6: u8,

    /// Password checks (argon2id, ~19 MiB each) waiting for a hashing slot beyond which new
    /// logins and enrollments are answered 503 busy instead of queueing without bound.
    #[arg(long, env = "SCM_MAX_HASH_QUEUE", default_value_t = 64)]
    pub max_hash_queue: usize,

    /// Open connections one source (IPv6 by --source-prefix-v6) may hold on each listener;
    /// more are closed at accept. Sized for a carrier NAT with many phones behind one address.
    #[arg(long, env = "SCM_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_source: u32,

    /// A connection (HTTP/1.1 or HTTP/2) with no request or response in progress for this long
    /// is closed. Covers a TLS connection that never sends a request, too.
    #[arg(long, env = "SCM_CONNECTION_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub connection_idle_timeout: Duration,

    /// Require an admin-issued activation code (`admin users activation-code`) to enroll.
    #[arg(long, env = "SCM_REQUIRE_ACTIVATION_CODE")]
    pub require_activation_code: bool,

    /// Site of users created without one, and of LDAP users.
    #[arg(long, env = "SCM_DEFAULT_SITE", default_value = "main")]
    pub default_site: String,

    /// Interval of heartbeat lines on the revocation stream.
    #[arg(long, env = "SCM_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Largest app package accepted by `admin apps publish`, in bytes.
    #[arg(long, env = "SCM_MAX_PACKAGE_BYTES", default_value_t = 1 << 30)]
    pub max_package_bytes: u64,

    /// Time a client has for each step: TLS handshake, request headers, request body. Slower
    /// clients are disconnected (or answered 408 for a slow body).
    #[arg(long, env = "SCM_IO_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub io_timeout: Duration,

    /// On SIGTERM or SIGINT, how long requests in progress may take to finish. The listeners
    /// close at once (a balancer's next connect fails fast), idle connections close, the
    /// revocation streams end (proxies move to another Security server); what is still open
    /// after this is closed, and the process exits 0. Keep a service manager's stop timeout
    /// (systemd TimeoutStopSec) above it.
    #[arg(long, env = "SCM_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// `--log-json`, `--log-level`.
    #[command(flatten)]
    pub log: scm_proto::ops::logs::LogArgs,

    /// Folder of the scheduled backups. Default: DATA_DIR/backups.
    #[arg(long, env = "SCM_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,

    /// Time between scheduled backups (0: no scheduled backups).
    #[arg(long, env = "SCM_BACKUP_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub backup_interval: Duration,

    /// Scheduled snapshots kept; older ones are deleted after each successful run.
    #[arg(long, env = "SCM_BACKUP_KEEP", default_value_t = 12)]
    pub backup_keep: usize,

    /// Address of the ops listener (plain HTTP): GET /metrics (Prometheus: logins, validations,
    /// sessions, backups, database role, replication), /ready (the store answers, every listener
    /// accepts, not draining; 503 naming the failing check), /live. Off by default; keep it on
    /// loopback or a management network.
    #[arg(long, env = "SCM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Enrollment waits until a synchronous PostgreSQL standby has applied the new key
    /// (synchronous_commit = remote_apply); refused with 503 no_sync_standby when none streams.
    #[arg(long, env = "SCM_REQUIRE_SYNC_COMMIT")]
    pub require_sync_commit: bool,

    /// Longest wait for the synchronous standby's confirmation of an enrollment.
    #[arg(long, env = "SCM_SYNC_COMMIT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub sync_commit_timeout: Duration,

    /// How often the database's role (primary or read-only standby) and replication are checked.
    #[arg(long, env = "SCM_ROLE_CHECK_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub role_check_interval: Duration,

    /// Replay lag (WAL bytes) of a standby above which the primary logs a warning.
    #[arg(long, env = "SCM_REPLICATION_LAG_WARN", default_value_t = 16 << 20)]
    pub replication_lag_warn: i64,

    /// LDAP directory settings (optional).
    #[command(flatten)]
    pub ldap: LdapArgs,

    /// A proxy allowed on the proxies' API, named by its client certificate: `dns:NAME` or
    /// `ip:ADDRESS` (a subject alternative name) or `cn:COMMON NAME` (the subject), optionally
    /// `@SITE` to let it validate only sessions of that site (repeat for more sites).
    /// Repeatable; checked on every request. Without any, every certificate from --client-ca
    /// is a proxy (a start-up warning says so).
    #[arg(long = "proxy-allow", env = "SCM_PROXY_ALLOW", value_delimiter = ',')]
    pub proxy_allow: Vec<String>,

    /// PEM file of certificate revocation lists (CRLs) from the --client-ca CAs: a proxy
    /// certificate revoked there is refused at the TLS handshake. Repeatable; read at start
    /// and again on SIGHUP (new handshakes check the new lists).
    #[arg(long = "client-crl", env = "SCM_CLIENT_CRL", value_delimiter = ',')]
    pub client_crl: Vec<PathBuf>,

    /// Forward authentication for a reverse proxy such as nginx (off by default).
    #[command(flatten)]
    pub forward_auth: ForwardAuthArgs,

    /// Identity assertions (signed JWTs for http back ends).
    #[command(flatten)]
    pub assertion: AssertionArgs,
}

/// Forward-auth flags: a mutual-TLS listener where a reverse proxy (nginx `auth_request`) asks
/// whose session a bearer token is. Off unless --forward-auth-listen is given.
#[derive(Debug, Clone, Args)]
pub struct ForwardAuthArgs {
    /// Address of the forward-auth listener (HTTPS, client certificate required), serving
    /// GET /v1/auth/forward: bearer session id -> 200 with x-scm-user, x-scm-groups, ... or 401.
    /// Off when absent. Its answers never count as session activity.
    #[arg(long, env = "SCM_FORWARD_AUTH_LISTEN")]
    pub forward_auth_listen: Option<SocketAddr>,

    /// PEM CA certificate(s) that sign the reverse proxies' client certificates. Default:
    /// --client-ca, the proxies' CA (then a certificate from it opens both APIs: give the
    /// reverse proxies a CA of their own).
    #[arg(
        long,
        env = "SCM_FORWARD_AUTH_CLIENT_CA",
        requires = "forward_auth_listen"
    )]
    pub forward_auth_client_ca: Option<PathBuf>,

    /// Forward-auth requests per second from one source address (bursts of as many); above it
    /// 429 rate_limited with Retry-After.
    #[arg(
        long,
        env = "SCM_FORWARD_AUTH_RATE_PER_SOURCE",
        default_value_t = 5000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub forward_auth_rate_per_source: u32,

    /// Forward-auth requests per second from all sources together (bursts of as many); keeps
    /// CPU for logins whatever the reverse proxies send.
    #[arg(
        long,
        env = "SCM_FORWARD_AUTH_RATE",
        default_value_t = 20_000,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub forward_auth_rate: u32,
}

/// Identity assertion flags: the ES256 JWTs proxies pass to http back ends in `x-scm-assertion`,
/// verified with the JWK Set at `GET /.well-known/jwks.json` on the device listener.
#[derive(Debug, Clone, Args)]
pub struct AssertionArgs {
    /// Lifetime of an identity assertion (its `exp` - `iat`), 1s to 1h; never past the session's
    /// absolute expiry. Proxies reuse one per (session, resource) until shortly before it ends.
    #[arg(long, env = "SCM_ASSERTION_TTL", default_value = "60s", value_parser = parse_duration)]
    pub assertion_ttl: Duration,

    /// How long one signing key (P-256) signs before a new one takes over. A retired key stays in
    /// the JWK Set until every token it signed has expired, then it is deleted. At least 2s.
    #[arg(long, env = "SCM_ASSERTION_KEY_ROTATION", default_value = "24h", value_parser = parse_duration)]
    pub assertion_key_rotation: Duration,

    /// The `iss` claim of every identity assertion; back ends check it.
    #[arg(long, env = "SCM_ASSERTION_ISSUER", default_value = "scm-security")]
    pub assertion_issuer: String,
}

/// LDAP flags: users authenticate by binding; users and groups are synced periodically.
#[derive(Debug, Clone, Args)]
pub struct LdapArgs {
    /// LDAP server, e.g. ldap://127.0.0.1:389 or ldaps://ldap.example.com. Enables LDAP.
    #[arg(long, env = "SCM_LDAP_URL")]
    pub ldap_url: Option<String>,

    /// DN used to search the directory during sync (anonymous if absent).
    #[arg(long, env = "SCM_LDAP_BIND_DN")]
    pub ldap_bind_dn: Option<String>,

    /// File holding the password of --ldap-bind-dn.
    #[arg(long, env = "SCM_LDAP_BIND_PASSWORD_FILE")]
    pub ldap_bind_password_file: Option<PathBuf>,

    /// Base DN under which users are searched, e.g. ou=people,dc=example,dc=org.
    #[arg(long, env = "SCM_LDAP_USER_BASE")]
    pub ldap_user_base: Option<String>,

    /// Filter selecting user entries.
    #[arg(
        long,
        env = "SCM_LDAP_USER_FILTER",
        default_value = "(objectClass=inetOrgPerson)"
    )]
    pub ldap_user_filter: String,

    /// Attribute holding the user name.
    #[arg(long, env = "SCM_LDAP_USER_ATTR", default_value = "uid")]
    pub ldap_user_attr: String,

    /// Base DN under which groups are searched; without it no groups are synced.
    #[arg(long, env = "SCM_LDAP_GROUP_BASE")]
    pub ldap_group_base: Option<String>,

    /// Filter selecting group entries.
    #[arg(
        long,
        env = "SCM_LDAP_GROUP_FILTER",
        default_value = "(objectClass=groupOfNames)"
    )]
    pub ldap_group_filter: String,

    /// Attribute holding a group's name.
    #[arg(long, env = "SCM_LDAP_GROUP_NAME_ATTR", default_value = "cn")]
    pub ldap_group_name_attr: String,

    /// Attribute of a group listing its members' DNs.
    #[arg(long, env = "SCM_LDAP_MEMBER_ATTR", default_value = "member")]
    pub ldap_member_attr: String,

    /// Interval between syncs of users and groups.
    #[arg(long, env = "SCM_LDAP_SYNC_INTERVAL", default_value = "30m", value_parser = parse_duration)]
    pub ldap_sync_interval: Duration,

    /// Entries per page of the sync's searches (RFC 2696 simple paged results), so a directory
    /// with more users than the server's size limit syncs whole. At most the server's page
    /// limit: Active Directory's MaxPageSize is 1000 by default.
    #[arg(long, env = "SCM_LDAP_PAGE_SIZE", default_value_t = 500,
          value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub ldap_page_size: u16,

    /// PEM CA certificate(s) that sign the LDAP server's certificate (ldaps:// and
    /// --ldap-starttls). Default: the system's trusted roots.
    #[arg(long, env = "SCM_LDAP_CA")]
    pub ldap_ca: Option<PathBuf>,

    /// Upgrade an ldap:// connection with StartTLS before binding (refused if the server does
    /// not offer it).
    #[arg(long, env = "SCM_LDAP_STARTTLS")]
    pub ldap_starttls: bool,

    /// Allow a plain ldap:// URL without StartTLS: user passwords then cross the network in
    /// clear text. Only for a directory on loopback or a test.
    #[arg(long, env = "SCM_LDAP_INSECURE_PLAINTEXT")]
    pub ldap_insecure_plaintext: bool,
}

/// Flags of `scm-security init`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  scm-security init --data-dir ./data\n  \
    # creates ./data/master.key and ./data/admin.token, mode 0600")]
pub struct InitArgs {
    /// Directory for the files (created if missing).
    #[arg(long, env = "SCM_DATA_DIR", default_value = "scm-data")]
    pub data_dir: PathBuf,
    /// Where to write the master key. Default: DATA_DIR/master.key.
    #[arg(long, env = "SCM_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Where to write the admin token. Default: DATA_DIR/admin.token.
    #[arg(long, env = "SCM_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
}

/// Flags of `scm-security dev-certs`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Writes into --out (keys mode 0600):
  ca.pem ca.key                      development CA (trust it in devices, proxies and admin CLI)
  security.pem security.key          Security server certificate (serverAuth)
  proxy.pem proxy.key                proxy certificate for the devices' TLS (serverAuth)
  proxy-client.pem proxy-client.key  proxy client certificate for mutual TLS to the Security server
All leaf certificates name localhost and 127.0.0.1, plus every --san.

Example:
  scm-security dev-certs --out ./certs --san proxy.lan --san 10.0.0.5")]
pub struct DevCertsArgs {
    /// Output directory (created if missing).
    #[arg(long, env = "SCM_DEV_CERTS_OUT")]
    pub out: PathBuf,
    /// Extra subject alternative name (DNS name or IP address) for the leaf certificates.
    #[arg(long = "san")]
    pub sans: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

/// Global flags of `scm-security admin`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Examples:
  export SCM_ADMIN_CA=certs/ca.pem SCM_ADMIN_TOKEN_FILE=data/admin.token
  echo s3cret | scm-security admin users add alice --groups staff,dev --password-stdin
  scm-security admin resources set intranet --address 10.0.0.7:80 --mode http --groups staff
  scm-security admin sites set main --proxy-url 127.0.0.1:9443
  scm-security admin apps publish mail 1.2.0 android ./mail-1.2.0.apk
  scm-security admin sessions list --json")]
pub struct AdminArgs {
    /// Base URL of the admin API.
    #[arg(long, env = "SCM_ADMIN_URL", default_value = "https://127.0.0.1:8445")]
    pub url: String,
    /// PEM CA certificate that signed the server's certificate.
    #[arg(long, env = "SCM_ADMIN_CA")]
    pub ca: PathBuf,
    /// File holding the admin token.
    #[arg(long, env = "SCM_ADMIN_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to manage.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// `scm-security admin` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Local and LDAP users.
    #[command(subcommand)]
    Users(UsersCmd),
    /// Enrolled (user, device, app) triples.
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// Shared keys of enrolled devices.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Live sessions.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// App packages and their update policy.
    #[command(subcommand)]
    Apps(AppsCmd),
    /// The resource catalog.
    #[command(subcommand)]
    Resources(ResourcesCmd),
    /// Sites and their proxies.
    #[command(subcommand)]
    Sites(SitesCmd),
    /// The audit log, newest first.
    Audit {
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The LDAP directory.
    #[command(subcommand)]
    Ldap(LdapCmd),
}

/// `admin users ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum UsersCmd {
    /// List users.
    List,
    /// Add a local user (password read from stdin).
    Add {
        /// User name (letters, digits, `._-`).
        name: String,
        /// Comma-separated groups.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// The user's site (default: the server's --default-site).
        #[arg(long)]
        site: Option<String>,
        /// Read the password from the first line of stdin.
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// Change attributes of a user.
    Update {
        /// User name.
        name: String,
        /// Replace the groups (comma-separated) of a local user.
        #[arg(long, value_delimiter = ',')]
        groups: Option<Vec<String>>,
        /// Move the user to a site.
        #[arg(long)]
        site: Option<String>,
        /// Set a new password, read from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete a user, revoking their keys and sessions.
    Delete {
        /// User name.
        name: String,
    },
    /// Clear a user's lockout.
    Unlock {
        /// User name.
        name: String,
    },
    /// Issue a single-use activation code the user must give when enrolling a device.
    ActivationCode {
        /// User name.
        name: String,
        /// How long the code stays valid.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
}

/// `admin devices ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum DevicesCmd {
    /// List enrollments.
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke every key of a device (and end its sessions).
    Revoke {
        /// Device id.
        device_id: String,
    },
}

/// `admin keys ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysCmd {
    /// List keys (never their value).
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke one key (and end the sessions logged in with it).
    Revoke {
        /// Key id.
        key_id: String,
    },
}

/// `admin sessions ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum SessionsCmd {
    /// List live sessions by tag (ids are never shown).
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
    },
    /// End a session; every proxy hears of it on the revocation stream.
    Revoke {
        /// The session's tag.
        tag: String,
    },
    /// End every session of a user.
    RevokeUser {
        /// User name.
        user: String,
    },
}

/// `admin apps ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum AppsCmd {
    /// List published releases and policies.
    List,
    /// Publish a package file.
    Publish {
        /// App id.
        app_id: String,
        /// Version (dot-separated integers).
        version: String,
        /// Platform, e.g. android or ios.
        platform: String,
        /// The package file.
        file: PathBuf,
    },
    /// Set the update policy: minimum version and revoked versions.
    Policy {
        /// App id.
        app_id: String,
        /// Lowest allowed version ("none" clears it).
        #[arg(long)]
        min_version: Option<String>,
        /// Revoke a version (repeatable).
        #[arg(long = "revoke")]
        revoke: Vec<String>,
        /// Lift a revocation (repeatable).
        #[arg(long = "unrevoke")]
        unrevoke: Vec<String>,
    },
}

/// Relay mode flag.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// Raw bytes.
    Tcp,
    /// HTTP reverse proxy.
    Http,
}

/// `admin resources ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum ResourcesCmd {
    /// List resources.
    List,
    /// Create or replace a resource.
    Set {
        /// Name devices ask for.
        name: String,
        /// Back end host:port.
        #[arg(long)]
        address: String,
        /// Relay mode.
        #[arg(long, value_enum)]
        mode: ModeArg,
        /// Comma-separated groups allowed to use it.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
    },
    /// Delete a resource.
    Delete {
        /// Name.
        name: String,
    },
}

/// `admin sites ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum SitesCmd {
    /// List sites.
    List,
    /// Create or replace a site.
    Set {
        /// Site name.
        name: String,
        /// A proxy of the site, host:port (repeatable, in order of preference).
        #[arg(long = "proxy-url")]
        proxy_urls: Vec<String>,
    },
    /// Delete a site (refused while users belong to it).
    Delete {
        /// Site name.
        name: String,
    },
}

/// `admin ldap ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum LdapCmd {
    /// Sync users and groups from LDAP now.
    Sync,
}

/// The parser of every duration flag (`500ms`, `30s`, `15m`, `12h`, `1d`, a bare number of
/// seconds; at most [`scm_proto::duration::MAX_DURATION`]), shared with the proxy.
pub use scm_proto::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
