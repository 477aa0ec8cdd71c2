//! Cross-region VPC peering: requested from the primary region, accepted in the DR region,
//! with a route to the peer's CIDR in both route tables.

use std::time::Duration;

use aws_sdk_ec2::types::ResourceType;
use futures::future::LocalBoxFuture;

use super::network::{self, find_vpc};
use super::{ec2_tag_filters, ec2_tag_spec, ensure, remove, Res, StepId};
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{Error, Result};
use crate::exec::{Action, Change, Recorder, Step, StepResult};
use crate::read;
use crate::state::Key;
use crate::wait::{Look, Pace, Wait};

pub struct Peering;

impl Step<Cx, StepId> for Peering {
    fn id(&self) -> StepId {
        StepId::Peering
    }
    fn deps(&self) -> Vec<StepId> {
        vec![StepId::Network(Side::Primary), StepId::Network(Side::Dr)]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(up(cx, rec))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(down(cx, rec))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        // The VPCs and route tables are read by the network steps.
        Box::pin(async move {
            let known = cx.store.id(&key(cx));
            // By tags, then by ID from each side (the two waits' first looks).
            let _ = futures::join!(all(cx, cx.home(), None), async {
                if let Some(id) = known.clone() {
                    let _ = futures::join!(find(cx, cx.home().other(), Some(id.clone())), find(cx, cx.home(), Some(id)));
                }
            });
        })
    }
}

fn key(cx: &Cx) -> Key {
    Key::new("peering", cx.region(cx.home()), "connection")
}

fn route_key(cx: &Cx, side: Side) -> Key {
    Key::new("peering", cx.region(side), "route")
}

/// The live peering connection, duplicates (a create retried after a lost answer) removed.
async fn the_one(cx: &Cx, rec: &Recorder<'_>, r: &Res<'_>, known: Option<String>) -> Result<Option<String>> {
    let reg = cx.regional(cx.home());
    let mut ids: Vec<String> = all(cx, cx.home(), None).await?.into_iter().map(|p| p.0).collect();
    if let (true, Some(_)) = (ids.is_empty(), &known) {
        ids = all(cx, cx.home(), known.clone()).await?.into_iter().map(|p| p.0).collect();
    }
    super::keep_one(rec, r, known.as_deref(), ids, async |id| delete(reg, &id).await.map(|_| ())).await
}

/// Deletes a peering connection; whether it was there to delete.
async fn delete(reg: &crate::clients::Regional, id: &str) -> Result<bool> {
    match reg.ec2.delete_vpc_peering_connection().vpc_peering_connection_id(id).send().aws(&reg.region).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The live peering connection (not deleted or failed) and its status code, seen from `side`.
async fn find(cx: &Cx, side: Side, known: Option<String>) -> Result<Option<(String, String)>> {
    Ok(all(cx, side, known).await?.into_iter().next())
}

async fn all(cx: &Cx, side: Side, known: Option<String>) -> Result<Vec<(String, String)>> {
    let reg = cx.regional(side);
    let req = reg.ec2.describe_vpc_peering_connections();
    let req = match known {
        Some(id) => req.vpc_peering_connection_ids(id),
        None => req.set_filters(Some(ec2_tag_filters(cx, "peering"))),
    };
    let out = match read!(reg.reads, &reg.region, req) {
        Ok(o) => o,
        Err(e) if e.is_not_found() => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    Ok(out
        .vpc_peering_connections
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let code = p.status.and_then(|s| s.code).map(|c| c.as_str().to_ascii_lowercase()).unwrap_or_default();
            let live = !matches!(code.as_str(), "deleted" | "deleting" | "rejected" | "failed" | "expired");
            live.then_some(p.vpc_peering_connection_id.map(|id| (id, code))).flatten()
        })
        .collect())
}

