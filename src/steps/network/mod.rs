//! The network of one region: a VPC, private isolated subnets in two availability zones, their
//! route table, the database security group (5432 from both VPCs) and an S3 gateway endpoint.
//! No NAT gateway, no internet gateway.

use aws_sdk_ec2::types::{AttributeBooleanValue, IpPermission, IpRange, ResourceType};
use futures::future::LocalBoxFuture;

mod down;
mod find;

pub use down::retry_dependency;
use find::{
    dns_hostnames, endpoints, find_endpoint, find_one_subnet, find_route_table, find_sg, route_tables, subnets, the_vpc, vpcs, zones,
};
pub use find::{find_rule, find_vpc, route_table, subnet_ids};

use super::{ec2_tag_spec, ensure, Res, StepId};
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{Error, Result};
use crate::exec::{Action, Change, Recorder, Step, StepResult};
use crate::state::Key;

pub struct Network(pub Side);

pub const SUBNETS: [&str; 2] = ["subnet-a", "subnet-b"];

/// The state key of a side's network resource (`vpc`, `subnet-a`, `route-table`, `db-sg`, …).
pub fn key(cx: &Cx, side: Side, what: &str) -> Key {
    Key::new("network", cx.region(side), what)
}

/// The VPC of a side, as recorded.
pub fn vpc_id(cx: &Cx, side: Side) -> Option<String> {
    cx.store.id(&key(cx, side, "vpc"))
}

/// The database security group of a side, as recorded.
pub fn db_sg_id(cx: &Cx, side: Side) -> Option<String> {
    cx.store.id(&key(cx, side, "db-sg"))
}

/// The route table of a side, as recorded.
pub fn route_table_id(cx: &Cx, side: Side) -> Option<String> {
    cx.store.id(&key(cx, side, "route-table"))
}

impl Step<Cx, StepId> for Network {
    fn id(&self) -> StepId {
        StepId::Network(self.0)
    }
    fn deps(&self) -> Vec<StepId> {
        vec![]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(up(cx, rec, self.0))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(down::down(cx, rec, self.0))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        Box::pin(reads(cx, self.0))
    }
}

/// What `up` reads when nothing changes, from the IDs in state (errors are met again later).
async fn reads(cx: &Cx, side: Side) {
    let id = |what: &str| cx.store.id(&key(cx, side, what));
    let vpc = id("vpc").unwrap_or_default();
    let (rt, sg, sub) = (id("route-table"), id("db-sg"), [id(SUBNETS[0]), id(SUBNETS[1])]);
    let _ = futures::join!(
        vpcs(cx, side, id("vpc")),
        zones(cx, side),
        endpoints(cx, side, id("s3-endpoint")),
        async {
            if !vpc.is_empty() {
                let _ = dns_hostnames(cx, side, &vpc).await;
            }
        },
        subnets(cx, side, SUBNETS[0], sub[0].as_deref(), &vpc),
        subnets(cx, side, SUBNETS[1], sub[1].as_deref(), &vpc),
        route_tables(cx, side, rt.as_deref(), &vpc),
        async {
            if let Some(rt) = &rt {
                let _ = route_table(cx, side, rt).await;
            }
        },
        find_sg(cx, side, sg.clone(), &vpc),
        // One call reads both rules.
        find_rule(cx, side, sg.as_deref().unwrap_or_default(), ""),
    );
}

async fn up(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    // The zones do not depend on the VPC: read them while it is made.
    let (vpc, azs) = futures::join!(vpc_up(cx, rec, side), zones(cx, side));
    let (vpc, azs) = (vpc?, azs?);
    let vpc_id = vpc.clone().unwrap_or_default();
    let vpc_id = &vpc_id;
    // Then four independent chains at once: DNS hostnames, the subnets, the route table and
    // its endpoint, the security group and its rules.
    let subnets =
        futures::future::try_join_all(SUBNETS.iter().enumerate().map(|(i, name)| subnet_up(cx, rec, side, i, name, &azs, vpc_id)));
    let routes = async {
        let rt = route_table_up(cx, rec, side, vpc_id).await?;
        endpoint(cx, rec, side, vpc_id, rt).await
    };
    let group = security_group(cx, rec, side, vpc_id, cx.cidr(side), cx.cidr(side.other()));
    let (hostnames, subnet_ids, rt, group) = futures::join!(hostnames_up(cx, rec, side, vpc.as_deref()), subnets, routes, group);
    hostnames?;
    group?;
    let subnet_ids: Vec<String> = subnet_ids?.into_iter().flatten().collect();
    associations_up(cx, rec, side, rt?.as_deref(), &subnet_ids).await
}

