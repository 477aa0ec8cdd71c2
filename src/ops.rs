//! The commands as library functions: each returns data for the CLI to render.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::clients::{self, Connection};
use crate::config::{self, Env, Overrides};
use crate::cx::{Cx, Options};
use crate::error::{Error, Exit, Result};
use crate::exec::{self, Action, Cancel, Direction, Mode, Progress, RunReport};
use crate::state::{self, Lock, Store};
use crate::steps::instance;

/// Everything a command needs to know before touching AWS.
#[derive(Clone, Debug)]
pub struct Target {
    pub env: String,
    pub state_dir: PathBuf,
    pub config: Option<PathBuf>,
    pub overrides: Overrides,
    pub connection: Connection,
}

impl Target {
    pub fn load_env(&self) -> Result<Env> {
        config::load(&self.env, self.config.as_deref(), &self.overrides)
    }
}

/// The result of `plan`, `up` and `down`.
#[derive(Debug, Serialize)]
pub struct RunResult {
    pub command: &'static str,
    pub env: String,
    pub dry_run: bool,
    pub warnings: Vec<String>,
    #[serde(flatten)]
    pub report: RunReport,
    pub totals: Totals,
    /// Where to connect, once the databases exist.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<Connect>,
    #[serde(skip)]
    pub exit: Exit,
}

#[derive(Debug, Serialize)]
pub struct Connect {
    /// Writers: follows failovers.
    pub writer: String,
    /// Reads: the replica.
    pub reader: String,
    pub port: u16,
    /// Secrets Manager secret with the credentials (readable in both regions).
    pub secret: String,
    pub endpoints: Vec<String>,
}

fn connect_info(cx: &Cx) -> Option<Connect> {
    use crate::cx::Side;
    use crate::steps::{dns, instance, secrets};
    let endpoints: Vec<String> = [Side::Primary, Side::Dr]
        .into_iter()
        .filter_map(|s| instance::recorded(cx, s, crate::state::Attr::Endpoint).map(|e| format!("{e} ({})", cx.region(s))))
        .collect();
    (!endpoints.is_empty()).then(|| Connect {
        writer: dns::writer_record(cx).trim_end_matches('.').to_owned(),
        reader: dns::reader_record(cx).trim_end_matches('.').to_owned(),
        port: 5432,
        secret: secrets::name(cx),
        endpoints,
    })
}

#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub create: usize,
    pub adopt: usize,
    pub change: usize,
    pub delete: usize,
    pub keep: usize,
}

