//! Conversions between the core's domain frames and protobuf frames (the edge).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use proto::{frame::Body, Frame};

use crate::core::{CloneEntry, CloneFrame, GroupMsg};

/// Encodes a clone-level frame.
pub(crate) fn encode_clone(f: &CloneFrame) -> Bytes {
    let body = match f {
        CloneFrame::Gossip { entries, full } => Body::Gossip(proto::Gossip {
            clones: entries
                .iter()
                .map(|e| proto::CloneEntry {
                    id: e.id.clone(),
                    url: e.url.clone(),
                    incarnation: e.incarnation,
                    up: e.up,
                    gone: e.gone,
                })
                .collect(),
            full: *full,
        }),
        // the frame of every group message: written directly
        CloneFrame::Forward { msg, seen, relay } => {
            return encode_frame(
                FORWARD_FIELD,
                &ForwardRef {
                    msg,
                    seen,
                    relay: *relay,
                },
            )
        }
        CloneFrame::GroupDelete {
            origin,
            origin_incarnation,
            msg_id,
            group,
            seen,
        } => Body::GroupDelete(proto::GroupDelete {
            origin: origin.clone(),
            msg_id: *msg_id,
            group: group.clone(),
            origin_incarnation: *origin_incarnation,
            seen: seen.clone(),
        }),
        CloneFrame::Interest { add, remove, full } => Body::Interest(proto::Interest {
            add: add.clone(),
            remove: remove.clone(),
            full: *full,
        }),
    };
    Frame::new(body).encode_to_bytes()
}

/// The clone-level frame in `body`, or the kind of frame it is instead.
pub(crate) fn decode_clone(body: Body) -> Result<CloneFrame, &'static str> {
    Ok(match body {
        Body::Gossip(g) => CloneFrame::Gossip {
            entries: g
                .clones
                .into_iter()
                .map(|e| CloneEntry {
                    id: e.id,
                    url: e.url,
                    incarnation: e.incarnation,
                    up: e.up,
                    gone: e.gone,
                })
                .collect(),
            full: g.full,
        },
        Body::Forward(f) => CloneFrame::Forward {
            msg: Arc::new(GroupMsg {
                origin: f.origin,
                origin_incarnation: f.origin_incarnation,
                msg_id: f.msg_id,
                groups: f.groups,
                all: f.all,
                exclude_client: f.exclude_client,
                from: f.from,
                data: f.data,
            }),
            seen: f.seen,
            relay: f.relay,
        },
        Body::GroupDelete(d) => CloneFrame::GroupDelete {
            origin: d.origin,
            origin_incarnation: d.origin_incarnation,
            msg_id: d.msg_id,
            group: d.group,
            seen: d.seen,
        },
        Body::Interest(i) => CloneFrame::Interest {
            add: i.add,
            remove: i.remove,
            full: i.full,
        },
        other => return Err(Frame::new(other).kind()),
    })
}

/// Whether a body is clone-level (only allowed on authenticated clone links).
pub(crate) fn is_clone_level(body: &Body) -> bool {
    matches!(
        body,
        Body::Gossip(_) | Body::Forward(_) | Body::GroupDelete(_) | Body::Interest(_)
    )
}

// ---- frames written by hand: the ones of every group message ----
//
// Byte for byte what prost writes (fields in order, proto3 defaults left
// out), without building the prost structs and their strings first.

