//! Deleting a region's network, in the order AWS allows.

use super::find::{absent, delete_endpoint, endpoints, find_endpoint, find_one_subnet, find_route_table, find_sg, find_vpc, the_vpc};
use super::{key, SUBNETS};
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{Error, Result};
use crate::exec::Recorder;
use crate::steps::{remove, Res};
use crate::wait::{self, Look, Pace, Wait};

/// Deletes the region's network, waiting for each deletion so nothing blocks the VPC's.
pub(super) async fn down(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let vpc_id = find_vpc(cx, side, cx.store.id(&key(cx, side, "vpc"))).await?.unwrap_or_default();
    endpoint_down(cx, rec, side).await?;
    group_down(cx, rec, side, &vpc_id).await?;
    for name in SUBNETS {
        subnet_down(cx, rec, side, name, &vpc_id).await?;
    }
    route_table_down(cx, rec, side, &vpc_id).await?;
    vpc_down(cx, rec, side).await
}

async fn endpoint_down(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let ep = Res::new(key(cx, side, "s3-endpoint"), "vpc-endpoint", format!("pgdr-{}-s3", cx.name()), cx.region(side));
    remove(
        cx,
        rec,
        &ep,
        async |known| find_endpoint(cx, rec, &ep, side, known).await,
        async |id| {
            delete_endpoint(cx, side, &id).await?;
            Wait::new(format!("VPC endpoint {id}"))
                .budget(std::time::Duration::from_secs(600))
                .pace(Pace::FAST)
                .hint("rerun `pgdr down`")
                .progress(|s, _| rec.status(&format!("endpoint {s}")))
                .until(&cx.cancel, &cx.clients.reads, async || {
                    Ok(if endpoints(cx, side, None).await?.contains(&id) { Look::Pending("deleting".into()) } else { Look::Ready(()) })
                })
                .await
        },
    )
    .await
}

async fn group_down(cx: &Cx, rec: &Recorder<'_>, side: Side, vpc_id: &str) -> Result<()> {
    let (region, ec2) = (cx.region(side), &cx.regional(side).ec2);
    // Rules go with their group; forget them first.
    for rule in ["db-sg-rule-local", "db-sg-rule-peer"] {
        if !rec.planning() {
            cx.store.remove(&key(cx, side, rule))?;
        }
    }
    let sg = Res::new(key(cx, side, "db-sg"), "security-group", format!("pgdr-{}-db", cx.name()), region);
    remove(
        cx,
        rec,
        &sg,
        async |known| find_sg(cx, side, known, vpc_id).await,
        async |id| {
            // Lambda ENIs can hold a group for minutes after their function is gone.
            retry_dependency(cx, rec, &format!("security group {id}"), async || {
                absent(ec2.delete_security_group().group_id(&id).send().aws(region).await).map(|_| ())
            })
            .await
        },
    )
    .await
}

async fn subnet_down(cx: &Cx, rec: &Recorder<'_>, side: Side, name: &str, vpc_id: &str) -> Result<()> {
    let (region, ec2) = (cx.region(side), &cx.regional(side).ec2);
    let r = Res::new(key(cx, side, name), "subnet", format!("pgdr-{}-{name}", cx.name()), region);
    remove(
        cx,
        rec,
        &r,
        async |known| find_one_subnet(cx, rec, &r, side, name, known, vpc_id).await,
        async |id| {
            retry_dependency(cx, rec, &format!("subnet {id}"), async || {
                absent(ec2.delete_subnet().subnet_id(&id).send().aws(region).await).map(|_| ())
            })
            .await
        },
    )
    .await
}

async fn route_table_down(cx: &Cx, rec: &Recorder<'_>, side: Side, vpc_id: &str) -> Result<()> {
    let (region, ec2) = (cx.region(side), &cx.regional(side).ec2);
    let rt = Res::new(key(cx, side, "route-table"), "route-table", format!("pgdr-{}-private", cx.name()), region);
    remove(
        cx,
        rec,
        &rt,
        async |known| find_route_table(cx, rec, &rt, side, known, vpc_id).await,
        async |id| {
            // Associations of deleted subnets are gone; remove any that remain.
            if let Some(t) = absent(ec2.describe_route_tables().route_table_ids(&id).send().aws(region).await)? {
                for a in t.route_tables.unwrap_or_default().into_iter().flat_map(|t| t.associations.unwrap_or_default()) {
                    if let (Some(aid), false) = (a.route_table_association_id, a.main.unwrap_or(false)) {
                        absent(ec2.disassociate_route_table().association_id(aid).send().aws(region).await)?;
                    }
                }
            }
            absent(ec2.delete_route_table().route_table_id(&id).send().aws(region).await).map(|_| ())
        },
    )
    .await
}

async fn vpc_down(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let ec2 = &cx.regional(side).ec2;
    let region = cx.region(side);
    let vpc = Res::new(key(cx, side, "vpc"), "vpc", format!("pgdr-{}", cx.name()), region);
    remove(
        cx,
        rec,
        &vpc,
        async |known| the_vpc(cx, rec, &vpc, side, known).await,
        async |id| {
            retry_dependency(cx, rec, &format!("VPC {id}"), async || {
                absent(ec2.delete_vpc().vpc_id(&id).send().aws(region).await).map(|_| ())
            })
            .await
        },
    )
    .await
}

/// Retries a delete refused with `DependencyViolation` (something still uses the resource and
/// is going away, such as a Lambda ENI) for up to 30 minutes.
pub async fn retry_dependency(cx: &Cx, rec: &Recorder<'_>, what: &str, mut del: impl AsyncFnMut() -> Result<()>) -> Result<()> {
    Wait::new(what)
        .budget(std::time::Duration::from_secs(1800))
        .pace(Pace::SLOW)
        .hint("find what still uses it in the EC2 console, then rerun `pgdr down`")
        .progress(|s, t| rec.status(&format!("{what}: {s} ({})", wait::human(t))))
        .until(&cx.cancel, &cx.clients.reads, async || match del().await {
            Ok(()) => Ok(Look::Ready(())),
            Err(Error::Aws(e)) if e.is_in_use() => Ok(Look::Pending("in use".into())),
            Err(e) => Err(e),
        })
        .await
}
