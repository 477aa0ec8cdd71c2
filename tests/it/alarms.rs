//! Alerting end to end: topics and email subscriptions in both regions, alarms each in its
//! instance's region notifying that region's topic, the cross-region dashboard; a no-op second
//! up; a drifted alarm put back; down leaves nothing.

use std::collections::BTreeMap;

use crate::harness::{Emu, Run};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// (region, metric, dimension name, dimension value, statistic, period, periods, comparison, threshold, missing data)
type Want = (&'static str, &'static str, &'static str, &'static str, &'static str, i32, i32, &'static str, f64, &'static str);

#[rustfmt::skip] // One alarm a line: a table.
fn wanted() -> BTreeMap<&'static str, Want> {
    let (p, d) = ("us-east-1", "eu-west-1");
    let (pid, did) = ("pgdr-dev-us-east-1", "pgdr-dev-eu-west-1");
    let storage = 100.0 * GIB;
    BTreeMap::from([
        ("pgdr-dev-replica-lag", (d, "ReplicaLag", "DBInstanceIdentifier", did, "Minimum", 300, 2, "GreaterThanThreshold", 60.0, "notBreaching")),
        ("pgdr-dev-cpu-primary", (p, "CPUUtilization", "DBInstanceIdentifier", pid, "Average", 300, 2, "GreaterThanThreshold", 80.0, "missing")),
        ("pgdr-dev-cpu-replica", (d, "CPUUtilization", "DBInstanceIdentifier", did, "Average", 300, 2, "GreaterThanThreshold", 80.0, "missing")),
        ("pgdr-dev-replication-slot-lag", (p, "OldestReplicationSlotLag", "DBInstanceIdentifier", pid, "Maximum", 300, 2, "GreaterThanThreshold", 10.0 * GIB, "notBreaching")),
        ("pgdr-dev-transaction-logs-disk", (p, "TransactionLogsDiskUsage", "DBInstanceIdentifier", pid, "Maximum", 300, 2, "GreaterThanThreshold", 0.2 * storage, "missing")),
        ("pgdr-dev-free-storage-primary", (p, "FreeStorageSpace", "DBInstanceIdentifier", pid, "Minimum", 300, 1, "LessThanThreshold", 0.1 * storage, "missing")),
        ("pgdr-dev-free-storage-replica", (d, "FreeStorageSpace", "DBInstanceIdentifier", did, "Minimum", 300, 1, "LessThanThreshold", 0.1 * storage, "missing")),
        ("pgdr-dev-failover-errors", (d, "Errors", "FunctionName", "pgdr-dev-failover", "Sum", 60, 1, "GreaterThanOrEqualToThreshold", 1.0, "notBreaching")),
    ])
}

async fn topics(emu: &Emu, region: &str) -> Vec<String> {
    let sns = aws_sdk_sns::Client::new(&emu.sdk(region).await);
    let out = sns.list_topics().send().await.unwrap();
    out.topics().iter().filter_map(|t| t.topic_arn().map(str::to_owned)).filter(|a| a.ends_with(":pgdr-dev-alarms")).collect()
}

