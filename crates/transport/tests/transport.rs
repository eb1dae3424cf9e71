//! Transport tests over real sockets (127.0.0.1 and Unix sockets in temp dirs).

use std::time::Duration;

use bytes::Bytes;
use replimesh_transport::proto::{self, CloseCode, Frame};
use replimesh_transport::{
    connect, listen, CloseReason, Config, Connection, Listener, RecvError, SendError, TlsConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;

use common::{close_code, dial, frames_until_eof, raw_peer, T};

fn tls_config() -> Config {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert_pem = cert.cert.pem();
    let key_pem = cert.signing_key.serialize_pem();
    let mut config = Config::default();
    config.tls = TlsConfig {
        server: Some(TlsConfig::server_from_pem(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap()),
        client: Some(TlsConfig::client_from_pem(cert_pem.as_bytes()).unwrap()),
    };
    config
}

async fn pair(url: &str, config: &Config) -> (Listener, Connection, Connection) {
    let listener = listen(url, config).await.unwrap();
    let (client, server) = dial(&listener, config).await;
    // As a server does once it accepted the peer's hello.
    server.raise_max_frame();
    (listener, client, server)
}

async fn recv(conn: &mut Connection) -> Frame {
    tokio::time::timeout(T, conn.recv())
        .await
        .expect("recv timed out")
        .expect("recv failed")
}

async fn round_trip(url: &str, config: &Config) {
    let (_l, mut client, mut server) = pair(url, config).await;
    for i in 0..100u32 {
        client.send(&Frame::data(i.to_be_bytes().to_vec())).unwrap();
    }
    for i in 0..100u32 {
        assert_eq!(
            recv(&mut server).await,
            Frame::data(i.to_be_bytes().to_vec())
        );
    }
    // Server to client, 1 MiB frames.
    let big = Frame::data(vec![0xabu8; 1 << 20]);
    for _ in 0..3 {
        server.send(&big).unwrap();
    }
    for _ in 0..3 {
        assert_eq!(recv(&mut client).await, big);
    }
    // Clean close with a reason code.
    client.sender().close(CloseCode::GoingAway, "bye");
    match tokio::time::timeout(T, server.recv()).await.unwrap() {
        Err(RecvError::Closed { code, reason }) => {
            assert_eq!(code, CloseCode::GoingAway as u32);
            assert_eq!(reason, "bye");
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    // Both halves learn the close is done (an inline connection learns it by
    // reading the peer's answer, so the receiver waits in `recv` meanwhile).
    let (tx, mut rx) = client.split();
    let (closed, received) =
        tokio::time::timeout(T, async { tokio::join!(tx.closed(), rx.recv()) })
            .await
            .unwrap();
    for end in [closed, received.unwrap_err()] {
        match end {
            RecvError::Local(CloseReason::Requested { code, .. }) => {
                assert_eq!(code, CloseCode::GoingAway as u32)
            }
            other => panic!("expected a local close, got {other:?}"),
        }
    }
    assert!(matches!(tx.send(&Frame::ping(1)), Err(SendError::Closed)));
}

#[tokio::test]
async fn tcp_round_trip() {
    round_trip("tcp://127.0.0.1:0", &Config::default()).await;
}

#[tokio::test]
async fn unix_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}", dir.path().join("t.sock").display());
    round_trip(&url, &Config::default()).await;
}

fn inline() -> Config {
    Config {
        inline_reads: true,
        ..Config::default()
    }
}

#[tokio::test]
async fn tcp_round_trip_inline() {
    round_trip("tcp://127.0.0.1:0", &inline()).await;
}

#[tokio::test]
async fn unix_round_trip_inline() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}", dir.path().join("t.sock").display());
    round_trip(&url, &inline()).await;
}

#[tokio::test]
async fn tls_round_trip_inline() {
    let config = Config {
        inline_reads: true,
        ..tls_config()
    };
    round_trip("tls://127.0.0.1:0", &config).await;
}

#[tokio::test]
async fn ws_round_trip() {
    round_trip("ws://127.0.0.1:0/mesh", &Config::default()).await;
}

#[tokio::test]
async fn tls_round_trip() {
    round_trip("tls://127.0.0.1:0", &tls_config()).await;
}

#[tokio::test]
async fn wss_round_trip() {
    round_trip("wss://127.0.0.1:0/mesh", &tls_config()).await;
}

