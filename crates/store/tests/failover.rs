//! A replica given several servers of the same history fails over between
//! them (round-robin, jittered backoff) and loses or doubles nothing.

mod common;

use std::time::Duration;

use replimesh_store::{Client, ClientConfig, ConnectError, Server, Store, StoreConfig};

use common::{server_config, until, Tally, T};

async fn serve(a: &Store<Tally>, url: &str) -> Server {
    let server = Server::new(server_config());
    server.add(a);
    // The previous listener on this path may still be going away.
    tokio::time::timeout(T, async {
        loop {
            match server.listen(url).await {
                Ok(_) => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await
    .expect("listening again");
    server
}

#[testkit::test]
async fn replica_fails_over_between_two_servers() {
    let dir = tempfile::tempdir().unwrap();
    let url1 = format!("unix://{}/one.sock", dir.path().display());
    let url2 = format!("unix://{}/two.sock", dir.path().display());
    let a = Store::authority(Tally, StoreConfig::default());
    let s1 = serve(&a, &url1).await;
    let s2 = serve(&a, &url2).await;

    let r = Store::replica(Tally, StoreConfig::default());
    let client = r
        .connect_any(&[&url1, &url2], "test1", "12345")
        .await
        .unwrap();
    assert_eq!(client.connected_url().as_deref(), Some(url1.as_str()));
    let mut expected = 0;
    for i in 1..=20 {
        r.dispatch(i).await.unwrap();
        expected += i;
    }

    // Server one goes away with dispatches in flight: the replica moves to two.
    let pending: Vec<_> = (21..=40).map(|i| r.try_dispatch(&i).unwrap()).collect();
    expected += (21..=40).sum::<u64>();
    drop(s1);
    for p in pending {
        tokio::time::timeout(T, p).await.unwrap().unwrap();
    }
    until("the replica on server two", || {
        client.connected_url().as_deref() == Some(url2.as_str())
    })
    .await;
    assert!(client.reconnects() >= 1);

    // And back to one when two goes away.
    let _s1 = serve(&a, &url1).await;
    drop(s2);
    until("the replica back on server one", || {
        client.connected_url().as_deref() == Some(url1.as_str())
    })
    .await;
    for i in 41..=50 {
        r.dispatch(i).await.unwrap();
        expected += i;
    }
    tokio::time::timeout(T, r.wait_for(a.seq())).await.unwrap();
    // Every dispatch applied exactly once, everywhere.
    assert_eq!(a.state().count, 50);
    assert_eq!(a.state().sum, expected);
    assert_eq!(*r.state(), *a.state());
}

#[testkit::test]
async fn connect_any_skips_dead_servers_and_reports_the_telling_error() {
    let dir = tempfile::tempdir().unwrap();
    let dead = format!("unix://{}/dead.sock", dir.path().display());
    let live = format!("unix://{}/live.sock", dir.path().display());
    let a = Store::authority(Tally, StoreConfig::default());
    let _s = serve(&a, &live).await;

    let r = Store::replica(Tally, StoreConfig::default());
    let client = r
        .connect_any(&[&dead, &live], "test1", "12345")
        .await
        .unwrap();
    assert_eq!(client.connected_url().as_deref(), Some(live.as_str()));
    r.dispatch(7).await.unwrap();
    assert_eq!(a.state().sum, 7);

    // Every server fails: the login refusal, not the dead socket, is reported.
    let err = Client::connect_any(&[&dead, &live], ClientConfig::new("test1", "wrong"))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::AuthFailed(_)), "{err}");
    let none: [&str; 0] = [];
    assert!(matches!(
        Client::connect_any(&none, ClientConfig::new("test1", "12345")).await,
        Err(ConnectError::NoUrl)
    ));
}
