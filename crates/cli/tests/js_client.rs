//! The JavaScript client package (`clients/js/`) against real nodes: runs
//! its `node --test` files (mesh, store, reconnect, outbox, wrong password,
//! ban) with Node.js.
//!
//! This test starts two linked `replimesh node` processes (ws listeners on
//! 127.0.0.1, OS-chosen ports) and an in-process mesh server whose
//! `callback` route asks the calling client back (requests in both
//! directions), and passes their URLs and the binary's path (for the tests
//! that kill and restart nodes) in the environment. The login's password is
//! configured as a cheap Argon2id hash so that logins are fast in debug
//! builds.
//!
//! Without Node.js (20 or newer) the test fails when `CI` is set, and
//! otherwise prints a loud SKIPPED message and passes (`.ci/run` installs
//! Node.js).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use replimesh::mesh;
use testkit::NodeProc;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_replimesh");

/// How long the whole `node --test` run may take.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// The Node.js major version, when `node` runs.
fn node_major() -> Option<u32> {
    let out = Command::new("node").arg("--version").output().ok()?;
    let v = String::from_utf8_lossy(&out.stdout);
    v.trim()
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Whether this Node.js has a global `WebSocket` without a flag (22+).
fn node_has_websocket() -> bool {
    Command::new("node")
        .args([
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ])
        .status()
        .is_ok_and(|s| s.success())
}

fn config(id: &str, secret: &str, peer: Option<&str>) -> String {
    let mut t = format!(
        r#"
id = "{id}"
admin = "127.0.0.1:0"
[[listen]]
url = "ws://127.0.0.1:0/"
[auth]
token = "js-test-token"
[[store]]
name = "kv"
reducer = "kv"
logins = {{ web = "{secret}" }}
[[store]]
name = "counter"
reducer = "counter"
logins = {{ web = "{secret}" }}
"#
    );
    if let Some(p) = peer {
        t.push_str(&format!("[[peer]]\nid = \"js-a\"\nurl = \"{p}\"\n"));
    }
    t
}

/// A mesh server whose `callback/ACT` route requests `client/ACT` from the
/// calling client with the same payload and answers with its reply (or its
/// error).
async fn callback_server() -> mesh::Server {
    let server = mesh::Server::start(mesh::ServerConfig::new("js-callback", "ws://127.0.0.1:0/"))
        .await
        .unwrap();
    server.route("callback", "", |ctx| async move {
        match ctx.peer.request("client", &ctx.act, ctx.data).await {
            Ok(b) => Ok(b),
            Err(mesh::MeshError::Remote { code, message }) => {
                Err(mesh::RouteError::new(code, format!("{code} {message}")))
            }
            Err(e) => Err(mesh::RouteError::new(502, e.to_string())),
        }
    });
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_package() {
    let Some(major) = node_major().filter(|m| *m >= 20) else {
        if std::env::var_os("CI").is_some() {
            panic!("Node.js 20+ is not installed and CI is set: install it (`apt-get install -y nodejs`)");
        }
        eprintln!("\n\n================================================================");
        eprintln!("SKIPPED: JavaScript client test: Node.js 20+ is not installed.");
        eprintln!("Install it (`apt-get install -y nodejs`) to run this test.");
        eprintln!("================================================================\n");
        return;
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let package = root.join("clients/js");
    let mut tests: Vec<PathBuf> = std::fs::read_dir(package.join("test"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".test.js"))
        .collect();
    tests.sort();
    assert!(tests.len() >= 3, "test files: {tests:?}");

    // A cheap hash of "secret": logins cost microseconds, not seconds.
    let secret = common::cheap_phc("secret");
    let dir = tempfile::tempdir().unwrap();
    let a = NodeProc::start(BIN, dir.path(), "js-a", &config("js-a", &secret, None));
    let b = NodeProc::start(
        BIN,
        dir.path(),
        "js-b",
        &config("js-b", &secret, Some(&a.url)),
    );
    let callback = callback_server().await;

    let mut cmd = tokio::process::Command::new("node");
    if !node_has_websocket() {
        cmd.arg("--experimental-websocket");
    }
    cmd.arg("--test")
        .args(&tests)
        .current_dir(&package)
        .env("REPLIMESH_BIN", BIN)
        .env("REPLIMESH_WS_A", &a.url)
        .env("REPLIMESH_WS_B", &b.url)
        .env("REPLIMESH_CALLBACK_URL", &callback.listen_urls()[0])
        .env("REPLIMESH_TEST_SECRET_HASH", &secret)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    eprintln!("running node {major} --test on {} files", tests.len());
    let out = tokio::time::timeout(RUN_DEADLINE, cmd.output())
        .await
        .expect("node --test ran past its deadline")
        .expect("starting node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // The runner's summary: `# pass N`, `# fail N`.
    let count = |what: &str| -> u32 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("# {what} ")))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `# {what}` line in the output of node --test"))
    };
    let (pass, fail, skipped) = (count("pass"), count("fail"), count("skipped"));
    assert!(out.status.success(), "node --test failed: {fail} failed");
    assert_eq!(fail, 0);
    assert_eq!(skipped, 0, "a JavaScript test was skipped");
    assert!(pass >= 10, "only {pass} JavaScript tests passed");
    callback.shutdown().await;
    drop((a, b));
}
