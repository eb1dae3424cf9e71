//! Reading encoded frames without decoding them: the one home of the
//! protobuf knowledge that fast paths need (the `Frame` field numbers, the
//! varint reader, where a frame's body variant starts, the parts of a plain
//! `Deliver`).
//!
//! Everything here reads bytes from the network: no function panics or
//! allocates on any input, and each is fuzzed (`fuzz/fuzz_targets/wire.rs`)
//! and checked against prost in the tests.

use std::ops::{Range, RangeInclusive};

/// Field numbers of the `Frame.body` variants (see `proto/replimesh.proto`);
/// a test checks each against the generated code.
pub mod field {
    /// `Hello`.
    pub const HELLO: u32 = 1;
    /// `Welcome`.
    pub const WELCOME: u32 = 2;
    /// `Ping`.
    pub const PING: u32 = 3;
    /// `Pong`.
    pub const PONG: u32 = 4;
    /// `Close`.
    pub const CLOSE: u32 = 5;
    /// `Request`.
    pub const REQUEST: u32 = 10;
    /// `Response`.
    pub const RESPONSE: u32 = 11;
    /// `Send`.
    pub const SEND: u32 = 12;
    /// `Subscribe`.
    pub const SUBSCRIBE: u32 = 13;
    /// `Unsubscribe`.
    pub const UNSUBSCRIBE: u32 = 14;
    /// `Publish`.
    pub const PUBLISH: u32 = 15;
    /// `Deliver`.
    pub const DELIVER: u32 = 16;
    /// `Gossip`.
    pub const GOSSIP: u32 = 20;
    /// `Forward`.
    pub const FORWARD: u32 = 21;
    /// `GroupDelete`.
    pub const GROUP_DELETE: u32 = 22;
    /// `Interest`.
    pub const INTEREST: u32 = 23;
    /// `StoreHello`.
    pub const STORE_HELLO: u32 = 30;
    /// `Data` (benchmarks and tests).
    pub const DATA: u32 = 100;
}

/// Field numbers reserved for the connection-level frames (`Hello` ... `Close`).
pub const CONNECTION_FIELDS: RangeInclusive<u32> = 1..=9;
/// Field numbers reserved for messaging frames (client ↔ server).
pub const MESSAGING_FIELDS: RangeInclusive<u32> = 10..=19;
/// Field numbers reserved for clone-level frames (authenticated clone links only).
pub const CLONE_FIELDS: RangeInclusive<u32> = 20..=29;
/// Field numbers reserved for store frames.
pub const STORE_FIELDS: RangeInclusive<u32> = 30..=49;

/// Protobuf wire type of length-delimited fields (messages, strings, bytes).
pub const LEN_DELIMITED: u8 = 2;

/// The one-byte key of a length-delimited field with a number below 16.
pub const fn short_key(field: u32) -> u8 {
    ((field as u8) << 3) | LEN_DELIMITED
}

/// Reads the varint at `*pos` (at most 10 bytes, at most 64 bits, as prost
/// accepts) and advances `pos` past it; `None` when it is cut short or
/// overflows.
pub fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        // The 10th byte holds bit 63 only; more would overflow (prost refuses).
        if i == 9 && b > 1 {
            return None;
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The `Frame` field number an encoded frame body starts with, which is its
/// `body` variant as every encoder writes it (one field); 0 for an empty body
/// or one that does not start with a valid key.
pub fn frame_field(body: &[u8]) -> u32 {
    let mut pos = 0;
    match read_varint(body, &mut pos) {
        Some(key) => u32::try_from(key >> 3).unwrap_or(0),
        None => 0,
    }
}

/// Where the parts of a `Deliver` frame are in its encoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverParts {
    /// `Deliver.group` (not checked for UTF-8).
    pub group: Range<usize>,
    /// `Deliver.from` (not checked for UTF-8).
    pub from: Range<usize>,
    /// `Deliver.data`.
    pub data: Range<usize>,
}