impl Totals {
    pub fn of(report: &RunReport) -> Totals {
        let mut t = Totals::default();
        for c in report.changes() {
            match c.action {
                Action::Create => t.create += 1,
                Action::Adopt => t.adopt += 1,
                Action::Change => t.change += 1,
                Action::Delete => t.delete += 1,
                Action::Keep | Action::Absent => t.keep += 1,
            }
        }
        t
    }
    pub fn nothing_to_do(&self) -> bool {
        self.create + self.adopt + self.change + self.delete == 0
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
fn graph() -> Result<exec::Graph<'static, Cx, crate::steps::StepId>> {
    crate::steps::graph().map_err(|e| Error::Other(format!("internal error: {e}")))
}

/// Opens the context for a command. A mode that saves state takes the lock.
pub(crate) async fn open(t: &Target, command: &str, mode: Mode, ahead: Ahead, cancel: &Cancel) -> Result<(Cx, Option<Lock>)> {
    let mutating = mode.saves_state();
    let env = t.load_env()?;
    // Read (and so validate) the state before taking the lock or calling AWS.
    let existing = state::read(&t.state_dir, &env.name)?;
    let lock = if mutating { Some(Lock::acquire(&t.state_dir, &env.name, command)?) } else { None };
    // Re-read under the lock: another run may have finished in between.
    let existing = if mutating { state::read(&t.state_dir, &env.name)? } else { existing };
    let cx = context(t, env, existing, mode, cancel).await?;
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
async fn context(t: &Target, env: Env, existing: Option<state::State>, mode: Mode, cancel: &Cancel) -> Result<Cx> {
    let swapped =
        existing.as_ref().is_some_and(|s| !s.topology.primary_region.is_empty() && s.topology.primary_region == env.settings.dr_region);
    let env = if swapped { env.swap_roles() } else { env };
    check_regions(&env, existing.as_ref())?;
    let mut conn = t.connection.clone();
    conn.retry_max_attempts = env.settings.retry_max_attempts;
    let clients = clients::build(&conn, &env.settings.primary_region, &env.settings.dr_region, mode.changes_aws()).await?;
    let store = Store::new(&t.state_dir, &env.name, existing, mode);
    Ok(Cx { env, clients, store, mode, opts: Options::default(), cancel: cancel.clone() })
}

/// Reopens a context after a command changed the state's topology (the lock stays held).
async fn reopen(t: &Target, mode: Mode, cancel: &Cancel) -> Result<Cx> {
    let env = t.load_env()?;
    let existing = state::read(&t.state_dir, &env.name)?;
    context(t, env, existing, mode, cancel).await
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

fn result(command: &'static str, cx: &Cx, dry_run: bool, report: RunReport) -> RunResult {
    let exit = report.exit();
    let connect = (!dry_run && matches!(command, "up" | "reprotect")).then(|| connect_info(cx)).flatten();
    RunResult {
        command,
        env: cx.env.name.clone(),
        dry_run,
        warnings: cx.env.warnings(),
        totals: Totals::of(&report),
        report,
        connect,
        exit,
    }
}

/// `plan` and `up --dry-run`: walk the graph without changing anything.
pub async fn plan(t: &Target, progress: &dyn Progress, cancel: &Cancel) -> Result<RunResult> {
    let (cx, _) = open(t, "pgdr plan", Mode::Plan, Ahead::Walk, cancel).await?;
    let report = exec::execute(&graph()?, &cx, Direction::Up, cx.mode, progress, cancel).await;
    Ok(result("plan", &cx, true, report))
}

pub async fn up(t: &Target, progress: &dyn Progress, cancel: &Cancel) -> Result<RunResult> {
    let (cx, _lock) = open(t, "pgdr up", Mode::Apply, Ahead::Walk, cancel).await?;
    let report = exec::execute(&graph()?, &cx, Direction::Up, cx.mode, progress, cancel).await;
    Ok(result("up", &cx, false, report))
}

pub async fn down(t: &Target, opts: Options, dry_run: bool, progress: &dyn Progress, cancel: &Cancel) -> Result<RunResult> {
    let mode = if dry_run { Mode::Plan } else { Mode::Apply };
    let (mut cx, _lock) = open(t, "pgdr down", mode, Ahead::Walk, cancel).await?;
    cx.opts = opts;
    // A protected database stops `down` before anything is deleted.
    if !cx.opts.force {
        let protected = crate::steps::database::protected(&cx).await?;
        if !protected.is_empty() {
            return Err(Error::user(format!(
                "deletion protection is on for {}; nothing was deleted: rerun with --force to turn it off and delete",
                protected.join(", ")
            )));
        }
    }
    let report = exec::execute(&graph()?, &cx, Direction::Down, cx.mode, progress, cancel).await;
    let res = result("down", &cx, dry_run, report);
    if !dry_run && res.exit == Exit::Success {
        cx.store.delete_file()?;
    }
    Ok(res)
}

/// One resource as `status` sees it.
#[derive(Debug, Serialize)]
pub struct ResourceStatus {
    pub step: String,
    pub kind: String,
    pub name: String,
    pub region: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `exists`, `missing` or `drifted`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct StatusResult {
    pub env: String,
    pub primary_region: String,
    pub dr_region: String,
    pub healthy: bool,
    /// Most important first: what is wrong, and what to run.
    pub problems: Vec<String>,
    pub health: crate::health::Health,
    pub resources: Vec<ResourceStatus>,
    #[serde(skip)]
    pub exit: Exit,
}

/// `status --env E`: every resource, read from AWS (a read-only walk of the graph).
pub async fn status(t: &Target, cancel: &Cancel) -> Result<StatusResult> {
    let (cx, _) = open(t, "pgdr status", Mode::Status, Ahead::WalkAndHealth, cancel).await?;
    let steps = graph()?;
    let (report, health) =
        tokio::join!(exec::execute(&steps, &cx, Direction::Up, cx.mode, &exec::NoProgress, cancel), crate::health::gather(&cx));
    let mut resources = Vec::new();
    let mut problems: Vec<String> = report
        .failures()
        .map(|f| {
            format!(
                "{}: {}",
                f.step,
                match &f.outcome {
                    exec::Outcome::Failed { error, .. } => error.as_str(),
                    _ => "",
                }
            )
        })
        .collect();
    for s in &report.steps {
        for c in &s.changes {
            let state = match c.action {
                Action::Keep => "exists",
                Action::Adopt => "untracked",
                Action::Create => "missing",
                Action::Change => "drifted",
                Action::Delete | Action::Absent => continue,
            };
            if state != "exists" {
                problems.push(format!("{} {} in {} is {state}", c.kind, c.name, c.region));
            }
            resources.push(ResourceStatus {
                step: s.step.clone(),
                kind: c.kind.clone(),
                name: c.name.clone(),
                region: c.region.clone(),
                id: c.id.clone(),
                state,
                detail: c.detail.clone(),
            });
        }
    }
    let mut first = health_problems(&cx, &health);
    first.extend(problems);
    let problems = first;
    let healthy = problems.is_empty();
    Ok(StatusResult {
        env: cx.env.name.clone(),
        primary_region: cx.env.settings.primary_region.clone(),
        dr_region: cx.env.settings.dr_region.clone(),
        healthy,
        resources,
        health,
        problems,
        exit: if healthy { Exit::Success } else { Exit::Partial },
    })
}

/// One line per environment in the state directory.
#[derive(Debug, Serialize)]
pub struct EnvSummary {
    pub env: String,
    pub resources: usize,
    pub writer_region: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn list_envs(dir: &Path) -> Result<Vec<EnvSummary>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::user(format!("cannot read state directory {}: {e}", dir.display()))),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_owned))
        .filter(|n| config::validate_env_name(n).is_ok())
        .collect();
    names.sort();
    for name in names {
        let locked_by = state::read_lock(dir, &name).map(|l| format!("{} ({}, pid {} on {})", l.who, l.command, l.pid, l.host));
        match state::read(dir, &name) {
            Ok(Some(s)) => out.push(EnvSummary {
                env: name,
                resources: s.resources.len(),
                writer_region: s.topology.writer_region,
                updated_at: s.updated_at,
                locked_by,
                error: None,
            }),
            Ok(None) => {}
            Err(e) => out.push(EnvSummary {
                env: name,
                resources: 0,
                writer_region: String::new(),
                updated_at: String::new(),
                locked_by,
                error: Some(e.to_string()),
            }),
        }
    }
    Ok(out)
}

/// What makes an environment degraded, read from AWS.
fn health_problems(cx: &Cx, h: &crate::health::Health) -> Vec<String> {
    use crate::cx::Side;
    let mut p = Vec::new();
    let env = cx.name();
    for u in &h.unreachable {
        p.push(format!("could not read {u}"));
    }
    match &h.writer_region {
        None => p.push("no instance accepts writes".into()),
        Some(w) if w != cx.region(Side::Primary) => p.push(format!(
            "failed over: the writer is in {w} and nothing protects it; when {} is back run `pgdr reprotect --env {env}`",
            cx.region(Side::Primary)
        )),
        Some(_) => {}
    }
    for i in h.instances.iter().filter(|i| i.role == "old-primary") {
        p.push(format!("the old primary {} in {} is not fenced: run `pgdr failover --env {env}` to fence it", i.id, i.region));
    }
    for i in &h.instances {
        if !matches!(i.role.as_str(), "fenced" | "old-primary") && i.status != "available" {
            p.push(format!("{} {} in {} is {}", i.role, i.id, i.region, i.status));
        }
    }
    if let (Some(w), Some(d)) = (&h.writer_region, &h.dns_writer_region) {
        if w != d {
            p.push(format!("DNS sends writers to {d} but the writer is in {w}: run `pgdr failover --env {env}` or `pgdr up --env {env}`"));
        }
    }
    if let Some(lag) = h.replica_lag_seconds {
        if lag > cx.env.settings.max_failover_lag_seconds || lag < 0.0 {
            p.push(format!("replica lag is {lag:.0} s"));
        }
    }
    for a in h.alarms.iter().filter(|a| a.state == "ALARM") {
        p.push(format!("alarm {} in {} is in ALARM", a.name, a.region));
    }
    if !h.failover_function && h.writer_region.as_deref() == Some(cx.region(Side::Primary)) {
        p.push("the failover function is missing: run `pgdr up`".into());
    }
    p
}

/// `failover`: opens the environment (locked unless dry-run) and reads what AWS says.
pub async fn failover_plan(t: &Target, dry_run: bool, cancel: &Cancel) -> Result<(Cx, Option<Lock>, crate::failover::Plan)> {
    let (cx, lock) = open(t, "pgdr failover", if dry_run { Mode::Plan } else { Mode::Apply }, Ahead::Instances, cancel).await?;
    let plan = crate::failover::plan(&cx).await?;
    Ok((cx, lock, plan))
}

/// Refuses a promotion that would lose more than `max` seconds of data, unless forced. With no
/// lag datapoint the loss is unknown: that is refused too while the primary is available (a
/// switchover can wait for the metric), but not when it is down (the disaster `failover` is for).
pub fn check_lag(plan: &crate::failover::Plan, max: f64, force: bool) -> Result<()> {
    if plan.already_promoted || force {
        return Ok(());
    }
    match plan.replica_lag_seconds {
        Some(lag) if lag > max || lag < 0.0 => Err(Error::user(format!(
            "replica lag is {lag:.0} s (limit {max:.0} s): promoting now loses up to that much data; wait for it to catch up or rerun with --force"
        ))),
        None if plan.primary_status == "available" => Err(Error::user(format!(
            "the replica's lag is unknown (no ReplicaLag datapoint in 10 minutes) and the primary {} is available: promoting now may lose writes; check the replica in CloudWatch, or rerun with --force",
            plan.primary
        ))),
        _ => Ok(()),
    }
}

/// `reprotect`: reads what AWS says and what would be done.
pub async fn reprotect_plan(
    t: &Target,
    keep_old_primary: bool,
    dry_run: bool,
    cancel: &Cancel,
) -> Result<(Cx, Option<Lock>, crate::reprotect::Plan)> {
    let (cx, lock) = open(t, "pgdr reprotect", if dry_run { Mode::Plan } else { Mode::Apply }, Ahead::Instances, cancel).await?;
    let plan = crate::reprotect::plan(&cx, keep_old_primary).await?;
    Ok((cx, lock, plan))
}

/// Runs a confirmed `reprotect`: the old machinery goes, the roles swap, then `up` builds the
/// new replica and moves detection (under the same lock).
pub async fn reprotect(
    t: &Target,
    cx: Cx,
    lock: Option<Lock>,
    plan: &crate::reprotect::Plan,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RunResult> {
    crate::reprotect::prepare(&cx, plan, progress).await?;
    drop(cx);
    // The roles are swapped now; the lock stays held.
    let cx = reopen(t, Mode::Apply, cancel).await?;
    let report = exec::execute(&graph()?, &cx, Direction::Up, cx.mode, progress, cancel).await;
    drop(lock);
    Ok(result("reprotect", &cx, false, report))
}

/// `adopt`: rebuilds the state file from what is tagged in AWS (both regions and the global
/// services). Nothing in AWS changes; afterwards `up` has nothing to create and `down` can
/// remove everything.
pub async fn adopt(t: &Target, progress: &dyn Progress, cancel: &Cancel) -> Result<RunResult> {
    use crate::cx::Side;
    let (cx, lock) = open(t, "pgdr adopt", Mode::Adopt, Ahead::Walk, cancel).await?;
    // The topology, from the instances' roles in AWS. After `reprotect --keep-old-primary` a
    // region holds the new replica (`<name>-2`) beside the old primary (fenced, kept): every
    // instance tagged for the environment is looked at, the live one plays the region's role.
    let (p, d) = tokio::join!(crate::steps::instance::tagged(&cx, Side::Primary), crate::steps::instance::tagged(&cx, Side::Dr));
    let (mut p, mut d) = (p?, d?);
    let fenced = |db: &crate::steps::instance::Db| db.tag("pgdr:role") == Some("fenced");
    let mut retired: Vec<(String, String)> = Vec::new();
    for (side, found) in [(Side::Primary, &mut p), (Side::Dr, &mut d)] {
        if found.iter().any(|db| !fenced(db)) && found.iter().any(fenced) {
            retired.extend(found.iter().filter(|db| fenced(db)).map(|db| (cx.region(side).to_owned(), db.id.clone())));
            found.retain(|db| !fenced(db));
        }
    }
    let (p, d) = (p.into_iter().next(), d.into_iter().next());
    let dr_primary = d.as_ref().is_some_and(crate::health::promoted);
    let p_is_replica = p.as_ref().is_some_and(|p| p.source.is_some() && p.tag("pgdr:role") != Some("fenced"));
    let p_fenced = p.as_ref().is_some_and(|p| p.tag("pgdr:role") == Some("fenced"));
    let (primary_region, dr_region) = (cx.region(Side::Primary).to_owned(), cx.region(Side::Dr).to_owned());
    let swapped = dr_primary && p_is_replica;
    let env_name = cx.name().to_owned();
    cx.store.update(|s| {
        if p.is_some() || d.is_some() {
            s.topology.writer_region = if dr_primary { dr_region.clone() } else { primary_region.clone() };
        }
        if swapped {
            s.topology.primary_region = dr_region.clone();
        }
        if p_fenced && !swapped {
            s.topology.fenced.entry(primary_region.clone()).or_insert_with(|| vec!["rules revoked by failover (found by adopt)".into()]);
        }
        for (region, id) in &retired {
            s.resources.insert(instance::retired_key(region), state::Resource::new("db-instance", region, id, state::Status::Adopted));
        }
        // Instances not at their default names (a `-2` replica): recorded so the walk finds them.
        for (db, region, primary_role) in [(&p, &primary_region, !swapped), (&d, &dr_region, swapped)] {
            if let Some(db) = db.as_ref().filter(|db| db.id != format!("pgdr-{}-{region}", env_name)) {
                let side = if primary_role { Side::Primary } else { Side::Dr };
                let key = state::Key::new(instance::owner(side), region, "instance");
                s.resources.insert(key, state::Resource::new("db-instance", region, &db.id, state::Status::Adopted));
            }
        }
    })?;
    let cx = if swapped {
        drop(cx);
        reopen(t, Mode::Adopt, cancel).await?
    } else {
        cx
    };
    // A walk that changes nothing in AWS and records what it finds.
    let report = exec::execute(&graph()?, &cx, Direction::Up, cx.mode, progress, cancel).await;
    drop(lock);
    Ok(result("adopt", &cx, true, report))
}
