//! The databases: an RDS PostgreSQL Multi-AZ primary and its encrypted cross-region read
//! replica, each with its PostgreSQL log group (7-day retention, created by pgdr so that `down`
//! removes it).

use std::time::Duration;

use futures::future::LocalBoxFuture;

use super::instance::{self, describe, instance_id, instance_key, is_fenced_side, lookup, Db};
use super::{dbgroups, network, secrets, Res, StepId};
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{Error, Result};
use crate::exec::{Action, Change, Recorder, Step, StepResult};
use crate::state::Attr;
use crate::wait::{self, Look, Pace, Wait};

/// Log exports: the PostgreSQL log (with `log_statement`, the audit trail) and upgrade logs.
const LOG_EXPORTS: [&str; 2] = ["postgresql", "upgrade"];

pub struct Primary;
pub struct Replica;

/// Finds the instance of `side`, refusing one with the same name that is not this environment's.
async fn find(cx: &Cx, side: Side) -> Result<Option<Db>> {
    let id = instance_id(cx, side);
    match lookup(cx.regional(side), &id).await? {
        Some(db) if db.tag("pgdr:env") != Some(cx.name()) => Err(Error::user(format!(
            "an RDS instance {id} already exists in {} and is not tagged pgdr:env={}; rename it or choose another --env",
            cx.region(side),
            cx.name()
        ))),
        other => Ok(other),
    }
}

impl Step<Cx, StepId> for Primary {
    fn id(&self) -> StepId {
        StepId::Primary
    }
    fn deps(&self) -> Vec<StepId> {
        vec![StepId::Network(Side::Primary), StepId::DbGroups(Side::Primary), StepId::DbParams(Side::Primary), StepId::Secrets]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(up(cx, rec, Side::Primary))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(down(cx, rec, Side::Primary))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        Box::pin(reads(cx, Side::Primary))
    }
}

impl Step<Cx, StepId> for Replica {
    fn id(&self) -> StepId {
        StepId::Replica
    }
    fn deps(&self) -> Vec<StepId> {
        vec![StepId::Primary, StepId::Network(Side::Dr), StepId::DbGroups(Side::Dr), StepId::DbParams(Side::Dr)]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(up(cx, rec, Side::Dr))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(down(cx, rec, Side::Dr))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        Box::pin(reads(cx, Side::Dr))
    }
}

/// What `up` reads of an instance (its log group is the parameter step's).
async fn reads(cx: &Cx, side: Side) {
    let _ = lookup(cx.regional(side), &instance_id(cx, side)).await;
}

async fn up(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let id = instance_id(cx, side);
    // An instance state does not know yet is probably to be created: read the credentials
    // the create needs at the same time as looking for it.
    let unknown = cx.store.get(&instance_key(cx, side)).is_none_or(|r| r.status == crate::state::Status::Pending);
    let credentials = async {
        match side {
            Side::Primary if unknown && !rec.planning() => Some(secrets::read_credentials(cx).await),
            _ => None,
        }
    };
    let (found, credentials) = futures::join!(find(cx, side), credentials);
    let found = found?;
    let credentials = std::cell::RefCell::new(credentials);
    let r = Res::new(instance_key(cx, side), "db-instance", id.clone(), cx.region(side));
    let created = super::ensure(
        cx,
        rec,
        &r,
        async |_| Ok(found.as_ref().map(|d| d.id.clone())),
        async |_| {
            match side {
                Side::Primary => {
                    let read = credentials.borrow_mut().take();
                    let (user, password) = match read {
                        Some(c) => c?,
                        None => secrets::read_credentials(cx).await?,
                    };
                    create_primary(cx, &id, user, password).await?
                }
                Side::Dr => create_replica(cx, &id).await?,
            }
            Ok(id.clone())
        },
    )
    .await?;
    if created.is_none() || (rec.planning() && found.is_none()) {
        return Ok(());
    }
    if is_fenced_side(cx, side) {
        // Failed over: the old primary stays as `failover` left it until `reprotect`.
        return Ok(());
    }
    let db = settled(cx, rec, side, found.as_ref()).await?;
    record_facts(cx, side, &db)?;
    converge(cx, rec, side, &db).await?;
    parameter_group_up(cx, rec, side, &db).await
}

