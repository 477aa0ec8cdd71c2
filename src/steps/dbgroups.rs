//! The DB subnet group, DB parameter group and instance log group of one region. Both carry the same names in
//! both regions (AWS allows it, and it keeps the replica's settings readable).

use aws_sdk_rds::types::{ApplyMethod, Parameter, Tag};
use futures::future::LocalBoxFuture;

use super::instance::{self, instance_id};
use super::{network, Res, StepId};
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{AwsError, Result};
use crate::exec::{Action, Recorder, Step, StepResult};
use crate::read;
use crate::state::Key;

/// The DB subnet group (needs the network's subnets).
pub struct DbGroups(pub Side);

/// The DB parameter group and the instance's log group (need nothing: they go first).
pub struct DbParams(pub Side);

pub fn subnet_group_name(cx: &Cx) -> String {
    format!("pgdr-{}", cx.name())
}

pub fn parameter_group_name(cx: &Cx) -> String {
    format!("pgdr-{}-postgres{}", cx.name(), cx.env.engine_major())
}

fn key(cx: &Cx, side: Side, what: &str) -> Key {
    Key::new("dbgroups", cx.region(side), what)
}

pub fn rds_tags(cx: &Cx, resource: &str) -> Vec<Tag> {
    cx.tags(resource).into_iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()
}

/// The parameters pgdr manages, with the values the settings ask for.
///
/// The audit trail is pgaudit's session log of DDL and writes (`pgaudit.log = ddl,write`):
/// its `ddl` class leaves out the `role` class, so `CREATE/ALTER ROLE … PASSWORD` is never
/// logged, unlike PostgreSQL's `log_statement = ddl|mod|all` (RDS user guide, "Using pgAudit to
/// log database activity"). `shared_preload_libraries` is static: it applies at the next reboot.
pub fn wanted_parameters(cx: &Cx) -> Vec<(&'static str, String)> {
    vec![
        ("log_statement", cx.env.settings.log_statement.clone()),
        ("rds.force_ssl", if cx.env.settings.require_tls { "1".into() } else { "0".into() }),
        ("shared_preload_libraries", "pg_stat_statements,pgaudit".into()),
        ("pgaudit.log", "ddl,write".into()),
        ("pgaudit.log_parameter", "0".into()),
    ]
}

/// How a parameter change is applied: static parameters only at a reboot (RDS refuses
/// `immediate` for them).
fn apply_method(name: &str) -> ApplyMethod {
    if name == "shared_preload_libraries" {
        ApplyMethod::PendingReboot
    } else {
        ApplyMethod::Immediate
    }
}

impl Step<Cx, StepId> for DbGroups {
    fn id(&self) -> StepId {
        StepId::DbGroups(self.0)
    }
    fn deps(&self) -> Vec<StepId> {
        vec![StepId::Network(self.0)]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(up(cx, rec, self.0))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(down(cx, rec, self.0))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = find_subnet_group(cx, self.0).await;
        })
    }
}

impl Step<Cx, StepId> for DbParams {
    fn id(&self) -> StepId {
        StepId::DbParams(self.0)
    }
    fn deps(&self) -> Vec<StepId> {
        vec![]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(params_up(cx, rec, self.0))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(params_down(cx, rec, self.0))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        let side = self.0;
        Box::pin(async move {
            let group = parameter_group_name(cx);
            let _ = futures::join!(
                find_parameter_group(cx, side),
                parameters(cx, side, &group),
                log_group_reads(cx, side),
                instance::check_major_version(cx, side)
            );
        })
    }
}

/// The parameters set in the group (source `user`).
async fn parameters(
    cx: &Cx,
    side: Side,
    group: &str,
) -> std::result::Result<aws_sdk_rds::operation::describe_db_parameters::DescribeDbParametersOutput, AwsError> {
    let reg = cx.regional(side);
    read!(reg.reads, &reg.region, reg.rds.describe_db_parameters().db_parameter_group_name(group).source("user"))
}

fn missing<T>(r: std::result::Result<T, AwsError>) -> Result<Option<T>> {
    Ok(crate::error::absent(r)?)
}

