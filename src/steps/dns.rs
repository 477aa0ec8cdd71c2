//! DNS: a private hosted zone associated with both VPCs (`zone`), and the records clients use
//! (`records`): a weighted CNAME `postgres.<zone>` — writer weight 100 with the health check,
//! the other instance weight 0 — and `replica.<zone>` for read traffic.
//!
//! Route 53 takes no tags at creation: the zone is found by its name and by a caller reference
//! that names the environment, and its ID is in state before anything waits on it.

use std::time::Duration;

use aws_sdk_route53::types::{
    Change as R53Change, ChangeAction, ChangeBatch, HostedZoneConfig, ResourceRecord, ResourceRecordSet, RrType, TagResourceType, Vpc,
    VpcRegion,
};
use futures::future::LocalBoxFuture;

use super::healthcheck::{self, tag};
use super::instance;
use super::{network, Res, StepId};
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{Error, Result};
use crate::exec::{Action, Change, Recorder, Step, StepResult};
use crate::read;
use crate::state::{Attr, Key};
use crate::wait::{self, Look, Pace, Wait};

pub struct Zone;
pub struct Records;

pub fn zone_key() -> Key {
    Key::new("dns", "global", "zone")
}

fn records_key() -> Key {
    Key::new("dns", "global", "records")
}

/// The private zone's ID, as recorded.
pub fn zone_id(cx: &Cx) -> Option<String> {
    cx.store.id(&zone_key())
}

fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

pub fn writer_record(cx: &Cx) -> String {
    fqdn(&format!("postgres.{}", cx.env.zone_name()))
}

pub fn reader_record(cx: &Cx) -> String {
    fqdn(&format!("replica.{}", cx.env.zone_name()))
}

fn caller_prefix(cx: &Cx) -> String {
    format!("pgdr-{}-zone-", cx.name())
}

impl Step<Cx, StepId> for Zone {
    fn id(&self) -> StepId {
        StepId::Zone
    }
    fn deps(&self) -> Vec<StepId> {
        vec![StepId::Network(Side::Primary), StepId::Network(Side::Dr)]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(zone_up(cx, rec))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(zone_down(cx, rec))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = futures::join!(zones_named(cx), find_zone(cx));
        })
    }
}

impl Step<Cx, StepId> for Records {
    fn id(&self) -> StepId {
        StepId::Records
    }
    fn deps(&self) -> Vec<StepId> {
        vec![StepId::Zone, StepId::Primary, StepId::Replica, StepId::Detection]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(records_up(cx, rec))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(records_down(cx, rec))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(zone) = cx.store.id(&zone_key()) {
                let _ = current_records(cx, &zone).await;
            }
        })
    }
}

