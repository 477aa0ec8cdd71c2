//! `pgdr failover`: promote the replica, move DNS, fence the old primary. Every phase checks
//! what AWS says first, so a rerun after an interruption (or after the automatic failover
//! function already acted) only finishes what is left.

use std::time::{Duration, Instant};

use aws_sdk_ec2::types::Filter;
use serde::Serialize;

use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{Error, Result};
use crate::exec::{Progress, Recorder};
use crate::health::{self, promoted};
use crate::state::{now_rfc3339, TopologyEvent};
use crate::steps::{dns, instance, network};
use crate::wait::{self, Look, Pace, Wait};

/// What `failover` found and will do.
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
    /// How old the newest lag datapoint is (none arrives once the source region is lost).
    pub replica_lag_age_seconds: Option<u64>,
    pub already_promoted: bool,
    /// The promotion was asked for (the replica is tagged `pgdr:role=primary`, by the failover
    /// function or an earlier run) but is not finished: it is waited for, not asked again.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub promotion_started: bool,
    pub dns_on_replica: bool,
    /// Route 53 did not answer (its control plane is in us-east-1): the promotion goes ahead,
    /// DNS is moved when it answers (the health check moves writers meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_unreachable: Option<String>,
    pub fenced: bool,
    pub steps: Vec<String>,
    /// How long reading the instances, the lag and the records took.
    pub checks_ms: u64,
}

impl Plan {
    pub fn nothing_to_do(&self) -> bool {
        self.steps.is_empty()
    }
}

