//! The `replimesh` binary end to end: three `replimesh node` processes from
//! config files, linked; publish and dispatch through them; SIGTERM one and
//! see clients move with nothing lost; metrics; bad configs; backup tools.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use replimesh::mesh;
use replimesh::store::{Client, ClientConfig, Store, StoreConfig};
use replimesh_cli::admin::http_get;
use replimesh_cli::metrics::parse_text;
use replimesh_cli::reducers::{Kv, KvAction};
use testkit::NodeProc;

const BIN: &str = env!("CARGO_BIN_EXE_replimesh");

/// Starts `replimesh node` on `toml` (written to `dir/NAME.toml`).
fn start(dir: &Path, name: &str, toml: &str) -> NodeProc {
    NodeProc::start(BIN, dir, name, toml)
}

fn config(id: &str, peer: Option<(&str, &str)>, upstream: Option<&str>) -> String {
    let mut t = format!(
        r#"
id = "{id}"
admin = "127.0.0.1:0"
[[listen]]
url = "tcp://127.0.0.1:0"
[auth]
token_file = "token"
[security]
node_info = "anyone"
[limits]
idle_timeout_ms = 0
[[store]]
name = "kv"
reducer = "kv"
logins = {{ app = "app-password" }}
"#
    );
    match upstream {
        Some(u) => t.push_str(&format!(
            "[store.upstream]\nurl = \"{u}\"\nlogin = \"app\"\npassword = \"app-password\"\n"
        )),
        None => t.push_str(
            "[store.backup]\npath = \"kv.backup\"\nkey_file = \"backup.key\"\nevery = 50\n\
             kdf_memory_kib = 1024\nkdf_passes = 1\n",
        ),
    }
    if let Some((pid, purl)) = peer {
        t.push_str(&format!("[[peer]]\nid = \"{pid}\"\nurl = \"{purl}\"\n"));
    }
    t
}

async fn metric(admin: SocketAddr, name: &str, label: Option<(&str, &str)>) -> f64 {
    let (code, body) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let samples = parse_text(&body).unwrap_or_else(|e| panic!("bad Prometheus text: {e}\n{body}"));
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v))
        })
        .map(|s| s.2)
        .unwrap_or_else(|| panic!("no metric {name} in\n{body}"))
}

