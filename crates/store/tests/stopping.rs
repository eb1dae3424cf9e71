//! How the store's handles stop: `Store`, `Server` and `Client` stop when
//! their last handle is dropped, and `shutdown().await` returns only once
//! they have stopped (listeners closed, connections closed with a reason,
//! tasks ended, a persistent authority's backup written and unlocked).

mod common;

use std::time::Duration;

use proto::frame::Body;
use proto::CloseCode;
use replimesh_store::{
    BackupPersistence, Client, ClientConfig, DispatchError, Server, Store, StoreConfig,
};
use tokio::net::UnixListener;

use common::{backup_config, counter, open, raw_login, server_config, until, Act, Counter, T};

/// Logs in on `url` with a raw connection; returns it once welcomed.
async fn welcomed(url: &str) -> (transport::Sender, transport::Receiver) {
    let (tx, mut rx) = raw_login(url).await;
    let f = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap();
    assert!(matches!(f.body, Some(Body::Welcome(_))), "{f:?}");
    (tx, rx)
}

/// Waits (bounded by [`T`]) for the end of a raw connection; returns its
/// close code (`None`: it ended without a `Close` frame).
async fn close_code(rx: &mut transport::Receiver) -> Option<u32> {
    loop {
        match tokio::time::timeout(T, rx.recv()).await {
            Err(_) => panic!("the connection was not closed within {T:?}"),
            Ok(Ok(_)) => continue,
            Ok(Err(transport::RecvError::Closed { code, .. })) => return Some(code),
            Ok(Err(_)) => return None,
        }
    }
}

/// Whether a TCP connection to the `tcp://` URL `url` is refused.
fn refused(url: &str) -> bool {
    std::net::TcpStream::connect(url.trim_start_matches("tcp://")).is_err()
}

/// A replica of `authority`'s [`counter`] store over `url`, with fast
/// reconnection.
async fn replica(url: &str) -> (Store<Counter>, Client) {
    let r = Store::replica(counter(), StoreConfig::default());
    let mut cc = ClientConfig::new("test1", "12345");
    cc.reconnect_min = Duration::from_millis(5);
    cc.reconnect_max = Duration::from_millis(20);
    let c = tokio::time::timeout(T, r.connect_with(url, cc))
        .await
        .unwrap()
        .unwrap();
    (r, c)
}

#[testkit::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_server_closes_its_listener_and_its_connections() {
    let a = Store::authority(counter(), StoreConfig::default());
    let server = Server::new(server_config());
    server.add(&a);
    let url = tokio::time::timeout(T, server.listen("tcp://127.0.0.1:0"))
        .await
        .unwrap()
        .unwrap();
    let (_tx, mut raw) = welcomed(&url).await;
    let (r, client) = replica(&url).await;
    tokio::time::timeout(T, r.dispatch(Act::Add(1)))
        .await
        .unwrap()
        .unwrap();
    assert!(!refused(&url), "the listener is open");

    drop(server);
    assert_eq!(
        close_code(&mut raw).await,
        Some(CloseCode::GoingAway as u32)
    );
    until("the replica's link to go down", || !client.connected()).await;
    until("the listener to close", || refused(&url)).await;
    // The store goes on without the server.
    tokio::time::timeout(T, a.dispatch(Act::Add(2)))
        .await
        .unwrap()
        .unwrap();
}

#[testkit::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_returns_once_listeners_and_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let a = Store::authority(counter(), StoreConfig::default());
    let server = Server::new(server_config());
    server.add(&a);
    let tcp = server.listen("tcp://127.0.0.1:0").await.unwrap();
    let unix = format!("unix://{}", sock.display());
    server.listen(&unix).await.unwrap();
    let (_t1, mut raw_tcp) = welcomed(&tcp).await;
    let (_t2, mut raw_unix) = welcomed(&unix).await;

    tokio::time::timeout(T, server.shutdown())
        .await
        .expect("shutdown did not return");
    // Checked at once, without polling.
    assert!(refused(&tcp), "the tcp listener is still open");
    assert!(!sock.exists(), "the unix socket file is still there");
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_err());
    assert_eq!(
        close_code(&mut raw_tcp).await,
        Some(CloseCode::GoingAway as u32)
    );
    assert_eq!(
        close_code(&mut raw_unix).await,
        Some(CloseCode::GoingAway as u32)
    );
    // Again: returns at once.
    tokio::time::timeout(Duration::from_secs(1), server.shutdown())
        .await
        .expect("a second shutdown did not return");
}

#[testkit::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_store_stops_its_servers_and_unlocks_its_backup() {
    let dir = tempfile::tempdir().unwrap();
    let config = backup_config(&dir.path().join("counter.backup"));
    let a =
        Store::authority_with_persistence(counter(), StoreConfig::default(), open(&config).await)
            .unwrap();
    // The server is kept: the store's last handle is what stops it.
    let server = a.serve("tcp://127.0.0.1:0", server_config()).await.unwrap();
    let url = server.urls()[0].clone();
    let (_tx, mut raw) = welcomed(&url).await;
    let (r, client) = replica(&url).await;
    for i in 1..=5 {
        tokio::time::timeout(T, r.dispatch(Act::Add(i)))
            .await
            .unwrap()
            .unwrap();
    }
    let a2 = a.clone();
    drop(a);
    // One handle left: still serving.
    assert!(!refused(&url));
    tokio::time::timeout(T, r.dispatch(Act::Add(6)))
        .await
        .unwrap()
        .unwrap();
    drop(a2);

    assert_eq!(
        close_code(&mut raw).await,
        Some(CloseCode::GoingAway as u32)
    );
    until("the replica's link to go down", || !client.connected()).await;
    until("the listener to close", || refused(&url)).await;
    // The journal thread lets go of the backup by itself; everything
    // committed is in it.
    let deadline = tokio::time::Instant::now() + T;
    let p = loop {
        match BackupPersistence::open(config.clone(), "counter", 1) {
            Ok(p) => break p,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert!(e.0.contains("in use by another"), "{e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("the backup stayed locked: {e}"),
        }
    };
    let b =
        Store::authority_with_persistence(counter(), StoreConfig::default(), Box::new(p)).unwrap();
    assert_eq!((b.seq(), b.state().total), (6, 21));
    drop(server);
}

