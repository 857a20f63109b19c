//! Steering benchmark: new connections per second and throughput with the XDP + sk_lookup
//! steering in front of four accept loops, side by side with plain SO_REUSEPORT (four sockets on
//! one port, the kernel's own hash, no BPF) under the same load in the same run; the per-packet
//! cost of each program from the kernel's bpf_stats; and katran-style BPF_PROG_TEST_RUN timings
//! of the XDP paths.
//!
//! `cargo bench -p scm-proxy --bench steer` (root; it creates and deletes two network
//! namespaces and sets kernel.bpf_stats_enabled for its duration). A program that prints
//! figures, not a test: nothing here passes or fails.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::FromRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use proxy_common::{
    parse::{TCP_ACK, TCP_SYN},
    steer::{SteerConfig, WorkerState},
    testing::PacketBuilder,
};
use scm_proxy::{
    steer::{SteerOptions, Steering},
    xdp::AttachMode,
};
use support::{B_V4, NetnsPair, in_netns};

/// TLS handshakes per second through real `scm-proxy serve` processes.
mod proxy_rate {
    use std::{
        net::{SocketAddr, TcpStream},
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
        sync::{
            Arc,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        thread,
        time::{Duration, Instant},
    };

    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::{B_V4, CLIENT_THREADS, NetnsPair, RUN, SERVICE, in_netns};

    pub struct Certs {
        pub dir: PathBuf,
        pub client: Arc<ClientConfig>,
    }

    pub fn certs() -> Certs {
        let dir = std::env::temp_dir().join(format!("scm-steer-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec![B_V4.to_owned()]).unwrap();
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
        Certs { dir, client }
    }

    /// `scm-proxy serve` in namespace `b` with `extra` flags.
    pub fn start(pair: &NetnsPair, certs: &Certs, extra: &[&str]) -> Child {
        let p = |n: &str| certs.dir.join(n).to_str().unwrap().to_owned();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_scm-proxy"));
        cmd.args(["serve", "--listen", &format!("{B_V4}:{SERVICE}")])
            .args(["--tls-cert", &p("cert.pem"), "--tls-key", &p("key.pem")])
            .args([
                "--security-url",
                "https://127.0.0.1:1",
                "--security-ca",
                &p("cert.pem"),
            ])
            .args([
                "--client-cert",
                &p("cert.pem"),
                "--client-key",
                &p("key.pem"),
            ])
            .args(extra)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        in_netns(&pair.b, || cmd.spawn()).expect("starting scm-proxy")
    }

    fn handshake(ns: &str, config: &Arc<ClientConfig>) -> bool {
        let to = SocketAddr::new(B_V4.parse().unwrap(), SERVICE);
        let Ok(mut tcp) = in_netns(ns, || {
            TcpStream::connect_timeout(&to, Duration::from_secs(2))
        }) else {
            return false;
        };
        let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
        let Ok(mut conn) = ClientConnection::new(config.clone(), B_V4.try_into().unwrap()) else {
            return false;
        };
        while conn.is_handshaking() {
            if conn.complete_io(&mut tcp).is_err() {
                return false;
            }
        }
        true
    }

    /// Waits until a handshake succeeds several times in a row (all workers up).
    pub fn wait_ready(ns: &str, config: &Arc<ClientConfig>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut ok = 0;
        while ok < 50 {
            if handshake(ns, config) {
                ok += 1;
            } else {
                ok = 0;
                thread::sleep(Duration::from_millis(100));
            }
            assert!(Instant::now() < deadline, "scm-proxy did not come up");
        }
        // Let late workers register.
        thread::sleep(Duration::from_secs(2));
    }

    /// TLS handshakes per second, `CLIENT_THREADS` clients, and the failures.
    pub fn rate(ns: &str, config: &Arc<ClientConfig>) -> (f64, u64) {
        let stop = AtomicBool::new(false);
        let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
        let started = Instant::now();
        thread::scope(|s| {
            for _ in 0..CLIENT_THREADS {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        if handshake(ns, config) {
                            done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            thread::sleep(RUN);
            stop.store(true, Ordering::Relaxed);
        });
        (
            done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64(),
            failed.load(Ordering::Relaxed),
        )
    }

    pub fn stop(mut child: Child, pin_dir: Option<&Path>) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
        if let Some(dir) = pin_dir {
            let _ = scm_proxy::steer::Steering::unpin(dir);
        }
    }
}

const SERVICE: u16 = 443;
const WORKERS: usize = 4;
const CLIENT_THREADS: usize = 4;
const RUN: Duration = Duration::from_secs(4);

/// What a worker does with each connection.
#[derive(Clone, Copy)]
enum Mode {
    /// Write one byte and close: a new-connection benchmark.
    Greet,
    /// Read and discard until EOF: a throughput benchmark.
    Sink,
}

struct Workers {
    stop: Arc<AtomicBool>,
    accepted: Vec<Arc<AtomicU64>>,
    bytes: Arc<AtomicU64>,
    listeners: Vec<Arc<TcpListener>>,
}

impl Workers {
    fn start(listeners: Vec<TcpListener>, mode: Mode) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let listeners: Vec<Arc<TcpListener>> = listeners.into_iter().map(Arc::new).collect();
        let mut accepted = Vec::new();
        for l in &listeners {
            let (l, stop, bytes) = (l.clone(), stop.clone(), bytes.clone());
            let count = Arc::new(AtomicU64::new(0));
            accepted.push(count.clone());
            thread::spawn(move || {
                while let Ok((mut c, _)) = l.accept() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                    match mode {
                        Mode::Greet => {
                            let _ = c.write_all(b"w");
                        }
                        Mode::Sink => {
                            let bytes = bytes.clone();
                            thread::spawn(move || {
                                let mut buf = vec![0u8; 256 * 1024];
                                while let Ok(n) = c.read(&mut buf) {
                                    if n == 0 {
                                        break;
                                    }
                                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                                }
                            });
                        }
                    }
                }
            });
        }
        Self {
            stop,
            accepted,
            bytes,
            listeners,
        }
    }

    fn spread(&self) -> Vec<u64> {
        self.accepted
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for l in &self.listeners {
            // SAFETY: shutdown(2) on a listener we own, to wake its accept loop.
            unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&**l), libc::SHUT_RDWR) };
        }
    }
}

