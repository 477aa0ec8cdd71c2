//! The command line: parses flags, runs a command from [`pgdr::ops`], renders its result.
//! The only place that prints: results to stdout, progress and logs to stderr.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use pgdr::backend::Location;
use pgdr::clients::Connection;
use pgdr::config::Overrides;
use pgdr::cx::Options;
use pgdr::error::{Error, Exit};
use pgdr::exec::{Cancel, Outcome, Progress, StepReport};
use pgdr::ops::{self, Operator, Report, Target};

const EXIT_CODES: &str = "Exit codes:
  0    success (status: healthy)
  1    user or input error: bad flag or config, declined confirmation, lock held, corrupt state
  2    AWS or unexpected failure
  3    partial: some steps done, state saved, rerun to finish (status: degraded)
  130  interrupted (Ctrl-C); state saved, rerun to finish";

#[derive(Parser, Debug)]
#[command(name = "pgdr", version, about = "PostgreSQL disaster recovery on AWS in one command", after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: Global,
}

#[derive(Args, Debug, Clone)]
struct Global {
    /// Where state and locks live: a directory, or s3://BUCKET/PREFIX shared by a team
    /// [default: the config's `state`, else .pgdr].
    #[arg(long, global = true, env = "PGDR_STATE", value_name = "DIR|s3://BUCKET/PREFIX")]
    state: Option<String>,
    /// The state directory (older name of --state).
    #[arg(long, global = true, env = "PGDR_STATE_DIR", hide = true)]
    state_dir: Option<PathBuf>,
    /// Accept an S3 state bucket without versioning (no history, no recovery).
    #[arg(long, global = true)]
    allow_unversioned: bool,
    /// Config file with per-environment settings [default: pgdr.toml if present].
    #[arg(long, global = true, env = "PGDR_CONFIG")]
    config: Option<PathBuf>,
    /// AWS profile (else the standard chain: AWS_PROFILE, env vars, SSO, instance role).
    #[arg(long, global = true)]
    profile: Option<String>,
    /// Send every AWS call to this endpoint (also AWS_ENDPOINT_URL).
    #[arg(long, global = true)]
    endpoint_url: Option<String>,
    /// Primary region [default: us-east-1].
    #[arg(long, global = true)]
    primary_region: Option<String>,
    /// DR region [default: eu-west-1].
    #[arg(long, global = true)]
    dr_region: Option<String>,
    /// Result format on stdout.
    #[arg(long, global = true, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// More log detail on stderr (-v, -vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

#[derive(Args, Debug, Clone)]
struct EnvArg {
    /// Environment name: 1-20 lowercase letters, digits and dashes, starting with a letter.
    #[arg(long)]
    env: String,
}

/// The flags of every destructive command.
#[derive(Args, Debug, Clone, Copy)]
struct Confirm {
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    yes: bool,
    /// Print what would be done and stop.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what `up` would do, without changing anything.
    #[command(after_help = "Example: pgdr plan --env dev")]
    Plan(EnvArg),
    /// Create or converge the environment; safe to rerun after any failure.
    #[command(after_help = "Example: pgdr up --env dev")]
    Up {
        #[command(flatten)]
        env: EnvArg,
        /// Print what would be done and stop (same as `plan`).
        #[arg(long)]
        dry_run: bool,
    },
    /// What exists, its health, and drift. Without --env: one line per environment.
    #[command(after_help = "Examples:\n  pgdr status --env dev\n  pgdr status")]
    Status {
        /// Environment; omit to list every environment in the state directory.
        #[arg(long)]
        env: Option<String>,
    },
    /// Remove everything pgdr created for the environment, in reverse order.
    #[command(after_help = "Example: pgdr down --env dev --yes")]
    Down {
        #[command(flatten)]
        env: EnvArg,
        #[command(flatten)]
        confirm: Confirm,
        /// Delete the database without a final snapshot, and the secret without a recovery window.
        #[arg(long)]
        skip_final_snapshot: bool,
        /// Turn deletion protection off before deleting.
        #[arg(long)]
        force: bool,
    },
    /// Promote the replica, move DNS to it, fence the old primary. Safe to rerun.
    #[command(after_help = "Examples:\n  pgdr failover --env dev --dry-run\n  pgdr failover --env dev")]
    Failover {
        #[command(flatten)]
        env: EnvArg,
        #[command(flatten)]
        confirm: Confirm,
        /// Promote even when the replica lags more than max_failover_lag_seconds, or when its lag
        /// is unknown while the primary is available.
        #[arg(long)]
        force: bool,
    },
    /// Planned role swap with no data loss: fence, wait for the replica, promote, reprotect.
    #[command(after_help = "Examples:\n  pgdr switchover --env dev --dry-run\n  pgdr switchover --env dev")]
    Switchover {
        #[command(flatten)]
        env: EnvArg,
        #[command(flatten)]
        confirm: Confirm,
        /// Keep the old primary (retired; `down` deletes it) instead of deleting it.
        #[arg(long)]
        keep_old_primary: bool,
        /// Seconds to wait for the replica to catch up (default: switchover_catchup_seconds).
        #[arg(long, value_parser = clap::value_parser!(u64).range(5..=800))]
        catchup_timeout: Option<u64>,
    },
    /// Rehearse DR with numbers: a switchover (or --failover) and back, RTO and RPO measured.
    #[command(after_help = "Examples:\n  pgdr drill --env staging\n  pgdr drill --env staging --failover --output json")]
    Drill {
        #[command(flatten)]
        env: EnvArg,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        /// Rehearse the unplanned path first: promotion without waiting for the replica.
        #[arg(long)]
        failover: bool,
        /// Required for an environment marked as production.
        #[arg(long)]
        production: bool,
        /// Seconds to wait for the replica to catch up (default: switchover_catchup_seconds).
        #[arg(long, value_parser = clap::value_parser!(u64).range(5..=800))]
        catchup_timeout: Option<u64>,
    },
    /// After a failover: a new replica in the old region, detection moved, old primary deleted.
    #[command(after_help = "Examples:\n  pgdr reprotect --env dev --dry-run\n  pgdr reprotect --env dev")]
    Reprotect {
        #[command(flatten)]
        env: EnvArg,
        #[command(flatten)]
        confirm: Confirm,
        /// Keep the old primary (retired; `down` deletes it) instead of deleting it now.
        #[arg(long)]
        keep_old_primary: bool,
    },
    /// Rebuild a lost state file from the resources tagged pgdr:env=ENV in AWS.
    #[command(after_help = "Example: pgdr adopt --env dev && pgdr plan --env dev")]
    Adopt(EnvArg),
    /// Remove a stale lock left by a run that died: shows the holder and asks.
    #[command(after_help = "Examples:\n  pgdr unlock --env dev\n  pgdr unlock --env dev --yes")]
    Unlock {
        #[command(flatten)]
        env: EnvArg,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long, alias = "force")]
        yes: bool,
    },
    /// The state itself: a bucket for a team, its history, restore, migration.
    #[command(subcommand)]
    State(StateCommand),
    /// Print shell completions.
    #[command(after_help = "Example: pgdr completions bash > /etc/bash_completion.d/pgdr")]
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand, Debug)]
enum StateCommand {
    /// Create (or fix) an S3 bucket fit for state: versioning, SSE-KMS, no public access,
    /// TLS only, old lock versions expiring. Idempotent.
    #[command(
        after_help = "Example: pgdr state init s3://acme-pgdr-state --region eu-west-1\nThen: pgdr --state s3://acme-pgdr-state/pgdr up --env dev"
    )]
    Init {
        /// s3://BUCKET (a prefix is allowed and shown in the --state to use).
        url: String,
        /// Region of a new bucket [default: the DR region]: the state must survive the primary region.
        #[arg(long)]
        region: Option<String>,
        /// KMS key for default encryption [default: aws/s3].
        #[arg(long)]
        kms_key: Option<String>,
    },
    /// The versions of an environment's state, newest first.
    #[command(after_help = "Example: pgdr state history --env dev")]
    History {
        #[command(flatten)]
        env: EnvArg,
        /// How many versions to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Make an earlier version the current state (the replaced one stays in the history).
    #[command(after_help = "Example: pgdr state restore --env dev --version 3HL4kqtJlcpXroDTDmJ")]
    Restore {
        #[command(flatten)]
        env: EnvArg,
        /// A version from `pgdr state history`.
        #[arg(long)]
        version: String,
        /// Do not ask for confirmation (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
    /// Move the state (from --state) to another location, under both locks; the old copy is
    /// kept, renamed.
    #[command(
        after_help = "Examples:\n  pgdr state migrate --env dev --to s3://acme-pgdr-state/pgdr\n  pgdr --state s3://acme-pgdr-state/pgdr state migrate --env dev --to .pgdr"
    )]
    Migrate {
        #[command(flatten)]
        env: EnvArg,
        /// The new location: a directory or s3://BUCKET/PREFIX.
        #[arg(long)]
        to: String,
    },
}

