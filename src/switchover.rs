//! `pgdr switchover`: the planned role swap that loses nothing.
//!
//! 1. checks: both instances available, the replica replicating; both regions' agents reach
//!    their database over verified TLS (the one in the DR region must unguard the new
//!    primary later: it is proved before anything is fenced).
//! 2. fence: the primary's client rules revoked (new connections from both VPCs dropped; the
//!    agent's own rule stays), its login roles made read-only for new sessions, every other
//!    session ended; then its WAL position is read (`pg_current_wal_lsn()`): every
//!    acknowledged commit is at or before it.
//! 3. catch-up: the replica replays up to that position (`pg_last_wal_replay_lsn()`), within
//!    `switchover_catchup_seconds`. If it does not, or anything before the promotion fails,
//!    the fence is lifted (rules back, roles restored) and nothing is promoted.
//! 4. promotion, as `failover` does; then the read-only guard is lifted on the new primary
//!    (ALTER ROLE is catalog data: it replicated), DNS moves, the old primary is fenced fully.
//!
//! The reprotect that follows (a new replica in the old region) is the ops layer's.
//! [`SwitchoverMark`] in the state says where a run stands, written before each fencing or
//! irreversible call: a rerun after a crash unfences (nothing promoted) or finishes.

use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use crate::agent::{Agents, Catchup, Check, Fenced, GuardedRole};
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{Error, Result};
use crate::exec::{Action, Change, Progress, Recorder};
use crate::failover::{ms, Phase};
use crate::health;
use crate::state::{now_rfc3339, Attr, SwitchoverMark, SwitchoverPhase};
use crate::steps::{instance, network};

/// How long the fence waits for the ended sessions to be gone.
const SESSIONS_TIMEOUT_S: u64 = 30;

#[derive(Debug, Serialize)]
pub struct Plan {
    pub env: String,
    pub from_region: String,
    pub to_region: String,
    pub primary: String,
    pub primary_status: String,
    pub replica: String,
    pub replica_status: String,
    pub replica_lag_seconds: Option<f64>,
    pub catchup_timeout_s: u64,
    pub record_ttl_s: i64,
    pub keep_old_primary: bool,
    /// A run that stopped part-way: what this one does about it first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resuming: Option<String>,
    pub steps: Vec<String>,
    pub expected_pause: String,
}

