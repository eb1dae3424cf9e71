//! Fuzz target for `proto::wire`, the readers of encoded frames that skip
//! prost on fast paths (the node's front peeks at a frame's kind with
//! `frame_field`; mesh clients read `Deliver` frames with `deliver_parts`).
//! On arbitrary bytes neither may panic; where prost decodes the same bytes
//! as a `Deliver`, the parts must be exactly prost's fields; and for every
//! frame prost decodes, re-encoding it gives a body whose `frame_field` is
//! the variant prost found.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::wire::{deliver_parts, frame_field, read_varint};
use proto::{frame::Body, Frame, Message};

fuzz_target!(|data: &[u8]| {
    let field = frame_field(data);
    let mut pos = 0;
    let _ = read_varint(data, &mut pos);
    assert!(pos <= data.len());
    let parts = deliver_parts(data);
    if let Some(p) = &parts {
        for r in [&p.group, &p.from, &p.data] {
            assert!(r.start <= r.end && r.end <= data.len());
        }
        assert_eq!(field, proto::wire::field::DELIVER);
    }
    if let Ok(frame) = Frame::decode(data) {
        if let (Some(p), Some(Body::Deliver(d))) = (&parts, &frame.body) {
            assert_eq!(&data[p.group.clone()], d.group.as_bytes());
            assert_eq!(&data[p.from.clone()], d.from.as_bytes());
            assert_eq!(&data[p.data.clone()], &d.data[..]);
        }
        if let Some(body) = &frame.body {
            let again = frame.encode_to_vec();
            let mut key = Vec::new();
            body.encode(&mut key);
            let mut kp = 0;
            let expected = (read_varint(&key, &mut kp).unwrap_or(0) >> 3) as u32;
            assert_eq!(frame_field(&again), expected);
        }
    }
});
