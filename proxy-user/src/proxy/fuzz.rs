//! Entry points of the fuzz targets (`fuzz/`) and of the corpus replay test
//! (`tests/tests/fuzz_corpora.rs`): each hands arbitrary bytes to the code the proxy runs on
//! input from the network, and panics only where that code broke a property it promises.

use std::net::SocketAddr;

use super::http::{Identity, rewrite_head};
use super::security_client::{LineBuffer, parse_event};

/// The revocation stream's reader: the bytes (after a first byte giving the chunk size, so
/// that lines cross chunk boundaries as they do on the network) fed to the line buffer, each
/// complete line parsed as an event. The number of events read.
pub fn revocation_stream(data: &[u8]) -> usize {
    let Some((&chunk, rest)) = data.split_first() else {
        return 0;
    };
    let mut lines = LineBuffer::default();
    let mut events = 0;
    for piece in rest.chunks(usize::from(chunk.max(1))) {
        for line in lines.push(piece) {
            assert!(line.len() <= LineBuffer::MAX_LINE, "a line over the bound");
            if let Ok(Some(_)) = parse_event(&line) {
                events += 1;
            }
        }
    }
    events
}

/// The http mode's rewrite of a device's request head (parsed from the bytes as HTTP/1.1, as
/// hyper would): whatever the device sent, the head that goes to the back end targets the back
/// end, names the session's user, device and app as the proxy set them, carries the device's
/// address as `x-forwarded-for`, and has no hop-by-hop header and no other identity or
/// forwarding header. Whether the bytes parsed as a head.
pub fn http_head(data: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(data), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    let mut builder = hyper::Request::builder()
        .method(req.method.unwrap_or("GET"))
        .uri(req.path.unwrap_or("/"));
    for h in req.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    // A head hyper itself would refuse (a bad name, value or target) never reaches the proxy.
    let Ok(request) = builder.body(()) else {
        return false;
    };
    let (mut head, ()) = request.into_parts();
    let identity = Identity {
        user: "alice".into(),
        groups: vec!["staff".into()],
        device_id: "phone-1".into(),
        app: "mail/1.0.0".into(),
    };
    let peer = SocketAddr::from(([198, 51, 100, 7], 40_000));
    if rewrite_head(&mut head, "10.0.0.7:80", &identity, peer).is_err() {
        return false;
    }
    assert_eq!(
        head.uri.authority().map(|a| a.as_str()),
        Some("10.0.0.7:80")
    );
    let one = |name: &str| {
        let all: Vec<_> = head.headers.get_all(name).iter().collect();
        assert_eq!(all.len(), 1, "{name}: {all:?}");
        all[0].to_str().unwrap_or_default().to_owned()
    };
    assert_eq!(one("x-scm-user"), "alice");
    assert_eq!(one("x-scm-groups"), "staff");
    assert_eq!(one("x-scm-device"), "phone-1");
    assert_eq!(one("x-scm-app"), "mail/1.0.0");
    assert_eq!(one("x-forwarded-for"), "198.51.100.7");
    for name in head.headers.keys() {
        let n = name.as_str();
        let ours = ["x-scm-user", "x-scm-groups", "x-scm-device", "x-scm-app"].contains(&n)
            || n == "x-forwarded-for";
        let forbidden = n.starts_with("x-scm") && !ours
            || n.starts_with("x_scm")
            || n.starts_with("x-forwarded") && !ours
            || n.starts_with("x_forwarded")
            || ["forwarded", "x-real-ip", "x_real_ip"].contains(&n)
            || [
                "connection",
                "keep-alive",
                "proxy-connection",
                "te",
                "trailer",
                "transfer-encoding",
                "upgrade",
            ]
            .contains(&n);
        assert!(!forbidden, "{n} reached the back end");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spoofed_head_is_cleaned() {
        let head =
            b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-Scm-User: mallory\r\nx_scm_groups: admins\r\n\
            Forwarded: for=1.2.3.4\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: close, x-keep\r\n\
            x-keep: 1\r\n\r\n";
        assert!(http_head(head));
        assert!(!http_head(b"GET / HTTP/1.1\r\nHost"));
    }

    #[test]
    fn events_across_chunks() {
        let line = br#"{"type":"catalog_changed"}"#;
        let mut data = vec![3u8];
        for _ in 0..4 {
            data.extend_from_slice(line);
            data.push(b'\n');
        }
        assert_eq!(revocation_stream(&data), 4);
        assert_eq!(revocation_stream(b""), 0);
    }
}
