//! The Replimesh wire protocol.
//!
//! Every message on every Replimesh connection is one [`Frame`]: a protobuf
//! envelope whose `body` is one of the connection, messaging, clone and store
//! frames (see `docs/protocol.md`). On byte streams (TCP, TLS, Unix sockets)
//! frames are length-prefixed by [`FrameCodec`]; on WebSocket one binary
//! message carries one frame.
//!
//! The schema lives in `proto/replimesh.proto` and is compiled at build time
//! with `prost-build` and the pure-Rust `protox`: no `protoc` is needed.
//!
//! # Example
//!
//! ```
//! use bytes::BytesMut;
//! use replimesh_proto::{frame, Frame, FrameCodec};
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let mut codec = FrameCodec::new(1024);
//! let mut wire = BytesMut::new();
//! let ping = Frame::ping(7);
//! codec.encode(&ping, &mut wire).unwrap();
//! assert_eq!(codec.decode(&mut wire).unwrap(), Some(ping));
//!
//! // A length prefix larger than the maximum is refused before anything is allocated.
//! let mut evil = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
//! assert!(codec.decode(&mut evil).is_err());
//! # let _ = frame::Body::Ping(replimesh_proto::Ping { nonce: 1 });
//! ```

mod codec;
pub mod wire;

pub use codec::{
    length_prefix, split_frame, CodecError, FrameCodec, Split, DEFAULT_MAX_FRAME, LENGTH_PREFIX,
};

/// Generated protobuf types (package `replimesh.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/replimesh.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/replimesh.v1.serde.rs"));
}

pub use generated::*;
pub use prost::Message;

use bytes::Bytes;

/// The protocol version carried in [`Hello::version`] and [`Welcome::version`].
pub const PROTOCOL_VERSION: u32 = 1;

/// WebSocket subprotocol for binary protobuf frames.
pub const WS_SUBPROTOCOL: &str = "replimesh.v1";

/// WebSocket subprotocol for the same frames as canonical proto3 JSON in text messages.
pub const WS_SUBPROTOCOL_JSON: &str = "replimesh.v1.json";

impl Frame {
    /// Wraps a body into a frame.
    pub fn new(body: frame::Body) -> Self {
        Frame { body: Some(body) }
    }

    /// A keep-alive probe.
    pub fn ping(nonce: u64) -> Self {
        Frame::new(frame::Body::Ping(Ping { nonce }))
    }

    /// The answer to [`Frame::ping`].
    pub fn pong(nonce: u64) -> Self {
        Frame::new(frame::Body::Pong(Pong { nonce }))
    }

    /// An orderly close with a reason code and a human-readable reason.
    pub fn close(code: CloseCode, reason: impl Into<String>) -> Self {
        Frame::new(frame::Body::Close(Close {
            code: code as i32,
            reason: reason.into(),
        }))
    }

    /// An opaque payload (benchmarks and tests).
    pub fn data(payload: impl Into<Bytes>) -> Self {
        Frame::new(frame::Body::Data(Data {
            payload: payload.into(),
        }))
    }

    /// Encodes the frame body as protobuf (without a length prefix).
    ///
    /// The result can be shared by many connections: it is what transport
    /// senders accept for pre-encoded broadcasts.
    pub fn encode_to_bytes(&self) -> Bytes {
        Bytes::from(self.encode_to_vec())
    }

    /// A short name of the body's kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        use frame::Body as B;
        match &self.body {
            None => "empty",
            Some(b) => match b {
                B::Hello(_) => "hello",
                B::Welcome(_) => "welcome",
                B::Ping(_) => "ping",
                B::Pong(_) => "pong",
                B::Close(_) => "close",
                B::Request(_) => "request",
                B::Response(_) => "response",
                B::Send(_) => "send",
                B::Subscribe(_) => "subscribe",
                B::Unsubscribe(_) => "unsubscribe",
                B::Publish(_) => "publish",
                B::Deliver(_) => "deliver",
                B::Refused(_) => "refused",
                B::Gossip(_) => "gossip",
                B::Forward(_) => "forward",
                B::GroupDelete(_) => "group_delete",
                B::Interest(_) => "interest",
                B::StoreHello(_) => "store_hello",
                B::StoreWelcome(_) => "store_welcome",
                B::Dispatch(_) => "dispatch",
                B::Committed(_) => "committed",
                B::Actions(_) => "actions",
                B::Snapshot(_) => "snapshot",
                B::Digest(_) => "digest",
                B::Resync(_) => "resync",
                B::StoreError(_) => "store_error",
                B::Data(_) => "data",
            },
        }
    }
}

