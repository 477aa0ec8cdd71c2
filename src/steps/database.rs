//! The databases: an RDS PostgreSQL Multi-AZ primary and its encrypted cross-region read
//! replica, each with its PostgreSQL log group (7-day retention, created by pgdr so that `down`
//! removes it).

use std::time::Duration;

use futures::future::LocalBoxFuture;

use super::{dbgroups, network, secrets, Res};
use crate::cx::{Cx, Side};
use crate::error::{AwsError, Error, Result};
use crate::exec::{Action, Recorder, Step, StepResult};
use crate::wait::{self, Look, Pace};
use crate::aws::Call;
use crate::read;

pub const PRIMARY: &str = "primary";
pub const REPLICA: &str = "replica";

/// Log exports: the PostgreSQL log (with `log_statement`, the audit trail) and upgrade logs.
const LOG_EXPORTS: [&str; 2] = ["postgresql", "upgrade"];

pub struct Primary;
pub struct Replica;

/// What pgdr reads of an instance.
#[derive(Clone, Debug, Default)]
pub struct Db {
    pub id: String,
    pub arn: String,
    pub status: String,
    pub endpoint: Option<String>,
    pub source: Option<String>,
    pub multi_az: bool,
    pub class: String,
    pub storage_gib: i32,
    pub backup_retention: i32,
    pub deletion_protection: bool,
    pub encrypted: bool,
    pub engine_version: String,
    pub tags: Vec<(String, String)>,
}

impl Db {
    pub fn tag(&self, k: &str) -> Option<&str> {
        self.tags.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }
}

/// The instance of a side: as recorded in state, else `pgdr-<env>-<region>`.
pub fn instance_id(cx: &Cx, side: Side) -> String {
    cx.store
        .get(&instance_key(cx, side))
        .and_then(|r| r.id.or_else(|| r.attrs.get("identifier").cloned()))
        .unwrap_or_else(|| format!("pgdr-{}-{}", cx.name(), cx.region(side)))
}

/// The old primary after a failover: kept as it is (never recreated, never waited on).
pub fn is_fenced_side(cx: &Cx, side: Side) -> bool {
    side == Side::Primary && cx.writer() == Side::Dr
}

pub fn instance_key(cx: &Cx, side: Side) -> String {
    format!("{}/{}/instance", if side == Side::Primary { PRIMARY } else { REPLICA }, cx.region(side))
}

fn log_group_key(cx: &Cx, side: Side) -> String {
    format!("{}/{}/log-group", if side == Side::Primary { PRIMARY } else { REPLICA }, cx.region(side))
}

pub fn log_group_name(id: &str) -> String {
    format!("/aws/rds/instance/{id}/postgresql")
}

/// Describes one instance by identifier (`None` when it does not exist), asking AWS.
pub async fn describe(reg: &crate::clients::Regional, id: &str) -> std::result::Result<Option<Db>, AwsError> {
    db_of(reg.rds.describe_db_instances().db_instance_identifier(id).send().aws(&reg.region).await)
}

/// As [`describe`], through this run's reads (see [`crate::reads`]).
pub async fn lookup(reg: &crate::clients::Regional, id: &str) -> std::result::Result<Option<Db>, AwsError> {
    db_of(read!(reg.reads, &reg.region, reg.rds.describe_db_instances().db_instance_identifier(id)))
}

