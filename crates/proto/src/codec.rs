//! Length-prefixed framing for byte streams.

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

use crate::Frame;

/// Size of the length prefix: a 4-byte big-endian unsigned integer.
pub const LENGTH_PREFIX: usize = 4;

/// Default maximum frame size (16 MiB), the body without its length prefix.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// What the start of a length-prefixed byte stream holds (see [`split_frame`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Split {
    /// A complete frame body, split off the buffer without copying.
    Frame(Bytes),
    /// The next frame is not complete yet: its body length, if its length
    /// prefix has arrived (`None`: fewer bytes than a length prefix).
    Partial(Option<usize>),
    /// The next frame announces a body of this many bytes, more than the
    /// maximum; nothing was taken off the buffer or allocated.
    TooLarge(usize),
}

/// The frame splitter of every byte stream: splits the first frame body off
/// `src` (its length prefix consumed, the body shared without copying) if it
/// is complete and at most `max` bytes long. The length prefix is checked
/// against `max` before anything else, so a hostile length costs nothing.
#[inline]
pub fn split_frame(src: &mut BytesMut, max: usize) -> Split {
    let Some(&prefix) = src.first_chunk::<LENGTH_PREFIX>() else {
        return Split::Partial(None);
    };
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Split::TooLarge(len);
    }
    if src.len() < LENGTH_PREFIX + len {
        return Split::Partial(Some(len));
    }
    src.advance(LENGTH_PREFIX);
    Split::Frame(src.split_to(len).freeze())
}

/// The length prefix of a frame body of `len` bytes. `len` must fit the
/// prefix (at most `u32::MAX`): callers check it against their maximum
/// frame first, which [`FrameCodec::new`] keeps below that.
#[inline]
pub fn length_prefix(len: usize) -> [u8; LENGTH_PREFIX] {
    (len as u32).to_be_bytes()
}

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
        match split_frame(src, self.max_frame) {
            Split::Frame(body) => Ok(Some(body)),
            Split::Partial(None) => Ok(None),
            Split::Partial(Some(len)) => {
                // The length is within the limit, so reserving for it is bounded.
                src.reserve(LENGTH_PREFIX + len - src.len());
                Ok(None)
            }
            Split::TooLarge(len) => Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame,
            }),
        }
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
        dst.extend_from_slice(&length_prefix(body.len()));
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
        dst.extend_from_slice(&length_prefix(len));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_frame_takes_whole_frames_and_refuses_long_ones_first() {
        let mut stream = BytesMut::new();
        for body in [&b""[..], b"a", b"hello"] {
            stream.extend_from_slice(&length_prefix(body.len()));
            stream.extend_from_slice(body);
        }
        let whole = stream.clone();
        // Every cut of the stream: the complete frames, then what is missing.
        for cut in 0..=whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            let mut got = Vec::new();
            let rest = loop {
                match split_frame(&mut buf, 5) {
                    Split::Frame(b) => got.push(b),
                    other => break other,
                }
            };
            let want: &[&[u8]] = match cut {
                0..=3 => &[],
                4..=8 => &[b""],
                9..=17 => &[b"", b"a"],
                _ => &[b"", b"a", b"hello"],
            };
            assert_eq!(got, want, "cut {cut}");
            let next = match cut {
                0..=7 | 9..=12 | 18 => None,
                8 => Some(1),
                _ => Some(5),
            };
            assert_eq!(rest, Split::Partial(next), "cut {cut}");
        }
        // Over the maximum: refused from the prefix alone, nothing taken.
        let mut buf = BytesMut::from(&whole[9..]);
        assert_eq!(split_frame(&mut buf, 4), Split::TooLarge(5));
        assert_eq!(buf.len(), whole.len() - 9);
        let mut evil = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert_eq!(
            split_frame(&mut evil, usize::MAX),
            Split::Partial(Some(u32::MAX as usize))
        );
    }
}
