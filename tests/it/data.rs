//! The data tier end to end: secret, groups, Multi-AZ primary, cross-region replica.

use crate::harness::{Emu, Run};

async fn secret_password(emu: &Emu, env: &str) -> String {
    let sm = aws_sdk_secretsmanager::Client::new(&emu.sdk("us-east-1").await);
    let v = sm.get_secret_value().secret_id(format!("pgdr/{env}/master")).send().await.unwrap();
    let j: serde_json::Value = serde_json::from_str(v.secret_string().unwrap()).unwrap();
    j["password"].as_str().unwrap().to_owned()
}

fn dir_contains(dir: &std::path::Path, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read(e.path()).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains(needle) {
            hits.push(e.path().display().to_string());
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread")]
async fn up_builds_the_data_tier_and_down_skip_snapshot_leaves_nothing() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    let up = run.ok(&["up", "--env", "dev", "-vv"]);

    // The secret: in the primary region, replicated to the DR region, tagged.
    let sm = aws_sdk_secretsmanager::Client::new(&emu.sdk("us-east-1").await);
    let d = sm.describe_secret().secret_id("pgdr/dev/master").send().await.unwrap();
    assert!(d.replication_status().iter().any(|r| r.region() == Some("eu-west-1")), "replicated: {d:?}");
    assert!(d.tags().iter().any(|t| t.key() == Some("pgdr:env") && t.value() == Some("dev")));
    let v: serde_json::Value =
        serde_json::from_str(sm.get_secret_value().secret_id("pgdr/dev/master").send().await.unwrap().secret_string().unwrap()).unwrap();
    assert_eq!(v["username"], "postgres");
    assert_eq!(v["host"], "postgres.db-dev.internal");
    let password = v["password"].as_str().unwrap().to_owned();
    assert!(password.len() >= 30 && !password.contains(['/', '@', '"', ' ']), "RDS-safe password");

    // The password is nowhere pgdr wrote or printed, even at -vv.
    assert!(!up.stdout.contains(&password) && !up.stderr.contains(&password));
    assert_eq!(dir_contains(&run.state_dir(), &password), Vec::<String>::new());

    for region in ["us-east-1", "eu-west-1"] {
        let rds = aws_sdk_rds::Client::new(&emu.sdk(region).await);
        let sg = rds.describe_db_subnet_groups().db_subnet_group_name("pgdr-dev").send().await.unwrap();
        assert_eq!(sg.db_subnet_groups()[0].subnets().len(), 2, "{region}");
        let params = rds.describe_db_parameters().db_parameter_group_name("pgdr-dev-postgres15").source("user").send().await.unwrap();
        let get = |n: &str| {
            params.parameters().iter().find(|p| p.parameter_name() == Some(n)).and_then(|p| p.parameter_value().map(str::to_owned))
        };
        // No statement log that could hold a password; pgaudit's, without the role class.
        assert_eq!(get("log_statement").as_deref(), Some("none"), "{region}");
        assert_eq!(get("pgaudit.log").as_deref(), Some("ddl,write"), "{region}");
        assert!(get("shared_preload_libraries").is_some_and(|v| v.split(',').any(|l| l == "pgaudit")), "{region}");
        assert_eq!(get("rds.force_ssl").as_deref(), Some("1"), "{region}");
    }

    let rds = aws_sdk_rds::Client::new(&emu.sdk("us-east-1").await);
    let p = rds.describe_db_instances().db_instance_identifier("pgdr-dev-us-east-1").send().await.unwrap();
    let p = &p.db_instances()[0];
    assert_eq!(p.engine(), Some("postgres"));
    assert!(p.engine_version().unwrap().starts_with("15"));
    assert_eq!(p.db_instance_class(), Some("db.t3.large"));
    assert_eq!(p.allocated_storage(), Some(100));
    assert_eq!(p.storage_type(), Some("gp3"));
    assert_eq!(p.multi_az(), Some(true));
    assert_eq!(p.storage_encrypted(), Some(true));
    assert_eq!(p.backup_retention_period(), Some(7));
    assert_eq!(p.publicly_accessible(), Some(false));
    assert_eq!(p.auto_minor_version_upgrade(), Some(false));
    assert_eq!(p.copy_tags_to_snapshot(), Some(true));
    assert_eq!(p.deletion_protection(), Some(false), "off for dev");
    assert!(p.enabled_cloudwatch_logs_exports().contains(&"postgresql".to_owned()));
    assert_eq!(p.db_subnet_group().and_then(|g| g.db_subnet_group_name()), Some("pgdr-dev"));
    let primary_arn = p.db_instance_arn().unwrap().to_owned();

    let rds_dr = aws_sdk_rds::Client::new(&emu.sdk("eu-west-1").await);
    let r = rds_dr.describe_db_instances().db_instance_identifier("pgdr-dev-eu-west-1").send().await.unwrap();
    let r = &r.db_instances()[0];
    assert_eq!(r.read_replica_source_db_instance_identifier(), Some(primary_arn.as_str()), "replica of the primary's ARN");
    assert!(r.db_instance_arn().unwrap().contains(":eu-west-1:"), "the replica lives in the DR region");
    assert_eq!(r.storage_encrypted(), Some(true));
    assert_eq!(r.db_instance_class(), Some("db.t3.large"));
    assert_eq!(r.backup_retention_period(), Some(7), "its own backups");
    assert!(r.enabled_cloudwatch_logs_exports().contains(&"postgresql".to_owned()));

    let logs = aws_sdk_cloudwatchlogs::Client::new(&emu.sdk("us-east-1").await);
    let g = logs.describe_log_groups().log_group_name_prefix("/aws/rds/instance/pgdr-dev-us-east-1/postgresql").send().await.unwrap();
    assert_eq!(g.log_groups()[0].retention_in_days(), Some(7));

    emu.reset_calls();
    run.ok(&["up", "--env", "dev"]);
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "second up mutated");

    // More storage in the settings: both instances grow; less cannot be applied and says so.
    run.write("pgdr.toml", "[defaults]\nallocated_storage_gib = 150\n");
    run.ok(&["up", "--env", "dev"]);
    for (region, id) in [("us-east-1", "pgdr-dev-us-east-1"), ("eu-west-1", "pgdr-dev-eu-west-1")] {
        let rds = aws_sdk_rds::Client::new(&emu.sdk(region).await);
        let i = rds.describe_db_instances().db_instance_identifier(id).send().await.unwrap();
        assert_eq!(i.db_instances()[0].allocated_storage(), Some(150), "{region}");
    }
    run.write("pgdr.toml", "[defaults]\nallocated_storage_gib = 100\n");
    emu.reset_calls();
    let plan = run.ok(&["plan", "--env", "dev"]);
    assert!(plan.stdout.contains("cannot shrink"), "{plan:?}");
    run.ok(&["up", "--env", "dev"]);
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "a smaller size changes nothing");

    // A new major version is refused before anything is made for it (no new parameter group).
    run.write("pgdr.toml", "[defaults]\nengine_version = \"16.4\"\n");
    let refused = run.pgdr(&["up", "--env", "dev"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("runs PostgreSQL 15") && refused.stderr.contains("does not upgrade major versions"), "{refused:?}");
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "nothing made for 16");
    run.write("pgdr.toml", "");

    let down = run.ok(&["down", "--env", "dev", "--yes", "--skip-final-snapshot", "-vv"]);
    assert!(!down.stdout.contains(&password) && !down.stderr.contains(&password));
    for region in ["us-east-1", "eu-west-1"] {
        let rds = aws_sdk_rds::Client::new(&emu.sdk(region).await);
        assert!(rds.describe_db_instances().send().await.unwrap().db_instances().is_empty(), "{region}");
        assert!(rds.describe_db_snapshots().send().await.unwrap().db_snapshots().is_empty(), "{region}");
        assert!(!rds
            .describe_db_subnet_groups()
            .send()
            .await
            .unwrap()
            .db_subnet_groups()
            .iter()
            .any(|g| g.db_subnet_group_name() == Some("pgdr-dev")));
        assert!(!rds
            .describe_db_parameter_groups()
            .send()
            .await
            .unwrap()
            .db_parameter_groups()
            .iter()
            .any(|g| g.db_parameter_group_name() == Some("pgdr-dev-postgres15")));
    }
    assert!(sm.describe_secret().secret_id("pgdr/dev/master").send().await.is_err(), "secret deleted at once");
    // Deleted without a recovery window: the name is free again.
    run.ok(&["up", "--env", "dev"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn down_keeps_one_final_snapshot_and_up_restores_the_secret() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.ok(&["up", "--env", "dev"]);
    let password = secret_password(&emu, "dev").await;
    run.ok(&["down", "--env", "dev", "--yes"]);
    let rds = aws_sdk_rds::Client::new(&emu.sdk("us-east-1").await);
    // Automated backups are kept too (that is what --skip-final-snapshot drops); count manual ones.
    let snaps = rds.describe_db_snapshots().snapshot_type("manual").send().await.unwrap();
    let names: Vec<_> = snaps.db_snapshots().iter().filter_map(|s| s.db_snapshot_identifier()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("pgdr-dev-final-"), "{names:?}");
    let rds_dr = aws_sdk_rds::Client::new(&emu.sdk("eu-west-1").await);
    assert!(
        rds_dr.describe_db_snapshots().snapshot_type("manual").send().await.unwrap().db_snapshots().is_empty(),
        "no snapshot of the replica"
    );

    // The secret is scheduled for deletion (it holds the snapshot's password); up takes it back.
    let sm = aws_sdk_secretsmanager::Client::new(&emu.sdk("us-east-1").await);
    assert!(sm.describe_secret().secret_id("pgdr/dev/master").send().await.unwrap().deleted_date().is_some());
    // The emulator names the new instance's automated snapshot after the minute and refuses to
    // reuse a kept one's name (AWS does not): drop the kept automated snapshot first.
    for s in rds.describe_db_snapshots().snapshot_type("automated").send().await.unwrap().db_snapshots() {
        rds.delete_db_snapshot().db_snapshot_identifier(s.db_snapshot_identifier().unwrap()).send().await.unwrap();
    }
    let again = run.ok(&["up", "--env", "dev"]);
    assert!(again.stdout.contains("restore"), "{again:?}");
    assert!(sm.describe_secret().secret_id("pgdr/dev/master").send().await.unwrap().deleted_date().is_none());
    assert_eq!(secret_password(&emu, "dev").await, password, "same credential");
    run.ok(&["down", "--env", "dev", "--yes", "--skip-final-snapshot"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn protected_production_database_stops_down_until_forced() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.ok(&["up", "--env", "prod-eu"]);
    let rds = aws_sdk_rds::Client::new(&emu.sdk("us-east-1").await);
    let p = rds.describe_db_instances().db_instance_identifier("pgdr-prod-eu-us-east-1").send().await.unwrap();
    assert_eq!(p.db_instances()[0].deletion_protection(), Some(true), "on by default for prod*");
    let state_before = std::fs::read(run.state_file("prod-eu")).unwrap();
    emu.reset_calls();
    let refused = run.pgdr(&["down", "--env", "prod-eu", "--yes", "--skip-final-snapshot"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("deletion protection") && refused.stderr.contains("--force"), "{refused:?}");
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "nothing deleted");
    assert_eq!(std::fs::read(run.state_file("prod-eu")).unwrap(), state_before);
    run.ok(&["down", "--env", "prod-eu", "--yes", "--skip-final-snapshot", "--force"]);
    assert!(rds.describe_db_instances().send().await.unwrap().db_instances().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn up_waits_for_creating_instances_and_names_a_terminal_status() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    // The emulator makes instances available at once; the proxy holds them in `creating`.
    emu.config(r#"{"rds_hold": {"create_s": 3, "modify_s": 1}}"#);
    let up = run.ok(&["up", "--env", "dev"]);
    assert!(up.stderr.contains("pgdr-dev-us-east-1: creating"), "progress shows the wait: {up:?}");
    assert!(up.stderr.contains("pgdr-dev-eu-west-1: creating"), "{up:?}");

    // A terminal status stops the wait with its name; state is kept and a rerun converges.
    emu.config(r#"{"rds_hold": null}"#);
    emu.rds_status(r#"{"region": "eu-west-1", "id": "pgdr-dev-eu-west-1", "status": "incompatible-parameters", "for_s": 30}"#);
    let bad = run.pgdr(&["up", "--env", "dev"]);
    assert_eq!(bad.code, 2, "an AWS failure, nothing else to do: {bad:?}");
    assert!(bad.stdout.contains("incompatible-parameters") || bad.stderr.contains("incompatible-parameters"), "{bad:?}");
    emu.rds_status(r#"{"region": "eu-west-1", "id": "pgdr-dev-eu-west-1", "status": null}"#);
    run.ok(&["up", "--env", "dev"]);
    run.ok(&["down", "--env", "dev", "--yes", "--skip-final-snapshot"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_off_is_possible_and_warned_about() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.write("pgdr.toml", "[env.legacy]\nrequire_tls = false\n");
    let plan = run.ok(&["plan", "--env", "legacy"]);
    assert!(plan.stdout.contains("WARNING") && plan.stdout.contains("rds.force_ssl=0"), "{plan:?}");
    let up = run.ok(&["up", "--env", "legacy", "--output", "json"]).json();
    assert!(up["warnings"][0].as_str().unwrap().contains("unencrypted"), "{up}");
    let rds = aws_sdk_rds::Client::new(&emu.sdk("us-east-1").await);
    let params = rds.describe_db_parameters().db_parameter_group_name("pgdr-legacy-postgres15").source("user").send().await.unwrap();
    let ssl = params.parameters().iter().find(|p| p.parameter_name() == Some("rds.force_ssl")).and_then(|p| p.parameter_value());
    assert_eq!(ssl, Some("0"));
}

/// A secret of pgdr's name that already exists in the DR region (not pgdr's) makes its replica
/// `Failed` (Secrets Manager): `up` says so with the fix instead of counting it as replicated.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_secret_replica_is_reported_with_the_fix() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    let dr = aws_sdk_secretsmanager::Client::new(&emu.sdk("eu-west-1").await);
    dr.create_secret().name("pgdr/dev/master").secret_string("{}").send().await.unwrap();
    let out = run.pgdr(&["up", "--env", "dev"]);
    assert_ne!(out.code, 0, "{out:?}");
    let said = format!("{}{}", out.stdout, out.stderr);
    assert!(said.contains("replicating secret pgdr/dev/master to eu-west-1 failed") && said.contains("delete or rename it"), "{out:?}");
}
