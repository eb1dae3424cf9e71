//! A `replimesh node` process for tests: started from a config text, its
//! bound URLs read from its output, its memory and descriptors read from
//! `/proc`, killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `replimesh node` (killed when dropped).
pub struct NodeProc {
    /// The process.
    pub child: Child,
    /// The node's first listener: clone links, mesh clients and store replicas.
    pub url: String,
    /// Every listener's bound URL, in the config's order.
    pub urls: Vec<String>,
    /// The admin HTTP address.
    pub admin: SocketAddr,
    /// The node's stdout lines after `ready`.
    pub lines: mpsc::Receiver<String>,
}

impl NodeProc {
    /// Writes `toml` to `dir/NAME.toml` and starts `bin node --config` on
    /// it (`bin` is the test's `env!("CARGO_BIN_EXE_replimesh")`); returns
    /// once it printed `ready`. Panics when it does not within 30 s. The
    /// config needs an `admin` address.
    pub fn start(bin: &str, dir: &Path, name: &str, toml: &str) -> NodeProc {
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        let mut child = Command::new(bin)
            .args(["node", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut urls, mut admin) = (Vec::new(), None);
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{name} did not start: {e}"));
            if let Some(u) = line.strip_prefix("listening ") {
                urls.push(u.to_owned());
            } else if let Some(a) = line.strip_prefix("admin http://") {
                admin = Some(a.trim_end_matches('/').parse().unwrap());
            } else if line == "ready" {
                break;
            }
        }
        NodeProc {
            child,
            url: urls[0].clone(),
            urls,
            admin: admin.unwrap(),
            lines: rx,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now, in KiB (`VmRSS` of `/proc/PID/status`; 0 once
    /// the process is gone).
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// Open file descriptors now (entries of `/proc/PID/fd`).
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }

    /// Sends SIGTERM and waits (at most 30 s, else panics) for the exit.
    pub fn sigterm(&mut self) -> ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "node did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `VmRSS` of process `pid` in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