/// Field numbers in `Frame` of `deliver` and `forward`.
const DELIVER_FIELD: u64 = 16;
const FORWARD_FIELD: u64 = 21;
/// Protobuf key of `Frame.deliver` (field 16, length-delimited), as a varint.
const DELIVER_KEY: [u8; 2] = [0x82, 0x01];
/// Keys of `Deliver.group` (1), `Deliver.from` (2) and `Deliver.data` (3),
/// all length-delimited.
const GROUP_KEY: u8 = (1 << 3) | 2;
const FROM_KEY: u8 = (2 << 3) | 2;
const DATA_KEY: u8 = (3 << 3) | 2;

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
    fn field(&mut self, field: u64, bytes: &[u8]) {
        self.varint((field << 3) | 2);
        self.varint(bytes.len() as u64);
        self.put(bytes);
    }

    /// A singular `string` or `bytes` field (left out when empty).
    fn text(&mut self, field: u64, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.field(field, bytes);
        }
    }

    /// A singular `uint64` or `bool` field (left out when 0).
    fn number(&mut self, field: u64, v: u64) {
        if v != 0 {
            self.varint(field << 3);
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
fn encode_frame(field: u64, msg: &impl WriteMsg) -> Bytes {
    let mut len = Count(0);
    msg.write(&mut len);
    let mut head = Count(0);
    head.varint((field << 3) | 2);
    head.varint(len.0 as u64);
    let mut out = Vec::with_capacity(head.0 + len.0);
    out.varint((field << 3) | 2);
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

struct ForwardRef<'a> {
    msg: &'a GroupMsg,
    seen: &'a [String],
    relay: bool,
}

impl WriteMsg for ForwardRef<'_> {
    fn write(&self, out: &mut impl Out) {
        let m = self.msg;
        out.text(1, m.origin.as_bytes());
        out.number(2, m.msg_id);
        for g in &m.groups {
            out.field(3, g.as_bytes());
        }
        out.number(4, m.all.into());
        out.text(5, m.exclude_client.as_bytes());
        out.text(6, m.from.as_bytes());
        out.text(7, &m.data);
        out.number(8, m.origin_incarnation);
        for s in self.seen {
            out.field(9, s.as_bytes());
        }
        out.number(10, self.relay.into());
    }
}

/// An encoded `Deliver` frame.
pub(crate) fn encode_deliver(group: &str, from: &str, data: &[u8]) -> Bytes {
    encode_frame(DELIVER_FIELD, &DeliverRef { group, from, data })
}

/// Where the parts of a `Deliver` frame are in its encoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeliverParts {
    pub(crate) group: Range<usize>,
    pub(crate) from: Range<usize>,
    pub(crate) data: Range<usize>,
}

