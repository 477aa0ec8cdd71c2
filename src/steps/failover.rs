//! Automated failover that survives the loss of the primary region. Everything here lives in the
//! DR region (or is global):
//!
//! - `failover`: the failover function (not in a VPC: it only calls AWS APIs), its role with
//!   ARN-scoped permissions, its log group, and the permission for the alarm to invoke it.
//! - `detection`: a probe function in the DR VPC that opens a TCP connection to the primary every
//!   minute (EventBridge schedule); the alarm `pgdr-<env>-primary-down` on its errors (missing
//!   data breaching), which invokes the failover function and notifies the DR topic; and a
//!   Route 53 health check of type CLOUDWATCH_METRIC that follows the alarm, so that DNS moves
//!   to the replica even while the Route 53 control plane is unreachable.

use aws_sdk_cloudwatch::types::{ComparisonOperator, Dimension, MetricAlarm, Statistic};
use aws_sdk_ec2::types::ResourceType;
use futures::future::LocalBoxFuture;

use super::healthcheck::{self, delete_health_check, list_health_checks, the_health_check};
use super::instance;
use super::lambda::{self, FunctionSpec};
use super::{alarms, dns, ec2_tag_filters, ec2_tag_spec, network, Res, StepId};
use crate::aws::Call;
use crate::cx::{Cx, Side};
use crate::error::{AwsError, Error, Result};
use crate::exec::{Action, Change, Recorder, Step, StepResult};
use crate::read;
use crate::state::{Attr, Key};

/// State key owners: the failover machinery and the detection machinery.
const FAILOVER: &str = "failover";
const DETECTION: &str = "detection";

pub struct Failover;
pub struct Detection;

pub fn failover_name(cx: &Cx) -> String {
    format!("pgdr-{}-failover", cx.name())
}

pub fn probe_name(cx: &Cx) -> String {
    format!("pgdr-{}-probe", cx.name())
}

pub fn alarm_name(cx: &Cx) -> String {
    format!("pgdr-{}-primary-down", cx.name())
}

/// The alarm the writer record's health check follows: in ALARM only once the replica has been
/// promoted (the failover function reports it every minute), so DNS never sends writers to an
/// instance that is still read-only, whatever breaks on the probe's path.
pub fn promoted_alarm_name(cx: &Cx) -> String {
    format!("pgdr-{}-replica-promoted", cx.name())
}

/// What the failover function publishes (see src/lambda/failover.py).
const PROMOTED_NAMESPACE: &str = "pgdr";
const PROMOTED_METRIC: &str = "ReplicaPromoted";

fn key(cx: &Cx, owner: &str, what: &str) -> Key {
    let region = if what.starts_with("role") { "global" } else { cx.region(Side::Dr) };
    Key::new(owner, region, what)
}

impl Step<Cx, StepId> for Failover {
    fn id(&self) -> StepId {
        StepId::Failover
    }
    fn deps(&self) -> Vec<StepId> {
        // Not the replica: its identifier and ARN are known before it is available, and the
        // function, role and alarm can be ready while it is still being created.
        vec![StepId::Zone, StepId::Primary, StepId::Topics]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(failover_up(cx, rec))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(failover_down(cx, rec))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let name = failover_name(cx);
            let log_group = format!("/aws/lambda/{name}");
            let resume = resume_schedule(cx);
            futures::join!(
                lambda::role_reads(cx, &name, false),
                lambda::function_reads(cx.regional(Side::Dr), &name, &log_group, true),
                schedule_reads(cx, &resume),
            );
        })
    }
}