/// JSON shapes carry this version; see docs/architecture.md.
const JSON_SCHEMA: &str = "pgdr/v1";

#[derive(Serialize)]
struct JsonOut<'a, T: Serialize> {
    schema: &'static str,
    #[serde(flatten)]
    body: &'a T,
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    init_logs(cli.global.verbose);
    let output = cli.global.output;
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(output, &Error::Other(format!("cannot start the runtime: {e}"))),
    };
    match rt.block_on(run(cli)) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(e) => fail(output, &e),
    }
}

fn fail(output: Output, e: &Error) -> ExitCode {
    let exit = e.exit();
    match output {
        Output::Json => {
            let aws = e.aws();
            let body = serde_json::json!({
                "schema": JSON_SCHEMA,
                "error": {
                    "message": e.to_string(),
                    "exit": exit as u8,
                    "aws_code": aws.and_then(|a| a.code.clone()),
                    "request_id": aws.and_then(|a| a.request_id.clone()),
                }
            });
            emit(&format!("{body}\n"));
        }
        Output::Human => eprintln!("error: {e}"),
    }
    ExitCode::from(exit as u8)
}

fn init_logs(verbose: u8) {
    let filter = match verbose {
        0 => "pgdr=warn",
        1 => "pgdr=info",
        2 => "pgdr=debug,aws_config=info",
        _ => "pgdr=trace,aws_config=debug,aws_smithy_runtime=debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGDR_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

fn config_path(g: &Global) -> Option<PathBuf> {
    g.config.clone().or_else(|| {
        let default = PathBuf::from("pgdr.toml");
        default.exists().then_some(default)
    })
}

fn connection(g: &Global) -> Connection {
    Connection { profile: g.profile.clone(), endpoint_url: g.endpoint_url.clone(), retry_max_attempts: 5 }
}

/// Where the state lives: --state (PGDR_STATE), the older --state-dir (PGDR_STATE_DIR), the
/// config's `state`, else `.pgdr`.
fn state_location(g: &Global) -> Result<Location, Error> {
    if let Some(s) = &g.state {
        return Location::parse(s);
    }
    if let Some(d) = &g.state_dir {
        return Ok(Location::Dir(d.clone()));
    }
    match pgdr::config::state_setting(config_path(g).as_deref())? {
        Some(s) => Location::parse(&s),
        None => Ok(Location::Dir(PathBuf::from(".pgdr"))),
    }
}

fn target(g: &Global, env: &str) -> Result<Target, Error> {
    Ok(Target {
        env: env.to_owned(),
        state: state_location(g)?,
        allow_unversioned: g.allow_unversioned,
        config: config_path(g),
        overrides: Overrides { primary_region: g.primary_region.clone(), dr_region: g.dr_region.clone() },
        connection: connection(g),
    })
}

/// Ctrl-C: the first stops scheduling new work and lets calls in flight finish; the second
/// exits at once (the state file is consistent after every write).
fn watch_interrupts(cancel: Cancel) {
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: finishing calls in flight and saving state (Ctrl-C again to quit now)");
            cancel.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                // The state file is consistent after every write; only the lock needs care.
                pgdr::backend::release_held_locks();
                std::process::exit(130);
            }
        }
    });
}

