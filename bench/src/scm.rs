//! scm's side: the Security server (development certificates, a user, the resources, an app, a
//! logged-in device) in the back-end namespace, and scm-proxy under test in the proxy namespace.
//! Everything is done through the binaries' own command lines (`scm-security`, `scm-device`,
//! `scm-proxy`), as an operator would.

use std::fs;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use scm_bench::load::{LoadSpec, Mode, Proto, ScmCredentials};

use crate::sut::{AuthUpstream, Certs, Proc, port, wait_listening, wait_ss};
use crate::topology::{BE_ADDR, DUT_ADDR, Topology};

/// Path of the Security server's forward-auth endpoint (nginx's auth_request).
pub const NGINX_AUTH_PATH: &str = "/v1/auth/forward";
const DEVICE_API_PORT: u16 = 8443;
const PROXY_API_PORT: u16 = 8444;
/// The forward-auth listener (mutual TLS; nginx presents the dev certificates' proxy-client).
const FORWARD_AUTH_PORT: u16 = 8446;
/// Forward-auth requests/s allowed, per source and overall: far above what one CPU answers, so
/// the benchmark measures nginx + auth_request, not the limiter.
const FORWARD_AUTH_RATE: &str = "10000000";
const USER: &str = "bench";
const PASSWORD: &str = "bench-password-1";
const APP: &str = "bench";
const APP_VERSION: &str = "1.0.0";

/// Resources the bench asks for.
pub mod resource {
    /// http mode to the back end's nginx.
    pub const HTTP: &str = "web";
    /// tcp mode to the back end's nginx (small requests through a tunnel).
    pub const TUNNEL_HTTP: &str = "web-tcp";
    /// tcp mode to the bulk back end.
    pub const TUNNEL_BULK: &str = "bulk";
}

fn bin(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} not found (build it with cargo build --release)",
            p.display()
        );
    }
    Ok(p)
}

fn run_ok(what: &str, cmd: &mut Command, stdin: Option<&str>) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: starting {cmd:?}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The running Security server and the device session the load generator uses.
#[derive(Debug)]
pub struct Security {
    _proc: Proc,
    certs: PathBuf,
    creds: ScmCredentials,
    nginx_auth: bool,
}

impl Security {
    /// Starts scm-security in the back-end namespace (CPU 1), configures it, and logs a device in.
    pub fn start(topo: &Topology, bin_dir: &Path, work: &Path) -> Result<Self> {
        let security = bin(bin_dir, "scm-security")?;
        let device = bin(bin_dir, "scm-device")?;
        let sec = security.to_string_lossy().into_owned();
        let certs = work.join("security-certs");
        let data = work.join("security-data");
        fs::create_dir_all(&data)?;
        run_ok(
            "scm-security dev-certs",
            Command::new(&security)
                .args(["dev-certs", "--out"])
                .arg(&certs)
                .args(["--san", BE_ADDR]),
            None,
        )?;
        let mut proc = Proc::spawn(
            "scm-security",
            topo.pinned(&topo.be, "1", &sec)
                .arg("serve")
                .arg("--data-dir")
                .arg(&data)
                .arg("--tls-cert")
                .arg(certs.join("security.pem"))
                .arg("--tls-key")
                .arg(certs.join("security.key"))
                .arg("--client-ca")
                .arg(certs.join("ca.pem"))
                .args(["--listen", &format!("{BE_ADDR}:{DEVICE_API_PORT}")])
                .args(["--proxy-listen", &format!("{BE_ADDR}:{PROXY_API_PORT}")])
                .args(["--admin-listen", "127.0.0.1:8445"])
                .args([
                    "--forward-auth-listen",
                    &format!("{BE_ADDR}:{FORWARD_AUTH_PORT}"),
                ])
                .args(["--forward-auth-rate-per-source", FORWARD_AUTH_RATE])
                .args(["--forward-auth-rate", FORWARD_AUTH_RATE])
                .env("RUST_LOG", "warn"),
            work.join("security.log"),
        )?;
        wait_listening(&topo.be, 8445, &mut proc, Duration::from_secs(30))?;
        for port in [DEVICE_API_PORT, FORWARD_AUTH_PORT] {
            wait_listening(&topo.be, port, &mut proc, Duration::from_secs(10))?;
        }
        let admin = |args: &[&str], stdin: Option<&str>| -> Result<String> {
            let mut cmd = topo.exec(&topo.be, &sec);
            cmd.arg("admin")
                .arg("--ca")
                .arg(certs.join("ca.pem"))
                .arg("--token-file")
                .arg(data.join("admin.token"))
                .args(args);
            run_ok(
                &format!("scm-security admin {}", args.join(" ")),
                &mut cmd,
                stdin,
            )
        };
        admin(
            &[
                "users",
                "add",
                USER,
                "--groups",
                "staff",
                "--password-stdin",
            ],
            Some(&format!("{PASSWORD}\n")),
        )?;
        for (name, to, mode) in [
            (resource::HTTP, port::BACKEND_HTTP, "http"),
            (resource::TUNNEL_HTTP, port::BACKEND_HTTP, "tcp"),
            (resource::TUNNEL_BULK, port::BACKEND_BULK, "tcp"),
        ] {
            admin(
                &[
                    "resources",
                    "set",
                    name,
                    "--address",
                    &format!("{BE_ADDR}:{to}"),
                    "--mode",
                    mode,
                    "--groups",
                    "staff",
                ],
                None,
            )?;
        }
        admin(
            &[
                "sites",
                "set",
                "main",
                "--proxy-url",
                &format!("{DUT_ADDR}:{}", port::SCM),
            ],
            None,
        )?;
        let package = work.join("bench-app.apk");
        fs::write(&package, b"scm-bench placeholder package\n")?;
        admin(
            &[
                "apps",
                "publish",
                APP,
                APP_VERSION,
                "android",
                &package.to_string_lossy(),
            ],
            None,
        )?;
        let state = work.join("device.json");
        let dev = device.to_string_lossy().into_owned();
        run_ok(
            "scm-device enroll",
            topo.exec(&topo.be, &dev)
                .arg("--state")
                .arg(&state)
                .args([
                    "enroll",
                    "--security-url",
                    &format!("https://{BE_ADDR}:{DEVICE_API_PORT}"),
                    "--ca",
                ])
                .arg(certs.join("ca.pem"))
                .args([
                    "--user",
                    USER,
                    "--password",
                    PASSWORD,
                    "--device-id",
                    "bench-device-1",
                    "--app-id",
                    APP,
                    "--app-version",
                    APP_VERSION,
                ]),
            None,
        )?;
        run_ok(
            "scm-device login",
            topo.exec(&topo.be, &dev).arg("--state").arg(&state).args([
                "login",
                "--password",
                PASSWORD,
            ]),
            None,
        )?;
        let creds = read_device_state(&fs::read_to_string(&state)?)?;
        let mut s = Self {
            _proc: proc,
            certs,
            creds,
            nginx_auth: false,
        };
        s.nginx_auth = s.probe_nginx_auth(topo, work)?;
        Ok(s)
    }

