//! WebSocket connections: the reader task, and the WebSocket side of the
//! writer task ([`WsOut`]), over tungstenite.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::{FutureExt, SinkExt, StreamExt};
use proto::{CloseCode, Frame, Message as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::WebSocketStream;

use super::control::{
    finish_reader, handle_body, handle_control, refuse, tick_idle, Incoming, Timers,
};
use super::meter::Meter;
use super::reader::{io_reason, wait_while_limited, READ_CHUNK};
use super::writer::{writer_task, Batch, Outbound, FLUSH_AT};
use super::{new_connection, Connection, Limit, PeerAddr, Shared};
use crate::{Config, RecvError, QUEUE_FRAME_OVERHEAD};

/// Starts reader and writer tasks over an established WebSocket.
///
/// With `json`, frames travel as canonical proto3 JSON in text messages (the
/// `replimesh.v1.json` subprotocol); senders still hand protobuf bodies, which
/// the writer transcodes.
pub(crate) fn spawn_ws<S>(
    ws: WebSocketStream<S>,
    peer: PeerAddr,
    config: &Config,
    json: bool,
    limit: Limit,
    meter: Option<Arc<Meter>>,
) -> Connection
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (conn, shared, tx) = new_connection(peer, config, limit);
    if let Some(m) = meter {
        m.message_done();
        m.limit
            .store(shared.recv_max.load(Ordering::Relaxed), Ordering::Relaxed);
        let _ = shared.meter.set(m);
    }
    let span = tracing::debug_span!("conn", id = shared.id, peer = %shared.peer, json);
    let (sink, stream) = ws.split();
    tokio::spawn(tracing::Instrument::instrument(
        ws_reader(stream, shared.clone(), tx, config.clone(), json),
        span.clone(),
    ));
    tokio::spawn(tracing::Instrument::instrument(
        writer_task(WsOut { sink, json }, shared, config.clone()),
        span,
    ));
    conn
}

fn ws_message(body: Bytes, json: bool) -> WsMessage {
    if json {
        match Frame::decode(body) {
            Ok(f) => WsMessage::Text(f.to_json().into()),
            // Bodies are produced in this process; an undecodable one is a
            // caller bug: send an empty frame rather than garbage.
            Err(_) => WsMessage::Text("{}".into()),
        }
    } else {
        WsMessage::Binary(body)
    }
}

