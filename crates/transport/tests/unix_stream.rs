//! `from_unix_stream`: connections over an already-connected Unix socket pair.

use std::time::Duration;

use replimesh_transport::proto::{CloseCode, Frame};
use replimesh_transport::{from_std_unix_stream, from_unix_stream, Config, RecvError};

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn socket_pair_frames_both_ways_and_close() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let config = Config::default();
    let mut a = from_std_unix_stream(a, &config).unwrap();
    let mut b = from_std_unix_stream(b, &config).unwrap();
    for i in 0..100u32 {
        a.send(&Frame::data(i.to_le_bytes().to_vec())).unwrap();
    }
    for i in 0..100u32 {
        let f = tokio::time::timeout(T, b.recv()).await.unwrap().unwrap();
        assert_eq!(f, Frame::data(i.to_le_bytes().to_vec()));
    }
    b.send(&Frame::data(&b"back"[..])).unwrap();
    let f = tokio::time::timeout(T, a.recv()).await.unwrap().unwrap();
    assert_eq!(f, Frame::data(&b"back"[..]));
    a.sender().close(CloseCode::Normal, "bye");
    match tokio::time::timeout(T, b.recv()).await.unwrap() {
        Err(RecvError::Closed { reason, .. }) => assert_eq!(reason, "bye"),
        other => panic!("expected a close, got {other:?}"),
    }
}

#[tokio::test]
async fn peer_gone_and_oversized_frames_end_the_connection() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let mut a = from_unix_stream(a, &Config::default());
    drop(b);
    assert!(tokio::time::timeout(T, a.recv()).await.unwrap().is_err());

    // A peer announcing a frame above `max_frame` is refused.
    let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
    let config = Config {
        max_frame: 1024,
        ..Config::default()
    };
    let mut a = from_unix_stream(a, &config);
    use tokio::io::AsyncWriteExt;
    b.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    assert!(tokio::time::timeout(T, a.recv()).await.unwrap().is_err());
}

#[tokio::test]
async fn keep_alive_detects_a_silent_peer() {
    let (a, _b) = tokio::net::UnixStream::pair().unwrap();
    let config = Config {
        ping_interval: None,
        idle_timeout: Some(Duration::from_millis(100)),
        ..Config::default()
    };
    let mut a = from_unix_stream(a, &config);
    match tokio::time::timeout(T, a.recv()).await.unwrap() {
        Err(RecvError::TimedOut) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
}

/// Large frames of many sizes, between small ones, that the consumer keeps
/// until the end: the reader reuses its buffers only for frames that are
/// gone, and writes that the socket takes in part (several large frames per
/// vectored write) leave every frame whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_kept_by_the_consumer_stay_intact() {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let config = Config::default();
    let a = from_unix_stream(a, &config);
    let mut b = from_unix_stream(b, &config);
    // Mostly 64 KiB (give or take a byte), some small, some up to 616 KiB.
    let sizes: Vec<usize> = (0..300u64)
        .map(|i| {
            let h = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 24) as usize;
            match h % 8 {
                0 => h % 2000,
                1 => 16 * 1024 + h % (600 * 1024),
                _ => 64 * 1024 + h % 3,
            }
        })
        .collect();
    let frame =
        |i: usize, n: usize| Frame::data((0..n).map(|j| (i * 7 + j) as u8).collect::<Vec<u8>>());
    let sent = sizes.clone();
    let sender = tokio::spawn(async move {
        for (i, &n) in sent.iter().enumerate() {
            a.sender().send_wait(&frame(i, n)).await.unwrap();
        }
        a
    });
    let mut kept = Vec::new();
    for _ in 0..sizes.len() {
        kept.push(tokio::time::timeout(T, b.recv()).await.unwrap().unwrap());
    }
    for (i, (f, &n)) in kept.iter().zip(&sizes).enumerate() {
        assert!(*f == frame(i, n), "frame {i} ({n} bytes) changed");
    }
    drop(sender.await.unwrap());
}