async fn up(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let primary = cx.regional(cx.home());
    let region = primary.region.as_str();
    let vpc = find_vpc(cx, cx.home(), network::vpc_id(cx, cx.home())).await?.unwrap_or_default();
    let peer_vpc = find_vpc(cx, cx.home().other(), network::vpc_id(cx, cx.home().other())).await?.unwrap_or_default();
    let r = Res::new(key(cx), "vpc-peering", format!("pgdr-{}", cx.name()), region);
    let pcx = ensure(
        cx,
        rec,
        &r,
        async |known| the_one(cx, rec, &r, known).await,
        async |_| {
            let create = primary
                .ec2
                .create_vpc_peering_connection()
                .vpc_id(&vpc)
                .peer_vpc_id(&peer_vpc)
                .peer_region(cx.region(cx.home().other()))
                .tag_specifications(ec2_tag_spec(cx, ResourceType::VpcPeeringConnection, "peering"));
            let ids = [vpc.as_str(), peer_vpc.as_str()];
            let out =
                cx.settle(&ids, &format!("peering {vpc} with {peer_vpc}"), async || Ok(create.clone().send().aws(region).await?)).await?;
            out.vpc_peering_connection
                .and_then(|p| p.vpc_peering_connection_id)
                .ok_or_else(|| Error::Other("CreateVpcPeeringConnection returned no id".into()))
        },
    )
    .await?;
    // CreateVpcPeeringConnection takes no ClientToken: a create the SDK retried after its answer
    // was lost made a twin, which this run would not see again. Keep the one just made or found.
    let pcx = match pcx {
        Some(id) => {
            let mut ids: Vec<String> = all(cx, cx.home(), None).await?.into_iter().map(|p| p.0).collect();
            ids.retain(|i| *i != id);
            ids.insert(0, id.clone());
            super::keep_one(rec, &r, Some(&id), ids, async |twin| delete(primary, &twin).await.map(|_| ())).await?
        }
        None => None,
    };

    // Accept in the DR region (the only place AWS allows it), then wait for `active`.
    match &pcx {
        Some(pcx) => accept(cx, rec, &r, pcx).await?,
        None => rec.record(Change::new(Action::Change, "vpc-peering", &r.name, cx.region(cx.home().other())).detail("accept")),
    }
    // Routes to the peer's CIDR in both route tables.
    let pcx_id = pcx.unwrap_or_default();
    let route_up = async |side: Side| -> Result<()> {
        let (reg, rt, peer, rr) = route(cx, side);
        ensure(
            cx,
            rec,
            &rr,
            async |_| find_route(cx, side, &rt, &peer, &pcx_id).await,
            async |_| {
                let create = reg.ec2.create_route().route_table_id(&rt).destination_cidr_block(&peer).vpc_peering_connection_id(&pcx_id);
                let ids = [rt.as_str(), pcx_id.as_str()];
                cx.settle(&ids, &format!("route {peer} in {rt}"), async || Ok(create.clone().send().aws(&reg.region).await?)).await?;
                Ok(format!("{rt}:{peer}"))
            },
        )
        .await
        .map(|_| ())
    };
    let (a, b) = futures::join!(route_up(Side::Primary), route_up(Side::Dr));
    a.and(b)
}

