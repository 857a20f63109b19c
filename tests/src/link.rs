//! A TCP link that a test can cut: a relay on 127.0.0.1 in front of a real listener (the
//! Security server's proxies' API). While the link is cut every relayed connection is closed and
//! new ones are accepted and closed at once, as a broken network path looks to the client; the
//! server behind it keeps running, so what happens there in the gap (a logout) is published to
//! nobody — the missed event a revocation stream must recover from.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running relay.
#[derive(Debug, Clone)]
pub struct Link {
    addr: SocketAddr,
    up: Arc<watch::Sender<bool>>,
}

impl Link {
    /// Starts a relay on an ephemeral 127.0.0.1 port forwarding to `target`, link up.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (up, _) = watch::channel(true);
        let up = Arc::new(up);
        tokio::spawn(accept_loop(listener, target, up.clone()));
        Ok(Self { addr, up })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the link: open connections are closed, new ones closed on arrival.
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    /// Restores the link.
    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, up: Arc<watch::Sender<bool>>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let mut rx = up.subscribe();
        if !*rx.borrow_and_update() {
            drop(client);
            continue;
        }
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            relay(client, server, rx).await;
        });
    }
}

async fn relay(mut client: TcpStream, mut server: TcpStream, mut up: watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        // Dropping both sockets closes them: the cut.
        _ = up.wait_for(|up| !*up) => {}
    }
}
