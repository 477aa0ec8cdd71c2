//! The network of one region: a VPC, private isolated subnets in two availability zones, their
//! route table, the database security group (5432 from both VPCs) and an S3 gateway endpoint.
//! No NAT gateway, no internet gateway.

use aws_sdk_ec2::types::{AttributeBooleanValue, IpPermission, IpRange, ResourceType};
use futures::future::LocalBoxFuture;

use super::{ec2_filter, ec2_tag_filters, ec2_tag_spec, ensure, keep_one, remove, Res, StepId};
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{AwsError, Error, Result};
use crate::exec::{Action, Change, Recorder, Step, StepResult};
use crate::read;
use crate::state::Key;
use crate::wait::{self, Look, Pace, Wait};

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

/// Treats "not found" as `None`.
fn absent<T>(r: std::result::Result<T, AwsError>) -> Result<Option<T>> {
    Ok(crate::error::absent(r)?)
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
        Box::pin(down(cx, rec, self.0))
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

async fn dns_hostnames(
    cx: &Cx,
    side: Side,
    vpc_id: &str,
) -> std::result::Result<aws_sdk_ec2::operation::describe_vpc_attribute::DescribeVpcAttributeOutput, AwsError> {
    let reg = cx.regional(side);
    read!(
        reg.reads,
        &reg.region,
        reg.ec2.describe_vpc_attribute().vpc_id(vpc_id).attribute(aws_sdk_ec2::types::VpcAttributeName::EnableDnsHostnames)
    )
}

/// The VPC by its ID (when known and the tags are gone) or by tags.
pub async fn find_vpc(cx: &Cx, side: Side, known: Option<String>) -> Result<Option<String>> {
    Ok(vpcs(cx, side, known).await?.into_iter().next())
}

/// Every VPC carrying this environment's VPC tags (more than one only after a lost answer).
async fn vpcs(cx: &Cx, side: Side, known: Option<String>) -> Result<Vec<String>> {
    let reg = cx.regional(side);
    let out = read!(reg.reads, &reg.region, reg.ec2.describe_vpcs().set_filters(Some(ec2_tag_filters(cx, "vpc"))))?;
    let ids: Vec<String> = out.vpcs.unwrap_or_default().into_iter().filter_map(|v| v.vpc_id).collect();
    match known {
        Some(id) if ids.is_empty() => {
            let out = absent(read!(reg.reads, &reg.region, reg.ec2.describe_vpcs().vpc_ids(id)))?;
            Ok(out.map(|o| o.vpcs.unwrap_or_default().into_iter().filter_map(|v| v.vpc_id).collect()).unwrap_or_default())
        }
        _ => Ok(ids),
    }
}

/// The VPC, duplicates removed.
async fn the_vpc(cx: &Cx, rec: &Recorder<'_>, r: &Res<'_>, side: Side, known: Option<String>) -> Result<Option<String>> {
    let reg = cx.regional(side);
    let ids = vpcs(cx, side, known.clone()).await?;
    keep_one(rec, r, known.as_deref(), ids, async |id| absent(reg.ec2.delete_vpc().vpc_id(&id).send().aws(&reg.region).await).map(|_| ()))
        .await
}

async fn up(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let ec2 = &reg.ec2;
    let cidr = cx.cidr(side);
    let peer_cidr = cx.cidr(side.other());

    // VPC, with DNS support and hostnames (a private hosted zone needs both).
    let vpc_res = Res::new(key(cx, side, "vpc"), "vpc", format!("pgdr-{}", cx.name()), region);
    let vpc = ensure(
        cx,
        rec,
        &vpc_res,
        async |known| the_vpc(cx, rec, &vpc_res, side, known).await,
        async |token| {
            let _ = token; // CreateVpc takes no client token; the intent in state covers it.
            let out = ec2
                .create_vpc()
                .cidr_block(cidr.to_string())
                .tag_specifications(ec2_tag_spec(cx, ResourceType::Vpc, "vpc"))
                .send()
                .aws(region)
                .await?;
            let id = out.vpc.and_then(|v| v.vpc_id).ok_or_else(|| Error::Other("CreateVpc returned no VPC id".into()))?;
            // Part of creating it: a private hosted zone needs DNS hostnames on.
            enable_dns_hostnames(cx, side, &id).await?;
            Ok(id)
        },
    );
    // The zones do not depend on the VPC: read them while it is made.
    let (vpc, azs) = futures::join!(vpc, zones(cx, side));
    let (vpc, azs) = (vpc?, azs?);
    let vpc_id = vpc.clone().unwrap_or_default();
    let vpc_id = &vpc_id;

    // Then four independent chains at once: DNS hostnames, the subnets, the route table and
    // its endpoint, the security group and its rules.
    let hostnames = async {
        if let Some(vpc_id) = &vpc {
            let attr = dns_hostnames(cx, side, vpc_id).await?;
            if !attr.enable_dns_hostnames.and_then(|a| a.value).unwrap_or(false) {
                let change = vpc_res.change(Action::Change).id(vpc_id).detail("enable DNS hostnames");
                rec.apply(change, async |_| enable_dns_hostnames(cx, side, vpc_id).await).await?;
            }
        }
        Ok::<_, Error>(())
    };
    let azs = &azs;
    let subnets = futures::future::try_join_all(SUBNETS.iter().enumerate().map(|(i, name)| async move {
        // Two private subnets in the first two availability zones (by name, so reruns agree).
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
                let out = ec2
                    .create_subnet()
                    .vpc_id(vpc_id)
                    .cidr_block(sub_cidr.to_string())
                    .availability_zone(&az)
                    .tag_specifications(ec2_tag_spec(cx, ResourceType::Subnet, name))
                    .send()
                    .aws(region)
                    .await?;
                out.subnet.and_then(|s| s.subnet_id).ok_or_else(|| Error::Other("CreateSubnet returned no id".into()))
            },
        )
        .await
    }));
    let routes = async {
        // One route table for both subnets; the peering step adds the route to the peer.
        let rt_res = Res::new(key(cx, side, "route-table"), "route-table", format!("pgdr-{}-private", cx.name()), region);
        let rt = ensure(
            cx,
            rec,
            &rt_res,
            async |known| find_route_table(cx, rec, &rt_res, side, known, vpc_id).await,
            async |_| {
                let out = ec2
                    .create_route_table()
                    .vpc_id(vpc_id)
                    .tag_specifications(ec2_tag_spec(cx, ResourceType::RouteTable, "route-table"))
                    .send()
                    .aws(region)
                    .await?;
                out.route_table.and_then(|r| r.route_table_id).ok_or_else(|| Error::Other("CreateRouteTable returned no id".into()))
            },
        )
        .await?;
        endpoint(cx, rec, side, vpc_id, rt).await
    };
    let group = security_group(cx, rec, side, vpc_id, cidr, peer_cidr);
    let (hostnames, subnet_ids, rt, group) = futures::join!(hostnames, subnets, routes, group);
    hostnames?;
    group?;
    let subnet_ids: Vec<String> = subnet_ids?.into_iter().flatten().collect();
    let rt = rt?;

    // Both subnets on the route table.
    if let Some(rt) = &rt {
        let table = route_table(cx, side, rt).await?;
        let associated: Vec<String> =
            table.into_iter().flat_map(|t| t.associations.unwrap_or_default()).filter_map(|a| a.subnet_id).collect();
        futures::future::try_join_all(SUBNETS.iter().zip(&subnet_ids).filter(|(_, s)| !associated.contains(s)).map(
            |(name, sub)| async move {
                let change = Change::new(Action::Create, "route-table-association", name, region).detail(format!("{sub} -> {rt}"));
                rec.apply(change, async |_| Ok(ec2.associate_route_table().route_table_id(rt).subnet_id(sub).send().aws(region).await?))
                    .await?;
                Ok::<_, Error>(())
            },
        ))
        .await?;
        for name in SUBNETS.iter().skip(subnet_ids.len()) {
            rec.record(Change::new(Action::Create, "route-table-association", name, region));
        }
    } else {
        for sub in SUBNETS {
            rec.record(Change::new(Action::Create, "route-table-association", sub, region));
        }
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
            let out = ec2
                .create_security_group()
                .group_name(format!("pgdr-{}-db", cx.name()))
                .description("pgdr: PostgreSQL from the two pgdr VPCs")
                .vpc_id(vpc_id)
                .tag_specifications(ec2_tag_spec(cx, ResourceType::SecurityGroup, "db-sg"))
                .send()
                .aws(region)
                .await?;
            out.group_id.ok_or_else(|| Error::Other("CreateSecurityGroup returned no id".into()))
        },
    )
    .await?;
    let sg_id = sg.unwrap_or_default();
    // A fenced old primary's group keeps its client rules revoked until `reprotect`.
    let fenced = cx.store.snapshot().topology.fenced.contains_key(region);
    let sg_id = &sg_id;
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
                    let out = ec2
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
                        .tag_specifications(ec2_tag_spec(cx, ResourceType::SecurityGroupRule, rule))
                        .send()
                        .aws(region)
                        .await?;
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
            let out = ec2
                .create_vpc_endpoint()
                .vpc_id(vpc_id)
                .vpc_endpoint_type(aws_sdk_ec2::types::VpcEndpointType::Gateway)
                .service_name(format!("com.amazonaws.{region}.s3"))
                .route_table_ids(&rt_id)
                .client_token(token)
                .tag_specifications(ec2_tag_spec(cx, ResourceType::VpcEndpoint, "s3-endpoint"))
                .send()
                .aws(region)
                .await?;
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

