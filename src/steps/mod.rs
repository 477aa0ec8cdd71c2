//! The step modules. Each resource is handled by the same pattern: find it (by the ID in
//! state, then by tags), keep or adopt what exists, create what does not (recording an intent
//! before the call and the ID right after it, before any wait); on `down`, find and delete.

pub mod agent;
pub mod alarms;
mod dashboard;
pub mod database;
pub mod dbgroups;
pub mod dns;
pub mod failover;
pub mod healthcheck;
pub mod instance;
pub mod lambda;
#[cfg(test)]
mod mock_tests;
pub mod network;
pub mod peering;
pub mod secrets;

use std::fmt;

use crate::cx::{Cx, Side};
use crate::error::Result;
use crate::exec::{Action, Change, Graph, Recorder};
use crate::state::{Attr, Key, Resource, Status};

/// Every step of the graph. Adding a step: a variant here, its line in [`graph`], and the
/// compiler names every `match` that must learn it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StepId {
    Network(Side),
    Peering,
    Secrets,
    DbGroups(Side),
    DbParams(Side),
    Primary,
    Replica,
    Retired,
    Topics,
    Alarms,
    Zone,
    Failover,
    Detection,
    Records,
    Agent(Side),
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepId::Network(side) => write!(f, "network:{}", side.label()),
            StepId::DbGroups(side) => write!(f, "dbgroups:{}", side.label()),
            StepId::DbParams(side) => write!(f, "dbparams:{}", side.label()),
            StepId::Peering => f.write_str("peering"),
            StepId::Secrets => f.write_str("secrets"),
            StepId::Primary => f.write_str("primary"),
            StepId::Replica => f.write_str("replica"),
            StepId::Retired => f.write_str("retired"),
            StepId::Topics => f.write_str("topics"),
            StepId::Alarms => f.write_str("alarms"),
            StepId::Zone => f.write_str("zone"),
            StepId::Failover => f.write_str("failover"),
            StepId::Detection => f.write_str("detection"),
            StepId::Records => f.write_str("records"),
            StepId::Agent(side) => write!(f, "agent:{}", side.label()),
        }
    }
}

/// A step of pgdr's graph.
pub type Step = dyn crate::exec::Step<Cx, StepId>;

/// Names one resource: its state key, its kind and its display name, in a region.
#[derive(Clone, Debug)]
pub struct Res<'a> {
    pub key: Key,
    pub kind: &'a str,
    pub name: String,
    pub region: &'a str,
}

impl<'a> Res<'a> {
    pub fn new(key: Key, kind: &'a str, name: String, region: &'a str) -> Self {
        Res { key, kind, name, region }
    }
    /// A change to this resource, for [`Recorder::record`] and [`Recorder::apply`].
    pub fn change(&self, action: Action) -> Change {
        Change::new(action, self.kind, &self.name, self.region)
    }
}