async fn find_subnet_group(cx: &Cx, side: Side) -> Result<Option<(String, Vec<String>)>> {
    let reg = cx.regional(side);
    let out = missing(read!(reg.reads, &reg.region, reg.rds.describe_db_subnet_groups().db_subnet_group_name(subnet_group_name(cx))))?;
    Ok(out.and_then(|o| o.db_subnet_groups.unwrap_or_default().into_iter().next()).map(|g| {
        let subnets = g.subnets().iter().filter_map(|s| s.subnet_identifier().map(str::to_owned)).collect();
        (g.db_subnet_group_name.unwrap_or_default(), subnets)
    }))
}

async fn find_parameter_group(cx: &Cx, side: Side) -> Result<Option<String>> {
    let reg = cx.regional(side);
    let out =
        missing(read!(reg.reads, &reg.region, reg.rds.describe_db_parameter_groups().db_parameter_group_name(parameter_group_name(cx))))?;
    Ok(out.and_then(|o| o.db_parameter_groups.unwrap_or_default().into_iter().next()).and_then(|g| g.db_parameter_group_name))
}

async fn up(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let mut subnets = network::subnet_ids(cx, side).await;
    subnets.sort();

    let sg_res = Res::new(key(cx, side, "subnet-group"), "db-subnet-group", subnet_group_name(cx), region);
    let found = find_subnet_group(cx, side).await?;
    let existing = found.as_ref().map(|(_, s)| {
        let mut s = s.clone();
        s.sort();
        s
    });
    super::ensure(
        cx,
        rec,
        &sg_res,
        async |_| Ok(found.as_ref().map(|f| f.0.clone())),
        async |_| {
            reg.rds
                .create_db_subnet_group()
                .db_subnet_group_name(subnet_group_name(cx))
                .db_subnet_group_description(format!("pgdr {}: private subnets", cx.name()))
                .set_subnet_ids(Some(subnets.clone()))
                .set_tags(Some(rds_tags(cx, "db-subnet-group")))
                .send()
                .aws(region)
                .await?;
            Ok(subnet_group_name(cx))
        },
    )
    .await?;
    if let Some(have) = existing.filter(|h| !subnets.is_empty() && *h != subnets) {
        let detail = format!("subnets {} -> {}", have.join(","), subnets.join(","));
        let modify = reg.rds.modify_db_subnet_group().db_subnet_group_name(subnet_group_name(cx)).set_subnet_ids(Some(subnets.clone()));
        rec.apply(sg_res.change(Action::Change).detail(detail), async |_| Ok(modify.send().aws(region).await?)).await?;
    }
    Ok(())
}

/// The parameter group, with the managed parameters, and the instance's log group.
async fn params_up(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    instance::check_major_version(cx, side).await?;
    let (pg, logs) = futures::join!(parameter_group_up(cx, rec, side, reg, region), ensure_log_group(cx, rec, side));
    pg?;
    logs
}

