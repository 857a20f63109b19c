//! Live sync on PostgreSQL streaming replication, with real processes: a primary `scm-security`
//! on the primary cluster (enrollment waits for synchronous commit) and a failover `scm-security`
//! on the hot standby. The standby instance serves logins and validations and refuses writes
//! with 503 `read_only_standby`; a stalled standby turns enrollment into 503
//! `sync_commit_timeout` and shows as lag, a gone one as no standby and 503 `no_sync_standby`;
//! after SIGKILL of the primary PostgreSQL and the primary `scm-security`
//! and the standby's promotion, every device enrolled before the kill logs in at the failover
//! instance, which takes writes again without a restart.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::pg::replicated_pair;
use crate::support::{
    Db, Device, Remote, Server, assert_error, certs, client, eventually, free_port, plain_http,
    send,
};

const BIN: &str = env!("CARGO_BIN_EXE_scm-security");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `scm-security serve` process.
struct Instance {
    proc: Proc,
    data: PathBuf,
    device: Remote,
    admin_url: String,
    metrics: String,
}

fn serve(dir: &Path, certs: &Path, name: &str, url: &str, extra: &[&str]) -> Instance {
    let data = dir.join(name);
    let (dev, prx, adm, met) = (free_port(), free_port(), free_port(), free_port());
    let p = |x: &Path| x.display().to_string();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(BIN)
        .args(["serve", "--data-dir", &p(&data), "--database-url", url])
        .args(["--tls-cert", &p(&certs.join("security.pem"))])
        .args(["--tls-key", &p(&certs.join("security.key"))])
        .args(["--client-ca", &p(&certs.join("ca.pem"))])
        .args(["--listen", &format!("127.0.0.1:{dev}")])
        .args(["--proxy-listen", &format!("127.0.0.1:{prx}")])
        .args(["--admin-listen", &format!("127.0.0.1:{adm}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{met}")])
        .args(["--backup-interval", "0", "--role-check-interval", "200ms"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn scm-security");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", adm)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{name} did not start: {}",
            std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Instance {
        proc: Proc(child),
        data,
        device: Remote {
            client: client(certs, None),
            url: format!("https://localhost:{dev}"),
        },
        admin_url: format!("https://localhost:{adm}"),
        metrics: format!("http://127.0.0.1:{met}/metrics"),
    }
}

impl Instance {
    async fn metric(&self, name: &str) -> f64 {
        let text = plain_http()
            .get(&self.metrics)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing"))
            .parse()
            .unwrap()
    }

    async fn add_user(&self, certs: &Path, name: &str, pw: &str) {
        let token = std::fs::read_to_string(self.data.join("admin.token")).unwrap();
        let (s, v) = send(
            client(certs, None)
                .post(format!("{}/v1/admin/users", self.admin_url))
                .bearer_auth(token.trim())
                .json(&json!({"name": name, "password": pw, "groups": ["staff"]})),
        )
        .await;
        assert!(s.is_success(), "{s} {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_promoted_standby_loses_no_enrollment() {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let Some(pair) = replicated_pair().await else {
        return;
    };
    step("pair streaming");
    pair.primary
        .sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
        .await;
    pair.primary.sql("SELECT pg_reload_conf()").await;

    let tmp = tempfile::tempdir().unwrap();
    let certs = certs(tmp.path());
    let primary = serve(
        tmp.path(),
        &certs,
        "primary",
        &pair.primary.url("scm"),
        &["--require-sync-commit", "--sync-commit-timeout", "2s"],
    );
    // The failover instance needs the same master key; its schema comes by replication.
    std::fs::create_dir_all(tmp.path().join("failover")).unwrap();
    std::fs::copy(
        primary.data.join("master.key"),
        tmp.path().join("failover/master.key"),
    )
    .unwrap();
    primary.add_user(&certs, "alice", "pw-alice").await;
    assert!(
        eventually(Duration::from_secs(20), async || {
            pair.standby
                .scalar("scm", "SELECT COUNT(*) FROM users")
                .await
                .is_ok_and(|n| n == 1)
        })
        .await,
        "the standby replays the primary"
    );
    let failover = serve(
        tmp.path(),
        &certs,
        "failover",
        &pair.standby.url("scm"),
        &[],
    );
    step("both instances up");

    // Both roles are visible in the metrics.
    assert!(
        eventually(Duration::from_secs(10), async || {
            primary
                .metric("scm_security_replication_sync_standbys")
                .await
                == 1.0
        })
        .await
    );
    assert_eq!(primary.metric("scm_security_database_read_only").await, 0.0);
    assert_eq!(
        failover.metric("scm_security_database_read_only").await,
        1.0
    );
    assert_eq!(
        failover
            .metric("scm_security_standby_receiver_streaming")
            .await,
        1.0
    );

    // The standby instance serves logins, refuses writes.
    let first = Device::enroll(&primary.device, "alice", "pw-alice", "dev-0").await;
    first.login(&failover.device).await;
    let e = Device::try_enroll(&failover.device, "alice", "pw-alice", "dev-x", None)
        .await
        .err()
        .expect("refused on the standby");
    assert_error(&e, 503, "read_only_standby");
    let token = std::fs::read_to_string(failover.data.join("admin.token")).unwrap();
    let (s, v) = send(
        client(&certs, None)
            .post(format!("{}/v1/admin/users", failover.admin_url))
            .bearer_auth(token.trim())
            .json(&json!({"name": "bob", "password": "pw", "groups": []})),
    )
    .await;
    assert_error(&(s, v), 503, "read_only_standby");

    // A stalled standby: synchronous commit cannot complete, the enrollment says so.
    let receiver = pair
        .standby
        .scalar("postgres", "SELECT pid::BIGINT FROM pg_stat_wal_receiver")
        .await
        .expect("walreceiver pid");
    let signal = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &receiver.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    step("standby refuses writes");
    signal("-STOP");
    let e = Device::try_enroll(&primary.device, "alice", "pw-alice", "dev-stall", None)
        .await
        .err()
        .expect("no confirmation from a stopped standby");
    assert_error(&e, 503, "sync_commit_timeout");
    // The stalled standby lags, and the primary's metrics say so.
    assert!(
        eventually(Duration::from_secs(10), async || {
            primary
                .metric("scm_security_replication_max_lag_bytes")
                .await
                > 0.0
        })
        .await,
        "lag of a stalled standby"
    );
    step("stalled standby: sync_commit_timeout and lag");

    // Still stopped, the standby is gone for the primary once wal_sender_timeout (6 s) passes:
    // no standby in the metrics, enrollment refused rather than blocked.
    assert!(
        eventually(Duration::from_secs(20), async || {
            primary.metric("scm_security_replication_standbys").await == 0.0
        })
        .await,
        "a gone standby shows in the metrics"
    );
    let e = Device::try_enroll(&primary.device, "alice", "pw-alice", "dev-gone", None)
        .await
        .err()
        .expect("no synchronous standby streaming");
    assert_error(&e, 503, "no_sync_standby");
    signal("-CONT");
    assert!(
        eventually(Duration::from_secs(40), async || {
            primary
                .metric("scm_security_replication_sync_standbys")
                .await
                == 1.0
        })
        .await,
        "the standby streams again"
    );
    step("gone standby: no_sync_standby, then back");

    // Enroll, then kill the primary database and server at once.
    let mut devices = vec![first];
    for i in 1..=12 {
        devices
            .push(Device::enroll(&primary.device, "alice", "pw-alice", &format!("dev-{i}")).await);
    }
    step("enrolled; killing the primary");
    pair.primary.kill9();
    let Instance { proc, .. } = primary;
    let mut child = proc;
    child.0.kill().expect("SIGKILL the primary scm-security");
    let _ = child.0.wait();

    // The standby notices its primary is gone.
    assert!(
        eventually(Duration::from_secs(15), async || {
            failover
                .metric("scm_security_standby_receiver_streaming")
                .await
                == 0.0
        })
        .await,
        "the lost primary shows in the metrics"
    );
    // Promote; the failover instance takes writes without a restart.
    step("standby lost its primary; promoting");
    pair.standby.sql("SELECT pg_promote(true, 60)").await;
    assert!(
        eventually(Duration::from_secs(10), async || {
            failover.metric("scm_security_database_read_only").await == 0.0
        })
        .await
    );
    for d in &devices {
        d.login(&failover.device).await;
    }
    let late = Device::enroll(&failover.device, "alice", "pw-alice", "dev-after").await;
    late.login(&failover.device).await;
    let n = pair
        .standby
        .scalar(
            "scm",
            "SELECT COUNT(*) FROM device_keys WHERE revoked_at IS NULL",
        )
        .await
        .unwrap();
    // 13 before the kill, the stalled one (committed locally, then replicated), one after.
    assert_eq!(n, 15);

    step("all devices logged in at the failover instance");
    // Synchronous commit on a database with no synchronous standby: refused clearly.
    let dir = tempfile::tempdir().unwrap();
    crate::support::certs(dir.path());
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::copy(
        failover.data.join("master.key"),
        dir.path().join("data/master.key"),
    )
    .unwrap();
    let strict = Server::start_in(
        dir,
        Db::Postgres(pair.standby.url("scm")),
        &["--require-sync-commit", "--backup-interval", "0"],
    )
    .await;
    let e = Device::try_enroll(&strict, "alice", "pw-alice", "dev-strict", None)
        .await
        .err()
        .expect("no synchronous standby");
    assert_error(&e, 503, "no_sync_standby");
    assert_eq!(e.0, StatusCode::SERVICE_UNAVAILABLE);
    drop(failover);
}
