//! A plain TCP or Unix socket shared by a connection's reader, writer and
//! direct writes: one descriptor per connection (no duplicate), closed when
//! the last of them is gone. An accepted socket also holds its slot in the
//! listener's connection limits ([`Slot`]), given back when it closes.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// The socket itself.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A socket and, for an accepted one, its place in the listener's limits.
pub(crate) struct Sock {
    stream: Stream,
    _slot: Option<Slot>,
}

impl Sock {
    pub(crate) fn new(stream: Stream, slot: Option<Slot>) -> Arc<Sock> {
        Arc::new(Sock {
            stream,
            _slot: slot,
        })
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.stream {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
        }
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.stream {
            Stream::Tcp(s) => s.poll_write_ready(cx),
            Stream::Unix(s) => s.poll_write_ready(cx),
        }
    }

    fn try_read_buf(&self, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
        match &self.stream {
            Stream::Tcp(s) => s.try_read_buf(buf),
            Stream::Unix(s) => s.try_read_buf(buf),
        }
    }

    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &self.stream {
            Stream::Tcp(s) => s.try_write_vectored(bufs),
            Stream::Unix(s) => s.try_write_vectored(bufs),
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match &self.stream {
            Stream::Tcp(s) => s.try_write(buf),
            Stream::Unix(s) => s.try_write(buf),
        }
    }
}

impl AsFd for Sock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.stream {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// One side of a shared [`Sock`] as a Tokio stream. The writing side
/// (`shutdown_on_drop`) shuts the socket's sending direction down when it is
/// dropped, as Tokio's owned write halves do.
pub(crate) struct SockIo {
    sock: Arc<Sock>,
    shutdown_on_drop: bool,
}

impl SockIo {
    /// The reading and the writing side of `sock`.
    pub(crate) fn split(sock: &Arc<Sock>) -> (SockIo, SockIo) {
        (
            SockIo {
                sock: sock.clone(),
                shutdown_on_drop: false,
            },
            SockIo {
                sock: sock.clone(),
                shutdown_on_drop: true,
            },
        )
    }
}

impl SockIo {
    /// Both directions of `sock` in one stream (for TLS and WebSocket).
    pub(crate) fn whole(sock: &Arc<Sock>) -> SockIo {
        SockIo {
            sock: sock.clone(),
            shutdown_on_drop: false,
        }
    }
}

impl Drop for SockIo {
    fn drop(&mut self) {
        if self.shutdown_on_drop {
            let _ = rustix::net::shutdown(self.sock.as_fd(), rustix::net::Shutdown::Write);
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl AsyncRead for SockIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.sock.poll_read_ready(cx))?;
            match self.sock.try_read_buf(buf) {
                Err(e) if would_block(&e) => continue,
                r => return Poll::Ready(r.map(|_| ())),
            }
        }
    }
}

impl AsyncWrite for SockIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.sock.poll_write_ready(cx))?;
            match self.sock.try_write(buf) {
                Err(e) if would_block(&e) => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.sock.poll_write_ready(cx))?;
            match self.sock.try_write_vectored(bufs) {
                Err(e) if would_block(&e) => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = rustix::net::shutdown(self.sock.as_fd(), rustix::net::Shutdown::Write);
        Poll::Ready(r.map_err(io::Error::from))
    }
}

/// How many connections a listener holds open, in total and per address.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// A listener's connection limits and counts, shared with its connections.
#[derive(Debug)]
pub(crate) struct Limits {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
}

/// Why a connection was refused a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    /// `Config::max_connections`.
    Total,
    /// `Config::max_connections_per_ip`.
    PerIp,
}

impl Limits {
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Arc<Limits> {
        Arc::new(Limits {
            max_total,
            max_per_ip,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for a connection from `ip` (`None`: a Unix socket, counted
    /// in the total only), or why there is none.
    pub(crate) fn acquire(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Slot, Over> {
        let mut c = self.counts();
        if c.total >= self.max_total {
            return Err(Over::Total);
        }
        if let Some(ip) = ip {
            let n = c.per_ip.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                return Err(Over::PerIp);
            }
            *n += 1;
        }
        c.total += 1;
        Ok(Slot {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.counts().total
    }
}

/// An accepted connection's place in its listener's limits, given back
/// when it is dropped (with the socket).
#[derive(Debug)]
pub(crate) struct Slot {
    limits: Arc<Limits>,
    ip: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.limits.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(ip) = self.ip {
            if let Some(n) = c.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    c.per_ip.remove(&ip);
                }
            }
        }
    }
}
