//! Helpers shared by the transport's integration tests: a raw TCP peer of an
//! accepted connection, and what such a peer reads.

// Each test file uses some of them.
#![allow(dead_code)]

use std::time::Duration;

use replimesh_transport::proto::{self, Frame};
use replimesh_transport::{connect, listen, Config, Connection, Listener};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The deadline of every network step in these tests.
pub(crate) const T: Duration = Duration::from_secs(10);

/// A raw TCP peer of a connection accepted with `config`: the raw socket
/// and the accepted connection.
pub(crate) async fn raw_peer(config: &Config) -> (TcpStream, Connection) {
    let listener = listen("tcp://127.0.0.1:0", config).await.unwrap();
    let addr = listener
        .local_url()
        .trim_start_matches("tcp://")
        .to_string();
    let raw = tokio::time::timeout(T, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let server = tokio::time::timeout(T, listener.accept())
        .await
        .unwrap()
        .unwrap();
    (raw, server)
}

/// Dials `listener` with `config` and accepts: the client's connection and
/// the server's, within [`T`].
pub(crate) async fn dial(listener: &Listener, config: &Config) -> (Connection, Connection) {
    let url = listener.local_url();
    let (client, server) = tokio::time::timeout(T, async {
        tokio::join!(connect(&url, config), listener.accept())
    })
    .await
    .unwrap();
    (client.unwrap(), server.unwrap())
}

/// The frames a raw peer reads until EOF. A reset ends the stream too (the
/// other side may close with our bytes unread): what arrived before it
/// counts.
pub(crate) async fn frames_until_eof(raw: &mut TcpStream) -> Vec<Frame> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(T, raw.read_to_end(&mut got))
        .await
        .expect("EOF in time");
    let mut buf = bytes::BytesMut::from(&got[..]);
    let mut codec = proto::FrameCodec::default();
    let mut frames = Vec::new();
    while let Some(f) = tokio_util::codec::Decoder::decode(&mut codec, &mut buf).unwrap() {
        frames.push(f);
    }
    frames
}

/// The code of the first `Close` frame in `frames`.
pub(crate) fn close_code(frames: &[Frame]) -> Option<u32> {
    frames.iter().find_map(|f| match &f.body {
        Some(proto::frame::Body::Close(c)) => Some(c.code as u32),
        _ => None,
    })
}