/// pgdr's alarms in a region (the detection step's `primary-down` is not this test's).
async fn alarms(emu: &Emu, region: &str) -> Vec<aws_sdk_cloudwatch::types::MetricAlarm> {
    let cw = aws_sdk_cloudwatch::Client::new(&emu.sdk(region).await);
    let out = cw.describe_alarms().alarm_name_prefix("pgdr-dev-").send().await.unwrap();
    out.metric_alarms().iter().filter(|a| wanted().contains_key(a.alarm_name().unwrap())).cloned().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn up_makes_topics_alarms_and_dashboard_in_the_right_regions_and_down_removes_them() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.write("pgdr.toml", "[defaults]\nalarm_emails = [\"oncall@example.com\"]\n");
    run.ok(&["up", "--env", "dev"]);
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(run.state_file("dev")).unwrap()).unwrap();

    // A topic per region, tagged, with the email subscription, its ARN in state.
    let mut topic = BTreeMap::new();
    for region in ["us-east-1", "eu-west-1"] {
        let found = topics(&emu, region).await;
        assert_eq!(found.len(), 1, "one topic in {region}: {found:?}");
        let arn = found[0].clone();
        assert!(arn.contains(&format!(":sns:{region}:")), "{arn}");
        assert_eq!(state["resources"][format!("topics/{region}/topic")]["id"], arn.as_str());
        let sns = aws_sdk_sns::Client::new(&emu.sdk(region).await);
        let tags = sns.list_tags_for_resource().resource_arn(&arn).send().await.unwrap();
        assert!(tags.tags().iter().any(|t| t.key() == "pgdr:env" && t.value() == "dev"), "{tags:?}");
        let subs = sns.list_subscriptions_by_topic().topic_arn(&arn).send().await.unwrap();
        assert!(
            subs.subscriptions().iter().any(|s| s.protocol() == Some("email") && s.endpoint() == Some("oncall@example.com")),
            "{subs:?}"
        );
        assert!(state["resources"][format!("topics/{region}/topic")]["attrs"]["subscription:oncall@example.com"].is_string());
        topic.insert(region, arn);
    }

    // Every alarm in its instance's region, notifying that region's topic on ALARM and OK.
    let mut seen = Vec::new();
    for region in ["us-east-1", "eu-west-1"] {
        for a in alarms(&emu, region).await {
            let name = a.alarm_name().unwrap().to_owned();
            let (r, metric, dim, value, stat, period, periods, cmp, threshold, missing) = wanted()[name.as_str()];
            assert_eq!(region, r, "{name} in the wrong region");
            assert_eq!(a.metric_name(), Some(metric), "{name}");
            assert_eq!(a.namespace(), Some(if dim == "FunctionName" { "AWS/Lambda" } else { "AWS/RDS" }), "{name}");
            let dims: Vec<_> = a.dimensions().iter().map(|d| (d.name().unwrap(), d.value().unwrap())).collect();
            assert_eq!(dims, vec![(dim, value)], "{name}");
            assert_eq!(a.statistic().map(|s| s.as_str()), Some(stat), "{name}");
            assert_eq!((a.period(), a.evaluation_periods()), (Some(period), Some(periods)), "{name}");
            assert_eq!(a.comparison_operator().map(|c| c.as_str()), Some(cmp), "{name}");
            assert_eq!(a.threshold(), Some(threshold), "{name}");
            assert_eq!(a.treat_missing_data(), Some(missing), "{name}");
            assert_eq!(a.alarm_actions(), [topic[region].clone()], "{name}");
            assert_eq!(a.ok_actions(), [topic[region].clone()], "{name}");
            assert_eq!(state["resources"][format!("alarms/{region}/{name}")]["id"], name.as_str());
            seen.push(name);
        }
    }
    seen.sort();
    assert_eq!(seen, wanted().keys().map(|k| k.to_string()).collect::<Vec<_>>(), "every alarm exactly once");
    // ReplicaLag exists for the replica only: never on the primary's side.
    let cw_primary = aws_sdk_cloudwatch::Client::new(&emu.sdk("us-east-1").await);
    let all = cw_primary.describe_alarms().send().await.unwrap();
    assert!(!all.metric_alarms().iter().any(|a| a.metric_name() == Some("ReplicaLag")), "no ReplicaLag alarm in us-east-1");

    // The dashboard: in the primary region, showing metrics of both regions.
    let d = cw_primary.get_dashboard().dashboard_name("pgdr-dev").send().await.unwrap();
    let body: serde_json::Value = serde_json::from_str(d.dashboard_body().unwrap()).unwrap();
    let widgets = body["widgets"].as_array().unwrap();
    assert!(widgets.iter().all(|w| w["properties"]["region"].is_string()), "each widget names its region");
    let text = body.to_string();
    for needle in [
        "us-east-1",
        "eu-west-1",
        "ReplicaLag",
        "CPUUtilization",
        "DatabaseConnections",
        "FreeStorageSpace",
        "ReadIOPS",
        "WriteIOPS",
        "pgdr-dev-probe",
        "Invocations",
    ] {
        assert!(text.contains(needle), "dashboard lacks {needle}: {text}");
    }
    assert_eq!(state["resources"]["alarms/us-east-1/dashboard"]["id"], "pgdr-dev");

    // A second up makes no mutating call.
    emu.reset_calls();
    run.ok(&["up", "--env", "dev"]);
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "second up mutated");

    // An address dropped from the settings is unsubscribed; one subscribed by someone else stays.
    let sns_dr = aws_sdk_sns::Client::new(&emu.sdk("eu-west-1").await);
    sns_dr.subscribe().topic_arn(&topic["eu-west-1"]).protocol("email").endpoint("someone@example.com").send().await.unwrap();
    run.write("pgdr.toml", "[defaults]\nalarm_emails = [\"lead@example.com\"]\n");
    run.ok(&["up", "--env", "dev"]);
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(run.state_file("dev")).unwrap()).unwrap();
    for region in ["us-east-1", "eu-west-1"] {
        let sns = aws_sdk_sns::Client::new(&emu.sdk(region).await);
        let subs = sns.list_subscriptions_by_topic().topic_arn(&topic[region]).send().await.unwrap();
        let emails: Vec<&str> = subs.subscriptions().iter().filter_map(|s| s.endpoint()).collect();
        assert!(emails.contains(&"lead@example.com") && !emails.contains(&"oncall@example.com"), "{region}: {emails:?}");
        let attrs = &state["resources"][format!("topics/{region}/topic")]["attrs"];
        assert!(attrs["subscription:oncall@example.com"].is_null() && attrs["subscription:lead@example.com"].is_string(), "{attrs}");
    }
    let subs = sns_dr.list_subscriptions_by_topic().topic_arn(&topic["eu-west-1"]).send().await.unwrap();
    assert!(subs.subscriptions().iter().any(|s| s.endpoint() == Some("someone@example.com")), "another's subscription kept");

    // Drift is put back: a changed threshold and a lost OK action are a change, not a create.
    let cw_dr = aws_sdk_cloudwatch::Client::new(&emu.sdk("eu-west-1").await);
    cw_dr
        .put_metric_alarm()
        .alarm_name("pgdr-dev-replica-lag")
        .namespace("AWS/RDS")
        .metric_name("ReplicaLag")
        .dimensions(aws_sdk_cloudwatch::types::Dimension::builder().name("DBInstanceIdentifier").value("pgdr-dev-eu-west-1").build())
        .statistic(aws_sdk_cloudwatch::types::Statistic::Maximum)
        .period(60)
        .evaluation_periods(2)
        .threshold(600.0)
        .comparison_operator(aws_sdk_cloudwatch::types::ComparisonOperator::GreaterThanThreshold)
        .alarm_actions(&topic["eu-west-1"])
        .send()
        .await
        .unwrap();
    let plan = run.ok(&["plan", "--env", "dev", "--output", "json"]).json();
    let change = plan.to_string();
    assert!(change.contains("threshold 600 -> 60"), "{plan}");
    emu.reset_calls();
    run.ok(&["up", "--env", "dev"]);
    assert_eq!(emu.mutating_calls(), vec!["monitoring eu-west-1 PutMetricAlarm".to_owned()], "only the drifted alarm is put back");
    let a = cw_dr.describe_alarms().alarm_names("pgdr-dev-replica-lag").send().await.unwrap();
    assert_eq!(a.metric_alarms()[0].threshold(), Some(60.0));
    assert_eq!(a.metric_alarms()[0].ok_actions(), [topic["eu-west-1"].clone()]);

    // down leaves no alarm, dashboard or topic in either region.
    run.ok(&["down", "--env", "dev", "--yes", "--skip-final-snapshot"]);
    for region in ["us-east-1", "eu-west-1"] {
        assert!(alarms(&emu, region).await.is_empty(), "alarms left in {region}");
        assert!(topics(&emu, region).await.is_empty(), "topic left in {region}");
        let cw = aws_sdk_cloudwatch::Client::new(&emu.sdk(region).await);
        assert!(cw.list_dashboards().send().await.unwrap().dashboard_entries().is_empty(), "dashboard left in {region}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_on_a_new_environment_lists_alerting_and_mutates_nothing() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    let plan = run.ok(&["plan", "--env", "dev", "--output", "json"]).json();
    assert_eq!(emu.mutating_calls(), Vec::<String>::new());
    let text = plan.to_string();
    for name in wanted().keys().copied().chain(["pgdr-dev-alarms", "pgdr-dev"]) {
        assert!(text.contains(&format!("\"{name}\"")), "plan lacks {name}: {plan}");
    }
}