async fn ws_reader<S>(
    mut stream: futures_util::stream::SplitStream<WebSocketStream<S>>,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<Bytes>>,
    config: Config,
    json: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut timers = Timers::new(&config);
    let mut last = Instant::now();
    let meter = shared.meter.get().cloned();
    let reason = 'outer: loop {
        if let Err(reason) = wait_while_limited(&shared, &tx).await {
            break reason;
        }
        let first = tokio::select! {
            m = stream.next() => m,
            limit = tick_idle(&mut timers.idle) => {
                if last.elapsed() >= limit {
                    break RecvError::TimedOut;
                }
                continue;
            }
            _ = shared.done.cancelled() => break shared.end_reason(),
        };
        last = Instant::now();
        let mut batch = Vec::new();
        let mut next = first;
        let mut taken = 0;
        let mut batch_bytes = 0;
        loop {
            if let (Some(m), Some(Ok(_))) = (&meter, &next) {
                m.message_done();
            }
            match next {
                None => break 'outer RecvError::Eof,
                Some(Err(e)) => {
                    use tokio_tungstenite::tungstenite::error::{
                        CapacityError, Error as WsError, ProtocolError,
                    };
                    let r = match e {
                        WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) => {
                            refuse(&shared, CloseCode::FrameTooLarge, "message too large");
                            RecvError::FrameTooLarge {
                                len: size,
                                max: max_size,
                            }
                        }
                        WsError::ConnectionClosed
                        | WsError::AlreadyClosed
                        | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
                            RecvError::Eof
                        }
                        WsError::Io(_) if meter.as_ref().is_some_and(|m| m.over()) => {
                            let (len, max) = meter.as_ref().map(|m| m.seen()).unwrap_or_default();
                            refuse(&shared, CloseCode::FrameTooLarge, "message too large");
                            RecvError::FrameTooLarge { len, max }
                        }
                        WsError::Io(e) => io_reason(e),
                        WsError::Protocol(p) => RecvError::Malformed(p.to_string()),
                        other => RecvError::Malformed(other.to_string()),
                    };
                    if !batch.is_empty() {
                        let _ = tx.send(std::mem::take(&mut batch)).await;
                    }
                    break 'outer r;
                }
                Some(Ok(msg @ (WsMessage::Binary(_) | WsMessage::Text(_)))) => {
                    let incoming = match msg {
                        WsMessage::Binary(data) => handle_body(&shared, data),
                        // A store frame with a bad value comes up as a
                        // `StoreError` for its store: the store answers it,
                        // the connection goes on.
                        WsMessage::Text(text) if json => {
                            match Frame::from_json_or_store_error(text.as_str()) {
                                Ok(frame) => {
                                    let body = frame.encode_to_bytes();
                                    handle_control(&shared, frame, || body)
                                }
                                Err(e) => Incoming::Malformed(format!("malformed JSON frame: {e}")),
                            }
                        }
                        _ => Incoming::Malformed(
                            "text message on the binary subprotocol replimesh.v1".to_string(),
                        ),
                    };
                    match incoming {
                        Incoming::Deliver(b) => {
                            batch_bytes += b.len();
                            batch.push(b);
                        }
                        Incoming::Handled => {}
                        Incoming::End(r) => {
                            if !batch.is_empty() {
                                let _ = tx.send(std::mem::take(&mut batch)).await;
                            }
                            break 'outer r;
                        }
                        Incoming::Malformed(why) => {
                            refuse(&shared, CloseCode::ProtocolError, &why);
                            break 'outer RecvError::Malformed(why);
                        }
                    }
                }
                Some(Ok(WsMessage::Close(c))) => {
                    break 'outer match c {
                        Some(c) => RecvError::Closed {
                            code: u16::from(c.code) as u32,
                            reason: c.reason.to_string(),
                        },
                        None => RecvError::Eof,
                    }
                }
                Some(Ok(_)) => {} // WebSocket-level ping/pong: answered by tungstenite.
            }
            taken += 1;
            // Before the hello one message at a time; after it, batches of
            // at most 1024 messages or about one read's worth of bytes.
            if taken >= 1024 || batch_bytes >= READ_CHUNK || shared.limited.load(Ordering::Relaxed)
            {
                break;
            }
            match stream.next().now_or_never() {
                Some(m) => next = m,
                None => break,
            }
        }
        if !batch.is_empty() {
            tokio::select! {
                _ = tx.send(batch) => {}
                _ = shared.done.cancelled() => break shared.end_reason(),
            }
        }
    };
    finish_reader(shared, reason).await;
}

/// A WebSocket's writing half: one message per frame, transcoded to JSON
/// on the `replimesh.v1.json` subprotocol.
pub(super) struct WsOut<S> {
    sink: SplitSink<WebSocketStream<S>, WsMessage>,
    json: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsOut<S> {
    /// [`Outbound::write`], with tungstenite's error.
    async fn feed_all(&mut self, shared: &Shared, batch: Batch<'_>) -> Result<(), WsError> {
        // No direct writes on a WebSocket: `batch.partial` is always empty.
        let Batch {
            urgent,
            frames,
            close,
            ..
        } = batch;
        let counted = urgent.len();
        let mut freed = (0, 0);
        for (i, b) in urgent.into_iter().chain(frames.drain(..)).enumerate() {
            if i >= counted {
                freed.0 += b.len() + QUEUE_FRAME_OVERHEAD;
                freed.1 += 1;
            }
            self.sink.feed(ws_message(b, self.json)).await?;
            if freed.0 >= FLUSH_AT {
                shared.written(Some(std::mem::take(&mut freed)));
            }
        }
        if let Some(b) = close {
            self.sink.feed(ws_message(b.clone(), self.json)).await?;
        }
        self.sink.flush().await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Outbound for WsOut<S> {
    async fn write(&mut self, shared: &Shared, batch: Batch<'_>) -> std::io::Result<()> {
        self.feed_all(shared, batch)
            .await
            .map_err(std::io::Error::other)
    }

    async fn shutdown(&mut self) {
        let _ = self.sink.close().await;
    }
}
