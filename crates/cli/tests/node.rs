//! A node in-process: one connection does both mesh and store, logins are
//! per store, `/metrics` counters move, TLS and wss listeners.

use std::path::Path;
use std::time::Duration;

use replimesh::mesh;
use replimesh::proto::{self, frame::Body, CloseCode, Frame, PeerKind};
use replimesh::store::{self, Encoding, Reducer, Store, StoreConfig};
use replimesh::transport::{self, Connection, RecvError};
use replimesh_cli::admin::http_get;
use replimesh_cli::config::NodeConfig;
use replimesh_cli::metrics::parse_text;
use replimesh_cli::node::{HostedStore, Node};
use replimesh_cli::reducers::{CounterAction, CounterReducer, Kv, KvAction};

const T: Duration = Duration::from_secs(20);

/// A cheap Argon2id PHC string (plain passwords in a config are hashed
/// with the production cost, which unoptimized test builds pay at every login).
fn phc(password: &str) -> String {
    let cost = store::HashCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    store::hash_password(password, cost).unwrap()
}

/// Two stores with their own logins: `app` may use both (with different
/// passwords in each), `viewer` only `kv`.
fn config(extra_listen: &str) -> NodeConfig {
    let (kv, view, counter) = (phc("kv-pass"), phc("view-pass"), phc("counter-pass"));
    NodeConfig::parse(
        &format!(
            r#"
            id = "solo"
            admin = "127.0.0.1:0"
            [[listen]]
            url = "tcp://127.0.0.1:0"
            [[listen]]
            url = "ws://127.0.0.1:0/"
            {extra_listen}
            [limits]
            max_login_failures = 3
            [[store]]
            name = "kv"
            reducer = "kv"
            logins = {{ app = "{kv}", viewer = "{view}" }}
            [[store]]
            name = "counter"
            reducer = "counter"
            logins = {{ app = "{counter}" }}
            "#
        ),
        Path::new("."),
    )
    .unwrap()
}

async fn recv(c: &mut Connection) -> Frame {
    tokio::time::timeout(T, c.recv())
        .await
        .expect("timed out waiting for a frame")
        .expect("connection ended")
}

/// The next frame's body.
async fn recv_body(c: &mut Connection) -> Body {
    recv(c).await.body.expect("empty frame")
}

fn hello(login: &str, password: &str) -> Frame {
    Frame::new(Body::Hello(proto::Hello {
        version: proto::PROTOCOL_VERSION,
        kind: PeerKind::Client as i32,
        id: "raw-client".into(),
        login: login.into(),
        password: password.into(),
        ..Default::default()
    }))
}

fn store_hello(store: &str, schema: u32) -> Frame {
    Frame::new(Body::StoreHello(proto::StoreHello {
        store: store.into(),
        schema,
        client_id: "raw-client".into(),
        ..Default::default()
    }))
}

async fn metrics(node: &Node) -> Vec<replimesh_cli::metrics::Sample> {
    let (code, body) = http_get(node.admin_addr().unwrap(), "/metrics")
        .await
        .unwrap();
    assert_eq!(code, 200);
    parse_text(&body).unwrap_or_else(|e| panic!("bad Prometheus text: {e}\n{body}"))
}

