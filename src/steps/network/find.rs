//! Finding a region's network resources: by their tags, else by the ID state knows.

use super::{key, SUBNETS};
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{AwsError, Error, Result};
use crate::exec::Recorder;
use crate::read;
use crate::steps::{ec2_filter, ec2_tag_filters, keep_one, Res};

/// Treats "not found" as `None`.
pub(super) fn absent<T>(r: std::result::Result<T, AwsError>) -> Result<Option<T>> {
    Ok(crate::error::absent(r)?)
}

pub(super) async fn dns_hostnames(
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
pub(super) async fn vpcs(cx: &Cx, side: Side, known: Option<String>) -> Result<Vec<String>> {
    let reg = cx.regional(side);
    let ids_of = |o: aws_sdk_ec2::operation::describe_vpcs::DescribeVpcsOutput| -> Vec<String> {
        o.vpcs.unwrap_or_default().into_iter().filter_map(|v| v.vpc_id).collect()
    };
    let tagged = read!(reg.reads, &reg.region, reg.ec2.describe_vpcs().set_filters(Some(ec2_tag_filters(cx, "vpc")))).map(ids_of);
    tagged_else_known(tagged, known.as_deref(), async |id| read!(reg.reads, &reg.region, reg.ec2.describe_vpcs().vpc_ids(id)).map(ids_of))
        .await
}

/// The resources found by their tags; when none carries them (tags removed by hand), the one
/// whose ID state knows, if AWS still has it. The one way every network lookup finds its resource.
pub(super) async fn tagged_else_known(
    tagged: std::result::Result<Vec<String>, AwsError>,
    known: Option<&str>,
    by_id: impl AsyncFnOnce(&str) -> std::result::Result<Vec<String>, AwsError>,
) -> Result<Vec<String>> {
    let ids = tagged?;
    match known {
        Some(id) if ids.is_empty() => Ok(absent(by_id(id).await)?.unwrap_or_default()),
        _ => Ok(ids),
    }
}

/// The VPC, duplicates removed.
pub(super) async fn the_vpc(cx: &Cx, rec: &Recorder<'_>, r: &Res<'_>, side: Side, known: Option<String>) -> Result<Option<String>> {
    let reg = cx.regional(side);
    let ids = vpcs(cx, side, known.clone()).await?;
    keep_one(rec, r, known.as_deref(), ids, async |id| absent(reg.ec2.delete_vpc().vpc_id(&id).send().aws(&reg.region).await).map(|_| ()))
        .await
}

/// The first two available availability zones by name; zones of existing subnets win.
pub(super) async fn zones(cx: &Cx, side: Side) -> Result<Vec<String>> {
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
pub(super) async fn subnets(cx: &Cx, side: Side, name: &str, known: Option<&str>, vpc_id: &str) -> Result<Vec<String>> {
    if vpc_id.is_empty() {
        return Ok(vec![]);
    }
    let reg = cx.regional(side);
    let ids_of = |o: aws_sdk_ec2::operation::describe_subnets::DescribeSubnetsOutput| -> Vec<String> {
        o.subnets.unwrap_or_default().into_iter().filter_map(|s| s.subnet_id).collect()
    };
    let mut filters = ec2_tag_filters(cx, name);
    filters.push(ec2_filter("vpc-id", vpc_id));
    let tagged = read!(reg.reads, &reg.region, reg.ec2.describe_subnets().set_filters(Some(filters))).map(ids_of);
    tagged_else_known(tagged, known, async |id| read!(reg.reads, &reg.region, reg.ec2.describe_subnets().subnet_ids(id)).map(ids_of)).await
}

pub(super) async fn find_one_subnet(
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
pub(super) async fn route_tables(cx: &Cx, side: Side, known: Option<&str>, vpc_id: &str) -> Result<Vec<String>> {
    if vpc_id.is_empty() {
        return Ok(vec![]);
    }
    let reg = cx.regional(side);
    let ids_of = |t: Vec<aws_sdk_ec2::types::RouteTable>| -> Vec<String> { t.into_iter().filter_map(|t| t.route_table_id).collect() };
    let req = reg.ec2.describe_route_tables().set_filters(Some(ec2_tag_filters(cx, "route-table"))).filters(ec2_filter("vpc-id", vpc_id));
    let tagged = read!(reg.reads, &reg.region, req).map(|o| ids_of(o.route_tables.unwrap_or_default()));
    tagged_else_known(tagged, known, async |id| route_table(cx, side, id).await.map(ids_of)).await
}

/// One route table by ID, with its routes and associations.
pub async fn route_table(cx: &Cx, side: Side, id: &str) -> std::result::Result<Vec<aws_sdk_ec2::types::RouteTable>, AwsError> {
    let reg = cx.regional(side);
    read!(reg.reads, &reg.region, reg.ec2.describe_route_tables().route_table_ids(id)).map(|o| o.route_tables.unwrap_or_default())
}

pub(super) async fn find_route_table(
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

pub(super) async fn find_sg(cx: &Cx, side: Side, known: Option<String>, vpc_id: &str) -> Result<Option<String>> {
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

pub(super) async fn endpoints(cx: &Cx, side: Side, known: Option<String>) -> Result<Vec<String>> {
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
    let tagged =
        read!(reg.reads, &reg.region, reg.ec2.describe_vpc_endpoints().set_filters(Some(ec2_tag_filters(cx, "s3-endpoint")))).map(live);
    tagged_else_known(tagged, known.as_deref(), async |id| {
        read!(reg.reads, &reg.region, reg.ec2.describe_vpc_endpoints().vpc_endpoint_ids(id)).map(live)
    })
    .await
}

pub(super) async fn find_endpoint(cx: &Cx, rec: &Recorder<'_>, r: &Res<'_>, side: Side, known: Option<String>) -> Result<Option<String>> {
    let ids = endpoints(cx, side, known.clone()).await?;
    keep_one(rec, r, known.as_deref(), ids, async |id| delete_endpoint(cx, side, &id).await).await
}

/// Deletes an endpoint; only its own not-found counts as done (a route error is an error).
pub(super) async fn delete_endpoint(cx: &Cx, side: Side, id: &str) -> Result<()> {
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
