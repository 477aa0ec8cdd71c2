//! The network step end to end: up, a no-op second up, plan, status, down.

use crate::harness::{ec2_tag, Emu, Run};
use aws_sdk_ec2::types::Filter;

fn env_filter(env: &str) -> Filter {
    Filter::builder().name("tag:pgdr:env").values(env).build()
}

async fn check_region(emu: &Emu, region: &str, cidr: &str, peer: &str) {
    let ec2 = aws_sdk_ec2::Client::new(&emu.sdk(region).await);
    let vpcs = ec2.describe_vpcs().filters(env_filter("dev")).send().await.unwrap().vpcs.unwrap_or_default();
    assert_eq!(vpcs.len(), 1, "one VPC in {region}");
    let vpc = &vpcs[0];
    assert_eq!(vpc.cidr_block(), Some(cidr));
    assert_eq!(ec2_tag(vpc.tags(), "pgdr:resource").as_deref(), Some("vpc"));
    assert_eq!(ec2_tag(vpc.tags(), "Team").as_deref(), Some("data"), "config tags applied at creation");
    let vpc_id = vpc.vpc_id().unwrap();

    let subnets = ec2.describe_subnets().filters(env_filter("dev")).send().await.unwrap().subnets.unwrap_or_default();
    assert_eq!(subnets.len(), 2);
    let mut azs: Vec<_> = subnets.iter().map(|s| s.availability_zone().unwrap().to_owned()).collect();
    azs.dedup();
    assert_eq!(azs.len(), 2, "subnets in two AZs");
    assert!(subnets.iter().all(|s| s.vpc_id() == Some(vpc_id) && s.map_public_ip_on_launch() != Some(true)));

    let rts = ec2.describe_route_tables().filters(env_filter("dev")).send().await.unwrap().route_tables.unwrap_or_default();
    assert_eq!(rts.len(), 1);
    let rt = &rts[0];
    assert_eq!(rt.associations().iter().filter(|a| a.subnet_id().is_some()).count(), 2);
    let peer_route = rt.routes().iter().find(|r| r.destination_cidr_block() == Some(peer)).expect("route to the peer CIDR");
    assert!(peer_route.vpc_peering_connection_id().is_some_and(|p| p.starts_with("pcx-")));
    assert!(
        !rt.routes().iter().any(|r| r.gateway_id().is_some_and(|g| g.starts_with("igw-")) || r.nat_gateway_id().is_some()),
        "no internet route"
    );

    let db_sg = Filter::builder().name("tag:pgdr:resource").values("db-sg").build();
    let sgs =
        ec2.describe_security_groups().filters(env_filter("dev")).filters(db_sg).send().await.unwrap().security_groups.unwrap_or_default();
    assert_eq!(sgs.len(), 1);
    let mut cidrs: Vec<String> = sgs[0]
        .ip_permissions()
        .iter()
        .filter(|p| p.from_port() == Some(5432) && p.to_port() == Some(5432))
        .flat_map(|p| p.ip_ranges().iter().filter_map(|r| r.cidr_ip().map(str::to_owned)))
        .collect();
    cidrs.sort();
    let mut want = vec![cidr.to_owned(), peer.to_owned()];
    want.sort();
    assert_eq!(cidrs, want, "5432 from both VPCs");

    let eps = ec2.describe_vpc_endpoints().filters(env_filter("dev")).send().await.unwrap().vpc_endpoints.unwrap_or_default();
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].service_name(), Some(format!("com.amazonaws.{region}.s3").as_str()));
    assert!(eps[0].route_table_ids().contains(&rt.route_table_id().unwrap().to_owned()));
}

async fn leftovers(emu: &Emu, region: &str) -> Vec<String> {
    let ec2 = aws_sdk_ec2::Client::new(&emu.sdk(region).await);
    let mut left = Vec::new();
    for v in ec2.describe_vpcs().send().await.unwrap().vpcs.unwrap_or_default() {
        if v.is_default() != Some(true) {
            left.push(format!("vpc {}", v.vpc_id().unwrap_or("?")));
        }
    }
    for p in ec2.describe_vpc_peering_connections().send().await.unwrap().vpc_peering_connections.unwrap_or_default() {
        let code = p.status().and_then(|s| s.code()).map(|c| c.as_str().to_owned()).unwrap_or_default();
        if code != "deleted" {
            left.push(format!("peering {} {code}", p.vpc_peering_connection_id().unwrap_or("?")));
        }
    }
    for e in ec2.describe_vpc_endpoints().send().await.unwrap().vpc_endpoints.unwrap_or_default() {
        // Deleted endpoints stay listed for a while, in AWS too.
        if e.state().is_some_and(|s| s.as_str().eq_ignore_ascii_case("deleted")) {
            continue;
        }
        left.push(format!("endpoint {}", e.vpc_endpoint_id().unwrap_or("?")));
    }
    left
}

