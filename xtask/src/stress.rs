//! `cargo xtask stress [N] [--only PATTERN] [--timeout SECONDS] [--jobs J]`: runs
//! every network test binary of the workspace N times (default 30) and tells
//! which ones ever failed or hung.
//!
//! A "network test binary" is an integration test (`crates/*/tests/*.rs`) of a
//! crate that opens sockets: transport, mesh, store and cli. Each run gets a
//! deadline (default 300 s); a run past it is killed with its whole process
//! group and counted as a hang, with the names of the tests that had started
//! and not finished: runs are as `cargo test` makes them (tests in parallel),
//! and libtest names every test that runs for over 60 s, which a hang does. The summary ends with the plain closing line
//! `stress: N passed, N failed`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo, section};

/// The crates whose integration tests use the network.
const NETWORK_CRATES: &[&str] = &[
    "replimesh-transport",
    "replimesh-mesh",
    "replimesh-store",
    "replimesh-cli",
];

/// Options of `cargo xtask stress`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Options {
    pub(crate) runs: usize,
    pub(crate) only: Option<String>,
    pub(crate) timeout: Duration,
    pub(crate) jobs: usize,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            runs: 30,
            only: None,
            timeout: Duration::from_secs(300),
            jobs: 1,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |flag: &str| {
                it.next()
                    .cloned()
                    .with_context(|| format!("{flag} needs a value"))
            };
            match a.as_str() {
                "--only" => o.only = Some(value("--only")?),
                "--timeout" => {
                    let s: u64 = value("--timeout")?
                        .parse()
                        .context("--timeout takes whole seconds")?;
                    o.timeout = Duration::from_secs(s.max(1));
                }
                "--jobs" | "-j" => {
                    o.jobs = value("--jobs")?
                        .parse()
                        .context("--jobs takes a whole number")?;
                    if o.jobs == 0 {
                        bail!("--jobs must be at least 1");
                    }
                }
                n if n.chars().all(|c| c.is_ascii_digit()) => {
                    o.runs = n.parse().context("N must be a whole number")?;
                    if o.runs == 0 {
                        bail!("N must be at least 1");
                    }
                }
                other => bail!("unknown argument `{other}` (usage: cargo xtask stress [N] [--only PATTERN] [--timeout SECONDS] [--jobs J])"),
            }
        }
        Ok(o)
    }
}

/// One test executable to run.
#[derive(Debug, Clone)]
struct Binary {
    /// `crate/test-name`, e.g. `replimesh-mesh/runtime`.
    name: String,
    path: PathBuf,
}

/// What one binary did over all its runs.
#[derive(Debug, Default)]
struct Tally {
    passed: usize,
    failed: usize,
    hung: usize,
    slowest: Duration,
    /// Failing or hanging test names, with how often.
    culprits: BTreeMap<String, usize>,
}

pub(crate) fn stress(args: &[String]) -> Result<bool> {
    let opts = Options::parse(args)?;
    section("building the test binaries");
    let binaries = build(&opts)?;
    if binaries.is_empty() {
        bail!("no network test binary matches");
    }
    println!(
        "{} binaries x {} runs, timeout {} s per run, {} at a time",
        binaries.len(),
        opts.runs,
        opts.timeout.as_secs(),
        opts.jobs
    );
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let started = Instant::now();
    for b in &binaries {
        section(&b.name);
        let tally = tallies.entry(b.name.clone()).or_default();
        let mut run = 0;
        while run < opts.runs {
            let batch = opts.jobs.min(opts.runs - run);
            let handles: Vec<_> = (0..batch)
                .map(|_| {
                    let b = b.clone();
                    let timeout = opts.timeout;
                    std::thread::spawn(move || run_once(&b, timeout))
                })
                .collect();
            for h in handles {
                let outcome = match h.join() {
                    Ok(r) => r?,
                    Err(_) => bail!("a stress runner thread panicked"),
                };
                run += 1;
                tally.slowest = tally.slowest.max(outcome.took);
                match outcome.result {
                    RunResult::Passed => tally.passed += 1,
                    RunResult::Failed(names) => {
                        tally.failed += 1;
                        for n in names {
                            *tally.culprits.entry(n).or_default() += 1;
                        }
                    }
                    RunResult::Hung(names) => {
                        tally.hung += 1;
                        for n in names {
                            *tally.culprits.entry(format!("{n} (hung)")).or_default() += 1;
                        }
                    }
                }
            }
            print!("\r{run}/{} runs", opts.runs);
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        println!();
    }
    section(&format!(
        "stress summary ({} s)",
        started.elapsed().as_secs()
    ));
    println!(
        "{:<40} {:>6} {:>6} {:>6} {:>6} {:>9}",
        "binary", "runs", "pass", "fail", "hung", "slowest"
    );
    let (mut passed, mut failed) = (0, 0);
    for (name, t) in &tallies {
        println!(
            "{:<40} {:>6} {:>6} {:>6} {:>6} {:>8.1}s",
            name,
            t.passed + t.failed + t.hung,
            t.passed,
            t.failed,
            t.hung,
            t.slowest.as_secs_f64()
        );
        for (c, n) in &t.culprits {
            println!("    {n}x {c}");
        }
        passed += t.passed;
        failed += t.failed + t.hung;
    }
    println!("stress: {passed} passed, {failed} failed");
    Ok(failed == 0)
}

/// Builds the workspace's test targets and returns the network test binaries.
fn build(opts: &Options) -> Result<Vec<Binary>> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .stdout(Stdio::piped());
    let out = cmd.output().context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = Vec::new();
    for line in text.lines() {
        if let Some(b) = binary_of(line) {
            let keep = opts.only.as_deref().is_none_or(|p| b.name.contains(p));
            if keep {
                found.push(b);
            }
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// The network test binary a `cargo --message-format=json` line announces, if any.
fn binary_of(line: &str) -> Option<Binary> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["reason"] != "compiler-artifact" {
        return None;
    }
    let kinds = v["target"]["kind"].as_array()?;
    if !kinds.iter().any(|k| k == "test") {
        return None;
    }
    let package = v["package_id"].as_str()?;
    let krate = NETWORK_CRATES
        .iter()
        .find(|c| package.contains(&format!("/{}#", c.trim_start_matches("replimesh-"))))
        .or_else(|| NETWORK_CRATES.iter().find(|c| package.contains(*c)))?;
    let name = v["target"]["name"].as_str()?;
    let path = v["executable"].as_str()?;
    Some(Binary {
        name: format!("{krate}/{name}"),
        path: PathBuf::from(path),
    })
}

enum RunResult {
    Passed,
    Failed(Vec<String>),
    Hung(Vec<String>),
}

struct Outcome {
    result: RunResult,
    took: Duration,
}

fn run_once(b: &Binary, timeout: Duration) -> Result<Outcome> {
    use std::os::unix::process::CommandExt;
    let log = tempfile_path(&b.name);
    let file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(&b.path);
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0);
    // Test binaries find their fixtures relative to their crate's directory.
    if let Some(dir) = crate_dir(&b.name) {
        cmd.current_dir(dir);
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", b.path.display()))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() >= timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    if status.is_none() {
        crate::kill_group(&mut child);
    }
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let result = match status {
        Some(s) if s.success() => RunResult::Passed,
        Some(_) => RunResult::Failed(failed_tests(&out)),
        None => RunResult::Hung(running_tests(&out)),
    };
    Ok(Outcome { result, took })
}

/// A fresh log file for one run.
fn tempfile_path(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "xtask-stress-{}-{}-{n}.log",
        std::process::id(),
        name.replace('/', "-")
    ))
}

