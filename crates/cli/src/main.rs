//! The `replimesh` binary: `node`, `demo`, `backup`, `hash-password`,
//! `completions` and the admin commands (`clone`, `auth-out`, `group`,
//! `publish`, `clients`), parsed with clap (`replimesh COMMAND --help`).
//!
//! Exit codes: 0 success, 1 a failure at run time (bad configuration file,
//! unreadable backup, demo invariants broken), 2 a usage error (unknown or
//! missing argument, a value out of range).

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum, ValueHint};
use replimesh_cli::backup_cmd;
use replimesh_cli::demo::DemoOptions;

/// A messaging mesh and a replicated store.
///
/// Logs go to stderr; their level is set with the environment variable
/// REPLIMESH_LOG (e.g. `info`, `replimesh_mesh=debug`; default `warn`).
#[derive(Debug, Parser)]
#[command(
    name = "replimesh",
    version,
    propagate_version = true,
    arg_required_else_help = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node from its configuration file (see docs/config.md).
    ///
    /// The node prints its bound URLs (`listening ...`), `admin http://...`
    /// and `ready` on stdout; SIGTERM or SIGINT stops it cleanly (final
    /// backups written, exit code 0).
    Node(NodeArgs),
    /// Run a small mesh with a replicated store on loopback.
    ///
    /// Starts the clones in this process, a `counter` store with an encrypted
    /// backup in a temporary directory, and traffic (publishers, subscribers,
    /// replicas); prints progress and a dashboard URL while it runs and a
    /// summary at the end. Exits 1 if a message was lost or duplicated, the
    /// replicas differ or the backup does not read back.
    Demo(DemoArgs),
    /// Inspect or verify backup files (layout: docs/backup-format.md).
    #[command(subcommand, arg_required_else_help = true)]
    Backup(BackupCommand),
    /// Read a password on stdin, print its Argon2id PHC string.
    ///
    /// The string goes into a store's `logins` in node.toml, so the file
    /// holds no plain password.
    HashPassword,
    /// Print a shell completion script on stdout.
    ///
    /// For example: `replimesh completions bash > /etc/bash_completion.d/replimesh`,
    /// `replimesh completions zsh > ~/.zfunc/_replimesh`,
    /// `replimesh completions fish > ~/.config/fish/completions/replimesh.fish`.
    Completions {
        /// The shell to write the script for.
        #[arg(value_enum, value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Link the node to a clone, or unlink one (admin write endpoints).
    #[command(subcommand, arg_required_else_help = true)]
    Clone(CloneCommand),
    /// Replace the auth value the node sends when it dials clones.
    #[command(subcommand, name = "auth-out", arg_required_else_help = true)]
    AuthOut(AuthOutCommand),
    /// Create or delete a group.
    #[command(subcommand, arg_required_else_help = true)]
    Group(GroupCommand),
    /// Publish a message to groups on every clone.
    Publish(PublishArgs),
    /// List the node's mesh clients, or disconnect one.
    #[command(subcommand, arg_required_else_help = true)]
    Clients(ClientsCommand),
    /// Print the version (same as --version).
    #[command(hide = true)]
    Version,
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// The node's configuration file (TOML, see docs/config.md).
    #[arg(long, value_name = "FILE", value_hint = ValueHint::FilePath)]
    config: PathBuf,
    /// Only validate the configuration: print `config OK: FILE` and exit 0, or
    /// name the wrong key and exit 1. Starts nothing.
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// How long traffic runs, in seconds (0.1 to 86400; a trailing `s` is
    /// allowed: `2.5s`).
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_duration)]
    duration: Duration,
    /// Number of clones (nodes) in the mesh, from 1 to 16.
    #[arg(long, value_name = "N", default_value = "3", value_parser = parse_clones)]
    clones: usize,
    /// Run until Ctrl-C instead of --duration.
    #[arg(long)]
    keep_running: bool,
    /// Address of the admin HTTP server and dashboard (port 0: a free port;
    /// the URL is printed).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    admin: String,
    /// Messages per second per publisher (at least 1).
    #[arg(long, value_name = "N", default_value = "2000", value_parser = parse_rate)]
    rate: u64,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Print a backup file's header, and with the key (or for an unencrypted
    /// file) its store, schema, history id and seq.
    Inspect(BackupArgs),
    /// Check that a backup file is intact and decrypts with the key.
    Verify(BackupArgs),
}

