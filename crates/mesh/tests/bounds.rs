//! What a peer can make a clone hold or do is bounded: publish to all is
//! linear in the subscribers, the core's command queue pushes back on the
//! sockets that fill it, subscriptions and names have limits, the client's
//! inbox is bounded, a dropped client stops dialling.

mod common;

use std::time::Duration;

use bytes::Bytes;
use replimesh_mesh::core::{Action, Core, CoreConfig};
use replimesh_mesh::{Client, ClientConfig, Groups, Server, ServerConfig};

const T: Duration = Duration::from_secs(10);

fn client_config(url: &str) -> ClientConfig {
    let mut c = ClientConfig::new([url]);
    c.reconnect_min = Duration::from_millis(10);
    c.reconnect_max = Duration::from_millis(50);
    c
}

/// Publish to all with many clients, each in groups of its own: every
/// subscribed client gets the message once, for one of its groups, and
/// nobody else does. The work is linear in the clients (one map look-up
/// per client, 2.3 s for the whole test in a debug build); it was a search
/// through the groups seen so far for each client (40,000 clients in
/// 40,000 groups: 8·10⁸ string compares per message), so the old code did
/// not get through these 40 messages before the watchdog's minute.
#[test]
fn publish_to_all_reaches_each_subscriber_once_in_linear_work() {
    let _watchdog = common::watchdog("publish_to_all_reaches_each_subscriber_once_in_linear_work");
    const N: u64 = 40_000;
    let mut core = Core::new(CoreConfig::new("a", "", 1), Duration::ZERO);
    for c in 0..N {
        core.client_connected(c, &format!("c{c}"));
        let groups: Vec<String> = if c % 10 == 0 {
            // in three groups, two of them shared
            vec![format!("g{c}"), "shared-x".into(), "shared-y".into()]
        } else {
            vec![format!("g{c}")]
        };
        core.subscribe(c, &groups);
    }
    // clients in no group get nothing
    for c in N..N + 1000 {
        core.client_connected(c, &format!("idle{c}"));
    }
    while core.poll_action().is_some() {}
    for round in 0..40u64 {
        core.publish(
            None,
            Vec::new(),
            true,
            false,
            Bytes::from(vec![round as u8]),
        );
        let mut got = vec![0u32; N as usize];
        let mut deliveries = 0;
        while let Some(a) = core.poll_action() {
            if let Action::Deliver {
                msg,
                targets,
                group_of,
            } = a
            {
                deliveries += 1;
                assert!(msg.all);
                for t in targets {
                    assert!(t.conn < N, "client {} is in no group", t.conn);
                    got[t.conn as usize] += 1;
                    let g = &group_of[t.group];
                    assert!(
                        *g == format!("g{}", t.conn) || g.starts_with("shared-"),
                        "client {} got it for {g}",
                        t.conn
                    );
                }
            }
        }
        assert_eq!(deliveries, 1, "round {round}");
        assert!(
            got.iter().all(|n| *n == 1),
            "round {round}: each subscriber once"
        );
    }
}

/// A publisher flooding the clone: the commands waiting for the core never
/// exceed `command_queue` (the publisher's connection is not read while it
/// is full), everything published is delivered, and `shutdown` returns
/// while the flood goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_pushed_back_and_shutdown_is_not_stuck_behind_it() {
    let _watchdog = common::watchdog("a_flood_is_pushed_back_and_shutdown_is_not_stuck_behind_it");
    let mut cfg = ServerConfig::new("a", "tcp://127.0.0.1:0");
    cfg.command_queue = 4;
    let s = Server::start(cfg).await.unwrap();
    let mut subs = Vec::new();
    for i in 0..20 {
        let c = Client::connect(client_config(s.url())).await.unwrap();
        c.subscribe(&[&format!("g{i}")]).unwrap();
        let mut inbox = c.deliveries().unwrap();
        tokio::spawn(async move { while inbox.recv().await.is_some() {} });
        subs.push(c);
    }
    let mut pc = client_config(s.url());
    pc.reconnect = false;
    let publisher = Client::connect(pc).await.unwrap();
    let flood = {
        let p = publisher.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while p
                .publish_wait(Groups::All, &b"flood"[..], false)
                .await
                .is_ok()
            {
                n += 1;
                // a task that never yields would keep its connection's
                // writer (woken into this worker's LIFO slot) from running
                if n % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            n
        })
    };
    // wait until deliveries flow, watching the queue meanwhile
    let mut max_queued = 0;
    let end = tokio::time::Instant::now() + T;
    while s.stats().delivered < 20 * 2_000 && tokio::time::Instant::now() < end {
        max_queued = max_queued.max(s.stats().queued_commands);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(s.stats().delivered >= 20 * 2_000, "{:?}", s.stats());
    assert!(max_queued <= 4, "{max_queued} commands queued");
    tokio::time::timeout(T, s.shutdown())
        .await
        .expect("shutdown during a flood");
    let n = tokio::time::timeout(T, flood).await.unwrap().unwrap();
    assert!(n > 0);
}

