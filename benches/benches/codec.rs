//! Scenario `codec`: frames per second through [`FrameCodec`] encode and
//! decode, for `Data` frames of 64 B, 1 KiB and 64 KiB and a `Publish` frame.
//!
//! Run with `cargo xtask bench codec` (which converts criterion's medians to
//! frames/s) or directly with `cargo bench -p replimesh-benches --bench codec`.
//! Bench ids are `codec/<encode|decode>/frame=<kind>,payload=<bytes>`:
//! `cargo xtask bench` turns the part after the second `/` into params.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use proto::{frame, Frame, FrameCodec, Publish};
use tokio_util::codec::{Decoder, Encoder};

fn frames() -> Vec<(String, Frame)> {
    let mut out = Vec::new();
    for size in [64usize, 1024, 64 * 1024] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        out.push((
            format!("frame=data,payload={size}"),
            Frame::data(Bytes::from(payload)),
        ));
    }
    let publish = Frame::new(frame::Body::Publish(Publish {
        groups: vec!["room-1".to_string()],
        all: false,
        not_to_me: true,
        data: Bytes::from(vec![7u8; 64]),
    }));
    out.push(("frame=publish,payload=64".to_string(), publish));
    out
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    let mut codec = FrameCodec::default();
    for (id, frame) in frames() {
        let mut wire = BytesMut::new();
        codec.encode(&frame, &mut wire).expect("encode");
        let wire = wire.freeze();

        group.bench_with_input(BenchmarkId::new("encode", &id), &frame, |b, frame| {
            let mut dst = BytesMut::with_capacity(wire.len());
            b.iter(|| {
                dst.clear();
                codec.encode(frame, &mut dst).expect("encode");
                std::hint::black_box(&dst);
            })
        });
        group.bench_with_input(BenchmarkId::new("decode", &id), &wire, |b, wire| {
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |src| {
                    let frame = codec.decode(src).expect("decode").expect("one frame");
                    std::hint::black_box(frame)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn main() {
    // What `criterion_group!`/`criterion_main!` expand to, with a short
    // measurement so the whole scenario runs in well under a minute.
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    codec(&mut c);
    c.final_summary();
}
