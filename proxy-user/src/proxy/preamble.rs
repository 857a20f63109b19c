//! Reading the device's preamble off a stream: the header first (so an oversized or wrong-version
//! frame is refused before its body is read), then exactly the declared body, all under one
//! deadline so a slow sender cannot hold a task. Also writing the one-frame reply.

use std::time::Duration;

use scm_proto::preamble::{HEADER_LEN, Preamble, PreambleError, Reply, Status, body_len};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why no preamble could be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(super) enum ReadError {
    /// The bytes are not a valid preamble.
    #[error(transparent)]
    Invalid(#[from] PreambleError),
    /// The whole preamble did not arrive within the deadline.
    #[error("preamble not received within {0:?}")]
    Timeout(Duration),
    /// The device closed the connection before the preamble was complete.
    #[error("connection closed before the preamble was complete")]
    Closed,
    /// The connection failed.
    #[error("reading the preamble: {0}")]
    Io(std::io::Error),
}

impl ReadError {
    /// A short label for the errors metric.
    pub(super) fn class(&self) -> &'static str {
        match self {
            ReadError::Invalid(PreambleError::TooLong(_)) => "preamble_oversized",
            ReadError::Invalid(_) => "preamble_malformed",
            ReadError::Timeout(_) => "preamble_timeout",
            ReadError::Closed => "preamble_truncated",
            ReadError::Io(_) => "preamble_io",
        }
    }
}

fn io_error(e: std::io::Error) -> ReadError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ReadError::Closed
    } else {
        ReadError::Io(e)
    }
}

/// Reads and decodes one preamble, giving up after `deadline`. Never buffers more than
/// [`scm_proto::preamble::MAX_BODY_LEN`] bytes.
pub(super) async fn read_preamble<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: Duration,
) -> Result<Preamble, ReadError> {
    let read = async {
        let mut header = [0u8; HEADER_LEN];
        stream.read_exact(&mut header).await.map_err(io_error)?;
        let len = body_len(&header)?;
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await.map_err(io_error)?;
        Ok(Preamble::decode_body(&body)?)
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| ReadError::Timeout(deadline))?
}

/// Writes the reply and flushes it. A refusal is followed by a TLS close by the caller.
pub(super) async fn write_reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: Status,
    reason: &str,
) -> std::io::Result<()> {
    let reply = Reply {
        status,
        reason: reason.to_owned(),
    };
    stream.write_all(&reply.encode()).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Vec<u8> {
        Preamble {
            session_id: "S".repeat(43),
            app_id: "mail".into(),
            app_version: "1.0".into(),
            device_id: "phone".into(),
            resource: "echo".into(),
            mac: [1; 32],
        }
        .encode()
        .unwrap()
    }

    #[tokio::test]
    async fn reads_a_whole_preamble_and_leaves_the_rest() {
        let mut bytes = frame();
        bytes.extend_from_slice(b"payload");
        let mut r = bytes.as_slice();
        let p = read_preamble(&mut r, Duration::from_secs(1)).await.unwrap();
        assert_eq!(p.resource, "echo");
        assert_eq!(r, b"payload");
    }

    #[tokio::test]
    async fn oversized_is_refused_from_the_header_alone() {
        // Only the header exists: if the reader tried to read the body it would report Closed.
        let mut r: &[u8] = &[1, 0x10, 0x00];
        let e = read_preamble(&mut r, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(
            e,
            ReadError::Invalid(PreambleError::TooLong(4096))
        ));
        assert_eq!(e.class(), "preamble_oversized");
    }

    #[tokio::test]
    async fn truncated_and_malformed() {
        let f = frame();
        let mut r = &f[..f.len() - 1];
        let e = read_preamble(&mut r, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Closed), "{e}");
        let mut bad = f.clone();
        bad[0] = 9;
        let e = read_preamble(&mut bad.as_slice(), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Invalid(PreambleError::Version(9))));
        let mut bad = f.clone();
        bad[4] = b' ';
        let e = read_preamble(&mut bad.as_slice(), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.class(), "preamble_malformed");
    }

    #[tokio::test]
    async fn slow_sender_hits_the_deadline() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let f = frame();
        tokio::io::AsyncWriteExt::write_all(&mut client, &f[..10])
            .await
            .unwrap();
        let e = read_preamble(&mut server, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Timeout(_)));
        drop(client);
    }

    #[tokio::test]
    async fn reply_is_decodable() {
        let mut out = Vec::new();
        write_reply(&mut out, Status::Forbidden, "no")
            .await
            .unwrap();
        let (s, len) = Reply::decode_header(out[..4].try_into().unwrap()).unwrap();
        assert_eq!((s, len), (Status::Forbidden, 2));
        assert_eq!(&out[4..], b"no");
    }
}