fn vpc_res(cx: &Cx, side: Side) -> Res<'_> {
    Res::new(key(cx, side, "vpc"), "vpc", format!("pgdr-{}", cx.name()), cx.region(side))
}

/// The VPC, with DNS support and hostnames (a private hosted zone needs both).
async fn vpc_up(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<Option<String>> {
    let (region, ec2) = (cx.region(side), &cx.regional(side).ec2);
    let r = vpc_res(cx, side);
    ensure(
        cx,
        rec,
        &r,
        async |known| the_vpc(cx, rec, &r, side, known).await,
        // CreateVpc takes no client token; the intent in state covers it.
        async |_token| {
            let create =
                ec2.create_vpc().cidr_block(cx.cidr(side).to_string()).tag_specifications(ec2_tag_spec(cx, ResourceType::Vpc, "vpc"));
            let out = create.send().aws(region).await?;
            let id = out.vpc.and_then(|v| v.vpc_id).ok_or_else(|| Error::Other("CreateVpc returned no VPC id".into()))?;
            cx.fresh.insert(&id);
            // Part of creating it: a private hosted zone needs DNS hostnames on.
            cx.settle(&[&id], &format!("DNS hostnames on {id}"), async || enable_dns_hostnames(cx, side, &id).await).await?;
            Ok(id)
        },
    )
    .await
}

/// DNS hostnames on an existing VPC (turned off by hand, or a VPC adopted).
async fn hostnames_up(cx: &Cx, rec: &Recorder<'_>, side: Side, vpc: Option<&str>) -> Result<()> {
    let Some(vpc_id) = vpc else { return Ok(()) };
    let attr = cx.settle(&[vpc_id], &format!("attributes of {vpc_id}"), async || Ok(dns_hostnames(cx, side, vpc_id).await?)).await?;
    if !attr.enable_dns_hostnames.and_then(|a| a.value).unwrap_or(false) {
        let change = vpc_res(cx, side).change(Action::Change).id(vpc_id).detail("enable DNS hostnames");
        rec.apply(change, async |_| enable_dns_hostnames(cx, side, vpc_id).await).await?;
    }
    Ok(())
}

/// Private subnet `i` in the `i`-th availability zone (by name, so reruns agree).
async fn subnet_up(cx: &Cx, rec: &Recorder<'_>, side: Side, i: usize, name: &str, azs: &[String], vpc_id: &str) -> Result<Option<String>> {
    let (region, ec2, cidr) = (cx.region(side), &cx.regional(side).ec2, cx.cidr(side));
    let sub_cidr =
        cidr.subnet(24.max(cidr.prefix + 2), i as u32).ok_or_else(|| Error::Other("VPC CIDR too small for two subnets".into()))?;
    let az = azs.get(i).cloned().ok_or_else(|| Error::failed(format!("{region} offers fewer than two availability zones")))?;
    let r = Res::new(key(cx, side, name), "subnet", format!("pgdr-{}-{name}", cx.name()), region);
    ensure(
        cx,
        rec,
        &r,
        async |known| find_one_subnet(cx, rec, &r, side, name, known, vpc_id).await,
        async |_token| {
            let tags = ec2_tag_spec(cx, ResourceType::Subnet, name);
            let create =
                ec2.create_subnet().vpc_id(vpc_id).cidr_block(sub_cidr.to_string()).availability_zone(&az).tag_specifications(tags);
            let out =
                cx.settle(&[vpc_id], &format!("subnet {name} in {vpc_id}"), async || Ok(create.clone().send().aws(region).await?)).await?;
            out.subnet.and_then(|s| s.subnet_id).ok_or_else(|| Error::Other("CreateSubnet returned no id".into()))
        },
    )
    .await
}

/// One route table for both subnets; the peering step adds the route to the peer.
async fn route_table_up(cx: &Cx, rec: &Recorder<'_>, side: Side, vpc_id: &str) -> Result<Option<String>> {
    let (region, ec2) = (cx.region(side), &cx.regional(side).ec2);
    let r = Res::new(key(cx, side, "route-table"), "route-table", format!("pgdr-{}-private", cx.name()), region);
    ensure(
        cx,
        rec,
        &r,
        async |known| find_route_table(cx, rec, &r, side, known, vpc_id).await,
        async |_| {
            let tags = ec2_tag_spec(cx, ResourceType::RouteTable, "route-table");
            let create = ec2.create_route_table().vpc_id(vpc_id).tag_specifications(tags);
            let out =
                cx.settle(&[vpc_id], &format!("route table in {vpc_id}"), async || Ok(create.clone().send().aws(region).await?)).await?;
            out.route_table.and_then(|r| r.route_table_id).ok_or_else(|| Error::Other("CreateRouteTable returned no id".into()))
        },
    )
    .await
}

/// Both subnets on the route table.
async fn associations_up(cx: &Cx, rec: &Recorder<'_>, side: Side, rt: Option<&str>, subnet_ids: &[String]) -> Result<()> {
    let (region, ec2) = (cx.region(side), &cx.regional(side).ec2);
    let Some(rt) = rt else {
        for sub in SUBNETS {
            rec.record(Change::new(Action::Create, "route-table-association", sub, region));
        }
        return Ok(());
    };
    let table = cx.settle(&[rt], &format!("route table {rt}"), async || Ok(route_table(cx, side, rt).await?)).await?;
    let associated: Vec<String> = table.into_iter().flat_map(|t| t.associations.unwrap_or_default()).filter_map(|a| a.subnet_id).collect();
    let missing = SUBNETS.iter().zip(subnet_ids).filter(|(_, s)| !associated.contains(s));
    futures::future::try_join_all(missing.map(|(name, sub)| async move {
        let change = Change::new(Action::Create, "route-table-association", name, region).detail(format!("{sub} -> {rt}"));
        let associate = ec2.associate_route_table().route_table_id(rt).subnet_id(sub);
        rec.apply(change, async |_| {
            cx.settle(&[rt, sub], &format!("association of {sub} with {rt}"), async || Ok(associate.clone().send().aws(region).await?))
                .await
        })
        .await
    }))
    .await?;
    for name in SUBNETS.iter().skip(subnet_ids.len()) {
        rec.record(Change::new(Action::Create, "route-table-association", name, region));
    }
    Ok(())
}

/// The database security group: 5432 from this VPC and from the peer VPC.
async fn security_group(
    cx: &Cx,
    rec: &Recorder<'_>,
    side: Side,
    vpc_id: &str,
    cidr: crate::config::Cidr,
    peer_cidr: crate::config::Cidr,
) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let ec2 = &reg.ec2;
    let sg_res = Res::new(key(cx, side, "db-sg"), "security-group", format!("pgdr-{}-db", cx.name()), region);
    let sg = ensure(
        cx,
        rec,
        &sg_res,
        async |known| find_sg(cx, side, known, vpc_id).await,
        async |_| {
            let create = ec2
                .create_security_group()
                .group_name(format!("pgdr-{}-db", cx.name()))
                .description("pgdr: PostgreSQL from the two pgdr VPCs")
                .vpc_id(vpc_id)
                .tag_specifications(ec2_tag_spec(cx, ResourceType::SecurityGroup, "db-sg"));
            let out =
                cx.settle(&[vpc_id], &format!("security group in {vpc_id}"), async || Ok(create.clone().send().aws(region).await?)).await?;
            out.group_id.ok_or_else(|| Error::Other("CreateSecurityGroup returned no id".into()))
        },
    )
    .await?;
    client_rules(cx, rec, side, &sg.unwrap_or_default(), cidr, peer_cidr).await
}

