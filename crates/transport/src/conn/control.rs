//! Control frames (ping, pong, close), keep-alive and idle timers, and
//! refusing a peer's input.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proto::{frame::Body, CloseCode, Frame, Message as _};

use super::Shared;
use crate::{Config, RecvError};

/// What the reader does with one frame body.
pub(super) enum Incoming {
    Deliver(Bytes),
    Handled,
    End(RecvError),
    Malformed(String),
}

/// Answers the control frames (told by their first byte with
/// `proto::wire::is_control`, without decoding the others) and passes the
/// rest on.
pub(super) fn handle_body(shared: &Shared, body: Bytes) -> Incoming {
    if !proto::wire::is_control(&body) {
        return Incoming::Deliver(body);
    }
    match Frame::decode(body.clone()) {
        Ok(frame) => handle_control(shared, frame, || body),
        Err(e) => Incoming::Malformed(format!("malformed frame: {e}")),
    }
}

pub(super) fn handle_control(
    shared: &Shared,
    frame: Frame,
    body: impl FnOnce() -> Bytes,
) -> Incoming {
    match frame.body {
        Some(Body::Ping(p)) => {
            shared.enqueue_urgent(Frame::pong(p.nonce).encode_to_bytes());
            Incoming::Handled
        }
        Some(Body::Pong(_)) => Incoming::Handled,
        Some(Body::Close(c)) => Incoming::End(RecvError::Closed {
            code: c.code as u32,
            reason: c.reason,
        }),
        _ => Incoming::Deliver(body()),
    }
}

/// Keep-alive and idle timers shared by both kinds of tasks.
pub(super) struct Timers {
    pub(super) ping: Option<tokio::time::Interval>,
    pub(super) idle: Option<(tokio::time::Interval, Duration)>,
}

impl Timers {
    pub(super) fn new(config: &Config) -> Self {
        let mk = |d: Duration| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        Timers {
            ping: config.ping_interval.map(mk),
            idle: config
                .idle_timeout
                .map(|d| (mk((d / 4).max(Duration::from_millis(10))), d)),
        }
    }
}

pub(super) async fn tick(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

pub(super) async fn tick_idle(i: &mut Option<(tokio::time::Interval, Duration)>) -> Duration {
    match i {
        Some((i, d)) => {
            i.tick().await;
            *d
        }
        None => std::future::pending().await,
    }
}

/// Tells the peer why we are closing, then lets the writer finish.
pub(super) fn refuse(shared: &Shared, code: CloseCode, reason: &str) {
    // Unlike a local close request, the connection ends with the reader's error.
    if shared.closing.swap(true, Ordering::AcqRel) {
        return;
    }
    let mut q = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
    q.close = Some((code as u32, reason.to_string()));
    drop(q);
    shared.writer_wake.notify_one();
}

/// Whether the reader stopped because we refused the peer's input (our
/// `Close` frame says why and should reach the peer).
pub(super) fn refused(reason: &RecvError) -> bool {
    matches!(
        reason,
        RecvError::FrameTooLarge { .. } | RecvError::Malformed(_)
    )
}

/// Ends a connection whose reader (byte stream, inline or WebSocket)
/// stopped for `reason`.
pub(super) async fn finish_reader(shared: Arc<Shared>, reason: RecvError) {
    tracing::debug!(conn = shared.id, reason = %reason, "reader finished");
    // After an error we still give the writer a moment to send our Close frame.
    if refused(&reason) {
        let _ = tokio::time::timeout(Duration::from_millis(200), shared.done.cancelled()).await;
    }
    shared.finish(reason);
}
