//! The examples of the migration guides (`docs/migrating-from-jrf-ws.md`,
//! `docs/migrating-from-redux-cluster.md`) under `examples/migrating/`:
//! every config parses, the jrf-ws-3 four-clone example runs as the seed
//! describes it (clone1, clone2 and clone4 first, then clone3), a group
//! message crosses the mesh, and the guides' Rust snippets run against the
//! nodes (the redux-cluster counter keeps its state across a restart).
//!
//! The listeners are moved to `127.0.0.1:0` (ports from the OS) and the
//! peers pointed at the bound URLs; nothing else of the files is changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use replimesh::mesh::{self, Flow, Groups, RouteError};
use replimesh::store::{self, Reducer, Store, StoreConfig};
use replimesh_cli::config::{NodeConfig, ReducerKind};
use replimesh_cli::node::Node;
use serde::{Deserialize, Serialize};

/// Deadline of every wait on the network.
const T: Duration = Duration::from_secs(30);

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/migrating")
}

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            toml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
}

/// `scheme://host:port/rest` -> `scheme://127.0.0.1:0/rest`.
fn port_zero(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let (hostport, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    assert!(hostport.contains(':'), "{url}: no port");
    format!("{scheme}://127.0.0.1:0{path}")
}

/// An example config with its listeners on port 0 and no admin port.
fn load(path: &Path) -> NodeConfig {
    let mut c = NodeConfig::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for l in &mut c.listen {
        l.url = port_zero(&l.url);
    }
    c.url = None;
    c.admin = None;
    c
}

/// A cheap Argon2id PHC string: plain passwords in a config are hashed with
/// the production cost, which unoptimized test builds pay at every login.
fn phc(password: &str) -> String {
    let cost = store::HashCost {
        memory_kib: 64,
        iterations: 1,
        parallelism: 1,
    };
    store::hash_password(password, cost).unwrap()
}

async fn linked(node: &Node) -> Vec<String> {
    let clones = tokio::time::timeout(T, node.mesh().clones())
        .await
        .expect("clones() timed out")
        .expect("mesh stopped");
    let mut ids: Vec<String> = clones
        .into_iter()
        .filter(|c| c.linked)
        .map(|c| c.id)
        .collect();
    ids.sort();
    ids
}

/// Waits until each node of `nodes` is linked to exactly the others.
async fn wait_full_mesh(nodes: &BTreeMap<String, Node>) {
    let check = async {
        loop {
            let mut done = true;
            for (id, n) in nodes {
                let want: Vec<String> = nodes.keys().filter(|k| *k != id).cloned().collect();
                done &= linked(n).await == want;
            }
            if done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(T, check).await.is_err() {
        let mut seen = Vec::new();
        for (id, n) in nodes {
            seen.push(format!("{id}: {:?}", linked(n).await));
        }
        panic!("no full mesh of {:?}: {seen:?}", nodes.keys());
    }
}

#[test]
fn every_example_config_parses() {
    let mut files = Vec::new();
    toml_files(&examples(), &mut files);
    assert!(files.len() >= 5, "examples missing: {files:?}");
    for f in &files {
        NodeConfig::load(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }

    // What the guides say the files hold.
    let jrf = examples().join("jrf-ws");
    let peers = |i: u32| -> Vec<(String, String)> {
        NodeConfig::load(&jrf.join(format!("clone{i}.toml")))
            .unwrap()
            .peers
            .into_iter()
            .map(|p| (p.id, p.url))
            .collect()
    };
    assert_eq!(
        peers(1),
        [
            ("clone2".into(), "ws://127.0.0.1:4002/".into()),
            ("clone4".into(), "ws://127.0.0.1:4004/".into())
        ]
    );
    assert!(peers(2).is_empty() && peers(4).is_empty());
    assert_eq!(peers(3), [("clone4".into(), "ws://127.0.0.1:4004/".into())]);
    for i in 1..=4 {
        let c = NodeConfig::load(&jrf.join(format!("clone{i}.toml"))).unwrap();
        assert_eq!(c.id, format!("clone{i}"));
        assert_eq!(c.token.as_deref(), Some("token"));
        assert_eq!(c.listen[0].url, format!("ws://127.0.0.1:400{i}/"));
    }

    let c = NodeConfig::load(&examples().join("redux-cluster/counter.toml")).unwrap();
    let s = &c.stores[0];
    assert_eq!(
        (s.name.as_str(), s.reducer.clone()),
        ("counter", ReducerKind::Counter)
    );
    assert_eq!(s.resync, 1000);
    assert_eq!(s.logins["test1"], "12345");
    let b = s.backup.as_ref().expect("the counter has a backup");
    assert_eq!(b.every, 1000);
    assert!(b.key_file.is_some());
    let urls: Vec<&str> = c.listen.iter().map(|l| l.url.as_str()).collect();
    assert_eq!(urls, ["tcp://127.0.0.1:10001", "ws://127.0.0.1:10002/"]);
}

/// The seed's scenario: clone1 adds clone2 and clone4, and clone1, clone2
/// and clone4 know each other while clone3 knows nobody; clone3 adds clone4,
/// and all four know all. Then a group message published on clone1 (by a
/// client, and by the server itself) reaches a subscriber on clone3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jrf_ws_four_clones_run() {
    let dir = examples().join("jrf-ws");
    let mut bound: BTreeMap<String, String> = BTreeMap::new();
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut start = async |i: u32, nodes: &mut BTreeMap<String, Node>| {
        let mut c = load(&dir.join(format!("clone{i}.toml")));
        for p in &mut c.peers {
            p.url = bound
                .get(&p.id)
                .unwrap_or_else(|| panic!("clone{i}'s peer {} is not started", p.id))
                .clone();
        }
        let node = tokio::time::timeout(T, Node::start(c))
            .await
            .expect("start timed out")
            .unwrap_or_else(|e| panic!("clone{i}: {e:#}"));
        bound.insert(node.id().to_owned(), node.urls()[0].clone());
        nodes.insert(node.id().to_owned(), node);
    };

    // clone2 and clone4 first (clone1's peers), then clone1.
    start(2, &mut nodes).await;
    start(4, &mut nodes).await;
    start(1, &mut nodes).await;
    wait_full_mesh(&nodes).await;
    // clone2 and clone4 learned each other from clone1.
    assert_eq!(linked(&nodes["clone2"]).await, ["clone1", "clone4"]);

    // clone3 adds clone4 only, and is linked with everybody.
    start(3, &mut nodes).await;
    wait_full_mesh(&nodes).await;
    assert_eq!(
        linked(&nodes["clone3"]).await,
        ["clone1", "clone2", "clone4"]
    );
    let status = nodes["clone3"].status();
    assert_eq!(status["id"], "clone3");

    // The guide's Rust client snippet: a subscriber on clone3 (clone4 as
    // its second URL), a publisher on clone1 (clone2 as its second URL).
    let url = |id: &str| bound[id].clone();
    let sub = mesh::Client::connect(mesh::ClientConfig::new([url("clone3"), url("clone4")]));
    let sub = tokio::time::timeout(T, sub).await.unwrap().unwrap();
    let mut inbox = sub.deliveries().expect("the first deliveries()");
    sub.subscribe(&["truckers"]).unwrap();
    let publisher = mesh::Client::connect(mesh::ClientConfig::new([url("clone1"), url("clone2")]));
    let publisher = tokio::time::timeout(T, publisher).await.unwrap().unwrap();

    // Interest reaches clone1 a moment after the subscribe: publish until
    // the first message arrives, then every later one arrives once, in order.
    let first = tokio::time::timeout(T, async {
        let mut n = 0u32;
        loop {
            n += 1;
            publisher
                .publish(
                    Groups::one("truckers"),
                    format!("hi guys {n}").into_bytes(),
                    false,
                )
                .unwrap();
            if let Ok(Some(d)) =
                tokio::time::timeout(Duration::from_millis(100), inbox.recv()).await
            {
                break d;
            }
        }
    })
    .await
    .expect("no group message reached clone3");
    assert_eq!(first.group, "truckers");
    assert_eq!(first.from.as_str(), publisher.id());
    let first_n: u32 = std::str::from_utf8(&first.data)
        .unwrap()
        .strip_prefix("hi guys ")
        .unwrap()
        .parse()
        .unwrap();
    publisher
        .publish(Groups::one("truckers"), &b"last from client"[..], false)
        .unwrap();
    let mut next = first_n + 1;
    let last = tokio::time::timeout(T, async {
        loop {
            let d = inbox.recv().await.expect("inbox ended");
            if d.data == b"last from client"[..] {
                break d;
            }
            assert_eq!(
                d.data,
                format!("hi guys {next}").into_bytes(),
                "lost or twice"
            );
            next += 1;
        }
    })
    .await
    .expect("the last message did not arrive");
    assert_eq!(last.group, "truckers");

    // The server publishes too (jrf-ws-3: server.groups.sendMes).
    nodes["clone1"]
        .mesh()
        .publish(Groups::one("truckers"), &b"from clone1 itself"[..], None)
        .unwrap();
    let d = tokio::time::timeout(T, inbox.recv())
        .await
        .expect("the server's message did not arrive")
        .expect("inbox ended");
    assert_eq!(d.data, b"from clone1 itself"[..]);

    // A request to the node's built-in `echo` route.
    let echo = tokio::time::timeout(T, publisher.request("echo", "", &b"ping"[..]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echo, b"ping"[..]);

    // The guide's clone of your own in Rust, joined to the four nodes.
    let clone5 = mesh::Server::start(
        mesh::ServerConfig::new("clone5", "ws://127.0.0.1:0/")
            .auth_in(|v| v == b"token")
            .auth_out(|_| Bytes::from_static(b"token")),
    );
    let clone5 = tokio::time::timeout(T, clone5).await.unwrap().unwrap();
    clone5.use_middleware(|ctx| async move {
        if ctx.route == "admin" {
            return Err(RouteError::new(403, "bad token"));
        }
        Ok(Flow::Next)
    });
    clone5.route("math", "add", |ctx| async move {
        let v: serde_json::Value =
            serde_json::from_slice(&ctx.data).map_err(|e| RouteError::new(400, e.to_string()))?;
        let sum = v["a"].as_i64().unwrap_or(0) + v["b"].as_i64().unwrap_or(0);
        Ok(Bytes::from(sum.to_string()))
    });
    tokio::time::timeout(T, clone5.add_clone("clone4", &url("clone4"), None))
        .await
        .unwrap()
        .unwrap();
    let five = tokio::time::timeout(T, async {
        loop {
            let mut ids: Vec<String> = clone5
                .clones()
                .await
                .unwrap()
                .into_iter()
                .filter(|c| c.linked)
                .map(|c| c.id)
                .collect();
            ids.sort();
            if ids == ["clone1", "clone2", "clone3", "clone4"] {
                return ids;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(five.is_ok(), "clone5 did not link to the four nodes");
    let c5 = mesh::Client::connect(mesh::ClientConfig::new([clone5.url()]));
    let c5 = tokio::time::timeout(T, c5).await.unwrap().unwrap();
    let sum = tokio::time::timeout(T, c5.request("math", "add", &br#"{"a":1,"b":2}"#[..]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sum, b"3"[..]);
    let refused = tokio::time::timeout(T, c5.request("admin", "x", Bytes::new()))
        .await
        .unwrap();
    assert!(
        matches!(refused, Err(mesh::MeshError::Remote { code: 403, .. })),
        "{refused:?}"
    );
    // Its client's group message reaches the subscriber on clone3.
    tokio::time::timeout(T, async {
        loop {
            c5.publish(Groups::one("truckers"), &b"from clone5"[..], false)
                .unwrap();
            if let Ok(Some(d)) =
                tokio::time::timeout(Duration::from_millis(100), inbox.recv()).await
            {
                if d.data == b"from clone5"[..] {
                    return;
                }
            }
        }
    })
    .await
    .expect("clone5's message did not reach clone3");
    c5.close();
    tokio::time::timeout(T, clone5.shutdown()).await.unwrap();

    sub.close();
    publisher.close();
    for (id, n) in &nodes {
        tokio::time::timeout(T, n.shutdown())
            .await
            .unwrap_or_else(|_| panic!("{id}: shutdown timed out"))
            .unwrap();
    }
}

// The guide's Rust reducer for the redux-cluster counter: the same name,
// schema (1) and action variants, in the same order, as the node's
// built-in "counter" reducer.
struct Counter;

#[derive(Debug, Serialize, Deserialize)]
enum CounterAction {
    Add(i64),
    Reset,
}

impl Reducer for Counter {
    type State = i64;
    type Action = CounterAction;
    fn name(&self) -> &str {
        "counter"
    }
    fn initial_state(&self) -> i64 {
        0
    }
    fn reduce(&self, state: &mut i64, action: &CounterAction) {
        match action {
            CounterAction::Add(n) => *state += n,
            CounterAction::Reset => *state = 0,
        }
    }
}

/// The redux-cluster counter: a Rust replica logs in as `test1`, dispatches,
/// and after a restart of the node the state is back from the backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redux_cluster_counter_runs_and_restores() {
    let tmp = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = load(&examples().join("redux-cluster/counter.toml"));
        let s = &mut c.stores[0];
        s.logins.insert("test1".into(), phc("12345"));
        let b = s.backup.as_mut().unwrap();
        b.path = tmp.path().join("counter.backup");
        b.kdf = Some((64, 1));
        c
    };

    let node = tokio::time::timeout(T, Node::start(config()))
        .await
        .unwrap()
        .unwrap();
    let url = node.urls()[0].clone();
    assert!(url.starts_with("tcp://127.0.0.1:"), "{url}");

    let replica = Store::replica(Counter, StoreConfig::default());
    let link = tokio::time::timeout(T, replica.connect(&url, "test1", "12345"))
        .await
        .unwrap()
        .unwrap();
    let mut seq = 0;
    for _ in 0..3 {
        seq = tokio::time::timeout(T, replica.dispatch(CounterAction::Add(1)))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(*replica.state(), 3);
    assert_eq!(seq, 3);
    // A wrong password is refused.
    let wrong = Store::replica(Counter, StoreConfig::default());
    let refused = tokio::time::timeout(T, wrong.connect(&url, "test1", "nope"))
        .await
        .unwrap();
    assert!(refused.is_err());

    tokio::time::timeout(T, link.shutdown()).await.unwrap();
    tokio::time::timeout(T, node.shutdown())
        .await
        .unwrap()
        .unwrap();

    // Boot at start-up: the same history, the same state. `shutdown`
    // released the backup's lock (one process per backup path), even with
    // the old node's handles still around.
    let old = node;
    let node = tokio::time::timeout(T, Node::start(config()))
        .await
        .unwrap()
        .unwrap();
    drop((old, link, replica, wrong));
    let hosted = node.store("counter").unwrap();
    assert_eq!(hosted.seq(), 3);
    assert_eq!(hosted.state_json(), serde_json::json!(3));
    tokio::time::timeout(T, node.shutdown())
        .await
        .unwrap()
        .unwrap();
}

/// The guide's Rust authority for the counter: backup, two servers, a
/// replica; after a restart from the backup the state is there again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redux_cluster_rust_authority_restores() {
    use replimesh::backup::{BackupConfig, FsyncPolicy, KdfParams};
    use replimesh::store::{BackupPersistence, Logins, ServerConfig, SyncMode};

    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("counter.backup");
    // As in the guide, with a cheap key derivation for the unoptimized build.
    let open = || {
        let backup = BackupConfig::new(&path)
            .key("password-for-encrypter")
            .count(1000)
            .timeout(Duration::from_secs(5))
            .journal(FsyncPolicy::Always)
            .kdf(KdfParams {
                m_cost_kib: 64,
                t_cost: 1,
                p_cost: 1,
            });
        let persistence = BackupPersistence::open(backup, "counter", 1).unwrap();
        let config = StoreConfig::default().mode(SyncMode::Action).resync(1000);
        Store::authority_with_persistence(Counter, config, Box::new(persistence)).unwrap()
    };

    let authority = open();
    let mut logins = Logins::new();
    logins.add_hash("test1", &phc("12345")).unwrap();
    let tcp = authority.serve(
        "tcp://127.0.0.1:0",
        ServerConfig::with_logins(logins.clone()),
    );
    let tcp = tokio::time::timeout(T, tcp).await.unwrap().unwrap();
    let ws = authority.serve("ws://127.0.0.1:0/", ServerConfig::with_logins(logins));
    let ws = tokio::time::timeout(T, ws).await.unwrap().unwrap();
    tokio::time::timeout(T, authority.dispatch(CounterAction::Add(1)))
        .await
        .unwrap()
        .unwrap();

    // A replica over the WebSocket listener.
    let replica = Store::replica(Counter, StoreConfig::default());
    let ws_url = ws.urls()[0].clone();
    let link = replica.connect(&ws_url, "test1", "12345");
    let link = tokio::time::timeout(T, link).await.unwrap().unwrap();
    let seq = tokio::time::timeout(T, replica.dispatch(CounterAction::Add(41)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((seq, *replica.state()), (2, 42));

    tokio::time::timeout(T, link.shutdown()).await.unwrap();
    tokio::time::timeout(T, tcp.shutdown()).await.unwrap();
    tokio::time::timeout(T, ws.shutdown()).await.unwrap();
    tokio::time::timeout(T, authority.shutdown()).await.unwrap();
    drop(authority);

    // `shutdown` returned after the final snapshot was written and the
    // backup's lock released.
    let persistence = BackupPersistence::open(
        BackupConfig::new(&path).key("password-for-encrypter"),
        "counter",
        1,
    )
    .unwrap();
    let restored =
        Store::authority_with_persistence(Counter, StoreConfig::default(), Box::new(persistence))
            .unwrap();
    assert_eq!(restored.seq(), 2);
    assert_eq!(*restored.state(), 42);
    tokio::time::timeout(T, restored.shutdown()).await.unwrap();
}
