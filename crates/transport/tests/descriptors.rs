//! One descriptor per connection (its own test binary: it counts the
//! process's open descriptors, which other tests running at the same time
//! would change).

use std::time::Duration;

use replimesh_transport::{listen, Config, Connection};

mod common;

use common::{dial, T};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn open_pairs(url: &str, n: usize) -> (replimesh_transport::Listener, Vec<Connection>) {
    let config = Config::default();
    let listener = listen(url, &config).await.unwrap();
    let mut conns = Vec::new();
    for _ in 0..n {
        let (c, s) = dial(&listener, &config).await;
        conns.push(c);
        conns.push(s);
    }
    (listener, conns)
}

/// A TCP or Unix connection holds one descriptor at each end (no duplicate
/// for direct writes), and gives it back when it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_holds_one_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let n = 40;
    for url in [
        "tcp://127.0.0.1:0".to_string(),
        format!("unix://{}", dir.path().join("fd.sock").display()),
    ] {
        let before = open_fds();
        let (listener, conns) = open_pairs(&url, n).await;
        // Direct writes happen (the descriptor they use is the socket's).
        for c in &conns {
            c.send(&replimesh_transport::proto::Frame::data(&b"x"[..]))
                .unwrap();
        }
        let during = open_fds();
        // 2 per pair (both ends in this process) and the listener's.
        let per_pair = (during - before) as f64 / n as f64;
        assert!(
            during - before <= 2 * n + 2,
            "{url}: {} descriptors for {n} connection pairs ({per_pair:.2} per pair)",
            during - before
        );
        drop(conns);
        drop(listener);
        tokio::time::timeout(T, async {
            while open_fds() > before {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{url}: {} descriptors left open", open_fds() - before));
    }
}