impl Step<Cx, StepId> for Detection {
    fn id(&self) -> StepId {
        StepId::Detection
    }
    fn deps(&self) -> Vec<StepId> {
        vec![StepId::Failover, StepId::Network(Side::Dr), StepId::Peering, StepId::Primary]
    }
    fn up<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(detection_up(cx, rec))
    }
    fn down<'a>(&'a self, cx: &'a Cx, rec: &'a Recorder<'a>) -> LocalBoxFuture<'a, StepResult> {
        Box::pin(detection_down(cx, rec))
    }
    fn reads<'a>(&'a self, cx: &'a Cx) -> LocalBoxFuture<'a, ()> {
        Box::pin(async move {
            let probe = probe_name(cx);
            let log_group = format!("/aws/lambda/{probe}");
            let schedule = probe_schedule(cx);
            let vpc = network::vpc_id(cx, Side::Dr).unwrap_or_default();
            let _ = futures::join!(
                find_probe_sg(cx, &vpc),
                lambda::role_reads(cx, &probe, !probe_managed(cx).is_empty()),
                lambda::function_reads(cx.regional(Side::Dr), &probe, &log_group, true),
                schedule_reads(cx, &schedule),
                describe_alarm(cx),
                async {
                    let dr = cx.regional(Side::Dr);
                    read!(dr.reads, &dr.region, dr.cloudwatch.describe_alarms().alarm_names(promoted_alarm_name(cx)))
                },
                list_health_checks(cx),
            );
        })
    }
}

async fn describe_rule(
    cx: &Cx,
    rule: &str,
) -> std::result::Result<aws_sdk_eventbridge::operation::describe_rule::DescribeRuleOutput, AwsError> {
    let dr = cx.regional(Side::Dr);
    read!(dr.reads, &dr.region, dr.events.describe_rule().name(rule))
}

async fn list_targets(
    cx: &Cx,
    rule: &str,
) -> std::result::Result<aws_sdk_eventbridge::operation::list_targets_by_rule::ListTargetsByRuleOutput, AwsError> {
    let dr = cx.regional(Side::Dr);
    read!(dr.reads, &dr.region, dr.events.list_targets_by_rule().rule(rule))
}

/// An EventBridge schedule (every minute) that invokes one of pgdr's functions.
struct Schedule {
    /// State key of the rule.
    key: Key,
    rule: String,
    /// What it is for, in the rule's description.
    purpose: &'static str,
    target_id: &'static str,
    /// The event the function receives (EventBridge's own event when `None`).
    input: Option<&'static str>,
    /// Statement ID of the function's permission for the rule.
    sid: &'static str,
}

fn probe_schedule(cx: &Cx) -> Schedule {
    Schedule {
        key: key(cx, DETECTION, "schedule"),
        rule: probe_rule(cx),
        purpose: "probe the primary",
        target_id: "probe",
        input: None,
        sid: "pgdr-schedule",
    }
}