#[tokio::test(flavor = "multi_thread")]
async fn up_builds_the_network_then_converges_and_down_removes_it() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.write("pgdr.toml", "[defaults.tags]\nTeam = \"data\"\n");

    // plan on a fresh environment: lists creates, mutates nothing.
    let plan = run.ok(&["plan", "--env", "dev", "--output", "json"]).json();
    assert!(plan["totals"]["create"].as_u64().unwrap() >= 20, "{plan}");
    assert_eq!(emu.mutating_calls(), Vec::<String>::new());
    assert!(!run.state_file("dev").exists(), "plan writes no state");

    run.ok(&["up", "--env", "dev"]);
    check_region(&emu, "us-east-1", "10.0.0.0/16", "10.1.0.0/16").await;
    check_region(&emu, "eu-west-1", "10.1.0.0/16", "10.0.0.0/16").await;
    let ec2 = aws_sdk_ec2::Client::new(&emu.sdk("us-east-1").await);
    let pcx =
        ec2.describe_vpc_peering_connections().filters(env_filter("dev")).send().await.unwrap().vpc_peering_connections.unwrap_or_default();
    assert_eq!(pcx.len(), 1);
    assert_eq!(pcx[0].status().and_then(|s| s.code()).map(|c| c.as_str()), Some("active"));
    assert_eq!(pcx[0].accepter_vpc_info().and_then(|a| a.region()), Some("eu-west-1"));

    // The state file records every resource with its ID, mode 0600, no secret.
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(run.state_file("dev")).unwrap()).unwrap();
    let resources = state["resources"].as_object().unwrap();
    assert!(resources.len() >= 19, "{state}");
    assert!(resources.values().all(|r| r["id"].is_string() && r["status"] == "created"), "{state}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(run.state_file("dev")).unwrap().permissions().mode() & 0o777, 0o600);

    // A second up makes no mutating call, and plan has nothing to do.
    emu.reset_calls();
    let again = run.ok(&["up", "--env", "dev", "--output", "json"]).json();
    assert_eq!(emu.mutating_calls(), Vec::<String>::new(), "second up mutated");
    assert_eq!(again["totals"]["create"], 0);
    assert!(emu.calls().len() > 5, "the second up did look at AWS");
    let plan = run.ok(&["plan", "--env", "dev"]);
    assert!(plan.stdout.contains("Nothing to do"), "{plan:?}");

    // status lists what exists.
    let status = run.ok(&["status", "--env", "dev", "--output", "json"]).json();
    assert_eq!(status["healthy"], true);
    let listed = status["resources"].as_array().unwrap();
    assert!(listed.iter().any(|r| r["kind"] == "vpc" && r["region"] == "eu-west-1" && r["state"] == "exists"));
    assert!(listed.iter().any(|r| r["kind"] == "vpc-peering" && r["state"] == "exists"));

    // down needs --yes without a terminal, and then leaves nothing.
    let refused = run.pgdr(&["down", "--env", "dev"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("--yes"));
    run.ok(&["down", "--env", "dev", "--yes"]);
    for region in ["us-east-1", "eu-west-1"] {
        assert_eq!(leftovers(&emu, region).await, Vec::<String>::new(), "left in {region}");
    }
    assert!(!run.state_file("dev").exists(), "state removed after down");
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_resource_is_recreated_and_untracked_one_adopted() {
    let emu = Emu::start();
    let run = Run::new(&emu);
    run.ok(&["up", "--env", "dev"]);
    let ec2 = aws_sdk_ec2::Client::new(&emu.sdk("eu-west-1").await);
    // Someone deletes the DR endpoint by hand: status says missing, up recreates it.
    let ep = ec2.describe_vpc_endpoints().filters(env_filter("dev")).send().await.unwrap().vpc_endpoints.unwrap_or_default();
    ec2.delete_vpc_endpoints().vpc_endpoint_ids(ep[0].vpc_endpoint_id().unwrap()).send().await.unwrap();
    let status = run.pgdr(&["status", "--env", "dev", "--output", "json"]);
    assert_eq!(status.code, 3, "degraded: {status:?}");
    assert!(status.json()["resources"].as_array().unwrap().iter().any(|r| r["kind"] == "vpc-endpoint" && r["state"] == "missing"));
    emu.reset_calls();
    run.ok(&["up", "--env", "dev"]);
    assert_eq!(emu.mutating_calls(), vec!["ec2 eu-west-1 CreateVpcEndpoint".to_string()]);

    // The state file is lost: up finds everything by tag and adopts it without creating.
    std::fs::remove_file(run.state_file("dev")).unwrap();
    emu.reset_calls();
    let out = run.ok(&["up", "--env", "dev", "--output", "json"]).json();
    assert_eq!(emu.mutating_calls(), Vec::<String>::new());
    assert!(out["totals"]["adopt"].as_u64().unwrap() >= 10, "{out}");
    run.ok(&["down", "--env", "dev", "--yes"]);
    assert!(leftovers(&emu, "us-east-1").await.is_empty());
    assert!(leftovers(&emu, "eu-west-1").await.is_empty());
}
