//! Figures: logins per second (argon2id-bound) and validations per second over the network from
//! one client. Starts a real server in this process (SQLite in a temp dir, dev-certs TLS), then
//! drives it over loopback HTTPS with `CONCURRENCY` requests in flight on one reqwest client.
//!
//! `cargo run -p scm-security --example throughput [-- SECONDS CONCURRENCY]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser as _;
use reqwest::Client;
use scm_proto::api::{
    ChallengeResponse, EnrollResponse, LoginRequest, LoginResponse, PATH_CHALLENGE, PATH_ENROLL,
    PATH_LOGIN, PATH_PROXY_VALIDATE,
};
use scm_proto::crypto::{self, LoginTranscript, Nonce, SharedKey};
use serde_json::json;

fn client(certs: &std::path::Path, id: Option<(&str, &str)>) -> Client {
    let ids = id.map(|(c, k)| (certs.join(c), certs.join(k)));
    let tls = scm_security::tls::client_config(
        &certs.join("ca.pem"),
        ids.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .expect("tls");
    Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .expect("client")
}

async fn login(c: &Client, base: &str, key_id: &str, key: &SharedKey) -> LoginResponse {
    let ch: ChallengeResponse = c
        .post(format!("{base}{PATH_CHALLENGE}"))
        .json(&json!({}))
        .send()
        .await
        .expect("challenge")
        .json()
        .await
        .expect("challenge json");
    let sn: Nonce = crypto::decode_fixed("n", &ch.server_nonce).expect("nonce");
    let cn: Nonce = crypto::random_bytes();
    let t = LoginTranscript {
        challenge_id: &ch.challenge_id,
        server_nonce: &sn,
        client_nonce: &cn,
        username: "bench",
        key_id,
        device_id: "bench-device",
        app_id: "mail",
        app_version: "1.0",
    };
    let req = LoginRequest {
        username: "bench".into(),
        password: "bench-password".into(),
        key_id: key_id.into(),
        device_id: "bench-device".into(),
        app_id: "mail".into(),
        app_version: "1.0".into(),
        challenge_id: ch.challenge_id.clone(),
        client_nonce: crypto::b64(&cn),
        mac: crypto::b64(&crypto::login_mac(key, &t)),
    };
    let r = c
        .post(format!("{base}{PATH_LOGIN}"))
        .json(&req)
        .send()
        .await
        .expect("login");
    assert!(r.status().is_success(), "login: {}", r.status());
    r.json().await.expect("login json")
}

async fn run_for<F, Fut>(secs: u64, conc: usize, f: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let f = Arc::new(f);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (f, done) = (f.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end {
                f().await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let secs: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let conc: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    scm_security::devcerts::generate(&certs, &[], false).expect("certs");
    let p = |f: &str| certs.join(f).display().to_string();
    let data = dir.path().join("data").display().to_string();
    let cli = scm_security::config::Cli::parse_from([
        "scm-security",
        "serve",
        "--data-dir",
        &data,
        "--tls-cert",
        &p("security.pem"),
        "--tls-key",
        &p("security.key"),
        "--client-ca",
        &p("ca.pem"),
        "--listen",
        "127.0.0.1:0",
        "--proxy-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--challenge-rate-limit",
        "0",
        "--max-sessions",
        "10000000",
    ]);
    let scm_security::config::Command::Serve(serve) = cli.command else {
        unreachable!()
    };
    let running = scm_security::server::start(&serve).await.expect("server");
    let token = std::fs::read_to_string(dir.path().join("data/admin.token")).expect("token");
    let admin = client(&certs, None);
    let r = admin
        .post(format!(
            "https://localhost:{}/v1/admin/users",
            running.admin_addr.port()
        ))
        .bearer_auth(token.trim())
        .json(&json!({"name": "bench", "password": "bench-password", "groups": ["staff"]}))
        .send()
        .await
        .expect("add user");
    assert!(r.status().is_success());
    let device = client(&certs, None);
    let base = format!("https://localhost:{}", running.device_addr.port());
    let e: EnrollResponse = device
        .post(format!("{base}{PATH_ENROLL}"))
        .json(&json!({"username": "bench", "password": "bench-password", "device_id": "bench-device", "app_id": "mail"}))
        .send()
        .await
        .expect("enroll")
        .json()
        .await
        .expect("enroll json");
    let key = SharedKey::from_b64(&e.shared_key).expect("key");
    let key_id = e.key_id.clone();

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "scm-security throughput, {secs}s per figure, {conc} in flight, one client, {cpus} CPUs shared by client and server"
    );
    let (d2, b2, k2, id2) = (device.clone(), base.clone(), key.clone(), key_id.clone());
    let logins = run_for(secs, conc, move || {
        let (d, b, k, id) = (d2.clone(), b2.clone(), k2.clone(), id2.clone());
        async move {
            login(&d, &b, &id, &k).await;
        }
    })
    .await;
    println!("logins/s (challenge + login, argon2id m=19MiB t=2 p=1): {logins:.1}");

    let session = login(&device, &base, &key_id, &key).await.session_id;
    let proxy = client(&certs, Some(("proxy-client.pem", "proxy-client.key")));
    let purl = format!(
        "https://localhost:{}{PATH_PROXY_VALIDATE}",
        running.proxy_addr.port()
    );
    for c in [1, conc] {
        let (p2, u2, s2) = (proxy.clone(), purl.clone(), session.clone());
        let vals = run_for(secs, c, move || {
            let (p, u, s) = (p2.clone(), u2.clone(), s2.clone());
            async move {
                let r = p
                    .post(&u)
                    .json(&json!({"session_id": s}))
                    .send()
                    .await
                    .expect("validate");
                assert!(r.status().is_success());
                let _ = r.bytes().await;
            }
        })
        .await;
        println!("validations/s over mTLS, {c} in flight: {vals:.0}");
    }
    println!("live sessions at the end: {}", running.state.sessions.len());
    running.shutdown().await;
}