#[testkit::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_shutdown_returns_once_stopped_and_its_backup_unlocked() {
    let dir = tempfile::tempdir().unwrap();
    let config = backup_config(&dir.path().join("counter.backup"));
    let sock = dir.path().join("a.sock");
    for round in 0..3u64 {
        let a = Store::authority_with_persistence(
            counter(),
            StoreConfig::default(),
            // Opened at once: the previous round's shutdown released it.
            Box::new(BackupPersistence::open(config.clone(), "counter", 1).unwrap()),
        )
        .unwrap();
        assert_eq!(a.seq(), 3 * round, "round {round}");
        let tcp_server = a.serve("tcp://127.0.0.1:0", server_config()).await.unwrap();
        let tcp = tcp_server.urls()[0].clone();
        let unix = format!("unix://{}", sock.display());
        let _unix_server = a.serve(&unix, server_config()).await.unwrap();
        let (_tx, mut raw) = welcomed(&tcp).await;
        let (r, client) = replica(&unix).await;
        for i in 0..3 {
            tokio::time::timeout(T, r.dispatch(Act::Add(i)))
                .await
                .unwrap()
                .unwrap();
        }

        tokio::time::timeout(T, a.shutdown())
            .await
            .expect("shutdown did not return");
        // Checked at once, without polling.
        assert!(refused(&tcp), "round {round}: the tcp listener is open");
        assert!(!sock.exists(), "round {round}: the socket file is there");
        assert!(matches!(
            a.dispatch(Act::Add(100)).await,
            Err(DispatchError::Closed)
        ));
        assert_eq!(
            close_code(&mut raw).await,
            Some(CloseCode::GoingAway as u32)
        );
        until("the replica's link to go down", || !client.connected()).await;
        // Again, from another handle: returns at once.
        tokio::time::timeout(Duration::from_secs(1), a.clone().shutdown())
            .await
            .expect("a second shutdown did not return");
    }
}

/// Dials `listener`'s connections and closes each at once (a server that
/// is down but still has its address); counts them.
fn count_dials(listener: UnixListener) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let n = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = n.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    n
}

/// A replica linked over the Unix socket `sock` to a server that is then
/// shut down; its address then only counts the replica's dials.
async fn dialing_replica(
    sock: &std::path::Path,
) -> (
    Store<Counter>,
    Client,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let a = Store::authority(counter(), StoreConfig::default());
    let url = format!("unix://{}", sock.display());
    let server = a.serve(&url, server_config()).await.unwrap();
    let (r, client) = replica(&url).await;
    tokio::time::timeout(T, server.shutdown()).await.unwrap();
    let dials = count_dials(UnixListener::bind(sock).unwrap());
    until("the replica to dial again", || {
        dials.load(std::sync::atomic::Ordering::SeqCst) >= 3
    })
    .await;
    (r, client, dials)
}

#[testkit::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_client_stops_reconnecting() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (r, client, dials) = dialing_replica(&dir.path().join("s.sock")).await;
    let clone = client.clone();
    drop(client);
    // One handle left: still dialling.
    let before = dials.load(Ordering::SeqCst);
    until("another dial", || dials.load(Ordering::SeqCst) > before).await;
    drop(clone);
    // A dial under way may still land; then none (it dialled every 20 ms
    // at most before).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_drop = dials.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        dials.load(Ordering::SeqCst),
        after_drop,
        "the dropped client still dials"
    );
    // The replica keeps its dispatch for a later link.
    assert!(r.try_dispatch(&Act::Add(1)).is_ok());
}

#[testkit::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_shutdown_returns_once_it_has_stopped_dialling() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (_r, client, dials) = dialing_replica(&dir.path().join("s.sock")).await;
    tokio::time::timeout(T, client.shutdown())
        .await
        .expect("shutdown did not return");
    // Every dial that was made is in the listener's queue now: let the
    // counter take them, then there is no other.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = dials.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        dials.load(Ordering::SeqCst),
        after,
        "dialling after shutdown"
    );
    assert!(matches!(
        tokio::time::timeout(T, client.closed()).await.unwrap(),
        replimesh_store::ConnectError::Shutdown
    ));
    tokio::time::timeout(Duration::from_secs(1), client.shutdown())
        .await
        .expect("a second shutdown did not return");
}

/// A replica's dispatches that wait for their commit fail with `Closed`
/// when it stops (they used to wait for ever).
#[testkit::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_fails_its_waiting_dispatches() {
    let dir = tempfile::tempdir().unwrap();
    let (r, _client, _dials) = dialing_replica(&dir.path().join("s.sock")).await;
    let pending = r.try_dispatch(&Act::Add(1)).unwrap();
    tokio::time::timeout(T, r.shutdown())
        .await
        .expect("shutdown did not return");
    assert!(matches!(
        tokio::time::timeout(T, pending).await.unwrap(),
        Err(DispatchError::Closed)
    ));
    assert!(matches!(
        r.try_dispatch(&Act::Add(2)),
        Err(DispatchError::Closed)
    ));
}
