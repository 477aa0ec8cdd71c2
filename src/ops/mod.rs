//! The commands as library functions: one function per command, each returning a result that
//! renders itself (`Display` for people, `Serialize` for `--output json`; see [`crate::render`]).
//! The CLI parses flags, asks for confirmation through [`Operator`], and prints.

mod failover;
pub mod run;
mod state_cmd;
mod status;
mod switchover;

pub use failover::{failover, FailoverOptions, FailoverResult};
pub use run::{adopt, down, plan, reprotect, up, Connect, RunResult, Totals};
pub use state_cmd::{history, init, migrate, restore, HistoryResult, MigrateResult, RestoreResult};
pub use status::{list_envs, status, unlock, EnvList, EnvSummary, ResourceStatus, StatusResult, UnlockResult};
pub use switchover::{drill, switchover, DrillOptions, DrillReport, SwitchoverOptions, SwitchoverResult};

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::backend::{Backend, Location, Lock, RunInfo};
use crate::clients::{self, Connection};
use crate::config::{self, Env, Overrides};
use crate::cx::{Cx, Options};
use crate::error::{Error, Exit, Result};
use crate::exec::{self, Cancel, Mode};
use crate::state::{self, Store};

/// The commands, as results name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Plan,
    Up,
    Down,
    Status,
    Failover,
    Switchover,
    Drill,
    Reprotect,
    Adopt,
    Unlock,
    State,
}

impl Command {
    pub fn name(self) -> &'static str {
        match self {
            Command::Plan => "plan",
            Command::Up => "up",
            Command::Down => "down",
            Command::Status => "status",
            Command::Failover => "failover",
            Command::Switchover => "switchover",
            Command::Drill => "drill",
            Command::Reprotect => "reprotect",
            Command::Adopt => "adopt",
            Command::Unlock => "unlock",
            Command::State => "state",
        }
    }
    /// How the lock names the run holding it.
    pub(crate) fn lock_label(self) -> String {
        format!("pgdr {}", self.name())
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A command's result: what it did, for people and for JSON, and the exit code it means.
pub trait Report: Serialize + std::fmt::Display {
    fn exit(&self) -> Exit;
}

/// The operator, as a command that changes things asks them: the CLI answers from the terminal
/// or `--yes`.
pub trait Operator {
    /// Something to read before the question (the plan), shown on stderr.
    fn inform(&self, text: &str);
    /// `Ok` when the operator confirms `what`; a user error (exit 1) when not.
    fn confirm(&self, what: &str, env: &str) -> Result<()>;
}

/// Everything a command needs to know before touching AWS.
#[derive(Clone, Debug)]
pub struct Target {
    pub env: String,
    /// Where the state and the lock live (a directory or `s3://BUCKET/PREFIX`).
    pub state: Location,
    /// Accept an S3 state bucket without versioning.
    pub allow_unversioned: bool,
    pub config: Option<PathBuf>,
    pub overrides: Overrides,
    pub connection: Connection,
}

impl Target {
    pub fn load_env(&self) -> Result<Env> {
        config::load(&self.env, self.config.as_deref(), &self.overrides)
    }

    /// The state backend, opened for an environment whose primary region is `primary`.
    pub async fn backend(&self, primary: Option<&str>) -> Result<Arc<Backend>> {
        let opts = crate::backend::OpenOptions { allow_unversioned: self.allow_unversioned, primary_region: primary.map(str::to_owned) };
        Backend::open(&self.state, &self.connection, &opts).await
    }
}

/// What a command reads ahead of its work, in one wave (see [`crate::reads`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ahead {
    /// Only the instances (for the topology check).
    Instances,
    /// Everything the step walk reads.
    Walk,
    /// The walk's reads and `status`'s health reads.
    WalkAndHealth,
}

/// The checked step graph.
pub(crate) fn graph() -> Result<exec::Graph<'static, Cx, crate::steps::StepId>> {
    crate::steps::graph().map_err(|e| Error::Other(format!("internal error: {e}")))
}