/// Accepts the request in the accepter Region, where it can show up late ("not yet visible" is
/// waited for), then waits for `active`.
async fn accept(cx: &Cx, rec: &Recorder<'_>, r: &Res<'_>, pcx: &String) -> Result<()> {
    let dr = cx.regional(cx.home().other());
    let status = Wait::new(format!("peering {pcx} in {}", dr.region))
        .budget(Duration::from_secs(300))
        .pace(Pace::FAST)
        .hint("rerun `pgdr up`")
        .progress(|s, _| rec.status(&format!("peering {s}")))
        .until(&cx.cancel, &cx.clients.reads, async || {
            Ok(match find(cx, cx.home().other(), Some(pcx.clone())).await? {
                Some((_, code)) if code == "initiating-request" => Look::Pending(code),
                Some((_, code)) => Look::Ready(code),
                None => Look::Pending("not yet visible".into()),
            })
        })
        .await?;
    if status == "pending-acceptance" {
        let change = Change::new(Action::Change, "vpc-peering", &r.name, &dr.region).id(pcx).detail("accept");
        rec.apply(change, async |_| {
            Ok(dr.ec2.accept_vpc_peering_connection().vpc_peering_connection_id(pcx).send().aws(&dr.region).await?)
        })
        .await?;
    }
    if !rec.planning() {
        Wait::new(format!("peering {pcx}"))
            .budget(Duration::from_secs(600))
            .pace(Pace::FAST)
            .hint("rerun `pgdr up`")
            .progress(|s, _| rec.status(&format!("peering {s}")))
            .until(&cx.cancel, &cx.clients.reads, async || {
                Ok(match find(cx, cx.home(), Some(pcx.clone())).await? {
                    Some((_, c)) if c == "active" => Look::Ready(()),
                    Some((_, c)) => Look::Pending(c),
                    None => Look::Failed("deleted or rejected".into()),
                })
            })
            .await?;
    }
    Ok(())
}

/// A side's route to the peer's CIDR: its region's clients, its route table (from state), the
/// peer's CIDR and the resource as recorded.
fn route(cx: &Cx, side: Side) -> (&crate::clients::Regional, String, String, Res<'_>) {
    let reg = cx.regional(side);
    let peer = cx.cidr(side.other()).to_string();
    let rt = network::route_table_id(cx, side).unwrap_or_default();
    let rr = Res::new(route_key(cx, side), "route", format!("{peer} via peering"), &reg.region);
    (reg, rt, peer, rr)
}

async fn find_route(cx: &Cx, side: Side, rt: &str, cidr: &str, pcx: &str) -> Result<Option<String>> {
    if rt.is_empty() || pcx.is_empty() {
        return Ok(None);
    }
    let tables = match network::route_table(cx, side, rt).await {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let found = tables
        .into_iter()
        .flat_map(|t| t.routes.unwrap_or_default())
        .any(|r| r.destination_cidr_block.as_deref() == Some(cidr) && r.vpc_peering_connection_id.as_deref() == Some(pcx));
    Ok(found.then(|| format!("{rt}:{cidr}")))
}

async fn down(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let pcx = find(cx, cx.home(), cx.store.id(&key(cx))).await?.map(|p| p.0).unwrap_or_default();
    let route_down = async |side: Side| -> Result<()> {
        let (reg, rt, peer, rr) = route(cx, side);
        remove(
            cx,
            rec,
            &rr,
            async |_| find_route(cx, side, &rt, &peer, &pcx).await,
            async |_| match reg.ec2.delete_route().route_table_id(&rt).destination_cidr_block(&peer).send().aws(&reg.region).await {
                Ok(_) => Ok(()),
                Err(e) if e.is_not_found() => Ok(()),
                Err(e) => Err(e.into()),
            },
        )
        .await
    };
    let (a, b) = futures::join!(route_down(Side::Primary), route_down(Side::Dr));
    a.and(b)?;
    let primary = cx.regional(cx.home());
    let r = Res::new(key(cx), "vpc-peering", format!("pgdr-{}", cx.name()), &primary.region);
    remove(
        cx,
        rec,
        &r,
        async |known| the_one(cx, rec, &r, known).await,
        async |id| {
            if !delete(primary, &id).await? {
                return Ok(());
            }
            Wait::new(format!("peering {id}"))
                .budget(Duration::from_secs(600))
                .pace(Pace::FAST)
                .hint("rerun `pgdr down`")
                .progress(|s, _| rec.status(&format!("peering {s}")))
                .until(&cx.cancel, &cx.clients.reads, async || {
                    Ok(match find(cx, cx.home(), Some(id.clone())).await? {
                        None => Look::Ready(()),
                        Some((_, c)) => Look::Pending(c),
                    })
                })
                .await
        },
    )
    .await?;
    Ok(())
}