#[derive(Debug, Serialize)]
pub struct Phase {
    pub phase: String,
    pub ms: u64,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub plan: Plan,
    pub timeline: Vec<Phase>,
    /// Set when the old primary's region did not answer: rerun to fence it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

pub async fn plan(cx: &Cx) -> Result<Plan> {
    let t = Instant::now();
    let records = async {
        match cx.store.id(&dns::zone_key()) {
            Some(zone) => dns::current_records(cx, &zone).await,
            None => Ok(vec![]),
        }
    };
    // One wave: the instances, the lag and the records.
    let (p, d, lag, records) =
        tokio::join!(health::instance(cx, Side::Primary), health::instance(cx, Side::Dr), health::replica_lag(cx), records);
    // An unreachable primary region counts as "primary down".
    let p = p.unwrap_or(None);
    let d = d.map_err(Error::from)?.ok_or_else(|| {
        Error::failed(format!(
            "the replica {} does not exist in {}; nothing to fail over to",
            instance::instance_id(cx, Side::Dr),
            cx.region(Side::Dr)
        ))
    })?;
    let lag = lag.unwrap_or(None);
    let already = promoted(&d);
    let started = !already && d.tag("pgdr:role") == Some("primary");
    let fenced = cx.store.snapshot().topology.fenced.contains_key(cx.region(Side::Primary));
    // Route 53's API answers from us-east-1, the default primary region: in a disaster there it
    // may not answer. That must not stop the promotion.
    let (records, dns_unreachable) = match records {
        Ok(r) => (r, None),
        Err(Error::Aws(e)) if unreachable(&e) => (vec![], Some(e.to_string())),
        Err(e) => return Err(e),
    };
    let dns_on_replica = records.iter().any(|r| r.set_identifier.as_deref() == Some(cx.region(Side::Dr)) && r.weight == Some(100))
        && records.iter().all(|r| r.set_identifier.as_deref() != Some(cx.region(Side::Primary)) || r.weight == Some(0));
    let mut steps = Vec::new();
    if started {
        steps.push(format!("wait for the promotion of {} in {}, already asked for (by the failover function?)", d.id, cx.region(Side::Dr)));
    } else if !already {
        steps.push(format!("promote {} in {} (irreversible; it reboots)", d.id, cx.region(Side::Dr)));
    }
    if !dns_on_replica {
        steps.push(format!(
            "move {} to {} (weights {} 100 / {} 0)",
            dns::writer_record(cx).trim_end_matches('.'),
            d.id,
            cx.region(Side::Dr),
            cx.region(Side::Primary)
        ));
    }
    if !fenced {
        steps.push(format!(
            "fence {}: revoke its 5432 ingress rules, reboot it to end open sessions, tag it pgdr:role=fenced",
            instance::instance_id(cx, Side::Primary)
        ));
    }
    Ok(Plan {
        env: cx.name().to_owned(),
        from_region: cx.region(Side::Primary).to_owned(),
        to_region: cx.region(Side::Dr).to_owned(),
        primary: instance::instance_id(cx, Side::Primary),
        primary_status: p.as_ref().map(|p| p.status.clone()).unwrap_or_else(|| "unreachable or missing".into()),
        replica: d.id.clone(),
        replica_status: d.status.clone(),
        replica_lag_seconds: lag.map(|l| l.seconds),
        replica_lag_age_seconds: lag.map(|l| l.age_s),
        already_promoted: already,
        promotion_started: started,
        dns_on_replica,
        dns_unreachable,
        fenced,
        steps,
        checks_ms: ms(t),
    })
}

/// An error that says the service did not answer (rather than refused).
fn unreachable(e: &crate::error::AwsError) -> bool {
    e.is_transient() || e.transport != crate::error::Transport::Service
}

pub(crate) fn ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

pub async fn execute(cx: &Cx, plan: Plan, progress: &dyn Progress) -> Result<Outcome> {
    let rec = Recorder::new("failover", cx.mode, progress, cx.cancel.clone());
    let lag = plan.replica_lag_seconds.map(|l| format!("{l:.0} s")).unwrap_or_else(|| "unknown".into());
    let mut timeline = vec![Phase { phase: "checks".into(), ms: plan.checks_ms, detail: format!("lag {lag}") }];
    // 1. Promote (at once), and wait until the instance is writable.
    timeline.push(promote(cx, &rec, &plan).await?);
    // 2 and 3 at once: DNS to the new primary (one batch, INSYNC), and the fence of the old
    // primary when its region answers (neither needs the other).
    let (dns, fencing) = tokio::join!(dns_phase(cx, &rec), fence_phase(cx, &rec, &plan));
    let (dns, dns_pending) = dns?;
    let (fenced, fence_pending) = fencing?;
    timeline.extend([dns, fenced]);
    let pending: Vec<String> = dns_pending.into_iter().chain(fence_pending).collect();
    let pending = (!pending.is_empty()).then(|| pending.join("; "));
    Ok(Outcome { plan, timeline, pending })
}

/// A phase, and what it left for a rerun when an endpoint did not answer.
pub(crate) type PhaseResult = Result<(Phase, Option<String>)>;

pub(crate) async fn promote(cx: &Cx, rec: &Recorder<'_>, plan: &Plan) -> Result<Phase> {
    let dr = cx.regional(Side::Dr);
    let region = dr.region.as_str();
    let t = Instant::now();
    if plan.promotion_started {
        rec.status(&format!("the promotion of {} was asked for already: waiting for it", plan.replica));
        wait_promoted(cx, rec, &plan.replica).await?;
    } else if !plan.already_promoted {
        if plan.replica_status != "available" {
            return Err(Error::failed(format!(
                "the replica {} is {:?}, not available: it cannot be promoted now; rerun when it is",
                plan.replica, plan.replica_status
            )));
        }
        let promote = dr
            .rds
            .promote_read_replica()
            .db_instance_identifier(&plan.replica)
            .backup_retention_period(cx.env.settings.backup_retention_days);
        match promote.send().aws(region).await {
            Ok(_) => {
                rec.status(&format!("promotion of {} requested", plan.replica));
                // The decision is irreversible: say so at once, so that the failover function
                // (and a rerun) finishes this promotion instead of starting another.
                tag(cx, Side::Dr, "primary").await?;
            }
            // The failover function may have promoted it since the plan read it (a region loss
            // sets both going): RDS refuses a second promotion, and the job goes on from there.
            Err(e) if e.code.as_deref() == Some("InvalidDBInstanceState") && promoted_meanwhile(cx).await? => {
                rec.status(&format!("{} was promoted meanwhile (by the failover function)", plan.replica))
            }
            Err(e) => return Err(e.into()),
        }
        wait_promoted(cx, rec, &plan.replica).await?;
    }
    tag(cx, Side::Dr, "primary").await?;
    cx.store.update(|s| {
        s.topology.writer_region = region.to_owned();
        if !plan.already_promoted {
            s.topology.events.push(TopologyEvent { at: now_rfc3339(), what: format!("failover: {} promoted in {region}", plan.replica) });
        }
    })?;
    let detail = if plan.already_promoted {
        "already promoted".into()
    } else if plan.promotion_started {
        format!("{} promoted (asked for before this run)", plan.replica)
    } else {
        format!("{} promoted", plan.replica)
    };
    Ok(Phase { phase: "promotion".into(), ms: ms(t), detail })
}

pub(crate) async fn dns_phase(cx: &Cx, rec: &Recorder<'_>) -> PhaseResult {
    let region = cx.region(Side::Dr);
    let t = Instant::now();
    // The endpoint does not change with promotion; read it only if state lacks it.
    if instance::recorded(cx, Side::Dr, crate::state::Attr::Endpoint).is_none() {
        if let Some(e) = health::instance(cx, Side::Dr).await?.and_then(|db| db.endpoint) {
            cx.store.set_attr(&instance::instance_key(cx, Side::Dr), crate::state::Attr::Endpoint, e)?;
        }
    }
    match dns::records_up(cx, rec).await {
        Ok(()) => {
            let detail = format!("{} -> {region}", dns::writer_record(cx).trim_end_matches('.'));
            Ok((Phase { phase: "dns".into(), ms: ms(t), detail }, None))
        }
        Err(Error::Aws(e)) if unreachable(&e) => {
            let note = format!(
                "Route 53 did not answer ({e}); DNS was NOT moved: writers reach {region} through the health check once the failover function reports the promotion (the replica-promoted alarm); rerun `pgdr failover --env {}` when Route 53 answers",
                cx.name()
            );
            Ok((Phase { phase: "dns".into(), ms: ms(t), detail: "pending: Route 53 unreachable".into() }, Some(note)))
        }
        Err(e) => Err(e),
    }
}

pub(crate) async fn fence_phase(cx: &Cx, rec: &Recorder<'_>, plan: &Plan) -> PhaseResult {
    let t = Instant::now();
    if plan.fenced {
        return Ok((Phase { phase: "fence".into(), ms: 0, detail: "already fenced".into() }, None));
    }
    match fence(cx, rec).await {
        Ok(revoked) => {
            let what = if revoked.is_empty() { "nothing (no rules left)".into() } else { revoked.join(", ") };
            Ok((Phase { phase: "fence".into(), ms: ms(t), detail: format!("revoked {what}") }, None))
        }
        Err(Error::Aws(e)) if unreachable(&e) => {
            let note = format!(
                "the old primary's region {} did not answer ({e}); it is NOT fenced: rerun `pgdr failover --env {}` when the region is back",
                cx.region(Side::Primary),
                cx.name()
            );
            Ok((Phase { phase: "fence".into(), ms: ms(t), detail: "pending: region unreachable".into() }, Some(note)))
        }
        Err(e) => Err(e),
    }
}

/// After a failover that could not reach the old primary's region (an automatic one, or
/// `pgdr failover` during the outage), the fence is completed by the next run that reaches it:
/// `up` calls this before its walk, so the walk never restores the old primary's rules.
/// Returns what was done, or why it is still pending.
pub async fn complete_fence(cx: &Cx, progress: &dyn Progress) -> Result<Option<String>> {
    let fenced = cx.store.snapshot().topology.fenced.contains_key(cx.region(Side::Primary));
    if cx.writer() != Side::Dr || fenced || !cx.mode.changes_aws() {
        return Ok(None);
    }
    let rec = Recorder::new("fence", cx.mode, progress, cx.cancel.clone());
    match fence(cx, &rec).await {
        Ok(revoked) => Ok(Some(format!(
            "fenced the old primary {} (a failover had left it unfenced): {}",
            instance::instance_id(cx, Side::Primary),
            revoked.join(", ")
        ))),
        Err(Error::Aws(e)) if unreachable(&e) => {
            Ok(Some(format!("the old primary's region {} does not answer ({e}); its fence is still pending", cx.region(Side::Primary))))
        }
        Err(e) => Err(e),
    }
}

/// Promotion is done when the instance is `available` and no longer a replica (no
/// `ReadReplicaSourceDBInstanceIdentifier`): until then RDS may still refuse writes.
/// Whether the replica's promotion has started by another hand: it has no source any more, or
/// the failover function tagged it the primary (it does so right after its PromoteReadReplica).
async fn promoted_meanwhile(cx: &Cx) -> Result<bool> {
    let db = health::instance(cx, Side::Dr).await?;
    Ok(db.is_some_and(|d| promoted(&d) || d.tag("pgdr:role") == Some("primary")))
}

async fn wait_promoted(cx: &Cx, rec: &Recorder<'_>, id: &str) -> Result<()> {
    let reg = cx.regional(Side::Dr);
    Wait::new(format!("promotion of {id}"))
        .budget(Duration::from_secs(60 * cx.env.settings.replica_wait_minutes))
        // DNS moves the moment the instance is writable: look often.
        .pace(Pace { first: Duration::from_millis(250), max: Duration::from_secs(2) })
        .hint("rerun `pgdr failover` to finish")
        .progress(|s, t| rec.status(&format!("{id}: {s} ({})", wait::human(t))))
        .until(&cx.cancel, &cx.clients.reads, async || {
            let Some(db) = instance::describe(reg, id).await? else { return Ok(Look::Failed("deleted".into())) };
            Ok(match wait::rds_status(&db.status) {
                Look::Ready(()) if db.source.is_none() => Look::Ready(()),
                Look::Ready(()) => Look::Pending("promoting (still a replica)".into()),
                Look::Pending(s) => Look::Pending(s),
                Look::Failed(s) => Look::Failed(s),
            })
        })
        .await
}

async fn tag(cx: &Cx, side: Side, role: &str) -> Result<()> {
    let reg = cx.regional(side);
    let Some(db) = instance::describe(reg, &instance::instance_id(cx, side)).await? else { return Ok(()) };
    if db.tag("pgdr:role") == Some(role) {
        return Ok(());
    }
    reg.rds
        .add_tags_to_resource()
        .resource_name(&db.arn)
        .tags(aws_sdk_rds::types::Tag::builder().key("pgdr:role").value(role).build())
        .send()
        .aws(&reg.region)
        .await?;
    Ok(())
}

/// Revokes the old primary's 5432 ingress rules (recorded, so `reprotect` can restore them and
/// `status` explain them) and tags it fenced.
async fn fence(cx: &Cx, rec: &Recorder<'_>) -> Result<Vec<String>> {
    let side = Side::Primary;
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let sg = cx.store.id(&network::key(cx, side, "db-sg")).unwrap_or_default();
    let mut revoked = Vec::new();
    if !sg.is_empty() {
        let out = reg
            .ec2
            .describe_security_group_rules()
            .filters(Filter::builder().name("group-id").values(&sg).build())
            .send()
            .aws(region)
            .await?;
        let rules: Vec<_> = out
            .security_group_rules
            .unwrap_or_default()
            .into_iter()
            // 5432 in the port range, or all traffic (protocol -1), as the function's fence does.
            .filter(|r| {
                r.is_egress == Some(false)
                    && (r.ip_protocol.as_deref() == Some("-1") || (r.from_port.unwrap_or(0) <= 5432 && r.to_port.unwrap_or(0) >= 5432))
            })
            .collect();
        let ids: Vec<String> = rules.iter().filter_map(|r| r.security_group_rule_id.clone()).collect();
        if !ids.is_empty() {
            reg.ec2.revoke_security_group_ingress().group_id(&sg).set_security_group_rule_ids(Some(ids)).send().aws(region).await?;
        }
        revoked = rules
            .iter()
            .map(|r| {
                let source = r
                    .cidr_ipv4
                    .clone()
                    .or_else(|| r.referenced_group_info.as_ref().and_then(|g| g.group_id.clone()))
                    .or_else(|| r.prefix_list_id.clone())
                    .unwrap_or_else(|| "?".into());
                format!("5432 from {source} ({})", r.security_group_rule_id.clone().unwrap_or_default())
            })
            .collect();
    }
    // Revoking does not cut tracked connections (EC2 user guide, "Security group connection
    // tracking"): pools would keep writing. A reboot ends every session.
    if let Some(db) = instance::describe(reg, &instance::instance_id(cx, side)).await? {
        if db.status == "available" {
            rec.status(&format!("rebooting {} to end its open sessions", db.id));
            reg.rds.reboot_db_instance().db_instance_identifier(&db.id).send().aws(region).await?;
            revoked.push(format!("open sessions (rebooted {})", db.id));
        }
    }
    tag(cx, side, "fenced").await?;
    let list = revoked.clone();
    let fenced_id = instance::instance_id(cx, side);
    // The revoked rules leave the state: `up` recreates them once the region is unfenced.
    let mut rule_keys: Vec<crate::state::Key> = ["db-sg-rule-local", "db-sg-rule-peer"].iter().map(|r| network::key(cx, side, r)).collect();
    rule_keys.push(crate::steps::agent::db_rule_key(cx, side));
    // Compute everything first: the closure runs under the state lock.
    cx.store.update(|s| {
        s.topology.fenced.insert(region.to_owned(), list);
        for k in &rule_keys {
            s.resources.remove(k);
        }
        s.topology.events.push(TopologyEvent { at: now_rfc3339(), what: format!("fenced {fenced_id} in {region}") });
    })?;
    rec.status(&format!("fenced {}", instance::instance_id(cx, side)));
    Ok(revoked)
}
