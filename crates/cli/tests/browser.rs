//! Headless Chromium test of the browser client and the dashboard.
//!
//! Drives Debian's `chromium` over the DevTools protocol (a WebSocket; no
//! driver download). Two nodes run in-process, linked; the example page,
//! over one WebSocket connection, subscribes to a group and receives a
//! message a Rust client publishes, makes a request, dispatches to a store
//! and sees the new state; the dashboard renders both clones. Screenshots are kept under
//! `target/tmp/browser-test/`.
//!
//! Without Chromium the test fails when `CI` is set, and otherwise prints a
//! loud SKIPPED message and passes (so `cargo test` works on a fresh machine;
//! `.ci/run` installs Chromium).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use replimesh::mesh;
use replimesh_cli::config::NodeConfig;
use replimesh_cli::node::Node;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

fn find_chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

struct Cdp {
    ws: WebSocketStream<TcpStream>,
    next: u64,
}

impl Cdp {
    async fn connect(url: &str) -> Cdp {
        let hostport = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let tcp = TcpStream::connect(&hostport).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        Cdp { ws, next: 1 }
    }

    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        loop {
            let m = self.ws.next().await.expect("devtools closed").unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    async fn open(&mut self, url: &str) -> String {
        let t = self
            .call(None, "Target.createTarget", json!({"url": url}))
            .await;
        let target = t["targetId"].as_str().unwrap().to_owned();
        let a = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await;
        let session = a["sessionId"].as_str().unwrap().to_owned();
        self.call(Some(&session), "Runtime.enable", json!({})).await;
        session
    }

    async fn eval(&mut self, session: &str, expr: &str) -> Value {
        let r = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            return json!({"exception": e});
        }
        r["result"]["value"].clone()
    }