/// The alarm invokes the failover function once per change of state; this retries, every
/// minute, a failover that could not finish (the function acts only while the alarm is in
/// ALARM or the replica is promoted).
fn resume_schedule(cx: &Cx) -> Schedule {
    Schedule {
        key: key(cx, FAILOVER, "resume"),
        rule: format!("pgdr-{}-failover-resume", cx.name()),
        purpose: "finish a failover the primary-down alarm asked for",
        target_id: "failover",
        input: Some(r#"{"action":"resume"}"#),
        sid: "pgdr-resume",
    }
}

async fn schedule_reads(cx: &Cx, s: &Schedule) {
    let _ = futures::join!(describe_rule(cx, &s.rule), list_targets(cx, &s.rule));
}

/// The rule, its one target (the function, with the schedule's input) and the function's
/// permission for it.
async fn ensure_schedule(cx: &Cx, rec: &Recorder<'_>, s: &Schedule, function: &str, function_arn: Option<&str>) -> Result<()> {
    let dr = cx.regional(Side::Dr);
    let region = dr.region.as_str();
    let rule = &s.rule;
    let rule_res = Res::new(s.key.clone(), "eventbridge-rule", rule.clone(), region);
    let rule_arn = super::ensure(
        cx,
        rec,
        &rule_res,
        async |_| match describe_rule(cx, rule).await {
            Ok(o) => Ok(o.arn),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        },
        async |_| {
            let tags = cx
                .tags("eventbridge-rule")
                .into_iter()
                .filter_map(|(k, v)| aws_sdk_eventbridge::types::Tag::builder().key(k).value(v).build().ok())
                .collect();
            let out = dr
                .events
                .put_rule()
                .name(rule)
                .schedule_expression("rate(1 minute)")
                .state(aws_sdk_eventbridge::types::RuleState::Enabled)
                .description(format!("pgdr {}: {}", cx.name(), s.purpose))
                .set_tags(Some(tags))
                .send()
                .aws(region)
                .await?;
            out.rule_arn.ok_or_else(|| Error::Other("PutRule returned no ARN".into()))
        },
    )
    .await?;
    let (Some(function_arn), Some(rule_arn)) = (function_arn, &rule_arn) else {
        rec.record(Change::new(Action::Create, "eventbridge-target", &format!("{rule} -> {function}"), region));
        return Ok(());
    };
    let targets = list_targets(cx, rule).await?;
    if !targets.targets().iter().any(|t| t.arn() == function_arn && t.input() == s.input) {
        let t = aws_sdk_eventbridge::types::Target::builder()
            .id(s.target_id)
            .arn(function_arn)
            .set_input(s.input.map(str::to_owned))
            .build()
            .map_err(|e| Error::Other(e.to_string()))?;
        let change = Change::new(Action::Create, "eventbridge-target", &format!("{rule} -> {function}"), region);
        rec.apply(change, async |_| Ok(dr.events.put_targets().rule(rule).targets(t).send().aws(region).await?)).await?;
    }
    lambda::ensure_permission(cx, rec, dr, function, s.sid, "events.amazonaws.com", rule_arn).await
}

/// Removes a schedule: its targets first (a rule with targets cannot be deleted), then the rule.
async fn delete_schedule(cx: &Cx, rec: &Recorder<'_>, s: &Schedule) -> Result<()> {
    let dr = cx.regional(Side::Dr);
    let region = dr.region.as_str();
    let r = Res::new(s.key.clone(), "eventbridge-rule", s.rule.clone(), region);
    super::remove(
        cx,
        rec,
        &r,
        async |_| match dr.events.describe_rule().name(&s.rule).send().aws(region).await {
            Ok(o) => Ok(o.name),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        },
        async |name| {
            let targets = dr.events.list_targets_by_rule().rule(&name).send().aws(region).await?;
            let ids: Vec<String> = targets.targets().iter().map(|t| t.id().to_owned()).collect();
            if !ids.is_empty() {
                dr.events.remove_targets().rule(&name).set_ids(Some(ids)).send().aws(region).await?;
            }
            dr.events.delete_rule().name(&name).send().aws(region).await?;
            Ok(())
        },
    )
    .await
}

pub async fn describe_alarm(
    cx: &Cx,
) -> std::result::Result<aws_sdk_cloudwatch::operation::describe_alarms::DescribeAlarmsOutput, AwsError> {
    let dr = cx.regional(Side::Dr);
    read!(dr.reads, &dr.region, dr.cloudwatch.describe_alarms().alarm_names(alarm_name(cx)))
}

/// Partition and account, read from the primary's ARN (no extra call).
/// The partition and account the run's resources are in: from the caller STS named, else from
/// the primary instance's ARN; ("aws", "*") only when neither is known (a policy written with
/// "*" would change on the next run, so the caller comes first: it is known from the start).
pub(crate) fn partition_account(cx: &Cx) -> (String, String) {
    cx.clients
        .caller_arn
        .as_deref()
        .and_then(lambda::partition_account)
        .or_else(|| cx.store.attr(&instance::instance_key(cx, Side::Primary), Attr::Arn).and_then(|a| lambda::partition_account(&a)))
        .unwrap_or_else(|| ("aws".into(), "*".into()))
}

fn log_group_arn(cx: &Cx, function: &str) -> String {
    let (p, a) = partition_account(cx);
    format!("arn:{p}:logs:{}:{a}:log-group:/aws/lambda/{function}:*", cx.region(Side::Dr))
}

fn topic_arn(cx: &Cx) -> String {
    alarms::topic_arn(cx, Side::Dr).unwrap_or_default()
}

/// An instance's ARN: recorded, or (for the replica still being created) derived from the
/// primary's, so that this step need not wait for the replica.
fn instance_arn(cx: &Cx, side: Side) -> String {
    instance::recorded(cx, side, Attr::Arn).unwrap_or_else(|| {
        let (p, a) = partition_account(cx);
        format!("arn:{p}:rds:{}:{a}:db:{}", cx.region(side), instance::instance_id(cx, side))
    })
}

/// The failover function's permissions: exactly the two instances, the zone, the topic and its
/// own log group.
fn failover_policy(cx: &Cx) -> serde_json::Value {
    let (p, _) = partition_account(cx);
    let zone = dns::zone_id(cx).unwrap_or_default();
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Databases", "Effect": "Allow",
             "Action": ["rds:DescribeDBInstances", "rds:PromoteReadReplica", "rds:ListTagsForResource", "rds:AddTagsToResource", "rds:RebootDBInstance"],
             "Resource": [instance_arn(cx, Side::Primary), instance_arn(cx, Side::Dr)]},
            {"Sid": "FenceRules", "Effect": "Allow", "Action": ["ec2:RevokeSecurityGroupIngress"],
             "Resource": [format!("arn:{p}:ec2:{}:{}:security-group/{}", cx.region(Side::Primary), partition_account(cx).1, network::db_sg_id(cx, Side::Primary).unwrap_or_else(|| "*".into()))]},
            // Describe calls take no resource-level permissions (EC2 API reference).
            {"Sid": "FenceLook", "Effect": "Allow", "Action": ["ec2:DescribeSecurityGroupRules"], "Resource": ["*"]},
            {"Sid": "PromotedMetric", "Effect": "Allow", "Action": ["cloudwatch:PutMetricData"], "Resource": ["*"],
             "Condition": {"StringEquals": {"cloudwatch:namespace": PROMOTED_NAMESPACE}}},
            {"Sid": "Records", "Effect": "Allow",
             "Action": ["route53:ChangeResourceRecordSets", "route53:ListResourceRecordSets"],
             "Resource": [format!("arn:{p}:route53:::hostedzone/{zone}")]},
            {"Sid": "ChangeStatus", "Effect": "Allow", "Action": ["route53:GetChange"], "Resource": [format!("arn:{p}:route53:::change/*")]},
            {"Sid": "Notify", "Effect": "Allow", "Action": ["sns:Publish"], "Resource": [topic_arn(cx)]},
            {"Sid": "Alarm", "Effect": "Allow", "Action": ["cloudwatch:DescribeAlarms"],
             "Resource": [format!("arn:{p}:cloudwatch:{}:{}:alarm:{}", cx.region(Side::Dr), partition_account(cx).1, alarm_name(cx))]},
            {"Sid": "Logs", "Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents"], "Resource": [log_group_arn(cx, &failover_name(cx))]}
        ]
    })
}

