//! `agent:<side>`: pgdr's data-plane function in each region's VPC (`pgdr-<env>-agent`).
//!
//! The operator's machine usually cannot reach the private subnets; the agent can. `switchover`
//! and `drill` invoke it to fence the primary (read-only guard, sessions ended), read WAL
//! positions, wait for the replica, and write and count a drill's marker rows
//! (src/lambda/agent.py). One per region because the primary changes regions: the agent that
//! fences is always in the primary's VPC, where its own security group keeps a rule on the
//! database's group that the fence leaves in place (security groups of a peer VPC in another
//! region cannot be referenced, so the other agent could not be told apart from applications).
//!
//! Resources per region: the agent's security group (outbound only), an ingress rule on the
//! database group (TCP 5432 from the agent's group), the role (logs, and the AWS managed policy
//! for VPC network interfaces), the log group, the function. No credential is configured on
//! it: each invocation carries what it needs (see [`crate::agent`]).

use aws_sdk_ec2::types::{IpPermission, ResourceType, UserIdGroupPair};
use futures::future::LocalBoxFuture;

use super::lambda::{self, FunctionSpec};
use super::{ec2_filter, ec2_tag_filters, ec2_tag_spec, network, Res, StepId};
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{Error, Result};
use crate::exec::{Action, Change, Recorder, Step, StepResult};
use crate::read;
use crate::state::Key;

pub const AGENT_SOURCE: &str = include_str!("../lambda/agent.py");

/// The state key owner.
const AGENT: &str = "agent";

/// The agent's Lambda timeout: the longest a drill's marker writer runs in one invocation.
pub const TIMEOUT_S: i32 = 900;

pub struct Agent(pub Side);

/// The function's name (the same in both regions).
pub fn function_name(cx: &Cx) -> String {
    format!("pgdr-{}-agent", cx.name())
}

/// IAM is global: one role per region's function.
fn role_name(cx: &Cx, side: Side) -> String {
    format!("pgdr-{}-agent-{}", cx.name(), cx.region(side))
}

/// The state key of the database group's rule admitting the agent (a fence revokes it with the
/// client rules).
pub(crate) fn db_rule_key(cx: &Cx, side: Side) -> Key {
    key(cx, side, "db-rule")
}

fn key(cx: &Cx, side: Side, what: &str) -> Key {
    if what == "role" {
        Key::new(AGENT, "global", &format!("role-{}", cx.region(side)))
    } else {
        Key::new(AGENT, cx.region(side), what)
    }
}

impl Step<Cx, StepId> for Agent {
    fn id(&self) -> StepId {
        StepId::Agent(self.0)
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
            let name = function_name(cx);
            let vpc = network::vpc_id(cx, self.0).unwrap_or_default();
            let (role, log_group) = (role_name(cx, self.0), format!("/aws/lambda/{name}"));
            let _ = futures::join!(
                find_sg(cx, self.0, &vpc),
                lambda::role_reads(cx, &role, true),
                lambda::function_reads(cx.regional(self.0), &name, &log_group, false),
            );
        })
    }
}

async fn up(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let sg = sg_up(cx, rec, side).await?;
    let (rule, function) = futures::join!(db_rule_up(cx, rec, side, sg.as_deref()), function_up(cx, rec, side, sg.clone()));
    rule.and(function.map(|_| ()))
}

async fn find_sg(cx: &Cx, side: Side, vpc: &str) -> Result<Option<String>> {
    if vpc.is_empty() {
        return Ok(None);
    }
    let reg = cx.regional(side);
    let req = reg.ec2.describe_security_groups().set_filters(Some(ec2_tag_filters(cx, "agent-sg"))).filters(ec2_filter("vpc-id", vpc));
    let out = read!(reg.reads, &reg.region, req)?;
    Ok(out.security_groups.unwrap_or_default().into_iter().find_map(|g| g.group_id))
}

fn sg_res(cx: &Cx, side: Side) -> Res<'_> {
    Res::new(key(cx, side, "sg"), "security-group", format!("pgdr-{}-agent", cx.name()), cx.region(side))
}

async fn sg_up(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<Option<String>> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let vpc = network::vpc_id(cx, side).unwrap_or_default();
    super::ensure(
        cx,
        rec,
        &sg_res(cx, side),
        async |_| find_sg(cx, side, &vpc).await,
        async |_| {
            let create = reg
                .ec2
                .create_security_group()
                .group_name(format!("pgdr-{}-agent", cx.name()))
                .description("pgdr: the data-plane agent (switchover, drill)")
                .vpc_id(&vpc)
                .tag_specifications(ec2_tag_spec(cx, ResourceType::SecurityGroup, "agent-sg"));
            let out = cx
                .settle(&[&vpc], &format!("agent security group in {vpc}"), async || Ok(create.clone().send().aws(region).await?))
                .await?;
            out.group_id.ok_or_else(|| Error::Other("CreateSecurityGroup returned no id".into()))
        },
    )
    .await
}

/// The database group's rule for the agent: 5432 from the agent's group, whatever its tags.
async fn find_db_rule(cx: &Cx, side: Side, db_sg: &str, agent_sg: &str) -> Result<Option<String>> {
    if db_sg.is_empty() || agent_sg.is_empty() {
        return Ok(None);
    }
    let reg = cx.regional(side);
    let out = read!(reg.reads, &reg.region, reg.ec2.describe_security_group_rules().filters(ec2_filter("group-id", db_sg)))?;
    Ok(out.security_group_rules.unwrap_or_default().into_iter().find_map(|r| {
        let from_agent = r.referenced_group_info.as_ref().and_then(|g| g.group_id.as_deref()) == Some(agent_sg);
        (r.is_egress == Some(false) && from_agent && r.from_port == Some(5432)).then_some(r.security_group_rule_id).flatten()
    }))
}