/// Opens the context for a command. A mode that saves state takes the lock.
pub(crate) async fn open(t: &Target, command: Command, mode: Mode, ahead: Ahead, cancel: &Cancel) -> Result<(Cx, Option<Lock>)> {
    let mutating = mode.saves_state();
    let env = t.load_env()?;
    let backend = t.backend(Some(&env.settings.primary_region)).await?;
    // Read (and so validate) the state before taking the lock or calling AWS.
    let existing = backend.read(&env.name).await?;
    let run = RunInfo::this_process(&command.lock_label());
    let lock = if mutating { Some(backend.lock(&env.name, &run).await?) } else { None };
    // Re-read under the lock: another run may have finished in between.
    let existing = if mutating { backend.read(&env.name).await? } else { existing };
    let cx = context(t, env, backend, existing, mode, run, cancel).await?;
    let steps = graph()?;
    // A new environment has nothing to read ahead: its first change would drop the answers.
    let ahead = if cx.store.snapshot().resources.is_empty() { Ahead::Instances } else { ahead };
    match ahead {
        Ahead::Instances => {}
        Ahead::Walk => steps.read_ahead(&cx).await,
        Ahead::WalkAndHealth => {
            tokio::join!(steps.read_ahead(&cx), crate::health::reads(&cx));
        }
    }
    // Nothing recorded yet: no topology to check (`adopt` reads the roles itself).
    if !cx.store.snapshot().resources.is_empty() {
        sync_topology(&cx).await?;
    }
    Ok((cx, lock))
}

/// Builds the context of an environment from its state: the roles swapped after `reprotect`
/// (the DR region then holds the primary), clients for the two regions, the store.
async fn context(
    t: &Target,
    env: Env,
    backend: Arc<Backend>,
    existing: Option<crate::backend::Loaded>,
    mode: Mode,
    run: RunInfo,
    cancel: &Cancel,
) -> Result<Cx> {
    let state = existing.as_ref().map(|l| &l.state);
    let swapped = state.is_some_and(|s| !s.topology.primary_region.is_empty() && s.topology.primary_region == env.settings.dr_region);
    let env = if swapped { env.swap_roles() } else { env };
    check_regions(&env, state)?;
    let mut conn = t.connection.clone();
    conn.retry_max_attempts = env.settings.retry_max_attempts;
    let clients = clients::build(&conn, &env.settings.primary_region, &env.settings.dr_region, mode.changes_aws()).await?;
    let store = Store::new(backend, &env.name, existing, mode, run);
    Ok(Cx { env, clients, store, mode, opts: Options::default(), cancel: cancel.clone(), fresh: Default::default() })
}

/// Reopens a context after a command changed the state's topology (the lock stays held).
pub(crate) async fn reopen(t: &Target, old: &Cx, mode: Mode, cancel: &Cancel) -> Result<Cx> {
    let env = t.load_env()?;
    let backend = old.store.backend().clone();
    let existing = backend.read(&env.name).await?;
    context(t, env, backend, existing, mode, old.store.run().clone(), cancel).await
}

/// A state file belongs to one pair of regions: other regions (a changed config or flag) would
/// silently build a second environment and orphan the first.
fn check_regions(env: &Env, state: Option<&state::State>) -> Result<()> {
    let Some(s) = state else { return Ok(()) };
    let mut have: Vec<&str> = s.resources.values().map(|r| r.region.as_str()).filter(|r| *r != "global").collect();
    have.sort();
    have.dedup();
    let want = [env.settings.primary_region.as_str(), env.settings.dr_region.as_str()];
    if let Some(other) = have.iter().find(|r| !want.contains(r)) {
        return Err(Error::user(format!(
            "environment {} has resources in {other}, but the regions now are {} and {}: use the regions it was built with (--primary-region/--dr-region or the config)",
            env.name, want[0], want[1]
        )));
    }
    Ok(())
}

/// An automatic failover may have happened while nobody was looking: the roles AWS reports
/// win over the state file (in memory for read-only commands).
async fn sync_topology(cx: &Cx) -> Result<()> {
    use crate::cx::Side;
    let (p, d) = tokio::join!(crate::health::instance(cx, Side::Primary), crate::health::instance(cx, Side::Dr));
    let (p, d) = (p.ok().flatten(), d.ok().flatten());
    let dr_promoted = d.as_ref().is_some_and(crate::health::promoted);
    let p_fenced = p.as_ref().is_some_and(|p| p.tag("pgdr:role") == Some("fenced"));
    let (pr, dr) = (cx.region(Side::Primary).to_owned(), cx.region(Side::Dr).to_owned());
    let topo = cx.store.snapshot().topology;
    if (dr_promoted && topo.writer_region != dr) || (p_fenced && !topo.fenced.contains_key(&pr)) {
        tracing::warn!(writer = %dr, "AWS says the replica was promoted (automatic failover?); following AWS");
        cx.store.update(|s| {
            if dr_promoted && s.topology.writer_region != dr {
                s.topology.writer_region = dr.clone();
                s.topology
                    .events
                    .push(state::TopologyEvent { at: state::now_rfc3339(), what: format!("found the replica in {dr} promoted") });
            }
            if p_fenced {
                s.topology.fenced.entry(pr.clone()).or_insert_with(|| vec!["found fenced in AWS".into()]);
            }
        })?;
    }
    Ok(())
}
