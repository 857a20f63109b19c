//! A local TCP listener whose every connection is forwarded to a tcp-mode resource through a
//! proxy, like `ssh -L local:remote`.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::error::DeviceError;
use crate::session::Session;

/// Parses `LOCAL_ADDR:RESOURCE` (e.g. `127.0.0.1:2222:ssh`), splitting at the last colon.
pub fn parse_forward(spec: &str) -> Result<(SocketAddr, String), DeviceError> {
    let bad = || DeviceError::Usage(format!("{spec:?}: expected LOCAL_ADDR:PORT:RESOURCE"));
    let (local, resource) = spec.rsplit_once(':').ok_or_else(bad)?;
    let local: SocketAddr = local.parse().map_err(|_| bad())?;
    if resource.is_empty() {
        return Err(bad());
    }
    Ok((local, resource.to_owned()))
}

/// Accepts local connections forever, each relayed to `resource` on its own proxy connection.
pub async fn serve(
    listener: TcpListener,
    session: Session,
    resource: String,
) -> Result<(), DeviceError> {
    loop {
        let (mut local, peer) = listener.accept().await.map_err(DeviceError::ProxyIo)?;
        let session = session.clone();
        let resource = resource.clone();
        tokio::spawn(async move {
            match session.open(&resource).await {
                Ok(mut remote) => {
                    let _ = local.set_nodelay(true);
                    match tokio::io::copy_bidirectional(&mut local, &mut remote).await {
                        Ok((up, down)) => {
                            tracing::info!(%peer, %resource, up, down, "tunnel connection closed")
                        }
                        Err(e) => {
                            tracing::info!(%peer, %resource, error = %e, "tunnel connection ended")
                        }
                    }
                }
                Err(e) => tracing::warn!(%peer, %resource, error = %e, "cannot open the resource"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        let (a, r) = parse_forward("127.0.0.1:8080:echo").unwrap();
        assert_eq!(a.port(), 8080);
        assert_eq!(r, "echo");
        assert!(parse_forward("8080:echo").is_err());
        assert!(parse_forward("127.0.0.1:8080:").is_err());
        assert!(parse_forward("echo").is_err());
    }
}
