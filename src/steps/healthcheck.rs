//! The Route 53 health check that the writer record follows: its state key, how it is found
//! (by ID or caller reference) and deleted. Made by the detection step, read by the records.

use aws_sdk_route53::types::{
    AlarmIdentifier, CloudWatchRegion, HealthCheckConfig, HealthCheckType, InsufficientDataHealthStatus, Tag, TagResourceType,
};

use super::{keep_one, Res};
use crate::aws::Call;
use crate::cx::Cx;
use crate::error::{AwsError, Error, Result};
use crate::exec::Recorder;
use crate::read;
use crate::state::Key;

pub fn key() -> Key {
    Key::new("detection", "global", "health-check")
}

/// The health check's ID, as recorded.
pub fn id(cx: &Cx) -> Option<String> {
    cx.store.id(&key())
}

/// Tags a Route 53 resource (Route 53 takes no tags at creation).
pub async fn tag(cx: &Cx, kind: TagResourceType, id: &str, resource: &str) -> Result<()> {
    let tags: Vec<Tag> = cx.tags(resource).into_iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect();
    cx.clients.route53.change_tags_for_resource().resource_type(kind).resource_id(id).set_add_tags(Some(tags)).send().aws("global").await?;
    Ok(())
}

/// Every health check of the account, page by page (100 a page: an account with more must
/// not make pgdr miss its own and create another).
pub async fn list_health_checks(cx: &Cx) -> std::result::Result<Vec<aws_sdk_route53::types::HealthCheck>, AwsError> {
    let mut all = Vec::new();
    let mut marker = None;
    loop {
        let page = read!(cx.clients.reads, "global", cx.clients.route53.list_health_checks().set_marker(marker))?;
        all.extend(page.health_checks);
        marker = page.next_marker.filter(|_| page.is_truncated);
        if marker.is_none() {
            return Ok(all);
        }
    }
}

/// The environment's health check: the one in state, or one whose caller reference is pgdr's.
/// A create retried after a lost answer can make a second check: one is kept, the others deleted.
pub async fn the_health_check(cx: &Cx, rec: &Recorder<'_>, r: &Res<'_>, known: Option<String>) -> Result<Option<String>> {
    let prefix = health_check_prefix(cx);
    let ids: Vec<String> = list_health_checks(cx)
        .await?
        .into_iter()
        .filter(|h| Some(&h.id) == known.as_ref() || h.caller_reference.starts_with(&prefix))
        .map(|h| h.id)
        .collect();
    keep_one(rec, r, known.as_deref(), ids, async |id| delete_health_check(cx, &id).await).await
}

pub async fn delete_health_check(cx: &Cx, id: &str) -> Result<()> {
    let r53 = &cx.clients.route53;
    match r53.delete_health_check().health_check_id(id).send().aws("global").await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub fn health_check_prefix(cx: &Cx) -> String {
    format!("pgdr-{}-health-", cx.name())
}

/// The health check of the writer record: `CLOUDWATCH_METRIC`, following `alarm` in `region`
/// (Route 53 cannot reach a private endpoint itself). Created with a caller reference pgdr can
/// find again; Route 53 takes no tags at creation, so the ID is recorded first, then tagged.
pub async fn ensure(cx: &Cx, rec: &Recorder<'_>, alarm: &str, region: &str) -> Result<()> {
    let r = Res::new(key(), "health-check", format!("{alarm} ({region})"), "global");
    let prefix = health_check_prefix(cx);
    super::ensure(
        cx,
        rec,
        &r,
        async |known| the_health_check(cx, rec, &r, known).await,
        async |token| {
            let alarm_id = AlarmIdentifier::builder()
                .region(CloudWatchRegion::from(region))
                .name(alarm)
                .build()
                .map_err(|e| Error::Other(e.to_string()))?;
            let cfg = HealthCheckConfig::builder()
                .r#type(HealthCheckType::CloudwatchMetric)
                .alarm_identifier(alarm_id)
                // A fresh deployment has no data yet: it must not fail over.
                .insufficient_data_health_status(InsufficientDataHealthStatus::Healthy)
                .build()
                .map_err(|e| Error::Other(e.to_string()))?;
            let reference = format!("{prefix}{}", &token[token.len().saturating_sub(16)..]);
            let out =
                cx.clients.route53.create_health_check().caller_reference(reference).health_check_config(cfg).send().aws("global").await?;
            let id = out.health_check.map(|h| h.id).ok_or_else(|| Error::Other("CreateHealthCheck returned no id".into()))?;
            cx.store.put(&key(), crate::state::Resource::new("health-check", "global", &id, crate::state::Status::Created))?;
            tag(cx, TagResourceType::Healthcheck, &id, "health-check").await?;
            Ok(id)
        },
    )
    .await?;
    follow(cx, rec, &r, alarm, region).await
}

/// An existing check that follows another alarm (one made by an older pgdr follows
/// `primary-down`) is pointed at `alarm` (Route 53 API reference, UpdateHealthCheck).
async fn follow(cx: &Cx, rec: &Recorder<'_>, r: &Res<'_>, alarm: &str, region: &str) -> Result<()> {
    let Some(id) = id(cx) else { return Ok(()) };
    let checks = list_health_checks(cx).await?;
    let Some(have) = checks.iter().find(|h| h.id == id).and_then(|h| h.health_check_config.as_ref()?.alarm_identifier.as_ref()) else {
        return Ok(());
    };
    if have.name == alarm && have.region.as_str() == region {
        return Ok(());
    }
    let alarm_id =
        AlarmIdentifier::builder().region(CloudWatchRegion::from(region)).name(alarm).build().map_err(|e| Error::Other(e.to_string()))?;
    let update = cx
        .clients
        .route53
        .update_health_check()
        .health_check_id(&id)
        .alarm_identifier(alarm_id)
        .insufficient_data_health_status(InsufficientDataHealthStatus::Healthy);
    let change = r.change(crate::exec::Action::Change).id(&id).detail(format!("follow {alarm} (was {})", have.name));
    rec.apply(change, async |_| Ok(update.send().aws("global").await?)).await?;
    Ok(())
}