/// Errors of the JSON frame encoding ([`Frame::from_json`]).
pub type JsonError = serde_json::Error;

impl Frame {
    /// Encodes the frame as canonical proto3 JSON (the `replimesh.v1.json`
    /// WebSocket subprotocol used by browsers).
    pub fn to_json(&self) -> String {
        // Serializing generated types into a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Decodes a frame from canonical proto3 JSON.
    pub fn from_json(text: &str) -> Result<Frame, JsonError> {
        serde_json::from_str(text)
    }

    /// Decodes a frame from proto3 JSON as [`Frame::from_json`] does, except
    /// that a store frame (`storeHello`, `dispatch`, ...) whose `store` can
    /// be read but which has a bad value elsewhere (an unknown enum name, a
    /// value of the wrong type, an unknown field) comes back as a
    /// `StoreError` for that store with code [`STORE_ERROR_BAD_FRAME`] and
    /// the decoding error as its message, so that the receiver answers it
    /// for that store instead of closing the connection. The error keeps
    /// the frame's op id (and, for a dispatch, the count of its actions and
    /// its client id) when they can be read. Anything else that does not
    /// decode is an error.
    pub fn from_json_or_store_error(text: &str) -> Result<Frame, JsonError> {
        Frame::from_json(text).or_else(|e| bad_store_frame(text, &e).ok_or(e))
    }
}

/// The `ErrorInfo.code` of a `StoreError` about a store frame with a value
/// that could not be read (the store crate's `ErrorCode::BadFrame`).
pub const STORE_ERROR_BAD_FRAME: u32 = 11;

/// The JSON keys of the store frames (and their proto names).
const STORE_FRAME_KEYS: [(&str, &str); 9] = [
    ("storeHello", "store_hello"),
    ("storeWelcome", "store_welcome"),
    ("dispatch", "dispatch"),
    ("committed", "committed"),
    ("actions", "actions"),
    ("snapshot", "snapshot"),
    ("digest", "digest"),
    ("resync", "resync"),
    ("storeError", "store_error"),
];

/// The `StoreError` answering a JSON store frame that did not decode;
/// `None` when `text` is not such a frame (or names no store).
fn bad_store_frame(text: &str, error: &JsonError) -> Option<Frame> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let mut fields = value.as_object()?.iter();
    let (key, body) = fields.next()?;
    if fields.next().is_some() {
        return None;
    }
    let (kind, _) = STORE_FRAME_KEYS
        .iter()
        .find(|(json, proto)| key == json || key == proto)?;
    let body = body.as_object()?;
    let store = body.get("store")?.as_str()?.to_owned();
    let field = |json: &str, proto: &str| body.get(json).or_else(|| body.get(proto));
    let mut op_id = 0;
    let mut count = 0;
    let mut client_id = String::new();
    if matches!(*kind, "dispatch" | "committed" | "storeError") {
        op_id = field("opId", "op_id").and_then(json_u64).unwrap_or(0);
    }
    if *kind == "dispatch" && op_id != 0 {
        let more = body
            .get("more")
            .and_then(|m| m.as_array())
            .map_or(0, Vec::len);
        count = if more > 0 { more as u64 + 1 } else { 0 };
        if let Some(c) = field("clientId", "client_id").and_then(|c| c.as_str()) {
            client_id = c.to_owned();
        }
    }
    Some(Frame::new(frame::Body::StoreError(StoreError {
        store,
        op_id,
        error: Some(ErrorInfo {
            code: STORE_ERROR_BAD_FRAME,
            message: format!("bad {kind} frame: {error}"),
        }),
        client_id,
        count,
    })))
}

/// A proto3 JSON 64-bit integer: a decimal string or a number.
fn json_u64(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::String(s) => s.parse().ok(),
        other => other.as_u64(),
    }
}

impl CloseCode {
    /// The code for a raw `Close.code` value; unknown values map to `None`.
    pub fn from_u32(code: u32) -> Option<Self> {
        i32::try_from(code)
            .ok()
            .and_then(|c| CloseCode::try_from(c).ok())
    }
}
