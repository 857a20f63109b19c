//! TLS set-up: the device-facing TLS 1.3 server config (its certificate reloadable on SIGHUP),
//! the client config (with client certificate) for the Security server, and the start-up
//! detection of kernel TLS.
//!
//! kTLS: after the handshake the proxy can hand the record keys to the kernel (the `ktls` crate)
//! so relaying is plain `read`/`write` on the socket. That needs the kernel's `tls` upper-layer
//! protocol (CONFIG_TLS). Start-up tries it on a loopback socket; without it the proxy keeps
//! rustls in user space, which is the same protocol on the wire.

use std::path::Path;
use std::sync::Arc;

use rustls::server::ResolvesServerCert;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use scm_proto::lifecycle::reload::CertReloader;

pub use scm_proto::tls::{TlsError, load_certs, load_key, provider};

/// The device-facing config presenting the pair `cert` holds at each handshake (a SIGHUP
/// reloads it in place): see [`device_server_config`].
pub fn server_config(
    cert: Arc<CertReloader>,
    ktls: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    finish_device_config(
        scm_proto::tls::server_builder(scm_proto::tls::TLS13_ONLY)?
            .with_no_client_auth()
            .with_cert_resolver(cert as Arc<dyn ResolvesServerCert>),
        ktls,
    )
}

/// The device-facing config: TLS 1.3 only, secret extraction enabled for kTLS.
///
/// On the user-space path the proxy issues stateless session tickets (keys kept in this
/// process's memory and rotated by rustls), so a device reconnecting to the same proxy process
/// resumes with a PSK + (EC)DHE handshake instead of a full one. Resumption does not weaken the
/// channel binding: the exporter depends on both hellos' randoms, so it is new on every
/// connection. On the kTLS path no tickets are sent: after the hand-off they would be records the
/// kernel path has to produce itself.
pub fn device_server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ktls: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let config = scm_proto::tls::server_builder(scm_proto::tls::TLS13_ONLY)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::rustls("proxy certificate and key"))?;
    finish_device_config(config, ktls)
}

/// Secret extraction and tickets, as [`device_server_config`] says.
fn finish_device_config(
    mut config: rustls::ServerConfig,
    ktls: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    // kTLS takes the traffic secrets out of rustls after the handshake.
    config.enable_secret_extraction = true;
    if ktls {
        config.send_tls13_tickets = 0;
    } else {
        config.send_tls13_tickets = 2;
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(TlsError::rustls("session ticket keys"))?;
    }
    Ok(config)
}

/// The config for calls to the Security server: trusts `ca`, presents the proxy's certificate.
pub fn security_client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = scm_proto::tls::roots(load_certs(ca)?, "Security server CA")?;
    scm_proto::tls::client_builder()?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(TlsError::rustls("proxy client certificate and key"))
}

/// Whether the kernel accepts the TLS upper-layer protocol on a TCP socket (what kTLS needs).
/// Tried on a throw-away loopback connection.
pub async fn kernel_supports_ktls() -> bool {
    use std::os::fd::AsRawFd as _;
    let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
        return false;
    };
    let Ok(addr) = listener.local_addr() else {
        return false;
    };
    let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    match (client, accepted) {
        (Ok(client), Ok(_)) => {
            let ulp = b"tls";
            // SAFETY: the fd is an open TCP socket owned by `client` for the whole call, and the
            // option value points to `ulp.len()` readable bytes.
            let rc = unsafe {
                libc::setsockopt(
                    client.as_raw_fd(),
                    libc::SOL_TCP,
                    libc::TCP_ULP,
                    ulp.as_ptr().cast(),
                    ulp.len() as libc::socklen_t,
                )
            };
            rc == 0
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::HandshakeKind;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// One handshake over an in-memory pipe; answers how the client saw it.
    async fn handshake(
        acceptor: &tokio_rustls::TlsAcceptor,
        connector: &tokio_rustls::TlsConnector,
    ) -> Option<HandshakeKind> {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = async {
            let mut tls = acceptor.accept(s).await.expect("server handshake");
            // Tickets go out after the handshake: a byte each way lets the client read them.
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.expect("server read");
            tls.write_all(&b).await.expect("server write");
            tls.flush().await.expect("server flush");
        };
        let client = async {
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, c).await.expect("client handshake");
            tls.write_all(b"x").await.expect("client write");
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.expect("client read");
            tls.get_ref().1.handshake_kind()
        };
        let ((), kind) = tokio::join!(server, client);
        kind
    }

    fn pair(ktls: bool) -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let server = device_server_config(vec![cert.clone()], key, ktls).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(scm_proto::tls::TLS13_ONLY)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (
            tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            tokio_rustls::TlsConnector::from(Arc::new(client)),
        )
    }

    #[tokio::test]
    async fn a_reconnecting_device_resumes_on_the_userspace_path() {
        let (acceptor, connector) = pair(false);
        assert_eq!(
            handshake(&acceptor, &connector).await,
            Some(HandshakeKind::Full)
        );
        assert_eq!(
            handshake(&acceptor, &connector).await,
            Some(HandshakeKind::Resumed)
        );
    }

    #[tokio::test]
    async fn no_tickets_on_the_ktls_path() {
        let (acceptor, connector) = pair(true);
        assert_eq!(
            handshake(&acceptor, &connector).await,
            Some(HandshakeKind::Full)
        );
        assert_eq!(
            handshake(&acceptor, &connector).await,
            Some(HandshakeKind::Full)
        );
    }
}
