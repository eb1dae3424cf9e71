//! Support code for the Replimesh benchmark scenarios.
//!
//! Each scenario is a binary `benches/src/bin/bench-<scenario>.rs` run by
//! `cargo xtask bench`. A scenario runs its own processes (it re-executes
//! itself with [`CHILD_FLAG`] to play a child role), uses only `127.0.0.1`
//! and Unix sockets in temporary directories, stops by itself, and prints its
//! results as JSON lines on stdout with [`emit`]; everything else goes to
//! stderr. See `docs/benchmarks.md`.
//!
//! This crate also holds the criterion micro-benches (`benches/benches/*.rs`)
//! and [`transport`], the shared body of the `transport-*` scenarios.
//!
//! # Example
//!
//! ```
//! use replimesh_benches::{median, result_line};
//!
//! assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
//! let line = result_line("codec", "encode", 1.0e6, "frames/s", serde_json::json!({"payload": 64}));
//! let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
//! assert_eq!(parsed["scenario"], "codec");
//! assert_eq!(parsed["params"]["payload"], 64);
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// First argument that makes a scenario binary play a child role.
pub const CHILD_FLAG: &str = "--child";

/// One result as the JSON line of the `cargo xtask bench` contract.
pub fn result_line(scenario: &str, metric: &str, value: f64, unit: &str, params: Value) -> String {
    json!({
        "scenario": scenario,
        "metric": metric,
        "value": value,
        "unit": unit,
        "params": params,
    })
    .to_string()
}

/// Prints one result line on stdout (and flushes, so nothing is lost if the
/// process is killed later).
pub fn emit(scenario: &str, metric: &str, value: f64, unit: &str, params: Value) {
    let line = result_line(scenario, metric, value, unit, params);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The median of `values` (the mean of the two middle ones for an even
/// count); `NaN` for an empty slice.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Exits the process with status 3 after `limit`, whatever it is doing.
pub fn watchdog(limit: Duration, what: &'static str) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("{what}: watchdog: still running after {limit:?}, exiting");
        std::process::exit(3);
    });
}

/// A child process playing a role of the scenario: the same binary, run as
/// `<exe> --child <args...>`.
///
/// The child reads its stdin until end-of-file and exits then (see
/// [`exit_when_parent_goes`]), so it never outlives its parent. Dropping the
/// handle closes that pipe and waits for the child.
#[derive(Debug)]
pub struct ChildRole {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl ChildRole {
    /// Starts the child role with `args` after [`CHILD_FLAG`].
    pub fn spawn(args: &[&str]) -> Result<ChildRole> {
        let exe = std::env::current_exe().context("finding the current executable")?;
        let mut child = Command::new(exe)
            .arg(CHILD_FLAG)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning a child role")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("child has no stdout")?);
        Ok(ChildRole {
            child,
            stdin,
            stdout,
        })
    }

    /// Reads one line the child printed on stdout (without the newline).
    pub fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        let n = self
            .stdout
            .read_line(&mut line)
            .context("reading from the child")?;
        if n == 0 {
            bail!("the child exited before answering");
        }
        Ok(line.trim_end().to_string())
    }

    /// Closes the child's stdin and waits for it to exit.
    pub fn finish(mut self) -> Result<()> {
        self.stdin.take();
        let status = self.child.wait().context("waiting for the child")?;
        if !status.success() {
            bail!("child role exited with {status}");
        }
        Ok(())
    }
}

impl Drop for ChildRole {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.wait();
    }
}

