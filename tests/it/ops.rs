//! Operations: status from AWS, manual failover, up after a failover, reprotect, down.

use crate::harness::{Emu, Run};

fn instance<'a>(status: &'a serde_json::Value, region: &str) -> &'a serde_json::Value {
    status["health"]["instances"].as_array().unwrap().iter().find(|i| i["region"] == region).unwrap()
}

async fn weights(emu: &Emu, run: &Run) -> Vec<(String, i64)> {
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(run.state_file("dev")).unwrap()).unwrap();
    let zone = state["resources"]["dns/global/zone"]["id"].as_str().unwrap().to_owned();
    let r53 = aws_sdk_route53::Client::new(&emu.sdk("us-east-1").await);
    let rrs = r53.list_resource_record_sets().hosted_zone_id(zone).send().await.unwrap();
    let mut w: Vec<(String, i64)> = rrs
        .resource_record_sets()
        .iter()
        .filter(|r| r.name() == "postgres.db-dev.internal.")
        .map(|r| (r.set_identifier().unwrap().to_owned(), r.weight().unwrap()))
        .collect();
    w.sort();
    w
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_then_reprotect_then_down() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.ok(&["up", "--env", "dev"]);

    // Healthy: exit 0, the primary-region instance is the primary.
    let s = run.ok(&["status", "--env", "dev", "--output", "json"]).json();
    assert_eq!(s["schema"], "pgdr/v1");
    assert_eq!(s["healthy"], true, "{s}");
    assert_eq!(instance(&s, "us-east-1")["role"], "primary");
    assert_eq!(instance(&s, "eu-west-1")["role"], "replica");
    assert_eq!(s["health"]["dns_writer_region"], "us-east-1");

    // Without --yes and no terminal: refused, nothing changed.
    emu.reset_calls();
    // (--force: the lag is unknown and the primary available, which is refused first.)
    let refused = run.pgdr(&["failover", "--env", "dev", "--force"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("--yes"));
    assert_eq!(emu.mutating_calls(), Vec::<String>::new());

    // The primary fails; a manual failover promotes, moves DNS and fences.
    let rds = aws_sdk_rds::Client::new(&emu.sdk("us-east-1").await);
    rds.stop_db_instance().db_instance_identifier("pgdr-dev-us-east-1").send().await.unwrap();
    emu.reset_calls();
    let out = run.ok(&["failover", "--env", "dev", "--yes", "--output", "json"]).json();
    let calls = emu.mutating_calls();
    assert!(calls.contains(&"rds eu-west-1 PromoteReadReplica".to_string()), "{calls:?}");
    assert!(calls.iter().any(|c| c.contains("RevokeSecurityGroupIngress")), "{calls:?}");
    assert!(out["timeline"].as_array().unwrap().iter().any(|p| p["phase"] == "promotion"), "{out}");
    assert_eq!(weights(&emu, &run).await, vec![("eu-west-1".into(), 100), ("us-east-1".into(), 0)]);
    let old = rds.describe_db_instances().db_instance_identifier("pgdr-dev-us-east-1").send().await.unwrap();
    assert!(old.db_instances()[0].tag_list().iter().any(|t| t.key() == Some("pgdr:role") && t.value() == Some("fenced")));
    let ec2 = aws_sdk_ec2::Client::new(&emu.sdk("us-east-1").await);
    let sg = ec2
        .describe_security_groups()
        .filters(aws_sdk_ec2::types::Filter::builder().name("tag:pgdr:resource").values("db-sg").build())
        .send()
        .await
        .unwrap();
    assert!(sg.security_groups()[0].ip_permissions().iter().all(|p| p.from_port() != Some(5432)), "5432 revoked on the old primary");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(run.state_file("dev")).unwrap()).unwrap();
    assert_eq!(state["topology"]["writer_region"], "eu-west-1");
    // The two client rules and the agent's rule (sources: the two VPC CIDRs and the agent's group).
    let revoked = state["topology"]["fenced"]["us-east-1"].as_array().cloned().unwrap_or_default();
    let sources = ["10.0.0.0/16", "10.1.0.0/16", "sg-"]
        .map(|s| revoked.iter().filter(|r| r.as_str().unwrap_or("").contains(&format!("from {s}"))).count());
    assert_eq!(sources, [1, 1, 1], "revoked rules recorded: {state}");
    assert!(state["resources"].get("agent/us-east-1/db-rule").is_none(), "the revoked agent rule left the state: {state}");
    let s = run.pgdr(&["status", "--env", "dev", "--output", "json"]);
    assert_eq!(s.code, 3, "failed over and not re-protected is degraded: {s:?}");
    let s = s.json();
    assert_eq!(instance(&s, "eu-west-1")["role"], "primary");
    assert_eq!(instance(&s, "us-east-1")["role"], "fenced");

    // A second failover changes nothing; up converges to the new topology without a call.
    emu.reset_calls();
    run.ok(&["failover", "--env", "dev", "--yes"]);
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "second failover mutated");
    run.ok(&["up", "--env", "dev"]);
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "up after failover mutated");

    // The old region is back: reprotect.
    rds.start_db_instance().db_instance_identifier("pgdr-dev-us-east-1").send().await.unwrap();
    let refused = run.pgdr(&["reprotect", "--env", "dev"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    run.ok(&["reprotect", "--env", "dev", "--yes"]);
    let rds_dr = aws_sdk_rds::Client::new(&emu.sdk("eu-west-1").await);
    let new_primary_arn = rds_dr.describe_db_instances().db_instance_identifier("pgdr-dev-eu-west-1").send().await.unwrap().db_instances()
        [0]
    .db_instance_arn()
    .unwrap()
    .to_owned();
    let replica = rds.describe_db_instances().db_instance_identifier("pgdr-dev-us-east-1").send().await.unwrap();
    assert_eq!(
        replica.db_instances()[0].read_replica_source_db_instance_identifier(),
        Some(new_primary_arn.as_str()),
        "new replica of the new primary"
    );
    assert_eq!(weights(&emu, &run).await, vec![("eu-west-1".into(), 100), ("us-east-1".into(), 0)]);
    // Detection moved to the new DR side.
    let lambda_us = aws_sdk_lambda::Client::new(&emu.sdk("us-east-1").await);
    let lambda_eu = aws_sdk_lambda::Client::new(&emu.sdk("eu-west-1").await);
    let names = |l: aws_sdk_lambda::operation::list_functions::ListFunctionsOutput| {
        l.functions().iter().filter_map(|f| f.function_name().map(str::to_owned)).collect::<Vec<_>>()
    };
    let mut us = names(lambda_us.list_functions().send().await.unwrap());
    us.sort();
    assert_eq!(us, vec!["pgdr-dev-agent", "pgdr-dev-failover", "pgdr-dev-probe"]);
    assert_eq!(names(lambda_eu.list_functions().send().await.unwrap()), vec!["pgdr-dev-agent"], "only the agent stays in eu-west-1");
    let cw = aws_sdk_cloudwatch::Client::new(&emu.sdk("us-east-1").await);
    assert_eq!(cw.describe_alarms().alarm_names("pgdr-dev-primary-down").send().await.unwrap().metric_alarms().len(), 1);
    let s = run.pgdr(&["status", "--env", "dev", "--output", "json"]);
    assert_eq!(s.code, 0, "protected again: {s:?}");
    let s = s.json();
    assert_eq!(instance(&s, "eu-west-1")["role"], "primary");
    assert_eq!(instance(&s, "us-east-1")["role"], "replica");
    emu.reset_calls();
    run.ok(&["up", "--env", "dev"]);
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "up after reprotect mutated");

    run.ok(&["down", "--env", "dev", "--yes", "--skip-final-snapshot"]);
    for region in ["us-east-1", "eu-west-1"] {
        let rds = aws_sdk_rds::Client::new(&emu.sdk(region).await);
        assert!(rds.describe_db_instances().send().await.unwrap().db_instances().is_empty(), "{region}");
        let ec2 = aws_sdk_ec2::Client::new(&emu.sdk(region).await);
        assert!(ec2.describe_vpcs().send().await.unwrap().vpcs().iter().all(|v| v.is_default() == Some(true)), "{region}");
    }
    // Only the old primary's final snapshot, taken by reprotect, remains: that is data.
    let snaps = rds.describe_db_snapshots().snapshot_type("manual").send().await.unwrap();
    assert_eq!(snaps.db_snapshots().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_refuses_a_lagging_replica_unless_forced() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.ok(&["up", "--env", "dev"]);
    // No lag datapoint and the primary available: the loss is unknown, refused.
    let refused = run.pgdr(&["failover", "--env", "dev", "--yes"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("lag is unknown") && refused.stderr.contains("--force"), "{refused:?}");
    // The replica reports 600 s of lag.
    let cw = aws_sdk_cloudwatch::Client::new(&emu.sdk("eu-west-1").await);
    cw.put_metric_data()
        .namespace("AWS/RDS")
        .metric_data(
            aws_sdk_cloudwatch::types::MetricDatum::builder()
                .metric_name("ReplicaLag")
                .dimensions(
                    aws_sdk_cloudwatch::types::Dimension::builder().name("DBInstanceIdentifier").value("pgdr-dev-eu-west-1").build(),
                )
                .value(600.0)
                .timestamp((std::time::SystemTime::now() - std::time::Duration::from_secs(30)).into())
                .build(),
        )
        .send()
        .await
        .unwrap();
    emu.reset_calls();
    let refused = run.pgdr(&["failover", "--env", "dev", "--yes"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("600 s"), "shows the lag: {refused:?}");
    assert_eq!(emu.mutating_calls(), Vec::<String>::new());
    let dry = run.ok(&["failover", "--env", "dev", "--dry-run"]);
    assert!(dry.stderr.contains("will promote"), "{dry:?}");
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "dry run mutated");
    run.ok(&["failover", "--env", "dev", "--yes", "--force"]);
    let calls = emu.mutating_calls();
    assert!(calls.contains(&"rds eu-west-1 PromoteReadReplica".to_string()), "{calls:?}");
    // The old primary was alive: revoking its rules leaves tracked connections open (EC2 user
    // guide, "Security group connection tracking"), so the fence reboots it too.
    assert!(calls.contains(&"ec2 us-east-1 RevokeSecurityGroupIngress".to_string()), "{calls:?}");
    assert!(calls.contains(&"rds us-east-1 RebootDBInstance".to_string()), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn up_and_failover_follow_an_automatic_failover() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.ok(&["up", "--env", "dev"]);
    // What the failover function does when the alarm fires: promote, tag, move the weights.
    let rds = aws_sdk_rds::Client::new(&emu.sdk("us-east-1").await);
    rds.stop_db_instance().db_instance_identifier("pgdr-dev-us-east-1").send().await.unwrap();
    let rds_dr = aws_sdk_rds::Client::new(&emu.sdk("eu-west-1").await);
    let r = rds_dr.promote_read_replica().db_instance_identifier("pgdr-dev-eu-west-1").send().await.unwrap();
    let arn = r.db_instance().unwrap().db_instance_arn().unwrap().to_owned();
    // As the function does: the promotion has finished once the instance is no longer a replica.
    for _ in 0..300 {
        let d = rds_dr.describe_db_instances().db_instance_identifier("pgdr-dev-eu-west-1").send().await.unwrap();
        let d = &d.db_instances()[0];
        if d.db_instance_status() == Some("available") && d.read_replica_source_db_instance_identifier().is_none() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    rds_dr
        .add_tags_to_resource()
        .resource_name(arn)
        .tags(aws_sdk_rds::types::Tag::builder().key("pgdr:role").value("primary").build())
        .send()
        .await
        .unwrap();
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(run.state_file("dev")).unwrap()).unwrap();
    let zone = state["resources"]["dns/global/zone"]["id"].as_str().unwrap().to_owned();
    let r53 = aws_sdk_route53::Client::new(&emu.sdk("us-east-1").await);
    let rrs = r53.list_resource_record_sets().hosted_zone_id(&zone).send().await.unwrap();
    let mut changes = Vec::new();
    for rr in rrs.resource_record_sets().iter().filter(|r| r.name() == "postgres.db-dev.internal.") {
        let mut rr = rr.clone();
        rr.weight = Some(if rr.set_identifier() == Some("eu-west-1") { 100 } else { 0 });
        changes.push(
            aws_sdk_route53::types::Change::builder()
                .action(aws_sdk_route53::types::ChangeAction::Upsert)
                .resource_record_set(rr)
                .build()
                .unwrap(),
        );
    }
    r53.change_resource_record_sets()
        .hosted_zone_id(&zone)
        .change_batch(aws_sdk_route53::types::ChangeBatch::builder().set_changes(Some(changes)).build().unwrap())
        .send()
        .await
        .unwrap();

    // status reads the truth from AWS: the replica is the primary, the old one is not fenced.
    let s = run.pgdr(&["status", "--env", "dev", "--output", "json"]);
    assert_eq!(s.code, 3, "{s:?}");
    let s = s.json();
    assert_eq!(instance(&s, "eu-west-1")["role"], "primary");
    assert_eq!(instance(&s, "us-east-1")["role"], "old-primary");
    assert!(s["problems"].as_array().unwrap().iter().any(|p| p.as_str().unwrap().contains("not fenced")), "{s}");

    // up never points DNS back at the old primary; it completes the fence the automatic path
    // could not apply (and changes nothing else).
    emu.reset_calls();
    let up = run.ok(&["up", "--env", "dev"]);
    assert!(up.stdout.contains("fenced the old primary pgdr-dev-us-east-1"), "{up:?}");
    let calls = emu.mutating_calls();
    let fence_only = ["ec2 us-east-1 RevokeSecurityGroupIngress", "rds us-east-1 AddTagsToResource", "rds us-east-1 RebootDBInstance"];
    assert!(calls.iter().all(|c| fence_only.contains(&c.as_str())), "up after an automatic failover did more than fence: {calls:?}");
    assert!(calls.iter().any(|c| c.contains("RevokeSecurityGroupIngress")), "{calls:?}");
    assert_eq!(weights(&emu, &run).await, vec![("eu-west-1".into(), 100), ("us-east-1".into(), 0)]);
    // A second up has nothing left to do.
    emu.reset_calls();
    run.ok(&["up", "--env", "dev"]);
    assert_eq!(emu.mutating_calls(), Vec::<String>::new());

    // failover then has nothing left either: no second promotion, no second fence.
    emu.reset_calls();
    run.ok(&["failover", "--env", "dev", "--yes"]);
    let calls = emu.mutating_calls();
    assert!(!calls.iter().any(|c| c.contains("PromoteReadReplica") || c.contains("RevokeSecurityGroupIngress")), "{calls:?}");
}

/// Route 53's API is in us-east-1, the default primary region: when it does not answer, the
/// promotion still happens; DNS is reported pending (exit 3) and a rerun moves it.
#[tokio::test(flavor = "multi_thread")]
async fn failover_promotes_when_route53_does_not_answer() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.write("pgdr.toml", "[defaults]\nretry_max_attempts = 1\n");
    run.ok(&["up", "--env", "dev"]);
    let rds = aws_sdk_rds::Client::new(&emu.sdk("us-east-1").await);
    rds.stop_db_instance().db_instance_identifier("pgdr-dev-us-east-1").send().await.unwrap();
    emu.config(r#"{"fail_rate": 1.0, "fault_services": ["route53"]}"#);
    emu.reset_calls();
    let out = run.pgdr(&["failover", "--env", "dev", "--yes"]);
    assert_eq!(out.code, 3, "{out:?}");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("DNS was NOT moved") && text.contains("rerun `pgdr failover"), "{out:?}");
    let calls = emu.mutating_calls();
    assert!(calls.contains(&"rds eu-west-1 PromoteReadReplica".to_string()), "{calls:?}");
    assert!(calls.iter().any(|c| c.contains("RevokeSecurityGroupIngress")), "fenced meanwhile: {calls:?}");
    emu.config(r#"{"fail_rate": 0, "fault_services": null}"#);
    assert_eq!(weights(&emu, &run).await, vec![("eu-west-1".into(), 0), ("us-east-1".into(), 100)], "DNS not moved yet");
    emu.reset_calls();
    run.ok(&["failover", "--env", "dev", "--yes"]);
    let calls = emu.mutating_calls();
    assert!(!calls.iter().any(|c| c.contains("PromoteReadReplica")), "no second promotion: {calls:?}");
    assert_eq!(weights(&emu, &run).await, vec![("eu-west-1".into(), 100), ("us-east-1".into(), 0)]);
}

/// A lost primary region (every call to it unanswered, Route 53's API with it): `failover`
/// reaches STS through the DR region, promotes, leaves DNS and the fence pending (exit 3), and
/// waits for the silent region once, not at every phase.
#[tokio::test(flavor = "multi_thread")]
async fn failover_goes_ahead_when_the_primary_region_is_silent() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.ok(&["up", "--env", "dev"]);
    emu.config(r#"{"blackhole_regions": ["us-east-1"], "blackhole_s": 0.1}"#);
    emu.reset_calls();
    let out = run.pgdr(&["failover", "--env", "dev", "--yes"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stderr.contains("primary pgdr-dev-us-east-1 is unreachable"), "{out:?}");
    let calls = emu.mutating_calls();
    assert!(calls.contains(&"rds eu-west-1 PromoteReadReplica".to_string()), "{calls:?}");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("DNS was NOT moved") && text.contains("it is NOT fenced"), "{out:?}");
    // Without the silence, each phase would spend the whole retry budget on the lost region
    // again: the topology check, the plan, the fence, the DNS change (5 attempts each).
    let lost: Vec<String> = emu
        .calls()
        .iter()
        .filter(|c| c["fault"] == "blackhole")
        .map(|c| format!("{} {}", c["service"].as_str().unwrap_or(""), c["op"].as_str().unwrap_or("")))
        .collect();
    assert!(lost.len() <= 20, "{} calls into the silent region: {lost:?}", lost.len());
    emu.config(r#"{"blackhole_regions": null}"#);
    // The region back: the next run completes the records and the fence.
    run.ok(&["failover", "--env", "dev", "--yes"]);
    assert_eq!(weights(&emu, &run).await, vec![("eu-west-1".into(), 100), ("us-east-1".into(), 0)]);
}

/// An old primary kept by `reprotect --keep-old-primary` is data: `down` refuses to delete it
/// while it is protected, like the current instances, until --force.
#[tokio::test(flavor = "multi_thread")]
async fn a_kept_old_primary_stops_down_while_protected() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.write("pgdr.toml", "[defaults]\ndeletion_protection = true\n");
    run.ok(&["up", "--env", "dev"]);
    let rds = aws_sdk_rds::Client::new(&emu.sdk("us-east-1").await);
    rds.stop_db_instance().db_instance_identifier("pgdr-dev-us-east-1").send().await.unwrap();
    run.ok(&["failover", "--env", "dev", "--yes"]);
    rds.start_db_instance().db_instance_identifier("pgdr-dev-us-east-1").send().await.unwrap();
    run.ok(&["reprotect", "--env", "dev", "--yes", "--keep-old-primary"]);
    // The current pair unprotected by the settings; `up` leaves the kept one as it is.
    run.write("pgdr.toml", "[defaults]\ndeletion_protection = false\n");
    run.ok(&["up", "--env", "dev"]);
    let kept = rds.describe_db_instances().db_instance_identifier("pgdr-dev-us-east-1").send().await.unwrap();
    assert_eq!(kept.db_instances()[0].deletion_protection(), Some(true));
    // A lost state file is rebuilt with the kept old primary and the `-2` replica in place.
    std::fs::remove_file(run.state_file("dev")).unwrap();
    std::fs::remove_file(run.state_dir().join("dev.json.bak")).unwrap();
    emu.reset_calls();
    run.ok(&["adopt", "--env", "dev"]);
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(run.state_file("dev")).unwrap()).unwrap();
    assert_eq!(state["resources"]["retired/us-east-1/instance"]["id"], "pgdr-dev-us-east-1", "{state}");
    assert_eq!(state["resources"]["replica/us-east-1/instance"]["id"], "pgdr-dev-us-east-1-2", "{state}");
    assert_eq!(state["topology"]["primary_region"], "eu-west-1", "roles swapped: {state}");
    run.ok(&["up", "--env", "dev"]);
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "adopt and up after it changed nothing");
    let state_before = std::fs::read(run.state_file("dev")).unwrap();
    emu.reset_calls();
    let refused = run.pgdr(&["down", "--env", "dev", "--yes", "--skip-final-snapshot"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("pgdr-dev-us-east-1 (us-east-1)") && refused.stderr.contains("--force"), "{refused:?}");
    assert!(!refused.stderr.contains("pgdr-dev-us-east-1-2"), "the current replica is not protected: {refused:?}");
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "nothing deleted");
    assert_eq!(std::fs::read(run.state_file("dev")).unwrap(), state_before);
    run.ok(&["down", "--env", "dev", "--yes", "--skip-final-snapshot", "--force"]);
    for region in ["us-east-1", "eu-west-1"] {
        let rds = aws_sdk_rds::Client::new(&emu.sdk(region).await);
        assert!(rds.describe_db_instances().send().await.unwrap().db_instances().is_empty(), "{region}");
    }
}
