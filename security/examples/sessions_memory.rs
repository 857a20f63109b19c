//! Figure: memory held by 100k live sessions. Creates them in the real session table and reads the
//! process's resident set size before and after (Linux /proc/self/status).
//!
//! `cargo run -p scm-security --example sessions_memory [-- COUNT]`

use std::time::Duration;

use scm_proto::crypto::SharedKey;
use scm_security::sessions::{NewSession, Sessions};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let count: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let key = SharedKey::generate();
    let table = Sessions::new(
        Duration::from_secs(900),
        Duration::from_secs(43_200),
        count + 1,
    );
    let before = rss_kib();
    for i in 0..count {
        table
            .create(
                &key,
                &[1; 32],
                &[2; 32],
                NewSession {
                    user: format!("user{:06}", i % 50_000),
                    groups: vec!["staff".into(), "vpn-users".into()],
                    site: "main".into(),
                    device_id: format!("device-{i:08}"),
                    app_id: "mail".into(),
                    app_version: "1.4.2".into(),
                    key_id: format!("k_{i:032x}"),
                },
            )
            .expect("room");
    }
    let after = rss_kib();
    let delta = after.saturating_sub(before);
    println!("sessions: {}", table.len());
    println!("rss before: {before} KiB, after: {after} KiB");
    println!(
        "memory for {count} sessions: {:.1} MiB ({} bytes per session)",
        delta as f64 / 1024.0,
        delta * 1024 / count.max(1) as u64
    );
}