// The error is the crate's `AwsError`, large by design (code, message, request ID, region).
#[allow(clippy::result_large_err)]
fn db_of(
    answer: std::result::Result<aws_sdk_rds::operation::describe_db_instances::DescribeDbInstancesOutput, AwsError>,
) -> std::result::Result<Option<Db>, AwsError> {
    match answer {
        Ok(out) => Ok(out.db_instances.unwrap_or_default().into_iter().next().map(|d| Db {
            id: d.db_instance_identifier.clone().unwrap_or_default(),
            arn: d.db_instance_arn.clone().unwrap_or_default(),
            status: d.db_instance_status.clone().unwrap_or_default(),
            endpoint: d.endpoint.as_ref().and_then(|e| e.address.clone()),
            source: d.read_replica_source_db_instance_identifier.clone(),
            multi_az: d.multi_az.unwrap_or(false),
            class: d.db_instance_class.clone().unwrap_or_default(),
            storage_gib: d.allocated_storage.unwrap_or(0),
            backup_retention: d.backup_retention_period.unwrap_or(0),
            deletion_protection: d.deletion_protection.unwrap_or(false),
            encrypted: d.storage_encrypted.unwrap_or(false),
            engine_version: d.engine_version.clone().unwrap_or_default(),
            tags: d.tag_list().iter().filter_map(|t| Some((t.key.clone()?, t.value.clone().unwrap_or_default()))).collect(),
        })),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

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

impl Step<Cx> for Primary {
    fn id(&self) -> String {
        PRIMARY.into()
    }
    fn deps(&self) -> Vec<String> {
        vec![
            network::step_id(Side::Primary),
            dbgroups::step_id(Side::Primary),
            dbgroups::params_step_id(Side::Primary),
            secrets::STEP.into(),
        ]
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

impl Step<Cx> for Replica {
    fn id(&self) -> String {
        REPLICA.into()
    }
    fn deps(&self) -> Vec<String> {
        vec![PRIMARY.into(), network::step_id(Side::Dr), dbgroups::step_id(Side::Dr), dbgroups::params_step_id(Side::Dr)]
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

/// The instance's PostgreSQL log group, created by pgdr with 7-day retention (RDS would create
/// it without retention) so that `down` removes it.
pub async fn ensure_log_group(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    super::lambda::ensure_log_group(cx, rec, cx.regional(side), &log_group_key(cx, side), &log_group_name(&instance_id(cx, side))).await
}

/// Removes the instance's log group (after the instance: RDS would write it again).
/// The name recorded in state wins: the instance (and so its identifier) may be gone already.
pub async fn delete_log_group(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let key = log_group_key(cx, side);
    let name = cx.store.id(&key).unwrap_or_else(|| log_group_name(&instance_id(cx, side)));
    super::lambda::delete_log_group(cx, rec, cx.regional(side), &key, &name).await
}

/// What [`ensure_log_group`] reads, for the read phase.
pub async fn log_group_reads(cx: &Cx, side: Side) {
    let _ = super::lambda::log_groups(cx.regional(side), &log_group_name(&instance_id(cx, side))).await;
}

async fn up(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let s = &cx.env.settings;
    let id = instance_id(cx, side);

    // An instance state does not know yet is probably to be created: read the credentials
    // the create needs at the same time as looking for it.
    let unknown = cx.store.get(&instance_key(cx, side)).is_none_or(|r| r.status == crate::state::Status::Pending);
    let credentials = async {
        match side {
            Side::Primary if unknown && !rec.plan => Some(secrets::read_credentials(cx).await),
            _ => None,
        }
    };
    let (found, credentials) = futures::join!(find(cx, side), credentials);
    let found = found?;
    let credentials = std::cell::RefCell::new(credentials);
    let r = Res::new(instance_key(cx, side), "db-instance", id.clone(), region);
    let sg = cx.store.id(&network::key(cx, side, "db-sg")).unwrap_or_default();
    let exists = found.clone();
    let primary_arn = match side {
        Side::Primary => String::new(),
        Side::Dr => cx.store.attr(&instance_key(cx, Side::Primary), "arn").unwrap_or_default(),
    };
    let created = super::ensure(
        cx,
        rec,
        &r,
        async |_| Ok(exists.as_ref().map(|d| d.id.clone())),
        async |_| {
            let tags = Some(dbgroups::rds_tags(cx, if side == Side::Primary { "primary" } else { "replica" }));
            let logs = Some(LOG_EXPORTS.iter().map(|s| s.to_string()).collect());
            match side {
                Side::Primary => {
                    let read = credentials.borrow_mut().take();
                    let (user, password) = match read {
                        Some(c) => c?,
                        None => secrets::read_credentials(cx).await?,
                    };
                    reg.rds
                            .create_db_instance()
                            .db_instance_identifier(&id)
                            .engine("postgres")
                            .engine_version(&s.engine_version)
                            .db_instance_class(&s.instance_class)
                            .allocated_storage(s.allocated_storage_gib)
                            .storage_type("gp3")
                            .multi_az(true)
                            .storage_encrypted(true)
                            .backup_retention_period(s.backup_retention_days)
                            .set_enable_cloudwatch_logs_exports(logs)
                            .publicly_accessible(false)
                            .db_subnet_group_name(dbgroups::subnet_group_name(cx))
                            .vpc_security_group_ids(&sg)
                            .db_parameter_group_name(dbgroups::parameter_group_name(cx))
                            .auto_minor_version_upgrade(false)
                            .copy_tags_to_snapshot(true)
                            .deletion_protection(cx.env.deletion_protection())
                            .master_username(user)
                            .master_user_password(password.0)
                            .db_name(&s.database_name)
                            .port(5432)
                            .set_tags(tags)
                            .send().aws(region).await?;
                }
                Side::Dr => {
                    if primary_arn.is_empty() {
                        return Err(Error::failed("the primary's ARN is not known yet; rerun `pgdr up`"));
                    }
                    reg.rds
                            .create_db_instance_read_replica()
                            .db_instance_identifier(&id)
                            .source_db_instance_identifier(&primary_arn)
                            .db_instance_class(&s.instance_class)
                            // An encrypted source needs a key of this region.
                            .kms_key_id("alias/aws/rds")
                            .storage_type("gp3")
                            .set_enable_cloudwatch_logs_exports(logs)
                            .publicly_accessible(false)
                            .db_subnet_group_name(dbgroups::subnet_group_name(cx))
                            .vpc_security_group_ids(&sg)
                            .db_parameter_group_name(dbgroups::parameter_group_name(cx))
                            .auto_minor_version_upgrade(false)
                            .copy_tags_to_snapshot(true)
                            .deletion_protection(cx.env.deletion_protection())
                            .set_tags(tags)
                            .send().aws(region).await?;
                }
            }
            Ok(id.clone())
        },
    )
    .await?;
    let Some(_) = created else { return Ok(()) };
    if rec.plan && found.is_none() {
        return Ok(());
    }
    if is_fenced_side(cx, side) {
        // Failed over: the old primary stays as `failover` left it until `reprotect`.
        return Ok(());
    }

    // Wait for `available` before anything depends on it (plan only looks).
    let budget = Duration::from_secs(60 * if side == Side::Primary { s.primary_wait_minutes } else { s.replica_wait_minutes });
    let db = match (&found, rec.plan) {
        (Some(db), true) => {
            if db.status != "available" {
                rec.record(Action::Keep, "db-instance", &id, region, Some(&id), Some(format!("status {}", db.status)));
            }
            db.clone()
        }
        // Just described and available: no need to look again.
        (Some(db), false) if db.status == "available" => db.clone(),
        _ => wait_available(cx, rec, side, &id, budget).await?,
    };
    cx.store.update(|st| {
        if let Some(res) = st.resources.get_mut(&instance_key(cx, side)) {
            res.attrs.insert("arn".into(), db.arn.clone());
            if let Some(e) = &db.endpoint {
                res.attrs.insert("endpoint".into(), e.clone());
            }
            // What the alarms' thresholds follow: the setting, or more if the volume is larger.
            res.attrs.insert("storage_gib".into(), db.storage_gib.max(s.allocated_storage_gib).to_string());
        }
        if side == Side::Primary && st.topology.writer_region.is_empty() {
            st.topology.writer_region = region.to_owned();
        }
    })?;

    // Settings that drifted, or that a replica only takes after creation (backup retention).
    let mut changes: Vec<String> = Vec::new();
    let mut m = reg.rds.modify_db_instance().db_instance_identifier(&id).apply_immediately(true);
    if db.backup_retention != s.backup_retention_days {
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
        rec.record(
            Action::Keep,
            "db-instance",
            &id,
            region,
            Some(&id),
            Some(format!("storage stays {} GiB: RDS cannot shrink it to {}", db.storage_gib, s.allocated_storage_gib)),
        );
    }
    if side == Side::Primary && !db.multi_az {
        changes.push("Multi-AZ off -> on".into());
        m = m.multi_az(true);
    }
    if !changes.is_empty() {
        let detail = changes.join(", ");
        if !rec.plan {
            m.send().aws(region).await?;
            wait_available(cx, rec, side, &id, budget).await?;
        }
        rec.record(Action::Change, "db-instance", &id, region, Some(&id), Some(detail));
    }
    Ok(())
}

pub async fn wait_available(cx: &Cx, rec: &Recorder<'_>, side: Side, id: &str, budget: Duration) -> Result<Db> {
    let reg = cx.regional(side);
    wait::until(
        &format!("RDS instance {id} in {}", reg.region),
        budget,
        Pace::SLOW,
        &cx.cancel,
        &cx.clients.reads,
        |status, t| rec.status(&format!("{id}: {status} ({})", wait::human(t))),
        "rerun `pgdr up` to keep waiting",
        async || {
            Ok(match describe(reg, id).await? {
                Some(db) => match wait::rds_status(&db.status) {
                    Look::Ready(()) => Look::Ready(db),
                    Look::Pending(s) => Look::Pending(s),
                    Look::Failed(s) => Look::Failed(s),
                },
                None => Look::Failed("deleted".into()),
            })
        },
    )
    .await
}

/// Every instance in a side's region tagged for this environment, the default name first.
pub async fn tagged(cx: &Cx, side: Side) -> Result<Vec<Db>> {
    let reg = cx.regional(side);
    let mut all = Vec::new();
    let mut marker = None;
    loop {
        let out = reg.rds.describe_db_instances().set_marker(marker).send().aws(&reg.region).await?;
        marker = out.marker.clone();
        let page = out.db_instances.unwrap_or_default();
        for d in page {
            let one = aws_sdk_rds::operation::describe_db_instances::DescribeDbInstancesOutput::builder().db_instances(d).build();
            if let Some(db) = db_of(Ok(one))? {
                if db.tag("pgdr:env") == Some(cx.name()) {
                    all.push(db);
                }
            }
        }
        if marker.is_none() {
            break;
        }
    }
    let default = format!("pgdr-{}-{}", cx.name(), cx.region(side));
    all.sort_by_key(|db| (db.id != default, db.id.clone()));
    Ok(all)
}

/// pgdr does not upgrade PostgreSQL's major version: it reboots the instance, cannot be undone
/// and needs a parameter group of the new family. A settings change asking for one is refused
/// before anything is made for the new version.
pub async fn check_major_version(cx: &Cx, side: Side) -> Result<()> {
    let id = instance_id(cx, side);
    let Some(db) = lookup(cx.regional(side), &id).await? else { return Ok(()) };
    let running = db.engine_version.split('.').next().unwrap_or("");
    if db.tag("pgdr:env") != Some(cx.name()) || running.is_empty() || running == cx.env.engine_major() {
        return Ok(());
    }
    Err(Error::user(format!(
        "{id} in {} runs PostgreSQL {}, but engine_version asks for {}: pgdr does not upgrade major versions; set engine_version = \"{running}\", or upgrade by hand (RDS console, or aws rds modify-db-instance --allow-major-version-upgrade) and then set it",
        cx.region(side),
        db.engine_version,
        cx.env.settings.engine_version
    )))
}

/// Instances of the environment with deletion protection on (checked before `down` deletes anything).
/// Old primaries kept by `reprotect --keep-old-primary` count too.
pub async fn protected(cx: &Cx) -> Result<Vec<String>> {
    let mut all: Vec<(std::sync::Arc<crate::clients::Regional>, String)> =
        [Side::Primary, Side::Dr].into_iter().map(|side| (cx.regional(side).clone(), instance_id(cx, side))).collect();
    for (_, r) in cx.store.snapshot().resources.into_iter().filter(|(k, _)| k.starts_with("retired/")) {
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
        reg.rds.modify_db_instance().db_instance_identifier(id).deletion_protection(false).apply_immediately(true).send().aws(region).await?;
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
    wait::until(
        &format!("deletion of {id}"),
        Duration::from_secs(3600),
        Pace::SLOW,
        &cx.cancel,
        &cx.clients.reads,
        |s, t| rec.status(&format!("{id}: {s} ({})", wait::human(t))),
        hint,
        async || {
            Ok(match describe(reg, id).await? {
                None => Look::Ready(()),
                Some(d) => Look::Pending(d.status),
            })
        },
    )
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
    if let (Some(snap), false) = (&snapshot, rec.plan || found.is_none()) {
        rec.record(Action::Keep, "db-snapshot", snap, region, Some(snap), Some("final snapshot of the primary".into()));
    }
    Ok(())
}

/// Old primaries kept by `reprotect --keep-old-primary`: left alone by `up`, deleted (with a
/// final snapshot unless `--skip-final-snapshot`) by `down`.
pub struct Retired;

impl Step<Cx> for Retired {
    fn id(&self) -> String {
        "retired".into()
    }
    fn deps(&self) -> Vec<String> {
        // On `down` it goes before the groups and networks it uses.
        [Side::Primary, Side::Dr]
            .into_iter()
            .flat_map(|s| [dbgroups::step_id(s), dbgroups::params_step_id(s), network::step_id(s)])
            .collect()
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(async move {
            for (_, r) in cx.store.snapshot().resources.into_iter().filter(|(k, _)| k.starts_with("retired/")) {
                rec.record(
                    Action::Keep,
                    "db-instance",
                    r.id.as_deref().unwrap_or("?"),
                    &r.region,
                    r.id.as_deref(),
                    Some("retired old primary".into()),
                );
            }
            Ok(())
        })
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(async move {
            let retired: Vec<(String, crate::state::Resource)> =
                cx.store.snapshot().resources.into_iter().filter(|(k, _)| k.starts_with("retired/")).collect();
            for (key, r) in retired {
                let Some(reg) = cx.clients.region(&r.region).cloned() else { continue };
                let id = r.id.clone().unwrap_or_default();
                let found = lookup(&reg, &id).await?.filter(|d| d.status != "deleting");
                if found.as_ref().is_some_and(|d| d.deletion_protection) && !cx.opts.force && !rec.plan {
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