async fn run(cli: Cli) -> Result<Exit, Error> {
    let g = &cli.global;
    let cancel = Cancel::default();
    watch_interrupts(cancel.clone());
    let progress = StderrProgress::new();
    let out = g.output;
    match &cli.command {
        Command::Plan(e) | Command::Up { env: e, dry_run: true } => show(out, &ops::plan(&target(g, &e.env)?, &progress, &cancel).await?),
        Command::Up { env, dry_run: false } => {
            let t = target(g, &env.env)?;
            // Validate before any output, so bad input is one line.
            t.load_env()?;
            show(out, &ops::up(&t, &progress, &cancel).await?)
        }
        Command::Down { env, confirm, skip_final_snapshot, force } => {
            let opts = Options { skip_final_snapshot: *skip_final_snapshot, force: *force };
            let t = target(g, &env.env)?;
            show(out, &ops::down(&t, opts, confirm.dry_run, &Terminal(confirm.yes), &progress, &cancel).await?)
        }
        Command::Status { env: Some(env) } => show(out, &ops::status(&target(g, env)?, &cancel).await?),
        Command::Status { env: None } => show(out, &ops::list_envs(&target(g, "")?).await?),
        Command::Failover { env, confirm, force } => {
            let opts = ops::FailoverOptions { dry_run: confirm.dry_run, force: *force };
            show(out, &ops::failover(&target(g, &env.env)?, opts, &Terminal(confirm.yes), &progress, &cancel).await?)
        }
        Command::Switchover { env, confirm, keep_old_primary, catchup_timeout } => {
            let opts = ops::SwitchoverOptions {
                dry_run: confirm.dry_run,
                keep_old_primary: *keep_old_primary,
                catchup_timeout_s: *catchup_timeout,
            };
            show(out, &ops::switchover(&target(g, &env.env)?, opts, &Terminal(confirm.yes), &progress, &cancel).await?)
        }
        Command::Drill { env, yes, failover, production, catchup_timeout } => {
            let opts = ops::DrillOptions { failover: *failover, production: *production, catchup_timeout_s: *catchup_timeout };
            show(out, &ops::drill(&target(g, &env.env)?, opts, &Terminal(*yes), &progress, &cancel).await?)
        }
        Command::Reprotect { env, confirm, keep_old_primary } => {
            let t = target(g, &env.env)?;
            show(out, &ops::reprotect(&t, *keep_old_primary, confirm.dry_run, &Terminal(confirm.yes), &progress, &cancel).await?)
        }
        Command::Adopt(e) => show(out, &ops::adopt(&target(g, &e.env)?, &progress, &cancel).await?),
        Command::Unlock { env, yes } => {
            let r = ops::unlock(&target(g, &env.env)?, &Terminal(*yes)).await?;
            // A note about the lock, not a result: stderr in human mode.
            match out {
                Output::Json => print_json(&r),
                Output::Human => eprint!("{r}"),
            }
            Ok(r.exit())
        }
        Command::State(c) => run_state(g, c).await,
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "pgdr", &mut std::io::stdout());
            Ok(Exit::Success)
        }
    }
}

