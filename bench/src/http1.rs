//! The client half of HTTP/1.1 keep-alive, as small as the benchmark needs: write a request, read
//! the response head (parsed by `httparse`), skip a `Content-Length` or chunked body. Parsing is
//! pure and unit-tested.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// An HTTP exchange that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The connection failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection mid-response.
    #[error("connection closed in the middle of a response")]
    Closed,
    /// The response is not HTTP/1.1 as expected.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    /// The response head does not parse as HTTP/1.x.
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
}

/// How the body of a response ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Bytes of the head, blank line included.
    pub len: usize,
    /// How the body is framed.
    pub body: BodyKind,
}

/// Most header lines accepted in a response head (nginx and the bulk server send under ten).
const MAX_HEADERS: usize = 64;

/// Parses a response head at the start of `buf` (with `httparse`); `None` if the blank line has
/// not arrived yet.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf).map_err(HttpError::Head)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() > MAX_HEAD => {
            return Err(HttpError::Malformed("head too large"));
        }
        httparse::Status::Partial => return Ok(None),
    };
    let status = response
        .code
        .ok_or(HttpError::Malformed("bad status code"))?;
    let mut body = None;
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::Malformed("header value not UTF-8"))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse()
                .map_err(|_| HttpError::Malformed("bad content-length"))?;
            body.get_or_insert(BodyKind::Length(n));
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            body = Some(BodyKind::Chunked);
        }
    }
    // 204 and 304 have no body; anything else without framing would need close-delimiting,
    // which a keep-alive benchmark cannot use.
    let body = match (status, body) {
        (204 | 304, _) => BodyKind::Length(0),
        (_, Some(b)) => b,
        (_, None) => return Err(HttpError::Malformed("response without a framed body")),
    };
    Ok(Some(Head { status, len, body }))
}

/// Parses a chunk-size line (without its CRLF), ignoring chunk extensions.
pub fn parse_chunk_size(line: &[u8]) -> Result<u64, HttpError> {
    let text = std::str::from_utf8(line).map_err(|_| HttpError::Malformed("chunk size"))?;
    let hex = text.split(';').next().unwrap_or_default().trim();
    u64::from_str_radix(hex, 16).map_err(|_| HttpError::Malformed("chunk size"))
}

/// A connection with a read buffer, exchanging one request at a time.
#[derive(Debug)]
pub struct Conn<S> {
    /// The stream (TLS or plain).
    pub io: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Wraps a connected stream.
    pub fn new(io: S) -> Self {
        Self {
            io,
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more bytes into the buffer, moving what is pending to the front first.
    async fn fill(&mut self) -> Result<(), HttpError> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(HttpError::Malformed("line or head larger than the buffer"));
        }
        let n = self.io.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(HttpError::Closed);
        }
        self.end += n;
        Ok(())
    }

    /// Drops `n` bytes of body, reading as needed.
    async fn skip(&mut self, mut n: u64) -> Result<(), HttpError> {
        loop {
            let have = (self.end - self.start) as u64;
            if have >= n {
                self.start += n as usize;
                return Ok(());
            }
            n -= have;
            self.start = 0;
            self.end = 0;
            self.fill().await?;
        }
    }

    /// A CRLF-terminated line, consumed; returns it without the CRLF.
    async fn line(&mut self) -> Result<Vec<u8>, HttpError> {
        loop {
            if let Some(i) = self.pending().windows(2).position(|w| w == b"\r\n") {
                let line = self.pending()[..i].to_vec();
                self.start += i + 2;
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    /// Sends `request` and reads the whole response; returns the status and the body's size.
    pub async fn exchange(&mut self, request: &[u8]) -> Result<(u16, u64), HttpError> {
        self.io.write_all(request).await?;
        self.io.flush().await?;
        self.read_response().await
    }

    /// Reads one response; returns the status and the body's size.
    pub async fn read_response(&mut self) -> Result<(u16, u64), HttpError> {
        let head = loop {
            if let Some(h) = parse_head(self.pending())? {
                break h;
            }
            self.fill().await?;
        };
        self.start += head.len;
        match head.body {
            BodyKind::Length(n) => {
                self.skip(n).await?;
                Ok((head.status, n))
            }
            BodyKind::Chunked => {
                let mut total = 0;
                loop {
                    let size = parse_chunk_size(&self.line().await?)?;
                    if size == 0 {
                        // Trailers, if any, end with an empty line.
                        while !self.line().await?.is_empty() {}
                        return Ok((head.status, total));
                    }
                    self.skip(size).await?;
                    if !self.line().await?.is_empty() {
                        return Err(HttpError::Malformed("chunk not followed by CRLF"));
                    }
                    total += size;
                }
            }
        }
    }
}

/// A keep-alive GET request.
pub fn get_request(path: &str, host: &str, authorization: Option<&str>) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: scm-bench\r\n");
    if let Some(a) = authorization {
        r.push_str("Authorization: ");
        r.push_str(a);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let r = b"HTTP/1.1 200 OK\r\nServer: nginx\r\ncontent-length: 1024\r\n\r\nbody";
        assert_eq!(
            parse_head(r).unwrap(),
            Some(Head {
                status: 200,
                len: r.len() - 4,
                body: BodyKind::Length(1024)
            })
        );
        assert_eq!(parse_head(&r[..20]).unwrap(), None);
        let c = b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(c).unwrap().unwrap().body, BodyKind::Chunked);
        let e = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(parse_head(e).unwrap().unwrap().body, BodyKind::Length(0));
        assert!(parse_head(b"SSH-2.0 x\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_head(&[b'x'; MAX_HEAD + 1]).is_err());
    }

    #[test]
    fn limits_and_httparse_refusals() {
        let mut long = b"HTTP/1.1 200 OK\r\nX-Pad: ".to_vec();
        long.resize(MAX_HEAD + 1, b'a');
        assert!(matches!(
            parse_head(&long),
            Err(HttpError::Malformed("head too large"))
        ));
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"),
            Err(HttpError::Head(_))
        ));
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}Content-Length: 0\r\n\r\n",
            "X: y\r\n".repeat(MAX_HEADERS)
        );
        assert!(matches!(
            parse_head(many.as_bytes()),
            Err(HttpError::Head(httparse::Error::TooManyHeaders))
        ));
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"400").unwrap(), 1024);
        assert_eq!(parse_chunk_size(b"1a;ext=1").unwrap(), 26);
        assert!(parse_chunk_size(b"zz").is_err());
    }

    #[tokio::test]
    async fn keep_alive_exchanges_on_one_stream() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let body = "x".repeat(1024);
        let canned = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n{body}\
             HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        );
        server.write_all(canned.as_bytes()).await.unwrap();
        let mut c = Conn::new(client);
        let req = get_request("/1k", "h", Some("Bearer s"));
        assert_eq!(c.exchange(&req).await.unwrap(), (200, 1024));
        assert_eq!(c.exchange(&req).await.unwrap(), (200, 5));
        let mut sent = vec![0; 2 * req.len()];
        server.read_exact(&mut sent).await.unwrap();
        assert!(sent.starts_with(b"GET /1k HTTP/1.1\r\nHost: h\r\n"));
        drop(server);
        assert!(matches!(
            c.exchange(&req).await,
            Err(HttpError::Closed | HttpError::Io(_))
        ));
    }
}
