//! The systems under test and their helpers: the shared certificate, nginx's configurations (the
//! peer and the back end), and child processes that are stopped on drop.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
};

use crate::topology::{BE_ADDR, DUT_ADDR};

/// The name in the benchmark certificate (the client sends it as SNI).
pub const SERVER_NAME: &str = "bench.scm.test";

/// Ports of the systems under test on [`DUT_ADDR`].
pub mod port {
    /// nginx http with auth_request, no cache.
    pub const NGINX_AUTH: u16 = 8443;
    /// nginx http with auth_request and proxy_cache on the auth location.
    pub const NGINX_AUTH_CACHE: u16 = 8444;
    /// nginx http without auth (floor of an HTTPS reverse proxy).
    pub const NGINX_PLAIN: u16 = 8445;
    /// nginx stream to the bulk back end.
    pub const NGINX_STREAM_BULK: u16 = 8446;
    /// nginx stream to the HTTP back end.
    pub const NGINX_STREAM_HTTP: u16 = 8447;
    /// nginx stream with kernel TLS (`ssl_conf_command Options KTLS`), to the bulk back end.
    pub const NGINX_STREAM_KTLS_BULK: u16 = 8448;
    /// nginx stream with kernel TLS, to the HTTP back end.
    pub const NGINX_STREAM_KTLS_HTTP: u16 = 8449;
    /// scm-proxy.
    pub const SCM: u16 = 9443;
    /// Back end (on BE_ADDR): nginx serving /1k.
    pub const BACKEND_HTTP: u16 = 8080;
    /// Back end (on BE_ADDR): the bulk server.
    pub const BACKEND_BULK: u16 = 9000;
}

/// Files of the benchmark's certificate.
#[derive(Debug, Clone)]
pub struct Certs {
    /// CA certificate (PEM) the client trusts.
    pub ca: PathBuf,
    /// Leaf certificate chain (PEM) every system under test presents.
    pub cert: PathBuf,
    /// Leaf private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// Makes an ECDSA P-256 CA and one leaf for [`SERVER_NAME`] and [`DUT_ADDR`] in `dir`.
pub fn make_certs(dir: &Path) -> Result<Certs> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "scm-bench CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned(), DUT_ADDR.to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    let cert = params.signed_by(&key, &issuer)?;
    let certs = Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    fs::write(&certs.ca, ca_cert.pem())?;
    fs::write(&certs.cert, cert.pem())?;
    fs::write(&certs.key, key.serialize_pem())?;
    Ok(certs)
}

/// How nginx reaches the Security server's forward-auth endpoint.
#[derive(Debug, Clone)]
pub struct AuthUpstream {
    /// `host:port` of the Security server's forward-auth listener (mutual TLS).
    pub addr: String,
    /// Path of the endpoint, e.g. `/v1/auth/forward`.
    pub path: String,
    /// CA (PEM) that signs the Security server's certificate.
    pub ca: PathBuf,
    /// Name to verify in the Security server's certificate.
    pub name: String,
    /// nginx's client certificate (PEM) for the listener.
    pub client_cert: PathBuf,
    /// Its private key (PEM).
    pub client_key: PathBuf,
}

/// Settings every TLS listener of nginx shares: TLS 1.3, X25519, AES-128-GCM, session cache and
/// tickets (so resumption works as it does for scm-proxy).
fn tls_block(certs: &Certs, zone: &str) -> String {
    format!(
        "        ssl_certificate {};\n        ssl_certificate_key {};\n\
         \x20       ssl_protocols TLSv1.3;\n        ssl_ecdh_curve X25519;\n\
         \x20       ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;\n\
         \x20       ssl_session_cache shared:{zone}:64m;\n        ssl_session_tickets on;\n",
        certs.cert.display(),
        certs.key.display(),
    )
}

