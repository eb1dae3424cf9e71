//! The `replimesh` binary: `node`, `demo` and `backup` commands.

use std::path::PathBuf;
use std::process::ExitCode;

use replimesh_cli::backup_cmd;

const USAGE: &str = "\
replimesh: a messaging mesh and a replicated store

USAGE:
    replimesh node --config FILE        run a node (see docs/config.md)
    replimesh demo [--duration SECS] [--clones N] [--keep-running] [--admin ADDR] [--rate N]
                                        run a small mesh with a store on loopback
                                        (default 5 s, 3 clones; --keep-running: until Ctrl-C)
    replimesh backup inspect FILE [--key-file F]
                                        print a backup file's header and seq
    replimesh backup verify FILE [--key-file F]
                                        check that a backup file decrypts
    replimesh hash-password             read a password on stdin, print its Argon2id
                                        PHC string (for `logins` in node.toml)
    replimesh help | --help | --version
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("replimesh: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Takes the value of `--name VALUE` or `--name=VALUE` out of `args`.
fn take_opt(args: &mut Vec<String>, name: &str) -> anyhow::Result<Option<String>> {
    let eq = format!("{name}=");
    if let Some(i) = args.iter().position(|a| a == name) {
        if i + 1 >= args.len() {
            anyhow::bail!("{name} needs a value");
        }
        let v = args.remove(i + 1);
        args.remove(i);
        return Ok(Some(v));
    }
    if let Some(i) = args.iter().position(|a| a.starts_with(&eq)) {
        let v = args.remove(i)[eq.len()..].to_owned();
        return Ok(Some(v));
    }
    Ok(None)
}

fn take_flag(args: &mut Vec<String>, name: &str) -> bool {
    match args.iter().position(|a| a == name) {
        Some(i) => {
            args.remove(i);
            true
        }
        None => false,
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REPLIMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn no_more(args: &[String]) -> anyhow::Result<()> {
    match args.first() {
        Some(a) => anyhow::bail!("unexpected argument `{a}` (see `replimesh help`)"),
        None => Ok(()),
    }
}

fn run(mut args: Vec<String>) -> anyhow::Result<ExitCode> {
    if args.is_empty() {
        eprint!("{USAGE}");
        return Ok(ExitCode::from(2));
    }
    let cmd = args.remove(0);
    match cmd.as_str() {
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "--version" | "-V" | "version" => {
            println!("replimesh {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        "backup" => {
            if args.is_empty() {
                anyhow::bail!("backup needs `inspect FILE` or `verify FILE`");
            }
            let sub = args.remove(0);
            let key_file = take_opt(&mut args, "--key-file")?.map(PathBuf::from);
            if args.is_empty() {
                anyhow::bail!("backup {sub} needs a FILE");
            }
            let file = PathBuf::from(args.remove(0));
            no_more(&args)?;
            let out = match sub.as_str() {
                "inspect" => backup_cmd::inspect(&file, key_file.as_deref())?,
                "verify" => backup_cmd::verify(&file, key_file.as_deref())?,
                other => anyhow::bail!("unknown backup command `{other}` (inspect or verify)"),
            };
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        "demo" => {
            let mut opts = replimesh_cli::demo::DemoOptions::default();
            if let Some(d) = take_opt(&mut args, "--duration")? {
                let secs: f64 = d
                    .trim_end_matches('s')
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--duration: `{d}` is not a number of seconds"))?;
                if !(0.1..=86_400.0).contains(&secs) {
                    anyhow::bail!("--duration: must be between 0.1 and 86400 seconds");
                }
                opts.duration = std::time::Duration::from_secs_f64(secs);
            }
            if let Some(c) = take_opt(&mut args, "--clones")? {
                opts.clones = c
                    .parse()
                    .ok()
                    .filter(|n| (1..=16).contains(n))
                    .ok_or_else(|| {
                        anyhow::anyhow!("--clones: `{c}` is not a number from 1 to 16")
                    })?;
            }
            if let Some(a) = take_opt(&mut args, "--admin")? {
                opts.admin = a;
            }
            if let Some(r) = take_opt(&mut args, "--rate")? {
                opts.rate = r
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| anyhow::anyhow!("--rate: `{r}` is not a positive number"))?;
            }
            opts.keep_running = take_flag(&mut args, "--keep-running");
            no_more(&args)?;
            init_tracing();
            let summary = runtime()?.block_on(replimesh_cli::demo::run(opts))?;
            Ok(if summary.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        "hash-password" => {
            no_more(&args)?;
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let pw = line.trim_end_matches(['\n', '\r']);
            if pw.is_empty() {
                anyhow::bail!("hash-password: give the password on standard input");
            }
            let hash = replimesh::store::hash_password(pw, replimesh::store::HashCost::default())?;
            println!("{hash}");
            Ok(ExitCode::SUCCESS)
        }
        "node" => {
            let config = take_opt(&mut args, "--config")?
                .ok_or_else(|| anyhow::anyhow!("node needs --config FILE"))?;
            no_more(&args)?;
            let config = replimesh_cli::config::NodeConfig::load(config.as_ref())?;
            init_tracing();
            runtime()?.block_on(replimesh_cli::node::run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprint!("{USAGE}");
            anyhow::bail!("unknown command `{other}`")
        }
    }
}