    /// nginx's client certificate for the forward-auth listener (the dev CA signs it, and the
    /// listener trusts --client-ca by default).
    fn client_identity(&self) -> (PathBuf, PathBuf) {
        (
            self.certs.join("proxy-client.pem"),
            self.certs.join("proxy-client.key"),
        )
    }

    /// Asks the forward-auth endpoint once, with the live session and nginx's client
    /// certificate, from the back-end namespace.
    fn probe_nginx_auth(&self, topo: &Topology, _work: &Path) -> Result<bool> {
        let spec = LoadSpec {
            addr: SocketAddr::new(BE_ADDR.parse()?, FORWARD_AUTH_PORT),
            server_name: "localhost".into(),
            ca_pem: Some(self.certs.join("ca.pem")),
            proto: Proto::Tls,
            path: NGINX_AUTH_PATH.into(),
            authorization: Some(format!("Bearer {}", self.creds.session_id)),
            client_identity: Some(self.client_identity()),
            mode: Mode::Connect {
                concurrency: 1,
                secs: 5.0,
                max_connections: 1,
                resume: false,
            },
        };
        let exe = std::env::current_exe()?;
        let out = run_ok(
            "probing the nginx auth endpoint",
            topo.exec(&topo.be, &exe.to_string_lossy()).args([
                "load",
                "--spec",
                &serde_json::to_string(&spec)?,
            ]),
            None,
        )?;
        let result: scm_bench::load::LoadResult =
            serde_json::from_str(out.lines().last().unwrap_or_default())?;
        Ok(result.ok == 1)
    }

    /// How nginx reaches the forward-auth endpoint, if it answered the probe.
    pub fn nginx_auth(&self) -> Option<AuthUpstream> {
        let (client_cert, client_key) = self.client_identity();
        self.nginx_auth.then(|| AuthUpstream {
            addr: format!("{BE_ADDR}:{FORWARD_AUTH_PORT}"),
            path: NGINX_AUTH_PATH.into(),
            ca: self.certs.join("ca.pem"),
            name: "localhost".into(),
            client_cert,
            client_key,
        })
    }

    /// The device's session id (nginx gets it as a bearer token).
    pub fn session_id(&self) -> &str {
        &self.creds.session_id
    }
}

/// Reads the session and app context from scm-device's state file.
pub fn read_device_state(text: &str) -> Result<ScmCredentials> {
    let v: serde_json::Value = serde_json::from_str(text).context("device state is not JSON")?;
    let s = |ptr: &str| -> Result<String> {
        v.pointer(ptr)
            .and_then(|x| x.as_str())
            .map(str::to_owned)
            .with_context(|| format!("device state has no {ptr}"))
    };
    Ok(ScmCredentials {
        session_id: s("/session/session_id")?,
        session_key: s("/session/session_key")?,
        // scm-device flattens the device config into the enrollment.
        app_id: s("/enrollment/app_id")?,
        app_version: s("/enrollment/app_version")?,
        device_id: s("/enrollment/device_id")?,
    })
}

