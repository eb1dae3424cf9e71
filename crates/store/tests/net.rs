//! The store runtime over real sockets.

mod common;

use std::time::Duration;

use proto::frame::Body;
use proto::Frame;
use replimesh_store::{
    hash_password, Client, ClientConfig, ConnectError, DispatchError, ErrorCode, Role,
    ServerConfig, Store, StoreConfig, SyncMode,
};

use common::{
    backup_config, counter, logins, open, raw_login, server_config, settle, snapshot_reaches,
    until, Act, Counter, CHEAP, T,
};

fn tls_transport() -> transport::Config {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert_pem = cert.cert.pem();
    let key_pem = cert.signing_key.serialize_pem();
    let mut config = transport::Config::default();
    config.tls = transport::TlsConfig {
        server: Some(
            transport::TlsConfig::server_from_pem(cert_pem.as_bytes(), key_pem.as_bytes()).unwrap(),
        ),
        client: Some(transport::TlsConfig::client_from_pem(cert_pem.as_bytes()).unwrap()),
    };
    config
}

async fn replicate_over(url: &str, tcfg: transport::Config) {
    let authority = Store::authority(counter(), StoreConfig::default());
    let mut sc = server_config();
    sc.transport = tcfg.clone();
    let server = authority.serve(url, sc).await.unwrap();
    // The real URL (port 0 picked by the OS).
    let url = server.urls()[0].clone();
    let mut reps = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let r = Store::replica(counter(), StoreConfig::default());
        let mut cc = ClientConfig::new("test1", "12345");
        cc.transport = tcfg.clone();
        clients.push(r.connect_with(&url, cc).await.unwrap());
        reps.push(r);
    }
    let mut sub = reps[1].subscribe();
    for i in 0..50 {
        authority.dispatch(Act::Add(i)).await.unwrap();
        let seq = reps[0].dispatch(Act::Add(100 + i)).await.unwrap();
        assert!(reps[0].state().count >= seq, "resolved before applied");
        reps[1].try_dispatch(&Act::Add(-i)).unwrap();
    }
    let pending = reps[1].dispatch(Act::Add(7)).await.unwrap();
    assert!(pending > 0);
    settle(&[&reps[0], &reps[1]], &authority).await;
    let a = authority.state().clone();
    assert_eq!(a.count, 151);
    for r in &reps {
        assert_eq!(*r.state(), a);
        assert!(r.connected());
        assert_eq!(r.history_id(), authority.history_id());
    }
    let changed = tokio::time::timeout(T, sub.next()).await.unwrap().unwrap();
    assert!(changed > 0);
    assert!(reps[0].role().contains(&Role::Client));
    assert!(authority.role().contains(&Role::Server));
    assert!(authority.role().contains(&Role::Authority));
}

#[testkit::test]
async fn replicates_over_unix() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/s.sock", dir.path().display());
    replicate_over(&url, transport::Config::default()).await;
}

#[testkit::test]
async fn replicates_over_tcp() {
    replicate_over("tcp://127.0.0.1:0", transport::Config::default()).await;
}

#[testkit::test]
async fn replicates_over_ws() {
    replicate_over("ws://127.0.0.1:0/store", transport::Config::default()).await;
}

#[testkit::test]
async fn replicates_over_tls() {
    replicate_over("tls://127.0.0.1:0", tls_transport()).await;
}

#[testkit::test]
async fn replicates_over_wss() {
    replicate_over("wss://127.0.0.1:0/store", tls_transport()).await;
}

#[testkit::test]
async fn logins_right_and_wrong_and_phc() {
    let authority = Store::authority(counter(), StoreConfig::default());
    let mut l = logins();
    let phc = hash_password("s3cret", CHEAP).unwrap();
    assert!(phc.starts_with("$argon2id$"));
    l.add_config("hashed", &phc).unwrap();
    assert!(l.add_hash("bad", "plaintext").is_err());
    let server = authority
        .serve("tcp://127.0.0.1:0", ServerConfig::with_logins(l))
        .await
        .unwrap();
    let url = server.urls()[0].clone();
    let r = Store::replica(counter(), StoreConfig::default());
    match r.connect(&url, "test1", "wrong").await {
        Err(ConnectError::AuthFailed(_)) => {}
        other => panic!("expected AuthFailed, got {other:?}"),
    }
    match r.connect(&url, "nobody", "12345").await {
        Err(ConnectError::AuthFailed(_)) => {}
        other => panic!("expected AuthFailed, got {other:?}"),
    }
    let _c1 = r.connect(&url, "hashed", "s3cret").await.unwrap();
    r.dispatch(Act::Add(1)).await.unwrap();
    let r2 = Store::replica(counter(), StoreConfig::default());
    let _c2 = r2.connect(&url, "test1", "12345").await.unwrap();
    settle(&[&r2], &authority).await;
    assert_eq!(r2.state().total, 1);
}

