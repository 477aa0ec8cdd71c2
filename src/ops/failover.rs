//! `failover`: the plan, read from AWS; the lag check; the operator's confirmation; the
//! promotion, DNS and fence ([`crate::failover::execute`]).

use serde::Serialize;

use super::{open, Ahead, Command, Operator, Report, Target};
use crate::error::{Error, Exit, Result};
use crate::exec::{Cancel, Mode, Progress};

#[derive(Clone, Copy, Debug, Default)]
pub struct FailoverOptions {
    pub dry_run: bool,
    /// Promote even when the lag is over the limit, or unknown while the primary is available.
    pub force: bool,
}

/// What `failover` returns: the plan alone (dry run, or nothing to do), or what was done.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum FailoverResult {
    Planned(crate::failover::Plan),
    Done(crate::failover::Outcome),
}

impl Report for FailoverResult {
    fn exit(&self) -> Exit {
        match self {
            FailoverResult::Done(o) if o.pending.is_some() => Exit::Partial,
            _ => Exit::Success,
        }
    }
}

/// `failover`: reads what AWS says, shows the plan, refuses a lagging replica unless forced,
/// asks, then promotes, moves DNS and fences (locked unless a dry run).
pub async fn failover(
    t: &Target,
    opts: FailoverOptions,
    operator: &dyn Operator,
    progress: &dyn Progress,
    cancel: &Cancel,
) -> Result<FailoverResult> {
    let e = t.load_env()?;
    let mode = if opts.dry_run { Mode::Plan } else { Mode::Apply };
    let (cx, _lock) = open(t, Command::Failover, mode, Ahead::Instances, cancel).await?;
    let plan = crate::failover::plan(&cx).await?;
    operator.inform(&plan.describe(opts.dry_run && !plan.nothing_to_do()));
    if opts.dry_run || plan.nothing_to_do() {
        if plan.nothing_to_do() {
            operator.inform(&format!(
                "nothing to do: {} is already the primary, DNS points at it and the old primary is fenced\n",
                plan.replica
            ));
        }
        return Ok(FailoverResult::Planned(plan));
    }
    check_lag(&plan, e.settings.max_failover_lag_seconds, opts.force)?;
    operator.confirm(&format!("This fails environment {:?} over to {}.", e.name, plan.to_region), &e.name)?;
    Ok(FailoverResult::Done(crate::failover::execute(&cx, plan, progress).await?))
}

/// Refuses a promotion that would lose more than `max` seconds of data, unless forced. With no
/// lag datapoint the loss is unknown: that is refused too while the primary is available (a
/// switchover can wait for the metric), but not when it is down (the disaster `failover` is for).
fn check_lag(plan: &crate::failover::Plan, max: f64, force: bool) -> Result<()> {
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