/// The parts of `body` if it is a `Deliver` frame of the plain shape the
/// clones send (only the fields `group`, `from` and `data`, each at most
/// once, in any order, within bounds), without decoding it; `None` for anything else, which the
/// caller decodes with prost (which also finds what is malformed). The
/// strings are not checked for UTF-8 here.
pub(crate) fn deliver_parts(body: &[u8]) -> Option<DeliverParts> {
    let rest = body.strip_prefix(&DELIVER_KEY[..])?;
    let mut pos = body.len() - rest.len();
    let len = read_varint(body, &mut pos)?;
    if body.len() - pos != len {
        return None;
    }
    let (mut group, mut from, mut data) = (pos..pos, pos..pos, pos..pos);
    // a repeated field (the last one counts) is left to prost, which also
    // refuses the frame if an earlier one is not UTF-8
    let mut seen = 0u8;
    while pos < body.len() {
        let key = body[pos];
        pos += 1;
        let len = read_varint(body, &mut pos)?;
        if len > body.len() - pos {
            return None;
        }
        let r = pos..pos + len;
        pos += len;
        let (slot, bit) = match key {
            GROUP_KEY => (&mut group, 1),
            FROM_KEY => (&mut from, 2),
            DATA_KEY => (&mut data, 4),
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

/// A varint at `*pos` that fits a `usize` (at most 10 bytes); advances `pos`.
fn read_varint(buf: &[u8], pos: &mut usize) -> Option<usize> {
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
            return usize::try_from(v).ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Message;

    fn deliver(group: &str, from: &str, data: &[u8]) -> Frame {
        Frame::new(Body::Deliver(proto::Deliver {
            group: group.into(),
            from: from.into(),
            data: Bytes::copy_from_slice(data),
        }))
    }

    /// What the fast path makes of `body`, as a frame.
    fn fast(body: &[u8]) -> Option<Frame> {
        let p = deliver_parts(body)?;
        let text = |r: Range<usize>| std::str::from_utf8(&body[r]).ok();
        Some(deliver(text(p.group)?, text(p.from)?, &body[p.data]))
    }

    #[test]
    fn varints_that_overflow_64_bits_are_refused_as_prost_does() {
        let mut max = vec![0xffu8; 9];
        max.push(0x01);
        let mut over = vec![0xffu8; 9];
        over.push(0x02);
        let mut pos = 0;
        assert_eq!(read_varint(&max, &mut pos), usize::try_from(u64::MAX).ok());
        assert_eq!(pos, 10);
        assert_eq!(read_varint(&over, &mut 0), None);
        let mut frame = DELIVER_KEY.to_vec();
        frame.extend_from_slice(&over);
        assert!(deliver_parts(&frame).is_none());
        assert!(Frame::decode(&frame[..]).is_err(), "prost refuses it too");
        assert_eq!(read_varint(&[0x80; 11], &mut 0), None);
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
        // fields out of order
        let odd = frame(&[(DATA_KEY, b"d1"), (FROM_KEY, b"f"), (GROUP_KEY, b"g1")]);
        assert_eq!(fast(&odd), Some(deliver("g1", "f", b"d1")));
        assert_eq!(
            Frame::decode(&odd[..]).ok(),
            Some(deliver("g1", "f", b"d1"))
        );
        // a repeated field is left to prost (the last one counts)
        let twice = frame(&[(GROUP_KEY, b"g1"), (DATA_KEY, b"d1"), (GROUP_KEY, b"g2")]);
        assert_eq!(deliver_parts(&twice), None);
        assert_eq!(
            Frame::decode(&twice[..]).ok(),
            Some(deliver("g2", "", b"d1"))
        );
        // another frame kind
        let ping = Frame::ping(3).encode_to_bytes();
        assert_eq!(deliver_parts(&ping), None);
        // random corruptions of real frames: whenever the fast path answers,
        // prost decodes the same frame
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
                    0 => GROUP_KEY,
                    1 => FROM_KEY,
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
    fn varints_round_trip_and_overlong_ones_are_refused() {
        for v in [0usize, 1, 127, 128, 300, 16_383, 16_384, u32::MAX as usize] {
            let mut out = Vec::new();
            out.varint(v as u64);
            let mut n = Count(0);
            n.varint(v as u64);
            assert_eq!(out.len(), n.0);
            let mut pos = 0;
            assert_eq!(read_varint(&out, &mut pos), Some(v));
            assert_eq!(pos, out.len());
        }
        let mut pos = 0;
        assert_eq!(read_varint(&[0xff; 11], &mut pos), None);
        let mut pos = 0;
        assert_eq!(read_varint(&[0x80], &mut pos), None);
    }

    #[test]
    fn forward_frames_are_what_prost_encodes_and_decode_back() {
        let msg =
            |groups: &[&str], all, exclude: &str, from: &str, data: &[u8], id, inc| GroupMsg {
                origin: "clone-1".into(),
                origin_incarnation: inc,
                msg_id: id,
                groups: groups.iter().map(|g| g.to_string()).collect(),
                all,
                exclude_client: exclude.into(),
                from: from.into(),
                data: Bytes::copy_from_slice(data),
            };
        let big = vec![1u8; 1000];
        let msgs = [
            msg(
                &["bench"],
                false,
                "",
                "client-1",
                b"payload",
                1,
                1_700_000_000_000_000,
            ),
            msg(&[], true, "c", "", b"", 0, 0),
            msg(
                &["a", "", "\u{e9}t\u{e9}"],
                false,
                "x",
                "y",
                &big,
                u64::MAX,
                3,
            ),
        ];
        let seens: [Vec<String>; 2] = [Vec::new(), vec!["a".into(), String::new(), "c".into()]];
        for m in msgs {
            for seen in &seens {
                for relay in [false, true] {
                    let f = CloneFrame::Forward {
                        msg: Arc::new(m.clone()),
                        seen: seen.clone(),
                        relay,
                    };
                    let want = Frame::new(Body::Forward(proto::Forward {
                        origin: m.origin.clone(),
                        msg_id: m.msg_id,
                        groups: m.groups.clone(),
                        all: m.all,
                        exclude_client: m.exclude_client.clone(),
                        from: m.from.clone(),
                        data: m.data.clone(),
                        origin_incarnation: m.origin_incarnation,
                        seen: seen.clone(),
                        relay,
                    }));
                    let bytes = encode_clone(&f);
                    assert_eq!(bytes, want.encode_to_bytes(), "{m:?} {seen:?} {relay}");
                    let back = Frame::decode(bytes).unwrap().body.unwrap();
                    assert_eq!(decode_clone(back), Ok(f));
                }
            }
        }
    }
}