/// The first two available availability zones by name; zones of existing subnets win.
async fn zones(cx: &Cx, side: Side) -> Result<Vec<String>> {
    let reg = cx.regional(side);
    let out = read!(
        reg.reads,
        &reg.region,
        reg.ec2
            .describe_availability_zones()
            .filters(ec2_filter("state", "available"))
            .filters(ec2_filter("zone-type", "availability-zone"))
    )?;
    let mut names: Vec<String> = out.availability_zones.unwrap_or_default().into_iter().filter_map(|z| z.zone_name).collect();
    names.sort();
    Ok(names)
}

/// Every subnet carrying the tags of subnet `name` in the VPC (by ID when the tags are gone).
async fn subnets(cx: &Cx, side: Side, name: &str, known: Option<&str>, vpc_id: &str) -> Result<Vec<String>> {
    if vpc_id.is_empty() {
        return Ok(vec![]);
    }
    let reg = cx.regional(side);
    let mut filters = ec2_tag_filters(cx, name);
    filters.push(ec2_filter("vpc-id", vpc_id));
    let out = read!(reg.reads, &reg.region, reg.ec2.describe_subnets().set_filters(Some(filters)))?;
    let mut ids: Vec<String> = out.subnets.unwrap_or_default().into_iter().filter_map(|s| s.subnet_id).collect();
    if let (true, Some(id)) = (ids.is_empty(), known) {
        let out = absent(read!(reg.reads, &reg.region, reg.ec2.describe_subnets().subnet_ids(id)))?;
        ids = out.map(|o| o.subnets.unwrap_or_default().into_iter().filter_map(|s| s.subnet_id).collect()).unwrap_or_default();
    }
    Ok(ids)
}