fn probe_policy(cx: &Cx) -> serde_json::Value {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Logs", "Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents"], "Resource": [log_group_arn(cx, &probe_name(cx))]}
        ]
    })
}

/// The probe needs ENIs in the VPC: the AWS managed policy for exactly that.
fn probe_managed(cx: &Cx) -> Vec<String> {
    let (p, _) = partition_account(cx);
    vec![format!("arn:{p}:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole")]
}

/// The function protects the pair as it was set up (not the current writer): after a failover
/// it finds the replica promoted and keeps DNS on it; it never points DNS back.
fn failover_env(cx: &Cx) -> Vec<(String, String)> {
    let writer = Side::Primary;
    let reader = Side::Dr;
    vec![
        ("PGDR_ENV".into(), cx.name().into()),
        ("PRIMARY_REGION".into(), cx.region(writer).into()),
        ("PRIMARY_DB_ID".into(), instance::instance_id(cx, writer)),
        ("DR_REGION".into(), cx.region(reader).into()),
        ("REPLICA_DB_ID".into(), instance::instance_id(cx, reader)),
        ("HOSTED_ZONE_ID".into(), dns::zone_id(cx).unwrap_or_default()),
        ("RECORD_NAME".into(), dns::writer_record(cx)),
        ("PRIMARY_SET_ID".into(), cx.region(writer).into()),
        ("REPLICA_SET_ID".into(), cx.region(reader).into()),
        ("RECORD_TTL".into(), cx.env.settings.record_ttl.to_string()),
        ("TOPIC_ARN".into(), topic_arn(cx)),
        ("ALARM_NAME".into(), alarm_name(cx)),
        // The old primary's security group, which the function's fence revokes.
        ("PRIMARY_SG_ID".into(), network::db_sg_id(cx, writer).unwrap_or_default()),
    ]
}

