//! The `replimesh` command line, run as the real binary: help on every
//! command, version, suggestions for mistyped flags, value checks,
//! `node --check`, shell completions and the log formats.
//!
//! Every run has a deadline: a command that does not end in time is killed
//! and the test fails.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_replimesh");

/// Generous: a debug binary on a loaded machine. Only a hang reaches it.
const DEADLINE: Duration = Duration::from_secs(120);

/// Runs the binary with `args`, extra environment `envs` and `stdin`, killing
/// it after [`DEADLINE`]. The log variables of the caller are not passed on.
fn run_env(args: &[&str], envs: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("REPLIMESH_LOG")
        .env_remove("REPLIMESH_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn replimesh");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("wait for replimesh"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!(
                "`replimesh {}` did not end within {DEADLINE:?}",
                args.join(" ")
            );
        }
    }
}

fn run(args: &[&str]) -> Output {
    run_env(args, &[], None)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts the exit code, showing both streams when it differs.
fn assert_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}\n--- stdout:\n{}\n--- stderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn every_command_has_help_naming_its_options() {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--help"],
            &[
                "node",
                "demo",
                "backup",
                "hash-password",
                "completions",
                "REPLIMESH_LOG",
            ],
        ),
        (&["help"], &["node", "demo", "backup"]),
        (
            &["node", "--help"],
            &["--config", "--check", "--log-format"],
        ),
        (
            &["demo", "--help"],
            &[
                "--duration",
                "--clones",
                "--keep-running",
                "--admin",
                "--rate",
                "--log-format",
                "REPLIMESH_LOG_FORMAT",
                "[default: 5]",
                "[default: 3]",
            ],
        ),
        (&["demo", "-h"], &["--duration", "--rate", "--admin"]),
        (&["help", "demo"], &["--duration", "--keep-running"]),
        (&["backup", "--help"], &["inspect", "verify"]),
        (&["backup", "inspect", "--help"], &["<FILE>", "--key-file"]),
        (&["backup", "verify", "--help"], &["<FILE>", "--key-file"]),
        (&["hash-password", "--help"], &["stdin", "Argon2id"]),
        (&["completions", "--help"], &["bash", "zsh", "fish"]),
    ];
    for (args, names) in cases {
        let what = format!("replimesh {}", args.join(" "));
        let out = run(args);
        assert_code(&out, 0, &what);
        let help = text(&out.stdout);
        assert!(help.contains("Usage: replimesh"), "{what}: {help}");
        for name in *names {
            assert!(
                help.contains(name),
                "{what} does not name `{name}`:\n{help}"
            );
        }
        assert!(out.stderr.is_empty(), "{what}: {}", text(&out.stderr));
    }
}

#[test]
fn version_is_printed() {
    let want = format!("replimesh {}\n", env!("CARGO_PKG_VERSION"));
    for args in [&["--version"][..], &["-V"], &["version"]] {
        let out = run(args);
        assert_code(&out, 0, &args.join(" "));
        assert_eq!(text(&out.stdout), want);
    }
}

#[test]
fn no_command_prints_usage_and_exits_2() {
    let out = run(&[]);
    assert_code(&out, 2, "no arguments");
    let err = text(&out.stderr);
    assert!(
        err.contains("Usage: replimesh") && err.contains("demo"),
        "{err}"
    );
}