async fn find_one_subnet(
    cx: &Cx,
    rec: &Recorder<'_>,
    r: &Res<'_>,
    side: Side,
    name: &str,
    known: Option<String>,
    vpc_id: &str,
) -> Result<Option<String>> {
    let reg = cx.regional(side);
    let ids = subnets(cx, side, name, known.as_deref(), vpc_id).await?;
    keep_one(rec, r, known.as_deref(), ids, async |id| {
        absent(reg.ec2.delete_subnet().subnet_id(&id).send().aws(&reg.region).await).map(|_| ())
    })
    .await
}

pub async fn subnet_ids(cx: &Cx, side: Side) -> Vec<String> {
    SUBNETS.iter().filter_map(|s| cx.store.id(&key(cx, side, s))).collect()
}

/// Every route table carrying the environment's tags in the VPC (by ID when the tags are gone).
async fn route_tables(cx: &Cx, side: Side, known: Option<&str>, vpc_id: &str) -> Result<Vec<String>> {
    if vpc_id.is_empty() {
        return Ok(vec![]);
    }
    let reg = cx.regional(side);
    let req = reg.ec2.describe_route_tables().set_filters(Some(ec2_tag_filters(cx, "route-table"))).filters(ec2_filter("vpc-id", vpc_id));
    let out = read!(reg.reads, &reg.region, req)?;
    let mut ids: Vec<String> = out.route_tables.unwrap_or_default().into_iter().filter_map(|t| t.route_table_id).collect();
    if let (true, Some(id)) = (ids.is_empty(), known) {
        let out = absent(route_table(cx, side, id).await)?;
        ids = out.map(|t| t.into_iter().filter_map(|t| t.route_table_id).collect()).unwrap_or_default();
    }
    Ok(ids)
}

