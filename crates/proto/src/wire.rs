//! Reading and writing encoded frames without prost: the one home of the
//! protobuf knowledge that fast paths need (the `Frame` field numbers, the
//! varint reader, a frame's kind from its first bytes, the parts of a plain
//! `Deliver`, and the hand-written encoders of the frames of every group
//! message, `Deliver` and `Forward`). The length prefix of byte streams is
//! in [`crate::split_frame`].
//!
//! Every reader here reads bytes from the network: none panics or allocates
//! on any input. Readers and encoders are fuzzed against prost
//! (`fuzz/fuzz_targets/wire.rs`) and checked against it in the tests.

use std::ops::{Range, RangeInclusive};

use bytes::Bytes;

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

/// The keys of `Frame.ping`, `Frame.pong` and `Frame.close`.
const PING_KEY: u8 = short_key(field::PING);
const PONG_KEY: u8 = short_key(field::PONG);
const CLOSE_KEY: u8 = short_key(field::CLOSE);

/// Whether an encoded frame body starts like a `Ping`, `Pong` or `Close`
/// (the control frames a connection answers itself), from its first byte:
/// a frame has one field, so its key tells its kind. Such a body is then
/// decoded with prost, which has the last word (a body with several fields
/// may turn out to be another kind, or malformed).
#[inline]
pub fn is_control(body: &[u8]) -> bool {
    matches!(body.first(), Some(&(PING_KEY | PONG_KEY | CLOSE_KEY)))
}

/// Reads the varint at `*pos` (at most 10 bytes, at most 64 bits, as prost
/// accepts) and advances `pos` past it; `None` when it is cut short or
/// overflows.
#[inline]
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
#[inline]
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
#[inline]
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

// ---- frames written by hand: the ones of every group message ----
//
// Byte for byte what prost writes (fields in order, proto3 defaults left
// out), without building the prost structs and their strings first.

/// Where protobuf bytes go: a buffer, or a count of them.
trait Out {
    fn put(&mut self, bytes: &[u8]);

    fn varint(&mut self, mut v: u64) {
        let mut buf = [0u8; 10];
        let mut n = 0;
        while v >= 0x80 {
            buf[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        buf[n] = v as u8;
        self.put(&buf[..=n]);
    }

    /// A length-delimited field, also when empty (repeated fields).
    fn field(&mut self, field: u32, bytes: &[u8]) {
        self.varint(u64::from(field) << 3 | u64::from(LEN_DELIMITED));
        self.varint(bytes.len() as u64);
        self.put(bytes);
    }

    /// A singular `string` or `bytes` field (left out when empty).
    fn text(&mut self, field: u32, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.field(field, bytes);
        }
    }

    /// A singular `uint64` or `bool` field (left out when 0).
    fn number(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.varint(u64::from(field) << 3);
            self.varint(v);
        }
    }
}

impl Out for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// Counts what would be written.
struct Count(usize);

impl Out for Count {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

/// A message written by hand.
trait WriteMsg {
    fn write(&self, out: &mut impl Out);
}

/// A frame whose body is `msg` as field `field` of `Frame`: one allocation.
fn encode_frame(field: u32, msg: &impl WriteMsg) -> Bytes {
    let mut len = Count(0);
    msg.write(&mut len);
    let key = u64::from(field) << 3 | u64::from(LEN_DELIMITED);
    let mut head = Count(0);
    head.varint(key);
    head.varint(len.0 as u64);
    let mut out = Vec::with_capacity(head.0 + len.0);
    out.varint(key);
    out.varint(len.0 as u64);
    msg.write(&mut out);
    Bytes::from(out)
}

struct DeliverRef<'a> {
    group: &'a str,
    from: &'a str,
    data: &'a [u8],
}

impl WriteMsg for DeliverRef<'_> {
    fn write(&self, out: &mut impl Out) {
        out.text(1, self.group.as_bytes());
        out.text(2, self.from.as_bytes());
        out.text(3, self.data);
    }
}

/// An encoded `Deliver` frame body, byte for byte what prost writes for
/// `Frame::new(Body::Deliver(Deliver { group, from, data }))`, in one
/// allocation and without building the prost message first.
#[inline]
pub fn encode_deliver(group: &str, from: &str, data: &[u8]) -> Bytes {
    encode_frame(field::DELIVER, &DeliverRef { group, from, data })
}