/// What the fence-to-DNS part did.
#[derive(Debug, Serialize)]
pub struct Switched {
    pub from_region: String,
    pub to_region: String,
    pub target_lsn: Option<String>,
    pub replayed_lsn: Option<String>,
    /// From the fence to DNS moved: writes were refused this long (clients then follow DNS
    /// within the record's TTL).
    pub write_pause_ms: u64,
    pub timeline: Vec<Phase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

fn mark(cx: &Cx) -> Option<SwitchoverMark> {
    cx.store.snapshot().topology.switchover
}

fn endpoint(cx: &Cx, side: Side) -> Result<String> {
    instance::recorded(cx, side, Attr::Endpoint).ok_or_else(|| {
        Error::failed(format!(
            "the endpoint of {} is not in the state; run `pgdr up --env {}` first",
            instance::instance_id(cx, side),
            cx.name()
        ))
    })
}

pub async fn plan(cx: &Cx, catchup_timeout_s: u64, keep_old_primary: bool) -> Result<Plan> {
    let m = mark(cx);
    let promoting = m.as_ref().is_some_and(|m| m.phase == SwitchoverPhase::Promoting);
    if cx.writer() == Side::Dr && !promoting {
        return Err(Error::user(format!(
            "environment {} has failed over (the writer is in {}) and is not protected: run `pgdr reprotect --env {}` first",
            cx.name(),
            cx.region(Side::Dr),
            cx.name()
        )));
    }
    let (p, d, lag) = tokio::join!(health::instance(cx, Side::Primary), health::instance(cx, Side::Dr), health::replica_lag(cx));
    let p = p.map_err(|e| {
        Error::failed(format!(
            "the primary region {} does not answer ({e}); a switchover needs both regions: use `pgdr failover`",
            cx.region(Side::Primary)
        ))
    })?;
    let d = d?;
    let lag = lag.unwrap_or(None);
    let (primary, replica) = (instance::instance_id(cx, Side::Primary), instance::instance_id(cx, Side::Dr));
    let primary_status = p.as_ref().map(|p| p.status.clone()).unwrap_or_else(|| "missing".into());
    let replica_status = d.as_ref().map(|d| d.status.clone()).unwrap_or_else(|| "missing".into());
    if !promoting {
        if primary_status != "available" || replica_status != "available" {
            return Err(Error::failed(format!(
                "a switchover needs both instances available: {primary} is {primary_status}, {replica} is {replica_status}; rerun when they are"
            )));
        }
        if d.as_ref().is_some_and(|d| d.source.is_none()) {
            return Err(Error::failed(format!("{replica} is not a read replica any more; run `pgdr status --env {}`", cx.name())));
        }
    }
    let (from, to) = (cx.region(Side::Primary), cx.region(Side::Dr));
    let resuming = m.as_ref().map(|m| match m.phase {
        SwitchoverPhase::Fencing => {
            format!("a switchover started {} stopped before the promotion: the primary is unfenced first", m.started_at)
        }
        SwitchoverPhase::Promoting => format!("a switchover started {} had asked for the promotion: this run finishes it", m.started_at),
    });
    let mut steps = Vec::new();
    if !promoting {
        steps.extend([
            format!("check that the agents in {from} and {to} reach {primary} and {replica} over verified TLS"),
            format!("fence {primary}: revoke its 5432 rules from both VPCs, make its login roles read-only, end every session"),
            format!("read its WAL position and wait until {replica} has replayed it (at most {catchup_timeout_s} s; else unfence, promote nothing)"),
        ]);
    }
    steps.extend([
        format!("promote {replica} in {to} (irreversible)"),
        format!("lift the read-only guard on {replica} (it replicated), move postgres.{} to it", cx.env.zone_name()),
        format!("fence {primary} fully (all 5432 rules, reboot)"),
        if keep_old_primary {
            format!("keep {primary} (retired) and make a new replica in {from}")
        } else {
            format!("delete {primary} with a final snapshot and make a new replica in {from}")
        },
    ]);
    let lag_text = lag.map(|l| format!("now {:.0} s", l.seconds)).unwrap_or_else(|| "unknown".into());
    let expected_pause = format!(
        "writes stop at the fence and resume when clients follow DNS: the replica's catch-up (lag {lag_text}, at most {catchup_timeout_s} s), RDS's promotion (typically a few minutes), then up to the record TTL ({} s)",
        cx.env.settings.record_ttl
    );
    Ok(Plan {
        env: cx.name().to_owned(),
        from_region: from.to_owned(),
        to_region: to.to_owned(),
        primary,
        primary_status,
        replica,
        replica_status,
        replica_lag_seconds: lag.map(|l| l.seconds),
        catchup_timeout_s,
        record_ttl_s: cx.env.settings.record_ttl,
        keep_old_primary,
        resuming,
        steps,
        expected_pause,
    })
}

impl Plan {
    pub fn describe(&self, dry_run: bool) -> String {
        let mut s =
            format!("switchover of {}: {} ({}) -> {} ({})\n", self.env, self.primary, self.from_region, self.replica, self.to_region);
        if let Some(r) = &self.resuming {
            s.push_str(&format!("  note: {r}\n"));
        }
        for (i, step) in self.steps.iter().enumerate() {
            s.push_str(&format!("  {}. {step}\n", i + 1));
        }
        s.push_str(&format!("  write pause: {}\n", self.expected_pause));
        if dry_run {
            s.push_str("dry run: nothing changed\n");
        }
        s
    }
}

/// Lifts a fence left by a run that stopped before the promotion: client rules back, roles
/// restored. Safe to repeat.
pub async fn unfence(cx: &Cx, agents: &Agents<'_>, progress: &dyn Progress) -> Result<()> {
    let Some(m) = mark(cx).filter(|m| m.phase == SwitchoverPhase::Fencing) else { return Ok(()) };
    let rec = Recorder::new("unfence", cx.mode, progress, cx.cancel.clone());
    lift(cx, agents, &rec, &m.guarded).await?;
    // Computed first: the closure runs under the state lock, which the store's readers take too.
    let what = format!("switchover stopped before the promotion: {} unfenced", instance::instance_id(cx, Side::Primary));
    cx.store.update(|s| {
        s.topology.switchover = None;
        s.topology.events.push(crate::state::TopologyEvent { at: now_rfc3339(), what });
    })
}

async fn lift(cx: &Cx, agents: &Agents<'_>, rec: &Recorder<'_>, guarded: &[GuardedRole]) -> Result<()> {
    rec.status(&format!("unfencing {}", instance::instance_id(cx, Side::Primary)));
    // Rules first: the roles' guard is only the second line.
    network::restore_client_rules(cx, rec, Side::Primary).await?;
    let host = endpoint(cx, Side::Primary)?;
    let _: serde_json::Value = agents.call(Side::Primary, "unguard", json!({"host": host, "roles": guarded})).await?;
    Ok(())
}

/// Revokes the primary's client rules (5432 from both VPCs), keeping the agent's.
async fn revoke_client_rules(cx: &Cx, rec: &Recorder<'_>) -> Result<Vec<String>> {
    let side = Side::Primary;
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let sg = network::db_sg_id(cx, side).unwrap_or_default();
    let mut revoked = Vec::new();
    for (rule, cidr) in [("db-sg-rule-local", cx.cidr(side)), ("db-sg-rule-peer", cx.cidr(side.other()))] {
        let Some(id) = network::find_rule(cx, side, &sg, &cidr.to_string()).await? else { continue };
        let change =
            Change::new(Action::Delete, "security-group-rule", &format!("5432 from {cidr}"), region).id(&id).detail("switchover fence");
        rec.apply(change, async |_| {
            match reg.ec2.revoke_security_group_ingress().group_id(&sg).security_group_rule_ids(&id).send().aws(region).await {
                Ok(_) => Ok(()),
                Err(e) if e.is_not_found() => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await?;
        cx.store.remove(&network::key(cx, side, rule))?;
        revoked.push(cidr.to_string());
    }
    Ok(revoked)
}

/// Checks, fence and catch-up, promotion, unguard, DNS and the old primary's full fence.
pub async fn switch(cx: &Cx, agents: &Agents<'_>, plan: &Plan, progress: &dyn Progress) -> Result<Switched> {
    let rec = Recorder::new("switchover", cx.mode, progress, cx.cancel.clone());
    let mut timeline = Vec::new();
    let (mut target_lsn, mut replayed_lsn) = (None, None);
    let promoting = mark(cx).is_some_and(|m| m.phase == SwitchoverPhase::Promoting);
    let fence_start = Instant::now();
    let guarded = if promoting {
        mark(cx).map(|m| m.guarded).unwrap_or_default()
    } else {
        let t = Instant::now();
        let (primary_host, replica_host) = (endpoint(cx, Side::Primary)?, endpoint(cx, Side::Dr)?);
        let (p, r) = tokio::join!(
            agents.call::<Check>(Side::Primary, "check", json!({"host": primary_host})),
            agents.call::<Check>(Side::Dr, "check", json!({"host": replica_host}))
        );
        let (p, r) = (p?, r?);
        if p.in_recovery || !r.in_recovery {
            return Err(Error::failed(format!(
                "the databases do not play the roles AWS reports ({} in recovery: {}, {} in recovery: {}); nothing was changed",
                plan.primary, p.in_recovery, plan.replica, r.in_recovery
            )));
        }
        timeline.push(Phase {
            phase: "checks".into(),
            ms: ms(t),
            detail: format!("PostgreSQL {}, {} login roles", p.server_version, p.roles.len()),
        });
        let m = SwitchoverMark {
            started_at: now_rfc3339(),
            from_region: plan.from_region.clone(),
            to_region: plan.to_region.clone(),
            phase: SwitchoverPhase::Fencing,
            guarded: p.roles.clone(),
        };
        cx.store.update(|s| s.topology.switchover = Some(m))?;
        let fence_start = Instant::now();
        match fence_and_catch_up(cx, agents, &rec, plan, &p.roles, &primary_host, &replica_host).await {
            Ok((phases, c)) if c.caught_up => {
                timeline.extend(phases);
                target_lsn = Some(c.target_lsn);
                replayed_lsn = c.replayed_lsn;
            }
            outcome => {
                let why = match outcome {
                    Ok((_, c)) => format!(
                        "the replica {} did not replay the primary's last position {} within {} s (it reached {})",
                        plan.replica,
                        c.target_lsn,
                        plan.catchup_timeout_s,
                        c.replayed_lsn.as_deref().unwrap_or("nothing")
                    ),
                    Err(e) => e.to_string(),
                };
                return Err(match unfence(cx, agents, progress).await {
                    Ok(()) => Error::failed(format!(
                        "switchover stopped: {why}; the primary {} is unfenced and nothing was promoted (paused {} s)",
                        plan.primary,
                        fence_start.elapsed().as_secs()
                    )),
                    Err(u) => Error::failed(format!(
                        "switchover stopped: {why}; unfencing failed too ({u}): rerun `pgdr switchover --env {}` to unfence, nothing was promoted",
                        cx.name()
                    )),
                });
            }
        }
        p.roles
    };
    // The promotion is the point of no return: a rerun from here finishes.
    cx.store.update(|s| {
        if let Some(m) = s.topology.switchover.as_mut() {
            m.phase = SwitchoverPhase::Promoting;
        }
    })?;
    let fplan = crate::failover::plan(cx).await?;
    timeline.push(crate::failover::promote(cx, &rec, &fplan).await?);
    let t = Instant::now();
    let new_primary = endpoint(cx, Side::Dr)?;
    let _: serde_json::Value = agents.call(Side::Dr, "unguard", json!({"host": new_primary, "roles": guarded})).await?;
    timeline.push(Phase {
        phase: "unguard".into(),
        ms: ms(t),
        detail: format!("{} login roles writable on {}", guarded.len(), plan.replica),
    });
    let (dns, fence) = tokio::join!(crate::failover::dns_phase(cx, &rec), crate::failover::fence_phase(cx, &rec, &fplan));
    let (dns, dns_pending) = dns?;
    let write_pause_ms = ms(fence_start);
    let (fenced, fence_pending) = fence?;
    timeline.extend([dns, Phase { phase: "fence-old".into(), ..fenced }]);
    let pending: Vec<String> = dns_pending.into_iter().chain(fence_pending).collect();
    Ok(Switched {
        from_region: plan.from_region.clone(),
        to_region: plan.to_region.clone(),
        target_lsn,
        replayed_lsn,
        write_pause_ms,
        timeline,
        pending: (!pending.is_empty()).then(|| pending.join("; ")),
    })
}

async fn fence_and_catch_up(
    cx: &Cx,
    agents: &Agents<'_>,
    rec: &Recorder<'_>,
    plan: &Plan,
    roles: &[GuardedRole],
    primary_host: &str,
    replica_host: &str,
) -> Result<(Vec<Phase>, Catchup)> {
    let t = Instant::now();
    let revoked = revoke_client_rules(cx, rec).await?;
    let f: Fenced =
        agents.call(Side::Primary, "fence", json!({"host": primary_host, "roles": roles, "timeout_s": SESSIONS_TIMEOUT_S})).await?;
    let fence = Phase {
        phase: "fence".into(),
        ms: ms(t),
        detail: format!("revoked 5432 from {}; {} sessions ended; WAL at {}", revoked.join(", "), f.sessions_ended, f.lsn),
    };
    rec.status(&format!("waiting for {} to replay {}", plan.replica, f.lsn));
    let t = Instant::now();
    let c: Catchup = agents
        .call(Side::Primary, "catchup", json!({"host": replica_host, "target_lsn": f.lsn, "timeout_s": plan.catchup_timeout_s}))
        .await?;
    let detail = format!("replayed {} of {} in {} ms", c.replayed_lsn.as_deref().unwrap_or("nothing"), c.target_lsn, c.waited_ms);
    Ok((vec![fence, Phase { phase: "catchup".into(), ms: ms(t), detail }], c))
}