fn wait_budget(cx: &Cx, side: Side) -> Duration {
    let s = &cx.env.settings;
    Duration::from_secs(60 * if side == Side::Primary { s.primary_wait_minutes } else { s.replica_wait_minutes })
}

async fn create_primary(cx: &Cx, id: &str, user: String, password: secrets::Password) -> Result<()> {
    let (reg, s) = (cx.regional(Side::Primary), &cx.env.settings);
    reg.rds
        .create_db_instance()
        .db_instance_identifier(id)
        .engine("postgres")
        .engine_version(&s.engine_version)
        .db_instance_class(&s.instance_class)
        .allocated_storage(s.allocated_storage_gib)
        .storage_type("gp3")
        .multi_az(true)
        .storage_encrypted(true)
        .backup_retention_period(s.backup_retention_days)
        .set_enable_cloudwatch_logs_exports(Some(LOG_EXPORTS.iter().map(|s| s.to_string()).collect()))
        .publicly_accessible(false)
        .db_subnet_group_name(dbgroups::subnet_group_name(cx))
        .vpc_security_group_ids(network::db_sg_id(cx, Side::Primary).unwrap_or_default())
        .db_parameter_group_name(dbgroups::parameter_group_name(cx))
        .auto_minor_version_upgrade(false)
        .copy_tags_to_snapshot(true)
        .deletion_protection(cx.env.deletion_protection())
        .master_username(user)
        .master_user_password(password.0)
        .db_name(&s.database_name)
        .port(5432)
        .set_tags(Some(dbgroups::rds_tags(cx, "primary")))
        .send()
        .aws(&reg.region)
        .await?;
    Ok(())
}

/// The encrypted cross-Region replica. No parameter group at creation: for a PostgreSQL
/// cross-Region replica RDS refuses one (`InvalidParameterCombination`; RDS API reference,
/// CreateDBInstanceReadReplica, DBParameterGroupName). [`parameter_group_up`] attaches it once
/// the replica is available.
async fn create_replica(cx: &Cx, id: &str) -> Result<()> {
    let (reg, s) = (cx.regional(Side::Dr), &cx.env.settings);
    let primary_arn = instance::recorded(cx, Side::Primary, Attr::Arn).unwrap_or_default();
    if primary_arn.is_empty() {
        return Err(Error::failed("the primary's ARN is not known yet; rerun `pgdr up`"));
    }
    reg.rds
        .create_db_instance_read_replica()
        .db_instance_identifier(id)
        .source_db_instance_identifier(&primary_arn)
        .db_instance_class(&s.instance_class)
        // An encrypted source needs a key of this region.
        .kms_key_id("alias/aws/rds")
        .storage_type("gp3")
        .set_enable_cloudwatch_logs_exports(Some(LOG_EXPORTS.iter().map(|s| s.to_string()).collect()))
        .publicly_accessible(false)
        .db_subnet_group_name(dbgroups::subnet_group_name(cx))
        .vpc_security_group_ids(network::db_sg_id(cx, Side::Dr).unwrap_or_default())
        .auto_minor_version_upgrade(false)
        .copy_tags_to_snapshot(true)
        .deletion_protection(cx.env.deletion_protection())
        .set_tags(Some(dbgroups::rds_tags(cx, "replica")))
        .send()
        .aws(&reg.region)
        .await?;
    Ok(())
}

/// The instance once it is `available` (plan only looks, and says when it is not).
async fn settled(cx: &Cx, rec: &Recorder<'_>, side: Side, found: Option<&Db>) -> Result<Db> {
    let (id, region) = (instance_id(cx, side), cx.region(side));
    match (found, rec.planning()) {
        (Some(db), true) => {
            if db.status != "available" {
                rec.record(Change::new(Action::Keep, "db-instance", &id, region).id(&id).detail(format!("status {}", db.status)));
            }
            Ok(db.clone())
        }
        // Just described and available: no need to look again.
        (Some(db), false) if db.status == "available" => Ok(db.clone()),
        _ => wait_available(cx, rec, side, &id, wait_budget(cx, side)).await,
    }
}