async fn failover_up(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let dr = cx.regional(Side::Dr);
    let name = failover_name(cx);
    let role = lambda::ensure_role(cx, rec, &key(cx, FAILOVER, "role"), &name, &failover_policy(cx), &[]).await?;
    lambda::ensure_log_group(cx, rec, dr, &key(cx, FAILOVER, "log-group"), &format!("/aws/lambda/{name}")).await?;
    let spec = FunctionSpec {
        name: name.clone(),
        file: "failover.py",
        source: lambda::FAILOVER_SOURCE,
        handler: "failover.handler",
        role_arn: role.unwrap_or_default(),
        // Promotion takes minutes: the function waits for it, within its own timeout.
        timeout_s: 900,
        env: failover_env(cx),
        vpc: None,
    };
    let arn = lambda::ensure_function(cx, rec, dr, &key(cx, FAILOVER, "function"), &spec).await?;
    if let Some(arn) = &arn {
        cx.store.update(|s| {
            if let Some(r) = s.resources.get_mut(&key(cx, FAILOVER, "function")) {
                r.set(Attr::Arn, arn.clone());
            }
        })?;
        let (p, a) = partition_account(cx);
        let alarm = format!("arn:{p}:cloudwatch:{}:{a}:alarm:{}", dr.region, alarm_name(cx));
        lambda::ensure_permission(cx, rec, dr, &name, "pgdr-primary-down-alarm", "lambda.alarms.cloudwatch.amazonaws.com", &alarm).await?;
    }
    ensure_schedule(cx, rec, &resume_schedule(cx), &name, arn.as_deref()).await
}

async fn failover_down(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let dr = cx.regional(Side::Dr);
    let name = failover_name(cx);
    delete_schedule(cx, rec, &resume_schedule(cx)).await?;
    lambda::delete_function(cx, rec, dr, &key(cx, FAILOVER, "function"), &name).await?;
    lambda::delete_log_group(cx, rec, dr, &key(cx, FAILOVER, "log-group"), &format!("/aws/lambda/{name}")).await?;
    lambda::delete_role(cx, rec, &key(cx, FAILOVER, "role"), &name, &[]).await
}

async fn find_probe_sg(cx: &Cx, vpc: &str) -> Result<Option<String>> {
    if vpc.is_empty() {
        return Ok(None);
    }
    let dr = cx.regional(Side::Dr);
    let out = read!(
        dr.reads,
        &dr.region,
        dr.ec2.describe_security_groups().set_filters(Some(ec2_tag_filters(cx, "probe-sg"))).filters(super::ec2_filter("vpc-id", vpc))
    )?;
    Ok(out.security_groups.unwrap_or_default().into_iter().find_map(|g| g.group_id))
}

fn probe_rule(cx: &Cx) -> String {
    format!("pgdr-{}-probe-every-minute", cx.name())
}

async fn detection_up(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let sg = probe_sg_up(cx, rec).await?;
    let probe_arn = probe_up(cx, rec, sg).await?;
    // Every minute.
    ensure_schedule(cx, rec, &probe_schedule(cx), &probe_name(cx), probe_arn.as_deref()).await?;
    primary_down_alarm_up(cx, rec).await?;
    promoted_alarm_up(cx, rec).await?;
    // The health check of the writer record follows the promotion, not the probe (Route 53
    // cannot reach a private endpoint itself; its health checkers read the alarm's state, on
    // Route 53's data plane, so this works while its control plane in us-east-1 is down).
    healthcheck::ensure(cx, rec, &promoted_alarm_name(cx), cx.region(Side::Dr)).await
}

/// `replica-promoted`: `ReplicaPromoted` ≥ 1 in the last minute. Missing data keeps the state it
/// has (`ignore`): a function that misses a minute must not move writers back and forth.
async fn promoted_alarm_up(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let dr = cx.regional(Side::Dr);
    let current = read!(dr.reads, &dr.region, dr.cloudwatch.describe_alarms().alarm_names(promoted_alarm_name(cx)))?;
    let wanted = MetricAlarm::builder()
        .alarm_name(promoted_alarm_name(cx))
        .alarm_description(format!(
            "pgdr {}: the replica in {} has been promoted; the writer record's health check follows this alarm",
            cx.name(),
            dr.region
        ))
        .namespace(PROMOTED_NAMESPACE)
        .metric_name(PROMOTED_METRIC)
        .dimensions(Dimension::builder().name("Environment").value(cx.name()).build())
        .statistic(Statistic::Maximum)
        .period(60)
        .evaluation_periods(1)
        .datapoints_to_alarm(1)
        .threshold(1.0)
        .comparison_operator(ComparisonOperator::GreaterThanOrEqualToThreshold)
        .treat_missing_data("ignore")
        .alarm_actions(topic_arn(cx))
        .build();
    alarm_in_place(cx, rec, "promoted-alarm", current.metric_alarms.unwrap_or_default().into_iter().next(), wanted).await
}

