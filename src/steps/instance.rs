//! An RDS instance as pgdr reads it: its model, its identifier and state key per side, and the
//! looks at it that steps, checks and commands share. No step lives here.

use crate::aws::Call;
use crate::clients::Regional;
use crate::cx::{Cx, Side};
use crate::error::{AwsError, Error, Result};
use crate::read;
use crate::state::{Attr, Key};

/// The state key owner of a side's instance: `primary` or `replica`.
pub fn owner(side: Side) -> &'static str {
    if side == Side::Primary {
        "primary"
    } else {
        "replica"
    }
}

/// The default identifier of a side's instance: `pgdr-<env>-<region>`.
pub fn default_id(cx: &Cx, side: Side) -> String {
    format!("pgdr-{}-{}", cx.name(), cx.region(side))
}

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
    /// The DB parameter group and its apply status (`in-sync`, `applying`, `pending-reboot`).
    pub parameter_group: Option<(String, String)>,
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
        .and_then(|r| r.id.clone().or_else(|| r.attr(Attr::Identifier).map(str::to_owned)))
        .unwrap_or_else(|| default_id(cx, side))
}

pub fn instance_key(cx: &Cx, side: Side) -> Key {
    Key::new(owner(side), cx.region(side), "instance")
}

/// The key of an old primary kept by `reprotect --keep-old-primary` in `region`.
pub fn retired_key(region: &str) -> Key {
    Key::new("retired", region, "instance")
}

/// An instance fact recorded in state (ARN, endpoint, storage).
pub fn recorded(cx: &Cx, side: Side, attr: Attr) -> Option<String> {
    cx.store.attr(&instance_key(cx, side), attr)
}

/// The old primary after a failover: kept as it is (never recreated, never waited on).
pub fn is_fenced_side(cx: &Cx, side: Side) -> bool {
    side == Side::Primary && cx.writer() == Side::Dr
}

/// Describes one instance by identifier (`None` when it does not exist), asking AWS.
pub async fn describe(reg: &Regional, id: &str) -> std::result::Result<Option<Db>, AwsError> {
    db_of(reg.rds.describe_db_instances().db_instance_identifier(id).send().aws(&reg.region).await)
}

/// As [`describe`], through this run's reads (see [`crate::reads`]).
pub async fn lookup(reg: &Regional, id: &str) -> std::result::Result<Option<Db>, AwsError> {
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
            parameter_group: d.db_parameter_groups().first().map(|g| {
                (g.db_parameter_group_name().unwrap_or_default().to_owned(), g.parameter_apply_status().unwrap_or_default().to_owned())
            }),
            tags: d.tag_list().iter().filter_map(|t| Some((t.key.clone()?, t.value.clone().unwrap_or_default()))).collect(),
        })),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
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
