//! `scm-proxy serve --workers 4` end to end: the real supervisor binary and four real proxy
//! worker processes in namespace `b`, XDP on `vb`, sk_lookup, and many TLS clients in namespace
//! `a`. Each test checks what the issue asks: an even spread; a worker SIGKILLed under load
//! (other connections unharmed, new ones elsewhere within 100 ms, the worker restarted and
//! back in use); a SIGUSR2 rolling restart; the supervisor SIGKILLed (steering goes on from the pinned
//! objects, a new supervisor adopts them and the workers).
//!
//! The Security server is not needed for what is measured (where connections land and that
//! the workers complete TLS handshakes), so the workers point at an address where nothing
//! listens; connections stop after the TLS handshake, waiting for a preamble.
//!
//! Needs root and `ip`; see `support::require_root`.

mod support;

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use proxy_common::steer::WorkerSlot;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use scm_proxy::steer::{SteerOptions, Steering, flow_key};
use support::{B_V4, NetnsPair, in_netns, require_root};

const SERVICE: u16 = 443;
const METRICS: &str = "127.0.0.1:19100";

/// One test at a time: each runs five processes on machines with two cores.
static SERIAL: Mutex<()> = Mutex::new(());

struct Certs {
    dir: PathBuf,
    client: Arc<ClientConfig>,
}

impl Certs {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "scm-sup-test-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec![B_V4.to_owned(), "localhost".to_owned()])
            .unwrap();
        std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let client = Arc::new(
            scm_proto::tls::client_builder()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        Self { dir, client }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running supervisor, with cleanup of everything it may leave behind.
struct Harness {
    pair: NetnsPair,
    certs: Certs,
    pin_dir: PathBuf,
    supervisor: Option<Child>,
    log: PathBuf,
    /// RUST_LOG of the supervisor and its workers.
    rust_log: &'static str,
}

impl Harness {
    fn new() -> Self {
        Self::with_rust_log("info")
    }

    fn with_rust_log(rust_log: &'static str) -> Self {
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/scm-sup-test-{}", std::process::id()));
        let _ = Steering::unpin(&pin_dir);
        let certs = Certs::new();
        let log = certs.dir.join("supervisor.log");
        let mut h = Self {
            pair: NetnsPair::create(),
            certs,
            pin_dir,
            supervisor: None,
            log,
            rust_log,
        };
        h.start_supervisor();
        h
    }

    fn start_supervisor(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let c = &self.certs;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scm-proxy"));
        cmd.args(["serve", "--listen", &format!("{B_V4}:{SERVICE}")])
            .args([
                "--tls-cert",
                &c.path("cert.pem"),
                "--tls-key",
                &c.path("key.pem"),
            ])
            .args(["--security-url", "https://127.0.0.1:1"])
            .args(["--security-ca", &c.path("cert.pem")])
            .args([
                "--client-cert",
                &c.path("cert.pem"),
                "--client-key",
                &c.path("key.pem"),
            ])
            .args(["--preamble-timeout", "120s", "--metrics-listen", METRICS])
            .args([
                "--workers",
                "4",
                "--steer-iface",
                "vb",
                "--xdp-mode",
                "native",
            ])
            .args(["--drain-timeout", "60s"])
            // Every client here is one address opening connections by the thousand (a load
            // generator, not a carrier NAT): the per-source rate limit, on by default, is off.
            .args(["--conn-rate", "0"])
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .env("RUST_LOG", self.rust_log)
            .stdout(Stdio::null())
            .stderr(log);
        let child = in_netns(&self.pair.b, || cmd.spawn()).expect("starting scm-proxy serve");
        self.supervisor = Some(child);
    }

    fn supervisor_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The supervisor's metrics page (from inside namespace `b`).
    fn metrics(&self) -> Option<String> {
        in_netns(&self.pair.b, || {
            let mut s =
                TcpStream::connect_timeout(&METRICS.parse().unwrap(), Duration::from_secs(2))
                    .ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        })
    }

    /// Read access to the pinned maps (the supervisor created them).
    fn maps(&self) -> Steering {
        Steering::load(&SteerOptions {
            pin_dir: Some(self.pin_dir.clone()),
            ..SteerOptions::default()
        })
        .expect("opening the pinned maps")
    }

    /// Waits until the metrics say all four workers are healthy.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(m) = self.metrics()
                && (0..4)
                    .all(|w| m.contains(&format!("scm_proxy_worker_state{{worker=\"{w}\"}} 1")))
            {
                return;
            }
            if let Some(s) = self.supervisor.as_ref()
                && !Path::new(&format!("/proc/{}", s.id())).exists()
            {
                panic!("the supervisor died:\n{}", self.supervisor_log());
            }
            assert!(
                Instant::now() < deadline,
                "workers not ready in 60 s:\n{}",
                self.supervisor_log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn workers(&self) -> Vec<WorkerSlot> {
        self.maps().workers()[..4].to_vec()
    }

    fn kill_supervisor(&mut self, sig: Signal) {
        if let Some(mut c) = self.supervisor.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
            let _ = c.wait();
        }
    }

    /// A TLS connection from `a` to the service; returns it with the worker it landed on.
    fn tls_connect(&self) -> Result<(StreamOwned<ClientConnection, TcpStream>, u32), String> {
        let to = SocketAddr::new(B_V4.parse().unwrap(), SERVICE);
        let tcp = in_netns(&self.pair.a, || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })
        .map_err(|e| format!("connect: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let key = flow_key(tcp.local_addr().unwrap(), to);
        let conn = ClientConnection::new(self.certs.client.clone(), B_V4.try_into().unwrap())
            .map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| format!("TLS handshake: {e}"))?;
        }
        let worker = self
            .maps_cached()
            .as_ref()
            .expect("maps opened")
            .flow(&key)
            .map_err(|e| e.to_string())?
            .ok_or("no flow entry")?
            .worker;
        Ok((tls, worker))
    }

    fn maps_cached(&self) -> std::sync::MutexGuard<'static, Option<Steering>> {
        static MAPS: Mutex<Option<Steering>> = Mutex::new(None);
        let mut g = MAPS.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(self.maps());
        }
        g
    }

    /// Opens `n` TLS connections from `threads` threads at once and keeps them open.
    fn many(
        &self,
        n: usize,
        threads: usize,
    ) -> Vec<(StreamOwned<ClientConnection, TcpStream>, u32)> {
        let out = Mutex::new(Vec::new());
        thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    for _ in 0..n / threads {
                        let c = self.tls_connect().unwrap_or_else(|e| panic!("{e}"));
                        out.lock().unwrap().push(c);
                    }
                });
            }
        });
        out.into_inner().unwrap()
    }
}