#[testkit::test]
async fn ban_after_five_failures_expires_and_success_resets() {
    let authority = Store::authority(counter(), StoreConfig::default());
    let mut sc = server_config();
    sc.ban_duration = Duration::from_millis(600);
    let server = authority.serve("tcp://127.0.0.1:0", sc).await.unwrap();
    let url = server.urls()[0].clone();
    let r = Store::replica(counter(), StoreConfig::default());
    // Four failures, a success (resets the count), four more: not banned.
    for _ in 0..4 {
        assert!(matches!(
            r.connect(&url, "test1", "bad").await,
            Err(ConnectError::AuthFailed(_))
        ));
    }
    drop(r.connect(&url, "test1", "12345").await.unwrap());
    for _ in 0..4 {
        assert!(matches!(
            r.connect(&url, "test1", "bad").await,
            Err(ConnectError::AuthFailed(_))
        ));
    }
    // The fifth consecutive failure bans the address...
    assert!(matches!(
        r.connect(&url, "test1", "bad").await,
        Err(ConnectError::Banned(_))
    ));
    // ...even for the right password...
    let r2 = Store::replica(counter(), StoreConfig::default());
    assert!(matches!(
        r2.connect(&url, "test1", "12345").await,
        Err(ConnectError::Banned(_))
    ));
    // ...until the ban expires.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _c = r2.connect(&url, "test1", "12345").await.unwrap();
    r2.dispatch(Act::Add(3)).await.unwrap();
}

#[testkit::test]
async fn auth_timeout_closes_silent_connections() {
    let authority = Store::authority(counter(), StoreConfig::default());
    let mut sc = server_config();
    sc.auth_timeout = Duration::from_millis(200);
    let server = authority.serve("tcp://127.0.0.1:0", sc).await.unwrap();
    let url = server.urls()[0].clone();
    let mut conn = transport::connect(&url, &transport::Config::default())
        .await
        .unwrap();
    match tokio::time::timeout(T, conn.recv()).await.unwrap() {
        Err(transport::RecvError::Closed { code, .. }) => {
            assert_eq!(code, proto::CloseCode::Timeout as u32)
        }
        other => panic!("expected a timeout close, got {other:?}"),
    }
}

