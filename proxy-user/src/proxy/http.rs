//! http mode: an HTTP/1.1 reverse proxy on the device's TLS stream. Each request is checked
//! again (session still live, group rule under the current catalog), stripped of hop-by-hop
//! headers, of any `x-scm-*` / `x_scm_*` header and of the forwarding headers (`forwarded`,
//! `x-real-ip`, `x-forwarded-*`) the device sent, given the identity headers, and sent to the
//! back end. Nothing of the session (id, key, MAC) is in what the back end receives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HOST, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use scm_proto::preamble::Status;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::assertion::{AssertionError, AssertionFn};
use super::metrics::Metrics;
use super::policy::Refusal;

/// Header naming the user, added to every request to the back end.
pub(super) const HEADER_USER: &str = "x-scm-user";
/// Header with the user's groups, comma-separated.
pub(super) const HEADER_GROUPS: &str = "x-scm-groups";
/// Header with the device id.
pub(super) const HEADER_DEVICE: &str = "x-scm-device";
/// Header with the app id and version (`app/1.2.3`).
pub(super) const HEADER_APP: &str = "x-scm-app";

/// The body type of every response the proxy returns.
pub(super) type ProxyBody = BoxBody<Bytes, hyper::Error>;
/// The pooled client used to reach http back ends.
pub(super) type BackendClient = Client<HttpConnector, Incoming>;

/// A client for back ends with a connect timeout.
pub(super) fn backend_client(connect_timeout: Duration) -> BackendClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// Who the requests on this connection come from.
#[derive(Debug, Clone)]
pub(super) struct Identity {
    /// User name.
    pub user: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// Device id.
    pub device_id: String,
    /// App id and version.
    pub app: String,
}

/// Everything one device connection's requests need.
pub(super) struct HttpContext {
    /// Resource name (for messages).
    pub resource: String,
    /// Back end `host:port`.
    pub backend: String,
    /// Identity headers to add.
    pub identity: Identity,
    /// The device's address, for `x-forwarded-for`.
    pub peer: SocketAddr,
    /// Shared back-end client.
    pub client: BackendClient,
    /// The per-request policy check.
    pub check: Box<dyn Fn() -> Result<(), Refusal> + Send + Sync>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The signed identity assertion for each request (`None`: `--no-identity-assertion`).
    pub assertion: Option<AssertionFn>,
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers (and those the `connection` header names) and every `x-scm-*`
/// header, so a device can neither spoof identity nor leak anything to the back end through them.
pub(super) fn strip_headers(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    let scm: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("x-scm-"))
        .cloned()
        .collect();
    for k in scm {
        headers.remove(k);
    }
}

/// Removes what a device could use to pass itself off to the back end as someone or somewhere
/// else: every header that is `x-scm-*` once `_` is read as `-` (servers such as nginx, and CGI
/// or WSGI back ends, treat `x_scm_user` as `x-scm-user`), and every client-supplied forwarding
/// header (`forwarded`, `x-real-ip`, `x-forwarded-*`, also in their `_` spellings), which only
/// the proxy may set.
pub(super) fn strip_device_supplied(headers: &mut HeaderMap) {
    let spoofable = |name: &str| {
        let n = name.replace('_', "-");
        n.starts_with("x-scm-")
            || n.starts_with("x-forwarded-")
            || n == "forwarded"
            || n == "x-real-ip"
    };
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|k| spoofable(k.as_str()))
        .cloned()
        .collect();
    for k in names {
        headers.remove(k);
    }
}