/// In a child role: exits the process as soon as stdin reaches end-of-file
/// (the parent closed it or died). Also starts a [`watchdog`] of `limit`.
pub fn exit_when_parent_goes(limit: Duration) {
    watchdog(limit, "child role");
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

/// Prints one line for the parent on stdout and flushes it.
pub fn tell_parent(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A fresh private directory for Unix sockets, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/replimesh-bench-<pid>-<tag>`.
    pub fn new(tag: &str) -> Result<TempDir> {
        let path =
            std::env::temp_dir().join(format!("replimesh-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The number of rounds per measurement (`BENCH_ROUNDS`, default `default`).
pub fn rounds(default: usize) -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// The target duration of one round (`BENCH_ROUND_MS`, default `default_ms`).
pub fn round_time(default_ms: u64) -> Duration {
    let ms = std::env::var("BENCH_ROUND_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default_ms);
    Duration::from_millis(ms)
}

/// How many items to use per round so that a round lasts about `target`,
/// given that `measured_items` took `measured`.
pub fn scale_count(
    measured_items: u64,
    measured: Duration,
    target: Duration,
    min: u64,
    max: u64,
) -> u64 {
    let secs = measured.as_secs_f64().max(1e-6);
    let n = (measured_items as f64 * target.as_secs_f64() / secs).round() as u64;
    n.clamp(min, max)
}

/// The raw baseline: payload bytes through a plain socket, no framing.
///
/// The sender writes a round as an 8-byte little-endian byte count followed
/// by that many bytes (the payload repeated, written in chunks of about
/// 256 KiB); the receiver reads them into a scratch buffer and answers with
/// one byte. This is the machine's limit the framed transports are compared to.
pub mod raw {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::Path;
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context, Result};

    /// Size of the writes and reads of the raw baseline.
    pub const CHUNK: usize = 256 * 1024;

    trait Stream: Read + Write + Send {}
    impl<T: Read + Write + Send> Stream for T {}

    /// Child role: accepts one connection on `addr` (`tcp` = `127.0.0.1:0`
    /// ignored address, or `unix` = a socket path), prints `ready <addr>` and
    /// serves rounds until the sender closes.
    pub fn receiver(kind: &str, addr: &str) -> Result<()> {
        let mut stream: Box<dyn Stream> = match kind {
            "tcp" => {
                let listener = TcpListener::bind(addr).context("binding raw tcp")?;
                super::tell_parent(&format!("ready {}", listener.local_addr()?));
                let (s, _) = listener.accept()?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            "unix" => {
                let listener = UnixListener::bind(addr).context("binding raw unix")?;
                super::tell_parent(&format!("ready {addr}"));
                let (s, _) = listener.accept()?;
                Box::new(s)
            }
            other => bail!("unknown raw socket kind {other}"),
        };
        let mut buf = vec![0u8; CHUNK];
        loop {
            let mut header = [0u8; 8];
            match stream.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e).context("reading a round header"),
            }
            let mut left = u64::from_le_bytes(header);
            while left > 0 {
                let want = left.min(CHUNK as u64) as usize;
                let n = stream.read(&mut buf[..want])?;
                if n == 0 {
                    bail!("sender closed in the middle of a round");
                }
                left -= n as u64;
            }
            stream.write_all(&[1])?;
        }
    }

    /// The sending side of the raw baseline.
    pub struct Sender {
        stream: Box<dyn Stream>,
        chunk: Vec<u8>,
        payload_len: usize,
    }

    impl std::fmt::Debug for Sender {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("raw::Sender").finish_non_exhaustive()
        }
    }

    impl Sender {
        /// Connects to a [`receiver`] of `kind` at `addr`.
        pub fn connect(kind: &str, addr: &str) -> Result<Sender> {
            let stream: Box<dyn Stream> = match kind {
                "tcp" => {
                    let s = TcpStream::connect(addr).context("connecting raw tcp")?;
                    s.set_nodelay(true)?;
                    Box::new(s)
                }
                "unix" => {
                    Box::new(UnixStream::connect(Path::new(addr)).context("connecting raw unix")?)
                }
                other => bail!("unknown raw socket kind {other}"),
            };
            Ok(Sender {
                stream,
                chunk: Vec::new(),
                payload_len: 0,
            })
        }

        /// Sends `count` copies of `payload` (as one byte stream) and waits
        /// for the receiver's acknowledgement; returns the elapsed time.
        pub fn round(&mut self, payload: &[u8], count: u64) -> Result<Duration> {
            if self.payload_len != payload.len() || self.chunk.is_empty() {
                let copies = (CHUNK / payload.len().max(1)).max(1);
                self.chunk = payload.repeat(copies);
                self.payload_len = payload.len();
            }
            let total = count * payload.len() as u64;
            let start = Instant::now();
            self.stream.write_all(&total.to_le_bytes())?;
            let mut left = total;
            while left > 0 {
                let n = left.min(self.chunk.len() as u64) as usize;
                self.stream.write_all(&self.chunk[..n])?;
                left -= n as u64;
            }
            self.stream.flush()?;
            let mut ack = [0u8; 1];
            self.stream
                .read_exact(&mut ack)
                .context("waiting for the raw receiver")?;
            Ok(start.elapsed())
        }
    }
}

/// The `transport-unix`, `transport-tcp` and `transport-ws` scenarios.
///
/// One sender process (the scenario itself) sends to one receiver process
/// (a child role) frames with payloads of 64 B, 1 KiB and 64 KiB, round after
/// round; each round ends with a marker that the receiver acknowledges, and
/// the sender times the round. Raw baseline rounds (see [`raw`]) alternate
/// with framed rounds, so both see the same background load. Medians of the
/// rounds are reported.
pub mod transport_scenario {
    use std::time::Duration;

    use anyhow::{bail, Context, Result};
    use serde_json::json;

    use crate::{emit, median, raw, round_time, rounds, scale_count, ChildRole, TempDir};

    /// Payload sizes of the transport scenarios.
    pub const PAYLOADS: [usize; 3] = [64, 1024, 64 * 1024];

    /// Which transport a scenario measures.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Scheme {
        /// `unix://` (raw baseline: a plain Unix socket).
        Unix,
        /// `tcp://` on 127.0.0.1 (raw baseline: a plain TCP socket).
        Tcp,
        /// `ws://` on 127.0.0.1 (raw baseline: a plain TCP socket).
        Ws,
    }

    impl Scheme {
        /// The plain socket kind of the raw baseline.
        pub fn raw_kind(self) -> &'static str {
            match self {
                Scheme::Unix => "unix",
                Scheme::Tcp | Scheme::Ws => "tcp",
            }
        }
    }

    /// Entry point of a `bench-transport-*` binary.
    pub fn main(scenario: &'static str, scheme: Scheme) -> Result<()> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.first().map(String::as_str) == Some(crate::CHILD_FLAG) {
            crate::exit_when_parent_goes(Duration::from_secs(150));
            return match args.get(1..).unwrap_or_default() {
                [role, kind, addr] if role == "raw-recv" => raw::receiver(kind, addr),
                [role, url] if role == "framed-recv" => framed::receiver(url),
                other => bail!("unknown child role {other:?}"),
            };
        }
        crate::watchdog(Duration::from_secs(170), scenario);
        run(scenario, scheme)
    }

    /// The payload sizes to run: `BENCH_PAYLOADS` (comma-separated byte
    /// counts, for profiling one size) or [`PAYLOADS`].
    fn payloads() -> Vec<usize> {
        std::env::var("BENCH_PAYLOADS")
            .ok()
            .map(|v| {
                v.split(',')
                    .filter_map(|p| p.trim().parse().ok())
                    .filter(|&p| p > 0)
                    .collect::<Vec<usize>>()
            })
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| PAYLOADS.to_vec())
    }

    /// Whether the raw baseline runs (`BENCH_RAW=0` skips it, for profiling
    /// the framed side alone).
    fn raw_enabled() -> bool {
        std::env::var("BENCH_RAW").map_or(true, |v| v != "0")
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// Runs a few growing rounds until one lasts a quarter of `target`, then
    /// returns the item count for a round of about `target`.
    fn calibrate(
        target: Duration,
        start: u64,
        max: u64,
        mut round: impl FnMut(u64) -> Result<Duration>,
    ) -> Result<u64> {
        let mut n = start.max(1);
        loop {
            let t = round(n)?;
            if t >= target / 4 || n >= max {
                return Ok(scale_count(n, t, target, 16, max));
            }
            n = (n * 8).min(max);
        }
    }

    fn run(scenario: &'static str, scheme: Scheme) -> Result<()> {
        let rounds = rounds(5);
        let target = round_time(300);
        let dir = TempDir::new(scenario)?;

        let raw_addr = match scheme.raw_kind() {
            "unix" => dir.path().join("raw.sock").display().to_string(),
            _ => "127.0.0.1:0".to_string(),
        };
        let mut raw_child = ChildRole::spawn(&["raw-recv", scheme.raw_kind(), &raw_addr])?;
        let ready = raw_child.read_line()?;
        let addr = ready
            .strip_prefix("ready ")
            .with_context(|| format!("raw receiver said {ready:?}"))?;
        let mut raw_tx = raw::Sender::connect(scheme.raw_kind(), addr)?;

        let mut framed_tx = framed::Bench::start(scheme, dir.path())?;

        for size in payloads() {
            let payload = pattern(size);
            let start = ((1 << 20) / size) as u64;
            let max = (8u64 << 30) / size as u64;
            let raw_n = if raw_enabled() {
                Some(calibrate(target, start, max, |n| {
                    raw_tx.round(&payload, n)
                })?)
            } else {
                None
            };
            let framed_n = match framed_tx.as_mut() {
                Some(f) => Some(calibrate(target, start, max, |n| f.round(&payload, n))?),
                None => None,
            };
            let mut raw_rates = Vec::new();
            let mut framed_rates = Vec::new();
            for _ in 0..rounds {
                if let Some(n) = raw_n {
                    let t = raw_tx.round(&payload, n)?;
                    raw_rates.push(n as f64 / t.as_secs_f64());
                }
                if let (Some(f), Some(n)) = (framed_tx.as_mut(), framed_n) {
                    let t = f.round(&payload, n)?;
                    framed_rates.push(n as f64 / t.as_secs_f64());
                }
            }
            let raw_fps = median(&raw_rates);
            if let Some(n) = raw_n {
                report(scenario, "raw", size, raw_fps, rounds, n);
            }
            if let Some(n) = framed_n {
                let fps = median(&framed_rates);
                report(scenario, "framed", size, fps, rounds, n);
            }
            if let (Some(_), Some(_)) = (raw_n, framed_n) {
                let fps = median(&framed_rates);
                emit(
                    scenario,
                    "ratio_vs_raw",
                    fps / raw_fps,
                    "x",
                    json!({ "payload": size }),
                );
            }
        }
        drop(raw_tx);
        raw_child.finish()?;
        if let Some(f) = framed_tx {
            f.finish()?;
        }
        Ok(())
    }

    fn report(scenario: &str, mode: &str, size: usize, fps: f64, rounds: usize, per_round: u64) {
        eprintln!(
            "{scenario}: {mode:>6} payload {size:>6} B: {fps:>12.0} frames/s {:>9.1} MB/s \
             (median of {rounds} rounds of {per_round} frames)",
            fps * size as f64 / 1e6
        );
        emit(
            scenario,
            "frames_per_s",
            fps,
            "frames/s",
            json!({ "mode": mode, "payload": size }),
        );
        emit(
            scenario,
            "throughput",
            fps * size as f64 / 1e6,
            "MB/s",
            json!({ "mode": mode, "payload": size }),
        );
    }

    /// The framed side: our transport, one connection from this process to a
    /// child role. The sender queues a pre-encoded `Data` frame (the broadcast
    /// path) with `send_encoded_wait`, which waits for room in the queue, so
    /// the slow-consumer limit is never hit.
    mod framed {
        use std::path::Path;
        use std::time::{Duration, Instant};

        use anyhow::{bail, Context, Result};
        use bytes::Bytes;
        use proto::{frame::Body, Frame};
        use transport::{Config, Receiver, RecvError, Sender};

        use super::Scheme;
        use crate::{tell_parent, ChildRole};

        pub(super) struct Bench {
            rt: tokio::runtime::Runtime,
            child: ChildRole,
            tx: Sender,
            rx: Receiver,
            body: Bytes,
            payload_len: usize,
        }

        fn runtime() -> Result<tokio::runtime::Runtime> {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting tokio")
        }

        fn marker() -> Frame {
            Frame::data(Bytes::new())
        }

        impl Bench {
            pub(super) fn start(scheme: Scheme, dir: &Path) -> Result<Option<Bench>> {
                let url = match scheme {
                    Scheme::Unix => format!("unix://{}", dir.join("framed.sock").display()),
                    Scheme::Tcp => "tcp://127.0.0.1:0".to_string(),
                    Scheme::Ws => "ws://127.0.0.1:0/bench".to_string(),
                };
                let mut child = ChildRole::spawn(&["framed-recv", &url])?;
                let ready = child.read_line()?;
                let url = ready
                    .strip_prefix("ready ")
                    .with_context(|| format!("framed receiver said {ready:?}"))?
                    .to_string();
                let rt = runtime()?;
                let conn = rt
                    .block_on(transport::connect(&url, &Config::default()))
                    .with_context(|| format!("connecting to {url}"))?;
                let (tx, rx) = conn.split();
                Ok(Some(Bench {
                    rt,
                    child,
                    tx,
                    rx,
                    body: Bytes::new(),
                    payload_len: usize::MAX,
                }))
            }

            /// Sends `count` frames with `payload`, then the end-of-round
            /// marker, and waits for the receiver's count.
            pub(super) fn round(&mut self, payload: &[u8], count: u64) -> Result<Duration> {
                if self.payload_len != payload.len() {
                    self.body = Frame::data(payload.to_vec()).encode_to_bytes();
                    self.payload_len = payload.len();
                }
                let (tx, rx, body) = (&self.tx, &mut self.rx, &self.body);
                self.rt.block_on(async move {
                    let start = Instant::now();
                    for _ in 0..count {
                        tx.send_encoded_wait(body.clone()).await?;
                    }
                    tx.send_wait(&marker()).await?;
                    let ack = rx.recv().await.context("waiting for the receiver")?;
                    let elapsed = start.elapsed();
                    let got = match ack.body {
                        Some(Body::Data(d)) if d.payload.len() == 8 => {
                            let mut n = [0u8; 8];
                            n.copy_from_slice(&d.payload);
                            u64::from_le_bytes(n)
                        }
                        other => bail!("unexpected answer from the receiver: {other:?}"),
                    };
                    if got != count {
                        bail!("receiver counted {got} frames, {count} were sent");
                    }
                    Ok(elapsed)
                })
            }

            pub(super) fn finish(self) -> Result<()> {
                let Bench {
                    rt, child, tx, rx, ..
                } = self;
                tx.close(proto::CloseCode::Normal, "benchmark done");
                rt.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(5), tx.closed()).await;
                });
                drop((tx, rx));
                child.finish()
            }
        }

        /// Child role: accepts one connection on `url`, counts `Data` frames
        /// and answers each end-of-round marker with the count.
        pub(super) fn receiver(url: &str) -> Result<()> {
            let rt = runtime()?;
            rt.block_on(async {
                let listener = transport::listen(url, &Config::default())
                    .await
                    .with_context(|| format!("listening on {url}"))?;
                tell_parent(&format!("ready {}", listener.local_url()));
                let (tx, mut rx) = listener.accept().await?.split();
                // No hello in this benchmark: the large frames come at once.
                rx.raise_max_frame();
                let mut count: u64 = 0;
                loop {
                    match rx.recv().await {
                        Ok(frame) => match frame.body {
                            Some(Body::Data(d)) if d.payload.is_empty() => {
                                tx.send_wait(&Frame::data(count.to_le_bytes().to_vec()))
                                    .await?;
                                count = 0;
                            }
                            Some(Body::Data(_)) => count += 1,
                            _ => {}
                        },
                        Err(RecvError::Closed { .. } | RecvError::Eof) => return Ok(()),
                        Err(e) => return Err(e).context("receiving"),
                    }
                }
            })
        }
    }
}

