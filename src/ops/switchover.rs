//! `switchover` and `drill`: the planned role swap (see [`crate::switchover`]), followed by
//! the reprotect that leaves the environment protected with the roles swapped; and the drill
//! that rehearses it (or the unplanned failover) and back, with an in-VPC marker writer whose
//! rows measure RTO and RPO.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::{graph, open, reopen, Ahead, Command, Operator, Report, Target};
use crate::agent::{self, Agents, Markers, Written};
use crate::cx::{Cx, Side};
use crate::error::{Error, Exit, Result};
use crate::exec::{self, Cancel, Direction, Mode, Progress};
use crate::failover::Phase;
use crate::state::{now_rfc3339, Attr, SwitchoverPhase, DRILLS_KEPT};
use crate::steps::{dns, instance};
use crate::switchover::{self, Switched};

#[derive(Clone, Copy, Debug, Default)]
pub struct SwitchoverOptions {
    pub dry_run: bool,
    pub keep_old_primary: bool,
    /// Overrides `switchover_catchup_seconds`.
    pub catchup_timeout_s: Option<u64>,
}

#[derive(Debug, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum SwitchoverResult {
    Planned(switchover::Plan),
    Switched {
        #[serde(flatten)]
        switched: Switched,
        /// The walk that rebuilt protection in the opposite direction.
        reprotect: super::RunResult,
    },
}

impl Report for SwitchoverResult {
    fn exit(&self) -> Exit {
        match self {
            SwitchoverResult::Planned(_) => Exit::Success,
            SwitchoverResult::Switched { switched, reprotect } if switched.pending.is_none() => reprotect.exit,
            SwitchoverResult::Switched { .. } => Exit::Partial,
        }
    }
}