/// scm-proxy under test.
#[derive(Debug)]
pub struct ScmSut {
    proc: Option<Proc>,
    creds: ScmCredentials,
    /// bpffs directory of the steering programs and maps, removed after the proxy stops.
    pin_dir: Option<PathBuf>,
}

impl Drop for ScmSut {
    fn drop(&mut self) {
        // Stop the supervisor and its worker first; the pins outlive them by design.
        drop(self.proc.take());
        if let Some(dir) = &self.pin_dir {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

impl ScmSut {
    /// Starts scm-proxy in the proxy namespace on CPU 0 with the benchmark certificate; with
    /// `steer`, as a supervisor with one worker behind the XDP and sk_lookup steering, its
    /// programs pinned under that bpffs directory. `tls_path` is `--tls-path` (`userspace`, or
    /// `ktls` where the kernel has TLS).
    pub fn start(
        topo: &Topology,
        bin_dir: &Path,
        work: &Path,
        certs: &Certs,
        sec: &Security,
        steer: Option<PathBuf>,
        tls_path: &str,
    ) -> Result<Self> {
        let proxy = bin(bin_dir, "scm-proxy")?;
        let mut cmd = if steer.is_some() {
            topo.pinned_with_bpffs(&topo.dut, "0", &proxy.to_string_lossy())
        } else {
            topo.pinned(&topo.dut, "0", &proxy.to_string_lossy())
        };
        if let Some(pin) = &steer {
            cmd.args([
                "serve",
                "--workers",
                "1",
                "--steer-iface",
                "d0",
                // The load generator is one address opening thousands of connections per
                // second: the per-source limit (on by default) would measure itself.
                "--conn-rate",
                "0",
                "--pin-dir",
            ])
            .arg(pin);
        } else {
            cmd.arg("serve");
        }
        let mut this = Self {
            proc: None,
            creds: sec.creds.clone(),
            pin_dir: steer,
        };
        let mut proc = Proc::spawn(
            "scm-proxy",
            cmd.args(["--listen", &format!("{DUT_ADDR}:{}", port::SCM)])
                .arg("--tls-cert")
                .arg(&certs.cert)
                .arg("--tls-key")
                .arg(&certs.key)
                .args([
                    "--security-url",
                    &format!("https://{BE_ADDR}:{PROXY_API_PORT}"),
                ])
                .arg("--security-ca")
                .arg(sec.certs.join("ca.pem"))
                .arg("--client-cert")
                .arg(sec.certs.join("proxy-client.pem"))
                .arg("--client-key")
                .arg(sec.certs.join("proxy-client.key"))
                .args(["--tls-path", tls_path, "--max-connections", "30000"])
                .env("RUST_LOG", "warn"),
            work.join(if this.pin_dir.is_some() {
                "scm-proxy-steer.log".to_owned()
            } else {
                format!("scm-proxy-{tls_path}.log")
            }),
        )?;
        let up = if this.pin_dir.is_some() {
            // Steered: the worker listens on loopback and sk_lookup hands it the service port's
            // connections once the supervisor has put its socket in the map.
            let r = wait_ss(
                &topo.dut,
                "src 127.0.0.1",
                &mut proc,
                Duration::from_secs(40),
            );
            std::thread::sleep(Duration::from_secs(2));
            r.and_then(|()| proc.check_alive())
        } else {
            wait_listening(&topo.dut, port::SCM, &mut proc, Duration::from_secs(20))
        };
        this.proc = Some(proc);
        up?;
        Ok(this)
    }

    /// The proxy's pid (the supervisor's when steering; its worker is a child).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, Proc::pid)
    }

    fn proto(&self, resource: &str) -> Proto {
        Proto::Scm {
            creds: self.creds.clone(),
            resource: resource.into(),
        }
    }

    /// The http-mode system: name and protocol.
    pub fn http_target(&self) -> (String, Proto) {
        ("scm-proxy http".into(), self.proto(resource::HTTP))
    }

    /// The tunnel system: name, protocol for small requests, protocol for bulk and idle.
    pub fn tunnel_targets(&self) -> (String, Proto, Proto) {
        (
            "scm-proxy tunnel".into(),
            self.proto(resource::TUNNEL_HTTP),
            self.proto(resource::TUNNEL_BULK),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_state_is_read() {
        let text = r#"{"enrollment":{"security_urls":["https://x"],"ca_file":"ca.pem",
            "device_id":"d1","app_id":"bench","app_version":"1.0.0","platform":"android",
            "username":"bench","key_id":"k","shared_key":"s"},
            "session":{"session_id":"SID","session_key":"KEY","user":"bench","groups":[],
            "site":"main","proxy_urls":[],"idle_timeout_secs":900,"absolute_expires_at":1}}"#;
        let c = read_device_state(text).unwrap();
        assert_eq!(c.session_id, "SID");
        assert_eq!(c.session_key, "KEY");
        assert_eq!(c.device_id, "d1");
        assert_eq!(c.app_version, "1.0.0");
        assert!(read_device_state(r#"{"enrollment":{}}"#).is_err());
    }
}
