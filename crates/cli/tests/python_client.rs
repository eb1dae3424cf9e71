//! The Python client of `examples/python/` (written from `docs/protocol.md`
//! alone) against a real `replimesh node` process on 127.0.0.1 with
//! OS-chosen ports: mesh, requests and the built-in counter store over the
//! JSON encoding.
//!
//! Without `python3` the test fails when `CI` is set, and otherwise prints a
//! loud SKIPPED message and passes (so `cargo test` works on a machine
//! without Python).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::NodeProc;

const BIN: &str = env!("CARGO_BIN_EXE_replimesh");
/// How long the Python client may run in all.
const DEADLINE: Duration = Duration::from_secs(90);

/// Kills the child when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> Option<PathBuf> {
    let ok = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| PathBuf::from("python3"))
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/python/replimesh_client.py")
        .canonicalize()
        .expect("examples/python/replimesh_client.py is missing")
}

/// Starts `replimesh node` with a WebSocket listener and the `counter`
/// store (login `py`).
fn start_node(dir: &Path) -> NodeProc {
    let phc = common::cheap_phc("py-secret");
    let config = format!(
        r#"
        id = "py-node"
        admin = "127.0.0.1:0"
        [[listen]]
        url = "ws://127.0.0.1:0/"
        [[store]]
        name = "counter"
        reducer = "counter"
        logins = {{ py = "{phc}" }}
        "#
    );
    NodeProc::start(BIN, dir, "py-node", &config)
}

#[test]
fn python_client_written_from_the_doc_talks_to_a_node() {
    let Some(python) = python() else {
        if std::env::var_os("CI").is_some_and(|v| v == "true") {
            panic!("python3 is missing (required when CI=true)");
        }
        eprintln!("\n*** SKIPPED python_client: python3 not found ***\n");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path());
    let url = node.url.clone();
    assert!(url.starts_with("ws://127.0.0.1:"), "{url}");

    let mut client = Command::new(python)
        .arg(script())
        .args(["--url", &url, "--login", "py", "--password", "py-secret"])
        .args(["--store", "counter", "--timeout", "20"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = client.stdout.take().unwrap();
    let mut err = client.stderr.take().unwrap();
    let client = Killed(client);
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut client = client;
    let started = Instant::now();
    let status = loop {
        if let Some(st) = client.0.try_wait().unwrap() {
            break Some(st);
        }
        if started.elapsed() > DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(client);
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let status = status.unwrap_or_else(|| {
        panic!("the Python client ran past {DEADLINE:?}\nstdout:\n{out}\nstderr:\n{err}")
    });
    assert!(
        status.success(),
        "the Python client failed ({status})\nstdout:\n{out}\nstderr:\n{err}"
    );
    for step in [
        "ok: hello/welcome",
        "ok: subscribe, publish and deliver",
        "ok: request/response",
        "ok: store hello/welcome/snapshot",
        "ok: dispatch, batch, committed, actions; BAD_ACTION",
        "ok: notToMe honoured",
        "ok: state read back on a second connection (16)",
        "all steps passed",
    ] {
        assert!(
            out.contains(step),
            "missing {step:?} in:\n{out}\nstderr:\n{err}"
        );
    }
}