/// A raw client connection (no `Client`, so nothing is checked on our
/// side): hello sent, welcome read.
async fn raw_client(url: &str, id: &str) -> (transport::Sender, transport::Receiver) {
    use proto::{frame::Body, Frame, PeerKind};
    let conn = tokio::time::timeout(T, transport::connect(url, &transport::Config::default()))
        .await
        .unwrap()
        .unwrap();
    let (tx, mut rx) = conn.split();
    tx.send(&Frame::new(Body::Hello(proto::Hello {
        version: proto::PROTOCOL_VERSION,
        kind: PeerKind::Client as i32,
        id: id.into(),
        ..Default::default()
    })))
    .unwrap();
    match tokio::time::timeout(T, rx.recv()).await.unwrap() {
        Ok(Frame {
            body: Some(Body::Welcome(_)),
        }) => {}
        other => panic!("no welcome: {other:?}"),
    }
    (tx, rx)
}

/// Waits for the end of a connection: its close code and reason.
async fn closed(rx: &mut transport::Receiver) -> (u32, String) {
    loop {
        match tokio::time::timeout(T, rx.recv())
            .await
            .expect("not closed")
        {
            Ok(_) => continue,
            Err(transport::RecvError::Closed { code, reason }) => return (code, reason),
            Err(e) => panic!("{e}"),
        }
    }
}

fn subscribe(groups: impl IntoIterator<Item = String>) -> proto::Frame {
    proto::Frame::new(proto::frame::Body::Subscribe(proto::Subscribe {
        groups: groups.into_iter().collect(),
    }))
}

/// Subscriptions past the limits are refused, whole, with a close whose
/// reason names the limit; so are long names and client ids. The old code
/// took everything (one client could create a million groups).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_past_the_limits_are_refused_with_a_reason() {
    let _watchdog = common::watchdog("subscriptions_past_the_limits_are_refused_with_a_reason");
    const PROTOCOL_ERROR: u32 = proto::CloseCode::ProtocolError as u32;
    let mut cfg = ServerConfig::new("a", "tcp://127.0.0.1:0");
    cfg.max_groups_per_client = 10;
    cfg.max_groups = 15;
    let s = Server::start(cfg).await.unwrap();
    let url = s.url().to_string();

    // up to the limit per client: fine (repeats do not count twice)
    let (a, mut a_rx) = raw_client(&url, "a").await;
    a.send(&subscribe((0..10).map(|i| format!("a{i}"))))
        .unwrap();
    a.send(&subscribe((0..10).map(|i| format!("a{i}"))))
        .unwrap();
    let ok = eventually(|| async { s.counts().await.unwrap().0 == 10 }).await;
    assert!(ok, "{:?}", s.counts().await);
    // one more: refused, closed, nothing of it applied
    a.send(&subscribe(["a0".to_string(), "a10".to_string()]))
        .unwrap();
    let (code, reason) = closed(&mut a_rx).await;
    assert_eq!(code, PROTOCOL_ERROR, "{reason}");
    assert!(reason.contains("at most 10 groups"), "{reason}");
    // a's close reaches us before the server has dropped a's groups: wait
    // for that, or b's groups would count on top of a's
    let ok = eventually(|| async { s.counts().await.unwrap().0 == 0 }).await;
    assert!(ok, "a's groups are gone: {:?}", s.counts().await);

    // groups per clone: 10 held by b, 6 new ones from c would make 16 > 15
    let (b, _b_rx) = raw_client(&url, "b").await;
    b.send(&subscribe((0..10).map(|i| format!("b{i}"))))
        .unwrap();
    let ok = eventually(|| async { s.counts().await.unwrap().0 == 10 }).await;
    assert!(
        ok,
        "a's groups are gone, b's are there: {:?}",
        s.counts().await
    );
    let (c, mut c_rx) = raw_client(&url, "c").await;
    c.send(&subscribe((0..6).map(|i| format!("c{i}")))).unwrap();
    let (code, reason) = closed(&mut c_rx).await;
    assert_eq!(code, PROTOCOL_ERROR, "{reason}");
    assert!(reason.contains("maximum of 15 groups"), "{reason}");
    // joining existing groups creates none: fine
    let (d, mut d_rx) = raw_client(&url, "d").await;
    d.send(&subscribe((0..10).map(|i| format!("b{i}"))))
        .unwrap();
    let ok = eventually(|| async {
        s.clients()
            .await
            .unwrap()
            .iter()
            .any(|c| c.id == "d" && c.groups.len() == 10)
    })
    .await;
    assert!(ok);

    // a group name past 256 bytes
    d.send(&subscribe(["x".repeat(257)])).unwrap();
    let (code, reason) = closed(&mut d_rx).await;
    assert_eq!(code, PROTOCOL_ERROR);
    assert!(reason.contains("group name of 257 bytes"), "{reason}");

    // a client id past 256 bytes: closed before the welcome
    let conn = transport::connect(&url, &transport::Config::default())
        .await
        .unwrap();
    let (tx, mut rx) = conn.split();
    tx.send(&proto::Frame::new(proto::frame::Body::Hello(
        proto::Hello {
            version: proto::PROTOCOL_VERSION,
            kind: proto::PeerKind::Client as i32,
            id: "i".repeat(300),
            ..Default::default()
        },
    )))
    .unwrap();
    let (code, reason) = closed(&mut rx).await;
    assert_eq!(code, PROTOCOL_ERROR);
    assert!(reason.contains("client id of 300 bytes"), "{reason}");

    // the Client checks its own limits first
    let mut cc = client_config(&url);
    cc.max_groups = 3;
    let client = Client::connect(cc).await.unwrap();
    client.subscribe(&["1", "2"]).unwrap();
    assert!(matches!(
        client.subscribe(&["3", "4"]),
        Err(replimesh_mesh::MeshError::Limit(_))
    ));
    assert_eq!(client.my_groups(), ["1", "2"]);
    client.subscribe(&["2", "3"]).unwrap();
    assert!(matches!(
        client.subscribe(&[&"y".repeat(257)]),
        Err(replimesh_mesh::MeshError::Limit(_))
    ));
    s.shutdown().await;
}

