//! Fuzz target for the frame decoders.
//!
//! 1. Byte streams (TCP, TLS, Unix): the input, after its first byte, is fed
//!    to `FrameCodec::decode` in chunks whose size comes from the first byte,
//!    as a socket would deliver it. The decoder must never panic, must refuse
//!    a length prefix above the maximum before allocating it, and every frame
//!    it yields must survive encode -> decode unchanged.
//! 2. WebSocket binary messages: the whole input is one frame body, decoded
//!    with prost as the WebSocket transport does, with the same round trip.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use proto::{CodecError, Frame, FrameCodec};
use tokio_util::codec::{Decoder, Encoder};

/// A small maximum, so that oversized prefixes are common in the corpus.
const MAX_FRAME: usize = 64 * 1024;

fn round_trip(codec: &mut FrameCodec, frame: &Frame) {
    let mut wire = BytesMut::new();
    codec
        .encode(frame, &mut wire)
        .expect("a decoded frame re-encodes within the maximum");
    let again = codec
        .decode(&mut wire)
        .expect("re-encoded frame decodes")
        .expect("re-encoded frame is complete");
    assert_eq!(&again, frame);
    assert!(wire.is_empty());
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };

    // 1. Length-prefixed byte stream, delivered in chunks.
    let chunk = 1 + usize::from(first % 64);
    let mut codec = FrameCodec::new(MAX_FRAME);
    let mut buf = BytesMut::new();
    'stream: for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => round_trip(&mut codec, &frame),
                Ok(None) => {
                    // Whatever was reserved is bounded by the maximum.
                    assert!(buf.capacity() <= 4 * (MAX_FRAME + 4 + stream.len()));
                    break;
                }
                Err(CodecError::FrameTooLarge { len, max }) => {
                    assert!(len > max);
                    break 'stream;
                }
                Err(_) => break 'stream,
            }
        }
    }

    // 2. One WebSocket binary message = one frame body.
    if let Ok(frame) = Frame::decode(data) {
        let body = frame.encode_to_vec();
        let again = Frame::decode(&body[..]).expect("re-encoded frame decodes");
        assert_eq!(again, frame);
    }
});