async fn run_state(g: &Global, c: &StateCommand) -> Result<Exit, Error> {
    let out = g.output;
    match c {
        StateCommand::Init { url, region, kms_key } => {
            let r = ops::init(url, &connection(g), config_path(g).as_deref(), region.as_deref(), kms_key.as_deref()).await?;
            show(out, &r)
        }
        StateCommand::History { env, limit } => show(out, &ops::history(&target(g, &env.env)?, *limit).await?),
        StateCommand::Restore { env, version, yes } => show(out, &ops::restore(&target(g, &env.env)?, version, &Terminal(*yes)).await?),
        StateCommand::Migrate { env, to } => show(out, &ops::migrate(&target(g, &env.env)?, &Location::parse(to)?).await?),
    }
}

/// Prints a result: its JSON, or its text, on stdout.
fn show<R: Report>(output: Output, r: &R) -> Result<Exit, Error> {
    match output {
        Output::Json => print_json(r),
        Output::Human => emit(&r.to_string()),
    }
    Ok(r.exit())
}

/// The operator at this terminal: plans on stderr, confirmation typed (or `--yes`).
struct Terminal(bool);

impl Operator for Terminal {
    fn inform(&self, text: &str) {
        eprint!("{text}");
    }
    fn confirm(&self, what: &str, env: &str) -> Result<(), Error> {
        confirm(self.0, what, env)
    }
}

/// Asks to type the environment name on a terminal; refuses without `--yes` otherwise.
fn confirm(yes: bool, what: &str, env: &str) -> Result<(), Error> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Error::user("refusing a destructive command without confirmation: stdin is not a terminal; add --yes"));
    }
    eprint!("{what}\nType the environment name ({env}) to continue: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| Error::user(format!("cannot read the confirmation: {e}")))?;
    if line.trim() == env {
        Ok(())
    } else {
        Err(Error::user("not confirmed: nothing was changed"))
    }
}

