//! `plan`, `up`, `down`, `adopt` and `reprotect`: walks of the step graph, and their result.

use serde::Serialize;

use super::{graph, open, reopen, Ahead, Command, Operator, Report, Target};
use crate::cx::{Cx, Options, Side};
use crate::error::{Error, Exit, Result};
use crate::exec::{self, Action, Cancel, Direction, Mode, Progress, RunReport};
use crate::state;
use crate::steps::instance;

/// The result of `plan`, `up` and `down`.
#[derive(Debug, Serialize)]
pub struct RunResult {
    pub command: Command,
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
    use crate::steps::{dns, secrets};
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

pub(crate) fn result(command: Command, cx: &Cx, dry_run: bool, report: RunReport) -> RunResult {
    let exit = report.exit();
    let connect = (!dry_run && matches!(command, Command::Up | Command::Reprotect)).then(|| connect_info(cx)).flatten();
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
    let (cx, _) = open(t, Command::Plan, Mode::Plan, Ahead::Walk, cancel).await?;
    let report = exec::execute(&graph()?, &cx, Direction::Up, cx.mode, progress, cancel).await;
    Ok(result(Command::Plan, &cx, true, report))
}

pub async fn up(t: &Target, progress: &dyn Progress, cancel: &Cancel) -> Result<RunResult> {
    let (cx, _lock) = open(t, Command::Up, Mode::Apply, Ahead::Walk, cancel).await?;
    let fence = crate::failover::complete_fence(&cx, progress).await?;
    let report = exec::execute(&graph()?, &cx, Direction::Up, cx.mode, progress, cancel).await;
    let mut r = result(Command::Up, &cx, false, report);
    r.warnings.extend(fence);
    Ok(r)
}

/// `down`: confirmed by the operator unless a dry run.
pub async fn down(
    t: &Target,
    opts: Options,
    dry_run: bool,
    operator: &dyn Operator,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<RunResult> {
    let e = t.load_env()?;
    if !dry_run {
        let what = format!(
            "This deletes every resource of environment {:?} in {} and {}.",
            e.name, e.settings.primary_region, e.settings.dr_region
        );
        operator.confirm(&what, &e.name)?;
    }
    let mode = if dry_run { Mode::Plan } else { Mode::Apply };
    let (mut cx, _lock) = open(t, Command::Down, mode, Ahead::Walk, cancel).await?;
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
    let res = result(Command::Down, &cx, dry_run, report);
    if !dry_run && res.exit == Exit::Success {
        cx.store.delete_file()?;
    }
    Ok(res)
}

/// `reprotect`: reads what AWS says and what would be done.
async fn reprotect_plan(
    t: &Target,
    keep_old_primary: bool,
    dry_run: bool,
    cancel: &Cancel,
) -> Result<(Cx, Option<crate::backend::Lock>, crate::reprotect::Plan)> {
    let (cx, lock) = open(t, Command::Reprotect, if dry_run { Mode::Plan } else { Mode::Apply }, Ahead::Instances, cancel).await?;
    let plan = crate::reprotect::plan(&cx, keep_old_primary).await?;
    Ok((cx, lock, plan))
}

/// `reprotect`: the plan is shown, then (confirmed) the old machinery goes, the roles swap, and
/// `up` builds the new replica and moves detection, all under one lock. A dry run returns the
/// plan alone.
pub async fn reprotect(
    t: &Target,
    keep_old_primary: bool,
    dry_run: bool,
    operator: &dyn Operator,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<ReprotectResult> {
    let (cx, lock, plan) = reprotect_plan(t, keep_old_primary, dry_run, cancel).await?;
    operator.inform(&plan.describe(dry_run));
    if dry_run {
        return Ok(ReprotectResult::Planned(plan));
    }
    let what = format!("This deletes or retires the old primary of {:?} and rebuilds protection in the opposite direction.", cx.name());
    operator.confirm(&what, cx.name())?;
    crate::reprotect::prepare(&cx, &plan, progress).await?;
    // The roles are swapped now; the lock stays held.
    let cx = reopen(t, &cx, Mode::Apply, cancel).await?;
    let report = exec::execute(&graph()?, &cx, Direction::Up, cx.mode, progress, cancel).await;
    drop(lock);
    Ok(ReprotectResult::Done(result(Command::Reprotect, &cx, false, report)))
}

/// What `reprotect` returns: the plan (dry run), or the walk that rebuilt protection.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ReprotectResult {
    Planned(crate::reprotect::Plan),
    Done(RunResult),
}

impl Report for ReprotectResult {
    fn exit(&self) -> Exit {
        match self {
            ReprotectResult::Planned(_) => Exit::Success,
            ReprotectResult::Done(r) => r.exit,
        }
    }
}

/// `adopt`: rebuilds the state file from what is tagged in AWS (both regions and the global
/// services). Nothing in AWS changes; afterwards `up` has nothing to create and `down` can
/// remove everything.
pub async fn adopt(t: &Target, progress: &dyn Progress, cancel: &Cancel) -> Result<RunResult> {
    t.load_env()?;
    let (cx, lock) = open(t, Command::Adopt, Mode::Adopt, Ahead::Walk, cancel).await?;
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
    let cx = if swapped { reopen(t, &cx, Mode::Adopt, cancel).await? } else { cx };
    // A walk that changes nothing in AWS and records what it finds.
    let report = exec::execute(&graph()?, &cx, Direction::Up, cx.mode, progress, cancel).await;
    drop(lock);
    Ok(result(Command::Adopt, &cx, true, report))
}

impl Report for RunResult {
    fn exit(&self) -> Exit {
        self.exit
    }
}