#[derive(Debug, Args)]
struct BackupArgs {
    /// The backup file (snapshot or journal).
    #[arg(value_name = "FILE", value_hint = ValueHint::FilePath)]
    file: PathBuf,
    /// The file holding the backup key (the store's `backup.key_file`).
    #[arg(long, value_name = "F", value_hint = ValueHint::FilePath)]
    key_file: Option<PathBuf>,
}

/// Where the node's admin server is and the write token.
#[derive(Debug, Args)]
struct AdminArgs {
    /// The node's admin URL (`http://HOST:PORT`, its `admin` setting).
    #[arg(long, value_name = "URL", env = "REPLIMESH_ADMIN")]
    admin: String,
    /// A file whose first line is the write token
    /// (`security.admin_write_token`).
    #[arg(long, value_name = "F", env = "REPLIMESH_ADMIN_TOKEN_FILE", value_hint = ValueHint::FilePath)]
    token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum CloneCommand {
    /// Link to a clone (a known id moves to the new URL).
    Add {
        /// The clone's id.
        id: String,
        /// The URL to dial (tcp://, tls://, unix://, ws://, wss://).
        url: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Unlink a clone and stop dialing it.
    Delete {
        /// The clone's id.
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
enum AuthOutCommand {
    /// Set the value (every clone link is closed and dialed again with it).
    Set {
        /// A file whose first line is the new value (kept off the command line).
        #[arg(long, value_name = "F", value_hint = ValueHint::FilePath)]
        value_file: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a group that lasts until deleted.
    Create {
        /// The group's name.
        name: String,
        /// The group's user data.
        #[arg(long, value_name = "TEXT", default_value = "")]
        data: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a group here and on every clone.
    Delete {
        /// The group's name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Args)]
struct PublishArgs {
    /// The groups to publish to.
    #[arg(value_name = "GROUP", required_unless_present = "all")]
    groups: Vec<String>,
    /// Publish to every group instead.
    #[arg(long, conflicts_with = "groups")]
    all: bool,
    /// The message (sent as its UTF-8 bytes).
    #[arg(long, value_name = "TEXT")]
    data: String,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Debug, Subcommand)]
enum ClientsCommand {
    /// List the node's mesh clients (key, id, address, groups).
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Close a client's connection (it may reconnect).
    Disconnect {
        /// The client's key (from `clients list`).
        key: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Args)]
struct LogArgs {
    /// Log line format on stderr: `text` (coloured only on a terminal, and
    /// not with NO_COLOR set) or `json` (one JSON object per line).
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        env = "REPLIMESH_LOG_FORMAT",
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans).
    Json,
}

/// `--duration`: seconds, optionally followed by `s`, within 0.1..=86400.
fn parse_duration(d: &str) -> Result<Duration, String> {
    let secs: f64 = d
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("`{d}` is not a number of seconds"))?;
    if !(0.1..=86_400.0).contains(&secs) {
        return Err("must be between 0.1 and 86400 seconds".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `--clones`: 1..=16.
fn parse_clones(c: &str) -> Result<usize, String> {
    c.parse()
        .ok()
        .filter(|n| (1..=16).contains(n))
        .ok_or_else(|| format!("`{c}` is not a number from 1 to 16"))
}

/// `--rate`: at least 1.
fn parse_rate(r: &str) -> Result<u64, String> {
    r.parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("`{r}` is not a positive number"))
}

fn main() -> ExitCode {
    // Usage errors exit 2, --help and --version 0 (clap's conventions).
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("replimesh: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REPLIMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
            builder
                .with_ansi(std::io::stderr().is_terminal() && !no_color)
                .init();
        }
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
fn print_out(text: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// A client of the admin server that `a` names.
fn admin_client(a: &AdminArgs) -> anyhow::Result<replimesh_cli::admin::AdminClient> {
    let token = match &a.token_file {
        Some(f) => Some(replimesh_cli::config::read_secret("--token-file", f)?),
        None => None,
    };
    Ok(replimesh_cli::admin::AdminClient::new(&a.admin, token)?)
}

/// Runs one admin request and prints its JSON answer.
fn admin_call<F, Fut>(a: &AdminArgs, f: F) -> anyhow::Result<()>
where
    F: FnOnce(replimesh_cli::admin::AdminClient) -> Fut,
    Fut: std::future::Future<
        Output = Result<serde_json::Value, replimesh_cli::admin::AdminClientError>,
    >,
{
    let client = admin_client(a)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = rt.block_on(f(client))?;
    print_out(format!("{}\n", serde_json::to_string_pretty(&answer)?).as_bytes())
}

/// The admin subcommands.
fn run_admin(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Clone(CloneCommand::Add { id, url, admin }) => {
            admin_call(&admin, |c| async move { c.add_clone(&id, &url).await })
        }
        Command::Clone(CloneCommand::Delete { id, admin }) => {
            admin_call(&admin, |c| async move { c.delete_clone(&id).await })
        }
        Command::AuthOut(AuthOutCommand::Set { value_file, admin }) => {
            let value = replimesh_cli::config::read_secret("--value-file", &value_file)?;
            admin_call(&admin, |c| async move { c.set_auth_out(&value).await })
        }
        Command::Group(GroupCommand::Create { name, data, admin }) => admin_call(
            &admin,
            |c| async move { c.create_group(&name, &data).await },
        ),
        Command::Group(GroupCommand::Delete { name, admin }) => {
            admin_call(&admin, |c| async move { c.delete_group(&name).await })
        }
        Command::Publish(p) => {
            let groups = if p.all { Vec::new() } else { p.groups };
            let data = p.data;
            admin_call(&p.admin, |c| async move { c.publish(&groups, &data).await })
        }
        Command::Clients(ClientsCommand::List { admin }) => {
            admin_call(&admin, |c| async move { c.clients().await })
        }
        Command::Clients(ClientsCommand::Disconnect { key, admin }) => {
            admin_call(&admin, |c| async move { c.disconnect_client(key).await })
        }
        _ => Ok(()),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        c @ (Command::Clone(_)
        | Command::AuthOut(_)
        | Command::Group(_)
        | Command::Publish(_)
        | Command::Clients(_)) => run_admin(c)?,
        Command::Version => {
            print_out(format!("replimesh {}\n", env!("CARGO_PKG_VERSION")).as_bytes())?;
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "replimesh", &mut script);
            print_out(&script)?;
        }
        Command::Backup(sub) => {
            let out = match sub {
                BackupCommand::Inspect(a) => backup_cmd::inspect(&a.file, a.key_file.as_deref())?,
                BackupCommand::Verify(a) => backup_cmd::verify(&a.file, a.key_file.as_deref())?,
            };
            print_out(out.as_bytes())?;
        }
        Command::Demo(a) => {
            let opts = DemoOptions {
                duration: a.duration,
                clones: a.clones,
                keep_running: a.keep_running,
                admin: a.admin,
                rate: a.rate,
            };
            init_tracing(a.log.log_format);
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                clones = opts.clones,
                "replimesh demo starting"
            );
            let summary = runtime()?.block_on(replimesh_cli::demo::run(opts))?;
            if !summary.ok() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::HashPassword => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            let pw = line.trim_end_matches(['\n', '\r']);
            if pw.is_empty() {
                anyhow::bail!("hash-password: give the password on standard input");
            }
            let hash = replimesh::store::hash_password(pw, replimesh::store::HashCost::default())?;
            print_out(format!("{hash}\n").as_bytes())?;
        }
        Command::Node(a) => {
            let config = replimesh_cli::config::NodeConfig::load(&a.config)?;
            if a.check {
                print_out(format!("config OK: {}\n", a.config.display()).as_bytes())?;
                return Ok(ExitCode::SUCCESS);
            }
            init_tracing(a.log.log_format);
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                id = %config.id,
                config = %a.config.display(),
                "replimesh node starting"
            );
            runtime()?.block_on(replimesh_cli::node::run(config))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn demo_defaults_match_the_library() {
        let cli = Cli::try_parse_from(["replimesh", "demo"]).unwrap();
        let Command::Demo(a) = cli.command else {
            panic!("not demo: {cli:?}");
        };
        let d = DemoOptions::default();
        assert_eq!(a.duration, d.duration);
        assert_eq!(a.clones, d.clones);
        assert_eq!(a.keep_running, d.keep_running);
        assert_eq!(a.admin, d.admin);
        assert_eq!(a.rate, d.rate);
    }

    #[test]
    fn values_are_checked_as_before() {
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("0.1"), Ok(Duration::from_millis(100)));
        assert!(parse_duration("0.05")
            .unwrap_err()
            .contains("between 0.1 and 86400"));
        assert!(parse_duration("NaN").is_err());
        assert!(parse_duration("soon").unwrap_err().contains("`soon`"));
        assert_eq!(parse_clones("16"), Ok(16));
        assert!(parse_clones("0").unwrap_err().contains("from 1 to 16"));
        assert!(parse_clones("17").is_err());
        assert_eq!(parse_rate("1"), Ok(1));
        assert!(parse_rate("0").unwrap_err().contains("positive"));
        assert!(parse_rate("-3").is_err());
    }
}
