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
    check_lag(&plan, cx.env.settings.max_failover_lag_seconds, opts.force)?;
    operator.confirm(&format!("This fails environment {:?} over to {}.", cx.name(), plan.to_region), cx.name())?;
    Ok(FailoverResult::Done(crate::failover::execute(&cx, plan, progress).await?))
}

/// Refuses a promotion that would lose more than `max` seconds of data, unless forced. With no
/// lag datapoint the loss is unknown: that is refused too while the primary is available (a
/// switchover can wait for the metric), but not when it is down (the disaster `failover` is for).
///
/// A primary that is not alive (its region does not answer, it is gone or in a terminal
/// status) is the disaster `failover` is for: the lag, whatever its last datapoint said, does
/// not stop it; the plan shows that datapoint and its age before the question.
fn check_lag(plan: &crate::failover::Plan, max: f64, force: bool) -> Result<()> {
    let primary_alive = crate::wait::rds_status(&plan.primary_status) != crate::wait::Look::Failed(plan.primary_status.clone())
        && plan.primary_status != "unreachable or missing"
        && plan.primary_status != "stopped";
    if plan.already_promoted || plan.promotion_started || force || !primary_alive {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(primary_status: &str, lag: Option<f64>) -> crate::failover::Plan {
        crate::failover::Plan {
            env: "dev".into(),
            from_region: "us-east-1".into(),
            to_region: "eu-west-1".into(),
            primary: "pgdr-dev-us-east-1".into(),
            primary_status: primary_status.into(),
            replica: "pgdr-dev-eu-west-1".into(),
            replica_status: "available".into(),
            replica_lag_seconds: lag,
            replica_lag_age_seconds: lag.map(|_| 900),
            already_promoted: false,
            promotion_started: false,
            dns_on_replica: false,
            dns_unreachable: None,
            fenced: false,
            steps: vec![],
            checks_ms: 0,
        }
    }

    #[test]
    fn lag_stops_a_failover_only_while_the_primary_is_alive() {
        assert!(check_lag(&plan("available", Some(600.0)), 60.0, false).is_err());
        assert!(check_lag(&plan("modifying", Some(600.0)), 60.0, false).is_err());
        assert!(check_lag(&plan("available", None), 60.0, false).is_err());
        assert!(check_lag(&plan("available", Some(600.0)), 60.0, true).is_ok());
        // The disaster: the primary's region does not answer, or the instance is broken.
        assert!(check_lag(&plan("unreachable or missing", Some(600.0)), 60.0, false).is_ok());
        assert!(check_lag(&plan("inaccessible-encryption-credentials", None), 60.0, false).is_ok());
        assert!(check_lag(&plan("available", Some(20.0)), 60.0, false).is_ok());
    }
}
