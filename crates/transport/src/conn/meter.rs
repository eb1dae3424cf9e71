//! Metering an accepted WebSocket's reads against the connection's frame limit.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::Config;

/// Counts the bytes an accepted WebSocket connection reads for the message
/// being received, so that one larger than the connection's current limit
/// ([`Receiver::set_max_frame`](crate::Receiver::set_max_frame)) is refused while it arrives:
/// tungstenite's own limit is fixed at the handshake, at
/// [`Config::max_frame`]. What is counted is bytes on the wire (WebSocket
/// framing included); `slack` allows for the next message's start that a
/// read takes along.
#[derive(Debug)]
pub(crate) struct Meter {
    since: AtomicUsize,
    pub(super) limit: AtomicUsize,
    slack: usize,
    over: AtomicBool,
}

impl Meter {
    /// A meter for a connection accepted with `config`: the pre-hello limit
    /// applies from the first byte (the upgrade request included).
    pub(crate) fn new(config: &Config) -> Arc<Meter> {
        Arc::new(Meter {
            since: AtomicUsize::new(0),
            limit: AtomicUsize::new(config.max_frame_before_hello.min(config.max_frame)),
            slack: config.ws_read_buffer.max(1024) + 1024,
            over: AtomicBool::new(false),
        })
    }

    pub(super) fn message_done(&self) {
        self.since.store(0, Ordering::Relaxed);
    }

    pub(super) fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Bytes counted for the refused message, and the limit.
    pub(super) fn seen(&self) -> (usize, usize) {
        (
            self.since.load(Ordering::Relaxed),
            self.limit.load(Ordering::Relaxed),
        )
    }

    fn count(&self, n: usize) -> std::io::Result<()> {
        let since = self.since.fetch_add(n, Ordering::Relaxed) + n;
        if since
            > self
                .limit
                .load(Ordering::Relaxed)
                .saturating_add(self.slack)
        {
            self.over.store(true, Ordering::Relaxed);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "WebSocket message larger than the connection's frame limit",
            ));
        }
        Ok(())
    }
}

/// A stream whose reads are counted by a [`Meter`].
pub(crate) struct Metered<S> {
    inner: S,
    meter: Arc<Meter>,
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S, meter: Arc<Meter>) -> Self {
        Metered { inner, meter }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_read(cx, buf) {
            std::task::Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                std::task::Poll::Ready(this.meter.count(n))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
