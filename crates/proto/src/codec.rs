//! Length-prefixed framing for byte streams.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::Frame;

/// Size of the length prefix: a 4-byte big-endian unsigned integer.
pub const LENGTH_PREFIX: usize = 4;

/// Default maximum frame size (16 MiB), the body without its length prefix.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Errors of [`FrameCodec`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The peer announced (or we tried to send) a frame larger than allowed.
    /// Nothing of the announced size was allocated.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    FrameTooLarge {
        /// The announced or attempted length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The bytes of a frame are not a valid protobuf `Frame`.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// An I/O error of the underlying stream.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes and decodes length-prefixed [`Frame`]s.
///
/// Wire format: `len: u32 big-endian` then `len` bytes of protobuf. The
/// maximum is checked against the announced length before any buffer is
/// grown for it, so a hostile length costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameCodec {
    /// A codec that refuses frames whose body is longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameCodec {
            max_frame: max_frame.min(u32::MAX as usize),
        }
    }

    /// The configured maximum body size.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Splits one complete frame body off `src` without decoding it.
    ///
    /// Returns `Ok(None)` when more bytes are needed. On success the length
    /// prefix is consumed and the body is returned as shared `Bytes`.
    pub fn split_frame(&self, src: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        if src.len() < LENGTH_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if src.len() < LENGTH_PREFIX + len {
            // The length is within the limit, so reserving for it is bounded.
            src.reserve(LENGTH_PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX);
        Ok(Some(src.split_to(len).freeze()))
    }

    /// Appends an already encoded frame body with its length prefix.
    pub fn put_encoded(&self, body: &[u8], dst: &mut BytesMut) -> Result<(), CodecError> {
        if body.len() > self.max_frame {
            return Err(CodecError::FrameTooLarge {
                len: body.len(),
                max: self.max_frame,
            });
        }
        dst.reserve(LENGTH_PREFIX + body.len());
        dst.put_u32(body.len() as u32);
        dst.extend_from_slice(body);
        Ok(())
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.split_frame(src)? {
            None => Ok(None),
            Some(body) => Ok(Some(Frame::decode(body)?)),
        }
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = frame.encoded_len();
        if len > self.max_frame {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        dst.reserve(LENGTH_PREFIX + len);
        dst.put_u32(len as u32);
        // Cannot fail: capacity was reserved above.
        frame
            .encode(dst)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(())
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        Encoder::<&Frame>::encode(self, &frame, dst)
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = CodecError;

    /// Encodes a body that was already protobuf-encoded (see [`Frame::encode_to_bytes`]).
    fn encode(&mut self, body: Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.put_encoded(&body, dst)
    }
}
