//! Project tasks, run with `cargo xtask <task>` (an alias in `.cargo/config.toml`).
//!
//! - `cargo xtask bench [SCENARIO...]`: builds the `replimesh-benches` crate in
//!   release mode, runs each scenario (all known ones by default) in its own
//!   processes, prints a table and writes `<target-dir>/bench/results.json`
//!   (`target/bench/results.json` by default). See `docs/benchmarks.md`.
//! - `cargo xtask bench --list`: prints the known scenarios.
//! - `cargo xtask stress [N] [--only PATTERN] [--timeout S] [--jobs J]`: runs
//!   every network test binary N times (default 30) with a deadline per run,
//!   and names the tests that ever failed or hung (see `stress.rs`).
//! - `cargo xtask tidy`: structural rules (sans-IO cores free of tokio, clocks
//!   and sockets; a `//!` doc on every module), see `tidy.rs`.
//! - `cargo xtask ci`: the checks of `.ci/run` (fmt, clippy, test, doc), without
//!   the installation steps.
//!
//! Scenario `S` is the release binary `bench-S` built from
//! `benches/src/bin/bench-S.rs`; it prints one JSON object per result on
//! stdout. Scenario `codec` is the criterion bench `benches/benches/codec.rs`,
//! whose medians are read back from criterion's `estimates.json` files.

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

mod stress;
mod tidy;

/// How long one scenario may run before it is killed.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(180);