/// Percentile (0..=100) of sorted values (`NaN` when there are none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The CPUs this process may run on (sorted).
pub fn allowed_cpus() -> Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None)?;
    Ok((0..rustix::thread::CpuSet::MAX_CPU)
        .filter(|&c| set.is_set(c))
        .collect())
}

/// Restricts every thread of this process (and the threads they start
/// later) to `cpus`.
pub fn pin_process(cpus: &[usize]) -> Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    for &c in cpus {
        set.set(c);
    }
    for entry in std::fs::read_dir("/proc/self/task")? {
        let tid: i32 = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse().ok())
            .context("thread id in /proc/self/task")?;
        let Some(pid) = rustix::thread::Pid::from_raw(tid) else {
            continue;
        };
        match rustix::thread::sched_setaffinity(Some(pid), &set) {
            // A thread that ended meanwhile is no longer there to pin.
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => bail!("pinning thread {tid} to CPUs {cpus:?}: {e}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn counts_scale_to_the_target_and_stay_in_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(scale_count(100, ms(10), ms(100), 1, 1_000_000), 1000);
        assert_eq!(scale_count(100, ms(10), ms(100), 1, 500), 500);
        assert_eq!(scale_count(100, ms(1000), ms(1), 16, 500), 16);
    }

    #[test]
    fn raw_baseline_round_trips_over_a_unix_socket() {
        let dir = TempDir::new("test-raw").unwrap();
        let path = dir.path().join("s.sock").display().to_string();
        let listener_path = path.clone();
        // The receiver role prints `ready` on stdout; here it runs as a thread.
        let server = std::thread::spawn(move || raw::receiver("unix", &listener_path));
        let mut sender = loop {
            match raw::Sender::connect("unix", &path) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        for count in [1, 1000, 5] {
            sender.round(&[7u8; 1000], count).unwrap();
        }
        drop(sender);
        server.join().unwrap().unwrap();
    }
}