/// What later steps read from state: ARN, endpoint, the storage the alarms follow.
fn record_facts(cx: &Cx, side: Side, db: &Db) -> Result<()> {
    let (region, wanted_gib) = (cx.region(side), cx.env.settings.allocated_storage_gib);
    cx.store.update(|st| {
        if let Some(res) = st.resources.get_mut(&instance_key(cx, side)) {
            res.set(Attr::Arn, db.arn.clone());
            if let Some(e) = &db.endpoint {
                res.set(Attr::Endpoint, e.clone());
            }
            // What the alarms' thresholds follow: the setting, or more if the volume is larger.
            res.set(Attr::StorageGib, db.storage_gib.max(wanted_gib).to_string());
        }
        if side == Side::Primary && st.topology.writer_region.is_empty() {
            st.topology.writer_region = region.to_owned();
        }
    })
}

/// Settings that drifted, or that a replica only takes after creation (backup retention).
async fn converge(cx: &Cx, rec: &Recorder<'_>, side: Side, db: &Db) -> Result<()> {
    let (reg, s, id) = (cx.regional(side), &cx.env.settings, db.id.as_str());
    let region = reg.region.as_str();
    let mut changes: Vec<String> = Vec::new();
    let mut m = reg.rds.modify_db_instance().db_instance_identifier(id).apply_immediately(true);
    // A PostgreSQL read replica takes no automated backups (RDS user guide, "Working with DB
    // instance read replicas": automatic backups of replicas, PostgreSQL: no); it gets them
    // when promoted (PromoteReadReplica's BackupRetentionPeriod).
    let takes_backups = !(side == Side::Dr && db.source.is_some());
    if takes_backups && db.backup_retention != s.backup_retention_days {
        changes.push(format!("backup retention {} -> {} days", db.backup_retention, s.backup_retention_days));
        m = m.backup_retention_period(s.backup_retention_days);
    }
    if db.deletion_protection != cx.env.deletion_protection() {
        changes.push(format!("deletion protection {} -> {}", db.deletion_protection, cx.env.deletion_protection()));
        m = m.deletion_protection(cx.env.deletion_protection());
    }
    if db.class != s.instance_class && !db.class.is_empty() {
        changes.push(format!("class {} -> {}", db.class, s.instance_class));
        m = m.db_instance_class(&s.instance_class);
    }
    // Storage only grows (RDS cannot shrink a volume).
    if db.storage_gib > 0 && db.storage_gib < s.allocated_storage_gib {
        changes.push(format!("storage {} -> {} GiB", db.storage_gib, s.allocated_storage_gib));
        m = m.allocated_storage(s.allocated_storage_gib);
    } else if db.storage_gib > s.allocated_storage_gib {
        let detail = format!("storage stays {} GiB: RDS cannot shrink it to {}", db.storage_gib, s.allocated_storage_gib);
        rec.record(Change::new(Action::Keep, "db-instance", id, region).id(id).detail(detail));
    }
    if side == Side::Primary && !db.multi_az {
        changes.push("Multi-AZ off -> on".into());
        m = m.multi_az(true);
    }
    if changes.is_empty() {
        return Ok(());
    }
    rec.apply(Change::new(Action::Change, "db-instance", id, region).id(id).detail(changes.join(", ")), async |_| {
        m.send().aws(region).await?;
        wait_available(cx, rec, side, id, wait_budget(cx, side)).await
    })
    .await?;
    Ok(())
}

/// The region's parameter group on the instance: attached (the replica is created without it),
/// and a reboot when RDS says the group waits for one (`pending-reboot`).
async fn parameter_group_up(cx: &Cx, rec: &Recorder<'_>, side: Side, db: &Db) -> Result<()> {
    let (reg, id) = (cx.regional(side), db.id.as_str());
    let region = reg.region.as_str();
    let want = dbgroups::parameter_group_name(cx);
    let (have, apply) = db.parameter_group.clone().unwrap_or_default();
    if have != want {
        let change = Change::new(Action::Change, "db-instance", id, region).id(id).detail(format!("parameter group {have} -> {want}"));
        let modify = reg.rds.modify_db_instance().db_instance_identifier(id).db_parameter_group_name(&want).apply_immediately(true);
        let done = rec
            .apply(change, async |_| {
                modify.send().aws(region).await?;
                wait_available(cx, rec, side, id, wait_budget(cx, side)).await
            })
            .await?;
        // A new group takes effect at the next reboot.
        let Some(db) = done else { return Ok(()) };
        return reboot_if_pending(cx, rec, side, &db).await;
    }
    if apply == "pending-reboot" {
        return reboot_if_pending(cx, rec, side, db).await;
    }
    Ok(())
}

