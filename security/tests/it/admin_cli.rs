//! The real binary: `dev-certs`, `init`, `serve` as a process, and `admin ...` round trips
//! printing tables and JSON; data survives a restart (SIGKILL) of the server.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::support::{Device, Remote, client, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_scm-security");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn scm-security");
    if let Some(s) = stdin {
        c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(c.stdin.take());
    c.wait_with_output().expect("wait")
}

fn ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = run(args, stdin);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

struct Env {
    dir: PathBuf,
    admin_port: u16,
    device_port: u16,
    proxy_port: u16,
}

impl Env {
    fn p(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }

    fn serve(&self) -> Proc {
        let child = Command::new(BIN)
            .args(["serve", "--data-dir", &self.p("data")])
            .args([
                "--tls-cert",
                &self.p("certs/security.pem"),
                "--tls-key",
                &self.p("certs/security.key"),
            ])
            .args(["--client-ca", &self.p("certs/ca.pem")])
            .args(["--listen", &format!("127.0.0.1:{}", self.device_port)])
            .args(["--proxy-listen", &format!("127.0.0.1:{}", self.proxy_port)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.admin_port)])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(self.log())
            .spawn()
            .expect("serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.admin_port)).is_err() {
            assert!(Instant::now() < deadline, "server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Proc(child)
    }

    fn log(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("log file")
    }

    fn admin(&self, args: &[&str], stdin: Option<&str>) -> String {
        let url = format!("https://127.0.0.1:{}", self.admin_port);
        let (ca, token) = (self.p("certs/ca.pem"), self.p("data/admin.token"));
        let mut all = vec!["admin", "--url", &url, "--ca", &ca, "--token-file", &token];
        all.extend_from_slice(args);
        ok(&all, stdin)
    }

    fn admin_json(&self, args: &[&str]) -> Value {
        // --json is global: it may come after the subcommand.
        let out = self.admin(&[args, &["--json"]].concat(), None);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let env = Env {
        dir: tmp.path().to_owned(),
        admin_port: free_port(),
        device_port: free_port(),
        proxy_port: free_port(),
    };
    // Help teaches: examples and environment twins.
    let help = ok(&["serve", "--help"], None);
    assert!(
        help.contains("Example") && help.contains("SCM_SESSION_IDLE_TIMEOUT"),
        "{help}"
    );
    assert!(ok(&["--help"], None).contains("dev-certs"));
    assert!(ok(&["admin", "--help"], None).contains("users add alice"));

    let out = ok(
        &[
            "dev-certs",
            "--out",
            &env.p("certs"),
            "--san",
            "sec.example",
        ],
        None,
    );
    assert!(out.contains("proxy-client.pem"));
    assert_eq!(mode(&tmp.path().join("certs/ca.key")), 0o600);
    assert!(
        !run(&["dev-certs", "--out", &env.p("certs")], None)
            .status
            .success(),
        "no overwrite"
    );

    ok(&["init", "--data-dir", &env.p("data")], None);
    assert_eq!(mode(&tmp.path().join("data/master.key")), 0o600);
    assert_eq!(mode(&tmp.path().join("data/admin.token")), 0o600);
    let second = run(&["init", "--data-dir", &env.p("data")], None);
    assert!(
        !second.status.success(),
        "init refuses to overwrite the master key"
    );
    let master_before = std::fs::read(tmp.path().join("data/master.key")).unwrap();

    let server = env.serve();
    assert!(
        tmp.path().join("data/scm.db").exists(),
        "SQLite file created on first start"
    );

    let out = env.admin(
        &[
            "users",
            "add",
            "alice",
            "--groups",
            "staff,dev",
            "--password-stdin",
        ],
        Some("alice-pw\n"),
    );
    assert!(out.contains("alice") && out.contains("staff,dev"), "{out}");
    let table = env.admin(&["users", "list"], None);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("local"), "{table}");
    let users = env.admin_json(&["users", "list"]);
    assert_eq!(users[0]["name"], "alice");
    assert!(
        users[0].get("password_hash").is_none(),
        "hashes never leave the server"
    );
    let dup = run(
        &[
            "admin",
            "--url",
            &format!("https://127.0.0.1:{}", env.admin_port),
            "--ca",
            &env.p("certs/ca.pem"),
            "--token-file",
            &env.p("data/admin.token"),
            "users",
            "add",
            "alice",
            "--password-stdin",
        ],
        Some("x\n"),
    );
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));

    env.admin(
        &[
            "sites",
            "set",
            "main",
            "--proxy-url",
            "127.0.0.1:9443",
            "--proxy-url",
            "127.0.0.1:9444",
        ],
        None,
    );
    let sites = env.admin_json(&["sites", "list"]);
    assert_eq!(sites[0]["proxy_urls"][1], "127.0.0.1:9444");
    env.admin(
        &[
            "resources",
            "set",
            "web",
            "--address",
            "127.0.0.1:8080",
            "--mode",
            "http",
            "--groups",
            "staff",
        ],
        None,
    );
    let res = env.admin(&["resources", "list"], None);
    assert!(
        res.contains("web") && res.contains("http") && res.contains("127.0.0.1:8080"),
        "{res}"
    );

    let pkg = tmp.path().join("mail.apk");
    std::fs::write(&pkg, b"package bytes").unwrap();
    let published = env.admin_json(&[
        "apps",
        "publish",
        "mail",
        "1.0",
        "android",
        pkg.to_str().unwrap(),
    ]);
    assert_eq!(
        published["sha256"],
        hex::encode(Sha256::digest(b"package bytes"))
    );
    env.admin(
        &[
            "apps",
            "policy",
            "mail",
            "--min-version",
            "1.0",
            "--revoke",
            "0.9",
        ],
        None,
    );
    let apps = env.admin(&["apps", "list"], None);
    assert!(apps.contains("mail") && apps.contains("0.9"), "{apps}");

    // A device enrolls and logs in against the process.
    let certs = tmp.path().join("certs");
    let remote = Remote {
        client: client(&certs, None),
        url: format!("https://127.0.0.1:{}", env.device_port),
    };
    let dev = Device::enroll(&remote, "alice", "alice-pw", "phone-1").await;
    let login = dev.login(&remote).await;
    assert_eq!(
        login.resp.proxy_urls,
        vec!["127.0.0.1:9443", "127.0.0.1:9444"]
    );
    let keys = env.admin(&["keys", "list", "--user", "alice"], None);
    assert!(keys.contains(&dev.key_id), "{keys}");
    let devices = env.admin(&["devices", "list"], None);
    assert!(devices.contains("phone-1"), "{devices}");
    let sessions = env.admin_json(&["sessions", "list"]);
    let tag = sessions[0]["tag"].as_str().unwrap().to_owned();
    assert_eq!(
        tag,
        scm_proto::crypto::session_tag(&login.resp.session_id).0
    );
    let listing = env.admin(&["sessions", "list"], None);
    assert!(listing.contains(&tag) && !listing.contains(&login.resp.session_id));
    assert!(
        env.admin(&["sessions", "revoke", &tag], None)
            .contains("ended 1 session")
    );
    // The server's log names the session by its tag only, even at debug level.
    let log = std::fs::read_to_string(tmp.path().join("server.log")).unwrap();
    assert!(log.contains(&tag), "the log names sessions by tag: {log}");
    assert!(
        !log.contains(&login.resp.session_id),
        "a session id reached the log"
    );
    assert!(
        !log.contains(&dev.key.to_b64()),
        "a shared key reached the log"
    );
    assert_eq!(env.admin_json(&["sessions", "list"]), Value::Array(vec![]));
    let code = env.admin(&["users", "activation-code", "alice", "--ttl", "1h"], None);
    assert!(code.contains("activation code for alice"), "{code}");
    env.admin(&["keys", "revoke", &dev.key_id], None);
    let audit = env.admin(&["audit", "--limit", "100"], None);
    for kind in ["login", "enroll", "session_revoked", "key_revoked", "admin"] {
        assert!(audit.contains(kind), "{kind} missing from {audit}");
    }

    // A wrong token is refused with its code.
    let bad_token = tmp.path().join("bad.token");
    std::fs::write(&bad_token, "0123456789abcdef0123456789abcdef").unwrap();
    let bad = run(
        &[
            "admin",
            "--url",
            &format!("https://127.0.0.1:{}", env.admin_port),
            "--ca",
            &env.p("certs/ca.pem"),
            "--token-file",
            bad_token.to_str().unwrap(),
            "users",
            "list",
        ],
        None,
    );
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad_admin_token"));

    // SIGKILL and restart on the same data: users, keys and catalog persist; sessions do not.
    drop(server);
    let mut server = env.serve();
    assert_eq!(
        std::fs::read(tmp.path().join("data/master.key")).unwrap(),
        master_before
    );
    assert!(env.admin(&["users", "list"], None).contains("alice"));
    assert!(env.admin(&["resources", "list"], None).contains("web"));
    let dev2 = Device::enroll(&remote, "alice", "alice-pw", "phone-2").await;
    dev2.login(&remote).await;
    env.admin(&["users", "delete", "alice"], None);
    assert!(!env.admin(&["users", "list"], None).contains("alice"));
    assert!(dev2.try_login(&remote).await.is_err());

    // SIGTERM ends it cleanly.
    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = server.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "server ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