/// The zone's ID and the VPCs (id, region) it is associated with.
async fn find_zone(cx: &Cx) -> Result<Option<(String, Vec<(String, String)>)>> {
    let r53 = &cx.clients.route53;
    let id = match cx.store.id(&zone_key()) {
        Some(id) => Some(id),
        None => {
            let name = fqdn(&cx.env.zone_name());
            let out = zones_named(cx).await?;
            out.hosted_zones
                .into_iter()
                .find(|z| {
                    z.name == name
                        && z.config.as_ref().is_some_and(|c| c.private_zone)
                        && z.caller_reference.starts_with(&caller_prefix(cx))
                })
                .map(|z| z.id)
        }
    };
    let Some(id) = id else { return Ok(None) };
    match read!(cx.clients.reads, "global", r53.get_hosted_zone().id(&id)) {
        Ok(o) => {
            let vpcs =
                o.vpcs.unwrap_or_default().into_iter().filter_map(|v| Some((v.vpc_id?, v.vpc_region?.as_str().to_owned()))).collect();
            Ok(Some((short_id(&id), vpcs)))
        }
        Err(e) if e.is_not_found() => {
            if cx.store.id(&zone_key()).is_some() {
                // Recorded but gone: look for it by name (it may have been recreated).
                let name = fqdn(&cx.env.zone_name());
                let out = r53.list_hosted_zones_by_name().dns_name(&name).send().aws("global").await?;
                if let Some(z) = out.hosted_zones.into_iter().find(|z| z.name == name && z.caller_reference.starts_with(&caller_prefix(cx)))
                {
                    let o = r53.get_hosted_zone().id(&z.id).send().aws("global").await?;
                    let vpcs = o
                        .vpcs
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|v| Some((v.vpc_id?, v.vpc_region?.as_str().to_owned())))
                        .collect();
                    return Ok(Some((short_id(&z.id), vpcs)));
                }
            }
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

fn short_id(id: &str) -> String {
    id.trim_start_matches("/hostedzone/").to_owned()
}

async fn zone_up(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let r53 = &cx.clients.route53;
    let name = cx.env.zone_name();
    let r = Res::new(zone_key(), "hosted-zone", name.clone(), "global");
    let primary_vpc = network::vpc_id(cx, Side::Primary).unwrap_or_default();
    remove_duplicate_zones(cx, rec, &r).await?;
    let found = find_zone(cx).await?;
    let vpcs = found.as_ref().map(|f| f.1.clone()).unwrap_or_default();
    let first = std::cell::Cell::new(true);
    let find = async |_: Option<String>| {
        if first.replace(false) {
            return Ok(found.as_ref().map(|f| f.0.clone()));
        }
        // After a create: remove any duplicate the create made.
        remove_duplicate_zones(cx, rec, &r).await?;
        Ok(find_zone(cx).await?.map(|f| f.0))
    };
    let id = super::ensure(cx, rec, &r, find, async |token| {
        let out = r53
            .create_hosted_zone()
            .name(&name)
            .caller_reference(format!("{}{}", caller_prefix(cx), &token[token.len().saturating_sub(16)..]))
            .hosted_zone_config(HostedZoneConfig::builder().comment(format!("pgdr {}", cx.name())).private_zone(true).build())
            .vpc(Vpc::builder().vpc_id(&primary_vpc).vpc_region(VpcRegion::from(cx.region(Side::Primary))).build())
            .send()
            .aws("global")
            .await?;
        let id = out.hosted_zone.map(|z| short_id(&z.id)).ok_or_else(|| Error::Other("CreateHostedZone returned no zone".into()))?;
        // Route 53 takes no tags at creation: record the ID first, then tag.
        cx.store.put(&zone_key(), crate::state::Resource::new("hosted-zone", "global", &id, crate::state::Status::Created))?;
        tag(cx, TagResourceType::Hostedzone, &id, "hosted-zone").await?;
        Ok(id)
    })
    .await?;
    let Some(id) = id else {
        rec.record(Change::new(Action::Create, "zone-association", cx.region(Side::Dr), cx.region(Side::Dr)));
        return Ok(());
    };
    // Both VPCs resolve the zone: associate the one that is missing.
    for side in [Side::Primary, Side::Dr] {
        let vpc = network::vpc_id(cx, side).unwrap_or_default();
        if vpc.is_empty() || vpcs.iter().any(|(v, _)| *v == vpc) || (found.is_none() && side == Side::Primary) {
            continue;
        }
        let change = Change::new(Action::Create, "zone-association", cx.region(side), cx.region(side))
            .id(&vpc)
            .detail(format!("{name} visible in {vpc}"));
        rec.apply(change, async |_| {
            let vpc_ref = Vpc::builder().vpc_id(&vpc).vpc_region(VpcRegion::from(cx.region(side))).build();
            let out = r53.associate_vpc_with_hosted_zone().hosted_zone_id(&id).vpc(vpc_ref).send().aws("global").await?;
            match out.change_info {
                Some(info) => wait_insync(cx, rec, &info.id).await,
                None => Ok(()),
            }
        })
        .await?;
    }
    Ok(())
}

/// Route 53 makes a second zone when a create is retried after its answer was lost (the
/// emulator does so even for the same caller reference): keep one, delete the empty others.
/// The hosted zones with the environment's zone name (private or not, anyone's).
async fn zones_named(
    cx: &Cx,
) -> std::result::Result<aws_sdk_route53::operation::list_hosted_zones_by_name::ListHostedZonesByNameOutput, crate::error::AwsError> {
    let name = fqdn(&cx.env.zone_name());
    read!(cx.clients.reads, "global", cx.clients.route53.list_hosted_zones_by_name().dns_name(&name))
}

async fn remove_duplicate_zones(cx: &Cx, rec: &Recorder<'_>, r: &Res<'_>) -> Result<()> {
    let r53 = &cx.clients.route53;
    let name = fqdn(&cx.env.zone_name());
    let out = zones_named(cx).await?;
    let ids: Vec<String> = out
        .hosted_zones
        .into_iter()
        .filter(|z| z.name == name && z.caller_reference.starts_with(&caller_prefix(cx)))
        .map(|z| short_id(&z.id))
        .collect();
    if ids.len() > 1 {
        let known = cx.store.id(&zone_key());
        let kept =
            super::keep_one(rec, r, known.as_deref(), ids, async |id| match r53.delete_hosted_zone().id(&id).send().aws("global").await {
                Ok(_) => Ok(()),
                Err(e) if e.is_not_found() => Ok(()),
                Err(e) => Err(e.into()),
            })
            .await?;
        if let (Some(k), false) = (kept, rec.planning()) {
            if cx.store.id(&zone_key()).as_deref() != Some(k.as_str()) {
                cx.store.put(&zone_key(), crate::state::Resource::new("hosted-zone", "global", k, crate::state::Status::Adopted))?;
            }
        }
    }
    Ok(())
}

pub async fn wait_insync(cx: &Cx, rec: &Recorder<'_>, change_id: &str) -> Result<()> {
    let r53 = &cx.clients.route53;
    Wait::new(format!("Route 53 change {change_id}"))
        .budget(Duration::from_secs(300))
        .pace(Pace::FAST)
        .hint("rerun the command")
        .progress(|s, t| rec.status(&format!("DNS change {s} ({})", wait::human(t))))
        .until(&cx.cancel, &cx.clients.reads, async || {
            let out = r53.get_change().id(change_id).send().aws("global").await?;
            Ok(match out.change_info.map(|c| c.status.as_str().to_owned()).as_deref() {
                Some("INSYNC") => Look::Ready(()),
                Some(s) => Look::Pending(s.to_owned()),
                None => Look::Pending("unknown".into()),
            })
        })
        .await
}

async fn zone_down(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let r53 = &cx.clients.route53;
    let r = Res::new(zone_key(), "hosted-zone", cx.env.zone_name(), "global");
    remove_duplicate_zones(cx, rec, &r).await?;
    let found = find_zone(cx).await?;
    super::remove(
        cx,
        rec,
        &r,
        async |_| Ok(found.as_ref().map(|f| f.0.clone())),
        async |id| {
            // Records other than SOA/NS block deletion; records_down removed pgdr's.
            match r53.delete_hosted_zone().id(&id).send().aws("global").await {
                Ok(_) => Ok(()),
                Err(e) if e.is_not_found() => Ok(()),
                Err(e) if e.is_in_use() => Err(Error::failed(format!(
                    "hosted zone {id} still holds records pgdr did not create; delete them, then rerun `pgdr down`"
                ))),
                Err(e) => Err(e.into()),
            }
        },
    )
    .await
}

/// The records as they should be: (name, set identifier, weight, value, health check).
pub fn wanted_records(cx: &Cx, writer: Side, endpoints: &[(Side, String)], health_check: Option<&str>) -> Vec<ResourceRecordSet> {
    let ttl = cx.env.settings.record_ttl;
    let mut out = Vec::new();
    for (side, endpoint) in endpoints {
        let mut b = ResourceRecordSet::builder()
            .name(writer_record(cx))
            .r#type(RrType::Cname)
            .ttl(ttl)
            .set_identifier(cx.region(*side))
            .weight(if *side == writer { 100 } else { 0 })
            .set_resource_records(ResourceRecord::builder().value(endpoint).build().ok().map(|r| vec![r]));
        // The health check watches the protected primary: it stays on that record (weight 0
        // after a failover, where it can no longer send clients anywhere wrong).
        if *side == Side::Primary {
            b = b.set_health_check_id(health_check.map(str::to_owned));
        }
        if let Ok(r) = b.build() {
            out.push(r);
        }
    }
    // Reads go to the replica; after a failover (until `reprotect`) the only usable instance
    // is the writer, never the fenced old primary.
    let reader =
        if writer == Side::Primary { endpoints.iter().find(|(s, _)| *s != writer) } else { endpoints.iter().find(|(s, _)| *s == writer) };
    if let Some((_, reader)) = reader {
        if let Ok(r) = ResourceRecordSet::builder()
            .name(reader_record(cx))
            .r#type(RrType::Cname)
            .ttl(ttl)
            .set_resource_records(ResourceRecord::builder().value(reader).build().ok().map(|r| vec![r]))
            .build()
        {
            out.push(r);
        }
    }
    out
}

fn same(a: &ResourceRecordSet, b: &ResourceRecordSet) -> bool {
    let vals = |r: &ResourceRecordSet| r.resource_records().iter().map(|v| v.value().trim_end_matches('.').to_owned()).collect::<Vec<_>>();
    a.name.trim_end_matches('.') == b.name.trim_end_matches('.')
        && a.r#type == b.r#type
        && a.set_identifier == b.set_identifier
        && a.weight == b.weight
        && a.ttl == b.ttl
        && a.health_check_id == b.health_check_id
        && vals(a) == vals(b)
}

/// pgdr's records in the zone now.
pub async fn current_records(cx: &Cx, zone: &str) -> Result<Vec<ResourceRecordSet>> {
    let out = read!(cx.clients.reads, "global", cx.clients.route53.list_resource_record_sets().hosted_zone_id(zone))?;
    let names = [writer_record(cx), reader_record(cx)];
    Ok(out
        .resource_record_sets
        .into_iter()
        .filter(|r| names.iter().any(|n| n.trim_end_matches('.') == r.name.trim_end_matches('.')))
        .collect())
}

/// Makes the records match the topology (writer weight 100); one batch, then INSYNC.
pub async fn records_up(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let Some(zone) = cx.store.id(&zone_key()) else {
        rec.record(Change::new(Action::Create, "dns-record", &writer_record(cx), "global").detail("weighted writer and reader records"));
        return Ok(());
    };
    let endpoints: Vec<(Side, String)> =
        [Side::Primary, Side::Dr].into_iter().filter_map(|s| instance::recorded(cx, s, Attr::Endpoint).map(|e| (s, e))).collect();
    let hc = healthcheck::id(cx);
    let want = wanted_records(cx, cx.writer(), &endpoints, hc.as_deref());
    let have = current_records(cx, &zone).await?;
    let mut changes = Vec::new();
    for w in &want {
        let current =
            have.iter().find(|h| h.name.trim_end_matches('.') == w.name.trim_end_matches('.') && h.set_identifier == w.set_identifier);
        match current {
            Some(h) if same(h, w) => rec.record(Change::new(Action::Keep, "dns-record", &describe(w), "global")),
            Some(_) => {
                rec.record(Change::new(Action::Change, "dns-record", &describe(w), "global"));
                changes.push(w.clone());
            }
            None => {
                rec.record(Change::new(Action::Create, "dns-record", &describe(w), "global"));
                changes.push(w.clone());
            }
        }
    }
    if changes.is_empty() {
        return Ok(());
    }
    // One batch: all or nothing.
    let batch = ChangeBatch::builder()
        .comment(format!("pgdr {}", cx.name()))
        .set_changes(Some(
            changes
                .into_iter()
                .filter_map(|r| R53Change::builder().action(ChangeAction::Upsert).resource_record_set(r).build().ok())
                .collect(),
        ))
        .build()
        .map_err(|e| Error::Other(e.to_string()))?;
    // Each record's change is recorded above; the batch is their one write.
    rec.apply_part(None, async |_| {
        let out = cx.clients.route53.change_resource_record_sets().hosted_zone_id(&zone).change_batch(batch).send().aws("global").await?;
        if let Some(info) = out.change_info {
            wait_insync(cx, rec, &info.id).await?;
        }
        cx.store.put(&records_key(), crate::state::Resource::new("dns-records", "global", writer_record(cx), crate::state::Status::Created))
    })
    .await?;
    Ok(())
}

pub fn describe(r: &ResourceRecordSet) -> String {
    match (&r.set_identifier, r.weight) {
        (Some(id), Some(w)) => format!("{} [{id}] weight {w}", r.name.trim_end_matches('.')),
        _ => r.name.trim_end_matches('.').to_owned(),
    }
}

async fn records_down(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let Some(zone) = find_zone(cx).await?.map(|z| z.0) else {
        return Ok(());
    };
    let have = current_records(cx, &zone).await?;
    if have.is_empty() {
        return Ok(());
    }
    for h in &have {
        rec.record(Change::new(Action::Delete, "dns-record", &describe(h), "global"));
    }
    if rec.planning() {
        return Ok(());
    }
    // DELETE must match the stored records exactly: send them back as listed.
    let batch = ChangeBatch::builder()
        .set_changes(Some(
            have.into_iter()
                .filter_map(|r| R53Change::builder().action(ChangeAction::Delete).resource_record_set(r).build().ok())
                .collect(),
        ))
        .build()
        .map_err(|e| Error::Other(e.to_string()))?;
    rec.apply_part(None, async |_| {
        match cx.clients.route53.change_resource_record_sets().hosted_zone_id(&zone).change_batch(batch).send().aws("global").await {
            Ok(out) => {
                if let Some(info) = out.change_info {
                    wait_insync(cx, rec, &info.id).await?;
                }
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        cx.store.remove(&records_key())
    })
    .await?;
    Ok(())
}