/// Puts the database group's client rules back (5432 from both VPCs), as `up` makes them:
/// `switchover` lifts its fence with this.
pub async fn restore_client_rules(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let sg = db_sg_id(cx, side).unwrap_or_default();
    client_rules(cx, rec, side, &sg, cx.cidr(side), cx.cidr(side.other())).await
}

/// The client rules of the database group: 5432 from this VPC's CIDR and from the peer's.
async fn client_rules(
    cx: &Cx,
    rec: &Recorder<'_>,
    side: Side,
    sg_id: &str,
    cidr: crate::config::Cidr,
    peer_cidr: crate::config::Cidr,
) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let ec2 = &reg.ec2;
    // A fenced old primary's group keeps its client rules revoked until `reprotect`.
    let fenced = cx.store.snapshot().topology.fenced.contains_key(region);
    futures::future::try_join_all([("db-sg-rule-local", cidr), ("db-sg-rule-peer", peer_cidr)].into_iter().map(
        |(rule, rule_cidr)| async move {
            if fenced {
                rec.record(
                    Change::new(Action::Keep, "security-group-rule", &format!("5432 from {rule_cidr}"), region)
                        .detail("revoked: fenced by failover"),
                );
                return Ok(());
            }
            let r = Res::new(key(cx, side, rule), "security-group-rule", format!("5432 from {rule_cidr}"), region);
            ensure(
                cx,
                rec,
                &r,
                async |_known| find_rule(cx, side, sg_id, &rule_cidr.to_string()).await,
                async |_| {
                    let authorize = ec2
                        .authorize_security_group_ingress()
                        .group_id(sg_id)
                        .ip_permissions(
                            IpPermission::builder()
                                .ip_protocol("tcp")
                                .from_port(5432)
                                .to_port(5432)
                                .ip_ranges(IpRange::builder().cidr_ip(rule_cidr.to_string()).description(format!("pgdr {rule}")).build())
                                .build(),
                        )
                        .tag_specifications(ec2_tag_spec(cx, ResourceType::SecurityGroupRule, rule));
                    let out =
                        cx.settle(&[sg_id], &format!("rule on {sg_id}"), async || Ok(authorize.clone().send().aws(region).await?)).await?;
                    out.security_group_rules
                        .unwrap_or_default()
                        .into_iter()
                        .find_map(|r| r.security_group_rule_id)
                        .ok_or_else(|| Error::Other("AuthorizeSecurityGroupIngress returned no rule id".into()))
                },
            )
            .await?;
            Ok::<_, Error>(())
        },
    ))
    .await?;
    Ok(())
}