/// Finds or creates one resource. `find` gets the ID known to state (if any) and returns the
/// live ID; `create` makes the resource (tagged at creation) and returns its ID. In plan mode
/// nothing is created and `None` is returned for a resource that would be.
pub async fn ensure(
    cx: &Cx,
    rec: &Recorder<'_>,
    r: &Res<'_>,
    find: impl AsyncFn(Option<String>) -> Result<Option<String>>,
    create: impl AsyncFnOnce(String) -> Result<String>,
) -> Result<Option<String>> {
    let known = cx.store.get(&r.key);
    let known_id = known.as_ref().and_then(|k| k.id.clone());
    if let Some(id) = find(known_id.clone()).await? {
        // Seen to exist just now: a "not found" from the next call on it is EC2's eventual
        // consistency (it may be seconds old: a run that died made it), not its absence.
        cx.fresh.insert(&id);
        if known_id.as_deref() == Some(id.as_str()) && known.as_ref().is_some_and(|k| k.status != Status::Pending) {
            rec.record(r.change(Action::Keep).id(&id));
        } else {
            let mut res = Resource::new(r.kind, r.region, &id, Status::Adopted);
            if let Some(k) = known {
                res.attrs = k.attrs;
            }
            cx.store.put(&r.key, res)?;
            rec.record(r.change(Action::Adopt).id(&id));
        }
        return Ok(Some(id));
    }
    let created = rec
        .apply(r.change(Action::Create), async |change| {
            // The intent, with the idempotency token the create will use: a rerun after a crash
            // reuses it, so a create that did happen is not made twice.
            let token = known
                .as_ref()
                .filter(|k| k.status == Status::Pending)
                .and_then(|k| k.attr(Attr::Token).map(str::to_owned))
                .unwrap_or_else(|| new_token(cx, r));
            cx.store.put(&r.key, Resource::pending(r.kind, r.region).with(Attr::Token, token.clone()))?;
            rec.status(&format!("creating {} {}", r.kind, r.name));
            let (id, status) = match create(token).await {
                Ok(id) => (id, Status::Created),
                // Refused because it exists: an earlier create made it (its answer lost, or its
                // run killed with the request in flight, which AWS still completes). Take it.
                Err(crate::error::Error::Aws(e)) if e.is_already_exists() => match find(None).await? {
                    Some(id) => (id, Status::Adopted),
                    None => return Err(crate::error::Error::Aws(e)),
                },
                Err(e) => return Err(e),
            };
            cx.fresh.insert(&id);
            cx.store.put(&r.key, Resource::new(r.kind, r.region, &id, status))?;
            *change = change.clone().id(&id);
            Ok(id)
        })
        .await?;
    let Some(id) = created else { return Ok(None) };
    // The SDK may have retried the create after losing its answer and made a second one:
    // look again (finds remove duplicates, keeping the one just recorded).
    match find(Some(id.clone())).await {
        Ok(Some(kept)) if kept != id => {
            cx.store.put(&r.key, Resource::new(r.kind, r.region, &kept, Status::Adopted))?;
            return Ok(Some(kept));
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(kind = r.kind, error = %e, "could not check for duplicates after a create; the next `up` will"),
    }
    Ok(Some(id))
}

/// Finds and deletes one resource, then forgets it. A resource already gone counts as deleted.
pub async fn remove(
    cx: &Cx,
    rec: &Recorder<'_>,
    r: &Res<'_>,
    find: impl AsyncFnOnce(Option<String>) -> Result<Option<String>>,
    delete: impl AsyncFnOnce(String) -> Result<()>,
) -> Result<()> {
    let known_id = cx.store.id(&r.key);
    let Some(id) = find(known_id).await? else {
        cx.store.remove(&r.key)?;
        rec.record(r.change(Action::Absent));
        return Ok(());
    };
    rec.apply(r.change(Action::Delete).id(&id), async |_| {
        rec.status(&format!("deleting {} {}", r.kind, r.name));
        delete(id.clone()).await?;
        cx.store.remove(&r.key)
    })
    .await?;
    Ok(())
}

/// Of several resources carrying one resource's tags (a create retried by the SDK after its
/// answer was lost makes a second one), keeps one — the one in state, else the first — and
/// deletes the others; a duplicate that cannot be deleted is reported with its ID.
pub async fn keep_one(
    rec: &Recorder<'_>,
    r: &Res<'_>,
    known: Option<&str>,
    mut ids: Vec<String>,
    delete: impl AsyncFn(String) -> Result<()>,
) -> Result<Option<String>> {
    ids.dedup();
    if ids.len() <= 1 {
        return Ok(ids.pop());
    }
    let keep = known.filter(|k| ids.iter().any(|i| i == k)).map(str::to_owned).unwrap_or_else(|| ids[0].clone());
    for other in ids.into_iter().filter(|i| *i != keep) {
        rec.apply(r.change(Action::Delete).id(&other).detail(format!("duplicate of {keep}")), async |_| {
            tracing::warn!(kind = r.kind, duplicate = %other, kept = %keep, "removing a duplicate");
            delete(other.clone()).await.map_err(|e| {
                crate::error::Error::failed(format!(
                    "{} {other} duplicates {keep} and could not be removed ({e}); delete it by hand",
                    r.kind
                ))
            })
        })
        .await?;
    }
    Ok(Some(keep))
}

/// Tags as EC2 wants them at creation.
pub fn ec2_tag_spec(cx: &Cx, rt: aws_sdk_ec2::types::ResourceType, resource: &str) -> aws_sdk_ec2::types::TagSpecification {
    let tags = cx.tags(resource).into_iter().map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build());
    aws_sdk_ec2::types::TagSpecification::builder().resource_type(rt).set_tags(Some(tags.collect())).build()
}

/// EC2 filters that find an environment's resource by its tags.
pub fn ec2_tag_filters(cx: &Cx, resource: &str) -> Vec<aws_sdk_ec2::types::Filter> {
    vec![ec2_filter("tag:pgdr:env", cx.name()), ec2_filter("tag:pgdr:resource", resource)]
}

pub fn ec2_filter(name: &str, value: &str) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder().name(name).values(value).build()
}

/// An idempotency token for one create intent: readable, unique per intent (a create after a
/// `down` must not be answered with the deleted resource), at most 64 characters.
fn new_token(cx: &Cx, r: &Res<'_>) -> String {
    // Secrets Manager wants 32-64 characters.
    let mut t = format!("pgdr-{}-{}-{:032x}", cx.name(), r.kind, fastrand::u128(..));
    t.truncate(64);
    t
}

/// The whole graph, in declaration order, checked (see [`Graph::new`]).
pub fn graph() -> Result<Graph<'static, Cx, StepId>, crate::exec::GraphError> {
    let steps: Vec<Box<Step>> = vec![
        Box::new(network::Network(Side::Primary)),
        Box::new(network::Network(Side::Dr)),
        Box::new(peering::Peering),
        Box::new(secrets::Secrets),
        Box::new(dbgroups::DbGroups(Side::Primary)),
        Box::new(dbgroups::DbGroups(Side::Dr)),
        Box::new(dbgroups::DbParams(Side::Primary)),
        Box::new(dbgroups::DbParams(Side::Dr)),
        Box::new(database::Primary),
        Box::new(database::Replica),
        Box::new(database::Retired),
        Box::new(alarms::Topics),
        Box::new(alarms::Alarms),
        Box::new(dns::Zone),
        Box::new(failover::Failover),
        Box::new(failover::Detection),
        Box::new(dns::Records),
        Box::new(agent::Agent(Side::Primary)),
        Box::new(agent::Agent(Side::Dr)),
    ];
    // The graph is code: a bad one is a bug, which the unit test below catches.
    Graph::new(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_graph_is_valid_and_every_step_is_in_it() {
        let g = graph().unwrap();
        let ids: Vec<String> = g.steps().map(|s| s.id().to_string()).collect();
        for want in ["network:primary", "network:dr", "peering", "secrets", "primary", "replica", "detection", "records"] {
            assert!(ids.iter().any(|i| i == want), "{want} missing from {ids:?}");
        }
        // The replica follows the primary; DNS records follow detection (their health check).
        let deps = |id: StepId| g.steps().find(|s| s.id() == id).map(|s| s.deps()).unwrap_or_default();
        assert!(deps(StepId::Replica).contains(&StepId::Primary));
        assert!(deps(StepId::Records).contains(&StepId::Detection));
    }
}
