//! Plain HTTP `GET`s on WebSocket listeners: a listener with
//! [`Config::http_files`](crate::Config::http_files) reads the request head
//! itself; a `GET` of one of those paths that is not a WebSocket upgrade gets
//! the file (and the connection is closed), anything else goes on to the
//! WebSocket handshake with the bytes already read replayed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// A file a WebSocket listener answers to a plain HTTP `GET` of `path`.
#[derive(Clone)]
pub struct HttpFile {
    /// The request path, such as `/replimesh.js` (the query is ignored).
    pub path: String,
    /// The `Content-Type` header, such as `text/javascript; charset=utf-8`.
    pub content_type: String,
    /// The body.
    pub body: Bytes,
}

impl std::fmt::Debug for HttpFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpFile")
            .field("path", &self.path)
            .field("content_type", &self.content_type)
            .field("len", &self.body.len())
            .finish()
    }
}

/// Most bytes of a request head read before giving up on finding a plain
/// `GET` (the WebSocket handshake then judges the request as usual).
const MAX_HEAD: usize = 8 * 1024;

/// What an accepted connection asked for.
pub(crate) enum Head<S> {
    /// Not a plain `GET` of a file: go on with the WebSocket handshake on
    /// this stream (the bytes read so far come first).
    Upgrade(Prefixed<S>),
    /// A file was sent; the connection is done.
    Served(String),
}

/// Reads the request head (up to [`MAX_HEAD`] bytes) and answers a plain
/// `GET` of one of `files`. With no files nothing is read.
pub(crate) async fn serve_or_upgrade<S>(mut s: S, files: &[HttpFile]) -> io::Result<Head<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if files.is_empty() {
        return Ok(Head::Upgrade(Prefixed::new(Vec::new(), s)));
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_HEAD {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let Some(file) = plain_get(&buf).and_then(|p| files.iter().find(|f| f.path == p)) else {
        return Ok(Head::Upgrade(Prefixed::new(buf, s)));
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
         Cache-Control: no-cache\r\nAccess-Control-Allow-Origin: *\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        file.content_type,
        file.body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(&file.body).await?;
    s.shutdown().await?;
    Ok(Head::Served(file.path.clone()))
}

/// The path of a complete `GET` request head that is not a WebSocket
/// upgrade (no `Upgrade` header), without its query; `None` otherwise.
fn plain_get(buf: &[u8]) -> Option<&str> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target) = (first.next()?, first.next()?);
    if method != "GET" || !first.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let upgrade = lines.any(|l| {
        l.split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("upgrade"))
    });
    if upgrade {
        return None;
    }
    Some(target.split('?').next().unwrap_or(target))
}

/// A stream that yields `buf` before reading on from the inner stream;
/// writes go to the inner stream.
pub(crate) struct Prefixed<S> {
    buf: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(buf: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed { buf, pos: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.buf.len() {
            let n = out.remaining().min(this.buf.len() - this.pos);
            out.put_slice(&this.buf[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.buf.len() {
                this.buf = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_gets_only() {
        assert_eq!(
            plain_get(b"GET /replimesh.js?v=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some("/replimesh.js")
        );
        let upgrade =
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        assert_eq!(plain_get(upgrade), None);
        assert_eq!(plain_get(b"POST /replimesh.js HTTP/1.1\r\n\r\n"), None);
        assert_eq!(
            plain_get(b"GET /replimesh.js HTTP/1.1\r\nHost: x\r\n"),
            None
        );
        assert_eq!(plain_get(b"GET /replimesh.js\r\n\r\n"), None);
        assert_eq!(plain_get(&[0xff; 64]), None);
    }

    #[tokio::test]
    async fn prefixed_replays_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut p = Prefixed::new(b"hello".to_vec(), b);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