/// The scenario that is a criterion bench rather than a `bench-*` binary.
const CRITERION_SCENARIO: &str = "codec";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("ci") => ci(),
        Some("stress") => stress::stress(&args[1..]),
        Some("tidy") => tidy::tidy(&root()),
        Some("help" | "--help" | "-h") | None => {
            print_help();
            Ok(true)
        }
        Some(other) => {
            print_help();
            Err(anyhow::anyhow!("unknown task `{other}`"))
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_help() {
    eprintln!(
        "usage:\n  cargo xtask bench [--list] [SCENARIO...]   run benchmark scenarios (default: all)\n  \
         cargo xtask stress [N] [--only PATTERN] [--timeout S] [--jobs J]\n      \
         run each network test binary N times (default 30), name failures and hangs\n  \
         cargo xtask tidy                           structural rules (see xtask/src/tidy.rs)\n  \
         cargo xtask ci                             fmt, clippy, tidy, test and doc checks, as .ci/run"
    );
}

/// The workspace root (the parent of this crate's directory).
fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root());
    cmd
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR` and cargo config).
fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed");
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let dir = meta["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(dir))
}

/// The known scenarios: `codec` plus one per `benches/src/bin/bench-*.rs`.
fn known_scenarios() -> Result<Vec<String>> {
    let mut names = vec![CRITERION_SCENARIO.to_string()];
    let dir = root().join("benches/src/bin");
    let mut bins = Vec::new();
    if dir.is_dir() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(s) = name
                .strip_prefix("bench-")
                .and_then(|s| s.strip_suffix(".rs"))
            {
                bins.push(s.to_string());
            }
        }
    }
    bins.sort();
    names.extend(bins);
    Ok(names)
}

/// One row of `results.json`.
#[derive(Debug, Clone)]
struct Row {
    scenario: String,
    metric: String,
    value: f64,
    unit: String,
    params: Map<String, Value>,
}

impl Row {
    fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "metric": self.metric,
            "value": self.value,
            "unit": self.unit,
            "params": self.params,
        })
    }

    fn from_line(expected: &str, line: &str) -> Result<Row> {
        let v: Value = serde_json::from_str(line).context("not JSON")?;
        let scenario = v["scenario"].as_str().context("no \"scenario\"")?;
        if scenario != expected {
            bail!("scenario is {scenario:?}, expected {expected:?}");
        }
        Ok(Row {
            scenario: scenario.to_string(),
            metric: v["metric"].as_str().context("no \"metric\"")?.to_string(),
            value: v["value"].as_f64().context("no numeric \"value\"")?,
            unit: v["unit"].as_str().unwrap_or("").to_string(),
            params: v["params"].as_object().cloned().unwrap_or_default(),
        })
    }
}

fn bench(args: &[String]) -> Result<bool> {
    let known = known_scenarios()?;
    if args.iter().any(|a| a == "--list") {
        for s in &known {
            println!("{s}");
        }
        return Ok(true);
    }
    if let Some(flag) = args.iter().find(|a| a.starts_with('-')) {
        bail!("unknown option `{flag}` (usage: cargo xtask bench [--list] [SCENARIO...])");
    }
    let unknown: Vec<&String> = args.iter().filter(|a| !known.contains(a)).collect();
    if !unknown.is_empty() {
        let names: Vec<&str> = unknown.iter().map(|s| s.as_str()).collect();
        bail!(
            "unknown scenario(s): {}\nknown scenarios: {}",
            names.join(", "),
            known.join(", ")
        );
    }
    let mut requested: Vec<String> = if args.is_empty() {
        known.clone()
    } else {
        args.to_vec()
    };
    let mut seen = std::collections::BTreeSet::new();
    requested.retain(|s| seen.insert(s.clone()));

    let target = target_dir()?;
    // Scenarios that could not be built, with why.
    let mut broken: BTreeMap<String, String> = BTreeMap::new();
    let bins: Vec<&String> = requested
        .iter()
        .filter(|s| *s != CRITERION_SCENARIO)
        .collect();
    if !bins.is_empty() {
        let build = |names: &[&String]| -> Result<bool> {
            let mut cmd = cargo();
            cmd.args(["build", "--release", "-p", "replimesh-benches"]);
            if args.is_empty() {
                cmd.arg("--bins");
            } else {
                for name in names {
                    cmd.args(["--bin", &format!("bench-{name}")]);
                }
            }
            Ok(cmd.status().context("running cargo build")?.success())
        };
        section("build: cargo build --release -p replimesh-benches (scenario binaries)");
        if !build(&bins)? {
            // One broken scenario must not stop the others: build them one by one.
            eprintln!("building all at once failed; building each scenario on its own");
            for name in &bins {
                let mut cmd = cargo();
                cmd.args(["build", "--release", "-p", "replimesh-benches"])
                    .args(["--bin", &format!("bench-{name}")]);
                if !cmd.status().context("running cargo build")?.success() {
                    broken.insert(name.to_string(), "build failed".to_string());
                }
            }
        }
    }

    // The criterion bench executable, built here, outside the scenario's
    // timeout, and run directly (so edits made meanwhile cause no rebuild).
    let mut criterion_exe = None;
    if requested.iter().any(|s| s == CRITERION_SCENARIO) {
        section("build: cargo bench -p replimesh-benches --bench codec --no-run");
        match build_criterion(CRITERION_SCENARIO) {
            Ok(exe) => criterion_exe = Some(exe),
            Err(e) => {
                broken.insert(CRITERION_SCENARIO.to_string(), format!("{e:#}"));
            }
        }
    }

    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for scenario in &requested {
        section(&format!("scenario {scenario}"));
        let started = Instant::now();
        let result = if let Some(why) = broken.get(scenario) {
            Err(anyhow::anyhow!("{why}"))
        } else if let (true, Some(exe)) = (scenario == CRITERION_SCENARIO, &criterion_exe) {
            run_criterion(scenario, exe, &target)
        } else {
            run_binary(scenario, &target)
        };
        match result {
            Ok(mut r) => {
                eprintln!(
                    "scenario {scenario}: {} results in {:.1} s",
                    r.len(),
                    started.elapsed().as_secs_f64()
                );
                rows.append(&mut r);
            }
            Err(e) => {
                eprintln!("scenario {scenario} FAILED: {e:#}");
                failed.push(scenario.clone());
            }
        }
    }

    let out_dir = target.join("bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let path = out_dir.join("results.json");
    let array = Value::Array(rows.iter().map(Row::to_json).collect());
    let text = serde_json::to_string_pretty(&array)?;
    std::fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;

    println!();
    print_table(&rows);
    println!("\nwrote {} ({} results)", path.display(), rows.len());
    if failed.is_empty() {
        Ok(true)
    } else {
        eprintln!("failed scenarios: {}", failed.join(", "));
        Ok(false)
    }
}

fn section(title: &str) {
    eprintln!("\n==== {title} ====");
}

/// Runs `bench-<scenario>` and parses its JSON lines.
fn run_binary(scenario: &str, target: &Path) -> Result<Vec<Row>> {
    let exe = target.join("release").join(format!("bench-{scenario}"));
    if !exe.is_file() {
        bail!("{} was not built", exe.display());
    }
    let mut cmd = Command::new(&exe);
    cmd.current_dir(root());
    let (status, stdout) = run_with_timeout(cmd, SCENARIO_TIMEOUT)?;
    let mut rows = Vec::new();
    let mut bad = 0;
    for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match Row::from_line(scenario, line) {
            Ok(row) => rows.push(row),
            Err(e) => {
                bad += 1;
                eprintln!("bench-{scenario}: ignoring stdout line ({e:#}): {line}");
            }
        }
    }
    if !status {
        bail!("bench-{scenario} exited with an error");
    }
    if rows.is_empty() {
        bail!("bench-{scenario} reported no results ({bad} unreadable lines)");
    }
    Ok(rows)
}

/// Runs the criterion bench and converts medians to frames per second.
/// Builds the criterion bench `name` and returns its executable.
fn build_criterion(name: &str) -> Result<PathBuf> {
    let out = cargo()
        .args([
            "bench",
            "-p",
            "replimesh-benches",
            "--bench",
            name,
            "--no-run",
        ])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo bench --no-run")?;
    if !out.status.success() {
        bail!("build failed");
    }
    let mut exe = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let is_bench = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bench"));
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == name && is_bench {
            if let Some(path) = msg["executable"].as_str() {
                exe = Some(PathBuf::from(path));
            }
        }
    }
    exe.with_context(|| format!("cargo reported no executable for bench {name}"))
}

fn run_criterion(scenario: &str, exe: &Path, target: &Path) -> Result<Vec<Row>> {
    // A private criterion home, emptied first, so no stale result is read back.
    let home = target.join("bench").join("criterion");
    if home.exists() {
        std::fs::remove_dir_all(&home).with_context(|| format!("removing {}", home.display()))?;
    }
    // As `cargo bench` runs it: from the package directory, with `--bench`.
    let mut cmd = Command::new(exe);
    cmd.arg("--bench")
        .current_dir(root().join("benches"))
        .env("CRITERION_HOME", &home);
    let (ok, stdout) = run_with_timeout(cmd, SCENARIO_TIMEOUT)?;
    // Criterion's own report goes to stdout; pass it on for the curious.
    eprint!("{stdout}");
    if !ok {
        bail!("{} --bench failed", exe.display());
    }
    let mut estimates = Vec::new();
    find_estimates(&home, &mut estimates)?;
    estimates.sort();
    let mut rows = Vec::new();
    for path in estimates {
        rows.push(
            criterion_row(scenario, &path)
                .with_context(|| format!("reading {}", path.display()))?,
        );
    }
    if rows.is_empty() {
        bail!("criterion wrote no estimates under {}", home.display());
    }
    // Group by parameters (numbers compared as numbers), encode before decode.
    rows.sort_by_cached_key(|r| {
        let key: Vec<(String, u64)> = r
            .params
            .values()
            .map(|v| {
                (
                    v.as_str().unwrap_or("").to_string(),
                    v.as_u64().unwrap_or(0),
                )
            })
            .collect();
        (key, std::cmp::Reverse(r.metric.clone()))
    });
    Ok(rows)
}

/// Collects every `**/new/estimates.json` under `dir`.
fn find_estimates(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            // `report` holds HTML only.
            if path.file_name().is_some_and(|n| n == "report") {
                continue;
            }
            find_estimates(&path, out)?;
        } else if path.file_name().is_some_and(|n| n == "estimates.json")
            && path
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n == "new")
        {
            out.push(path);
        }
    }
    Ok(())
}

/// One result from criterion's `new/estimates.json` and `new/benchmark.json`.
///
/// The bench id is `<group>/<metric>/<param>=<value>,...`, e.g.
/// `codec/encode/frame=data,payload=64`; the throughput is the number of
/// frames per iteration (`Throughput::Elements`).
fn criterion_row(scenario: &str, estimates: &Path) -> Result<Row> {
    let est: Value = serde_json::from_str(&std::fs::read_to_string(estimates)?)?;
    let median_ns = est["median"]["point_estimate"]
        .as_f64()
        .context("no median.point_estimate")?;
    let bench_path = estimates.with_file_name("benchmark.json");
    let bench: Value = serde_json::from_str(
        &std::fs::read_to_string(&bench_path)
            .with_context(|| format!("reading {}", bench_path.display()))?,
    )?;
    let metric = bench["function_id"]
        .as_str()
        .or_else(|| bench["group_id"].as_str())
        .context("no function_id")?
        .to_string();
    let elements = bench["throughput"]["Elements"].as_f64().unwrap_or(1.0);
    let mut params = Map::new();
    if let Some(value_str) = bench["value_str"].as_str() {
        for part in value_str.split(',') {
            match part.split_once('=') {
                Some((k, v)) => {
                    let v = v
                        .parse::<u64>()
                        .map(Value::from)
                        .unwrap_or_else(|_| Value::from(v));
                    params.insert(k.to_string(), v);
                }
                None => {
                    params.insert("param".to_string(), Value::from(part));
                }
            }
        }
    }
    if median_ns <= 0.0 {
        bail!("median time is {median_ns} ns");
    }
    Ok(Row {
        scenario: scenario.to_string(),
        metric,
        value: elements * 1e9 / median_ns,
        unit: "frames/s".to_string(),
        params,
    })
}

/// Runs `cmd` in its own process group with piped stdout, inherited stderr.
/// Returns (success, stdout). On timeout the whole group is killed.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<(bool, String)> {
    use std::os::unix::process::CommandExt;
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(Stdio::null())
        .process_group(0);
    let mut child = cmd.spawn().context("spawning the scenario")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut buf = String::new();
        let mut r = BufReader::new(stdout);
        let res = r.read_to_string(&mut buf);
        let _ = tx.send(());
        res.map(|_| buf)
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Some(status) = status else {
        kill_group(&mut child);
        let _ = rx.recv_timeout(Duration::from_secs(5));
        bail!("timed out after {} s and was killed", timeout.as_secs());
    };
    // Grandchildren that outlive the scenario would hold the pipe open.
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        kill_group(&mut child);
        let _ = rx.recv_timeout(Duration::from_secs(5));
    }
    let out = match reader.join() {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e).context("reading the scenario's stdout"),
        Err(_) => bail!("stdout reader panicked"),
    };
    Ok((status.success(), out))
}

/// Kills the process group led by `child` (it was spawned with `process_group(0)`).
fn kill_group(child: &mut Child) {
    let pgid = child.id();
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

fn print_table(rows: &[Row]) {
    let header = ["scenario", "metric", "value", "unit", "params"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.clone(),
                r.metric.clone(),
                format_value(r.value),
                r.unit.clone(),
                format_params(&r.params),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: [&str; 5]| {
        format!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {}",
            cols[0],
            cols[1],
            cols[2],
            cols[3],
            cols[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        )
    };
    println!("{}", line(header));
    println!(
        "{}",
        line(widths.map(|w| "-".repeat(w)).each_ref().map(String::as_str))
    );
    for row in &cells {
        println!("{}", line(row.each_ref().map(String::as_str)).trim_end());
    }
}

/// Human-friendly number: thousands separators for large values, three
/// significant digits for small ones.
fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v.abs() >= 1000.0 {
        let int = v.round() as i128;
        let digits = int.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, ch) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        if int < 0 {
            out.insert(0, '-');
        }
        out
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn format_params(params: &Map<String, Value>) -> String {
    let sorted: BTreeMap<&String, &Value> = params.iter().collect();
    sorted
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The checks of `.ci/run`, without installing anything.
fn ci() -> Result<bool> {
    /// (title, cargo arguments, extra environment variable)
    type Step<'a> = (&'a str, &'a [&'a str], Option<(&'a str, &'a str)>);
    let steps: [Step<'_>; 4] = [
        (
            "cargo fmt --all -- --check",
            &["fmt", "--all", "--", "--check"],
            None,
        ),
        (
            "cargo clippy --workspace --all-targets -- -D warnings",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            None,
        ),
        ("cargo test --workspace", &["test", "--workspace"], None),
        (
            "RUSTDOCFLAGS=-Dwarnings cargo doc --workspace --no-deps",
            &["doc", "--workspace", "--no-deps"],
            Some(("RUSTDOCFLAGS", "-Dwarnings")),
        ),
    ];
    section("cargo xtask tidy");
    if !tidy::tidy(&root())? {
        eprintln!("FAILED: cargo xtask tidy");
        return Ok(false);
    }
    for (title, args, env) in steps {
        section(title);
        let mut cmd = cargo();
        cmd.args(args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let status = cmd.status().with_context(|| format!("running {title}"))?;
        if !status.success() {
            eprintln!("FAILED: {title}");
            return Ok(false);
        }
    }
    section("ci: all checks passed");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_formatted_for_people() {
        assert_eq!(format_value(3_123_456.7), "3,123,457");
        assert_eq!(format_value(1000.0), "1,000");
        assert_eq!(format_value(512.25), "512.2");
        assert_eq!(format_value(0.8123), "0.812");
        assert_eq!(format_value(-12_345.0), "-12,345");
    }

    #[test]
    fn result_lines_are_parsed_and_checked() {
        let line = r#"{"scenario":"transport-tcp","metric":"throughput","value":12.5,"unit":"MB/s","params":{"payload":64}}"#;
        let row = Row::from_line("transport-tcp", line).unwrap();
        assert_eq!(row.metric, "throughput");
        assert_eq!(row.value, 12.5);
        assert_eq!(format_params(&row.params), "payload=64");
        assert!(Row::from_line("transport-unix", line).is_err());
        assert!(Row::from_line("transport-tcp", "not json").is_err());
    }

    #[test]
    fn scenarios_include_codec() {
        let known = known_scenarios().unwrap();
        assert_eq!(known.first().map(String::as_str), Some("codec"));
    }
}