#[tokio::test]
async fn tls_client_without_trusted_root_fails() {
    let server_cfg = tls_config();
    let listener = listen("tls://127.0.0.1:0", &server_cfg).await.unwrap();
    let other = tls_config(); // a different self-signed certificate
    let mut client_cfg = Config::default();
    client_cfg.tls.client = other.tls.client;
    let err = connect(&listener.local_url(), &client_cfg)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tls"), "{err}");
    // And without any client TLS config, a clear error.
    let err = connect(&listener.local_url(), &Config::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Config::tls.client"), "{err}");
}

#[tokio::test]
async fn frames_at_exactly_the_maximum_pass_on_every_stream_scheme() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.max_frame = 256 * 1024;
    for url in [
        "tcp://127.0.0.1:0".to_string(),
        format!("unix://{}", dir.path().join("m.sock").display()),
        "ws://127.0.0.1:0".to_string(),
    ] {
        let (_l, client, mut server) = pair(&url, &config).await;
        let mut n = config.max_frame - 8;
        let frame = loop {
            let f = Frame::data(vec![1u8; n]);
            let len = f.encode_to_bytes().len();
            if len == config.max_frame {
                break f;
            }
            n = n + config.max_frame - len;
        };
        client.send(&frame).unwrap();
        assert_eq!(recv(&mut server).await, frame, "{url}");
        let too_big = Frame::data(vec![1u8; config.max_frame]);
        assert!(
            matches!(client.send(&too_big), Err(SendError::TooLarge { .. })),
            "{url}"
        );
    }
}

