//! The PROXY protocol v2 header a TCP balancer (HAProxy `send-proxy-v2`, ...) puts before a
//! device's bytes, so the per-source limit, the logs and `x-forwarded-for` see the device's
//! address rather than the balancer's. Read only from the addresses `--proxy-protocol-from`
//! lists, and required from them: a header from anyone else would let a device choose the
//! address it is limited and logged under.
//!
//! Exactly the header's bytes are read (16, then the length it gives), so the TLS ClientHello
//! after it is untouched; the parse is the `ppp` crate's.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::v2::{Addresses, Command, Header, PROTOCOL_PREFIX};
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The longest header taken: addresses (at most 216 bytes, AF_UNIX) and TLVs. HAProxy sends a
/// few dozen bytes; anything near the u16 limit is not a balancer.
pub(super) const MAX_HEADER: usize = 1024;

/// The fixed part: the 12-byte signature, version and command, family and protocol, length.
const MINIMUM_LENGTH: usize = 16;

/// Why a connection from a listed balancer was closed before TLS.
#[derive(Debug, thiserror::Error)]
pub(super) enum HeaderError {
    /// The peer closed before sending anything: a balancer's plain TCP health check.
    #[error("closed before a PROXY header (a TCP health check)")]
    Closed,
    /// Nothing complete within the bound.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The first bytes are not the v2 signature (a device connecting directly through an
    /// address the balancers use, or a v1 text header).
    #[error("the connection does not start with a PROXY protocol v2 header")]
    NotProxy,
    /// The header says it is longer than [`MAX_HEADER`].
    #[error("PROXY header of {0} bytes (at most {MAX_HEADER})")]
    TooLong(usize),
    /// The header does not parse.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    /// A read failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

impl HeaderError {
    /// The `errors_total` class.
    pub(super) fn class(&self) -> &'static str {
        match self {
            HeaderError::Closed => "proxy_header_closed",
            HeaderError::Timeout(_) => "proxy_header_timeout",
            _ => "proxy_header_bad",
        }
    }
}

/// Reads one header. `Ok(Some(source))`: the device's address; `Ok(None)`: a `LOCAL` header
/// (the balancer speaking for itself, as in a health check) or one without IP addresses, so the
/// connection keeps the balancer's address.
pub(super) async fn read<S: AsyncRead + Unpin>(
    io: &mut S,
    within: Duration,
) -> Result<Option<SocketAddr>, HeaderError> {
    match tokio::time::timeout(within, read_now(io)).await {
        Ok(r) => r,
        Err(_) => Err(HeaderError::Timeout(within)),
    }
}

async fn read_now<S: AsyncRead + Unpin>(io: &mut S) -> Result<Option<SocketAddr>, HeaderError> {
    let mut buf = vec![0u8; MINIMUM_LENGTH];
    let mut got = 0;
    while got < MINIMUM_LENGTH {
        let n = io.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                HeaderError::Closed
            } else {
                HeaderError::Malformed(format!("closed after {got} bytes"))
            });
        }
        got += n;
        // Refuse at the first byte that cannot be the signature, without waiting for more.
        let seen = got.min(PROTOCOL_PREFIX.len());
        if buf[..seen] != PROTOCOL_PREFIX[..seen] {
            return Err(HeaderError::NotProxy);
        }
    }
    let len = MINIMUM_LENGTH + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_HEADER {
        return Err(HeaderError::TooLong(len));
    }
    buf.resize(len, 0);
    io.read_exact(&mut buf[MINIMUM_LENGTH..])
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                HeaderError::Malformed("closed inside the header".into())
            }
            _ => HeaderError::Io(e),
        })?;
    let header =
        Header::try_from(buf.as_slice()).map_err(|e| HeaderError::Malformed(e.to_string()))?;
    Ok(match (header.command, header.addresses) {
        (Command::Local, _) => None,
        (Command::Proxy, Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (Command::Proxy, Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (Command::Proxy, Addresses::Unspecified | Addresses::Unix(_)) => None,
    })
}

/// A `PROXY` header for `source` -> `destination`, as a balancer writes it (for tests).
#[cfg(test)]
pub(super) fn encode(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    use ppp::v2::{Builder, Protocol, Version};
    Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        (source, destination),
    )
    .build()
    .expect("a header with two addresses")
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    async fn read_all(bytes: &[u8]) -> (Result<Option<SocketAddr>, HeaderError>, Vec<u8>) {
        let mut io = bytes;
        let r = read(&mut io, T).await;
        (r, io.to_vec())
    }

    #[tokio::test]
    async fn the_device_address_and_nothing_after_the_header_is_consumed() {
        for (src, dst) in [
            ("203.0.113.7:51000", "198.51.100.1:443"),
            ("[2001:db8::7]:51000", "[2001:db8::1]:443"),
        ] {
            let mut bytes = encode(addr(src), addr(dst));
            bytes.extend_from_slice(b"\x16\x03\x01 the ClientHello");
            let (r, rest) = read_all(&bytes).await;
            assert_eq!(r.unwrap(), Some(addr(src)));
            assert_eq!(rest, b"\x16\x03\x01 the ClientHello");
        }
    }

    #[tokio::test]
    async fn a_local_header_keeps_the_balancer_address() {
        let mut bytes = PROTOCOL_PREFIX.to_vec();
        bytes.extend_from_slice(&[0x20, 0x00, 0, 0]);
        let (r, rest) = read_all(&bytes).await;
        assert_eq!(r.unwrap(), None);
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn each_bad_start_gets_its_own_error() {
        // A device's ClientHello where a header must be: refused at its first byte.
        let (r, _) = read_all(b"\x16\x03\x01\x02\x00 and more").await;
        assert!(matches!(r, Err(HeaderError::NotProxy)), "{r:?}");
        // A v1 text header.
        let (r, _) = read_all(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n").await;
        assert!(matches!(r, Err(HeaderError::NotProxy)), "{r:?}");
        // Nothing at all: a health check.
        let (r, _) = read_all(b"").await;
        assert!(matches!(r, Err(HeaderError::Closed)), "{r:?}");
        // Cut inside the fixed part, and inside the addresses.
        let full = encode(addr("10.0.0.1:1"), addr("10.0.0.2:2"));
        let (r, _) = read_all(&full[..10]).await;
        assert!(matches!(r, Err(HeaderError::Malformed(_))), "{r:?}");
        let (r, _) = read_all(&full[..full.len() - 1]).await;
        assert!(matches!(r, Err(HeaderError::Malformed(_))), "{r:?}");
        // A length past the bound, refused before reading it.
        let mut long = PROTOCOL_PREFIX.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let (r, _) = read_all(&long).await;
        assert!(matches!(r, Err(HeaderError::TooLong(65551))), "{r:?}");
        // A version other than 2.
        let mut v3 = full.clone();
        v3[12] = 0x31;
        let (r, _) = read_all(&v3).await;
        assert!(matches!(r, Err(HeaderError::Malformed(_))), "{r:?}");
    }

    #[tokio::test]
    async fn a_header_that_never_completes_times_out() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, &PROTOCOL_PREFIX[..5])
            .await
            .unwrap();
        let r = read(&mut server, Duration::from_millis(100)).await;
        assert!(matches!(r, Err(HeaderError::Timeout(_))), "{r:?}");
        drop(client);
    }
}
