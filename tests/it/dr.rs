//! DNS, detection and the failover machinery: all in the DR region (or global), wired together.

use crate::harness::{Emu, Run};

#[tokio::test(flavor = "multi_thread")]
async fn up_wires_detection_and_failover_in_the_dr_region() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.ok(&["up", "--env", "dev"]);
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(run.state_file("dev")).unwrap()).unwrap();
    let id = |k: &str| state["resources"][k]["id"].as_str().unwrap_or_else(|| panic!("{k} not in state")).to_owned();

    // The zone is private and visible from both VPCs.
    let r53 = aws_sdk_route53::Client::new(&emu.sdk("us-east-1").await);
    let zone = r53.get_hosted_zone().id(id("dns/global/zone")).send().await.unwrap();
    assert_eq!(zone.hosted_zone().unwrap().name(), "db-dev.internal.");
    assert!(zone.hosted_zone().unwrap().config().unwrap().private_zone());
    let mut vpcs: Vec<String> = zone.vpcs().iter().filter_map(|v| v.vpc_id().map(str::to_owned)).collect();
    vpcs.sort();
    let mut want = vec![id("network/us-east-1/vpc"), id("network/eu-west-1/vpc")];
    want.sort();
    assert_eq!(vpcs, want);

    // Weighted writer records: primary 100 with the health check, replica 0; a reader record.
    let rrs = r53.list_resource_record_sets().hosted_zone_id(id("dns/global/zone")).send().await.unwrap();
    let writer: Vec<_> = rrs.resource_record_sets().iter().filter(|r| r.name() == "postgres.db-dev.internal.").collect();
    assert_eq!(writer.len(), 2);
    let hc = id("detection/global/health-check");
    let primary_ep = state["resources"]["primary/us-east-1/instance"]["attrs"]["endpoint"].as_str().unwrap();
    let replica_ep = state["resources"]["replica/eu-west-1/instance"]["attrs"]["endpoint"].as_str().unwrap();
    let p = writer.iter().find(|r| r.set_identifier() == Some("us-east-1")).unwrap();
    assert_eq!(p.weight(), Some(100));
    assert_eq!(p.health_check_id(), Some(hc.as_str()));
    assert_eq!(p.resource_records()[0].value(), primary_ep, "the endpoint, not the instance id");
    assert_eq!(p.ttl(), Some(60));
    let r = writer.iter().find(|r| r.set_identifier() == Some("eu-west-1")).unwrap();
    assert_eq!(r.weight(), Some(0));
    assert_eq!(r.resource_records()[0].value(), replica_ep);
    assert!(rrs
        .resource_record_sets()
        .iter()
        .any(|r| r.name() == "replica.db-dev.internal." && r.resource_records()[0].value() == replica_ep));
    let check = r53.get_health_check().health_check_id(&hc).send().await.unwrap();
    let config = check.health_check().unwrap().health_check_config().unwrap();
    assert_eq!(config.r#type().as_str(), "CLOUDWATCH_METRIC");
    // It follows the promotion, not the probe: a broken probe path must not send writers to a
    // read-only replica.
    let alarm = config.alarm_identifier().expect("the emulator keeps the alarm a check follows");
    assert_eq!((alarm.name(), alarm.region().as_str()), ("pgdr-dev-replica-promoted", "eu-west-1"));
    assert_eq!(config.insufficient_data_health_status().map(|s| s.as_str()), Some("Healthy"));

    // The failover function: DR region, outside any VPC, invocable by the alarm.
    let lambda_dr = aws_sdk_lambda::Client::new(&emu.sdk("eu-west-1").await);
    let f = lambda_dr.get_function().function_name("pgdr-dev-failover").send().await.unwrap();
    let fc = f.configuration().unwrap();
    assert!(fc.vpc_config().is_none_or(|v| v.subnet_ids().is_empty()), "not in a VPC");
    assert_eq!(fc.timeout(), Some(900));
    assert_eq!(fc.runtime().map(|r| r.as_str()), Some("python3.12"));
    let env = fc.environment().unwrap().variables().unwrap();
    assert_eq!(env.get("PRIMARY_DB_ID").map(String::as_str), Some("pgdr-dev-us-east-1"));
    assert_eq!(env.get("REPLICA_DB_ID").map(String::as_str), Some("pgdr-dev-eu-west-1"));
    assert_eq!(env.get("RECORD_NAME").map(String::as_str), Some("postgres.db-dev.internal."));
    let policy = lambda_dr.get_policy().function_name("pgdr-dev-failover").send().await.unwrap();
    assert!(policy.policy().unwrap().contains("lambda.alarms.cloudwatch.amazonaws.com"));
    let lambda_primary = aws_sdk_lambda::Client::new(&emu.sdk("us-east-1").await);
    let primary_functions: Vec<_> = lambda_primary
        .list_functions()
        .send()
        .await
        .unwrap()
        .functions()
        .iter()
        .filter_map(|f| f.function_name().map(str::to_owned))
        .collect();
    assert_eq!(primary_functions, ["pgdr-dev-agent"], "no failover machinery in the primary region, only its agent");

    // The probe: in the DR VPC's subnets, run every minute.
    let probe = lambda_dr.get_function().function_name("pgdr-dev-probe").send().await.unwrap();
    let vpc = probe.configuration().unwrap().vpc_config().unwrap();
    let mut subnets = vpc.subnet_ids().to_vec();
    subnets.sort();
    let mut want = vec![id("network/eu-west-1/subnet-a"), id("network/eu-west-1/subnet-b")];
    want.sort();
    assert_eq!(subnets, want);
    assert_eq!(
        probe.configuration().unwrap().environment().unwrap().variables().unwrap().get("TARGET_HOST").map(String::as_str),
        Some(primary_ep)
    );
    let events = aws_sdk_eventbridge::Client::new(&emu.sdk("eu-west-1").await);
    let rule = events.describe_rule().name("pgdr-dev-probe-every-minute").send().await.unwrap();
    assert_eq!(rule.schedule_expression(), Some("rate(1 minute)"));
    let targets = events.list_targets_by_rule().rule("pgdr-dev-probe-every-minute").send().await.unwrap();
    assert!(targets.targets()[0].arn().ends_with(":function:pgdr-dev-probe"));
    // The failover function, every minute with {"action":"resume"}: it retries a failover the
    // alarm asked for that could not finish (the alarm invokes once per change of state).
    let resume = events.describe_rule().name("pgdr-dev-failover-resume").send().await.unwrap();
    assert_eq!(resume.schedule_expression(), Some("rate(1 minute)"));
    let targets = events.list_targets_by_rule().rule("pgdr-dev-failover-resume").send().await.unwrap();
    assert!(targets.targets()[0].arn().ends_with(":function:pgdr-dev-failover"));
    assert_eq!(targets.targets()[0].input(), Some(r#"{"action":"resume"}"#));
    assert!(policy.policy().unwrap().contains("pgdr-resume"), "the schedule may invoke it");
    assert_eq!(env.get("ALARM_NAME").map(String::as_str), Some("pgdr-dev-primary-down"));

    // The alarm: DR region, on the probe's errors, missing data breaching, invokes failover.
    let cw = aws_sdk_cloudwatch::Client::new(&emu.sdk("eu-west-1").await);
    let alarms = cw.describe_alarms().alarm_names("pgdr-dev-primary-down").send().await.unwrap();
    let a = &alarms.metric_alarms()[0];
    assert_eq!(a.namespace(), Some("AWS/Lambda"));
    assert_eq!(a.metric_name(), Some("Errors"));
    assert_eq!(a.dimensions()[0].value(), Some("pgdr-dev-probe"));
    assert_eq!(a.treat_missing_data(), Some("breaching"));
    assert!(a.evaluation_periods().unwrap() * a.period().unwrap() >= 180, "longer than a Multi-AZ failover");
    assert!(a.alarm_actions().iter().any(|x| x.ends_with(":function:pgdr-dev-failover")), "{:?}", a.alarm_actions());
    let cw_primary = aws_sdk_cloudwatch::Client::new(&emu.sdk("us-east-1").await);
    assert!(cw_primary.describe_alarms().alarm_names("pgdr-dev-primary-down").send().await.unwrap().metric_alarms().is_empty());

    // The writer record's health check follows the promotion, not the probe: an alarm in the DR
    // region on the failover function's ReplicaPromoted, missing data keeping its state.
    let promoted = cw.describe_alarms().alarm_names("pgdr-dev-replica-promoted").send().await.unwrap();
    let p = &promoted.metric_alarms()[0];
    assert_eq!((p.namespace(), p.metric_name()), (Some("pgdr"), Some("ReplicaPromoted")));
    assert_eq!((p.dimensions()[0].name(), p.dimensions()[0].value()), (Some("Environment"), Some("dev")));
    assert_eq!(p.treat_missing_data(), Some("ignore"));
    assert_eq!(p.comparison_operator().map(|c| c.as_str()), Some("GreaterThanOrEqualToThreshold"));
    let primary_sg = state["resources"]["network/us-east-1/db-sg"]["id"].as_str().unwrap();
    assert_eq!(env.get("PRIMARY_SG_ID").map(String::as_str), Some(primary_sg), "the function's fence revokes the old primary's group");

    // Roles: trust Lambda, inline policies on ARNs, not "*" (except the actions AWS gives no
    // resource-level permission: the rule lookup, and metrics, limited to pgdr's namespace).
    let iam = aws_sdk_iam::Client::new(&emu.sdk("us-east-1").await);
    let doc = iam.get_role_policy().role_name("pgdr-dev-failover").policy_name("pgdr").send().await.unwrap();
    let doc = urlencoding_decode(doc.policy_document());
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    for st in doc["Statement"].as_array().unwrap() {
        let actions: Vec<&str> = st["Action"].as_array().unwrap().iter().filter_map(|a| a.as_str()).collect();
        for res in st["Resource"].as_array().unwrap() {
            let res = res.as_str().unwrap();
            match actions.as_slice() {
                ["ec2:DescribeSecurityGroupRules"] => assert_eq!(res, "*"),
                ["cloudwatch:PutMetricData"] => assert_eq!(st["Condition"]["StringEquals"]["cloudwatch:namespace"], "pgdr", "{st}"),
                _ => assert!(res.starts_with("arn:") && res != "*", "{res}"),
            }
        }
    }
    assert!(doc.to_string().contains("rds:RebootDBInstance") && doc.to_string().contains("ec2:RevokeSecurityGroupIngress"), "{doc}");
    assert!(doc.to_string().contains(":db:pgdr-dev-eu-west-1"));
    assert!(doc.to_string().contains(":alarm:pgdr-dev-primary-down"), "reads its alarm's state: {doc}");

    // With a real region's latency, a no-op `up` and `status` read everything in one wave (the
    // read phase) and the walk finds the answers: at most three round trips deep.
    emu.config(r#"{"latency_ms": 200}"#);
    emu.reset_calls();
    run.ok(&["up", "--env", "dev"]);
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "second up mutated");
    let (calls, depth) = (emu.calls().len(), emu.depth());
    assert!(depth <= 3, "no-op up was {depth} round trips deep ({calls} calls)");
    emu.reset_calls();
    run.ok(&["status", "--env", "dev"]);
    let (calls, depth) = (emu.calls().len(), emu.depth());
    assert!(depth <= 3, "status was {depth} round trips deep ({calls} calls)");
    emu.config(r#"{"latency_ms": 0}"#);

    run.ok(&["down", "--env", "dev", "--yes", "--skip-final-snapshot"]);
    assert!(lambda_dr.list_functions().send().await.unwrap().functions().is_empty());
    assert!(r53.list_hosted_zones().send().await.unwrap().hosted_zones().is_empty());
    assert!(r53.list_health_checks().send().await.unwrap().health_checks().is_empty());
    assert!(cw.describe_alarms().send().await.unwrap().metric_alarms().is_empty());
    assert!(events.list_rules().send().await.unwrap().rules().is_empty());
    let roles = iam.list_roles().send().await.unwrap();
    assert!(!roles.roles().iter().any(|r| r.role_name().starts_with("pgdr-")), "roles left");
    let logs = aws_sdk_cloudwatchlogs::Client::new(&emu.sdk("eu-west-1").await);
    assert!(logs.describe_log_groups().send().await.unwrap().log_groups().is_empty());
}

fn urlencoding_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}