fn value(
    samples: &[replimesh_cli::metrics::Sample],
    name: &str,
    label: Option<(&str, &str)>,
) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v))
        })
        .map(|s| s.2)
        .unwrap_or_else(|| panic!("no metric {name} {label:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_subscribes_and_replicates() {
    let node = Node::start(config("")).await.unwrap();
    let before = metrics(&node).await;
    // Build info, process metrics, readiness once started.
    assert_eq!(value(&before, "replimesh_build_info", None), 1.0);
    assert!(value(&before, "process_resident_memory_bytes", None) > 0.0);
    assert!(value(&before, "process_open_fds", None) > 0.0);
    let ready = http_get(node.admin_addr().unwrap(), "/ready")
        .await
        .unwrap();
    assert_eq!(ready, (200, "{\"status\":\"ready\"}\n".into()));
    let url = node.urls()[0].clone();
    let mut c = transport::connect(&url, &transport::Config::default())
        .await
        .unwrap();
    c.send(&hello("app", "kv-pass")).unwrap();
    assert!(matches!(recv_body(&mut c).await, Body::Welcome(_)));

    // Mesh: subscribe, and publish on the same connection.
    c.send(&Frame::new(Body::Subscribe(proto::Subscribe {
        groups: vec!["g".into()],
    })))
    .unwrap();
    // Store: attach to `kv` on the same connection.
    let kv = Kv { name: "kv".into() };
    c.send(&store_hello("kv", kv.schema())).unwrap();
    let mut welcomed = false;
    while !welcomed {
        match recv_body(&mut c).await {
            Body::StoreWelcome(w) => {
                assert_eq!(w.store, "kv");
                welcomed = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // The subscription is in once a publish comes back.
    let deliver = loop {
        c.send(&Frame::new(Body::Publish(proto::Publish {
            groups: vec!["g".into()],
            data: b"hi".to_vec().into(),
            ..Default::default()
        })))
        .unwrap();
        match tokio::time::timeout(Duration::from_millis(200), c.recv()).await {
            Ok(Ok(Frame {
                body: Some(Body::Deliver(d)),
            })) => break d,
            // The store's catch-up after its welcome.
            Ok(Ok(Frame {
                body: Some(Body::Snapshot(_) | Body::Actions(_) | Body::Digest(_)),
            })) => continue,
            Ok(Ok(f)) => panic!("unexpected {f:?}"),
            Ok(Err(e)) => panic!("connection ended: {e}"),
            Err(_) => continue,
        }
    };
    assert_eq!(
        (deliver.group.as_str(), &deliver.data[..]),
        ("g", &b"hi"[..])
    );
    // Drain the other probes.
    while let Ok(Ok(f)) = tokio::time::timeout(Duration::from_millis(300), c.recv()).await {
        assert!(
            matches!(
                f.body,
                Some(Body::Deliver(_) | Body::Snapshot(_) | Body::Actions(_) | Body::Digest(_))
            ),
            "{f:?}"
        );
    }

    // Dispatch on the same connection: committed, and the action comes back.
    let action = Encoding::Binary
        .encode(&KvAction::Set {
            key: "colour".into(),
            value: "blue".into(),
        })
        .unwrap();
    c.send(&Frame::new(Body::Dispatch(proto::Dispatch {
        store: "kv".into(),
        op_id: 1,
        action,
        ..Default::default()
    })))
    .unwrap();
    let (mut committed, mut applied) = (false, false);
    while !(committed && applied) {
        match recv_body(&mut c).await {
            Body::Committed(x) => {
                assert_eq!((x.store.as_str(), x.op_id, x.seq), ("kv", 1, 1));
                committed = true;
            }
            Body::Actions(a) => {
                assert_eq!((a.first_seq, a.actions.len()), (1, 1));
                applied = true;
            }
            Body::Snapshot(_) | Body::Digest(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        node.store("kv").unwrap().state_json()["colour"],
        serde_json::json!("blue")
    );

    // Per-store logins: `app` with the kv password may not use `counter`.
    let counter = CounterReducer {
        name: "counter".into(),
    };
    c.send(&store_hello("counter", counter.schema())).unwrap();
    match recv_body(&mut c).await {
        Body::StoreError(e) => {
            assert_eq!(e.store, "counter");
            let err = e.error.unwrap();
            assert!(err.message.contains("may not use"), "{}", err.message);
        }
        other => panic!("unexpected {other:?}"),
    }
    // An unknown store is named as such.
    c.send(&store_hello("nope", 1)).unwrap();
    match recv_body(&mut c).await {
        Body::StoreError(e) => assert_eq!(
            e.error.unwrap().code,
            store::ErrorCode::UnknownStore.as_u32()
        ),
        other => panic!("unexpected {other:?}"),
    }

    // Counters moved.
    let after = metrics(&node).await;
    for (name, label) in [
        ("replimesh_connections_opened_total", None),
        ("replimesh_client_publishes_total", None),
        ("replimesh_client_frames_total", Some(("to", "mesh"))),
        ("replimesh_client_frames_total", Some(("to", "store"))),
        ("replimesh_store_seq", Some(("store", "kv"))),
        ("replimesh_messages_published_total", None),
        ("replimesh_messages_delivered_total", None),
    ] {
        assert!(
            value(&after, name, label) > value(&before, name, label),
            "{name} {label:?} did not move"
        );
    }
    assert_eq!(value(&after, "replimesh_connections", None), 1.0);
    assert_eq!(
        value(&after, "replimesh_store_replicas", Some(("store", "kv"))),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "replimesh_store_replicas",
            Some(("store", "counter"))
        ),
        0.0
    );
    drop(c);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let m = metrics(&node).await;
        if value(&m, "replimesh_connections", None) == 0.0
            && value(&m, "replimesh_store_replicas", Some(("store", "kv"))) == 0.0
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "gauges stay up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_per_store() {
    let node = Node::start(config("")).await.unwrap();
    let url = node.urls()[1].clone(); // the ws:// listener
                                      // Same login, per-store passwords: each password opens its own store.
    let kv = Store::replica(Kv { name: "kv".into() }, StoreConfig::default());
    let _kv_link = kv.connect(&url, "app", "kv-pass").await.unwrap();
    let counter = Store::replica(
        CounterReducer {
            name: "counter".into(),
        },
        StoreConfig::default(),
    );
    let _counter_link = tokio::time::timeout(T, counter.connect(&url, "app", "counter-pass"))
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(T, counter.dispatch(CounterAction::Add(5)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(node.store("counter").unwrap().seq(), 1);
    // `viewer` may read kv but is refused on counter.
    let other = Store::replica(
        CounterReducer {
            name: "counter".into(),
        },
        StoreConfig::default(),
    );
    match tokio::time::timeout(T, other.connect(&url, "viewer", "view-pass"))
        .await
        .expect("refusal timed out")
    {
        Err(store::ConnectError::Refused(e)) => {
            assert!(e.message.contains("may not use"), "{e}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("viewer attached to counter"),
    }
    // The mesh needs no login (asked before the address is banned: a ban
    // covers the mesh too, see tests/security.rs).
    let m = mesh::Client::connect(mesh::ClientConfig::new([node.urls()[0].clone()]))
        .await
        .unwrap();
    let echo = m.request("echo", "", &b"x"[..]).await.unwrap();
    assert_eq!(&echo[..], b"x");
    m.close();
    // A wrong password is refused at the handshake, and bans after 3.
    for i in 0..3 {
        let r = Store::replica(Kv { name: "kv".into() }, StoreConfig::default());
        match tokio::time::timeout(T, r.connect(&url, "app", "wrong"))
            .await
            .expect("login refusal timed out")
        {
            Err(store::ConnectError::AuthFailed(_)) if i < 2 => {}
            Err(store::ConnectError::Banned(_)) if i == 2 => {}
            Err(e) => panic!("attempt {i}: unexpected error {e}"),
            Ok(_) => panic!("wrong password accepted"),
        }
    }
    let samples = metrics(&node).await;
    assert_eq!(value(&samples, "replimesh_login_failures_total", None), 3.0);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_cut_and_counted() {
    let mut cfg = config("");
    cfg.limits.max_queue_bytes = 64 * 1024;
    cfg.limits.max_frame = 64 * 1024;
    let node = Node::start(cfg).await.unwrap();
    let url = node.urls()[0].clone();
    // A raw client that subscribes and never reads.
    let mut tc = transport::Config::default();
    tc.recv_batches = 1;
    let mut c = transport::connect(&url, &tc).await.unwrap();
    c.send(&hello("", "")).unwrap();
    assert!(matches!(recv_body(&mut c).await, Body::Welcome(_)));
    c.send(&Frame::new(Body::Subscribe(proto::Subscribe {
        groups: vec!["firehose".into()],
    })))
    .unwrap();
    let publisher = mesh::Client::connect(mesh::ClientConfig::new([url.clone()]))
        .await
        .unwrap();
    let payload = vec![7u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + T;
    loop {
        for _ in 0..64 {
            let _ = publisher.publish(mesh::Groups::one("firehose"), payload.clone(), false);
        }
        let m = metrics(&node).await;
        if value(&m, "replimesh_slow_consumer_disconnects_total", None) >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow consumer was never cut"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = metrics(&node).await;
    assert!(value(&m, "replimesh_messages_dropped_total", None) >= 1.0);
    // Reading now ends with the node's close.
    let end = loop {
        match tokio::time::timeout(T, c.recv()).await.expect("no end") {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(end, RecvError::Closed { code, .. } if code == CloseCode::SlowConsumer as u32)
            || matches!(end, RecvError::Eof | RecvError::Io(_)),
        "{end:?}"
    );
    publisher.close();
    node.shutdown().await.unwrap();
}

/// `tls://` and `wss://` listeners with a certificate each; a second node
/// that trusts it (`[tls] ca_file`) links to the first over wss and relays
/// its store over tls; clients connect over both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_wss_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert_pem = cert.cert.pem();
    std::fs::write(dir.path().join("node.crt"), &cert_pem).unwrap();
    std::fs::write(
        dir.path().join("node.key"),
        cert.signing_key.serialize_pem(),
    )
    .unwrap();
    // A second certificate for the second listener (each listener has its own).
    let cert2 = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(dir.path().join("ws.crt"), cert2.cert.pem()).unwrap();
    std::fs::write(dir.path().join("ws.key"), cert2.signing_key.serialize_pem()).unwrap();
    std::fs::write(
        dir.path().join("ca.pem"),
        format!("{cert_pem}{}", cert2.cert.pem()),
    )
    .unwrap();

    let a = Node::start(
        NodeConfig::parse(
            r#"
            id = "tls-a"
            admin = "127.0.0.1:0"
            [[listen]]
            url = "tls://127.0.0.1:0"
            cert = "node.crt"
            key = "node.key"
            [[listen]]
            url = "wss://127.0.0.1:0/"
            cert = "ws.crt"
            key = "ws.key"
            [auth]
            token = "t"
            [[store]]
            name = "kv"
            logins = { app = "pw" }
            "#,
            dir.path(),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let (a_tls, a_wss) = (a.urls()[0].clone(), a.urls()[1].clone());
    assert!(a_tls.starts_with("tls://") && a_wss.starts_with("wss://"));
    let b = Node::start(
        NodeConfig::parse(
            &format!(
                r#"
                id = "tls-b"
                admin = "127.0.0.1:0"
                [[listen]]
                url = "wss://127.0.0.1:0/"
                cert = "node.crt"
                key = "node.key"
                [auth]
                token = "t"
                [tls]
                ca_file = "ca.pem"
                [[peer]]
                id = "tls-a"
                url = "{a_wss}"
                [[store]]
                name = "kv"
                logins = {{ app = "pw" }}
                [store.upstream]
                url = "{a_tls}"
                login = "app"
                password = "pw"
                "#
            ),
            dir.path(),
        )
        .unwrap(),
    )
    .await
    .unwrap();

    // Clients trust the roots too.
    let mut tc = transport::Config::default();
    tc.tls.client = Some(
        transport::TlsConfig::client_from_pem(&std::fs::read(dir.path().join("ca.pem")).unwrap())
            .unwrap(),
    );
    // A replica on b (over wss) dispatches; the authority on a commits.
    let replica = Store::replica(Kv { name: "kv".into() }, StoreConfig::default());
    let mut cc = store::ClientConfig::new("app", "pw");
    cc.transport.tls.client = tc.tls.client.clone();
    let _link = tokio::time::timeout(T, async {
        loop {
            // b's relay attaches to a in the background.
            match replica.connect_with(&b.urls()[0], cc.clone()).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("replica never attached through b");
    let seq = tokio::time::timeout(
        T,
        replica.dispatch(KvAction::Set {
            key: "k".into(),
            value: "v".into(),
        }),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(seq, 1);
    assert_eq!(a.store("kv").unwrap().seq(), 1);

    // The clone link a <-> b is up over wss; a message published on a (tls)
    // reaches a subscriber on b (wss).
    let mut sc = mesh::ClientConfig::new([b.urls()[0].clone()]);
    sc.transport = tc.clone();
    let sub = mesh::Client::connect(sc).await.unwrap();
    let mut inbox = sub.deliveries().unwrap();
    sub.subscribe(&["secure"]).unwrap();
    let mut pc = mesh::ClientConfig::new([a_tls.clone()]);
    pc.transport = tc.clone();
    let publ = mesh::Client::connect(pc).await.unwrap();
    let got = tokio::time::timeout(T, async {
        loop {
            publ.publish(mesh::Groups::one("secure"), &b"over tls"[..], false)
                .unwrap();
            if let Ok(Some(d)) =
                tokio::time::timeout(Duration::from_millis(200), inbox.recv()).await
            {
                break d;
            }
        }
    })
    .await
    .expect("no message across the wss clone link");
    assert_eq!(&got.data[..], b"over tls");
    // Without the roots, a client cannot connect.
    assert!(transport::connect(&a_wss, &transport::Config::default())
        .await
        .is_err());
    sub.close();
    publ.close();
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

/// `Node::shutdown` returns once the final backups are written and their
/// locks released: a node on the same backup path starts right after, in
/// the same process, while the old node and its store handles are still
/// held, and finds the state. The old handles refuse dispatches.
#[testkit::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarts_on_its_backup_right_after_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
        id = "restart"
        [[listen]]
        url = "tcp://127.0.0.1:0"
        [[store]]
        name = "counter"
        reducer = "counter"
        logins = {{ app = "{}" }}
        [store.backup]
        path = "counter.backup"
        "#,
        phc("pw")
    );
    let mut old = Vec::new();
    for round in 0..3 {
        let config = NodeConfig::parse(&text, dir.path()).unwrap();
        let node = tokio::time::timeout(T, Node::start(config))
            .await
            .expect("start")
            .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        let Some(HostedStore::Counter(s)) = node.store("counter") else {
            panic!("no counter store");
        };
        assert_eq!(s.seq(), 2 * round, "round {round}: state from the backup");
        for _ in 0..2 {
            tokio::time::timeout(T, s.dispatch(CounterAction::Add(1)))
                .await
                .unwrap()
                .unwrap();
        }
        tokio::time::timeout(T, node.shutdown())
            .await
            .expect("shutdown")
            .unwrap();
        assert!(matches!(
            s.dispatch(CounterAction::Add(1)).await,
            Err(store::DispatchError::Closed)
        ));
        old.push((node, s));
    }
    assert_eq!(old[2].1.seq(), 6);
}
