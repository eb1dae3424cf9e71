//! Lone small frames on plain sockets are written from the sending task
//! (direct writes); when the socket takes only part of one, the writer task
//! sends the rest before anything else. Nothing may be lost, reordered or
//! torn, whichever path each frame takes.

use std::time::{Duration, Instant};

use proto::frame::Body;
use proto::Frame;
use replimesh_transport as transport;
use transport::{Config, RecvError};

fn payload(i: u32, len: usize) -> Vec<u8> {
    let mut p = vec![(i % 251) as u8; len];
    p[..4].copy_from_slice(&i.to_be_bytes());
    p
}

/// Spins for `d` (sleeping would take a millisecond at least): the frames
/// are spaced like requests at a few tens of thousands per second, so many
/// take the direct path.
fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

async fn run(url: &str, listener: transport::Listener) {
    let config = Config::default();
    let accept = tokio::spawn(async move { listener.accept().await.unwrap() });
    let client = transport::connect(url, &config).await.unwrap();
    let server = accept.await.unwrap();
    let (tx, _rx) = client.split();
    let (_stx, mut rx) = server.split();
    // 3,000 frames of 1..4 KiB (about 7.5 MB, far more than the socket
    // buffers): while nobody reads, direct writes fill the socket, then
    // some are partial, then frames queue up behind them.
    let n = 3000u32;
    let sender = tokio::task::spawn_blocking(move || {
        for i in 0..n {
            let len = 1024 + (i as usize * 37) % 3000;
            loop {
                match tx.send(&Frame::data(payload(i, len))) {
                    Ok(()) => break,
                    Err(transport::SendError::Full { .. }) => spin(Duration::from_micros(200)),
                    Err(e) => panic!("send {i}: {e}"),
                }
            }
            spin(Duration::from_micros(25));
        }
        tx
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..n {
        let f = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("frame {i} did not arrive"))
            .unwrap();
        let Some(Body::Data(d)) = f.body else {
            panic!("frame {i}: not data")
        };
        let len = 1024 + (i as usize * 37) % 3000;
        assert_eq!(d.payload.len(), len, "frame {i} length");
        assert!(d.payload[..] == payload(i, len)[..], "frame {i} content");
    }
    let tx = sender.await.unwrap();
    tx.close(proto::CloseCode::Normal, "done");
    let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap();
    assert!(matches!(end, Err(RecvError::Closed { .. })), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_direct_writes_keep_every_frame_whole_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/d.sock", dir.path().display());
    let listener = transport::listen(&url, &Config::default()).await.unwrap();
    run(&url, listener).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_direct_writes_keep_every_frame_whole_and_in_order() {
    let listener = transport::listen("tcp://127.0.0.1:0", &Config::default())
        .await
        .unwrap();
    let url = listener.local_url();
    run(&url, listener).await;
}
