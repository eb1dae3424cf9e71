//! The `replimesh` binary: `node`, `demo` and `backup` commands.

use std::path::PathBuf;
use std::process::ExitCode;

use replimesh_cli::backup_cmd;

const USAGE: &str = "\
replimesh: a messaging mesh and a replicated store

USAGE:
    replimesh node --config FILE        run a node (see docs/config.md)
    replimesh demo [--duration SECS] [--clones N] [--keep-running]
                                        run a small mesh with a store on loopback
    replimesh backup inspect FILE [--key-file F]
                                        print a backup file's header and seq
    replimesh backup verify FILE [--key-file F]
                                        check that a backup file decrypts
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

#[allow(dead_code)] // used by `demo` (next step)
fn take_flag(args: &mut Vec<String>, name: &str) -> bool {
    match args.iter().position(|a| a == name) {
        Some(i) => {
            args.remove(i);
            true
        }
        None => false,
    }
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
        other => {
            eprint!("{USAGE}");
            anyhow::bail!("unknown command `{other}`")
        }
    }
}