async fn reboot_if_pending(cx: &Cx, rec: &Recorder<'_>, side: Side, db: &Db) -> Result<()> {
    if db.parameter_group.as_ref().is_none_or(|(_, apply)| apply != "pending-reboot") {
        return Ok(());
    }
    let (reg, id) = (cx.regional(side), db.id.as_str());
    let region = reg.region.as_str();
    let change = Change::new(Action::Change, "db-instance", id, region).id(id).detail("reboot to apply the parameter group");
    rec.apply(change, async |_| {
        reg.rds.reboot_db_instance().db_instance_identifier(id).send().aws(region).await?;
        wait_available(cx, rec, side, id, wait_budget(cx, side)).await
    })
    .await?;
    Ok(())
}

pub async fn wait_available(cx: &Cx, rec: &Recorder<'_>, side: Side, id: &str, budget: Duration) -> Result<Db> {
    let reg = cx.regional(side);
    Wait::new(format!("RDS instance {id} in {}", reg.region))
        .budget(budget)
        .pace(Pace::SLOW)
        .hint("rerun `pgdr up` to keep waiting")
        .progress(|status, t| rec.status(&format!("{id}: {status} ({})", wait::human(t))))
        .until(&cx.cancel, &cx.clients.reads, async || {
            Ok(match describe(reg, id).await? {
                Some(db) => match wait::rds_status(&db.status) {
                    Look::Ready(()) => Look::Ready(db),
                    Look::Pending(s) => Look::Pending(s),
                    Look::Failed(s) => Look::Failed(s),
                },
                None => Look::Failed("deleted".into()),
            })
        })
        .await
}

/// Instances of the environment with deletion protection on (checked before `down` deletes anything).
/// Old primaries kept by `reprotect --keep-old-primary` count too.
pub async fn protected(cx: &Cx) -> Result<Vec<String>> {
    let mut all: Vec<(std::sync::Arc<crate::clients::Regional>, String)> =
        [Side::Primary, Side::Dr].into_iter().map(|side| (cx.regional(side).clone(), instance_id(cx, side))).collect();
    for (_, r) in cx.store.snapshot().resources.into_iter().filter(|(k, _)| k.owner() == "retired") {
        if let (Some(reg), Some(id)) = (cx.clients.region(&r.region), r.id) {
            all.push((reg.clone(), id));
        }
    }
    let found = futures::future::try_join_all(all.iter().map(|(reg, id)| lookup(reg, id))).await?;
    Ok(found
        .into_iter()
        .flatten()
        .filter(|db| db.deletion_protection && db.tag("pgdr:env") == Some(cx.name()))
        .map(|db| format!("{} ({})", db.id, db.arn.split(':').nth(3).unwrap_or("?")))
        .collect())
}

/// How to delete an instance.
pub struct Deletion {
    /// Final snapshot name; `None` skips it (a replica takes none: AWS refuses one).
    pub snapshot: Option<String>,
    /// Keep the automated backups.
    pub keep_backups: bool,
}

/// Deletes an instance and waits until it is gone: deletion protection is turned off first
/// (callers decide whether that is allowed), an instance already gone counts as deleted.
pub async fn delete_instance(
    cx: &Cx,
    rec: &Recorder<'_>,
    reg: &crate::clients::Regional,
    id: &str,
    how: &Deletion,
    hint: &str,
) -> Result<()> {
    let region = reg.region.as_str();
    let Some(db) = describe(reg, id).await? else { return Ok(()) };
    if db.deletion_protection {
        reg.rds
            .modify_db_instance()
            .db_instance_identifier(id)
            .deletion_protection(false)
            .apply_immediately(true)
            .send()
            .aws(region)
            .await?;
    }
    if let Some(snap) = &how.snapshot {
        rec.status(&format!("deleting {id} (final snapshot {snap})"));
    }
    let req = reg
        .rds
        .delete_db_instance()
        .db_instance_identifier(id)
        .skip_final_snapshot(how.snapshot.is_none())
        .set_final_db_snapshot_identifier(how.snapshot.clone())
        .delete_automated_backups(!how.keep_backups);
    match req.send().aws(region).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    Wait::new(format!("deletion of {id}"))
        .budget(Duration::from_secs(3600))
        .pace(Pace::SLOW)
        .hint(hint)
        .progress(|s, t| rec.status(&format!("{id}: {s} ({})", wait::human(t))))
        .until(&cx.cancel, &cx.clients.reads, async || {
            Ok(match describe(reg, id).await? {
                None => Look::Ready(()),
                Some(d) => Look::Pending(d.status),
            })
        })
        .await
}

