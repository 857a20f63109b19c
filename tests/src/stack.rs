//! A whole scm deployment on 127.0.0.1 made of real processes: `scm-security` (fresh SQLite data
//! directory, dev certificates) and `scm-proxy` (mutual TLS to it), plus in-process back ends.
//! Every child is killed (SIGKILL) when the [`Stack`] is dropped; their logs are files in the
//! stack's temporary directory and are printed when a test panics.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use scm_device::{Device, DeviceConfig};

/// The real binaries under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `scm-security`.
    pub security: PathBuf,
    /// `scm-proxy`.
    pub proxy: PathBuf,
    /// `scm-device` (the device CLI).
    pub device: PathBuf,
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// Builds (once per process) and locates `scm-security`, `scm-proxy` and `scm-device`. `SCM_E2E_BIN_DIR` names
/// a directory holding prebuilt ones instead; otherwise `cargo build` runs in the workspace with
/// the caller's target directory (`--release` when `SCM_E2E_PROFILE=release`) and the executables
/// are read off its JSON messages.
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Binaries> = OnceLock::new();
    BINS.get_or_init(|| match locate() {
        Ok(b) => b,
        Err(e) => panic!("cannot build or find scm-security and scm-proxy: {e:#}"),
    })
}

fn locate() -> Result<Binaries> {
    if let Ok(dir) = std::env::var("SCM_E2E_BIN_DIR") {
        let dir = PathBuf::from(dir);
        return Ok(Binaries {
            security: dir.join("scm-security"),
            proxy: dir.join("scm-proxy"),
            device: dir.join("scm-device"),
        });
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build");
    if std::env::var("SCM_E2E_PROFILE").is_ok_and(|p| p == "release") {
        cmd.arg("--release");
    }
    let out = cmd
        .args([
            "-p",
            "scm-security",
            "-p",
            "scm-proxy",
            "-p",
            "scm-device",
            "--bin",
            "scm-security",
            "--bin",
            "scm-proxy",
            "--bin",
            "scm-device",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("cargo build failed ({})", out.status);
    }
    let mut security = None;
    let mut proxy = None;
    let mut device = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (
            msg.pointer("/target/name").and_then(|v| v.as_str()),
            msg.get("executable").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        match name {
            "scm-security" => security = Some(PathBuf::from(exe)),
            "scm-proxy" => proxy = Some(PathBuf::from(exe)),
            "scm-device" => device = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    Ok(Binaries {
        security: security.context("cargo reported no scm-security executable")?,
        proxy: proxy.context("cargo reported no scm-proxy executable")?,
        device: device.context("cargo reported no scm-device executable")?,
    })
}

/// A free TCP port on 127.0.0.1, taken below the kernel's ephemeral range (32768 and up) so that
/// outgoing connections and `:0` listeners of concurrent tests cannot grab it between the check
/// and the child's bind. Each process walks its own stretch of ports.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 600) as u16 * 20,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = if port >= 32_000 {
            20_000 + port % 12_000
        } else {
            port
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A child process killed with SIGKILL on drop.
#[derive(Debug)]
pub struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its stdout and stderr appended to `log`.
    pub fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .env(
                "RUST_LOG",
                std::env::var("SCM_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { name, child, log })
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// An error with the log's tail if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "{} exited ({status}); log:\n{}",
                self.name,
                tail(&self.log, 40)
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Knobs of a test stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// `scm-proxy --cache-ttl`.
    pub cache_ttl: String,
    /// `scm-proxy --preamble-timeout`.
    pub preamble_timeout: String,
    /// `scm-proxy --idle-timeout`.
    pub idle_timeout: String,
    /// Extra `scm-proxy serve` flags.
    pub proxy_args: Vec<String>,
    /// Security URLs the proxy tries before the real one (fail-over tests).
    pub security_urls_before: Vec<String>,
    /// Extra `scm-security serve` flags.
    pub security_args: Vec<String>,
    /// Put a cuttable [`crate::link::Link`] between the proxy and the proxies' API.
    pub cuttable_link: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            cache_ttl: "30s".into(),
            preamble_timeout: "2s".into(),
            idle_timeout: "60s".into(),
            proxy_args: Vec::new(),
            security_urls_before: Vec::new(),
            security_args: Vec::new(),
            cuttable_link: false,
        }
    }
}

/// The password every user of the standard stack has.
pub const PASSWORD: &str = "correct horse battery staple";
/// The app the standard stack publishes.
pub const APP: &str = "mail";
/// Its platform.
pub const PLATFORM: &str = "android";

/// A running deployment.
#[derive(Debug)]
pub struct Stack {
    /// Temporary directory holding certs, data and logs.
    pub dir: tempfile::TempDir,
    /// Certificates from `scm-security dev-certs`.
    pub certs: PathBuf,
    /// Device API address.
    pub device_api: SocketAddr,
    /// Proxies' API address (mutual TLS).
    pub proxy_api: SocketAddr,
    /// Admin API address.
    pub admin_api: SocketAddr,
    /// The proxy's device listener.
    pub proxy_addr: SocketAddr,
    /// The proxy's metrics listener.
    pub metrics_addr: SocketAddr,
    /// The TCP echo back end.
    pub echo: SocketAddr,
    /// The HTTP back end.
    pub http: SocketAddr,
    /// An address nothing listens on (the `dead` resource).
    pub dead: SocketAddr,
    /// The cuttable link to the proxies' API, with [`StackOptions::cuttable_link`].
    pub link: Option<crate::link::Link>,
    opts: StackOptions,
    security: Option<Proc>,
    proxy: Option<Proc>,
    _slot: tokio::sync::SemaphorePermit<'static>,
}

/// At most this many stacks run at once in one process, so a test binary's parallel tests do not
/// starve each other's timing checks on a small machine.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(3);

impl Stack {
    /// Starts Security server, back ends and proxy, and fills the catalog: users `alice` (group
    /// `staff`) and `bob` (group `contractors`); resources `echo` (tcp), `web` (http), `dead`
    /// (tcp, nothing listening), `secret` (tcp, group `admins`); app `mail` 1.0.0 and 1.1.0 for
    /// android; site `main` with this proxy.
    pub async fn start(opts: StackOptions) -> Result<Self> {
        let bins = tokio::task::spawn_blocking(binaries).await?;
        let slot = SLOTS.acquire().await?;
        let dir = tempfile::Builder::new().prefix("scm-e2e-").tempdir()?;
        let certs = dir.path().join("certs");
        run(Command::new(&bins.security)
            .arg("dev-certs")
            .arg("--out")
            .arg(&certs))?;
        run(Command::new(&bins.security)
            .arg("init")
            .arg("--data-dir")
            .arg(dir.path().join("data")))?;
        let echo = crate::backend::echo().await?;
        let http = crate::backend::http().await?;
        let mut stack = Self {
            certs,
            device_api: local(free_port()),
            proxy_api: local(free_port()),
            admin_api: local(free_port()),
            proxy_addr: local(free_port()),
            metrics_addr: local(free_port()),
            dead: local(free_port()),
            echo,
            http,
            link: None,
            opts,
            security: None,
            proxy: None,
            _slot: slot,
            dir,
        };
        stack.start_security().await?;
        stack.admin_stdin(
            &[
                "users",
                "add",
                "alice",
                "--groups",
                "staff",
                "--password-stdin",
            ],
            PASSWORD,
        )?;
        stack.admin_stdin(
            &[
                "users",
                "add",
                "bob",
                "--groups",
                "contractors",
                "--password-stdin",
            ],
            PASSWORD,
        )?;
        let (e, h, d) = (
            stack.echo.to_string(),
            stack.http.to_string(),
            stack.dead.to_string(),
        );
        stack.admin(&[
            "resources",
            "set",
            "echo",
            "--address",
            &e,
            "--mode",
            "tcp",
            "--groups",
            "staff,contractors",
        ])?;
        stack.admin(&[
            "resources",
            "set",
            "web",
            "--address",
            &h,
            "--mode",
            "http",
            "--groups",
            "staff",
        ])?;
        stack.admin(&[
            "resources",
            "set",
            "dead",
            "--address",
            &d,
            "--mode",
            "tcp",
            "--groups",
            "staff",
        ])?;
        stack.admin(&[
            "resources",
            "set",
            "secret",
            "--address",
            &e,
            "--mode",
            "tcp",
            "--groups",
            "admins",
        ])?;
        let p = stack.proxy_addr.to_string();
        stack.admin(&["sites", "set", "main", "--proxy-url", &p])?;
        stack.publish("1.0.0", b"mail package 1.0.0")?;
        stack.publish("1.1.0", b"mail package 1.1.0, newer")?;
        if stack.opts.cuttable_link {
            stack.link = Some(crate::link::Link::start(stack.proxy_api).await?);
        }
        stack.start_proxy().await?;
        Ok(stack)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts (or restarts, on the same data and ports) the Security server and waits for it.
    pub async fn start_security(&mut self) -> Result<()> {
        let bins = binaries();
        let data = self.path("data");
        let mut cmd = Command::new(&bins.security);
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .arg("--tls-cert")
            .arg(self.certs.join("security.pem"))
            .arg("--tls-key")
            .arg(self.certs.join("security.key"))
            .arg("--client-ca")
            .arg(self.certs.join("ca.pem"))
            .arg("--listen")
            .arg(self.device_api.to_string())
            .arg("--proxy-listen")
            .arg(self.proxy_api.to_string())
            .arg("--admin-listen")
            .arg(self.admin_api.to_string())
            .arg("--heartbeat-interval")
            .arg("1s")
            .args(&self.opts.security_args);
        let proc = Proc::spawn("scm-security", &mut cmd, self.path("security.log"))?;
        self.security = Some(proc);
        let addrs = [self.device_api, self.proxy_api, self.admin_api];
        for addr in addrs {
            self.wait_port(addr, true).await?;
        }
        Ok(())
    }

    /// The Security server's process (for signals).
    pub fn security_proc(&mut self) -> Option<&mut Proc> {
        self.security.as_mut()
    }

    /// The proxy's process (for signals).
    pub fn proxy_proc(&mut self) -> Option<&mut Proc> {
        self.proxy.as_mut()
    }

    /// Kills the Security server with SIGKILL.
    pub fn kill_security(&mut self) {
        if let Some(mut p) = self.security.take() {
            p.kill();
        }
    }

    /// Starts the proxy and waits until its revocation stream is up.
    pub async fn start_proxy(&mut self) -> Result<()> {
        let bins = binaries();
        let mut cmd = Command::new(&bins.proxy);
        cmd.arg("serve");
        for url in &self.opts.security_urls_before {
            cmd.arg("--security-url").arg(url);
        }
        cmd.arg("--listen")
            .arg(self.proxy_addr.to_string())
            .arg("--tls-cert")
            .arg(self.certs.join("proxy.pem"))
            .arg("--tls-key")
            .arg(self.certs.join("proxy.key"))
            .arg("--security-url")
            .arg(format!(
                "https://{}",
                self.link.as_ref().map_or(self.proxy_api, |l| l.addr())
            ))
            .arg("--security-ca")
            .arg(self.certs.join("ca.pem"))
            .arg("--client-cert")
            .arg(self.certs.join("proxy-client.pem"))
            .arg("--client-key")
            .arg(self.certs.join("proxy-client.key"))
            .arg("--metrics-listen")
            .arg(self.metrics_addr.to_string())
            .arg("--cache-ttl")
            .arg(&self.opts.cache_ttl)
            .arg("--preamble-timeout")
            .arg(&self.opts.preamble_timeout)
            .arg("--idle-timeout")
            .arg(&self.opts.idle_timeout)
            .args(&self.opts.proxy_args);
        let proc = Proc::spawn("scm-proxy", &mut cmd, self.path("proxy.log"))?;
        self.proxy = Some(proc);
        self.wait_port(self.proxy_addr, false).await?;
        self.wait_metric(
            "scm_proxy_revocation_stream_up",
            1.0,
            Duration::from_secs(20),
        )
        .await
    }

    async fn wait_port(&mut self, addr: SocketAddr, security: bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            let proc = if security {
                &mut self.security
            } else {
                &mut self.proxy
            };
            if let Some(p) = proc {
                p.check_alive()?;
            }
            if Instant::now() > deadline {
                bail!("nothing listens on {addr} after 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `scm-security admin ARGS`, returning its standard output.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        self.admin_stdin(args, "")
    }

    /// Runs `scm-security admin ARGS` with `stdin` as standard input.
    pub fn admin_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        let mut child = Command::new(&binaries().security)
            .arg("admin")
            .arg("--url")
            .arg(format!("https://{}", self.admin_api))
            .arg("--ca")
            .arg(self.certs.join("ca.pem"))
            .arg("--token-file")
            .arg(self.path("data").join("admin.token"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(stdin.as_bytes())?;
            i.write_all(b"\n")?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "scm-security admin {}: {}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Publishes a package of the app `mail` for android.
    pub fn publish(&self, version: &str, contents: &[u8]) -> Result<()> {
        let file = self.path(&format!("mail-{version}.pkg"));
        std::fs::write(&file, contents)?;
        let f = file.to_string_lossy().into_owned();
        self.admin(&["apps", "publish", APP, version, PLATFORM, &f])?;
        Ok(())
    }

    /// The device config for this stack.
    pub fn device_config(&self, device_id: &str, app_version: &str) -> DeviceConfig {
        DeviceConfig {
            security_urls: vec![format!("https://{}", self.device_api)],
            ca_file: self.certs.join("ca.pem"),
            device_id: device_id.into(),
            app_id: APP.into(),
            app_version: app_version.into(),
            platform: PLATFORM.into(),
        }
    }

    /// Enrolls `user` on a new device running app version `app_version`.
    pub async fn enroll(&self, user: &str, device_id: &str, app_version: &str) -> Result<Device> {
        Ok(Device::enroll(
            self.device_config(device_id, app_version),
            user,
            PASSWORD,
            None,
        )
        .await?)
    }

    /// The proxy's metrics text.
    pub async fn metrics(&self) -> Result<String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(self.metrics_addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: metrics\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// The value of a metric line (`name` or `name{labels}`), 0 if absent.
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix(series))
            .filter_map(|rest| rest.strip_prefix(' '))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .next()
            .unwrap_or(0.0))
    }

    /// Waits until a metric reaches `value`.
    pub async fn wait_metric(&mut self, series: &str, value: f64, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(v) = self.metric(series).await
                && v >= value
            {
                return Ok(());
            }
            if let Some(p) = &mut self.proxy {
                p.check_alive()?;
            }
            if Instant::now() > deadline {
                bail!(
                    "{series} did not reach {value} within {within:?}; proxy log:\n{}",
                    tail(&self.path("proxy.log"), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to 10 s) until a metric drops below `value`.
    pub async fn wait_metric_below(&self, series: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.metric(series).await.is_ok_and(|v| v < value) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{series} stayed at or above {value} for 10 s");
    }

    /// The proxy's log so far.
    pub fn proxy_log(&self) -> String {
        std::fs::read_to_string(self.path("proxy.log")).unwrap_or_default()
    }

    /// The Security server's log so far.
    pub fn security_log(&self) -> String {
        std::fs::read_to_string(self.path("security.log")).unwrap_or_default()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- scm-security log (tail) ----\n{}\n---- scm-proxy log (tail) ----\n{}",
                tail(&self.path("security.log"), 40),
                tail(&self.path("proxy.log"), 40)
            );
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