/// One route table by ID, with its routes and associations.
pub async fn route_table(cx: &Cx, side: Side, id: &str) -> std::result::Result<Vec<aws_sdk_ec2::types::RouteTable>, AwsError> {
    let reg = cx.regional(side);
    read!(reg.reads, &reg.region, reg.ec2.describe_route_tables().route_table_ids(id)).map(|o| o.route_tables.unwrap_or_default())
}

async fn find_route_table(
    cx: &Cx,
    rec: &Recorder<'_>,
    r: &Res<'_>,
    side: Side,
    known: Option<String>,
    vpc_id: &str,
) -> Result<Option<String>> {
    let reg = cx.regional(side);
    let ids = route_tables(cx, side, known.as_deref(), vpc_id).await?;
    keep_one(rec, r, known.as_deref(), ids, async |id| {
        absent(reg.ec2.delete_route_table().route_table_id(&id).send().aws(&reg.region).await).map(|_| ())
    })
    .await
}

async fn find_sg(cx: &Cx, side: Side, known: Option<String>, vpc_id: &str) -> Result<Option<String>> {
    if vpc_id.is_empty() {
        return Ok(None);
    }
    let reg = cx.regional(side);
    let req = match known {
        Some(id) => reg.ec2.describe_security_groups().group_ids(id),
        None => reg.ec2.describe_security_groups().set_filters(Some(ec2_tag_filters(cx, "db-sg"))).filters(ec2_filter("vpc-id", vpc_id)),
    };
    let out = absent(read!(reg.reads, &reg.region, req))?;
    Ok(out.and_then(|o| o.security_groups.unwrap_or_default().into_iter().find_map(|g| g.group_id)))
}

/// The ingress rule for 5432 from `cidr` in group `sg`, whatever its tags.
pub async fn find_rule(cx: &Cx, side: Side, sg: &str, cidr: &str) -> Result<Option<String>> {
    if sg.is_empty() {
        return Ok(None);
    }
    let reg = cx.regional(side);
    let out = absent(read!(reg.reads, &reg.region, reg.ec2.describe_security_group_rules().filters(ec2_filter("group-id", sg))))?;
    Ok(out.and_then(|o| {
        o.security_group_rules.unwrap_or_default().into_iter().find_map(|r| {
            (r.is_egress == Some(false) && r.from_port == Some(5432) && r.to_port == Some(5432) && r.cidr_ipv4.as_deref() == Some(cidr))
                .then_some(r.security_group_rule_id)
                .flatten()
        })
    }))
}