/// The nginx peer: http with and without auth_request (with and without a cache), and stream.
pub fn nginx_sut_conf(dir: &Path, certs: &Certs, auth: Option<&AuthUpstream>) -> String {
    let d = dir.display();
    let tls = tls_block(certs, "http_tls");
    let stream_tls = tls_block(certs, "stream_tls");
    let mut c = String::new();
    let _ = write!(
        c,
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         daemon off;\nmaster_process on;\nuser root;\nworker_processes 1;\n\
         worker_rlimit_nofile 65536;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 30000; multi_accept on; }}\n\
         http {{\n    access_log off;\n    keepalive_timeout 300s;\n    keepalive_requests 10000000;\n\
         \x20   client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
         \x20   upstream backend {{ server {BE_ADDR}:{}; keepalive 256; keepalive_requests 10000000; }}\n",
        port::BACKEND_HTTP
    );
    let proxy_backend = "            proxy_pass http://backend;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n";
    if let Some(a) = auth {
        let _ = write!(
            c,
            "    upstream security {{ server {}; keepalive 64; }}\n\
             \x20   proxy_cache_path {d}/authcache levels=1 keys_zone=auth:16m max_size=64m inactive=60s;\n",
            a.addr
        );
        for (port, cached) in [(port::NGINX_AUTH, false), (port::NGINX_AUTH_CACHE, true)] {
            let cache = if cached {
                // 30 s: the same freshness scm-proxy's validated-session cache has by default.
                "            proxy_cache auth;\n            proxy_cache_key $http_authorization;\n\
                 \x20           proxy_cache_valid 200 30s;\n            proxy_cache_valid 401 403 1s;\n\
                 \x20           proxy_ignore_headers Cache-Control Expires Set-Cookie;\n"
            } else {
                ""
            };
            let _ = write!(
                c,
                "    server {{\n        listen {DUT_ADDR}:{port} ssl backlog=8192;\n{tls}\
                 \x20       location = /_auth {{\n            internal;\n\
                 \x20           proxy_pass https://security{path};\n\
                 \x20           proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n\
                 \x20           proxy_pass_request_body off;\n            proxy_set_header Content-Length \"\";\n\
                 \x20           proxy_set_header Authorization $http_authorization;\n\
                 \x20           proxy_ssl_server_name on;\n            proxy_ssl_name {name};\n\
                 \x20           proxy_ssl_verify on;\n            proxy_ssl_trusted_certificate {ca};\n\
                 \x20           proxy_ssl_certificate {client_cert};\n\
                 \x20           proxy_ssl_certificate_key {client_key};\n\
                 \x20           proxy_ssl_session_reuse on;\n{cache}        }}\n\
                 \x20       location / {{\n            auth_request /_auth;\n\
                 \x20           auth_request_set $scm_user $upstream_http_x_scm_user;\n\
                 \x20           auth_request_set $scm_groups $upstream_http_x_scm_groups;\n\
                 \x20           proxy_set_header x-scm-user $scm_user;\n\
                 \x20           proxy_set_header x-scm-groups $scm_groups;\n\
                 \x20           proxy_set_header Authorization \"\";\n{proxy_backend}        }}\n    }}\n",
                path = a.path,
                name = a.name,
                ca = a.ca.display(),
                client_cert = a.client_cert.display(),
                client_key = a.client_key.display(),
            );
        }
    }
    let _ = write!(
        c,
        "    server {{\n        listen {DUT_ADDR}:{} ssl backlog=8192;\n{tls}\
         \x20       location / {{\n{proxy_backend}        }}\n    }}\n}}\n\
         stream {{\n",
        port::NGINX_PLAIN
    );
    // The same stream servers again with OpenSSL's kernel TLS: nginx's own kTLS, the fair peer
    // of scm-proxy's. Where the kernel has no TLS OpenSSL silently stays in user space, so they
    // are measured only where it has (the report says so otherwise).
    for (port, to, ktls) in [
        (port::NGINX_STREAM_BULK, port::BACKEND_BULK, ""),
        (port::NGINX_STREAM_HTTP, port::BACKEND_HTTP, ""),
        (
            port::NGINX_STREAM_KTLS_BULK,
            port::BACKEND_BULK,
            "        ssl_conf_command Options KTLS;\n",
        ),
        (
            port::NGINX_STREAM_KTLS_HTTP,
            port::BACKEND_HTTP,
            "        ssl_conf_command Options KTLS;\n",
        ),
    ] {
        let _ = write!(
            c,
            "    server {{\n        listen {DUT_ADDR}:{port} ssl backlog=8192;\n{stream_tls}{ktls}\
             \x20       proxy_pass {BE_ADDR}:{to};\n        proxy_timeout 300s;\n    }}\n"
        );
    }
    c.push_str("}\n");
    c
}