async fn wait_until<F: AsyncFnMut() -> bool>(what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_sigterm_one_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "e2e-clone-token\n").unwrap();
    std::fs::write(dir.path().join("backup.key"), "e2e-backup-pass\n").unwrap();
    let mut n1 = start(dir.path(), "n1", &config("n1", None, None));
    let mut n2 = start(
        dir.path(),
        "n2",
        &config("n2", Some(("n1", &n1.url)), Some(&n1.url)),
    );
    let mut n3 = start(
        dir.path(),
        "n3",
        &config("n3", Some(("n2", &n2.url)), Some(&n1.url)),
    );
    // Discovery: n3 was only told about n2, and learns n1.
    wait_until("n3 linked to n1 and n2", async || {
        metric(n3.admin, "replimesh_clone_links", None).await == 2.0
    })
    .await;

    // A subscriber on n2 (n3 as its second URL), a publisher on n3.
    let mut sc = mesh::ClientConfig::new([n2.url.clone(), n3.url.clone()]);
    sc.reconnect_min = Duration::from_millis(20);
    let sub = mesh::Client::connect(sc).await.unwrap();
    let mut inbox = sub.deliveries().unwrap();
    sub.subscribe(&["e2e"]).unwrap();
    let publ = mesh::Client::connect(mesh::ClientConfig::new([n3.url.clone()]))
        .await
        .unwrap();
    // Probe until the subscription has reached n3.
    loop {
        publ.publish(mesh::Groups::one("e2e"), &b"probe"[..], false)
            .unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), inbox.recv()).await {
            break;
        }
    }
    while tokio::time::timeout(Duration::from_millis(200), inbox.recv())
        .await
        .is_ok()
    {}
    let mut got = Vec::new();
    for i in 0..100u32 {
        publ.publish_wait(mesh::Groups::one("e2e"), i.to_string().into_bytes(), false)
            .await
            .unwrap();
    }
    while got.len() < 100 {
        let d = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .expect("a message was lost")
            .unwrap();
        got.push(String::from_utf8(d.data.to_vec()).unwrap());
    }
    let want: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(got, want);

    // Requests through n1 move its request counter; the store replica on
    // n2 dispatches through the relay.
    let asker = mesh::Client::connect(mesh::ClientConfig::new([n1.url.clone()]))
        .await
        .unwrap();
    let before = metric(n1.admin, "replimesh_requests_total", None).await;
    let echo = asker.request("echo", "", &b"hi"[..]).await.unwrap();
    assert_eq!(&echo[..], b"hi");
    let info = asker.request("node", "info", &b""[..]).await.unwrap();
    assert!(String::from_utf8_lossy(&info).contains("\"n1\""));
    assert!(metric(n1.admin, "replimesh_requests_total", None).await >= before + 2.0);

    let replica = Store::replica(Kv { name: "kv".into() }, StoreConfig::default());
    let mut cc = ClientConfig::new("app", "app-password");
    cc.reconnect_min = Duration::from_millis(20);
    let link2 = replica.connect_with(&n2.url, cc.clone()).await.unwrap();
    for i in 0..50 {
        replica
            .dispatch(KvAction::Set {
                key: format!("k{i}"),
                value: i.to_string(),
            })
            .await
            .unwrap();
    }
    wait_until("n1 seq 50", async || {
        metric(n1.admin, "replimesh_store_seq", Some(("store", "kv"))).await == 50.0
    })
    .await;
    // The backup (every 50 actions) was written; its age is known.
    wait_until("a backup snapshot", async || {
        metric(
            n1.admin,
            "replimesh_backup_writes_total",
            Some(("store", "kv")),
        )
        .await
            >= 1.0
    })
    .await;
    assert!(
        metric(
            n1.admin,
            "replimesh_backup_age_seconds",
            Some(("store", "kv"))
        )
        .await
            >= 0.0
    );
    assert_eq!(
        metric(
            n1.admin,
            "replimesh_backup_failures_total",
            Some(("store", "kv"))
        )
        .await,
        0.0
    );
    // n2 relays kv for one replica; messages went through the mesh.
    assert_eq!(
        metric(n2.admin, "replimesh_store_replicas", Some(("store", "kv"))).await,
        1.0
    );
    assert!(metric(n3.admin, "replimesh_messages_published_total", None).await >= 100.0);
    assert!(metric(n2.admin, "replimesh_messages_delivered_total", None).await >= 100.0);

    // SIGTERM n2: it exits 0; the subscriber moves to n3; the replica's
    // dispatches made meanwhile wait in its outbox and are committed once
    // through n3.
    let pending: Vec<_> = (50..60)
        .map(|i| {
            replica
                .try_dispatch(&KvAction::Set {
                    key: format!("k{i}"),
                    value: i.to_string(),
                })
                .unwrap()
        })
        .collect();
    let status = n2.sigterm();
    assert!(status.success(), "n2 exited with {status}");
    // (The reader thread may not have passed the last lines on yet.)
    assert!(
        std::iter::from_fn(|| n2.lines.recv_timeout(Duration::from_secs(10)).ok())
            .any(|l| l == "stopped"),
        "n2 did not print `stopped`"
    );
    drop(link2);
    let link3 = Client::connect(&n3.url, cc).await.unwrap();
    link3.attach(&replica).await.unwrap();
    for p in pending {
        p.await.unwrap();
    }
    // The subscriber is on n3 now, with its subscription restored.
    wait_until("subscriber on n3", async || {
        sub.info().connected_to.as_deref() == Some(n3.url.as_str())
    })
    .await;
    loop {
        publ.publish(mesh::Groups::one("e2e"), &b"probe"[..], false)
            .unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), inbox.recv()).await {
            break;
        }
    }
    while tokio::time::timeout(Duration::from_millis(200), inbox.recv())
        .await
        .is_ok()
    {}
    for i in 100..200u32 {
        publ.publish_wait(mesh::Groups::one("e2e"), i.to_string().into_bytes(), false)
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 100 {
        let d = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .expect("a message was lost after the move")
            .unwrap();
        got.push(String::from_utf8(d.data.to_vec()).unwrap());
    }
    let want: Vec<String> = (100..200).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
    // Every dispatch exactly once.
    // A dispatch in flight through n2 when it stopped is resent through n3;
    // the authority recognises it by the replica's (client id, op id).
    wait_until("n1 seq 60", async || {
        metric(n1.admin, "replimesh_store_seq", Some(("store", "kv"))).await >= 60.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seq = metric(n1.admin, "replimesh_store_seq", Some(("store", "kv"))).await as u64;
    assert_eq!(
        seq, 60,
        "authority seq: each of the 60 dispatches exactly once"
    );
    replica.wait_for(seq).await;
    assert_eq!(replica.state().len(), 60);
    assert_eq!(replica.seq(), seq);
    // n3's view: n2 is down or forgotten.
    wait_until("n3 sees one link", async || {
        metric(n3.admin, "replimesh_clone_links", None).await == 1.0
    })
    .await;

    // SIGTERM the authority: final backup, readable by `replimesh backup`.
    sub.close();
    publ.close();
    asker.close();
    link3.shutdown().await;
    assert!(n3.sigterm().success());
    assert!(n1.sigterm().success());
    let backup = dir.path().join("kv.backup");
    let out = Command::new(BIN)
        .args(["backup", "verify"])
        .arg(&backup)
        .arg("--key-file")
        .arg(dir.path().join("backup.key"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&format!("seq {seq}")), "{text}");
    let out = Command::new(BIN)
        .args(["backup", "inspect"])
        .arg(&backup)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("AES-256-GCM"),
        "{text}"
    );
}

#[test]
fn bad_configs_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[listen]]\nurl = \"http://127.0.0.1:1\"\n",
            "listen[0].url",
        ),
        (
            "[[listen]]\nurl = \"wss://127.0.0.1:1/\"\n",
            "listen[0].cert",
        ),
        (
            "[[store]]\nname = \"s\"\nmode = \"turbo\"\n",
            "store[0].mode",
        ),
        ("[limits]\nmax_frame = \"huge\"\n", "limits.max_frame"),
        ("admin = \"localhost\"\n", "admin"),
        ("colour = \"red\"\n", "colour"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["node", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {err}");
        assert!(
            err.contains(key),
            "{text}: error does not name `{key}`: {err}"
        );
    }
    let out = Command::new(BIN)
        .args(["node", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}