/// Writes a result to stdout; a closed pipe (`pgdr status | head`) is not an error.
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string_pretty(&JsonOut { schema: JSON_SCHEMA, body: v }) {
        Ok(s) => emit(&format!("{s}\n")),
        Err(e) => eprintln!("error: cannot render JSON: {e}"),
    }
}

/// Progress on stderr. On a terminal: one live line per running step with its state and
/// elapsed time, finished steps collapsing to a check mark. Otherwise: timestamped lines.
struct StderrProgress {
    t0: Instant,
    live: Option<std::sync::Arc<std::sync::Mutex<Live>>>,
}

#[derive(Default)]
struct Live {
    /// Running steps: (name, started, latest status).
    running: Vec<(String, Instant, String)>,
    /// Lines drawn last time (to erase them).
    drawn: usize,
    stopped: bool,
}

impl Live {
    fn redraw(&mut self, finished: Option<String>) {
        let mut err = std::io::stderr().lock();
        let mut text = String::new();
        for _ in 0..self.drawn {
            text.push_str("\x1b[1A\x1b[2K");
        }
        if let Some(f) = finished {
            text.push_str(&f);
            text.push('\n');
        }
        for (name, t, status) in &self.running {
            text.push_str(&format!("  {name}: {status} ({})\n", pgdr::wait::human(t.elapsed())));
        }
        self.drawn = self.running.len();
        let _ = err.write_all(text.as_bytes());
        let _ = err.flush();
    }
}

impl StderrProgress {
    fn new() -> Self {
        let live = std::io::stderr().is_terminal().then(|| std::sync::Arc::new(std::sync::Mutex::new(Live::default())));
        if let Some(l) = &live {
            // Keep the elapsed times moving while AWS works.
            let l = std::sync::Arc::clone(l);
            std::thread::spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_millis(500));
                let mut g = l.lock().unwrap_or_else(|p| p.into_inner());
                if g.stopped {
                    break;
                }
                if !g.running.is_empty() {
                    g.redraw(None);
                }
            });
        }
        StderrProgress { t0: Instant::now(), live }
    }
    fn line(&self, msg: &str) {
        let e = self.t0.elapsed();
        eprintln!("[{:>4}.{}s] {msg}", e.as_secs(), e.subsec_millis() / 100);
    }
    fn with_live(&self, f: impl FnOnce(&mut Live)) -> bool {
        match &self.live {
            Some(l) => {
                f(&mut l.lock().unwrap_or_else(|p| p.into_inner()));
                true
            }
            None => false,
        }
    }
}

impl Drop for StderrProgress {
    fn drop(&mut self) {
        self.with_live(|l| l.stopped = true);
    }
}

impl Progress for StderrProgress {
    fn started(&self, step: &str) {
        if !self.with_live(|l| {
            l.running.push((step.to_owned(), Instant::now(), "working".into()));
            l.redraw(None);
        }) {
            self.line(&format!("{step}: started"));
        }
    }
    fn status(&self, step: &str, msg: &str) {
        if !self.with_live(|l| {
            if let Some(r) = l.running.iter_mut().find(|r| r.0 == step) {
                r.2 = msg.to_owned();
            }
            l.redraw(None);
        }) {
            self.line(&format!("{step}: {msg}"));
        }
    }
    fn finished(&self, step: &str, r: &StepReport) {
        let secs = r.elapsed_ms as f64 / 1000.0;
        let text = match &r.outcome {
            Outcome::Done => format!("{step}: done ({secs:.1}s)"),
            Outcome::Failed { error, .. } => format!("{step}: FAILED ({secs:.1}s): {error}"),
            Outcome::Skipped { because } => format!("{step}: skipped ({} failed)", because.join(", ")),
            Outcome::Cancelled => format!("{step}: not started (interrupted)"),
        };
        if !self.with_live(|l| {
            l.running.retain(|x| x.0 != step);
            let mark = if matches!(r.outcome, Outcome::Done) { "\u{2713}" } else { "\u{2717}" };
            l.redraw(Some(format!("{mark} {text}")));
        }) {
            self.line(&text);
        }
    }
}