/// The HTTP back end: nginx serving a 1 KiB body at `/1k` over keep-alive.
pub fn nginx_backend_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nuser root;\nworker_processes 1;\n\
         worker_rlimit_nofile 65536;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 30000; multi_accept on; }}\n\
         http {{\n    access_log off;\n    keepalive_timeout 300s;\n    keepalive_requests 10000000;\n\
         \x20   client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
         \x20   server {{\n        listen {BE_ADDR}:{} backlog=8192;\n\
         \x20       location = /1k {{ default_type application/octet-stream; alias {d}/1k.bin; }}\n\
         \x20   }}\n}}\n",
        port::BACKEND_HTTP
    )
}

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its stdout and stderr in `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Self> {
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Its pid (`ip netns exec` and `taskset` exec, so this is the program itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of its log if it has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); end of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// The end of its log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                // SAFETY: kill(2) on the pid of a child we own and have not reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Waits until something in namespace `ns` listens on TCP `port`, or fails after `timeout`.
pub fn wait_listening(ns: &str, port: u16, proc: &mut Proc, timeout: Duration) -> Result<()> {
    wait_ss(ns, &format!("sport = :{port}"), proc, timeout)
}

/// Waits until something in `ns` listens on TCP matching the `ss` filter `filter`.
pub fn wait_ss(ns: &str, filter: &str, proc: &mut Proc, timeout: Duration) -> Result<()> {
    let until = Instant::now() + timeout;
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-Hltn", filter])
            .output()
            .context("running ss")?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        proc.check_alive()?;
        if Instant::now() > until {
            bail!(
                "{} has no listener ({filter}) after {timeout:?}; end of its log:\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU seconds of a process and its children (nginx: master and workers).
pub fn tree_cpu_seconds(pid: u32) -> f64 {
    let mut total = scm_bench::procfs::cpu_seconds(pid).unwrap_or(0.0);
    for child in scm_bench::procfs::children(pid) {
        total += scm_bench::procfs::cpu_seconds(child).unwrap_or(0.0);
    }
    total
}

/// Memory of a process and its children.
pub fn tree_memory(pid: u32) -> scm_bench::procfs::Memory {
    let mut total = scm_bench::procfs::memory(pid).unwrap_or_default();
    for child in scm_bench::procfs::children(pid) {
        total = total + scm_bench::procfs::memory(child).unwrap_or_default();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certs() -> Certs {
        Certs {
            ca: "/b/ca.pem".into(),
            cert: "/b/cert.pem".into(),
            key: "/b/key.pem".into(),
        }
    }

    #[test]
    fn nginx_peer_config_pins_the_tls_choices() {
        let auth = AuthUpstream {
            addr: "10.212.2.2:8446".into(),
            path: "/v1/auth/forward".into(),
            ca: "/s/ca.pem".into(),
            name: "localhost".into(),
            client_cert: "/s/proxy-client.pem".into(),
            client_key: "/s/proxy-client.key".into(),
        };
        let c = nginx_sut_conf(Path::new("/b"), &certs(), Some(&auth));
        // Seven TLS listeners, each TLS 1.3 only with X25519 and AES-128-GCM; the two kTLS
        // stream servers differ from the other two only by OpenSSL's KTLS option.
        assert_eq!(c.matches("ssl_protocols TLSv1.3;").count(), 7);
        assert_eq!(c.matches("ssl_ecdh_curve X25519;").count(), 7);
        assert_eq!(c.matches("Ciphersuites TLS_AES_128_GCM_SHA256;").count(), 7);
        assert_eq!(c.matches("ssl_conf_command Options KTLS;").count(), 2);
        for port in [port::NGINX_STREAM_KTLS_BULK, port::NGINX_STREAM_KTLS_HTTP] {
            let server = c
                .split("server {")
                .find(|s| s.contains(&format!(":{port} ssl")))
                .expect("a kTLS stream server");
            assert!(server.contains("Options KTLS"), "{server}");
        }
        assert_eq!(c.matches("auth_request /_auth;").count(), 2);
        assert_eq!(c.matches("proxy_cache auth;").count(), 1);
        assert!(c.contains("proxy_pass https://security/v1/auth/forward;"));
        // Mutual TLS to the forward-auth listener, on both auth locations.
        assert_eq!(
            c.matches("proxy_ssl_certificate /s/proxy-client.pem;")
                .count(),
            2
        );
        assert_eq!(
            c.matches("proxy_ssl_certificate_key /s/proxy-client.key;")
                .count(),
            2
        );
        assert!(c.contains("server 10.212.2.2:8446;"));
        assert!(c.contains("proxy_pass 10.212.2.2:9000;"));
        assert_eq!(c.matches('{').count(), c.matches('}').count());
        let plain = nginx_sut_conf(Path::new("/b"), &certs(), None);
        assert!(!plain.contains("auth_request"));
        assert_eq!(plain.matches("ssl_protocols").count(), 5);
    }

    #[test]
    fn backend_config_serves_1k() {
        let c = nginx_backend_conf(Path::new("/b"));
        assert!(c.contains("listen 10.212.2.2:8080"));
        assert!(c.contains("alias /b/1k.bin;"));
        assert_eq!(c.matches('{').count(), c.matches('}').count());
    }

    #[test]
    fn certificates_are_p256_and_load_in_rustls() {
        let dir = std::env::temp_dir().join(format!("scm-bench-certs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let c = make_certs(&dir).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in scm_proto::tls::load_certs(&c.ca).unwrap() {
            roots.add(cert).unwrap();
        }
        assert_eq!(roots.len(), 1);
        let key = fs::read_to_string(&c.key).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        // The load generator can present a certificate and key of this kind as its client
        // identity (the forward-auth probe does, with scm-security's dev certificates).
        let id = (c.cert.clone(), c.key.clone());
        assert!(scm_bench::load::tls_config(Some(&c.ca), Some(&id), false).is_ok());
        let swapped = (c.key.clone(), c.cert.clone());
        assert!(scm_bench::load::tls_config(Some(&c.ca), Some(&swapped), false).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