/// The S3 gateway endpoint on the route table (backups and log shipping stay private).
async fn endpoint(cx: &Cx, rec: &Recorder<'_>, side: Side, vpc_id: &str, rt: Option<String>) -> Result<Option<String>> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let ec2 = &reg.ec2;
    let rt_id = rt.clone().unwrap_or_default();
    let ep_res = Res::new(key(cx, side, "s3-endpoint"), "vpc-endpoint", format!("pgdr-{}-s3", cx.name()), region);
    ensure(
        cx,
        rec,
        &ep_res,
        async |known| find_endpoint(cx, rec, &ep_res, side, known).await,
        async |token| {
            let create = ec2
                .create_vpc_endpoint()
                .vpc_id(vpc_id)
                .vpc_endpoint_type(aws_sdk_ec2::types::VpcEndpointType::Gateway)
                .service_name(format!("com.amazonaws.{region}.s3"))
                .route_table_ids(&rt_id)
                .client_token(token)
                .tag_specifications(ec2_tag_spec(cx, ResourceType::VpcEndpoint, "s3-endpoint"));
            let ids = [vpc_id, rt_id.as_str()];
            let out = cx.settle(&ids, &format!("S3 endpoint in {vpc_id}"), async || Ok(create.clone().send().aws(region).await?)).await?;
            out.vpc_endpoint.and_then(|e| e.vpc_endpoint_id).ok_or_else(|| Error::Other("CreateVpcEndpoint returned no id".into()))
        },
    )
    .await?;
    Ok(rt)
}

async fn enable_dns_hostnames(cx: &Cx, side: Side, vpc_id: &str) -> Result<()> {
    let reg = cx.regional(side);
    reg.ec2
        .modify_vpc_attribute()
        .vpc_id(vpc_id)
        .enable_dns_hostnames(AttributeBooleanValue::builder().value(true).build())
        .send()
        .aws(&reg.region)
        .await?;
    Ok(())
}