/// The probe's security group in the DR VPC (outbound only; the primary's group admits the
/// DR VPC's CIDR on 5432 over the peering).
async fn probe_sg_up(cx: &Cx, rec: &Recorder<'_>) -> Result<Option<String>> {
    let dr = cx.regional(Side::Dr);
    let region = dr.region.as_str();
    let vpc = network::vpc_id(cx, Side::Dr).unwrap_or_default();
    let sg_res = Res::new(key(cx, DETECTION, "probe-sg"), "security-group", format!("pgdr-{}-probe", cx.name()), region);
    super::ensure(
        cx,
        rec,
        &sg_res,
        async |_| find_probe_sg(cx, &vpc).await,
        async |_| {
            let create = dr
                .ec2
                .create_security_group()
                .group_name(format!("pgdr-{}-probe", cx.name()))
                .description("pgdr: the primary-health probe")
                .vpc_id(&vpc)
                .tag_specifications(ec2_tag_spec(cx, ResourceType::SecurityGroup, "probe-sg"));
            let out = cx
                .settle(&[&vpc], &format!("probe security group in {vpc}"), async || Ok(create.clone().send().aws(region).await?))
                .await?;
            out.group_id.ok_or_else(|| Error::Other("CreateSecurityGroup returned no id".into()))
        },
    )
    .await
}

/// The probe function, its role and log group; returns its ARN.
async fn probe_up(cx: &Cx, rec: &Recorder<'_>, sg: Option<String>) -> Result<Option<String>> {
    let dr = cx.regional(Side::Dr);
    let probe = probe_name(cx);
    let role = lambda::ensure_role(cx, rec, &key(cx, DETECTION, "role"), &probe, &probe_policy(cx), &probe_managed(cx)).await?;
    lambda::ensure_log_group(cx, rec, dr, &key(cx, DETECTION, "log-group"), &format!("/aws/lambda/{probe}")).await?;
    let target = instance::recorded(cx, Side::Primary, Attr::Endpoint).unwrap_or_default();
    let spec = FunctionSpec {
        name: probe.clone(),
        file: "probe.py",
        source: lambda::PROBE_SOURCE,
        handler: "probe.handler",
        role_arn: role.unwrap_or_default(),
        timeout_s: 10,
        env: vec![("TARGET_HOST".into(), target), ("TARGET_PORT".into(), "5432".into()), ("TIMEOUT_S".into(), "3".into())],
        vpc: Some((network::subnet_ids(cx, Side::Dr).await, sg.into_iter().collect())),
    };
    lambda::ensure_function(cx, rec, dr, &key(cx, DETECTION, "function"), &spec).await
}

/// `primary-down`: the probe failing for N consecutive minutes (longer than a Multi-AZ
/// failover); its actions invoke the failover function and notify the DR region's topic.
async fn primary_down_alarm_up(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let dr = cx.regional(Side::Dr);
    let minutes = cx.env.settings.failover_after_minutes;
    let failover_arn = cx.store.attr(&key(cx, FAILOVER, "function"), Attr::Arn).unwrap_or_default();
    let current = describe_alarm(cx).await?;
    let wanted = MetricAlarm::builder()
        .alarm_name(alarm_name(cx))
        .alarm_description(format!(
            "pgdr {}: the primary has been unreachable from {} for {minutes} minutes; invokes {}",
            cx.name(),
            dr.region,
            failover_name(cx)
        ))
        .namespace("AWS/Lambda")
        .metric_name("Errors")
        .dimensions(Dimension::builder().name("FunctionName").value(probe_name(cx)).build())
        .statistic(Statistic::Sum)
        .period(60)
        .evaluation_periods(minutes)
        .datapoints_to_alarm(minutes)
        .threshold(1.0)
        .comparison_operator(ComparisonOperator::GreaterThanOrEqualToThreshold)
        // A probe that stops reporting must not look healthy.
        .treat_missing_data("breaching")
        .alarm_actions(failover_arn)
        .alarm_actions(topic_arn(cx))
        .build();
    alarm_in_place(cx, rec, "alarm", current.metric_alarms.unwrap_or_default().into_iter().next(), wanted).await
}