async fn db_rule_up(cx: &Cx, rec: &Recorder<'_>, side: Side, agent_sg: Option<&str>) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let what = format!("5432 from pgdr-{}-agent", cx.name());
    // A primary fenced by a failover keeps every 5432 rule revoked until `reprotect`.
    if cx.store.snapshot().topology.fenced.contains_key(region) {
        rec.record(Change::new(Action::Keep, "security-group-rule", &what, region).detail("revoked: fenced by failover"));
        return Ok(());
    }
    let (Some(db_sg), Some(agent_sg)) = (network::db_sg_id(cx, side), agent_sg) else {
        rec.record(Change::new(Action::Create, "security-group-rule", &what, region));
        return Ok(());
    };
    let r = Res::new(key(cx, side, "db-rule"), "security-group-rule", what, region);
    super::ensure(
        cx,
        rec,
        &r,
        async |_| find_db_rule(cx, side, &db_sg, agent_sg).await,
        async |_| {
            let authorize = reg
                .ec2
                .authorize_security_group_ingress()
                .group_id(&db_sg)
                .ip_permissions(
                    IpPermission::builder()
                        .ip_protocol("tcp")
                        .from_port(5432)
                        .to_port(5432)
                        .user_id_group_pairs(UserIdGroupPair::builder().group_id(agent_sg).description("pgdr agent").build())
                        .build(),
                )
                .tag_specifications(ec2_tag_spec(cx, ResourceType::SecurityGroupRule, "agent-db-rule"));
            let out = cx
                .settle(&[&db_sg, agent_sg], &format!("agent rule on {db_sg}"), async || Ok(authorize.clone().send().aws(region).await?))
                .await?;
            out.security_group_rules
                .unwrap_or_default()
                .into_iter()
                .find_map(|r| r.security_group_rule_id)
                .ok_or_else(|| Error::Other("AuthorizeSecurityGroupIngress returned no rule id".into()))
        },
    )
    .await
    .map(|_| ())
}

fn policy(cx: &Cx, side: Side) -> serde_json::Value {
    let (p, account) = super::failover::partition_account(cx);
    let log_group = format!("arn:{p}:logs:{}:{account}:log-group:/aws/lambda/{}:*", cx.region(side), function_name(cx));
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Logs", "Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents"], "Resource": [log_group]}
        ]
    })
}

fn managed(cx: &Cx) -> Vec<String> {
    let (p, _) = super::failover::partition_account(cx);
    vec![format!("arn:{p}:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole")]
}

async fn function_up(cx: &Cx, rec: &Recorder<'_>, side: Side, sg: Option<String>) -> Result<Option<String>> {
    let reg = cx.regional(side);
    let name = function_name(cx);
    let role = lambda::ensure_role(cx, rec, &key(cx, side, "role"), &role_name(cx, side), &policy(cx, side), &managed(cx)).await?;
    lambda::ensure_log_group(cx, rec, reg, &key(cx, side, "log-group"), &format!("/aws/lambda/{name}")).await?;
    let spec = FunctionSpec {
        name,
        file: "agent.py",
        source: AGENT_SOURCE,
        handler: "agent.handler",
        role_arn: role.unwrap_or_default(),
        timeout_s: TIMEOUT_S,
        env: vec![("PGDR_ENV".into(), cx.name().to_owned())],
        vpc: Some((network::subnet_ids(cx, side).await, sg.into_iter().collect())),
    };
    lambda::ensure_function(cx, rec, reg, &key(cx, side, "function"), &spec).await
}

async fn down(cx: &Cx, rec: &Recorder<'_>, side: Side) -> Result<()> {
    let reg = cx.regional(side);
    let region = reg.region.as_str();
    let name = function_name(cx);
    lambda::delete_function(cx, rec, reg, &key(cx, side, "function"), &name).await?;
    // The function's network interfaces outlive it and hold its security group.
    if !rec.planning() {
        lambda::release_enis(cx, rec, reg, &name).await?;
    }
    lambda::delete_log_group(cx, rec, reg, &key(cx, side, "log-group"), &format!("/aws/lambda/{name}")).await?;
    lambda::delete_role(cx, rec, &key(cx, side, "role"), &role_name(cx, side), &managed(cx)).await?;
    let vpc = network::vpc_id(cx, side).unwrap_or_default();
    let agent_sg = find_sg(cx, side, &vpc).await?;
    // The database group's rule references the agent's group: it goes first.
    if let (Some(db_sg), Some(agent_sg)) = (network::db_sg_id(cx, side), agent_sg.as_deref()) {
        let r = Res::new(key(cx, side, "db-rule"), "security-group-rule", format!("5432 from pgdr-{}-agent", cx.name()), region);
        super::remove(
            cx,
            rec,
            &r,
            async |_| find_db_rule(cx, side, &db_sg, agent_sg).await,
            async |id| match reg.ec2.revoke_security_group_ingress().group_id(&db_sg).security_group_rule_ids(&id).send().aws(region).await
            {
                Ok(_) => Ok(()),
                Err(e) if e.is_not_found() => Ok(()),
                Err(e) => Err(e.into()),
            },
        )
        .await?;
    }
    super::remove(
        cx,
        rec,
        &sg_res(cx, side),
        async |_| find_sg(cx, side, &vpc).await,
        async |id| {
            network::retry_dependency(cx, rec, &format!("security group {id}"), async || {
                match reg.ec2.delete_security_group().group_id(&id).send().aws(region).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.is_not_found() => Ok(()),
                    Err(e) => Err(e.into()),
                }
            })
            .await
        },
    )
    .await
}
