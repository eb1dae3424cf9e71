//! Unit tests of the connection internals.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proto::{frame::Body, Frame};

use crate::sock::Sock;
use crate::Config;

use super::direct::DIRECT_QUIET;
use super::queue::MAX_URGENT;
use super::*;

#[tokio::test]
async fn urgent_queue_is_bounded() {
    let (conn, shared, _tx) = new_connection(PeerAddr::Memory, &Config::default(), Limit::Full);
    for i in 0..10_000 {
        shared.enqueue_urgent(Frame::pong(i).encode_to_bytes());
    }
    let q = shared.queue.lock().unwrap();
    assert_eq!(q.urgent.len(), MAX_URGENT);
    drop(q);
    drop(conn);
}

/// The payload of the next frame, `i`th of a test, which must be data.
async fn recv_payload(rx: &mut Receiver, i: u32) -> Bytes {
    let f = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("frame in time")
        .unwrap();
    match f.body {
        Some(Body::Data(d)) => d.payload,
        _ => panic!("frame {i} is not data"),
    }
}

/// Where a direct write stops (in bytes; 0: nowhere), for the test below.
pub(super) static CUT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A connection over a Unix socket pair whose sending side makes direct
/// writes: its sender, the sender's shared state, the other end's
/// receiver, and what must stay alive meanwhile.
fn direct_pair() -> (Sender, Arc<Shared>, Receiver, (Receiver, Sender)) {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let config = Config::default();
    let sock = Sock::new(crate::sock::Stream::Unix(a), None);
    let sender = spawn_sock(sock, PeerAddr::Memory, &config, Limit::Full);
    let shared = sender.sender.shared.clone();
    let (tx, rx_a) = sender.split();
    let (tx_b, rx) = crate::from_unix_stream(b, &config).split();
    (tx, shared, rx, (rx_a, tx_b))
}

/// Direct writes cut short (inside the length prefix, inside the body)
/// are completed by the writer task before anything else, so every frame
/// arrives whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_direct_writes_are_completed_by_the_writer() {
    let (tx, shared, mut rx, _keep) = direct_pair();
    let n = 300u32;
    let body = |i: u32| {
        let mut p = vec![(i % 251) as u8; 100 + (i as usize * 13) % 3900];
        p[..4].copy_from_slice(&i.to_be_bytes());
        p
    };
    let writer = tokio::task::spawn_blocking(move || {
        for i in 0..n {
            // Whole, cut in the prefix, cut in the body.
            CUT.store([0, 2, 50][i as usize % 3], Ordering::Relaxed);
            tx.send(&Frame::data(body(i))).unwrap();
            let t = Instant::now();
            while t.elapsed() < DIRECT_QUIET * 2 {
                std::hint::spin_loop();
            }
        }
        tx
    });
    for i in 0..n {
        let payload = recv_payload(&mut rx, i).await;
        assert!(payload[..] == body(i)[..], "frame {i} torn or out of order");
    }
    let _tx = writer.await.unwrap();
    CUT.store(0, Ordering::Relaxed);
    let (whole, partial) = shared.queue.lock().unwrap().direct_writes;
    assert!(
        whole > 0 && partial > 0,
        "direct writes {whole} whole, {partial} partial"
    );
}

#[tokio::test]
async fn send_all_on_an_idle_connection_is_one_write() {
    let (tx, shared, mut rx, _keep) = direct_pair();
    let frames: Vec<Frame> = (0..3u8).map(|i| Frame::data(vec![i; 100])).collect();
    tokio::time::sleep(DIRECT_QUIET * 2).await;
    tx.send_all(&frames).unwrap();
    for (i, want) in frames.iter().enumerate() {
        assert_eq!(Frame::data(recv_payload(&mut rx, i as u32).await), *want);
    }
    // Another test may cut direct writes short: whole or partial, one write.
    let ((whole, partial), frames) = {
        let q = shared.queue.lock().unwrap();
        (q.direct_writes, q.direct_frames)
    };
    assert_eq!(
        (whole + partial, frames),
        (1, 3),
        "direct writes {whole} whole, {partial} partial, of {frames} frames"
    );
    // Too big together for a direct write: queued, still in order.
    let big: Vec<Frame> = (0..3u8).map(|i| Frame::data(vec![i; 3000])).collect();
    tokio::time::sleep(DIRECT_QUIET * 2).await;
    tx.send_all(&big).unwrap();
    for (i, want) in big.iter().enumerate() {
        assert_eq!(Frame::data(recv_payload(&mut rx, i as u32).await), *want);
    }
}

/// A stream of large frames that the consumer drops as it goes is read
/// into the same few buffers (no fresh memory per frame), and every frame
/// arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_reuse_the_readers_buffers() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let config = Config::default();
    let (tx, _arx) = crate::from_unix_stream(a, &config).split();
    let receiver = crate::from_unix_stream(b, &config);
    let shared = receiver.receiver.shared.clone();
    let (_btx, mut rx) = receiver.split();
    let n = 200u32;
    let body = |i: u32| {
        let mut p = vec![(i % 251) as u8; 64 * 1024];
        p[..4].copy_from_slice(&i.to_be_bytes());
        p
    };
    // One frame in flight at a time: the consumer has dropped the frames
    // before when the reader needs room for the next one.
    for i in 0..n {
        tx.send(&Frame::data(body(i))).unwrap();
        let payload = recv_payload(&mut rx, i).await;
        assert!(payload[..] == body(i)[..], "frame {i} torn");
    }
    let buffers = shared.big_buffers.load(Ordering::Relaxed);
    assert!(
        (1..=3).contains(&buffers),
        "{buffers} buffers for {n} large frames"
    );
}
