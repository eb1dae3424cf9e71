//! Limits a peer cannot get past: the small frame limit before the hello.

use std::time::Duration;

use replimesh_transport::proto::{self, CloseCode, Frame};
use replimesh_transport::{connect, listen, Config, Connection, RecvError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

/// A raw TCP peer of a connection accepted with `config`.
async fn raw_peer(config: &Config) -> (tokio::net::TcpStream, Connection) {
    let listener = listen("tcp://127.0.0.1:0", config).await.unwrap();
    let addr = listener
        .local_url()
        .trim_start_matches("tcp://")
        .to_string();
    let raw = tokio::time::timeout(T, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let server = tokio::time::timeout(T, listener.accept())
        .await
        .unwrap()
        .unwrap();
    (raw, server)
}

/// The close code in what a raw peer reads until EOF.
async fn close_code(raw: &mut tokio::net::TcpStream) -> Option<u32> {
    let mut got = Vec::new();
    tokio::time::timeout(T, raw.read_to_end(&mut got))
        .await
        .unwrap()
        .ok()?;
    let mut buf = bytes::BytesMut::from(&got[..]);
    let mut codec = proto::FrameCodec::default();
    while let Ok(Some(f)) = tokio_util::codec::Decoder::decode(&mut codec, &mut buf) {
        if let Some(proto::frame::Body::Close(c)) = f.body {
            return Some(c.code);
        }
    }
    None
}

fn framed(frame: &Frame) -> Vec<u8> {
    let mut wire = bytes::BytesMut::new();
    let mut codec = proto::FrameCodec::default();
    tokio_util::codec::Encoder::encode(&mut codec, frame, &mut wire).unwrap();
    wire.to_vec()
}

/// Before the hello an accepted connection takes frames of at most
/// `max_frame_before_hello`: a 1 MiB frame (announced only: nothing of its
/// size is sent or allocated) is refused with a clear error and a Close.
#[tokio::test]
async fn a_large_frame_before_the_raise_is_refused() {
    for inline_reads in [true, false] {
        let config = Config {
            inline_reads,
            ..Config::default()
        };
        assert_eq!(config.max_frame_before_hello, 64 * 1024);
        let (mut raw, mut server) = raw_peer(&config).await;
        assert_eq!(server.receiver().max_frame(), 64 * 1024);
        let mut wire = framed(&Frame::data(&b"hello"[..]));
        wire.extend_from_slice(&(1u32 << 20).to_be_bytes());
        raw.write_all(&wire).await.unwrap();
        let first = tokio::time::timeout(T, server.recv()).await.unwrap();
        assert_eq!(first.unwrap(), Frame::data(&b"hello"[..]));
        match tokio::time::timeout(T, server.recv()).await.unwrap() {
            Err(RecvError::FrameTooLarge { len, max }) => {
                assert_eq!((len, max), (1 << 20, 64 * 1024), "inline {inline_reads}")
            }
            other => panic!("inline {inline_reads}: expected FrameTooLarge, got {other:?}"),
        }
        assert_eq!(
            close_code(&mut raw).await,
            Some(CloseCode::FrameTooLarge as u32)
        );
    }
}

/// Once the consumer raised the limit (after the hello), frames up to
/// `max_frame` pass; the dialing side takes `max_frame` from the start.
#[tokio::test]
async fn after_the_raise_large_frames_pass_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    for inline_reads in [true, false] {
        for url in [
            "tcp://127.0.0.1:0".to_string(),
            format!("unix://{}", dir.path().join("r.sock").display()),
            "ws://127.0.0.1:0".to_string(),
        ] {
            let config = Config {
                inline_reads,
                ..Config::default()
            };
            let listener = listen(&url, &config).await.unwrap();
            let local = listener.local_url();
            let (client, server) = tokio::time::timeout(T, async {
                tokio::join!(connect(&local, &config), listener.accept())
            })
            .await
            .unwrap();
            let (mut client, mut server) = (client.unwrap(), server.unwrap());
            assert_eq!(client.receiver().max_frame(), config.max_frame);
            client.send(&Frame::data(&b"hello"[..])).unwrap();
            let hello = tokio::time::timeout(T, server.recv()).await.unwrap();
            assert_eq!(hello.unwrap(), Frame::data(&b"hello"[..]));
            server.raise_max_frame();
            assert_eq!(server.receiver().max_frame(), config.max_frame);
            server.send(&Frame::data(&b"welcome"[..])).unwrap();
            let welcome = tokio::time::timeout(T, client.recv()).await.unwrap();
            assert_eq!(welcome.unwrap(), Frame::data(&b"welcome"[..]));
            let big = Frame::data(vec![7u8; 1 << 20]);
            client.send(&big).unwrap();
            let got = tokio::time::timeout(T, server.recv()).await.unwrap();
            assert!(got.unwrap() == big, "{url} inline {inline_reads}");
            server.send(&big).unwrap();
            let got = tokio::time::timeout(T, client.recv()).await.unwrap();
            assert!(got.unwrap() == big, "{url} inline {inline_reads}");
        }
    }
}

/// A WebSocket message larger than the limit before the hello is refused
/// while it arrives (tungstenite's own limit is `max_frame`).
#[tokio::test]
async fn a_large_websocket_message_before_the_raise_is_refused() {
    let config = Config::default();
    let listener = listen("ws://127.0.0.1:0", &config).await.unwrap();
    let local = listener.local_url();
    let (client, server) = tokio::time::timeout(T, async {
        tokio::join!(connect(&local, &config), listener.accept())
    })
    .await
    .unwrap();
    let (mut client, mut server) = (client.unwrap(), server.unwrap());
    let big = Frame::data(vec![7u8; 1 << 20]);
    client.send(&big).unwrap();
    match tokio::time::timeout(T, server.recv()).await.unwrap() {
        Err(RecvError::FrameTooLarge { len, max }) => {
            assert_eq!(max, 64 * 1024);
            assert!(len > max && len < 1 << 20, "{len}");
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    match tokio::time::timeout(T, client.recv()).await.unwrap() {
        Err(RecvError::Closed { code, .. }) => assert_eq!(code, CloseCode::FrameTooLarge as u32),
        other => panic!("expected a close, got {other:?}"),
    }
}

/// Sends 1-byte data frames to a peer that never reads (an in-memory pipe of
/// 1 KiB, the peer reading inline, so only when asked to) until the connection is cut as a slow consumer; returns how many
/// were accepted (`None`: no cut within `max`) and the receiver's end.
async fn tiny_frames_until_cut(config: &Config, max: usize) -> (Option<usize>, Connection) {
    let config = Config {
        inline_reads: true,
        ..config.clone()
    };
    let (a, b) = replimesh_transport::pair(&config, 1024);
    let body = Frame::data(vec![1u8]).encode_to_bytes();
    for i in 0..max {
        match a.sender().send_encoded(body.clone()) {
            Ok(()) => {}
            Err(replimesh_transport::SendError::SlowConsumer) => return (Some(i), a),
            Err(e) => panic!("unexpected {e}"),
        }
        if i % 4096 == 0 {
            // Let the writer run (it cannot write much: nobody reads).
            tokio::task::yield_now().await;
        }
    }
    drop(b);
    (None, a)
}

/// A queue of tiny frames is bounded in frames (default 65,536), whatever
/// their bytes: the cut comes after about that many, not after 64 MiB of
/// 6-byte frames (11 million queue entries, over 600 MiB of memory).
#[tokio::test]
async fn a_queue_of_tiny_frames_hits_the_frame_bound() {
    let config = Config::default();
    assert_eq!(config.max_queue_frames, 65_536);
    let (cut, mut conn) = tiny_frames_until_cut(&config, 400_000).await;
    let cut = cut.expect("no slow-consumer cut after 400,000 tiny frames");
    // What the 1 KiB pipe took is not in the queue.
    assert!(
        (65_536..65_536 + 300).contains(&cut),
        "cut after {cut} frames"
    );
    match tokio::time::timeout(T, conn.recv()).await.unwrap() {
        Err(RecvError::Local(replimesh_transport::CloseReason::SlowConsumer {
            frames,
            frame_limit,
            ..
        })) => assert_eq!((frames, frame_limit), (65_537, 65_536)),
        other => panic!("expected a slow-consumer end, got {other:?}"),
    }
}

/// The byte bound counts each frame's memory: its length plus
/// `QUEUE_FRAME_OVERHEAD`, so 1 MiB holds about 10,000 6-byte frames, not
/// 174,000.
#[tokio::test]
async fn the_byte_bound_counts_each_frames_overhead() {
    let config = Config {
        max_queue_bytes: 1 << 20,
        max_queue_frames: 1 << 30,
        ..Config::default()
    };
    let per_frame = 6 + replimesh_transport::QUEUE_FRAME_OVERHEAD;
    let (cut, _conn) = tiny_frames_until_cut(&config, 400_000).await;
    let cut = cut.expect("no slow-consumer cut after 400,000 tiny frames");
    let want = (1 << 20) / per_frame;
    assert!(
        (want..want + 300).contains(&cut),
        "cut after {cut} frames, want about {want}"
    );
}

/// Frames the writer task has taken and not written yet still count: a
/// second 1 MiB frame does not fit beside one being written under a
/// 1.5 MiB bound.
#[tokio::test]
async fn frames_being_written_still_count() {
    let config = Config {
        max_queue_bytes: 3 << 19,
        slow_consumer: replimesh_transport::SlowConsumerPolicy::Reject,
        ..Config::default()
    };
    let (a, _b) = replimesh_transport::pair(&config, 1024);
    let big = Frame::data(vec![1u8; 1 << 20]);
    a.send(&big).unwrap();
    // Wait until the writer has taken it (the pipe holds 1 KiB of it).
    tokio::time::timeout(T, async {
        while a.sender().queued_bytes() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    match a.send(&big) {
        Err(replimesh_transport::SendError::Full { queued, frames, .. }) => {
            assert!(queued > 1 << 20, "{queued}");
            assert_eq!(frames, 1);
        }
        other => panic!("expected Full, got {other:?}"),
    }
}