/// Adds the identity headers.
pub(super) fn add_identity(headers: &mut HeaderMap, id: &Identity, peer: SocketAddr) {
    let pairs = [
        (HEADER_USER, id.user.clone()),
        (HEADER_GROUPS, id.groups.join(",")),
        (HEADER_DEVICE, id.device_id.clone()),
        (HEADER_APP, id.app.clone()),
        ("x-forwarded-for", peer.ip().to_string()),
    ];
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

/// Adds the signed identity assertion (after [`strip_headers`], so whatever the device sent under
/// that name is gone); without one the request is answered here, never sent unsigned.
async fn add_assertion(
    ctx: &HttpContext,
    headers: &mut HeaderMap,
) -> Option<Result<(), Response<ProxyBody>>> {
    let get = ctx.assertion.as_ref()?;
    Some(match get().await {
        Ok(v) => {
            headers.insert(scm_proto::api::HEADER_ASSERTION, v);
            Ok(())
        }
        Err(e) => {
            let status = match &e {
                AssertionError::Unavailable(_) => {
                    ctx.metrics.error("assertion_unavailable");
                    tracing::warn!(resource = %ctx.resource, error = %e, "no identity assertion; request refused");
                    StatusCode::SERVICE_UNAVAILABLE
                }
                AssertionError::Refused { code, .. } if code == "resource_refused" => {
                    StatusCode::FORBIDDEN
                }
                // The session ended at the Security server.
                _ => StatusCode::UNAUTHORIZED,
            };
            Err(text(status, format!("{e}\n")))
        }
    })
}

async fn forward(ctx: Arc<HttpContext>, req: Request<Incoming>) -> Response<ProxyBody> {
    if let Err(refusal) = (ctx.check)() {
        let code = match refusal.status {
            Status::SessionInvalid => StatusCode::UNAUTHORIZED,
            _ => StatusCode::FORBIDDEN,
        };
        return text(code, format!("{}: {}\n", refusal.status, refusal.reason));
    }
    let (mut head, body) = req.into_parts();
    if let Err(e) = rewrite_head(&mut head, &ctx.backend, &ctx.identity, ctx.peer) {
        return text(
            StatusCode::BAD_REQUEST,
            format!("bad request target: {e}\n"),
        );
    }
    let mut req = Request::from_parts(head, body);
    if let Some(Err(resp)) = add_assertion(&ctx, req.headers_mut()).await {
        return resp;
    }
    let headers = req.headers_mut();
    if let Ok(host) = HeaderValue::from_str(&ctx.backend) {
        headers.insert(HOST, host);
    }
    match ctx.client.request(req).await {
        Ok(mut resp) => {
            strip_headers(resp.headers_mut());
            resp.map(|b| b.boxed())
        }
        Err(e) => {
            ctx.metrics.error("backend_unavailable");
            tracing::warn!(resource = %ctx.resource, backend = %ctx.backend, error = %e, "back end request failed");
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why = format!("{why}: {s}");
                src = s.source();
            }
            text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "backend_unavailable: back end of {} at {} failed: {why}\n",
                    ctx.resource, ctx.backend
                ),
            )
        }
    }
}

/// What the proxy does to a device's request head before it goes to `backend`: the target
/// rewritten to the back end (path and query kept), the hop-by-hop, `x-scm-*` and forwarding
/// headers the device sent removed, and the identity headers added. Pure: the fuzz target
/// `http_head` checks these properties on arbitrary heads.
pub(super) fn rewrite_head(
    head: &mut hyper::http::request::Parts,
    backend: &str,
    identity: &Identity,
    peer: SocketAddr,
) -> Result<(), hyper::http::uri::InvalidUri> {
    let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
    head.uri = format!("http://{backend}{path}").parse::<Uri>()?;
    strip_headers(&mut head.headers);
    strip_device_supplied(&mut head.headers);
    add_identity(&mut head.headers, identity, peer);
    Ok(())
}

/// Serves HTTP/1.1 requests from the device until it closes, stays idle for `idle`, or `cancel`
/// fires (session revoked). When the process drains, the request in progress finishes and the
/// connection closes after it.
pub(super) async fn serve_http<S>(
    stream: S,
    ctx: Arc<HttpContext>,
    cancel: &CancellationToken,
    idle: Duration,
    drain: &scm_proto::lifecycle::Drain,
) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move {
            let resp = forward(ctx.clone(), req).await;
            ctx.metrics
                .http_requests
                .with_label_values(&[resp.status().as_str()])
                .inc();
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = cancel.cancelled() => return Ok(()),
            () = drain.wait(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_spoofed_identity_and_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("x-scm-user", HeaderValue::from_static("root"));
        h.insert("X-Scm-Groups", HeaderValue::from_static("admins"));
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
        let id = Identity {
            user: "alice".into(),
            groups: vec!["staff".into(), "eng".into()],
            device_id: "phone".into(),
            app: "mail/1.0".into(),
        };
        add_identity(&mut h, &id, "127.0.0.1:5".parse().unwrap());
        assert_eq!(h[HEADER_USER], "alice");
        assert_eq!(h[HEADER_GROUPS], "staff,eng");
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    }

    #[test]
    fn strips_underscore_spellings_and_client_forwarding_headers() {
        let mut h = HeaderMap::new();
        for name in [
            "x_scm_user",
            "X_Scm-Groups",
            "forwarded",
            "x-real-ip",
            "x_real_ip",
            "x-forwarded-for",
            "x-forwarded-host",
            "x_forwarded_proto",
        ] {
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("spoofed"),
            );
        }
        h.insert("x-scmish", HeaderValue::from_static("kept"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_device_supplied(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("accept") && h.contains_key("x-scmish"));
    }
}