#[test]
fn usage_errors_suggest_the_right_flag_and_exit_2() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["demo", "--duraton", "1"], &["--duraton", "--duration"]),
        (&["demo", "--keep-runing"], &["--keep-running"]),
        (&["node", "--confg", "x.toml"], &["--config"]),
        (&["nod"], &["node"]),
        (&["backup", "inspekt", "f"], &["inspect"]),
        (&["node"], &["--config <FILE>"]),
        (&["backup", "verify"], &["<FILE>"]),
        (&["demo", "extra"], &["extra"]),
        (&["hash-password", "extra"], &["extra"]),
        (&["completions", "tcsh"], &["tcsh", "bash"]),
        (&["demo", "--log-format", "xml"], &["xml", "json"]),
        // The value checks of the hand-written parser, with its messages.
        (&["demo", "--duration", "0"], &["between 0.1 and 86400"]),
        (&["demo", "--duration", "soon"], &["`soon` is not a number"]),
        (
            &["demo", "--clones", "17"],
            &["`17` is not a number from 1 to 16"],
        ),
        (&["demo", "--clones", "0"], &["from 1 to 16"]),
        (&["demo", "--rate", "0"], &["`0` is not a positive number"]),
        (&["demo", "--rate"], &["--rate <N>"]),
    ];
    for (args, names) in cases {
        let what = format!("replimesh {}", args.join(" "));
        let out = run(args);
        assert_code(&out, 2, &what);
        let err = text(&out.stderr);
        assert!(err.starts_with("error:"), "{what}: {err}");
        for name in *names {
            assert!(
                err.contains(name),
                "{what}: error does not name `{name}`:\n{err}"
            );
        }
        assert!(out.stdout.is_empty(), "{what}: {}", text(&out.stdout));
    }
    // An invalid REPLIMESH_LOG_FORMAT is a usage error too, not ignored.
    let out = run_env(
        &["demo", "--duration", "0.1"],
        &[("REPLIMESH_LOG_FORMAT", "xml")],
        None,
    );
    assert_code(&out, 2, "REPLIMESH_LOG_FORMAT=xml");
    assert!(text(&out.stderr).contains("xml"), "{}", text(&out.stderr));
}

#[test]
fn node_check_validates_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "id = \"n1\"\nadmin = \"127.0.0.1:0\"\n[[listen]]\nurl = \"tcp://127.0.0.1:0\"\n\
         [[store]]\nname = \"counter\"\nreducer = \"counter\"\n",
    )
    .unwrap();
    // A node would run until signalled: ending with 0 means nothing started.
    let out = run(&["node", "--config", good.to_str().unwrap(), "--check"]);
    assert_code(&out, 0, "--check on a good config");
    assert_eq!(
        text(&out.stdout),
        format!("config OK: {}\n", good.display())
    );
    assert!(!text(&out.stdout).contains("listening"));

    // The commented example of docs/config.md is valid.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/node.toml");
    let out = run(&["node", "--check", "--config", example]);
    assert_code(&out, 0, "--check on examples/node.toml");
    assert!(text(&out.stdout).starts_with("config OK: "));

    let cases = [
        ("[limits]\nmax_frame = \"huge\"\n", "limits.max_frame"),
        (
            "[[store]]\nname = \"s\"\nmode = \"turbo\"\n",
            "store[0].mode",
        ),
        (
            "[[listen]]\nurl = \"wss://127.0.0.1:1/\"\n",
            "listen[0].cert",
        ),
        ("colour = \"red\"\n", "colour"),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let bad = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&bad, toml).unwrap();
        let out = run(&["node", "--config", bad.to_str().unwrap(), "--check"]);
        assert_code(&out, 1, toml);
        let err = text(&out.stderr);
        assert!(
            err.contains(key),
            "{toml}: error does not name `{key}`: {err}"
        );
        assert!(!text(&out.stdout).contains("config OK"));
    }
    let missing = dir.path().join("missing.toml");
    let out = run(&["node", "--config", missing.to_str().unwrap(), "--check"]);
    assert_code(&out, 1, "--check on a missing file");
    assert!(text(&out.stderr).contains("missing.toml"));
}

#[test]
fn completions_print_scripts() {
    let cases = [
        ("bash", "complete -F _replimesh"),
        ("zsh", "#compdef replimesh"),
        ("fish", "complete -c replimesh"),
    ];
    for (shell, marker) in cases {
        let out = run(&["completions", shell]);
        assert_code(&out, 0, shell);
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell}: no `{marker}`:\n{script}");
        for word in ["demo", "duration", "key-file", "check", "log-format"] {
            assert!(script.contains(word), "{shell}: no `{word}`");
        }
    }
}