use std::path::Path;

impl Drop for Harness {
    fn drop(&mut self) {
        *self.maps_cached() = None;
        // Whatever the test left: the workers (pids in the pinned map), the supervisor, pins.
        let pids: Vec<u32> = Steering::load(&SteerOptions {
            pin_dir: Some(self.pin_dir.clone()),
            ..SteerOptions::default()
        })
        .map(|s| {
            s.workers()
                .iter()
                .map(|w| w.pid)
                .filter(|p| *p != 0)
                .collect()
        })
        .unwrap_or_default();
        self.kill_supervisor(Signal::SIGKILL);
        for pid in pids {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = Steering::unpin(&self.pin_dir);
    }
}

/// Whether a TLS connection is still open: no EOF, no reset, nothing to read.
fn still_open(tls: &mut StreamOwned<ClientConnection, TcpStream>) -> Result<(), String> {
    // Read whatever TLS records are waiting without blocking: session tickets the proxy sends
    // after the handshake are fine; application data, a close_notify or an end of stream are not.
    tls.sock.set_nonblocking(true).unwrap();
    let r = loop {
        match tls.conn.read_tls(&mut tls.sock) {
            Ok(0) => break Err("closed by the proxy".to_owned()),
            Ok(_) => {
                if let Err(e) = tls.conn.process_new_packets() {
                    break Err(e.to_string());
                }
                let mut b = [0u8; 1];
                match tls.conn.reader().read(&mut b) {
                    Ok(0) => break Err("closed by the proxy (close_notify)".to_owned()),
                    Ok(_) => break Err("unexpected data".to_owned()),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                    Err(e) => break Err(e.to_string()),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(()),
            Err(e) => break Err(e.to_string()),
        }
    };
    tls.sock.set_nonblocking(false).unwrap();
    r
}

fn tally(conns: &[(StreamOwned<ClientConnection, TcpStream>, u32)]) -> [usize; 4] {
    let mut t = [0; 4];
    for (_, w) in conns {
        t[*w as usize] += 1;
    }
    t
}

#[test]
fn four_workers_spread_and_a_killed_worker_is_replaced() {
    if !require_root("supervisor_netns::four_workers_spread_and_a_killed_worker_is_replaced") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = Harness::new();
    h.wait_ready();

    // Many concurrent device-like connections: an even spread.
    let n = 1200;
    let mut conns = h.many(n, 8);
    let counts = tally(&conns);
    eprintln!("{n} TLS connections over 4 worker processes: {counts:?}");
    for (w, c) in counts.iter().enumerate() {
        assert!(
            c.abs_diff(n / 4) * 5 <= n / 4,
            "worker {w}: {c} of {n}: {counts:?}"
        );
    }
    let metrics = h.metrics().unwrap();
    assert!(
        metrics.contains("scm_proxy_steer_events_total{event=\"new_flow\"}"),
        "{metrics}"
    );

    // SIGKILL worker 1 under load.
    let victim = 1u32;
    let before = h.workers();
    let victim_pid = before[victim as usize].pid;
    let load_stop = std::sync::atomic::AtomicBool::new(false);
    let results = Mutex::new(Vec::<(Instant, Instant, Result<u32, String>)>::new());
    let mut killed_at = Instant::now();
    // The last moment the worker map still showed no replacement for the victim.
    let not_yet_replaced = Mutex::new(Instant::now());
    thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while !load_stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let started = Instant::now();
                    let r = h.tls_connect().map(|(_, w)| w);
                    results.lock().unwrap().push((started, Instant::now(), r));
                }
            });
        }
        s.spawn(|| {
            while !load_stop.load(std::sync::atomic::Ordering::SeqCst) {
                let seen = Instant::now();
                let slot =
                    h.maps_cached().as_ref().unwrap().read_workers().unwrap()[victim as usize];
                if slot.pid == victim_pid || !slot.is_healthy() {
                    *not_yet_replaced.lock().unwrap() = seen;
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
        thread::sleep(Duration::from_millis(500));
        killed_at = Instant::now();
        kill(Pid::from_raw(victim_pid as i32), Signal::SIGKILL).unwrap();
        thread::sleep(Duration::from_millis(2500));
        load_stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let not_yet_replaced = not_yet_replaced.into_inner().unwrap();
    // The connections on the other workers are all still open.
    for (tls, w) in conns.iter_mut().filter(|(_, w)| *w != victim) {
        still_open(tls).unwrap_or_else(|e| panic!("a connection on worker {w} broke: {e}"));
    }
    let results = results.into_inner().unwrap();
    let settle = killed_at + Duration::from_millis(100);
    let before_kill = results.iter().filter(|(t, _, _)| *t < killed_at).count();
    let after: Vec<_> = results.iter().filter(|(t, _, _)| *t >= settle).collect();
    let in_window: Vec<_> = results
        .iter()
        .filter(|(t, _, _)| *t >= killed_at && *t < settle)
        .collect();
    eprintln!(
        "load while worker {victim} was SIGKILLed: {before_kill} connections before, {} in the \
         first 100 ms ({} failed), {} after; replacement seen {:?} after the kill",
        in_window.len(),
        in_window.iter().filter(|(_, _, r)| r.is_err()).count(),
        after.len(),
        not_yet_replaced.duration_since(killed_at)
    );
    assert!(
        after.len() > 20,
        "too little load after the kill: {}",
        after.len()
    );
    for (t, end, r) in &after {
        let at = t.duration_since(killed_at);
        match r {
            // Done before the map showed a replacement: it cannot be the new worker.
            Ok(w) if *w == victim && *end < not_yet_replaced => {
                panic!("a connection {at:?} after the kill went to the dead worker")
            }
            Ok(_) => {}
            Err(e) => panic!("a connection {at:?} after the kill failed: {e}"),
        }
    }

    // Restarted, with a new pid, and in use again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let w = h.workers()[victim as usize];
        if w.is_healthy() && w.pid != victim_pid {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "worker {victim} not restarted:\n{}",
            h.supervisor_log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let again = h.many(200, 4);
    let t = tally(&again);
    assert!(
        t[victim as usize] > 0,
        "restarted worker gets no traffic: {t:?}"
    );
    let m = h.metrics().unwrap();
    assert!(
        m.contains(&format!(
            "scm_proxy_worker_restarts_total{{worker=\"{victim}\"}} 1"
        )),
        "{m}"
    );
}

fn wait_for(what: &str, h: &Harness, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}\n{}",
            h.supervisor_log()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigusr2_drains_each_worker_before_restarting_it() {
    if !require_root("supervisor_netns::sigusr2_drains_each_worker_before_restarting_it") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = Harness::new();
    h.wait_ready();
    let before = h.workers();
    let mut held = h.many(80, 4);
    assert!(held.iter().any(|(_, w)| *w == 0), "{:?}", tally(&held));
    // Keep only worker 0's connections: the others would hold up their workers' turns.
    held.retain(|(_, w)| *w == 0);

    let sup = h.supervisor.as_ref().unwrap().id();
    kill(Pid::from_raw(sup as i32), Signal::SIGUSR2).unwrap();
    let maps = || h.maps_cached().as_ref().unwrap().read_workers().unwrap();
    wait_for("worker 0 draining", &h, Duration::from_secs(10), || {
        maps()[0].state == proxy_common::steer::WorkerState::Draining as u32
    });
    // While it drains: no new connection goes to it, and its own stay open.
    let during = h.many(200, 4);
    assert_eq!(tally(&during)[0], 0, "{:?}", tally(&during));
    drop(during);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        maps()[0].pid,
        before[0].pid,
        "stopped with connections open"
    );
    for (tls, _) in held.iter_mut() {
        still_open(tls).expect("a draining worker's connection stays open");
    }
    // The device side finishes its connections; only then is the worker replaced, and the
    // rolling restart moves on to the others.
    for (mut tls, _) in held {
        tls.conn.send_close_notify();
        let _ = tls.conn.complete_io(&mut tls.sock);
    }
    wait_for("every worker replaced", &h, Duration::from_secs(60), || {
        let now = maps();
        (0..4).all(|i| now[i].is_healthy() && now[i].pid != before[i].pid)
    });
    wait_for(
        "the rolling restart logged as done",
        &h,
        Duration::from_secs(10),
        || h.supervisor_log().contains("rolling restart done"),
    );
    let after = h.many(400, 4);
    assert!(tally(&after).iter().all(|c| *c > 0), "{:?}", tally(&after));
}

#[test]
fn a_killed_supervisor_leaves_steering_running_and_a_new_one_adopts_it() {
    if !require_root(
        "supervisor_netns::a_killed_supervisor_leaves_steering_running_and_a_new_one_adopts_it",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = Harness::new();
    h.wait_ready();
    let pids: Vec<u32> = h.workers().iter().map(|w| w.pid).collect();

    h.kill_supervisor(Signal::SIGKILL);
    // Steering goes on from the pinned programs and maps; the workers keep serving.
    let orphaned = h.many(400, 4);
    let t = tally(&orphaned);
    eprintln!("without a supervisor: {t:?}");
    assert!(t.iter().all(|c| *c > 0), "{t:?}");
    drop(orphaned);

    // A new supervisor adopts the pins and the running workers.
    h.start_supervisor();
    h.wait_ready();
    let log = h.supervisor_log();
    assert!(log.contains("pinned XDP link adopted"), "{log}");
    assert_eq!(log.matches("adopted a running worker").count(), 4, "{log}");
    let adopted: Vec<u32> = h.workers().iter().map(|w| w.pid).collect();
    assert_eq!(adopted, pids, "the workers were adopted, not restarted");
    assert_eq!(
        h.pair
            .link_show(&h.pair.b, "vb")
            .matches("prog/xdp")
            .count(),
        1,
        "one XDP program on vb"
    );

    // It is in charge: a worker that dies now is restarted by it.
    kill(Pid::from_raw(pids[2] as i32), Signal::SIGKILL).unwrap();
    let maps = || h.maps_cached().as_ref().unwrap().read_workers().unwrap();
    wait_for(
        "worker 2 restarted by the new supervisor",
        &h,
        Duration::from_secs(30),
        || {
            let w = maps()[2];
            w.is_healthy() && w.pid != pids[2]
        },
    );
    let t = tally(&h.many(400, 4));
    assert!(t.iter().all(|c| *c > 0), "{t:?}");

    // SIGTERM: workers stopped, pins removed, programs detached.
    let last: Vec<u32> = maps().iter().take(4).map(|w| w.pid).collect();
    *h.maps_cached() = None;
    h.kill_supervisor(Signal::SIGTERM);
    assert!(!Steering::is_pinned(&h.pin_dir), "pins left behind");
    wait_for("XDP detached", &h, Duration::from_secs(5), || {
        !h.pair.link_show(&h.pair.b, "vb").contains("xdp")
    });
    for pid in last {
        assert!(!alive(pid), "worker {pid} still running after SIGTERM");
    }
}

/// Whether a process runs (a zombie waiting for its reaper does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

#[test]
fn repeated_authentication_failures_put_the_source_on_the_blocklist() {
    if !require_root(
        "supervisor_netns::repeated_authentication_failures_put_the_source_on_the_blocklist",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = Harness::new();
    h.wait_ready();
    // Connections closed before any preamble (as the other tests do by the thousand) are no
    // authentication failure.
    drop(h.many(40, 4));
    // The default --block-after is 10, counted over all workers.
    for i in 0..10 {
        let (mut tls, w) = h
            .tls_connect()
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        // A well-formed preamble whose session id is not one: refused as session_invalid.
        let preamble = scm_proto::preamble::Preamble {
            session_id: "not-a-session".into(),
            app_id: "mail".into(),
            app_version: "1.0".into(),
            device_id: "device-1".into(),
            resource: "intranet".into(),
            mac: [0; 32],
        };
        tls.write_all(&preamble.encode().unwrap()).unwrap();
        tls.flush().unwrap();
        let mut reply = Vec::new();
        let _ = tls.read_to_end(&mut reply);
        assert!(
            !reply.is_empty(),
            "connection {i} (worker {w}): no refusal received"
        );
    }
    // The eleventh SYN from that address is dropped in XDP.
    let maps = h.maps();
    let before = maps.counters().unwrap();
    let to = SocketAddr::new(B_V4.parse().unwrap(), SERVICE);
    let blocked = in_netns(&h.pair.a, || {
        TcpStream::connect_timeout(&to, Duration::from_secs(1))
    });
    assert!(
        blocked.is_err(),
        "the source was not blocked:\n{}",
        h.supervisor_log()
    );
    let moved = maps.counters().unwrap().since(&before);
    assert!(
        moved.get(proxy_common::steer::SteerStat::DropBlocklist) >= 1,
        "{moved}"
    );
    assert!(
        h.supervisor_log().contains("blocked for"),
        "{}",
        h.supervisor_log()
    );
}

/// The blocklist does not read the logs: with every log line filtered out (RUST_LOG=off) the
/// workers still put a source failing authentication on it. Under the old log-matching feed,
/// any change to the refusal's log line (its wording, its module, its level, a compile-time
/// level cap) turned this off silently.
#[test]
fn authentication_failures_reach_the_blocklist_with_logging_off() {
    if !require_root(
        "supervisor_netns::authentication_failures_reach_the_blocklist_with_logging_off",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = Harness::with_rust_log("off");
    h.wait_ready();
    for i in 0..10 {
        let (mut tls, w) = h
            .tls_connect()
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let preamble = scm_proto::preamble::Preamble {
            session_id: "not-a-session".into(),
            app_id: "mail".into(),
            app_version: "1.0".into(),
            device_id: "device-1".into(),
            resource: "intranet".into(),
            mac: [0; 32],
        };
        tls.write_all(&preamble.encode().unwrap()).unwrap();
        tls.flush().unwrap();
        let mut reply = Vec::new();
        let _ = tls.read_to_end(&mut reply);
        assert!(
            !reply.is_empty(),
            "connection {i} (worker {w}): no refusal received"
        );
    }
    let maps = h.maps();
    let before = maps.counters().unwrap();
    let to = SocketAddr::new(B_V4.parse().unwrap(), SERVICE);
    let blocked = in_netns(&h.pair.a, || {
        TcpStream::connect_timeout(&to, Duration::from_secs(1))
    });
    assert!(
        blocked.is_err(),
        "the source was not blocked with RUST_LOG=off"
    );
    let moved = maps.counters().unwrap().since(&before);
    assert!(
        moved.get(proxy_common::steer::SteerStat::DropBlocklist) >= 1,
        "{moved}"
    );
    assert!(
        !h.supervisor_log().contains("blocked for"),
        "RUST_LOG=off still logged:\n{}",
        h.supervisor_log()
    );
}

#[test]
fn a_worker_that_cannot_start_stops_the_supervisor_with_the_reason() {
    if !require_root(
        "supervisor_netns::a_worker_that_cannot_start_stops_the_supervisor_with_the_reason",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pair = NetnsPair::create();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/scm-sup-bad-{}", std::process::id()));
    let _ = Steering::unpin(&pin_dir);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scm-proxy"));
    cmd.args(["serve", "--listen", &format!("{B_V4}:{SERVICE}")])
        .args([
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            "/nonexistent/key.pem",
        ])
        .args([
            "--security-url",
            "https://127.0.0.1:1",
            "--security-ca",
            "/nonexistent/ca.pem",
        ])
        .args([
            "--client-cert",
            "/nonexistent/c.pem",
            "--client-key",
            "/nonexistent/k.pem",
        ])
        .args(["--workers", "2"])
        .arg("--pin-dir")
        .arg(&pin_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = in_netns(&pair.b, || cmd.spawn()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("exited before listening"), "{stderr}");
    assert!(!Steering::is_pinned(&pin_dir), "pins left behind");
}

#[test]
fn a_completed_handshake_verifies_its_source() {
    if !require_root("supervisor_netns::a_completed_handshake_verifies_its_source") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = Harness::new();
    h.wait_ready();
    let device: std::net::IpAddr = support::A_V4.parse().unwrap();
    let maps = h.maps();
    assert!(
        !maps.is_verified(device).unwrap(),
        "verified before any connection"
    );
    // A real connection: the kernel completes the TCP handshake, the worker accepts it and
    // marks the source verified (XDP itself no longer does, from an ACK it cannot check).
    let (tls, w) = h.tls_connect().unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        "the accepting worker marking the source verified",
        &h,
        Duration::from_secs(5),
        || maps.is_verified(device).unwrap(),
    );
    eprintln!("verified after a handshake accepted by worker {w}");
    drop(tls);
}

/// A client that never resumes (every handshake is full, so it sees the certificate presented
/// now), trusting `roots`.
fn full_handshake_client(roots: &[rustls_pki_types::CertificateDer<'static>]) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let mut cfg = scm_proto::tls::client_builder()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// The certificate each worker presents to a new handshake (by slot), from connections until
/// every worker has been seen.
fn presented_by_worker(h: &Harness, client: &Arc<ClientConfig>) -> [Vec<u8>; 4] {
    let mut seen: [Vec<u8>; 4] = Default::default();
    let deadline = Instant::now() + Duration::from_secs(20);
    let to = SocketAddr::new(B_V4.parse().unwrap(), SERVICE);
    while seen.iter().any(Vec::is_empty) {
        assert!(Instant::now() < deadline, "not every worker answered");
        let tcp = in_netns(&h.pair.a, || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })
        .unwrap();
        let key = flow_key(tcp.local_addr().unwrap(), to);
        let conn = ClientConnection::new(client.clone(), B_V4.try_into().unwrap()).unwrap();
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).unwrap();
        }
        let worker = h
            .maps_cached()
            .as_ref()
            .unwrap()
            .flow(&key)
            .unwrap()
            .unwrap()
            .worker;
        seen[worker as usize] = tls.conn.peer_certificates().unwrap()[0].to_vec();
    }
    seen
}

#[test]
fn sighup_reloads_every_worker_in_place_and_a_bad_pair_is_refused() {
    if !require_root(
        "supervisor_netns::sighup_reloads_every_worker_in_place_and_a_bad_pair_is_refused",
    ) {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let h = Harness::new();
    h.wait_ready();
    let before = h.workers();
    let old = scm_proto::tls::load_certs(Path::new(&h.certs.path("cert.pem"))).unwrap();
    let mut held = h.many(8, 4);

    // A new pair, written as an operator's tooling would (rename over the old files).
    let ck =
        rcgen::generate_simple_self_signed(vec![B_V4.to_owned(), "renewed".to_owned()]).unwrap();
    let new = ck.cert.der().clone();
    std::fs::write(h.certs.path("new.pem"), ck.cert.pem()).unwrap();
    std::fs::write(h.certs.path("new.key"), ck.signing_key.serialize_pem()).unwrap();
    std::fs::rename(h.certs.path("new.pem"), h.certs.path("cert.pem")).unwrap();
    std::fs::rename(h.certs.path("new.key"), h.certs.path("key.pem")).unwrap();
    let client = full_handshake_client(&[old[0].clone(), new.clone()]);

    let sup = h.supervisor.as_ref().unwrap().id();
    kill(Pid::from_raw(sup as i32), Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while presented_by_worker(&h, &client)
        .iter()
        .any(|c| c.as_slice() != new.as_ref())
    {
        assert!(
            Instant::now() < deadline,
            "the workers do not all present the new certificate:\n{}",
            h.supervisor_log()
        );
        thread::sleep(Duration::from_millis(100));
    }
    // In place: the same processes, their connections untouched.
    let pids = |w: &[WorkerSlot]| w.iter().map(|w| w.pid).collect::<Vec<_>>();
    assert_eq!(pids(&h.workers()), pids(&before));
    for (tls, _) in held.iter_mut() {
        still_open(tls).expect("a connection from before the reload stays open");
    }
    let log = h.supervisor_log();
    assert_eq!(
        log.matches("reloaded: new handshakes get the new certificate")
            .count(),
        4,
        "{log}"
    );

    // A key that is not the certificate's: the supervisor refuses it, no worker is told.
    let stray = rcgen::KeyPair::generate().unwrap();
    std::fs::write(h.certs.path("key.pem"), stray.serialize_pem()).unwrap();
    kill(Pid::from_raw(sup as i32), Signal::SIGHUP).unwrap();
    wait_for("the refusal", &h, Duration::from_secs(10), || {
        h.supervisor_log()
            .contains("reload refused: the workers keep")
    });
    thread::sleep(Duration::from_millis(300));
    let log = h.supervisor_log();
    assert!(log.contains("does not hold the key"), "{log}");
    assert_eq!(
        log.matches("SIGHUP: reloading the device certificate")
            .count(),
        4,
        "no worker was sent the bad pair:\n{log}"
    );
    assert!(
        presented_by_worker(&h, &client)
            .iter()
            .all(|c| c.as_slice() == new.as_ref())
    );
    assert_eq!(pids(&h.workers()), pids(&before));
}

#[test]
fn sigterm_during_a_rolling_restart_is_acted_on_promptly() {
    if !require_root("supervisor_netns::sigterm_during_a_rolling_restart_is_acted_on_promptly") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut h = Harness::new();
    h.wait_ready();
    let before = h.workers();
    let mut held = h.many(80, 4);
    // Worker 0 drains for as long as these stay open (--drain-timeout 60s).
    held.retain(|(_, w)| *w == 0);
    assert!(!held.is_empty());
    let sup = h.supervisor.as_ref().unwrap().id();
    kill(Pid::from_raw(sup as i32), Signal::SIGUSR2).unwrap();
    let maps = || h.maps_cached().as_ref().unwrap().read_workers().unwrap();
    wait_for("worker 0 draining", &h, Duration::from_secs(10), || {
        maps()[0].state == proxy_common::steer::WorkerState::Draining as u32
    });

    // SIGTERM while the rolling restart waits on worker 0: acted on at once, not after it.
    kill(Pid::from_raw(sup as i32), Signal::SIGTERM).unwrap();
    wait_for(
        "the stop signal handled",
        &h,
        Duration::from_secs(3),
        || {
            h.supervisor_log()
                .contains("stop signal: the workers drain")
        },
    );
    // The idle workers finish draining at once; worker 0 still has its connections.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (1..4).any(|i| alive(before[i].pid)) {
        assert!(
            Instant::now() < deadline,
            "idle workers still running 5 s after SIGTERM"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(alive(before[0].pid), "worker 0 drains its open connections");
    for (tls, _) in held.iter_mut() {
        still_open(tls).expect("a draining worker's connection stays open");
    }
    // Its connections end: everything stops, with status 0, the pins removed.
    drop(held);
    let child = h.supervisor.as_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the supervisor did not exit within 10 s"
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}\n{}", h.supervisor_log());
    assert!(!alive(before[0].pid));
    assert!(!Steering::is_pinned(&h.pin_dir));
    h.supervisor = None;
}