/// Polls `f` every 10 ms for at most `T`.
async fn eventually<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + T;
    while tokio::time::Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A client that takes its inbox and stops reading it is seen by the
/// server as a slow consumer: the read loop waits for room in the bounded
/// inbox instead of buffering without limit, so the server's queue for it
/// fills and the server cuts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_inbox_is_a_slow_consumer() {
    let _watchdog = common::watchdog("a_client_that_stops_reading_its_inbox_is_a_slow_consumer");
    let mut cfg = ServerConfig::new("a", "tcp://127.0.0.1:0");
    cfg.transport.max_queue_bytes = 64 * 1024;
    let s = Server::start(cfg).await.unwrap();
    let mut cc = client_config(s.url());
    cc.inbox = 1;
    cc.reconnect = false;
    let c = Client::connect(cc).await.unwrap();
    let mut inbox = c.deliveries().unwrap(); // held, not read for now
    c.subscribe(&["g"]).unwrap();
    let ok = eventually(|| async { s.groups().await.unwrap().len() == 1 }).await;
    assert!(ok);
    let data = Bytes::from(vec![7u8; 1024]);
    // far more than the socket buffers, the inbox and the server's queue hold
    for i in 0..200_000 {
        if s.stats().slow_consumer_disconnects > 0 {
            break;
        }
        s.publish(Groups::one("g"), data.clone(), None).unwrap();
        if i % 64 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let ok = eventually(|| async { s.stats().slow_consumer_disconnects > 0 }).await;
    assert!(ok, "{:?}", s.stats());
    // read out, the client finds its connection cut (no reconnect): the
    // inbox ends
    let end = tokio::time::timeout(T, async {
        let mut n = 0u64;
        while inbox.recv().await.is_some() {
            n += 1;
        }
        n
    })
    .await
    .expect("the inbox ends");
    assert!(end > 0);
    assert!(!c.is_connected());
    s.shutdown().await;
}

/// Dropping the last handle of a client that keeps reconnecting stops its
/// dialling (the old client dialled on for ever), and `shutdown` waits for
/// the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_stops_dialling() {
    let _watchdog = common::watchdog("a_dropped_client_stops_dialling");
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    // a listener that accepts and hangs up at once, counting
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("tcp://{}", l.local_addr().unwrap());
    let accepted = Arc::new(AtomicU64::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            drop(sock);
        }
    });
    let c = Client::start(client_config(&url)).unwrap();
    let c2 = c.clone();
    let ok = eventually(|| async { accepted.load(Ordering::SeqCst) >= 3 }).await;
    assert!(ok, "the client dials");
    drop(c);
    // one handle left: still dialling
    let before = accepted.load(Ordering::SeqCst);
    let ok = eventually(|| async { accepted.load(Ordering::SeqCst) > before + 2 }).await;
    assert!(ok, "a handle is left");
    drop(c2);
    // an attempt under way may still land; then nothing more
    tokio::time::sleep(Duration::from_millis(200)).await;
    let settled = accepted.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), settled, "still dialling");

    // shutdown: returns once the task is over, then nothing more either
    let c = Client::start(client_config(&url)).unwrap();
    let at = accepted.load(Ordering::SeqCst);
    let ok = eventually(|| async { accepted.load(Ordering::SeqCst) > at + 1 }).await;
    assert!(ok);
    tokio::time::timeout(T, c.shutdown()).await.unwrap();
    // A dial made before the end may still wait in the listener's queue:
    // let the counting task take it, then nothing more may come.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let settled = accepted.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        settled,
        "dialling after shutdown"
    );
}