/// A final snapshot name unique to the second: `pgdr-<env>-final-<UTC timestamp>`.
pub fn snapshot_name(cx: &Cx) -> String {
    let now = crate::state::now_rfc3339();
    let stamp: String = now.chars().filter(|c| c.is_ascii_digit()).take(14).collect();
    format!("pgdr-{}-final-{stamp}", cx.name())
}

async fn down(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let id = instance_id(cx, side);
    let r = Res::new(instance_key(cx, side), "db-instance", id.clone(), region);
    let found = lookup(reg, &id).await?.filter(|d| d.tag("pgdr:env") == Some(cx.name()) && d.status != "deleting");
    let is_replica = found.as_ref().is_some_and(|d| d.source.is_some()) && side == Side::Dr;
    let snapshot = (!cx.opts.skip_final_snapshot && !is_replica).then(|| snapshot_name(cx));
    let protected = found.as_ref().is_some_and(|d| d.deletion_protection);
    super::remove(
        cx,
        rec,
        &r,
        async |_| Ok(found.as_ref().map(|d| d.id.clone())),
        async |id| {
            if protected && !cx.opts.force {
                return Err(Error::user(format!("{id} has deletion protection on; rerun with --force to turn it off and delete")));
            }
            let how = Deletion { snapshot: snapshot.clone(), keep_backups: !cx.opts.skip_final_snapshot };
            delete_instance(cx, rec, reg, &id, &how, "rerun `pgdr down` to keep waiting").await
        },
    )
    .await?;
    if let (Some(snap), false) = (&snapshot, rec.planning() || found.is_none()) {
        rec.record(Change::new(Action::Keep, "db-snapshot", snap, region).id(snap).detail("final snapshot of the primary"));
    }
    Ok(())
}

/// Old primaries kept by `reprotect --keep-old-primary`: left alone by `up`, deleted (with a
/// final snapshot unless `--skip-final-snapshot`) by `down`.
pub struct Retired;

impl Step<Cx, StepId> for Retired {
    fn id(&self) -> StepId {
        StepId::Retired
    }
    fn deps(&self) -> Vec<StepId> {
        // On `down` it goes before the groups and networks it uses.
        [Side::Primary, Side::Dr].into_iter().flat_map(|s| [StepId::DbGroups(s), StepId::DbParams(s), StepId::Network(s)]).collect()
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(async move {
            for (_, r) in cx.store.snapshot().resources.into_iter().filter(|(k, _)| k.owner() == "retired") {
                rec.record(
                    Change::new(Action::Keep, "db-instance", r.id.as_deref().unwrap_or("?"), &r.region)
                        .maybe_id(r.id.as_deref())
                        .detail("retired old primary"),
                );
            }
            Ok(())
        })
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(async move {
            let retired: Vec<(crate::state::Key, crate::state::Resource)> =
                cx.store.snapshot().resources.into_iter().filter(|(k, _)| k.owner() == "retired").collect();
            for (key, r) in retired {
                let Some(reg) = cx.clients.region(&r.region).cloned() else { continue };
                let id = r.id.clone().unwrap_or_default();
                let found = lookup(&reg, &id).await?.filter(|d| d.status != "deleting");
                if found.as_ref().is_some_and(|d| d.deletion_protection) && !cx.opts.force && !rec.planning() {
                    return Err(Error::user(format!("{id} has deletion protection on; rerun with --force to turn it off and delete")));
                }
                let snapshot = (!cx.opts.skip_final_snapshot).then(|| snapshot_name(cx));
                let res = Res::new(key.clone(), "db-instance", id.clone(), &r.region);
                let how = Deletion { snapshot: snapshot.clone(), keep_backups: !cx.opts.skip_final_snapshot };
                super::remove(
                    cx,
                    rec,
                    &res,
                    async |_| Ok(found.as_ref().map(|d| d.id.clone())),
                    async |id| delete_instance(cx, rec, &reg, &id, &how, "rerun `pgdr down`").await,
                )
                .await?;
            }
            Ok(())
        })
    }
}
