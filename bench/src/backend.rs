//! The bulk back end: a TCP server that sends or swallows as many bytes as a client asks for, so a
//! tunnel's throughput can be measured both ways without a disk or an HTTP parser in the path.
//!
//! ```text
//! command = ("D" | "U") " " bytes:decimal "\n"
//! D n: the server sends n bytes.      U n: the client sends n bytes, the server answers "OK\n".
//! ```
//! A connection may carry several commands; one that sends nothing stays open (idle test).

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Size of the chunks written and read.
pub const CHUNK: usize = 256 * 1024;

/// One parsed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The server sends this many bytes.
    Download(u64),
    /// The client sends this many bytes.
    Upload(u64),
}

impl Command {
    /// The command's line on the wire.
    pub fn line(self) -> String {
        match self {
            Command::Download(n) => format!("D {n}\n"),
            Command::Upload(n) => format!("U {n}\n"),
        }
    }

    /// Parses a command line (with or without its newline).
    pub fn parse(line: &str) -> Option<Self> {
        let (kind, n) = line.trim_end().split_once(' ')?;
        let n = n.parse().ok()?;
        match kind {
            "D" => Some(Command::Download(n)),
            "U" => Some(Command::Upload(n)),
            _ => None,
        }
    }
}

/// Serves bulk commands on `addr` until the process is killed.
pub async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = connection(stream).await;
        });
    }
}

async fn connection(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut stream = BufReader::with_capacity(CHUNK, stream);
    let zeros = vec![0u8; CHUNK];
    let mut sink = vec![0u8; CHUNK];
    let mut line = String::new();
    loop {
        line.clear();
        // A command line is short; a client that sends a long one is cut off.
        let n = (&mut stream).take(64).read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        match Command::parse(&line) {
            Some(Command::Download(mut left)) => {
                while left > 0 {
                    let k = left.min(CHUNK as u64) as usize;
                    stream.get_mut().write_all(&zeros[..k]).await?;
                    left -= k as u64;
                }
            }
            Some(Command::Upload(mut left)) => {
                while left > 0 {
                    let k = left.min(CHUNK as u64) as usize;
                    let got = stream.read(&mut sink[..k]).await?;
                    if got == 0 {
                        return Ok(());
                    }
                    left -= got as u64;
                }
                stream.get_mut().write_all(b"OK\n").await?;
            }
            None => {
                stream.get_mut().write_all(b"ERR bad command\n").await?;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        for c in [Command::Download(1 << 30), Command::Upload(7)] {
            assert_eq!(Command::parse(&c.line()), Some(c));
        }
        assert_eq!(Command::parse("X 1\n"), None);
        assert_eq!(Command::parse("D -1\n"), None);
        assert_eq!(Command::parse("D\n"), None);
    }
}