    async fn wait_for(&mut self, session: &str, what: &str, expr: &str) {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if self.eval(session, expr).await == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                let body = self.eval(session, "document.body.innerText").await;
                panic!("timed out waiting for {what} ({expr}); page text:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&mut self, session: &str, path: &Path) {
        let r = self
            .call(
                Some(session),
                "Page.captureScreenshot",
                json!({"format": "png"}),
            )
            .await;
        let data = base64_decode(r["data"].as_str().unwrap());
        std::fs::write(path, data).unwrap();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

fn node_config(id: &str, peer: Option<(&str, &str)>) -> NodeConfig {
    let mut text = format!(
        r#"
        id = "{id}"
        admin = "127.0.0.1:0"
        [[listen]]
        url = "tcp://127.0.0.1:0"
        [[listen]]
        url = "ws://127.0.0.1:0/"
        [auth]
        token = "browser-test-token"
        [[store]]
        name = "kv"
        reducer = "kv"
        logins = {{ web = "secret" }}
        "#
    );
    if let Some((pid, purl)) = peer {
        text.push_str(&format!("[[peer]]\nid = \"{pid}\"\nurl = \"{purl}\"\n"));
    }
    NodeConfig::parse(&text, Path::new(".")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_client_and_dashboard() {
    let Some(chromium) = find_chromium() else {
        if std::env::var_os("CI").is_some() {
            panic!("chromium is not installed and CI is set: install it (`apt-get install -y chromium`)");
        }
        eprintln!("\n\n================================================================");
        eprintln!("SKIPPED: browser test: chromium is not installed.");
        eprintln!("Install it (`apt-get install -y chromium`) to run this test.");
        eprintln!("================================================================\n");
        return;
    };
    tokio::time::timeout(Duration::from_secs(120), run(chromium))
        .await
        .expect("browser test timed out");
}

async fn run(chromium: PathBuf) {
    let n1 = Node::start(node_config("web-1", None)).await.unwrap();
    let n1_tcp = n1.urls()[0].clone();
    let n2 = Node::start(node_config("web-2", Some(("web-1", &n1_tcp))))
        .await
        .unwrap();
    let admin = n1.admin_addr().unwrap();

    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser-test");
    std::fs::create_dir_all(&out_dir).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1200,900",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting chromium");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let ws_url = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("chromium exited before printing its DevTools URL");
        if let Some(u) = line.strip_prefix("DevTools listening on ") {
            break u.trim().to_owned();
        }
    };
    // Keep draining chromium's stderr so it never blocks.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let mut cdp = Cdp::connect(&ws_url).await;

    // The example page: mesh client + kv replica; it dispatches one action.
    let page = cdp
        .open(&format!(
            "http://{admin}/example.html?group=news&store=kv&login=web&password=secret\
             &dispatch=%7B%22Set%22%3A%7B%22key%22%3A%22colour%22%2C%22value%22%3A%22blue%22%7D%7D"
        ))
        .await;
    cdp.wait_for(
        &page,
        "mesh connection",
        "document.getElementById('mesh-status')?.textContent === 'connected'",
    )
    .await;
    cdp.wait_for(
        &page,
        "store attach",
        "document.getElementById('store-status')?.textContent === 'attached'",
    )
    .await;

    // A Rust client on the other node publishes until the page has it
    // (the subscription travels to web-2 by interest routing).
    let rust = mesh::Client::connect(mesh::ClientConfig::new([n2.urls()[0].clone()]))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        rust.publish(mesh::Groups::one("news"), &b"hello from rust"[..], false)
            .unwrap();
        let got = cdp
            .eval(
                &page,
                "[...document.querySelectorAll('#messages li')].some(li => li.textContent === 'news: hello from rust')",
            )
            .await;
        if got == json!(true) {
            break;
        }
        assert!(Instant::now() < deadline, "the page never got the message");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Request/response from the page to the node's `echo` route.
    let echo = cdp
        .eval(
            &page,
            "window.mesh.request('echo', 'x', 'ping?').then(r => r.text)",
        )
        .await;
    assert_eq!(echo, json!("ping?"));
    // And a publish from the page reaches the Rust side.
    let mut inbox = rust.deliveries().unwrap();
    rust.subscribe(&["from-web"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        cdp.eval(&page, "window.mesh.publish('from-web', {n: 1}) && true")
            .await;
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(200), inbox.recv()).await {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "Rust never got the page's message"
        );
    };
    assert_eq!(&got.data[..], br#"{"n":1}"#);

    // The dispatch was committed: the authority has it and the page shows it.
    cdp.wait_for(
        &page,
        "state",
        "document.getElementById('state').textContent.includes('\"colour\":\"blue\"')",
    )
    .await;
    let kv = n1.store("kv").unwrap();
    assert_eq!(kv.state_json()["colour"], json!("blue"));
    // A change made in Rust reaches the page's replica.
    if let replimesh_cli::node::HostedStore::Kv(s) = &kv {
        s.dispatch(replimesh_cli::reducers::KvAction::Set {
            key: "size".into(),
            value: "large".into(),
        })
        .await
        .unwrap();
    }
    cdp.wait_for(
        &page,
        "state from Rust",
        "document.getElementById('state').textContent.includes('\"size\":\"large\"')",
    )
    .await;
    // All of it over one connection.
    assert_eq!(
        cdp.eval(
            &page,
            "window.store.conn === window.mesh.conn && window.store.shared"
        )
        .await,
        json!(true)
    );
    let (_, metrics) = replimesh_cli::admin::http_get(admin, "/metrics")
        .await
        .unwrap();
    let samples = replimesh_cli::metrics::parse_text(&metrics).unwrap();
    let open = samples
        .iter()
        .find(|s| s.0 == "replimesh_connections")
        .map(|s| s.2);
    assert_eq!(
        open,
        Some(1.0),
        "the page should use one connection to web-1"
    );
    cdp.screenshot(&page, &out_dir.join("example.png")).await;

    // The dashboard renders both clones.
    let dash = cdp.open(&format!("http://{admin}/")).await;
    cdp.wait_for(
        &dash,
        "dashboard clones",
        "(() => { const ids = [...document.querySelectorAll('#clones tr')].map(r => r.dataset.id); \
         return ids.includes('web-1') && ids.includes('web-2'); })()",
    )
    .await;
    cdp.wait_for(
        &dash,
        "dashboard store row",
        "!!document.querySelector('#stores tr[data-id=\"kv\"]')",
    )
    .await;
    cdp.wait_for(
        &dash,
        "charts",
        "document.querySelectorAll('#charts .chart svg').length >= 4",
    )
    .await;
    cdp.screenshot(&dash, &out_dir.join("dashboard.png")).await;
    eprintln!("browser test screenshots in {}", out_dir.display());

    drop(cdp);
    let _ = child.kill().await;
    rust.close();
    n2.shutdown().await.unwrap();
    n1.shutdown().await.unwrap();
}
