//! Server lifecycle (stopping when the last handle goes), the event stream,
//! the client's outbox while disconnected, and how the client reads
//! deliveries.

mod common;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use replimesh_mesh::{Client, ClientConfig, Groups, MeshError, Server, ServerConfig, ServerEvent};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);

fn client_config(url: &str) -> ClientConfig {
    let mut c = ClientConfig::new([url]);
    c.reconnect_min = Duration::from_millis(10);
    c.reconnect_max = Duration::from_millis(50);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stops_when_the_last_handle_is_dropped() {
    let _watchdog = common::watchdog("server_stops_when_the_last_handle_is_dropped");
    let s = Server::start(ServerConfig::new("a", "tcp://127.0.0.1:0"))
        .await
        .unwrap();
    // a handler owning only a weak handle does not keep the server running
    let weak = s.downgrade();
    s.route("who", "", move |_| {
        let w = weak.clone();
        async move {
            let id = w.upgrade().map(|s| s.id().to_string()).unwrap_or_default();
            Ok(Bytes::from(id))
        }
    });
    s.route("ctx", "", |ctx| async move {
        Ok(Bytes::from(
            ctx.server().map(|s| s.id().to_string()).unwrap_or_default(),
        ))
    });
    let url = s.url().to_string();
    let mut events = s.events();
    let mut cc = client_config(&url);
    cc.reconnect = false;
    let c = Client::connect(cc).await.unwrap();
    assert_eq!(c.request("who", "x", Bytes::new()).await.unwrap(), "a");
    assert_eq!(c.request("ctx", "x", Bytes::new()).await.unwrap(), "a");
    let weak = s.downgrade();
    let s2 = s.clone();
    drop(s);
    // one handle left: still serving
    assert_eq!(c.request("who", "x", Bytes::new()).await.unwrap(), "a");
    assert!(weak.upgrade().is_some());
    drop(s2);
    // the last handle is gone: the server stops by itself, gracefully
    let stopped = tokio::time::timeout(T, async {
        while let Some(e) = events.next().await {
            if e == ServerEvent::Stop {
                return true;
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(stopped, "Stop event");
    assert_eq!(
        tokio::time::timeout(T, events.next()).await.unwrap(),
        None,
        "the stream ends after Stop"
    );
    assert!(weak.upgrade().is_none());
    let end = tokio::time::Instant::now() + T;
    while c.is_connected() && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!c.is_connected(), "the client was disconnected");
    // the listener is closed
    let mut cc = client_config(&url);
    cc.reconnect = false;
    cc.attempts = 1;
    assert!(Client::connect(cc).await.is_err());
}

/// `Client::connect` without reconnect to an address nobody listens on
/// returns an error, every time. It used to hang now and then: when the
/// client's task gave up before `connect` subscribed to its end, the end
/// was never seen (the hang of `server_stops_when_the_last_handle_is_dropped`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_reconnect_to_a_dead_address_always_returns() {
    let _watchdog = common::watchdog("connect_without_reconnect_to_a_dead_address_always_returns");
    let url = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("tcp://{}", l.local_addr().unwrap())
    };
    for i in 0..300 {
        let mut cc = client_config(&url);
        cc.reconnect = false;
        cc.attempts = 1;
        let r = tokio::time::timeout(T, Client::connect(cc))
            .await
            .unwrap_or_else(|_| panic!("connect {i} did not return"));
        assert!(r.is_err(), "connect {i}");
    }
}

/// `shutdown().await` returns once the server is over, and by then its
/// listeners are closed: a new connection is refused, a Unix socket's file
/// is gone. The same holds when the `Stop` event is seen after the last
/// handle was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_has_closed_its_listeners() {
    let _watchdog = common::watchdog("a_stopped_server_has_closed_its_listeners");
    let dir = tempfile::tempdir().unwrap();
    for i in 0..40 {
        let path = dir.path().join(format!("s{i}.sock"));
        let mut cfg = ServerConfig::new("a", "tcp://127.0.0.1:0");
        cfg.listen.push(format!("unix://{}", path.display()));
        let s = Server::start(cfg).await.unwrap();
        let addr = s.url().trim_start_matches("tcp://").to_string();
        let c = Client::connect(client_config(s.url())).await.unwrap();
        let mut events = s.events();
        if i % 2 == 0 {
            tokio::time::timeout(T, s.shutdown()).await.unwrap();
            // again, and through the old name: returns at once
            tokio::time::timeout(T, s.stop()).await.unwrap();
        } else {
            drop(s);
            let stop = events.wait_for(T, |e| *e == ServerEvent::Stop).await;
            assert_eq!(stop, Some(ServerEvent::Stop), "run {i}");
        }
        assert!(
            std::net::TcpStream::connect(&addr).is_err(),
            "run {i}: the tcp listener is still open"
        );
        assert!(
            !path.exists(),
            "run {i}: the unix socket file is still there"
        );
        assert!(std::os::unix::net::UnixStream::connect(&path).is_err());
        c.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_a_stream_and_recv_still_works() {
    let _watchdog = common::watchdog("events_are_a_stream_and_recv_still_works");
    let s = Server::start(ServerConfig::new("a", "tcp://127.0.0.1:0"))
        .await
        .unwrap();
    let mut stream = s.events();
    let mut recv = s.events();
    let c = Client::connect(client_config(s.url())).await.unwrap();
    let is_conn = |e: &ServerEvent| matches!(e, ServerEvent::Connection { .. });
    let first = tokio::time::timeout(T, stream.next())
        .await
        .unwrap()
        .unwrap();
    assert!(is_conn(&first), "{first:?}");
    assert!(recv.wait_for(T, is_conn).await.is_some());
    // combinators work on it
    let mut closed = s
        .events()
        .filter(|e| futures_util::future::ready(matches!(e, ServerEvent::ClientClosed { .. })));
    c.close();
    let e = tokio::time::timeout(T, closed.next()).await.unwrap();
    assert!(matches!(e, Some(ServerEvent::ClientClosed { .. })));
    s.stop().await;
    let rest: Vec<ServerEvent> = tokio::time::timeout(T, stream.collect()).await.unwrap();
    assert_eq!(rest.last(), Some(&ServerEvent::Stop));
    assert_eq!(recv.recv().await.map(|_| ()), Some(()));
}

/// A server with routes `log` (into the receiver) and `echo`, listening on
/// `url` only once its routes are set (it binds elsewhere, then the socket
/// is moved to the url's path).
async fn serve_at(dir: &std::path::Path, url: &str) -> (Server, mpsc::UnboundedReceiver<Bytes>) {
    let tmp = dir.join("binding.sock");
    let mut cfg = ServerConfig::new("a", format!("unix://{}", tmp.display()));
    cfg.url = Some(url.to_string());
    let s = Server::start(cfg).await.unwrap();
    let (tx, logged) = mpsc::unbounded_channel();
    s.route("log", "", move |ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ctx.data);
            Ok(Bytes::new())
        }
    });
    s.route("echo", "", |ctx| async move { Ok(ctx.data) });
    std::fs::rename(&tmp, url.trim_start_matches("unix://")).unwrap();
    (s, logged)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_queues_while_disconnected_and_sends_after_reconnect() {
    let _watchdog = common::watchdog("client_queues_while_disconnected_and_sends_after_reconnect");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/mesh.sock", dir.path().display());
    // the server is not there yet: everything waits in the outbox, in order
    let c = Client::start(client_config(&url)).unwrap();
    let mut inbox = c.deliveries().unwrap();
    c.subscribe(&["g"]).unwrap();
    c.send("log", "x", &b"one"[..]).unwrap();
    c.publish(Groups::one("g"), &b"published"[..], false)
        .unwrap();
    let c2 = c.clone();
    let answer = tokio::spawn(async move { c2.request("echo", "x", &b"asked"[..]).await });
    c.send("log", "x", &b"two"[..]).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!answer.is_finished());
    // the server comes up
    let (s, mut logged) = serve_at(dir.path(), &url).await;
    let got = tokio::time::timeout(T, answer).await.unwrap().unwrap();
    assert_eq!(got.unwrap(), "asked");
    assert_eq!(
        tokio::time::timeout(T, logged.recv())
            .await
            .unwrap()
            .unwrap(),
        "one"
    );
    assert_eq!(
        tokio::time::timeout(T, logged.recv())
            .await
            .unwrap()
            .unwrap(),
        "two"
    );
    let d = tokio::time::timeout(T, inbox.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((d.group.as_str(), &d.data[..]), ("g", &b"published"[..]));
    // the server goes away and comes back: queued again meanwhile
    s.stop().await;
    let end = tokio::time::Instant::now() + T;
    while c.is_connected() && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!c.is_connected());
    c.send("log", "x", &b"three"[..]).unwrap();
    let (s, mut logged) = serve_at(dir.path(), &url).await;
    assert_eq!(
        tokio::time::timeout(T, logged.recv())
            .await
            .unwrap()
            .unwrap(),
        "three"
    );
    c.close();
    // a closed client queues nothing
    assert_eq!(
        c.send("log", "x", &b"late"[..]),
        Err(MeshError::Disconnected)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_is_bounded_and_queued_requests_time_out() {
    let _watchdog = common::watchdog("outbox_is_bounded_and_queued_requests_time_out");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/nobody.sock", dir.path().display());
    let mut cc = client_config(&url);
    cc.outbox = 2;
    cc.response_timeout = Duration::from_millis(100);
    let c = Client::start(cc).unwrap();
    c.send("r", "a", &b"1"[..]).unwrap();
    c.publish(Groups::All, &b"2"[..], false).unwrap();
    assert_eq!(c.send("r", "a", &b"3"[..]), Err(MeshError::OutboxFull(2)));
    assert!(matches!(
        c.request("r", "a", Bytes::new()).await,
        Err(MeshError::OutboxFull(2))
    ));
    c.close();

    let mut cc = client_config(&url);
    cc.outbox = 1;
    cc.response_timeout = Duration::from_millis(100);
    let c = Client::start(cc).unwrap();
    assert_eq!(
        c.request("r", "a", Bytes::new()).await,
        Err(MeshError::Timeout)
    );
    // a timed-out request does not hold its place in the outbox
    c.send("r", "a", &b"x"[..]).unwrap();
    c.close();

    // without reconnect nothing is queued
    let mut cc = client_config(&url);
    cc.reconnect = false;
    let c = Client::start(cc).unwrap();
    assert_eq!(c.send("r", "a", &b"x"[..]), Err(MeshError::Disconnected));
    assert_eq!(
        c.request("r", "a", Bytes::new()).await,
        Err(MeshError::Disconnected)
    );
    // and with an outbox of 0 neither
    let mut cc = client_config(&url);
    cc.outbox = 0;
    let c = Client::start(cc).unwrap();
    assert_eq!(c.send("r", "a", &b"x"[..]), Err(MeshError::Disconnected));
    c.close();
}

/// A fake server: deliveries in the plain shape, one the client's fast path
/// leaves to prost, enough for several batches, then a malformed frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reads_deliveries_in_order_and_closes_on_a_malformed_frame() {
    let _watchdog =
        common::watchdog("client_reads_deliveries_in_order_and_closes_on_a_malformed_frame");
    use proto::{frame::Body, CloseCode, Frame};
    let listener = transport::listen("tcp://127.0.0.1:0", &transport::Config::default())
        .await
        .unwrap();
    let mut cfg = client_config(&listener.local_url());
    cfg.reconnect = false;
    let c = Client::start(cfg).unwrap();
    let mut inbox = c.deliveries().unwrap();
    let (sender, mut rx) = listener.accept().await.unwrap().split();
    let hello = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert!(matches!(hello.body, Some(Body::Hello(_))));
    sender
        .send(&Frame::new(Body::Welcome(proto::Welcome {
            version: proto::PROTOCOL_VERSION,
            id: "fake".into(),
            ..Default::default()
        })))
        .unwrap();
    let deliver = |group: &str, from: &str, data: String| {
        Frame::new(Body::Deliver(proto::Deliver {
            group: group.into(),
            from: from.into(),
            data: data.into(),
        }))
    };
    const N: usize = 1000;
    for i in 0..N {
        sender
            .send(&deliver(["a", "b", "c"][i % 3], "pub", i.to_string()))
            .unwrap();
    }
    // `group` twice (the last one counts)
    let mut twice = deliver("first", "", "twice".into())
        .encode_to_bytes()
        .to_vec();
    twice.extend_from_slice(&[0x0a, 1, b'z']);
    twice[2] += 3;
    sender.send_encoded(twice.into()).unwrap();
    // not UTF-8: refused
    sender
        .send_encoded(vec![0x82, 0x01, 0x03, 0x0a, 0x01, 0xff].into())
        .unwrap();
    let mut got = Vec::new();
    while got.len() < N + 1 {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(T, inbox.recv_many(&mut buf, 7))
            .await
            .unwrap();
        assert!((1..=7).contains(&n) && n == buf.len(), "{n}");
        got.extend(buf);
    }
    for (i, d) in got[..N].iter().enumerate() {
        assert_eq!(d.group, ["a", "b", "c"][i % 3]);
        assert_eq!(
            (d.from.as_str(), &d.data[..]),
            ("pub", i.to_string().as_bytes())
        );
    }
    assert_eq!((got[N].group.as_str(), got[N].from.as_str()), ("z", ""));
    assert_eq!(&got[N].data[..], b"twice");
    // the malformed frame closed the connection as a protocol error
    loop {
        match tokio::time::timeout(T, rx.recv()).await.unwrap() {
            Ok(_) => continue,
            Err(transport::RecvError::Closed { code, .. }) => {
                assert_eq!(code, CloseCode::ProtocolError as u32);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // the client does not reconnect: it is over, and so is its inbox
    assert_eq!(tokio::time::timeout(T, inbox.recv()).await.unwrap(), None);
    assert_eq!(inbox.try_recv(), None);
}