/// A listener with SO_REUSEPORT on `addr`.
fn reuseport_listener(addr: SocketAddr) -> TcpListener {
    // SAFETY: plain socket syscalls on a descriptor we create and then hand to TcpListener; each
    // result is checked.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEPORT, libc::SO_REUSEADDR] {
            assert_eq!(
                libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&raw const one).cast(), 4),
                0
            );
        }
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 only")
        };
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        assert_eq!(
            libc::bind(
                fd,
                (&raw const sin).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32
            ),
            0,
            "bind {addr}: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::listen(fd, 4096), 0);
        TcpListener::from_raw_fd(fd)
    }
}

/// New connections per second from namespace `ns` to `to`, `CLIENT_THREADS` clients.
fn conn_rate(ns: &str, to: SocketAddr) -> (f64, u64) {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let started = Instant::now();
    thread::scope(|s| {
        for _ in 0..CLIENT_THREADS {
            s.spawn(|| {
                in_netns(ns, || {
                    while !stop.load(Ordering::Relaxed) {
                        match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                            Ok(mut c) => {
                                let mut b = [0u8; 1];
                                if c.read_exact(&mut b).is_ok() {
                                    done.fetch_add(1, Ordering::Relaxed);
                                } else {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            });
        }
        thread::sleep(RUN);
        stop.store(true, Ordering::Relaxed);
    });
    let secs = started.elapsed().as_secs_f64();
    (
        done.load(Ordering::Relaxed) as f64 / secs,
        errors.load(Ordering::Relaxed),
    )
}

/// Bulk throughput in Gbit/s over `conns` connections from `ns` to `to`.
fn throughput(ns: &str, to: SocketAddr, workers: &Workers, conns: usize) -> f64 {
    let stop = AtomicBool::new(false);
    let before = workers.bytes.load(Ordering::Relaxed);
    let started = Instant::now();
    thread::scope(|s| {
        for _ in 0..conns {
            s.spawn(|| {
                in_netns(ns, || {
                    let mut c = TcpStream::connect(to).expect("connect");
                    let chunk = vec![0x5au8; 64 * 1024];
                    while !stop.load(Ordering::Relaxed) {
                        if c.write_all(&chunk).is_err() {
                            break;
                        }
                    }
                })
            });
        }
        thread::sleep(RUN);
        stop.store(true, Ordering::Relaxed);
    });
    let secs = started.elapsed().as_secs_f64();
    (workers.bytes.load(Ordering::Relaxed) - before) as f64 * 8.0 / secs / 1e9
}

struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn enable() -> Self {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let previous = std::fs::read_to_string(path).unwrap_or_else(|_| "0".into());
        std::fs::write(path, "1").expect("setting kernel.bpf_stats_enabled");
        Self { previous }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", self.previous.trim());
    }
}

fn per_run(before: (Duration, u64), after: (Duration, u64)) -> (f64, u64) {
    let runs = after.1.saturating_sub(before.1);
    let ns = after.0.saturating_sub(before.0).as_nanos() as f64;
    (if runs == 0 { 0.0 } else { ns / runs as f64 }, runs)
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("the steering benchmark needs root (BPF, network namespaces); skipped");
        return;
    }
    let to = SocketAddr::new(B_V4.parse().unwrap(), SERVICE);
    println!(
        "scm steering benchmark: {WORKERS} workers (accept loops), {CLIENT_THREADS} client \
         threads, {} s per run, veth pair between two namespaces, {} CPUs",
        RUN.as_secs(),
        thread::available_parallelism().map_or(1, |n| n.get())
    );

    // Plain SO_REUSEPORT: four sockets on the service port, no BPF anywhere.
    let (plain_rate, plain_err, plain_spread, plain_tput) = {
        let pair = NetnsPair::create();
        let listeners = (0..WORKERS)
            .map(|_| in_netns(&pair.b, || reuseport_listener(to)))
            .collect();
        let w = Workers::start(listeners, Mode::Greet);
        let (rate, err) = conn_rate(&pair.a, to);
        let spread = w.spread();
        drop(w);
        let listeners = (0..WORKERS)
            .map(|_| {
                in_netns(&pair.b, || {
                    reuseport_listener(SocketAddr::new(to.ip(), 8443))
                })
            })
            .collect();
        let w = Workers::start(listeners, Mode::Sink);
        let tput = throughput(&pair.a, SocketAddr::new(to.ip(), 8443), &w, 8);
        (rate, err, spread, tput)
    };

    // XDP (native, on vb) + sk_lookup steering to four sockets on their own ports.
    let stats = BpfStats::enable();
    let pair = NetnsPair::create();
    let mut st = Steering::load(&SteerOptions::default()).expect("loading");
    in_netns(&pair.b, || st.attach_xdp("vb", AttachMode::Native)).expect("attach XDP");
    let netns = File::open(format!("/run/netns/{}", pair.b)).unwrap();
    st.attach_sk_lookup(&netns).expect("attach sk_lookup");
    st.set_config(&SteerConfig {
        service_port: SERVICE.into(),
        ..SteerConfig::default()
    })
    .unwrap();
    let listeners: Vec<TcpListener> = (0..WORKERS)
        .map(|_| in_netns(&pair.b, || TcpListener::bind("0.0.0.0:0").unwrap()))
        .collect();
    for (i, l) in listeners.iter().enumerate() {
        st.register_socket(i as u32, l).unwrap();
        st.set_worker(i as u32, WorkerState::Healthy, 0).unwrap();
    }
    let w = Workers::start(listeners, Mode::Greet);
    let (x0, l0) = (
        st.ingress().run_stats().unwrap(),
        st.lookup_run_stats().unwrap(),
    );
    let (xdp_rate, xdp_err) = conn_rate(&pair.a, to);
    let (x1, l1) = (
        st.ingress().run_stats().unwrap(),
        st.lookup_run_stats().unwrap(),
    );
    let xdp_spread = w.spread();
    drop(w);
    // Registering the new sockets replaces the closed ones' slots (the kernel emptied them).
    let listeners: Vec<TcpListener> = (0..WORKERS)
        .map(|_| in_netns(&pair.b, || TcpListener::bind("0.0.0.0:0").unwrap()))
        .collect();
    for (i, l) in listeners.iter().enumerate() {
        st.register_socket(i as u32, l).unwrap();
    }
    let w = Workers::start(listeners, Mode::Sink);
    let x2 = st.ingress().run_stats().unwrap();
    let xdp_tput = throughput(&pair.a, to, &w, 8);
    let x3 = st.ingress().run_stats().unwrap();
    drop(w);

    // The same without XDP: sk_lookup alone steers (what loopback and XDP-less NICs get).
    st.detach_xdp().unwrap();
    let fresh = |st: &mut Steering, mode| {
        let listeners: Vec<TcpListener> = (0..WORKERS)
            .map(|_| in_netns(&pair.b, || TcpListener::bind("0.0.0.0:0").unwrap()))
            .collect();
        for (i, l) in listeners.iter().enumerate() {
            st.register_socket(i as u32, l).unwrap();
        }
        Workers::start(listeners, mode)
    };
    let w = fresh(&mut st, Mode::Greet);
    let l2 = st.lookup_run_stats().unwrap();
    let (lookup_rate, lookup_err) = conn_rate(&pair.a, to);
    let l3 = st.lookup_run_stats().unwrap();
    let lookup_spread = w.spread();
    drop(w);
    let w = fresh(&mut st, Mode::Sink);
    let lookup_tput = throughput(&pair.a, to, &w, 8);
    drop(w);
    drop(stats);

    let (xdp_conn_ns, xdp_conn_runs) = per_run(x0, x1);
    let (lookup_ns, lookup_runs) = per_run(l0, l1);
    let (lookup_only_ns, lookup_only_runs) = per_run(l2, l3);
    let (xdp_bulk_ns, xdp_bulk_runs) = per_run(x2, x3);

    println!();
    println!(
        "{:<32} {:>26} {:>26} {:>26}",
        "", "SO_REUSEPORT (no BPF)", "XDP + sk_lookup", "sk_lookup alone"
    );
    println!(
        "{:<32} {:>26.0} {:>26.0} {:>26.0}",
        "new connections/s", plain_rate, xdp_rate, lookup_rate
    );
    println!(
        "{:<32} {:>26} {:>26} {:>26}",
        "failed connections", plain_err, xdp_err, lookup_err
    );
    println!(
        "{:<32} {:>26} {:>26} {:>26}",
        "spread over workers",
        format!("{plain_spread:?}"),
        format!("{xdp_spread:?}"),
        format!("{lookup_spread:?}")
    );
    println!(
        "{:<32} {:>26.2} {:>26.2} {:>26.2}",
        "throughput, 8 streams (Gbit/s)", plain_tput, xdp_tput, lookup_tput
    );
    println!(
        "(native XDP on a veth turns off its GRO/TSO aggregation: with XDP the stack sees \
         MTU-sized frames instead of 64 KiB ones, which is most of the throughput gap)"
    );
    println!();
    println!("per-run cost from bpf_stats (run_time_ns / run_cnt):");
    println!("  scm_ingress, connection run        {xdp_conn_ns:>8.1} ns  ({xdp_conn_runs} runs)");
    println!("  scm_ingress, throughput run        {xdp_bulk_ns:>8.1} ns  ({xdp_bulk_runs} runs)");
    println!("  scm_lookup, connection run (XDP)   {lookup_ns:>8.1} ns  ({lookup_runs} runs)");
    println!(
        "  scm_lookup, connection run (alone) {lookup_only_ns:>8.1} ns  ({lookup_only_runs} runs)"
    );

    // Through the real proxy: TLS handshakes per second (the proxy's work, not the steering's,
    // dominates; this shows the steered workers carry it).
    let certs = proxy_rate::certs();
    let one = {
        let pair = NetnsPair::create();
        let child = proxy_rate::start(&pair, &certs, &[]);
        proxy_rate::wait_ready(&pair.a, &certs.client);
        let r = proxy_rate::rate(&pair.a, &certs.client);
        proxy_rate::stop(child, None);
        r
    };
    let steered = {
        let pair = NetnsPair::create();
        let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/scm-bench-{}", std::process::id()));
        let pin_arg = pin.to_str().unwrap().to_owned();
        let child = proxy_rate::start(
            &pair,
            &certs,
            &[
                "--workers",
                "4",
                "--steer-iface",
                "vb",
                "--xdp-mode",
                "native",
                "--pin-dir",
                &pin_arg,
            ],
        );
        proxy_rate::wait_ready(&pair.a, &certs.client);
        let r = proxy_rate::rate(&pair.a, &certs.client);
        proxy_rate::stop(child, Some(&pin));
        r
    };
    let _ = std::fs::remove_dir_all(&certs.dir);
    println!();
    println!(
        "{:<32} {:>26} {:>26}",
        "through scm-proxy (TLS 1.3)", "one process, no BPF", "4 workers, XDP + sk_lookup"
    );
    println!("{:<32} {:>26.0} {:>26.0}", "handshakes/s", one.0, steered.0);
    println!("{:<32} {:>26} {:>26}", "failed", one.1, steered.1);

    // Katran style: the XDP paths alone, BPF_PROG_TEST_RUN with repeat.
    let repeat = 1_000_000;
    let src = [198, 51, 100, 1];
    let dst = [192, 0, 2, 100];
    let syn = PacketBuilder::ipv4(src, dst)
        .tcp(40000, SERVICE, TCP_SYN)
        .build();
    let ack = PacketBuilder::ipv4(src, dst)
        .tcp(40000, SERVICE, TCP_ACK)
        .payload(&[0; 64])
        .build();
    let other = PacketBuilder::ipv4(src, dst)
        .udp(5353, 53)
        .payload(&[0; 64])
        .build();
    println!();
    println!("BPF_PROG_TEST_RUN, {repeat} runs each (one CPU):");
    for (name, frame) in [
        ("not the service port (UDP)", &other),
        ("SYN, new flow then retransmission", &syn),
        ("established flow (ACK + data)", &ack),
    ] {
        let (action, per) = st.ingress().test_run_repeat(frame, repeat).unwrap();
        println!(
            "  {name:<36} {:>8} ns/packet  {:>6.2} Mpps  (action {action})",
            per.as_nanos(),
            1e3 / per.as_nanos().max(1) as f64
        );
    }
}
