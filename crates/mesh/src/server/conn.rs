//! Accepting a connection up to its hello (on the server's own listeners,
//! or handed over by a program that shares its listeners), then passing it
//! to the clone-link or client code; what both kinds of connection share.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use proto::{frame::Body, CloseCode, Frame, PeerKind};
use tokio::sync::mpsc;

use super::client_conn::serve_client;
use super::clone_link::serve_clone;
use super::{Server, ServerEvent, Shared, Srv};

pub(super) async fn accept_loop(server: Srv, listener: Arc<transport::Listener>) {
    let mut stop = server.shared.shutdown.subscribe();
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            // `wait_for` looks at the current value first: a stop asked for
            // before this task started is not missed
            _ = stop.wait_for(|s| *s) => break,
        };
        match conn {
            Ok(c) => {
                tokio::spawn(serve_conn(server.clone(), c));
            }
            Err(e) => {
                server.event(ServerEvent::Error(format!("accept: {e}")));
                break;
            }
        }
    }
    // the core task waits for this before it reports `Stop`
    if let Ok(l) = Arc::try_unwrap(listener) {
        l.close().await;
    }
}

pub(super) fn protocol_error(server: &Srv, sender: &transport::Sender, why: String) {
    sender.close(CloseCode::ProtocolError, &why);
    server.event(ServerEvent::Error(why));
}

pub(super) fn welcome(shared: &Shared) -> Frame {
    Frame::new(Body::Welcome(proto::Welcome {
        version: proto::PROTOCOL_VERSION,
        id: shared.id.clone(),
        url: shared.url.clone(),
        incarnation: shared.incarnation,
        data: shared.data.clone(),
    }))
}

/// One accepted connection: handshake, then a clone link or a client.
async fn serve_conn(server: Srv, conn: transport::Connection) {
    let (sender, mut rx) = conn.split();
    let addr = format!("{:?}", sender.peer_addr());
    let first = tokio::time::timeout(server.shared.hello_timeout, rx.recv()).await;
    let hello = match first {
        Ok(Ok(Frame {
            body: Some(Body::Hello(h)),
        })) => h,
        Ok(Ok(f)) => {
            return protocol_error(
                &server,
                &sender,
                format!("{addr}: expected hello, got {}", f.kind()),
            );
        }
        Ok(Err(e)) => {
            server.event(ServerEvent::Error(format!("{addr}: {e}")));
            return;
        }
        Err(_) => {
            sender.close(CloseCode::Timeout, "no hello");
            server.event(ServerEvent::Error(format!("{addr}: no hello in time")));
            return;
        }
    };
    if hello.version != proto::PROTOCOL_VERSION {
        sender.close(CloseCode::UnsupportedVersion, "unsupported version");
        server.event(ServerEvent::Error(format!(
            "{addr}: version {}",
            hello.version
        )));
        return;
    }
    serve_hello(server, sender, rx, hello, addr).await
}

/// Serves a connection whose hello (of a supported version) was read: a
/// clone link or an anonymous client.
async fn serve_hello(
    server: Srv,
    sender: transport::Sender,
    rx: transport::Receiver,
    hello: proto::Hello,
    addr: String,
) {
    // A hello was accepted: frames up to the configured maximum from now on.
    rx.raise_max_frame();
    if hello.kind == PeerKind::Clone as i32 {
        serve_clone(server, sender, rx, hello, addr).await
    } else {
        // Nobody checked a login here: the client is anonymous.
        let hello = proto::Hello {
            login: String::new(),
            ..hello
        };
        serve_client(server, sender, ClientRx::Conn(rx), hello).await
    }
}

/// Frames of unknown kinds seen on one connection.
#[derive(Default)]
pub(super) struct Unknown(u64);

impl Unknown {
    /// Counts one; `false` when it is past
    /// [`ServerConfig::max_unknown_frames`] (the connection is closed).
    pub(super) fn ignore(&mut self, shared: &Shared) -> bool {
        self.0 += 1;
        shared.stats.unknown_frames.fetch_add(1, Ordering::Relaxed);
        self.0 <= shared.max_unknown_frames
    }
}

/// Where a client connection's frames come from.
pub(super) enum ClientRx {
    /// The connection itself.
    Conn(transport::Receiver),
    /// Frame bodies, not decoded yet ([`Server::adopt_client_encoded`]).
    Encoded(mpsc::Receiver<Bytes>, transport::Sender),
}

impl ClientRx {
    pub(super) async fn recv(&mut self) -> Result<Frame, transport::RecvError> {
        match self {
            ClientRx::Conn(rx) => rx.recv().await,
            ClientRx::Encoded(rx, sender) => {
                let body = rx.recv().await.ok_or(transport::RecvError::Eof)?;
                <Frame as proto::Message>::decode(body).map_err(|e| {
                    let why = format!("malformed frame: {e}");
                    sender.close(CloseCode::ProtocolError, &why);
                    transport::RecvError::Malformed(why)
                })
            }
        }
    }
}

impl Server {
    fn srv(&self) -> Srv {
        Srv {
            shared: self.shared.clone(),
            handle: Arc::downgrade(&self.handle),
        }
    }

    /// Serves a connection that the caller accepted and whose first frame,
    /// `hello`, it has read: a clone link or a client, as if this server
    /// had accepted it on one of its listeners (auth, welcome, everything
    /// after). For programs whose listeners serve more than the mesh, such
    /// as the `replimesh` node. Must be called inside a Tokio runtime.
    pub fn adopt(
        &self,
        sender: transport::Sender,
        receiver: transport::Receiver,
        hello: proto::Hello,
    ) {
        let server = self.srv();
        tokio::spawn(async move {
            if hello.version != proto::PROTOCOL_VERSION {
                sender.close(CloseCode::UnsupportedVersion, "unsupported version");
                return;
            }
            let addr = format!("{:?}", sender.peer_addr());
            serve_hello(server, sender, receiver, hello, addr).await
        });
    }

    /// Serves a client whose connection the caller reads: `hello` is its
    /// first frame, `bodies` the protobuf bodies of the mesh frames that
    /// follow, not decoded yet (as `transport::Receiver::recv_encoded` gives
    /// them; the caller passes on the others, such as store frames,
    /// elsewhere). They are decoded in the client's task; a body that does
    /// not decode closes the connection as a protocol error. The client is
    /// welcomed and answered on `sender`, which the caller may share. It is
    /// gone when `bodies` closes or the connection ends. Must be called
    /// inside a Tokio runtime.
    pub fn adopt_client_encoded(
        &self,
        sender: transport::Sender,
        hello: proto::Hello,
        bodies: mpsc::Receiver<Bytes>,
    ) {
        let server = self.srv();
        let rx = ClientRx::Encoded(bodies, sender.clone());
        tokio::spawn(serve_client(server, sender, rx, hello));
    }
}