#[tokio::test]
async fn oversized_length_closes_with_clear_error() {
    let mut config = Config::default();
    config.max_frame = 1024;
    let (mut raw, mut server) = raw_peer(&config).await;
    // Claim a 4 GiB frame.
    raw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    match tokio::time::timeout(T, server.recv()).await.unwrap() {
        Err(RecvError::FrameTooLarge { len, max }) => {
            assert_eq!(len, u32::MAX as usize);
            assert_eq!(max, 1024);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    // The raw peer receives a Close frame with the matching code, then EOF.
    let frames = frames_until_eof(&mut raw).await;
    match frames.first().and_then(|f| f.body.as_ref()) {
        Some(proto::frame::Body::Close(c)) => {
            assert_eq!(c.code(), CloseCode::FrameTooLarge);
            assert!(c.reason.contains("exceeds"), "{}", c.reason);
        }
        other => panic!("expected a Close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_frame_closes_connection_and_listener_keeps_serving() {
    let config = Config::default();
    let listener = listen("tcp://127.0.0.1:0", &config).await.unwrap();
    let url = listener.local_url();
    let addr = url.trim_start_matches("tcp://").to_string();
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut bad = listener.accept().await.unwrap();
    raw.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert!(matches!(
        tokio::time::timeout(T, bad.recv()).await.unwrap(),
        Err(RecvError::Malformed(_))
    ));
    // Another client is served as usual.
    let (good, mut server) = dial(&listener, &config).await;
    good.send(&Frame::ping(9)).ok();
    good.send(&Frame::data(&b"ok"[..])).unwrap();
    assert_eq!(recv(&mut server).await, Frame::data(&b"ok"[..]));
}

#[tokio::test]
async fn abrupt_close_is_noticed() {
    let (raw, mut server) = raw_peer(&Config::default()).await;
    drop(raw);
    assert!(matches!(
        tokio::time::timeout(T, server.recv()).await.unwrap(),
        Err(RecvError::Eof)
    ));
}

#[tokio::test]
async fn half_open_peer_that_stops_answering_pings_times_out() {
    // With a reader task, and inline while waiting in `recv`.
    for inline_reads in [false, true] {
        let config = Config {
            ping_interval: Some(Duration::from_millis(50)),
            idle_timeout: Some(Duration::from_millis(300)),
            inline_reads,
            ..Config::default()
        };
        // The raw peer keeps its socket open but never sends anything (like a host that vanished).
        let (_raw, mut server) = raw_peer(&config).await;
        assert!(matches!(
            tokio::time::timeout(T, server.recv()).await.unwrap(),
            Err(RecvError::TimedOut)
        ));
    }
}

#[tokio::test]
async fn live_peers_keep_each_other_alive_with_pings() {
    let mut config = Config::default();
    config.ping_interval = Some(Duration::from_millis(30));
    config.idle_timeout = Some(Duration::from_millis(200));
    let (_l, client, mut server) = pair("tcp://127.0.0.1:0", &config).await;
    // Idle for several timeouts: pings keep both sides up.
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.send(&Frame::data(&b"still here"[..])).unwrap();
    assert_eq!(recv(&mut server).await, Frame::data(&b"still here"[..]));
}

#[tokio::test]
async fn slow_consumer_is_cut_while_fast_one_gets_everything() {
    let mut config = Config::default();
    config.max_queue_bytes = 256 * 1024;
    let listener = listen("tcp://127.0.0.1:0", &config).await.unwrap();
    let url = listener.local_url();
    let mut fast = connect(&url, &config).await.unwrap();
    let fast_srv = listener.accept().await.unwrap();
    let slow = connect(&url, &config).await.unwrap(); // never reads
    let slow_srv = listener.accept().await.unwrap();

    let payload = Bytes::from(vec![5u8; 16 * 1024]);
    let total = 2000usize; // 32 MB: far beyond what socket buffers hold
    let reader = tokio::spawn(async move {
        let mut n = 0usize;
        while n < total {
            let f = tokio::time::timeout(T, fast.recv())
                .await
                .expect("fast reader stalled")
                .unwrap();
            assert_eq!(f, Frame::data(vec![5u8; 16 * 1024]));
            n += 1;
        }
        n
    });
    let mut slow_cut = false;
    for _ in 0..total {
        let body = Frame::data(payload.clone()).encode_to_bytes(); // one encoding, two connections
        fast_srv
            .sender()
            .send_encoded_wait(body.clone())
            .await
            .unwrap();
        match slow_srv.sender().send_encoded(body) {
            Ok(()) => {}
            Err(SendError::SlowConsumer) => slow_cut = true,
            Err(SendError::Closed) => assert!(slow_cut),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(slow_cut, "the slow consumer was never cut");
    assert_eq!(reader.await.unwrap(), total);
    match slow_srv.sender().closed().await {
        RecvError::Local(CloseReason::SlowConsumer { limit, .. }) => assert_eq!(limit, 256 * 1024),
        other => panic!("expected SlowConsumer, got {other:?}"),
    }
    drop(slow);
}

#[tokio::test]
async fn reject_policy_keeps_the_connection() {
    let mut config = Config::default();
    config.max_queue_bytes = 64 * 1024;
    config.slow_consumer = replimesh_transport::SlowConsumerPolicy::Reject;
    let (_l, _client, server) = pair("tcp://127.0.0.1:0", &config).await;
    let body = Frame::data(vec![1u8; 32 * 1024]).encode_to_bytes();
    let mut full = false;
    for _ in 0..10_000 {
        match server.sender().send_encoded(body.clone()) {
            Ok(()) => {}
            Err(SendError::Full { limit, .. }) => {
                assert_eq!(limit, 64 * 1024);
                full = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(full);
    assert!(!server.sender().is_closed());
}

#[tokio::test]
async fn peer_address_is_known() {
    let (_l, client, server) = pair("tcp://127.0.0.1:0", &Config::default()).await;
    assert_eq!(server.peer_addr().ip(), Some("127.0.0.1".parse().unwrap()));
    assert!(client.peer_addr().ip().is_some());
    assert_ne!(client.sender().id(), server.sender().id());
}

#[tokio::test]
async fn ws_rejects_wrong_path_and_unknown_subprotocol() {
    let listener = listen("ws://127.0.0.1:0/mesh", &Config::default())
        .await
        .unwrap();
    let url = listener.local_url();
    let wrong = url.replace("/mesh", "/other");
    assert!(connect(&wrong, &Config::default()).await.is_err());
    // A client that offers only an unknown subprotocol is refused.
    let port = url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/mesh")
        .to_string();
    let mut raw = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    raw.write_all(
        b"GET /mesh HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n\r\n",
    )
    .await
    .unwrap();
    let mut resp = vec![0u8; 512];
    let n = tokio::time::timeout(T, raw.read(&mut resp))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&resp[..n]);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
}

#[tokio::test]
async fn handshake_timeout_drops_silent_tls_peers() {
    let mut config = tls_config();
    config.handshake_timeout = Duration::from_millis(200);
    let listener = listen("tls://127.0.0.1:0", &config).await.unwrap();
    let addr = listener
        .local_url()
        .trim_start_matches("tls://")
        .to_string();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server gives up on the silent peer: its socket is closed.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, silent.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    // And the listener still accepts real clients.
    let url = listener.local_url();
    let (c, s) = tokio::join!(connect(&url, &config), listener.accept());
    assert!(c.is_ok() && s.is_ok());
}

#[tokio::test]
async fn dropping_every_handle_closes_politely() {
    let (_l, client, mut server) = pair("tcp://127.0.0.1:0", &Config::default()).await;
    client.send(&Frame::data(&b"last"[..])).unwrap();
    drop(client);
    assert_eq!(recv(&mut server).await, Frame::data(&b"last"[..]));
    assert!(matches!(
        tokio::time::timeout(T, server.recv()).await.unwrap(),
        Err(RecvError::Closed { .. })
    ));
}

#[tokio::test]
async fn bad_urls_are_clear_errors() {
    let err = connect("http://127.0.0.1:1", &Config::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown scheme"), "{err}");
    let err = listen("tls://127.0.0.1:0", &Config::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Config::tls.server"), "{err}");
}

#[tokio::test]
async fn ws_json_subprotocol_round_trip() {
    let server_cfg = Config::default();
    let listener = listen("ws://127.0.0.1:0/", &server_cfg).await.unwrap();
    let mut client_cfg = Config::default();
    client_cfg.ws_json = true;
    let (mut client, mut server) = dial(&listener, &client_cfg).await;
    let frame = Frame::new(proto::frame::Body::Publish(proto::Publish {
        groups: vec!["g".into()],
        all: false,
        not_to_me: true,
        data: Bytes::from_static(b"\x00\x01json"),
    }));
    client.send(&frame).unwrap();
    assert_eq!(recv(&mut server).await, frame);
    // Pre-encoded protobuf bodies are transcoded for JSON peers.
    server
        .sender()
        .send_encoded(frame.encode_to_bytes())
        .unwrap();
    assert_eq!(recv(&mut client).await, frame);
}

#[tokio::test]
async fn ws_json_peer_sending_garbage_is_closed() {
    let listener = listen("ws://127.0.0.1:0/", &Config::default())
        .await
        .unwrap();
    let url = listener.local_url();
    let port = url
        .trim_start_matches("ws://127.0.0.1:")
        .trim_end_matches('/')
        .to_string();
    let mut raw = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    raw.write_all(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: replimesh.v1.json\r\n\r\n",
    )
    .await
    .unwrap();
    let mut server = listener.accept().await.unwrap();
    let mut resp = vec![0u8; 512];
    let n = raw.read(&mut resp).await.unwrap();
    assert!(String::from_utf8_lossy(&resp[..n]).contains("replimesh.v1.json"));
    // A masked text frame "{bad" (client frames must be masked).
    let payload = b"{bad";
    let mask = [1u8, 2, 3, 4];
    let mut msg = vec![0x81, 0x80 | payload.len() as u8];
    msg.extend_from_slice(&mask);
    msg.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    raw.write_all(&msg).await.unwrap();
    match tokio::time::timeout(T, server.recv()).await.unwrap() {
        Err(RecvError::Malformed(m)) => assert!(m.contains("JSON"), "{m}"),
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[tokio::test]
async fn in_memory_pair_round_trip() {
    let (mut a, mut b) = replimesh_transport::pair(&Config::default(), 64 * 1024);
    for i in 0..1000u32 {
        a.send(&Frame::data(i.to_le_bytes().to_vec())).unwrap();
    }
    for i in 0..1000u32 {
        assert_eq!(recv(&mut b).await, Frame::data(i.to_le_bytes().to_vec()));
    }
    b.send(&Frame::data(vec![3u8; 300_000])).unwrap();
    assert_eq!(recv(&mut a).await, Frame::data(vec![3u8; 300_000]));
    assert_eq!(a.peer_addr().to_string(), "memory");
}

#[tokio::test]
async fn ping_flood_from_a_peer_that_never_reads_stays_bounded() {
    let (mut raw, server) = raw_peer(&Config::default()).await;
    // 200,000 pings, never reading a pong.
    let mut wire = bytes::BytesMut::new();
    let mut codec = proto::FrameCodec::default();
    for i in 0..200_000u64 {
        tokio_util::codec::Encoder::encode(&mut codec, &Frame::ping(i), &mut wire).unwrap();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.write_all(&wire)).await;
    // The server stays healthy (the pong backlog is bounded: see the unit test in conn/tests.rs).
    server.send(&Frame::data(&b"x"[..])).unwrap();
    assert!(!server.sender().is_closed());
}

#[tokio::test]
async fn mixed_small_and_large_frames_arrive_intact_in_order() {
    for config in [Config::default(), inline()] {
        mixed_frames(&config).await;
    }
}

async fn mixed_frames(config: &Config) {
    // Exercises the reader's switch between batched reads and reading large
    // frames straight into their own buffers, over a small in-memory pipe that
    // splits frames at arbitrary points.
    let (a, mut b) = replimesh_transport::pair(config, 7 * 1024);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut sizes = Vec::new();
    for _ in 0..400 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let size = match seed % 4 {
            0 => (seed >> 8) as usize % 64,
            1 => (seed >> 8) as usize % 4096,
            2 => 16 * 1024 + (seed >> 8) as usize % (100 * 1024),
            _ => 65536,
        };
        sizes.push(size);
    }
    let expected: Vec<Frame> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| Frame::data((0..n).map(|j| (i + j) as u8).collect::<Vec<u8>>()))
        .collect();
    let to_send = expected.clone();
    let sender = tokio::spawn(async move {
        for f in &to_send {
            a.sender().send_wait(f).await.unwrap();
        }
        a
    });
    for f in &expected {
        assert_eq!(&recv(&mut b).await, f);
    }
    drop(sender.await.unwrap());
}

// ---- both modes and inline reads (`Config::inline_reads`) ----

/// A raw TCP peer of a server connection.
#[tokio::test]
async fn pings_are_answered_and_bad_input_is_refused_with_a_close_frame() {
    // Inline, and with a reader task (the frames before the oversized one
    // were once dropped there).
    for inline_reads in [true, false] {
        let config = Config {
            max_frame: 1024,
            inline_reads,
            ..Config::default()
        };
        refuse_bad_input(&config).await;
    }
}

async fn refuse_bad_input(config: &Config) {
    // A ping between two data frames: the data arrives, the pong goes back.
    let (mut raw, mut server) = raw_peer(config).await;
    let mut wire = bytes::BytesMut::new();
    let mut codec = proto::FrameCodec::default();
    for f in [
        Frame::data(&b"a"[..]),
        Frame::ping(77),
        Frame::data(&b"b"[..]),
    ] {
        tokio_util::codec::Encoder::encode(&mut codec, &f, &mut wire).unwrap();
    }
    // Then a frame over the limit.
    wire.extend_from_slice(&4096u32.to_be_bytes());
    raw.write_all(&wire).await.unwrap();
    assert_eq!(recv(&mut server).await, Frame::data(&b"a"[..]));
    assert_eq!(recv(&mut server).await, Frame::data(&b"b"[..]));
    match tokio::time::timeout(T, server.recv()).await.unwrap() {
        Err(RecvError::FrameTooLarge { len, max }) => assert_eq!((len, max), (4096, 1024)),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    let frames = frames_until_eof(&mut raw).await;
    assert!(frames.contains(&Frame::pong(77)), "no pong in {frames:?}");
    assert_eq!(close_code(&frames), Some(CloseCode::FrameTooLarge as u32));
    // The end stays the connection's answer.
    assert!(matches!(
        server.recv().await,
        Err(RecvError::FrameTooLarge { .. })
    ));

    // A frame that is not protobuf.
    let (mut raw, mut server) = raw_peer(config).await;
    raw.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    assert!(matches!(
        tokio::time::timeout(T, server.recv()).await.unwrap(),
        Err(RecvError::Malformed(_))
    ));
    let frames = frames_until_eof(&mut raw).await;
    assert_eq!(close_code(&frames), Some(CloseCode::ProtocolError as u32));
}

#[tokio::test]
async fn a_consumer_away_longer_than_the_idle_timeout_finds_its_frames() {
    // The peer keeps sending while the consumer is away: inline, the frames
    // wait in the socket; with a reader task, the reader waits for room in
    // its channel. Either way the connection is not idle.
    for inline_reads in [true, false] {
        let config = Config {
            ping_interval: None,
            idle_timeout: Some(Duration::from_millis(200)),
            recv_batches: 1,
            inline_reads,
            ..Config::default()
        };
        let listener = listen("tcp://127.0.0.1:0", &config).await.unwrap();
        // The client itself hears nothing back: no idle timeout there.
        let quiet = Config {
            idle_timeout: None,
            ..config
        };
        let (client, mut server) = dial(&listener, &quiet).await;
        let (tx, _rx) = client.split();
        let sending = tokio::spawn(async move {
            for i in 0..40u32 {
                tx.send(&Frame::data(i.to_be_bytes().to_vec())).unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tx
        });
        for i in 0..40u32 {
            if i % 5 == 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            assert_eq!(
                recv(&mut server).await,
                Frame::data(i.to_be_bytes().to_vec()),
                "inline_reads {inline_reads}"
            );
        }
        drop(sending.await.unwrap());
    }
}

#[tokio::test]
async fn a_dropped_receiver_still_notices_the_peers_close() {
    let (_l, mut client, server) = pair("tcp://127.0.0.1:0", &inline()).await;
    let (tx, rx) = server.split();
    drop(rx);
    // Nobody receives on the server side: a task reads on and answers pings.
    client.send(&Frame::data(&b"dropped"[..])).unwrap();
    client.send(&Frame::ping(5)).unwrap();
    tx.send(&Frame::data(&b"still sending"[..])).unwrap();
    assert_eq!(recv(&mut client).await, Frame::data(&b"still sending"[..]));
    client.sender().close(CloseCode::Normal, "done");
    match tokio::time::timeout(T, tx.closed()).await.unwrap() {
        RecvError::Closed { reason, .. } => assert_eq!(reason, "done"),
        other => panic!("expected the peer's close, got {other:?}"),
    }
    assert!(tx.is_closed());
}

#[tokio::test]
async fn try_recv_reads_what_has_arrived() {
    let (a, b) = replimesh_transport::pair(&inline(), 64 * 1024);
    let (_tx, mut rx) = b.split();
    assert!(rx.try_recv().is_none());
    a.send(&Frame::data(&b"one"[..])).unwrap();
    a.send(&Frame::data(&b"two"[..])).unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + T;
    while got.len() < 2 && tokio::time::Instant::now() < deadline {
        match rx.try_recv() {
            Some(f) => got.push(f.unwrap()),
            None => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    assert_eq!(
        got,
        vec![Frame::data(&b"one"[..]), Frame::data(&b"two"[..])]
    );
    drop(a);
    let end = tokio::time::timeout(T, rx.recv()).await.unwrap();
    assert!(end.is_err(), "{end:?}");
}

fn with_files(mut config: Config) -> Config {
    config.http_files = std::sync::Arc::new([replimesh_transport::HttpFile {
        path: "/hello.js".into(),
        content_type: "text/javascript; charset=utf-8".into(),
        body: Bytes::from_static(b"export const hello = 1;\n"),
    }]);
    config
}

/// What a raw HTTP request to `url`'s host gets back (the connection is
/// read to its end).
async fn http_request(url: &str, request: &str) -> String {
    let host = url.trim_start_matches("ws://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out))
        .await
        .expect("the listener never closed the connection")
        .unwrap_or(0);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn ws_listener_answers_plain_gets_of_its_files() {
    let config = with_files(Config::default());
    let listener = listen("ws://127.0.0.1:0/", &config).await.unwrap();
    let url = listener.local_url();
    let got = http_request(&url, "GET /hello.js?v=2 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("Content-Type: text/javascript; charset=utf-8\r\n"));
    assert!(got.contains("Content-Length: 24\r\n"));
    assert!(got.ends_with("\r\n\r\nexport const hello = 1;\n"), "{got}");
    // Another path, or a method other than GET, is not a file.
    for req in [
        "GET /other.js HTTP/1.1\r\nHost: x\r\n\r\n",
        "POST /hello.js HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let got = http_request(&url, req).await;
        assert!(!got.contains("hello = 1"), "{req:?} got {got}");
    }
    // WebSocket clients go on as before on the same listener.
    let (client, server) = tokio::join!(connect(&url, &config), listener.accept());
    let (mut client, mut server) = (client.unwrap(), server.unwrap());
    client.send(&Frame::data(&b"after the GETs"[..])).unwrap();
    assert_eq!(recv(&mut server).await, Frame::data(&b"after the GETs"[..]));
    server.send(&Frame::data(&b"back"[..])).unwrap();
    assert_eq!(recv(&mut client).await, Frame::data(&b"back"[..]));
}

#[tokio::test]
async fn wss_round_trip_with_http_files() {
    round_trip("wss://127.0.0.1:0/", &with_files(tls_config())).await;
}