fn crate_dir(name: &str) -> Option<PathBuf> {
    let krate = name.split('/').next()?.trim_start_matches("replimesh-");
    let dir = crate::root().join("crates").join(krate);
    dir.is_dir().then_some(dir)
}

/// The names libtest reports as failed (`test NAME ... FAILED`), or, when a
/// run died without a verdict, the test that had started last.
pub(crate) fn failed_tests(out: &str) -> Vec<String> {
    let mut failed: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
        .map(str::to_string)
        .collect();
    if failed.is_empty() {
        if let Some(last) = out
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("test ")?.strip_suffix(" ..."))
        {
            failed.push(format!("{last} (no verdict)"));
        } else {
            failed.push("(no test named)".to_string());
        }
    }
    failed
}

/// The tests a killed run was still in: libtest says `test NAME has been
/// running for over 60 seconds` of each test that runs that long.
pub(crate) fn running_tests(out: &str) -> Vec<String> {
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| {
            l.strip_prefix("test ")?
                .split_once(" has been running for over")
        })
        .map(|(name, _)| name.to_string())
        .collect();
    names.dedup();
    if names.is_empty() {
        names.push("(no test named: the run ended before libtest's 60 s warning)".to_string());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_parsed() {
        let a = |v: &[&str]| Options::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let o = a(&[]).unwrap();
        assert_eq!((o.runs, o.jobs, o.timeout.as_secs()), (30, 1, 300));
        let o = a(&["5", "--only", "mesh", "--timeout", "60", "-j", "2"]).unwrap();
        assert_eq!(o.runs, 5);
        assert_eq!(o.only.as_deref(), Some("mesh"));
        assert_eq!((o.jobs, o.timeout.as_secs()), (2, 60));
        assert!(a(&["0"]).is_err());
        assert!(a(&["--jobs", "0"]).is_err());
        assert!(a(&["--frobnicate"]).is_err());
        assert!(a(&["--only"]).is_err());
    }

    #[test]
    fn failing_tests_are_named() {
        let out = "running 3 tests\ntest a ... ok\ntest b ... FAILED\ntest c ... FAILED\n";
        assert_eq!(failed_tests(out), ["b", "c"]);
        let died = "running 2 tests\ntest a ... ok\ntest b ...";
        assert_eq!(failed_tests(died), ["b (no verdict)"]);
        let hung = "running 2 tests\ntest a ... ok\ntest b has been running for over 60 seconds\n";
        assert_eq!(running_tests(hung), ["b"]);
        assert_eq!(running_tests("").len(), 1);
    }

    #[test]
    fn only_network_test_binaries_are_taken() {
        let line = |pkg: &str, kind: &str| {
            serde_json::json!({
                "reason": "compiler-artifact",
                "package_id": pkg,
                "target": {"kind": [kind], "name": "runtime"},
                "executable": "/t/runtime-1",
            })
            .to_string()
        };
        let b = binary_of(&line(
            "path+file:///w/crates/mesh#replimesh-mesh@0.1.0",
            "test",
        ))
        .unwrap();
        assert_eq!(b.name, "replimesh-mesh/runtime");
        assert!(binary_of(&line(
            "path+file:///w/crates/mesh#replimesh-mesh@0.1.0",
            "lib"
        ))
        .is_none());
        assert!(binary_of(&line(
            "path+file:///w/crates/backup#replimesh-backup@0.1.0",
            "test"
        ))
        .is_none());
        assert!(binary_of("not json").is_none());
    }
}
