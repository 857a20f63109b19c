//! The proxy hands its authentication failures to its refusal sink as typed values, whatever
//! the logs do: here no `tracing` subscriber is installed at all (every log line is dropped),
//! and a device presenting a session id that is not one still reaches the sink, with its
//! address and the reason; a garbled preamble does not (it is no authentication failure).
//!
//! Before the typed channel, the blocklist was fed by a `tracing` layer matching the log line
//! "connection refused" of target `scm_proxy::proxy::server`: a proxy started as a library, or
//! with that line reworded, fed nothing. This test runs the real proxy (real TLS) in-process.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use clap::Parser as _;
use rustls::pki_types::ServerName;
use scm_proxy::proxy::{
    AuthFailure, AuthFailureKind, RefusalSink, ServeArgs, ServeHooks, serve_with,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Debug, clap::Parser)]
struct Flags {
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Default)]
struct Recorder(Mutex<Vec<AuthFailure>>);

impl RefusalSink for Recorder {
    fn auth_failure(&self, failure: AuthFailure) {
        self.0.lock().unwrap().push(failure);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends `bytes` after the TLS handshake and reads the proxy's reply to the end; returns the
/// client's own address (the peer the proxy saw).
async fn send(
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    bytes: &[u8],
) -> (SocketAddr, Vec<u8>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(bytes).await.unwrap();
    tls.flush().await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut reply)).await;
    (local, reply)
}

#[tokio::test]
async fn an_authentication_failure_reaches_the_sink_with_no_logging_at_all() {
    let dir = std::env::temp_dir().join(format!("scm-refusals-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let port = free_port();
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let flags = Flags::parse_from([
        "scm-proxy",
        "--listen",
        &listen.to_string(),
        "--tls-cert",
        cert_s,
        "--tls-key",
        key_s,
        // Nothing listens there: a malformed session id is refused before any validation.
        "--security-url",
        "https://127.0.0.1:1",
        "--security-ca",
        cert_s,
        "--client-cert",
        cert_s,
        "--client-key",
        key_s,
        "--tls-path",
        "userspace",
    ]);
    let recorder = Arc::new(Recorder::default());
    let proxy = tokio::spawn(serve_with(
        flags.serve,
        ServeHooks::with_refusals(recorder.clone()),
    ));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let client = Arc::new(
        scm_proto::tls::client_builder()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the proxy did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Garbled bytes: refused bad_preamble, which is no authentication failure.
    let (_, reply) = send(listen, client.clone(), &[0xff; 64]).await;
    assert!(!reply.is_empty(), "no refusal for a garbled preamble");
    assert_eq!(*recorder.0.lock().unwrap(), vec![]);

    // A well-formed preamble whose session id is not one: refused session_invalid.
    let preamble = scm_proto::preamble::Preamble {
        session_id: "not-a-session".into(),
        app_id: "mail".into(),
        app_version: "1.0".into(),
        device_id: "device-1".into(),
        resource: "intranet".into(),
        mac: [0; 32],
    };
    let (peer, reply) = send(listen, client, &preamble.encode().unwrap()).await;
    assert!(!reply.is_empty(), "no refusal for an invalid session");
    assert_eq!(
        *recorder.0.lock().unwrap(),
        vec![AuthFailure {
            peer,
            kind: AuthFailureKind::SessionInvalid
        }]
    );
    proxy.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