/// A client flooding `Publish` frames holds at most
/// `max_publishes_in_flight` places in the core's command queue: its
/// connection is not read past them (push back), so the queue stays short
/// and another client's publish gets through at once. The old code let one
/// connection fill the whole shared queue (here 64): every other
/// connection's command waited behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_publisher_holds_few_places_in_the_core_queue() {
    let _watchdog = common::watchdog("a_flooding_publisher_holds_few_places_in_the_core_queue");
    let mut cfg = ServerConfig::new("a", "tcp://127.0.0.1:0");
    cfg.command_queue = 64;
    cfg.max_publishes_in_flight = 2;
    let s = Server::start(cfg).await.unwrap();
    // Subscribers that read, each in a group of its own: publishes to all
    // cost the core some work.
    let mut subs = Vec::new();
    for i in 0..50 {
        let c = Client::connect(client_config(s.url())).await.unwrap();
        c.subscribe(&[&format!("g{i}")]).unwrap();
        let mut inbox = c.deliveries().unwrap();
        tokio::spawn(async move { while inbox.recv().await.is_some() {} });
        subs.push(c);
    }
    let (tx, _rx) = raw_client(s.url(), "flooder").await;
    let publish = proto::Frame::new(proto::frame::Body::Publish(proto::Publish {
        all: true,
        data: Bytes::from_static(b"flood"),
        ..Default::default()
    }));
    let flood = tokio::spawn(async move {
        let mut n = 0u64;
        while tx.send_wait(&publish).await.is_ok() {
            n += 1;
            if n % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        n
    });
    let mut max_queued = 0;
    let end = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < end {
        max_queued = max_queued.max(s.stats().queued_commands);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(s.stats().published > 100, "{:?}", s.stats());
    assert!(
        max_queued <= 2,
        "{max_queued} commands queued by one publisher (2 allowed)"
    );
    tokio::time::timeout(T, s.shutdown())
        .await
        .expect("shutdown during a flood");
    let _ = tokio::time::timeout(T, flood).await;
}

/// Routed requests being handled are bounded per connection: past
/// `max_requests_in_flight` a request is answered at once with an error
/// naming the limit (the connection stays open), and once handlers finish
/// requests are served again. The old code spawned a task for each,
/// without limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_per_connection_are_bounded() {
    use proto::{frame::Body, Frame};
    let _watchdog = common::watchdog("requests_in_flight_per_connection_are_bounded");
    let mut cfg = ServerConfig::new("a", "tcp://127.0.0.1:0");
    cfg.max_requests_in_flight = 4;
    let s = Server::start(cfg).await.unwrap();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    s.route("slow", "", move |ctx| {
        let g = g.clone();
        async move {
            let _p = g.acquire().await;
            Ok(ctx.data)
        }
    });
    let (tx, mut rx) = raw_client(s.url(), "asker").await;
    let request = |id: u64| {
        Frame::new(Body::Request(proto::Request {
            id,
            route: "slow".into(),
            act: String::new(),
            data: Bytes::from(id.to_string()),
        }))
    };
    for id in 1..=6 {
        tx.send(&request(id)).unwrap();
    }
    // Requests 5 and 6 are refused at once; 1 to 4 wait for the gate.
    for want in [5, 6] {
        let f = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        match f.body {
            Some(Body::Response(r)) => {
                assert_eq!(r.id, want);
                let e = r.error.expect("an error response");
                assert_eq!(e.code, replimesh_mesh::CODE_BUSY);
                assert!(e.message.contains("limit"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }
    gate.add_permits(4);
    let mut answered = Vec::new();
    while answered.len() < 4 {
        let f = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        if let Some(Body::Response(r)) = f.body {
            assert!(r.error.is_none(), "{r:?}");
            answered.push(r.id);
        }
    }
    answered.sort();
    assert_eq!(answered, [1, 2, 3, 4]);
    // Served again.
    gate.add_permits(1);
    tx.send(&request(7)).unwrap();
    let f = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert!(
        matches!(&f.body, Some(Body::Response(r)) if r.id == 7 && r.error.is_none()),
        "{f:?}"
    );
    s.shutdown().await;
}
