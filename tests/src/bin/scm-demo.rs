//! `scm-demo`: the whole workflow on this machine, printing each of the six steps as it happens.
//! Starts `scm-security` (embedded SQLite, dev certificates), the back ends and `scm-proxy`,
//! creates users, resources, a site and publishes an app, then runs a device through enrol ->
//! login -> tunnel -> HTTP request -> update check -> logout. Everything stops on exit.
//!
//! `cargo run -p scm-e2e --bin scm-demo`

use anyhow::{Context as _, Result, bail};
use scm_device::{Device, DeviceError, Session};
use scm_e2e::backend::Seen;
use scm_e2e::stack::{APP, PASSWORD, PLATFORM};
use scm_e2e::{Stack, StackOptions};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn step(n: &str, text: &str) {
    println!("[{n}] {text}");
}

#[tokio::main]
async fn main() -> Result<()> {
    println!(
        "scm demo: building and starting scm-security, scm-proxy and two back ends on 127.0.0.1"
    );
    let stack = Stack::start(StackOptions::default()).await?;
    println!(
        "  Security server: device API https://{}, proxies' API (mutual TLS) https://{}, admin https://{}",
        stack.device_api, stack.proxy_api, stack.admin_api
    );
    println!(
        "  proxy: {} (metrics http://{}/metrics); back ends: echo {}, http {}",
        stack.proxy_addr, stack.metrics_addr, stack.echo, stack.http
    );
    println!(
        "  admin: users alice (staff) and bob (contractors); resources echo (tcp), web (http); \
         site main -> {}; app {APP} 1.0.0 and 1.1.0 for {PLATFORM}",
        stack.proxy_addr
    );
    println!("  files and logs: {}\n", stack.dir.path().display());

    step(
        "1",
        &format!(
            "device -> Security server: TLS to https://{}; enrol alice on phone-1, app {APP} 1.0.0",
            stack.device_api
        ),
    );
    let device: Device = stack.enroll("alice", "phone-1", "1.0.0").await?;
    println!(
        "      shared key issued (key id {}), kept by the device",
        device.enrollment().key_id
    );

    step(
        "2",
        "login: server challenge, HMAC proof of the shared key, session key derived (HKDF)",
    );
    let session = Session::login(&device, PASSWORD).await?;
    let s = session.saved();
    println!(
        "      session {} for {} (groups {}), site {}, proxies {}",
        session.tag(),
        s.user,
        s.groups.join(","),
        s.site,
        s.proxy_urls.join(",")
    );

    step(
        "3",
        "device -> proxy: TLS 1.3, preamble (session id, app context, resource echo, binding MAC over the TLS exporter)",
    );
    let mut tunnel = session.open("echo").await.context("opening echo")?;
    let validations = stack
        .metric("scm_proxy_validations_total{result=\"valid\"}")
        .await?;
    step(
        "4",
        &format!(
            "proxy -> Security server: validate the session over mutual TLS ({validations} validation so far)"
        ),
    );
    step(
        "5",
        "Security server -> proxy: valid, user alice, groups, session key; binding, app and group checks pass: reply ok",
    );
    tunnel.write_all(b"hello through scm").await?;
    let mut got = [0u8; 17];
    tunnel.read_exact(&mut got).await?;
    step(
        "6",
        &format!(
            "proxy <-> back end: relaying; sent \"hello through scm\", echoed \"{}\"",
            String::from_utf8_lossy(&got)
        ),
    );
    drop(tunnel);

    let resp = session.get("http://web/intranet/index.html").await?;
    let seen: Seen = serde_json::from_slice(&resp.body)?;
    println!(
        "\n[http] GET http://web/intranet/index.html -> {}; the back end saw x-scm-user={} x-scm-groups={}",
        resp.status, seen.headers["x-scm-user"], seen.headers["x-scm-groups"]
    );
    let cached = stack.metric("scm_proxy_cache_hits_total").await?;
    println!("       (session served from the proxy's cache: {cached} cache hit(s))");

    let check = device.update_check(Some(&s.session_id)).await?;
    let latest = check.latest.clone().context("no release published")?;
    println!(
        "[update] check: running 1.0.0, update available: {}, latest {} (sha256 {}…)",
        check.update_available,
        latest.version,
        &latest.sha256[..16]
    );
    let out = stack.dir.path().join("mail-update.pkg");
    let n = device
        .update_fetch(&latest, &out, Some(&s.session_id))
        .await?;
    println!("[update] fetched {n} bytes, sha256 verified");

    session.logout().await?;
    println!(
        "[logout] session {} ended; the proxy heard it on the revocation stream",
        session.tag()
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    match session.open("echo").await {
        Err(DeviceError::ProxyRefused { status, reason }) => {
            println!(
                "[logout] a new connection with the old session is refused: {status}: {reason}"
            )
        }
        Ok(_) => bail!("the proxy accepted a logged-out session"),
        Err(e) => bail!("unexpected error after logout: {e}"),
    }
    println!("\ndemo done: stopping scm-proxy and scm-security");
    Ok(())
}