/// The fields of a `Forward` frame, borrowed (see `proto/replimesh.proto`
/// for what each means), for [`encode_forward`].
#[derive(Debug, Clone, Copy)]
pub struct ForwardRef<'a> {
    /// `Forward.origin`.
    pub origin: &'a str,
    /// `Forward.msg_id`.
    pub msg_id: u64,
    /// `Forward.groups`.
    pub groups: &'a [String],
    /// `Forward.all`.
    pub all: bool,
    /// `Forward.exclude_client`.
    pub exclude_client: &'a str,
    /// `Forward.from`.
    pub from: &'a str,
    /// `Forward.data`.
    pub data: &'a [u8],
    /// `Forward.origin_incarnation`.
    pub origin_incarnation: u64,
    /// `Forward.seen`.
    pub seen: &'a [String],
    /// `Forward.relay`.
    pub relay: bool,
}

impl WriteMsg for ForwardRef<'_> {
    fn write(&self, out: &mut impl Out) {
        out.text(1, self.origin.as_bytes());
        out.number(2, self.msg_id);
        for g in self.groups {
            out.field(3, g.as_bytes());
        }
        out.number(4, self.all.into());
        out.text(5, self.exclude_client.as_bytes());
        out.text(6, self.from.as_bytes());
        out.text(7, self.data);
        out.number(8, self.origin_incarnation);
        for s in self.seen {
            out.field(9, s.as_bytes());
        }
        out.number(10, self.relay.into());
    }
}