const NODE_TOML: &str =
    "id = \"n1\"\nadmin = \"127.0.0.1:0\"\n[[listen]]\nurl = \"tcp://127.0.0.1:0\"\n";

/// Starts a node with logs at `info`, waits for `ready`, stops it with
/// SIGTERM and returns its stderr.
fn node_stderr(args: &[&str], envs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, NODE_TOML).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["node", "--config"])
        .arg(&path)
        .args(args)
        .env("REPLIMESH_LOG", "info")
        .env_remove("REPLIMESH_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn replimesh node");
    let pid = child.id().to_string();
    let kill = |signal: &str| {
        let _ = Command::new("kill").args([signal, &pid]).status();
    };
    let stdout = child.stdout.take().expect("stdout pipe");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        match rx.recv_timeout(DEADLINE) {
            Ok(line) if line == "ready" => break,
            Ok(_) => {}
            Err(e) => {
                kill("-KILL");
                panic!("the node did not print `ready` ({e})");
            }
        }
    }
    kill("-TERM");
    let (tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match done.recv_timeout(DEADLINE) {
        Ok(out) => out.expect("wait for the node"),
        Err(_) => {
            kill("-KILL");
            panic!("the node did not stop on SIGTERM within {DEADLINE:?}");
        }
    };
    assert_code(&out, 0, "node stopped by SIGTERM");
    text(&out.stderr)
}

/// Every non-empty line of `err` is a JSON log object, and the start-up
/// line `message` is one of them.
fn assert_json_lines(err: &str, message: &str) {
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log line");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["fields"]["message"] == message
        }),
        "no `{message}` line: {err}"
    );
}

#[test]
fn node_log_format_json_prints_json_lines() {
    let err = node_stderr(&["--log-format", "json"], &[]);
    assert_json_lines(&err, "replimesh node starting");
}

#[test]
fn node_log_format_from_the_environment() {
    let err = node_stderr(&[], &[("REPLIMESH_LOG_FORMAT", "json")]);
    assert_json_lines(&err, "replimesh node starting");
    // The flag wins over the environment.
    let err = node_stderr(
        &["--log-format", "text"],
        &[("REPLIMESH_LOG_FORMAT", "json")],
    );
    assert!(
        err.contains("INFO") && err.contains("replimesh node starting"),
        "{err}"
    );
    assert!(!err.contains("{\""), "{err}");
}

#[test]
fn text_logs_have_no_colour_codes_off_a_terminal() {
    // stderr is a pipe here; text is the default format.
    let err = node_stderr(&[], &[]);
    assert!(err.contains("replimesh node starting"), "{err}");
    assert!(!err.contains('\x1b'), "colour codes in a pipe: {err:?}");
}

#[test]
fn demo_log_format_json_prints_json_lines() {
    let out = run_env(
        &[
            "demo",
            "--duration",
            "0.5",
            "--clones",
            "1",
            "--rate",
            "100",
            "--log-format",
            "json",
        ],
        &[("REPLIMESH_LOG", "info")],
        None,
    );
    // The demo's own verdict (exit 0 or 1) is tested in tests/demo.rs;
    // here only its logs count, and that it ran to its summary.
    assert!(
        matches!(out.status.code(), Some(0 | 1)) && text(&out.stdout).contains("demo: "),
        "{out:?}"
    );
    assert_json_lines(&text(&out.stderr), "replimesh demo starting");
}

#[test]
fn hash_password_reads_stdin() {
    let out = run_env(&["hash-password"], &[], Some("s3cret\n"));
    assert_code(&out, 0, "hash-password");
    assert!(
        text(&out.stdout).starts_with("$argon2id$"),
        "{}",
        text(&out.stdout)
    );
    let out = run_env(&["hash-password"], &[], Some("\n"));
    assert_code(&out, 1, "hash-password without a password");
    assert!(text(&out.stderr).contains("standard input"));
}