#[testkit::test]
async fn several_stores_one_connection_and_clear_errors() {
    let a = Store::authority(counter(), StoreConfig::default());
    let b = Store::authority(
        Counter {
            name: "other",
            schema: 3,
        },
        StoreConfig::default().mode(SyncMode::Digest).resync(10),
    );
    let server = replimesh_store::Server::new(server_config());
    server.add(&a).add(&b);
    let url = server.listen("tcp://127.0.0.1:0").await.unwrap();
    let client = Client::connect(&url, ClientConfig::new("test1", "12345"))
        .await
        .unwrap();
    let ra = Store::replica(counter(), StoreConfig::default());
    let rb = Store::replica(
        Counter {
            name: "other",
            schema: 3,
        },
        StoreConfig::default(),
    );
    client.attach(&ra).await.unwrap();
    client.attach(&rb).await.unwrap();
    for i in 0..25 {
        ra.dispatch(Act::Add(i)).await.unwrap();
        rb.dispatch(Act::Add(2 * i)).await.unwrap();
    }
    settle(&[&ra], &a).await;
    settle(&[&rb], &b).await;
    assert_eq!(*ra.state(), *a.state());
    assert_eq!(*rb.state(), *b.state());
    assert_eq!(b.state().total, 600);

    // Unknown store and wrong schema: an error to that caller only.
    let unknown = Store::replica(
        Counter {
            name: "nope",
            schema: 1,
        },
        StoreConfig::default(),
    );
    match client.attach(&unknown).await {
        Err(ConnectError::Refused(e)) => assert_eq!(e.code, ErrorCode::UnknownStore),
        other => panic!("expected refusal, got {other:?}"),
    }
    let wrong = Store::replica(
        Counter {
            name: "other",
            schema: 4,
        },
        StoreConfig::default(),
    );
    let c2 = Client::connect(&url, ClientConfig::new("test1", "12345"))
        .await
        .unwrap();
    match c2.attach(&wrong).await {
        Err(ConnectError::Refused(e)) => {
            assert_eq!(e.code, ErrorCode::SchemaMismatch);
            assert!(
                e.message.contains('4') && e.message.contains('3'),
                "{}",
                e.message
            );
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    match wrong.dispatch(Act::Add(1)).await {
        Err(DispatchError::Rejected(_)) | Err(DispatchError::OutboxFull { .. }) => {}
        Ok(_) => panic!("a refused replica must not commit"),
        Err(e) => panic!("unexpected {e}"),
    }
    // The others still work.
    ra.dispatch(Act::Add(1)).await.unwrap();

    // An undecodable action: an error to its sender; the authority goes on.
    let (tx, mut rx) = raw_login(&url).await;
    assert!(matches!(
        rx.recv().await.unwrap().body,
        Some(Body::Welcome(_))
    ));
    tx.send(&Frame::new(Body::StoreHello(proto::StoreHello {
        store: "counter".into(),
        schema: 1,
        client_id: "raw".into(),
        ..Default::default()
    })))
    .unwrap();
    tx.send(&Frame::new(Body::Dispatch(proto::Dispatch {
        store: "counter".into(),
        op_id: 1,
        action: bytes::Bytes::from_static(&[0xff, 0xff, 0xff]),
        more: vec![],
        client_id: String::new(),
    })))
    .unwrap();
    let err = loop {
        let f = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
        if let Some(Body::StoreError(e)) = f.body {
            break e;
        }
    };
    assert_eq!(err.op_id, 1);
    assert_eq!(err.error.unwrap().code, ErrorCode::BadAction.as_u32());
    let seq = ra.dispatch(Act::Add(1)).await.unwrap();
    assert_eq!(seq, a.seq());
}

#[testkit::test]
async fn outbox_survives_server_restart_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("unix://{}/s.sock", dir.path().display());
    let authority = Store::authority(counter(), StoreConfig::default());
    let server = authority.serve(&url, server_config()).await.unwrap();
    let r = Store::replica(counter(), StoreConfig::default());
    let client = r.connect(&url, "test1", "12345").await.unwrap();
    r.dispatch(Act::Add(1)).await.unwrap();
    drop(server);
    until("the replica to see the link go down", || {
        !client.connected()
    })
    .await;
    // Dispatched while disconnected: waits in the outbox.
    let pending: Vec<_> = (0..10)
        .map(|i| r.try_dispatch(&Act::Add(10 + i)).unwrap())
        .collect();
    assert!(!r.connected());
    let _server = authority.serve(&url, server_config()).await.unwrap();
    for p in pending {
        tokio::time::timeout(T, p).await.unwrap().unwrap();
    }
    settle(&[&r], &authority).await;
    assert_eq!(authority.state().count, 11);
    assert_eq!(*r.state(), *authority.state());
}

#[testkit::test]
async fn outbox_full_is_an_error() {
    let r = Store::replica(counter(), StoreConfig::default().max_pending(3));
    for i in 0..3 {
        r.try_dispatch(&Act::Add(i)).unwrap();
    }
    match r.try_dispatch(&Act::Add(9)) {
        Err(DispatchError::OutboxFull { pending, limit }) => assert_eq!((pending, limit), (3, 3)),
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("a full outbox accepted a dispatch"),
    }
}

#[testkit::test]
async fn relay_replicas_see_the_same_history() {
    let dir = tempfile::tempdir().unwrap();
    let up = format!("unix://{}/up.sock", dir.path().display());
    let down = format!("unix://{}/down.sock", dir.path().display());
    let authority = Store::authority(counter(), StoreConfig::default().resync(7));
    let _s1 = authority.serve(&up, server_config()).await.unwrap();
    let relay = Store::replica(counter(), StoreConfig::default());
    let _c1 = relay.connect(&up, "test1", "12345").await.unwrap();
    let _s2 = relay.serve(&down, server_config()).await.unwrap();
    let mut leaves = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let l = Store::replica(counter(), StoreConfig::default());
        clients.push(l.connect(&down, "test1", "12345").await.unwrap());
        leaves.push(l);
    }
    for i in 0..30 {
        authority.dispatch(Act::Add(i)).await.unwrap();
        let seq = leaves[0].dispatch(Act::Add(1000 + i)).await.unwrap();
        assert!(leaves[0].state().count >= seq, "resolved before applied");
        relay.dispatch(Act::Add(-i)).await.unwrap();
    }
    settle(&[&relay, &leaves[0], &leaves[1]], &authority).await;
    let a = authority.state().clone();
    assert_eq!(a.count, 90);
    assert_eq!(*relay.state(), a);
    for l in &leaves {
        assert_eq!(*l.state(), a);
        assert_eq!(l.history_id(), authority.history_id());
    }
    assert!(relay.role().contains(&Role::Server));
    assert!(relay.role().contains(&Role::Replica));
}

