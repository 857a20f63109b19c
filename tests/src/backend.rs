//! Small real back ends on 127.0.0.1: a TCP echo server (it answers a half-close by finishing its
//! echo and closing) and an HTTP/1.1 server that answers each request with a JSON description of
//! it (method, path, headers), so tests can see exactly what the proxy forwarded.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// Starts a TCP echo server on an ephemeral port; returns its address.
pub async fn echo() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve_echo(listener));
    Ok(addr)
}

/// Echoes every connection of `listener` until the peer half-closes, then closes.
pub async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown().await;
        });
    }
}

/// What the HTTP back end saw, as it reports it in its JSON answer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Seen {
    /// Request method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers (lower-case names; repeated headers joined with ", ").
    pub headers: BTreeMap<String, String>,
    /// Body length.
    pub body_len: usize,
}

/// Starts the HTTP back end on an ephemeral port; returns its address.
pub async fn http() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(serve_http(listener));
    Ok(addr)
}

/// Serves the describing HTTP back end on `listener`.
pub async fn serve_http(listener: TcpListener) {
    loop {
        let Ok((s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let mut headers = BTreeMap::new();
                    for (k, v) in req.headers() {
                        let v = v.to_str().unwrap_or("<binary>").to_owned();
                        headers
                            .entry(k.as_str().to_owned())
                            .and_modify(|e: &mut String| {
                                e.push_str(", ");
                                e.push_str(&v);
                            })
                            .or_insert(v);
                    }
                    let method = req.method().to_string();
                    let path = req
                        .uri()
                        .path_and_query()
                        .map_or("/".to_owned(), |p| p.to_string());
                    let body_len = req
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes().len())
                        .unwrap_or(0);
                    let seen = Seen {
                        method,
                        path,
                        headers,
                        body_len,
                    };
                    let json = serde_json::to_vec(&seen).unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(json)))
                            .unwrap_or_default(),
                    )
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}
