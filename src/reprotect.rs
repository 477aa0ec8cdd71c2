//! `pgdr reprotect`: after a failover, protect the new primary again, in the opposite direction.
//!
//! 1. Remove the detection, failover function and alarms that watched the old pair.
//! 2. Delete the fenced old primary with a final snapshot (or keep it, retired, with
//!    `--keep-old-primary`).
//! 3. Swap the regions' roles in state (the DR region now holds the primary), lift the fence.
//! 4. Run `up`: a new cross-region replica of the new primary in the old region, detection and
//!    failover machinery on the new DR side, DNS records pointed at the new pair.

use serde::Serialize;

use crate::cx::{Cx, Side};
use crate::error::{Error, Result};
use crate::exec::{self, Direction, Progress, Recorder, Step};
use crate::health;
use crate::state::{now_rfc3339, Key, Resource, Status, TopologyEvent};
use crate::steps::{alarms, database, failover, instance, StepId};

#[derive(Debug, Serialize)]
pub struct Plan {
    pub env: String,
    pub new_primary: String,
    pub new_primary_region: String,
    pub new_replica_region: String,
    pub new_replica: String,
    pub old_primary: Option<String>,
    pub keep_old_primary: bool,
    pub steps: Vec<String>,
}

pub async fn plan(cx: &Cx, keep_old_primary: bool) -> Result<Plan> {
    let d = health::instance(cx, Side::Dr).await?;
    let Some(d) = d.filter(health::promoted) else {
        return Err(Error::user(format!(
            "environment {} has not failed over (the writer is in {}): there is nothing to reprotect",
            cx.name(),
            cx.region(Side::Primary)
        )));
    };
    // The old region must answer: the new replica goes there.
    let old = health::instance(cx, Side::Primary).await.map_err(|e| {
        Error::failed(format!("the old primary region {} does not answer ({e}); run reprotect when it is back", cx.region(Side::Primary)))
    })?;
    let old_id = old.as_ref().map(|o| o.id.clone());
    let new_replica = if keep_old_primary && old.is_some() {
        format!("pgdr-{}-{}-2", cx.name(), cx.region(Side::Primary))
    } else {
        format!("pgdr-{}-{}", cx.name(), cx.region(Side::Primary))
    };
    let mut steps = vec![format!(
        "remove the probe, the primary-down and replica-promoted alarms, the health check, the failover function and alarms in {}",
        cx.region(Side::Dr)
    )];
    match (&old_id, keep_old_primary) {
        (Some(id), false) => {
            steps.push(format!("delete the fenced old primary {id} in {} with a final snapshot", cx.region(Side::Primary)))
        }
        (Some(id), true) => steps.push(format!("keep the old primary {id} (retired; `down` deletes it)")),
        (None, _) => {}
    }
    steps.push(format!("create {new_replica} in {}, a cross-region replica of {}", cx.region(Side::Primary), d.id));
    steps.push(format!("put detection and the failover function in {}, point DNS at the new pair", cx.region(Side::Primary)));
    Ok(Plan {
        env: cx.name().to_owned(),
        new_primary: d.id,
        new_primary_region: cx.region(Side::Dr).to_owned(),
        new_replica_region: cx.region(Side::Primary).to_owned(),
        new_replica,
        old_primary: old_id,
        keep_old_primary,
        steps,
    })
}

/// Steps 1-3; the caller then reopens the environment (roles swapped) and runs `up`.
pub async fn prepare(cx: &Cx, plan: &Plan, progress: &dyn Progress) -> Result<()> {
    // 1. The machinery that watched the old pair.
    let old: Vec<Box<dyn Step<Cx, StepId>>> = vec![Box::new(alarms::Alarms), Box::new(failover::Detection), Box::new(failover::Failover)];
    // Their dependencies outside this part of the graph are left alone.
    let old = exec::Graph::new_partial(old).map_err(|e| Error::Other(format!("internal error: {e}")))?;
    let report = exec::execute(&old, cx, Direction::Down, cx.mode, progress, &cx.cancel).await;
    if let Some(f) = report.failures().next() {
        return Err(Error::failed(format!(
            "reprotect stopped while removing the old detection: {}: {}",
            f.step,
            match &f.outcome {
                exec::Outcome::Failed { error, .. } => error.clone(),
                _ => String::new(),
            }
        )));
    }

    // 2. The old primary.
    let old_region = cx.region(Side::Primary).to_owned();
    let new_region = cx.region(Side::Dr).to_owned();
    let old_key = instance::instance_key(cx, Side::Primary);
    if let Some(id) = &plan.old_primary {
        if plan.keep_old_primary {
            let id = id.clone();
            cx.store.update(|s| {
                s.resources.remove(&old_key);
                s.resources.insert(instance::retired_key(&old_region), Resource::new("db-instance", &old_region, &id, Status::Adopted));
            })?;
        } else {
            let rec = Recorder::new("reprotect", cx.mode, progress, cx.cancel.clone());
            delete_old_primary(cx, &rec, id).await?;
            cx.store.remove(&old_key)?;
        }
    }

    // 3. Swap the roles: keys follow the roles, the fence is lifted, the new replica's name set.
    let new_replica = plan.new_replica.clone();
    cx.store.update(|s| {
        let (primary, replica) = (instance::owner(Side::Primary), instance::owner(Side::Dr));
        let moved: Vec<(Key, Resource)> = s
            .resources
            .iter()
            .filter(|(k, _)| (k.owner() == primary && k.region() == old_region) || (k.owner() == replica && k.region() == new_region))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in moved {
            s.resources.remove(&k);
            s.resources.insert(k.with_owner(if k.owner() == primary { replica } else { primary }), v);
        }
        s.resources.entry(Key::new(replica, &old_region, "instance")).or_insert_with(|| {
            let mut r = Resource::pending("db-instance", &old_region);
            r.set(crate::state::Attr::Identifier, new_replica.clone());
            r
        });
        s.topology.fenced.remove(&old_region);
        s.topology.primary_region = new_region.clone();
        s.topology.writer_region = new_region.clone();
        s.topology.events.push(TopologyEvent {
            at: now_rfc3339(),
            what: format!("reprotect: primary {new_region}, new replica {new_replica} in {old_region}"),
        });
    })?;
    Ok(())
}

async fn delete_old_primary(cx: &Cx, rec: &Recorder<'_>, id: &str) -> Result<()> {
    // The old primary's data is kept in a final snapshot, always.
    let how = database::Deletion { snapshot: Some(database::snapshot_name(cx)), keep_backups: true };
    database::delete_instance(cx, rec, cx.regional(Side::Primary), id, &how, "rerun `pgdr reprotect`").await
}
