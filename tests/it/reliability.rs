//! Attacks: lost state, leaked secrets, faults on the wire, kills mid-run.

use crate::harness::{Emu, Run};

/// Every pgdr-tagged resource the tests can see, as "kind name" lines (sorted, duplicates kept).
pub async fn inventory(emu: &Emu, env: &str) -> Vec<String> {
    let mut out = Vec::new();
    for region in ["us-east-1", "eu-west-1"] {
        let conf = emu.sdk(region).await;
        let ec2 = aws_sdk_ec2::Client::new(&conf);
        let f = || aws_sdk_ec2::types::Filter::builder().name("tag:pgdr:env").values(env).build();
        let tag = |tags: &[aws_sdk_ec2::types::Tag]| crate::harness::ec2_tag(tags, "pgdr:resource").unwrap_or_default();
        for v in ec2.describe_vpcs().filters(f()).send().await.unwrap().vpcs() {
            out.push(format!("{region} vpc {}", tag(v.tags())));
        }
        for s in ec2.describe_subnets().filters(f()).send().await.unwrap().subnets() {
            out.push(format!("{region} subnet {}", tag(s.tags())));
        }
        for t in ec2.describe_route_tables().filters(f()).send().await.unwrap().route_tables() {
            out.push(format!("{region} route-table {} assoc={}", tag(t.tags()), t.associations().len()));
        }
        for g in ec2.describe_security_groups().filters(f()).send().await.unwrap().security_groups() {
            out.push(format!(
                "{region} sg {} rules={}",
                tag(g.tags()),
                g.ip_permissions().iter().map(|p| p.ip_ranges().len()).sum::<usize>()
            ));
        }
        for e in ec2.describe_vpc_endpoints().filters(f()).send().await.unwrap().vpc_endpoints() {
            if !e.state().is_some_and(|s| s.as_str().eq_ignore_ascii_case("deleted")) {
                out.push(format!("{region} endpoint {}", tag(e.tags())));
            }
        }
        for p in ec2.describe_vpc_peering_connections().filters(f()).send().await.unwrap().vpc_peering_connections() {
            let code = p.status().and_then(|s| s.code()).map(|c| c.as_str().to_owned()).unwrap_or_default();
            if code != "deleted" {
                out.push(format!("{region} peering {code}"));
            }
        }
        let rds = aws_sdk_rds::Client::new(&conf);
        for d in rds.describe_db_instances().send().await.unwrap().db_instances() {
            out.push(format!("{region} db {}", d.db_instance_identifier().unwrap_or_default()));
        }
        for g in rds.describe_db_subnet_groups().send().await.unwrap().db_subnet_groups() {
            if g.db_subnet_group_name() != Some("default") {
                out.push(format!("{region} db-subnet-group {}", g.db_subnet_group_name().unwrap_or_default()));
            }
        }
        let lambda = aws_sdk_lambda::Client::new(&conf);
        for fnc in lambda.list_functions().send().await.unwrap().functions() {
            out.push(format!("{region} function {}", fnc.function_name().unwrap_or_default()));
        }
        let cw = aws_sdk_cloudwatch::Client::new(&conf);
        for a in cw.describe_alarms().send().await.unwrap().metric_alarms() {
            out.push(format!("{region} alarm {}", a.alarm_name().unwrap_or_default()));
        }
        let sns = aws_sdk_sns::Client::new(&conf);
        for t in sns.list_topics().send().await.unwrap().topics() {
            out.push(format!("{region} topic {}", t.topic_arn().unwrap_or_default().rsplit(':').next().unwrap_or_default()));
        }
        let logs = aws_sdk_cloudwatchlogs::Client::new(&conf);
        for g in logs.describe_log_groups().send().await.unwrap().log_groups() {
            out.push(format!("{region} log-group {}", g.log_group_name().unwrap_or_default()));
        }
        let events = aws_sdk_eventbridge::Client::new(&conf);
        for r in events.list_rules().send().await.unwrap().rules() {
            out.push(format!("{region} rule {}", r.name().unwrap_or_default()));
        }
    }
    let conf = emu.sdk("us-east-1").await;
    let sm = aws_sdk_secretsmanager::Client::new(&conf);
    for s in sm.list_secrets().send().await.unwrap().secret_list() {
        out.push(format!("secret {}", s.name().unwrap_or_default()));
    }
    let r53 = aws_sdk_route53::Client::new(&conf);
    for z in r53.list_hosted_zones().send().await.unwrap().hosted_zones() {
        out.push(format!("zone {}", z.name()));
    }
    out.push(format!("health-checks {}", r53.list_health_checks().send().await.unwrap().health_checks().len()));
    let iam = aws_sdk_iam::Client::new(&conf);
    for r in iam.list_roles().send().await.unwrap().roles() {
        if r.role_name().starts_with("pgdr-") {
            out.push(format!("role {}", r.role_name()));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_state_is_rebuilt_by_adopt() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.ok(&["up", "--env", "dev"]);
    let before = inventory(&emu, "dev").await;
    std::fs::remove_file(run.state_file("dev")).unwrap();
    std::fs::remove_file(run.state_dir().join("dev.json.bak")).unwrap();
    emu.reset_calls();
    let adopted = run.ok(&["adopt", "--env", "dev", "--output", "json"]).json();
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "adopt changes nothing in AWS");
    assert_eq!(adopted["totals"]["create"], 0, "everything found: {adopted}");
    run.ok(&["up", "--env", "dev"]);
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "up after adopt mutated");
    assert_eq!(inventory(&emu, "dev").await, before);
    run.ok(&["down", "--env", "dev", "--yes", "--skip-final-snapshot"]);
    assert_eq!(inventory(&emu, "dev").await, vec!["health-checks 0".to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_password_appears_nowhere() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    let mut outputs = Vec::new();
    for args in [
        vec!["plan", "--env", "dev"],
        vec!["up", "--env", "dev"],
        vec!["up", "--env", "dev"],
        vec!["status", "--env", "dev"],
        vec!["status"],
        vec!["adopt", "--env", "dev"],
        vec!["failover", "--env", "dev", "--dry-run"],
        vec!["down", "--env", "dev", "--dry-run"],
    ] {
        for json in [false, true] {
            let mut a = args.clone();
            a.push("-vv");
            if json {
                a.extend(["--output", "json"]);
            }
            let o = run.pgdr(&a);
            assert!(o.code == 0 || o.code == 3, "{a:?}: {o:?}");
            outputs.push((a, o));
        }
    }
    let sm = aws_sdk_secretsmanager::Client::new(&emu.sdk("us-east-1").await);
    let v = sm.get_secret_value().secret_id("pgdr/dev/master").send().await.unwrap();
    let j: serde_json::Value = serde_json::from_str(v.secret_string().unwrap()).unwrap();
    let password = j["password"].as_str().unwrap().to_owned();
    assert!(password.len() >= 30);
    let o = run.pgdr(&["down", "--env", "dev", "--yes", "-vv", "--output", "json"]);
    assert_eq!(o.code, 0, "{o:?}");
    outputs.push((vec!["down"], o));
    for (a, o) in &outputs {
        assert!(!o.stdout.contains(&password) && !o.stderr.contains(&password), "{a:?} printed the password");
    }
    for e in std::fs::read_dir(run.state_dir()).unwrap().flatten() {
        let text = std::fs::read(e.path()).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains(&password), "{} holds the password", e.path().display());
    }
}

/// The resource set a clean `up` makes, from a fault-free emulator of its own.
async fn clean_inventory() -> Vec<String> {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.ok(&["up", "--env", "dev"]);
    inventory(&emu, "dev").await
}

/// Reruns a command until it succeeds (exit 0); each failed run must be a partial or AWS failure.
fn until_ok(run: &Run, args: &[&str], tries: usize) -> usize {
    for i in 1..=tries {
        let o = run.pgdr_within(args, 180);
        if o.code == 0 {
            return i;
        }
        assert!(o.code == 2 || o.code == 3, "{args:?} run {i}: {o:?}");
    }
    panic!("{args:?} did not converge in {tries} runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_on_the_wire_never_leave_duplicates_or_leftovers() {
    let want = clean_inventory().await;
    for seed in [1, 2] {
        let emu = Emu::start();
        let run = Run::new(&emu);
        // 10 % of calls answered 503 before reaching AWS, 5 % lose their answer after it acted.
        // Every operation, CreateVpcEndpoint too: the emulator honours its ClientToken as AWS
        // does (rule ec2-client-token), so a retried create returns the first endpoint.
        let faults = |seed: u64| format!(r#"{{"fail_rate": 0.10, "drop_rate": 0.05, "seed": {seed}}}"#);
        emu.config(&faults(seed));
        let runs = until_ok(&run, &["up", "--env", "dev"], 6);
        eprintln!("seed {seed}: up converged in {runs} run(s), {} calls", emu.calls().len());
        emu.config(r#"{"fail_rate": 0, "drop_rate": 0}"#);
        assert_eq!(inventory(&emu, "dev").await, want, "seed {seed}: not exactly one of each");
        emu.config(&faults(seed + 100));
        until_ok(&run, &["down", "--env", "dev", "--yes", "--skip-final-snapshot"], 6);
        emu.config(r#"{"fail_rate": 0, "drop_rate": 0}"#);
        assert_eq!(inventory(&emu, "dev").await, vec!["health-checks 0".to_string()], "seed {seed}: leftovers");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_anywhere_then_rerun_converges_to_exactly_one_of_each() {
    let want = clean_inventory().await;
    let emu = Emu::start();
    let run = Run::new(&emu);
    // Hold instances in `creating` for a moment, so that some kills land mid-wait.
    emu.config(r#"{"rds_hold": {"create_s": 2, "modify_s": 1}}"#);
    emu.reset_calls();
    run.ok(&["up", "--env", "probe"]);
    let total = emu.calls().len();
    run.ok(&["down", "--env", "probe", "--yes", "--skip-final-snapshot"]);
    // Ten kill points spread over the whole run, plus right after the first create.
    let mut points: Vec<usize> = (1..=10).map(|i| i * total / 11).collect();
    points.insert(0, 2);
    let mut report = Vec::new();
    for n in points {
        let child =
            run.cmd(&["up", "--env", "dev"]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        emu.config(&format!(r#"{{"kill_after": {{"pid": {}, "calls": {n}}}}}"#, child.id()));
        let status = child.wait_with_output().unwrap().status;
        emu.config(r#"{"kill_after": null}"#);
        let killed = status.code().is_none();
        // A kill -9 leaves its lock: reported as stale, cleared by the operator's unlock.
        if killed {
            let o = run.pgdr(&["up", "--env", "dev"]);
            assert_eq!(o.code, 1, "a stale lock must stop the rerun: {o:?}");
            assert!(o.stderr.contains("pgdr unlock"), "{o:?}");
            run.ok(&["unlock", "--env", "dev", "--yes"]);
        }
        run.ok(&["up", "--env", "dev"]);
        let got = inventory(&emu, "dev").await;
        assert_eq!(got, want, "kill after call {n}: not exactly one of each");
        report.push(format!("{n}:{}", if killed { "killed" } else { "finished" }));
        run.ok(&["down", "--env", "dev", "--yes", "--skip-final-snapshot"]);
        assert_eq!(inventory(&emu, "dev").await, vec!["health-checks 0".to_string()], "kill after call {n}: down left resources");
    }
    eprintln!("kill points (calls of {total}): {}", report.join(" "));
    assert!(report.iter().filter(|r| r.ends_with("killed")).count() >= 10, "{report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_saves_state_releases_the_lock_and_exits_130() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    // Long enough a wait on the primary to interrupt it.
    emu.config(r#"{"rds_hold": {"create_s": 30, "modify_s": 1}}"#);
    let child = run.cmd(&["up", "--env", "dev"]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let pid = child.id() as i32;
    // Wait until the primary's create was sent, then interrupt once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !emu.calls().iter().any(|c| c["op"] == "CreateDBInstance") {
        assert!(std::time::Instant::now() < deadline, "no CreateDBInstance");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!run.state_dir().join("dev.lock").exists(), "lock released");
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(run.state_file("dev")).unwrap()).unwrap();
    assert!(state["resources"]["primary/us-east-1/instance"]["id"].is_string(), "the primary is recorded: {state}");
    emu.config(r#"{"rds_hold": null}"#);
    run.ok(&["up", "--env", "dev"]);
    let want = clean_inventory().await;
    assert_eq!(inventory(&emu, "dev").await, want);
}
