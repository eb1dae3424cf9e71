//! Fuzz target for the transport's stream reader (TCP, TLS and Unix
//! connections): the frame splitter, the large-frame buffers and the control
//! frames, through `transport::fuzz::split_stream`.
//!
//! The first input byte sets the chunk size (1-64 bytes, one chunk per read,
//! as a socket delivers them) and the second the maximum frame size; the
//! rest is the byte stream. The reader must never panic and must deliver
//! exactly what a plain model of the protocol says: frames are a 4-byte
//! big-endian length and that many bytes; a length above the maximum ends
//! the stream (`FrameTooLarge`); a frame starting like a `Ping`, `Pong` or
//! `Close` is decoded: `Ping` and `Pong` are answered or dropped, `Close`
//! ends the stream (`Closed`), one prost refuses ends it (`Malformed`), one
//! that turns out to be another kind is delivered; every other frame is
//! delivered as it came; a stream that runs out ends with `Eof`.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use transport::proto::{frame::Body, Frame, Message};
use transport::RecvError;

/// How the model says the stream ends.
#[derive(Debug, PartialEq)]
enum End {
    Eof,
    TooLarge { len: usize, max: usize },
    Closed { code: u32, reason: String },
    Malformed,
}

fn model(stream: &[u8], max: usize) -> (Vec<&[u8]>, End) {
    let mut frames = Vec::new();
    let mut rest = stream;
    loop {
        let Some((prefix, after)) = rest.split_first_chunk::<4>() else {
            return (frames, End::Eof);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > max {
            return (frames, End::TooLarge { len, max });
        }
        if after.len() < len {
            return (frames, End::Eof);
        }
        let (body, next) = after.split_at(len);
        rest = next;
        // The keys of Frame.ping (3), Frame.pong (4), Frame.close (5).
        if matches!(body.first(), Some(0x1a | 0x22 | 0x2a)) {
            match Frame::decode(body) {
                Err(_) => return (frames, End::Malformed),
                Ok(f) => match f.body {
                    Some(Body::Ping(_) | Body::Pong(_)) => continue,
                    Some(Body::Close(c)) => {
                        return (
                            frames,
                            End::Closed {
                                code: c.code as u32,
                                reason: c.reason,
                            },
                        )
                    }
                    _ => {}
                },
            }
        }
        frames.push(body);
    }
}

fuzz_target!(|data: &[u8]| {
    let [size, max, stream @ ..] = data else {
        return;
    };
    let chunk = 1 + usize::from(size % 64);
    // Small maxima make oversized frames common; 0xff: 16 MiB, the default.
    let max = match max {
        0xff => 16 * 1024 * 1024,
        m => usize::from(*m) * 64,
    };
    let chunks: Vec<&[u8]> = stream.chunks(chunk).collect();
    let (bodies, end) = transport::fuzz::split_stream(&chunks, max);

    let (want, want_end) = model(stream, max);
    let got: Vec<&[u8]> = bodies.iter().map(Bytes::as_ref).collect();
    assert_eq!(got, want);
    let end = match end {
        RecvError::Eof => End::Eof,
        RecvError::FrameTooLarge { len, max } => End::TooLarge { len, max },
        RecvError::Closed { code, reason } => End::Closed { code, reason },
        RecvError::Malformed(_) => End::Malformed,
        other => panic!("unexpected end of the stream: {other:?}"),
    };
    assert_eq!(end, want_end);
});