/// `switchover`: plan, confirmation, then the swap and the reprotect, under one lock.
pub async fn switchover(
    t: &Target,
    opts: SwitchoverOptions,
    operator: &dyn Operator,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<SwitchoverResult> {
    let mode = if opts.dry_run { Mode::Plan } else { Mode::Apply };
    let (cx, lock) = open(t, Command::Switchover, mode, Ahead::Instances, cancel).await?;
    if let Some(done) = finish_swapped(t, &cx, progress, cancel).await? {
        drop(lock);
        return Ok(done);
    }
    let timeout = opts.catchup_timeout_s.unwrap_or(cx.env.settings.switchover_catchup_seconds);
    let plan = switchover::plan(&cx, timeout, opts.keep_old_primary).await?;
    operator.inform(&plan.describe(opts.dry_run));
    if opts.dry_run {
        return Ok(SwitchoverResult::Planned(plan));
    }
    operator
        .confirm(&format!("This swaps the roles of {:?}: writes pause, {} becomes the primary.", cx.name(), plan.replica), cx.name())?;
    let agents = Agents::new(&cx).await?;
    switchover::unfence(&cx, &agents, progress).await?;
    let switched = switchover::switch(&cx, &agents, &plan, progress).await?;
    let reprotect = reprotect_after(t, &cx, opts.keep_old_primary, progress, cancel).await?;
    drop(lock);
    Ok(SwitchoverResult::Switched { switched, reprotect })
}

/// A run that died after the reprotect swapped the roles in the state: only the walk is left.
async fn finish_swapped(t: &Target, cx: &Cx, progress: &dyn Progress, cancel: &Cancel) -> Result<Option<SwitchoverResult>> {
    let Some(m) = cx.store.snapshot().topology.switchover else { return Ok(None) };
    if m.phase != SwitchoverPhase::Promoting || cx.region(Side::Primary) != m.to_region || !cx.mode.changes_aws() {
        return Ok(None);
    }
    let report = walk(t, cx, progress, cancel).await?;
    let switched = Switched {
        from_region: m.from_region,
        to_region: m.to_region,
        target_lsn: None,
        replayed_lsn: None,
        write_pause_ms: 0,
        timeline: vec![Phase { phase: "resume".into(), ms: 0, detail: "the swap was done by an earlier run; protection rebuilt".into() }],
        pending: None,
    };
    Ok(Some(SwitchoverResult::Switched { switched, reprotect: report }))
}

/// The reprotect after a swap: the old primary deleted (or kept), roles swapped in the state,
/// then `up`'s walk makes the new replica and moves detection; the mark is cleared last.
async fn reprotect_after(
    t: &Target,
    cx: &Cx,
    keep_old_primary: bool,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<super::RunResult> {
    let plan = crate::reprotect::plan(cx, keep_old_primary).await?;
    crate::reprotect::prepare(cx, &plan, progress).await?;
    walk(t, cx, progress, cancel).await
}

async fn walk(t: &Target, cx: &Cx, progress: &dyn Progress, cancel: &Cancel) -> Result<super::RunResult> {
    let cx = reopen(t, cx, Mode::Apply, cancel).await?;
    let report = exec::execute(&graph()?, &cx, Direction::Up, cx.mode, progress, cancel).await;
    let result = super::run::result(Command::Switchover, &cx, false, report);
    if result.exit == Exit::Success {
        cx.store.update(|s| s.topology.switchover = None)?;
    }
    Ok(result)
}

// ---- drill ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default)]
pub struct DrillOptions {
    /// Rehearse the unplanned path first (promotion without the LSN wait), then switch back.
    pub failover: bool,
    /// Confirms a drill on an environment marked as production.
    pub production: bool,
    /// Overrides `switchover_catchup_seconds`.
    pub catchup_timeout_s: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LegKind {
    Switchover,
    Failover,
}

/// One move of the writer, as the drill's writer saw it.
#[derive(Debug, Serialize)]
pub struct Leg {
    pub kind: LegKind,
    pub from_region: String,
    pub to_region: String,
    /// The longest time between two acknowledged markers: the write-unavailability window.
    pub rto_seconds: f64,
    /// Acknowledged markers missing from the new primary.
    pub rpo_rows: u64,
    /// Markers acknowledged.
    pub rows_written: u64,
    pub write_attempts: u64,
    pub failed_writes: u64,
    pub timeline: Vec<Phase>,
}

#[derive(Debug, Serialize)]
pub struct DrillReport {
    pub env: String,
    pub mode: LegKind,
    pub started_at: String,
    pub finished_at: String,
    pub seconds: u64,
    /// The worst leg's window.
    pub rto_seconds: f64,
    pub rpo_rows: u64,
    pub rows_written: u64,
    pub legs: Vec<Leg>,
    #[serde(rename = "final")]
    pub final_state: FinalState,
}

#[derive(Debug, Serialize)]
pub struct FinalState {
    pub primary_region: String,
    pub replica_region: String,
    /// The last reprotect finished: a replica protects the primary again.
    pub protected: bool,
}

impl Report for DrillReport {
    fn exit(&self) -> Exit {
        if self.final_state.protected {
            Exit::Success
        } else {
            Exit::Partial
        }
    }
}

/// The drill's writer: the marker writer in the DR region's VPC (an application there, fenced
/// like one), through `postgres.<zone>`, until writes have been back this long.
fn writer_args(cx: &Cx, run_id: &str) -> serde_json::Value {
    let resumed = (2 * cx.env.settings.record_ttl).clamp(20, 120);
    json!({
        "host": dns::writer_record(cx).trim_end_matches('.'),
        "run_id": run_id,
        "duration_s": agent::WRITER_MAX_S,
        "interval_ms": 100,
        "stop_after_resumed_s": resumed,
        "table": agent::MARKER_TABLE,
    })
}

/// `drill`: a switchover (or failover) and a switchover back, measured by the in-VPC writer.
pub async fn drill(
    t: &Target,
    opts: DrillOptions,
    operator: &dyn Operator,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<DrillReport> {
    let (cx, lock) = open(t, Command::Drill, Mode::Apply, Ahead::Instances, cancel).await?;
    if cx.env.production() && !opts.production {
        return Err(Error::user(format!(
            "environment {} is marked as production: a drill moves its writer twice and pauses writes; add --production to confirm",
            cx.name()
        )));
    }
    let started = Instant::now();
    let started_at = now_rfc3339();
    let timeout = opts.catchup_timeout_s.unwrap_or(cx.env.settings.switchover_catchup_seconds);
    let first = if opts.failover { LegKind::Failover } else { LegKind::Switchover };
    // Both plans' checks run before anything changes.
    let plan = switchover::plan(&cx, timeout, false).await?;
    operator.inform(&format!(
        "drill of {}: {} to {} ({}), then a switchover back, while a writer in {}'s VPC commits markers\n{}",
        cx.name(),
        if opts.failover { "a failover (no catch-up wait: acknowledged writes may be lost)" } else { "a switchover" },
        plan.to_region,
        plan.replica,
        plan.to_region,
        plan.describe(false)
    ));
    operator.confirm(&format!("This moves the writer of {:?} away and back.", cx.name()), cx.name())?;
    let mut legs = Vec::new();
    let (away, cx) = run_leg(t, cx, first, timeout, progress, cancel).await?;
    legs.push(away);
    let (back, cx) = run_leg(t, cx, LegKind::Switchover, timeout, progress, cancel).await?;
    legs.push(back);
    let protected = cx.store.snapshot().topology.switchover.is_none()
        && crate::health::instance(&cx, Side::Dr).await?.is_some_and(|d| d.source.is_some());
    let report = DrillReport {
        env: cx.name().to_owned(),
        mode: first,
        started_at,
        finished_at: now_rfc3339(),
        seconds: started.elapsed().as_secs(),
        rto_seconds: legs.iter().map(|l| l.rto_seconds).fold(0.0, f64::max),
        rpo_rows: legs.iter().map(|l| l.rpo_rows).sum(),
        rows_written: legs.iter().map(|l| l.rows_written).sum(),
        legs,
        final_state: FinalState {
            primary_region: cx.region(Side::Primary).to_owned(),
            replica_region: cx.region(Side::Dr).to_owned(),
            protected,
        },
    };
    let kept = serde_json::to_value(&report).map_err(|e| Error::Other(format!("internal: {e}")))?;
    cx.store.update(|s| {
        s.drills.push(kept);
        let extra = s.drills.len().saturating_sub(DRILLS_KEPT);
        s.drills.drain(..extra);
    })?;
    drop(lock);
    Ok(report)
}

/// One move of the writer with the marker writer running, then the reprotect; returns the
/// context of the environment as it now is (roles swapped).
async fn run_leg(t: &Target, cx: Cx, kind: LegKind, timeout: u64, progress: &dyn Progress, cancel: &Cancel) -> Result<(Leg, Cx)> {
    let agents = Agents::new(&cx).await?;
    let run_id = format!("{}-{}", kind_name(kind), now_rfc3339());
    let (from, to) = (cx.region(Side::Primary).to_owned(), cx.region(Side::Dr).to_owned());
    let new_primary = instance::recorded(&cx, Side::Dr, Attr::Endpoint).ok_or_else(|| {
        Error::failed(format!("the endpoint of {} is not in the state; run `pgdr up` first", instance::instance_id(&cx, Side::Dr)))
    })?;
    let writer = agents.call::<Written>(Side::Dr, "write", writer_args(&cx, &run_id));
    let work = async {
        // Let the writer connect and commit before the fence.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let timeline = match kind {
            LegKind::Switchover => {
                let plan = switchover::plan(&cx, timeout, false).await?;
                switchover::switch(&cx, &agents, &plan, progress).await?.timeline
            }
            LegKind::Failover => {
                let plan = crate::failover::plan(&cx).await?;
                crate::failover::execute(&cx, plan, progress).await?.timeline
            }
        };
        let reprotect = reprotect_after(t, &cx, false, progress, cancel).await?;
        if reprotect.exit != Exit::Success {
            return Err(Error::failed(format!(
                "the drill's reprotect did not finish; rerun `pgdr up --env {}` (or `pgdr switchover`) to finish it",
                cx.name()
            )));
        }
        Ok::<_, Error>(timeline)
    };
    tokio::pin!(writer, work);
    let mut written = None;
    let timeline = loop {
        tokio::select! {
            w = &mut writer, if written.is_none() => written = Some(w),
            r = &mut work => break r?,
        }
    };
    let written = match written {
        Some(w) => w?,
        None => writer.await?,
    };
    let markers: Markers =
        agents.call(Side::Dr, "markers", json!({"host": new_primary, "run_id": run_id, "table": agent::MARKER_TABLE})).await?;
    let leg = Leg {
        kind,
        from_region: from,
        to_region: to,
        rto_seconds: written.longest_gap_s,
        rpo_rows: agent::missing(&written.acked, &markers.present),
        rows_written: written.acked_count,
        write_attempts: written.attempts,
        failed_writes: written.failed_count,
        timeline,
    };
    let cx = reopen(t, &cx, Mode::Apply, cancel).await?;
    Ok((leg, cx))
}

fn kind_name(kind: LegKind) -> &'static str {
    match kind {
        LegKind::Switchover => "switchover",
        LegKind::Failover => "failover",
    }
}