const DELIVER_GROUP: u8 = short_key(1);
const DELIVER_FROM: u8 = short_key(2);
const DELIVER_DATA: u8 = short_key(3);

/// The parts of `body` if it is a `Deliver` frame of the plain shape clones
/// send (only the fields `group`, `from` and `data`, each at most once, in any
/// order, within bounds), without decoding it; `None` for anything else, which
/// the caller decodes with prost (which also finds what is malformed). The
/// strings are not checked for UTF-8 here.
pub fn deliver_parts(body: &[u8]) -> Option<DeliverParts> {
    let rest = body.strip_prefix(&deliver_key()[..])?;
    let mut pos = body.len() - rest.len();
    let len = usize::try_from(read_varint(body, &mut pos)?).ok()?;
    if body.len() - pos != len {
        return None;
    }
    let (mut group, mut from, mut data) = (pos..pos, pos..pos, pos..pos);
    // A repeated field (the last one counts) is left to prost, which also
    // refuses the frame if an earlier one is not UTF-8.
    let mut seen = 0u8;
    while pos < body.len() {
        let key = body[pos];
        pos += 1;
        let len = usize::try_from(read_varint(body, &mut pos)?).ok()?;
        if len > body.len() - pos {
            return None;
        }
        let r = pos..pos + len;
        pos += len;
        let (slot, bit) = match key {
            DELIVER_GROUP => (&mut group, 1),
            DELIVER_FROM => (&mut from, 2),
            DELIVER_DATA => (&mut data, 4),
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        *slot = r;
    }
    Some(DeliverParts { group, from, data })
}

/// The two-byte key of `Frame.deliver` (field 16, length-delimited).
pub const fn deliver_key() -> [u8; 2] {
    key2(field::DELIVER)
}

/// The two-byte key of a length-delimited `Frame` field numbered 16 to 2047.
const fn key2(field: u32) -> [u8; 2] {
    let k = (field << 3) | LEN_DELIMITED as u32;
    [(k as u8 & 0x7f) | 0x80, (k >> 7) as u8]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{frame::Body, Frame, Message};

    fn every_body() -> Vec<Body> {
        use crate::*;
        vec![
            Body::Hello(Hello::default()),
            Body::Welcome(Welcome::default()),
            Body::Ping(Ping::default()),
            Body::Pong(Pong::default()),
            Body::Close(Close::default()),
            Body::Request(Request::default()),
            Body::Response(Response::default()),
            Body::Send(Send::default()),
            Body::Subscribe(Subscribe::default()),
            Body::Unsubscribe(Unsubscribe::default()),
            Body::Publish(Publish::default()),
            Body::Deliver(Deliver::default()),
            Body::Gossip(Gossip::default()),
            Body::Forward(Forward::default()),
            Body::GroupDelete(GroupDelete::default()),
            Body::Interest(Interest::default()),
            Body::StoreHello(StoreHello::default()),
            Body::StoreWelcome(StoreWelcome::default()),
            Body::Dispatch(Dispatch::default()),
            Body::Committed(Committed::default()),
            Body::Actions(Actions::default()),
            Body::Snapshot(Snapshot::default()),
            Body::Digest(Digest::default()),
            Body::Resync(Resync::default()),
            Body::StoreError(StoreError::default()),
            Body::Data(Data::default()),
        ]
    }

    /// The field number prost gives a body variant: the key it writes first.
    fn prost_field(b: &Body) -> u32 {
        let mut buf = Vec::new();
        b.encode(&mut buf);
        let mut pos = 0;
        (read_varint(&buf, &mut pos).unwrap() >> 3) as u32
    }

    #[test]
    fn field_numbers_match_the_schema() {
        use crate::frame::Body as B;
        for b in every_body() {
            let n = prost_field(&b);
            assert_eq!(frame_field(&Frame::new(b.clone()).encode_to_vec()), n);
            let expected = match &b {
                B::Hello(_) => Some(field::HELLO),
                B::Welcome(_) => Some(field::WELCOME),
                B::Ping(_) => Some(field::PING),
                B::Pong(_) => Some(field::PONG),
                B::Close(_) => Some(field::CLOSE),
                B::Request(_) => Some(field::REQUEST),
                B::Response(_) => Some(field::RESPONSE),
                B::Send(_) => Some(field::SEND),
                B::Subscribe(_) => Some(field::SUBSCRIBE),
                B::Unsubscribe(_) => Some(field::UNSUBSCRIBE),
                B::Publish(_) => Some(field::PUBLISH),
                B::Deliver(_) => Some(field::DELIVER),
                B::Gossip(_) => Some(field::GOSSIP),
                B::Forward(_) => Some(field::FORWARD),
                B::GroupDelete(_) => Some(field::GROUP_DELETE),
                B::Interest(_) => Some(field::INTEREST),
                B::StoreHello(_) => Some(field::STORE_HELLO),
                B::Data(_) => Some(field::DATA),
                _ => None,
            };
            if let Some(e) = expected {
                assert_eq!(n, e, "{b:?}");
            }
            let range = match &b {
                B::Hello(_) | B::Welcome(_) | B::Ping(_) | B::Pong(_) | B::Close(_) => {
                    Some(CONNECTION_FIELDS)
                }
                B::Gossip(_) | B::Forward(_) | B::GroupDelete(_) | B::Interest(_) => {
                    Some(CLONE_FIELDS)
                }
                B::StoreHello(_)
                | B::StoreWelcome(_)
                | B::Dispatch(_)
                | B::Committed(_)
                | B::Actions(_)
                | B::Snapshot(_)
                | B::Digest(_)
                | B::Resync(_)
                | B::StoreError(_) => Some(STORE_FIELDS),
                B::Data(_) => None,
                _ => Some(MESSAGING_FIELDS),
            };
            if let Some(r) = range {
                assert!(r.contains(&n), "{b:?} is field {n}, outside {r:?}");
            }
        }
        assert_eq!(
            deliver_key()[..],
            Frame::new(Body::Deliver(Default::default())).encode_to_vec()[..2]
        );
        assert_eq!(frame_field(&[]), 0);
        assert_eq!(frame_field(&[0xff; 12]), 0);
    }

    #[test]
    fn varints_as_prost_reads_them() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut buf = Vec::new();
            prost::encoding::encode_varint(v, &mut buf);
            let mut pos = 0;
            assert_eq!(read_varint(&buf, &mut pos), Some(v));
            assert_eq!(pos, buf.len());
            // Cut short.
            let mut pos = 0;
            assert_eq!(read_varint(&buf[..buf.len() - 1], &mut pos), None);
        }
        // Ten bytes whose last has more than bit 63: prost refuses, so do we.
        let mut over = [0xffu8; 10];
        over[9] = 0x02;
        assert_eq!(read_varint(&over, &mut 0), None);
        assert_eq!(read_varint(&[0x80; 11], &mut 0), None);
    }

    #[test]
    fn deliver_parts_agree_with_prost() {
        let d = crate::Deliver {
            group: "chat".into(),
            from: "alice".into(),
            data: bytes::Bytes::from_static(b"hello"),
        };
        let body = Frame::new(Body::Deliver(d.clone())).encode_to_vec();
        let p = deliver_parts(&body).unwrap();
        assert_eq!(&body[p.group], b"chat");
        assert_eq!(&body[p.from], b"alice");
        assert_eq!(&body[p.data], b"hello");
        // Anything else is left to prost.
        assert!(
            deliver_parts(&Frame::new(Body::Publish(Default::default())).encode_to_vec()).is_none()
        );
        assert!(deliver_parts(&body[..body.len() - 1]).is_none());
        // Empty fields are allowed (prost omits them).
        let empty = Frame::new(Body::Deliver(Default::default())).encode_to_vec();
        let p = deliver_parts(&empty).unwrap();
        assert!(p.group.is_empty() && p.from.is_empty() && p.data.is_empty());
    }
}
