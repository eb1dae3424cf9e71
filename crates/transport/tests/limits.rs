//! Limits a peer cannot get past: the small frame limit before the hello.

use std::time::Duration;

use replimesh_transport::proto::{self, CloseCode, Frame};
use replimesh_transport::{connect, listen, Config, Connection, RecvError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

use common::{close_code, dial, frames_until_eof, raw_peer, T};

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
            close_code(&frames_until_eof(&mut raw).await),
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
            let (mut client, mut server) = dial(&listener, &config).await;
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
    let (mut client, mut server) = dial(&listener, &config).await;
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
    // The far end is a raw socket nobody reads: the writer can hand the
    // kernel a few hundred KiB of the frame and no more, so it is still
    // writing when the second send comes. (A `pair` would not do: its far
    // end reads, so the write may finish before the second send.)
    let (near, _far) = tokio::net::UnixStream::pair().unwrap();
    let a = replimesh_transport::from_unix_stream(near, &config);
    let big = Frame::data(vec![1u8; 1 << 20]);
    a.send(&big).unwrap();
    // Wait until the writer has taken it.
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

async fn raw_tcp(addr: &str) -> tokio::net::TcpStream {
    tokio::time::timeout(T, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap()
}

/// True when the peer closes `raw` (EOF or a reset) within the test's time.
async fn is_closed_by_peer(raw: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(T, raw.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Past `max_connections_per_ip` a listener closes a new connection at
/// once and counts it; a closed connection gives its slot back.
#[tokio::test]
async fn the_per_address_limit_refuses_the_next_connection() {
    let config = Config {
        max_connections_per_ip: 3,
        ..Config::default()
    };
    let listener = listen("tcp://127.0.0.1:0", &config).await.unwrap();
    let addr = listener
        .local_url()
        .trim_start_matches("tcp://")
        .to_string();
    let mut raws = Vec::new();
    let mut accepted = Vec::new();
    for _ in 0..3 {
        raws.push(raw_tcp(&addr).await);
        accepted.push(
            tokio::time::timeout(T, listener.accept())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(listener.open_connections(), 3);
    let mut fourth = raw_tcp(&addr).await;
    assert!(
        is_closed_by_peer(&mut fourth).await,
        "the 4th connection stays open"
    );
    assert_eq!(listener.refused_connections(), 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), listener.accept())
            .await
            .is_err(),
        "the 4th connection was accepted"
    );
    // One goes: room for another.
    let gone = accepted.pop().unwrap();
    gone.sender().abort();
    drop(gone);
    drop(raws.pop());
    tokio::time::timeout(T, async {
        while listener.open_connections() > 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the closed connection's slot never came back");
    let _again = raw_tcp(&addr).await;
    tokio::time::timeout(T, listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(listener.refused_connections(), 1);
}

/// `max_connections` bounds a listener's connections in total (Unix-socket
/// peers, which have no address, included).
#[tokio::test]
async fn the_total_limit_refuses_the_next_connection() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        max_connections: 2,
        ..Config::default()
    };
    let path = dir.path().join("total.sock");
    let listener = listen(&format!("unix://{}", path.display()), &config)
        .await
        .unwrap();
    let mut keep = Vec::new();
    for _ in 0..2 {
        let raw = tokio::net::UnixStream::connect(&path).await.unwrap();
        let conn = tokio::time::timeout(T, listener.accept())
            .await
            .unwrap()
            .unwrap();
        keep.push((raw, conn));
    }
    assert_eq!(listener.open_connections(), 2);
    let mut third = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(T, third.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eq!(listener.refused_connections(), 1);
    assert_eq!(listener.open_connections(), 2);
}

/// A listener that accepts nothing more: its backlog is full, so a new
/// TCP connect gets no answer.
async fn full_backlog() -> (tokio::net::TcpListener, String, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut fill = Vec::new();
    // Fill the accept queue (its length is the backlog + 1 on Linux).
    for _ in 0..4 {
        match tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        {
            Ok(Ok(s)) => fill.push(s),
            _ => break,
        }
    }
    (listener, addr, fill)
}

/// `connect` to peers that accept and say nothing ends within the handshake
/// timeout, with an error naming the step it was in.
#[tokio::test]
async fn connect_to_a_silent_peer_times_out_naming_the_step() {
    let mut config = Config {
        handshake_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    config.tls.client =
        Some(replimesh_transport::TlsConfig::client_from_pem(cert.cert.pem().as_bytes()).unwrap());
    // A TCP listener that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    for (url, want) in [
        (format!("tls://{addr}"), "tls"),
        (format!("ws://{addr}/"), "websocket upgrade"),
        (format!("wss://{addr}/"), "tls"),
    ] {
        let r = tokio::time::timeout(T, connect(&url, &config))
            .await
            .unwrap();
        match r {
            Err(replimesh_transport::Error::HandshakeTimeout { step, .. }) => {
                assert_eq!(step, want, "{url}")
            }
            other => panic!("{url}: expected a timeout, got {other:?}"),
        }
    }
    held.abort();
    // A TCP connect that gets no answer (the peer's backlog is full).
    let (_l, addr, _fill) = full_backlog().await;
    let r = tokio::time::timeout(T, connect(&format!("tcp://{addr}"), &config))
        .await
        .unwrap();
    match r {
        Err(e @ replimesh_transport::Error::HandshakeTimeout { .. }) => {
            assert!(e.to_string().starts_with("connect timed out"), "{e}")
        }
        other => panic!("expected a connect timeout, got {other:?}"),
    }
}

/// The fuzzing entry point splits a stream cut anywhere into the same
/// frames, and refuses an oversized one with its length.
#[test]
fn the_fuzzing_entry_point_splits_streams_cut_anywhere() {
    use replimesh_transport::fuzz::split_stream;
    let frames: Vec<Frame> = (0..20usize)
        .map(|i| Frame::data(vec![i as u8; [3, 100, 20_000, 70_000][i % 4]]))
        .collect();
    let mut wire = Vec::new();
    for f in &frames {
        wire.extend(framed(f));
        wire.extend(framed(&Frame::ping(1)));
    }
    for cut in [1usize, 7, 4096, 100_000, wire.len()] {
        let chunks: Vec<&[u8]> = wire.chunks(cut).collect();
        let (got, end) = split_stream(&chunks, 1 << 20);
        assert!(matches!(end, RecvError::Eof), "cut {cut}: {end:?}");
        let got: Vec<Frame> = got
            .into_iter()
            .map(|b| <Frame as replimesh_transport::proto::Message>::decode(b).unwrap())
            .collect();
        assert!(got == frames, "cut {cut}");
    }
    let (_, end) = split_stream(&[&[0xff, 0xff, 0xff, 0xff]], 1 << 20);
    assert!(
        matches!(
            end,
            RecvError::FrameTooLarge {
                len: 0xffff_ffff,
                ..
            }
        ),
        "{end:?}"
    );
}