/// A detection alarm as `wanted` says: created when missing, put again when any field pgdr sets
/// differs (compared, and put, as the other alarms are: `alarms::diff`, `alarms::put_alarm`).
async fn alarm_in_place(cx: &Cx, rec: &Recorder<'_>, what: &str, current: Option<MetricAlarm>, wanted: MetricAlarm) -> Result<()> {
    let dr = cx.regional(Side::Dr);
    let name = wanted.alarm_name().unwrap_or_default().to_owned();
    let r = Res::new(key(cx, DETECTION, what), "cloudwatch-alarm", name.clone(), &dr.region);
    let put = async || {
        alarms::put_alarm(cx, dr, "alarm", &wanted).await?;
        Ok::<_, Error>(name.clone())
    };
    super::ensure(cx, rec, &r, async |_| Ok(current.as_ref().map(|_| name.clone())), async |_| put().await).await?;
    if let Some(have) = &current {
        let changed = alarms::diff(have, &wanted);
        if !changed.is_empty() {
            rec.apply(r.change(Action::Change).id(&name).detail(changed.join("; ")), async |_| put().await).await?;
        }
    }
    Ok(())
}

/// Deletes a detection alarm (after what follows it).
async fn alarm_down(cx: &Cx, rec: &Recorder<'_>, what: &str, name: &str) -> Result<()> {
    let dr = cx.regional(Side::Dr);
    let region = dr.region.as_str();
    let r = Res::new(key(cx, DETECTION, what), "cloudwatch-alarm", name.to_owned(), region);
    super::remove(
        cx,
        rec,
        &r,
        async |_| {
            let out = dr.cloudwatch.describe_alarms().alarm_names(name).send().aws(region).await?;
            Ok(out.metric_alarms.unwrap_or_default().into_iter().find_map(|a| a.alarm_name))
        },
        async |name| {
            dr.cloudwatch.delete_alarms().alarm_names(name).send().aws(region).await?;
            Ok(())
        },
    )
    .await
}

async fn detection_down(cx: &Cx, rec: &Recorder<'_>) -> Result<()> {
    let dr = cx.regional(Side::Dr);
    let region = dr.region.as_str();
    let hc = Res::new(healthcheck::key(), "health-check", promoted_alarm_name(cx), "global");
    super::remove(cx, rec, &hc, async |known| the_health_check(cx, rec, &hc, known).await, async |id| delete_health_check(cx, &id).await)
        .await?;
    // The two alarms are independent: both at once.
    let (promoted_alarm, down_alarm) = (promoted_alarm_name(cx), alarm_name(cx));
    let (promoted, down) =
        futures::join!(alarm_down(cx, rec, "promoted-alarm", &promoted_alarm), alarm_down(cx, rec, "alarm", &down_alarm));
    promoted.and(down)?;

    delete_schedule(cx, rec, &probe_schedule(cx)).await?;

    let probe = probe_name(cx);
    lambda::delete_function(cx, rec, dr, &key(cx, DETECTION, "function"), &probe).await?;
    // The probe's network interfaces outlive it; its role must stay until they are gone, or
    // Lambda cannot remove them (and they hold the security group and subnets).
    if !rec.planning() {
        lambda::release_enis(cx, rec, dr, &probe).await?;
    }
    lambda::delete_log_group(cx, rec, dr, &key(cx, DETECTION, "log-group"), &format!("/aws/lambda/{probe}")).await?;
    lambda::delete_role(cx, rec, &key(cx, DETECTION, "role"), &probe, &probe_managed(cx)).await?;

    // The probe's ENIs can hold its security group for minutes after the function is gone.
    let vpc = network::vpc_id(cx, Side::Dr).unwrap_or_default();
    let sg = Res::new(key(cx, DETECTION, "probe-sg"), "security-group", format!("pgdr-{}-probe", cx.name()), region);
    super::remove(
        cx,
        rec,
        &sg,
        async |_| find_probe_sg(cx, &vpc).await,
        async |id| {
            network::retry_dependency(cx, rec, &format!("security group {id}"), async || {
                match dr.ec2.delete_security_group().group_id(&id).send().aws(region).await {
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