async fn endpoints(cx: &Cx, side: Side, known: Option<String>) -> Result<Vec<String>> {
    let reg = cx.regional(side);
    let live = |o: aws_sdk_ec2::operation::describe_vpc_endpoints::DescribeVpcEndpointsOutput| -> Vec<String> {
        o.vpc_endpoints
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| {
                // The emulator answers states in lower case, which decode as Unknown("...").
                let state = e.state.as_ref().map(|s| s.as_str().to_ascii_lowercase()).unwrap_or_default();
                (!matches!(state.as_str(), "deleted" | "deleting" | "failed" | "rejected" | "expired"))
                    .then_some(e.vpc_endpoint_id)
                    .flatten()
            })
            .collect()
    };
    let out = read!(reg.reads, &reg.region, reg.ec2.describe_vpc_endpoints().set_filters(Some(ec2_tag_filters(cx, "s3-endpoint"))))?;
    let ids = live(out);
    match known {
        Some(id) if ids.is_empty() => {
            Ok(absent(read!(reg.reads, &reg.region, reg.ec2.describe_vpc_endpoints().vpc_endpoint_ids(id)))?.map(live).unwrap_or_default())
        }
        _ => Ok(ids),
    }
}

async fn find_endpoint(cx: &Cx, rec: &Recorder<'_>, r: &Res<'_>, side: Side, known: Option<String>) -> Result<Option<String>> {
    let ids = endpoints(cx, side, known.clone()).await?;
    keep_one(rec, r, known.as_deref(), ids, async |id| delete_endpoint(cx, side, &id).await).await
}

/// Deletes an endpoint; only its own not-found counts as done (a route error is an error).
async fn delete_endpoint(cx: &Cx, side: Side, id: &str) -> Result<()> {
    let reg = cx.regional(side);
    match reg.ec2.delete_vpc_endpoints().vpc_endpoint_ids(id).send().aws(&reg.region).await {
        Ok(out) => match out.unsuccessful().iter().find(|u| u.resource_id() == Some(id)) {
            Some(u) if !u.error().is_some_and(|e| crate::aws::is_not_found("ec2", e.code(), e.message())) => Err(Error::failed(format!(
                "DeleteVpcEndpoints refused {id}: {}",
                u.error().and_then(|e| e.message()).unwrap_or("no reason given")
            ))),
            _ => Ok(()),
        },
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the region's network, waiting for each deletion so nothing blocks the VPC's.
async fn down(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let ec2 = &reg.ec2;
    let vpc_id = cx.store.id(&key(cx, side, "vpc"));
    let vpc_id = match vpc_id {
        Some(v) => find_vpc(cx, side, Some(v)).await?,
        None => find_vpc(cx, side, None).await?,
    }
    .unwrap_or_default();

    let ep = Res::new(key(cx, side, "s3-endpoint"), "vpc-endpoint", format!("pgdr-{}-s3", cx.name()), region);
    remove(
        cx,
        rec,
        &ep,
        async |known| find_endpoint(cx, rec, &ep, side, known).await,
        async |id| {
            delete_endpoint(cx, side, &id).await?;
            Wait::new(&format!("VPC endpoint {id}"))
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
    .await?;

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
        async |known| find_sg(cx, side, known, &vpc_id).await,
        async |id| {
            // Lambda ENIs can hold a group for minutes after their function is gone.
            retry_dependency(cx, rec, &format!("security group {id}"), async || {
                absent(ec2.delete_security_group().group_id(&id).send().aws(region).await).map(|_| ())
            })
            .await
        },
    )
    .await?;

    for name in SUBNETS {
        let r = Res::new(key(cx, side, name), "subnet", format!("pgdr-{}-{name}", cx.name()), region);
        remove(
            cx,
            rec,
            &r,
            async |known| find_one_subnet(cx, rec, &r, side, name, known, &vpc_id).await,
            async |id| {
                retry_dependency(cx, rec, &format!("subnet {id}"), async || {
                    absent(ec2.delete_subnet().subnet_id(&id).send().aws(region).await).map(|_| ())
                })
                .await
            },
        )
        .await?;
    }

    let rt = Res::new(key(cx, side, "route-table"), "route-table", format!("pgdr-{}-private", cx.name()), region);
    remove(
        cx,
        rec,
        &rt,
        async |known| find_route_table(cx, rec, &rt, side, known, &vpc_id).await,
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
    .await?;

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
    .await?;
    Ok(())
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