#[testkit::test]
async fn persistence_restores_history() {
    let mem = replimesh_store::MemoryPersistence::new();
    let a = Store::authority_with_persistence(
        counter(),
        StoreConfig::default().resync(4),
        Box::new(mem.clone()),
    )
    .unwrap();
    for i in 0..10 {
        a.dispatch(Act::Add(i)).await.unwrap();
    }
    let before = a.state().clone();
    let history = a.history_id();
    drop(a);
    let b = Store::authority_with_persistence(counter(), StoreConfig::default(), Box::new(mem))
        .unwrap();
    assert_eq!(*b.state(), before);
    assert_eq!(b.seq(), 10);
    assert_eq!(b.history_id(), history);
}

#[testkit::test]
async fn encrypted_backup_restores_history() {
    let dir = tempfile::tempdir().unwrap();
    let config = backup_config(&dir.path().join("counter.backup")).count(5);
    let a =
        Store::authority_with_persistence(counter(), StoreConfig::default(), open(&config).await)
            .unwrap();
    let r = Store::replica(counter(), StoreConfig::default());
    let server = a.serve("tcp://127.0.0.1:0", server_config()).await.unwrap();
    let url = server.urls()[0].clone();
    let _c = r.connect(&url, "test1", "12345").await.unwrap();
    for i in 0..12 {
        r.dispatch(Act::Add(i)).await.unwrap();
    }
    let before = a.state().clone();
    let history = a.history_id();
    // Without a clean shutdown (crash): snapshot + journal.
    drop(server);
    drop(a);
    let b =
        Store::authority_with_persistence(counter(), StoreConfig::default(), open(&config).await)
            .unwrap();
    assert_eq!(*b.state(), before);
    assert_eq!((b.seq(), b.history_id()), (12, history));
    b.dispatch(Act::Add(100)).await.unwrap();
    b.shutdown().await;
    drop(b);
    let c =
        Store::authority_with_persistence(counter(), StoreConfig::default(), open(&config).await)
            .unwrap();
    assert_eq!(c.seq(), 13);
    assert_eq!(c.state().total, before.total + 100);
    // Another store's backup is refused.
    assert!(replimesh_store::BackupPersistence::open(config, "other", 1).is_err());
}

#[testkit::test]
async fn backup_timeout_policy_snapshots_after_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("counter.backup");
    let config = backup::BackupConfig::new(&path)
        .journal(backup::FsyncPolicy::Never)
        .kdf(backup::KdfParams::insecure_fast())
        .timeout(Duration::from_millis(50));
    let p = replimesh_store::BackupPersistence::open(config, "counter", 1).unwrap();
    let a =
        Store::authority_with_persistence(counter(), StoreConfig::default(), Box::new(p)).unwrap();
    for i in 0..3 {
        a.dispatch(Act::Add(i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    a.dispatch(Act::Add(10)).await.unwrap();
    // The snapshot is written in the background: wait for it (bounded).
    let seq = snapshot_reaches(&path, 3).await;
    assert!(
        seq >= 3,
        "no snapshot after the timeout (snapshot seq {seq})"
    );
}