async fn parameter_group_up(cx: &Cx, rec: &Recorder<'_>, side: Side, reg: &crate::clients::Regional, region: &str) -> Result<()> {
    let pg_res = Res::new(key(cx, side, "parameter-group"), "db-parameter-group", parameter_group_name(cx), region);
    let pg = super::ensure(
        cx,
        rec,
        &pg_res,
        async |_| find_parameter_group(cx, side).await,
        async |_| {
            reg.rds
                .create_db_parameter_group()
                .db_parameter_group_name(parameter_group_name(cx))
                .db_parameter_group_family(format!("postgres{}", cx.env.engine_major()))
                .description(format!("pgdr {}: audit logging and TLS", cx.name()))
                .set_tags(Some(rds_tags(cx, "db-parameter-group")))
                .send()
                .aws(region)
                .await?;
            Ok(parameter_group_name(cx))
        },
    )
    .await?;

    // The managed parameters: compare with what the group holds, change only what differs.
    let current: Vec<(String, String)> = match &pg {
        Some(name) => {
            let out = parameters(cx, side, name).await?;
            out.parameters
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| Some((p.parameter_name?, p.parameter_value.unwrap_or_default())))
                .collect()
        }
        None => vec![],
    };
    let diff: Vec<(&str, String, String)> = wanted_parameters(cx)
        .into_iter()
        .filter_map(|(k, want)| {
            let have = current.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
            (have != want).then_some((k, have, want))
        })
        .collect();
    if !diff.is_empty() {
        let detail = diff
            .iter()
            .map(|(k, have, want)| format!("{k}: {} -> {want}", if have.is_empty() { "default" } else { have }))
            .collect::<Vec<_>>()
            .join(", ");
        let params = diff
            .iter()
            .map(|(k, _, want)| Parameter::builder().parameter_name(*k).parameter_value(want).apply_method(apply_method(k)).build())
            .collect();
        let modify = reg.rds.modify_db_parameter_group().db_parameter_group_name(parameter_group_name(cx)).set_parameters(Some(params));
        rec.apply(pg_res.change(Action::Change).detail(detail), async |_| Ok(modify.send().aws(region).await?)).await?;
    }
    Ok(())
}

async fn down(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let sg = Res::new(key(cx, side, "subnet-group"), "db-subnet-group", subnet_group_name(cx), region);
    super::remove(
        cx,
        rec,
        &sg,
        async |_| Ok(find_subnet_group(cx, side).await?.map(|g| g.0)),
        async |name| missing(reg.rds.delete_db_subnet_group().db_subnet_group_name(name).send().aws(region).await).map(|_| ()),
    )
    .await?;
    Ok(())
}

async fn params_down(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let pg = Res::new(key(cx, side, "parameter-group"), "db-parameter-group", parameter_group_name(cx), region);
    super::remove(
        cx,
        rec,
        &pg,
        async |_| find_parameter_group(cx, side).await,
        async |name| missing(reg.rds.delete_db_parameter_group().db_parameter_group_name(name).send().aws(region).await).map(|_| ()),
    )
    .await?;
    delete_log_group(cx, rec, side).await
}

/// The instance's exported logs (the instance's `EnableCloudwatchLogsExports`): each gets a log
/// group made by pgdr, with retention, that `down` removes; RDS would make them without one.
const LOGS: [(&str, &str); 2] = [("postgresql", "log-group"), ("upgrade", "upgrade-log-group")];

fn log_group_key(cx: &Cx, side: Side, what: &str) -> Key {
    Key::new(instance::owner(side), cx.region(side), what)
}

pub fn log_group_name(id: &str, log: &str) -> String {
    format!("/aws/rds/instance/{id}/{log}")
}

/// The instance's PostgreSQL log group, created by pgdr with 7-day retention (RDS would create
/// it without retention) so that `down` removes it.
pub async fn ensure_log_group(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let id = instance_id(cx, side);
    futures::future::try_join_all(LOGS.iter().map(|(log, what)| {
        let (key, name) = (log_group_key(cx, side, what), log_group_name(&id, log));
        async move { super::lambda::ensure_log_group(cx, rec, cx.regional(side), &key, &name).await }
    }))
    .await
    .map(|_| ())
}

/// Removes the instance's log group (after the instance: RDS would write it again).
/// The name recorded in state wins: the instance (and so its identifier) may be gone already.
pub async fn delete_log_group(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    for (log, what) in LOGS {
        let key = log_group_key(cx, side, what);
        let name = cx.store.id(&key).unwrap_or_else(|| log_group_name(&instance_id(cx, side), log));
        super::lambda::delete_log_group(cx, rec, cx.regional(side), &key, &name).await?;
    }
    Ok(())
}

/// What [`ensure_log_group`] reads, for the read phase.
pub async fn log_group_reads(cx: &Cx, side: Side) {
    let id = instance_id(cx, side);
    futures::future::join_all(LOGS.iter().map(|(log, _)| {
        let name = log_group_name(&id, log);
        async move {
            let _ = super::lambda::log_groups(cx.regional(side), &name).await;
        }
    }))
    .await;
}