/// An encoded `Forward` frame body, byte for byte what prost writes for the
/// same fields, in one allocation and without building the prost message
/// first.
#[inline]
pub fn encode_forward(f: &ForwardRef<'_>) -> Bytes {
    encode_frame(field::FORWARD, f)
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

    fn deliver(group: &str, from: &str, data: &[u8]) -> Frame {
        Frame::new(Body::Deliver(crate::Deliver {
            group: group.into(),
            from: from.into(),
            data: bytes::Bytes::copy_from_slice(data),
        }))
    }

    /// What the fast path makes of `body`, as a frame.
    fn fast(body: &[u8]) -> Option<Frame> {
        let p = deliver_parts(body)?;
        let text = |r: Range<usize>| std::str::from_utf8(&body[r]).ok();
        Some(deliver(text(p.group)?, text(p.from)?, &body[p.data]))
    }

    #[test]
    fn control_frames_are_told_by_their_first_byte() {
        use crate::CloseCode;
        assert!(is_control(&Frame::ping(1).encode_to_vec()));
        assert!(is_control(&Frame::pong(1).encode_to_vec()));
        assert!(is_control(
            &Frame::close(CloseCode::Normal, "x").encode_to_vec()
        ));
        for b in every_body() {
            let control = matches!(b, Body::Ping(_) | Body::Pong(_) | Body::Close(_));
            assert_eq!(
                is_control(&Frame::new(b.clone()).encode_to_vec()),
                control,
                "{b:?}"
            );
        }
        assert!(!is_control(&Frame::data(&b"x"[..]).encode_to_vec()));
        assert!(!is_control(&[]));
    }

    #[test]
    fn encode_deliver_is_what_prost_encodes_and_reads_back() {
        let big = vec![7u8; 300];
        let long = "g".repeat(200);
        let cases: [(&str, &str, &[u8]); 6] = [
            ("news", "client-1", b"hello"),
            ("", "", b""),
            ("g", "", b"x"),
            ("", "c", b""),
            (&long, "c\u{e9}", &big),
            ("\u{1f600}", "from", &[0, 1, 2]),
        ];
        for (g, f, d) in cases {
            let want = deliver(g, f, d);
            let body = encode_deliver(g, f, d);
            assert_eq!(body, want.encode_to_bytes(), "{g:?} {f:?}");
            assert_eq!(fast(&body), Some(want), "{g:?} {f:?}");
        }
    }

    #[test]
    fn encode_forward_is_what_prost_encodes() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let big = vec![1u8; 1000];
        let groups = [
            strings(&[]),
            strings(&["bench"]),
            strings(&["a", "", "\u{e9}t\u{e9}"]),
        ];
        let seens = [strings(&[]), strings(&["a", "", "c"])];
        let datas: [&[u8]; 3] = [b"", b"payload", &big];
        for (i, (g, d)) in groups.iter().zip(datas).enumerate() {
            for seen in &seens {
                for relay in [false, true] {
                    let f = ForwardRef {
                        origin: ["", "clone-1", "c"][i],
                        msg_id: [0, 1, u64::MAX][i],
                        groups: g,
                        all: i == 1,
                        exclude_client: ["", "x", "client-\u{e9}"][i],
                        from: ["y", "", "client-1"][i],
                        data: d,
                        origin_incarnation: [0, 3, 1_700_000_000_000_000][i],
                        seen,
                        relay,
                    };
                    let want = Frame::new(Body::Forward(crate::Forward {
                        origin: f.origin.into(),
                        msg_id: f.msg_id,
                        groups: g.clone(),
                        all: f.all,
                        exclude_client: f.exclude_client.into(),
                        from: f.from.into(),
                        data: bytes::Bytes::copy_from_slice(d),
                        origin_incarnation: f.origin_incarnation,
                        seen: seen.clone(),
                        relay,
                    }));
                    assert_eq!(encode_forward(&f), want.encode_to_bytes(), "{f:?}");
                }
            }
        }
    }

    #[test]
    fn the_fast_path_agrees_with_prost_or_steps_aside() {
        let frame = |fields: &[(u8, &[u8])]| {
            let mut b = vec![0x82, 0x01, 0];
            for (k, v) in fields {
                b.extend_from_slice(&[*k, v.len() as u8]);
                b.extend_from_slice(v);
            }
            b[2] = (b.len() - 3) as u8;
            b
        };
        // Fields out of order.
        let odd = frame(&[
            (DELIVER_DATA, b"d1"),
            (DELIVER_FROM, b"f"),
            (DELIVER_GROUP, b"g1"),
        ]);
        assert_eq!(fast(&odd), Some(deliver("g1", "f", b"d1")));
        assert_eq!(
            Frame::decode(&odd[..]).ok(),
            Some(deliver("g1", "f", b"d1"))
        );
        // A repeated field is left to prost (the last one counts).
        let twice = frame(&[
            (DELIVER_GROUP, b"g1"),
            (DELIVER_DATA, b"d1"),
            (DELIVER_GROUP, b"g2"),
        ]);
        assert_eq!(deliver_parts(&twice), None);
        assert_eq!(
            Frame::decode(&twice[..]).ok(),
            Some(deliver("g2", "", b"d1"))
        );
        // A varint over 64 bits: refused, as prost does.
        let mut over = deliver_key().to_vec();
        over.extend_from_slice(&[0xff; 9]);
        over.push(0x02);
        assert!(deliver_parts(&over).is_none());
        assert!(Frame::decode(&over[..]).is_err(), "prost refuses it too");
        // Another frame kind.
        assert_eq!(deliver_parts(&Frame::ping(3).encode_to_vec()), None);
        // Random corruptions of real frames: whenever the fast path answers,
        // prost decodes the same frame.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let base = encode_deliver("group", "client-0123456789abcdef", &[5u8; 40]).to_vec();
        let (mut answered, mut aside) = (0, 0);
        for _ in 0..20_000 {
            let mut b = base.clone();
            for _ in 0..(rand() % 3 + 1) {
                let i = (rand() as usize) % b.len();
                b[i] = match rand() % 4 {
                    0 => DELIVER_GROUP,
                    1 => DELIVER_FROM,
                    2 => b[i].wrapping_add(1),
                    _ => rand() as u8,
                };
            }
            if rand() % 5 == 0 {
                b.truncate((rand() as usize) % b.len());
            }
            match fast(&b) {
                Some(f) => {
                    answered += 1;
                    assert_eq!(Frame::decode(&b[..]).ok(), Some(f), "{b:?}");
                }
                None => aside += 1,
            }
        }
        assert!(answered > 100 && aside > 100, "{answered} {aside}");
    }

    #[test]
    fn written_varints_read_back_and_are_counted_right() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            out.varint(v);
            let mut n = Count(0);
            n.varint(v);
            assert_eq!(out.len(), n.0);
            let mut prost_out = Vec::new();
            prost::encoding::encode_varint(v, &mut prost_out);
            assert_eq!(out, prost_out);
            let mut pos = 0;
            assert_eq!(read_varint(&out, &mut pos), Some(v));
            assert_eq!(pos, out.len());
        }
    }
}
