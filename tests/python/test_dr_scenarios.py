"""DR in motion: `pgdr up` in a private emulator, real PostgreSQL behind both instances, AWS's
control loop played over what pgdr deployed (tests/python/drloop.py), a writer committing rows
through `postgres.<zone>`. Figures are emulated seconds; scripts/drill prints them."""
import json
import time

import pytest

import dr_scenarios
from dr_scenarios import DrEnv, region_loss, region_loss_verdict


@pytest.fixture
def built(pg_bindir):
    if not dr_scenarios.pgdr_bin().exists():
        pytest.fail(f"{dr_scenarios.pgdr_bin()} is missing: build pgdr first (scripts/test does)")
    made = []

    def build(**kw):
        env = DrEnv(bindir_=pg_bindir, **kw)
        made.append(env)
        return env

    yield build
    for env in made:
        env.close()


def test_region_loss_fails_over_with_no_pgdr_command(built):
    env = built()
    f = region_loss(env)
    assert region_loss_verdict(f) == [], f
    assert f["rpo_rows"] == 0, f  # asynchronous replication of a loopback pair: nothing in flight
    assert f["rows_written"] > 50, f
    # The promotion went through the deployed failover function, invoked by the primary-down alarm.
    assert any(i["function"].endswith("-failover") and i["why"].startswith("alarm") for i in env.loop.invocations)


def test_the_deployed_alarm_sets_the_detection_time(built):
    """Detection follows what pgdr deployed: five minutes of failed probes instead of three."""
    env = built(config="[defaults]\nfailover_after_minutes = 5\n")
    f = region_loss(env)
    assert f["bounds"]["detection_window_s"] == 300, f
    assert 240 <= f["detection_s"] <= 420, f
    assert region_loss_verdict(f) == [], f


def test_a_multi_az_blip_does_not_fail_over(built):
    env = built()
    f, bad = dr_scenarios.multi_az_blip(env)
    assert bad == [], f
    assert env.writer.errors_of("timeout"), "the blip reached the writer's open connection"


def test_a_broken_probe_path_never_routes_writes_to_a_read_only_server(built):
    env = built()
    f, bad = dr_scenarios.probe_path_broken(env)
    assert bad == [], f
    assert f["notified"], "a notification says what is wrong"


def test_maintenance_is_not_a_disaster(built):
    """An engine upgrade restarting the database long enough to set off the alarm: the function
    reads `upgrading` and promotes nothing."""
    env = built()
    f, bad = dr_scenarios.maintenance(env)
    assert bad == [], f
    assert f["detection_s"] is not None and f["notified"], f


def test_a_throttled_promotion_is_finished_by_the_resume_schedule(built):
    env = built()
    f, bad = dr_scenarios.stalled_promotion(env)
    assert bad == [], (bad, f["failover_invocations"])
    assert f["throttled_invocation"]["why"].startswith("alarm"), f


def test_manual_failover_while_the_primary_region_is_down(built):
    env = built()
    f, bad = dr_scenarios.manual_failover_region_down(env)
    assert bad == [], f
    assert f["failover_exit"] == 3, f"the fence is pending, so failover says partial: {f['failover_output']}"
    assert f["rpo_rows"] == 0, f


def test_the_way_back_fails_over_the_other_way(built):
    env = built()
    f, bad = dr_scenarios.way_back(env)
    assert bad == [], f
    assert (f["first"]["from"], f["first"]["to"]) == ("us-east-1", "eu-west-1"), f
    assert (f["from"], f["to"]) == ("eu-west-1", "us-east-1"), f


# ---------------------------------------------------------------------------------------------
# Planned switchover and drills (pgdr's agent in the VPCs, through the emulator's invoke hook)

def test_a_switchover_loses_nothing_and_swaps_the_roles(built):
    env = built()
    f, bad = dr_scenarios.switchover(env)
    assert bad == [], (bad, f["output"])
    assert f["rpo_rows"] == 0 and f["promotions"] == 1, f
    assert f["rto_s"] <= f["pause_bound_s"], f
    assert f["report"]["target_lsn"] and f["report"]["replayed_lsn"], f["report"]
    # The agent did the data-plane work in the VPCs, in this order (other calls may come between).
    actions = [c["action"] for c in env.agent_calls if c.get("action")]
    assert [a for a in actions if a in ("fence", "catchup")][:2] == ["fence", "catchup"], actions
    assert any(a == "unguard" for a in actions), actions


def test_a_switchover_that_cannot_catch_up_promotes_nothing(built):
    env = built()
    f, bad = dr_scenarios.switchover_timeout(env)
    assert bad == [], (bad, f["output"])
    assert f["exit"] != 0 and f["promote_calls"] == 0 and f["rpo_rows"] == 0, f


@pytest.mark.parametrize("failover", [False, True], ids=["switchover", "failover"])
def test_a_drill_reports_what_the_application_saw(built, failover):
    env = built()
    f, bad = dr_scenarios.drill(env, failover=failover)
    assert bad == [], (bad, f["output"])
    assert len(f["report"]["legs"]) == 2 and f["report"]["rows_written"] > 0, f["report"]


@pytest.mark.parametrize("point", list(dr_scenarios.KILL_POINTS))
def test_a_killed_switchover_is_finished_or_undone_by_a_rerun(built, point):
    """SIGKILL right after the fence's first revoke, right after the promotion, right after the
    reprotect's CreateDBInstanceReadReplica; then `pgdr unlock` and the same command again."""
    env = built()
    f, bad = dr_scenarios.killed_switchover(env, point)
    assert bad == [], (bad, f["rerun_output"])
    assert f["killed_exit"] == -9 and f["rpo_rows"] == 0, f
    if point != "kill-after-fence":  # past the promotion there is no way back: it must finish
        assert f["ended"] == "switched", f

def test_the_ca_bundle_goes_into_the_configs_defaults():
    """No binary needed: what DrEnv writes as pgdr.toml."""
    import tomllib
    path = "/tmp/x/ca.pem"
    assert tomllib.loads(dr_scenarios.with_ca_bundle("", path)) == {"defaults": {"tls_ca_bundle": path}}
    cfg = "[defaults]\nfailover_after_minutes = 5\n[env.drt]\ndr_region = \"eu-west-1\"\n"
    assert tomllib.loads(dr_scenarios.with_ca_bundle(cfg, path)) == {
        "defaults": {"failover_after_minutes": 5, "tls_ca_bundle": path}, "env": {"drt": {"dr_region": "eu-west-1"}}}
    top = "state = \"s3://b/p\"\n[env.drt]\nrecord_ttl = 30\n"
    assert tomllib.loads(dr_scenarios.with_ca_bundle(top, path)) == {
        "state": "s3://b/p", "env": {"drt": {"record_ttl": 30}}, "defaults": {"tls_ca_bundle": path}}
    mine = "[defaults]\ntls_ca_bundle = \"/mine.pem\"\n"
    assert dr_scenarios.with_ca_bundle(mine, path) == mine


# ---------------------------------------------------------------------------------------------
# The harness itself, without pgdr: a stand-in for what `pgdr up` builds (made here with boto3),
# and pgdr's agent (src/lambda/agent.py) invoked through the emulator's invoke hook, over TLS,
# with the security groups deciding who reaches the databases.

AGENT = dr_scenarios.REPO / "src" / "lambda" / "agent.py"


class StandIn(dr_scenarios.DrEnv):
    """DrEnv over an environment made with boto3 (what the harness reads of `up`), not pgdr."""

    def build(self, config):
        import io
        import zipfile
        from emutools import ctl
        rules = [r["name"] for r in ctl(self.url, "/__proxy/rules")]
        ctl(self.url, "/__proxy/config", {"rules_off": [r for r in rules if r != "lambda-code-location"]})
        name, tag = self.name, [{"Key": "pgdr:env", "Value": self.name}]
        self.client("secretsmanager", dr_scenarios.PRIMARY).create_secret(
            Name=f"pgdr/{name}/master", SecretString=json.dumps({"username": "pgdr", "password": "Pa55-w0rd-xyz",
                                                                 "dbname": "app"}))
        cidrs = {dr_scenarios.PRIMARY: "10.0.0.0/16", dr_scenarios.DR: "10.1.0.0/16"}
        package = io.BytesIO()
        with zipfile.ZipFile(package, "w") as z:
            z.write(AGENT, "agent.py")
        role = self.client("iam", dr_scenarios.PRIMARY).create_role(
            RoleName=f"pgdr-{name}-agent", AssumeRolePolicyDocument=json.dumps({
                "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                        "Principal": {"Service": "lambda.amazonaws.com"}}]}))["Role"]["Arn"]
        ids, vpcs = {}, {}
        for region, cidr in cidrs.items():
            ec2 = self.client("ec2", region)
            vpc = ec2.create_vpc(CidrBlock=cidr, TagSpecifications=[{"ResourceType": "vpc", "Tags": tag}])["Vpc"]["VpcId"]
            vpcs[region] = vpc
            subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=cidr.replace("0.0/16", f"{i}.0/24"))["Subnet"]["SubnetId"]
                       for i in (1, 2)]
            agent_sg = ec2.create_security_group(VpcId=vpc, GroupName=f"pgdr-{name}-agent", Description="agent")["GroupId"]
            db_sg = ec2.create_security_group(VpcId=vpc, GroupName=f"pgdr-{name}-db", Description="db")["GroupId"]
            ec2.authorize_security_group_ingress(GroupId=db_sg, IpPermissions=[
                {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "IpRanges": [{"CidrIp": c} for c in cidrs.values()]},
                {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432,
                 "UserIdGroupPairs": [{"GroupId": agent_sg, "Description": "pgdr agent"}]}])
            ids[region] = db_sg
            self.client("lambda", region).create_function(
                FunctionName=f"pgdr-{name}-agent", Runtime="python3.12", Role=role, Handler="agent.handler",
                Timeout=900, Code={"ZipFile": package.getvalue()},
                VpcConfig={"SubnetIds": subnets, "SecurityGroupIds": [agent_sg]})
        rds_p = self.client("rds", dr_scenarios.PRIMARY)
        primary = rds_p.create_db_instance(
            DBInstanceIdentifier=f"pgdr-{name}-{dr_scenarios.PRIMARY}", DBInstanceClass="db.t3.micro",
            Engine="postgres", MasterUsername="pgdr", MasterUserPassword="Pa55-w0rd-xyz", AllocatedStorage=20,
            VpcSecurityGroupIds=[ids[dr_scenarios.PRIMARY]])["DBInstance"]
        self.client("rds", dr_scenarios.DR).create_db_instance_read_replica(
            DBInstanceIdentifier=f"pgdr-{name}-{dr_scenarios.DR}", SourceDBInstanceIdentifier=primary["DBInstanceArn"],
            DBInstanceClass="db.t3.micro", VpcSecurityGroupIds=[ids[dr_scenarios.DR]])
        endpoints = {r: self.describe(r, f"pgdr-{name}-{r}")["Endpoint"]["Address"] for r in cidrs}
        r53 = self.client("route53", dr_scenarios.PRIMARY)
        zone = r53.create_hosted_zone(Name=f"db-{name}.internal", CallerReference=name,
                                      VPC={"VPCRegion": dr_scenarios.PRIMARY, "VPCId": vpcs[dr_scenarios.PRIMARY]},
                                      HostedZoneConfig={"PrivateZone": True})["HostedZone"]["Id"]
        r53.change_resource_record_sets(HostedZoneId=zone, ChangeBatch={"Changes": [
            {"Action": "CREATE", "ResourceRecordSet": {"Name": f"postgres.db-{name}.internal", "Type": "CNAME",
                                                       "SetIdentifier": r, "Weight": w, "TTL": 60,
                                                       "ResourceRecords": [{"Value": endpoints[r]}]}}
            for r, w in ((dr_scenarios.PRIMARY, 100), (dr_scenarios.DR, 0))]})
        ctl(self.url, "/__proxy/config", {"rules_off": []})


def test_the_harness_runs_the_deployed_agent_through_the_invoke_hook(pg_bindir):
    """No pgdr binary: the agent's code read back from the emulator runs in its VPC, reaches the
    clusters over verified TLS as the security groups allow, and answers as Lambda does."""
    import threading

    import boto3
    import botocore.exceptions
    from botocore.config import Config
    from emutools import ctl
    env = StandIn(name="hst", bindir_=pg_bindir)
    try:
        cfg = Config(retries={"total_max_attempts": 1}, read_timeout=120)

        def lam(region):
            return boto3.client("lambda", region_name=region, endpoint_url=env.url, aws_access_key_id="test",
                                aws_secret_access_key="test", config=cfg)
        base = {"credentials": {"username": env.user, "password": env.password}, "ca_bundle": env.pair.ca_pem,
                "database": env.dbname, "port": 5432}

        def invoke(region, **event):
            out = lam(region).invoke(FunctionName="pgdr-hst-agent", Payload=json.dumps({**base, **event}))
            return out.get("FunctionError"), json.loads(out["Payload"].read())
        # The primary's endpoint from its own region; the zone's CNAME from the other (over the peering).
        err, out = invoke("us-east-1", action="check", host=env.primary.endpoint)
        assert err is None and out["in_recovery"] is False, out
        err, out = invoke("eu-west-1", action="check", host=env.writer_name)
        assert err is None and out["in_recovery"] is False, out
        err, out = invoke("eu-west-1", action="check", host=env.dr.endpoint)
        assert err is None and out["in_recovery"] is True, out
        # The loop's own invocations (schedules, alarms) take the same path.
        arn = next(a for a, f in env.loop.functions.items() if f["region"] == "us-east-1")
        env.loop.invoke(arn, {**base, "action": "check", "host": env.writer_name}, "test")
        env.loop.collect(wait=True)
        [mine] = [i for i in env.loop.invocations if i["why"] == "test"]
        assert mine["error"] is None and mine["result"]["in_recovery"] is False, mine
        # A marker writer runs for seconds while other invocations come and go.
        written = {}
        writer = threading.Thread(target=lambda: written.update(out=invoke(
            "us-east-1", action="write", host=env.writer_name, run_id="t1", duration_s=3, interval_ms=100)))
        writer.start()
        time.sleep(0.5)
        assert invoke("us-east-1", action="check", host=env.primary.endpoint)[0] is None
        writer.join(60)
        err, out = written["out"]
        assert err is None and out["acked_count"] > 5, out
        err, marks = invoke("us-east-1", action="markers", host=env.writer_name, run_id="t1")
        assert err is None and marks["count"] == out["acked_count"], marks
        # The CIDR rules revoked (the switchover's fence): the application and the other region's
        # agent are out, the primary region's agent (its security group is referenced) is in.
        ec2 = env.client("ec2", "us-east-1")
        [sg] = env.primary.security_groups
        ec2.revoke_security_group_ingress(GroupId=sg, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432,
             "IpRanges": [{"CidrIp": env.vpc_cidrs[r]} for r in ("us-east-1", "eu-west-1")]}])
        env.follow_rds()
        with pytest.raises(LookupError):
            env.resolve(env.writer_name)
        assert invoke("us-east-1", action="check", host=env.primary.endpoint)[0] is None
        err, out = invoke("eu-west-1", action="check", host=env.primary.endpoint, connect_timeout_s=1)
        assert err == "Unhandled" and out["errorType"] == "AgentError" and "errorMessage" in out, out
        assert "cannot connect" in out["errorMessage"] or "timed out" in out["errorMessage"], out
        # Lambda's other answers: Event, DryRun; the credential never recorded.
        assert lam("us-east-1").invoke(FunctionName="pgdr-hst-agent", InvocationType="DryRun")["StatusCode"] == 204
        with pytest.raises(botocore.exceptions.ClientError) as e:
            lam("us-east-1").invoke(FunctionName="pgdr-hst-nothing", Payload=b"{}")
        assert e.value.response["Error"]["Code"] == "ResourceNotFoundException"
        assert env.password not in json.dumps(ctl(env.url, "/__proxy/calls"))
        assert env.password not in json.dumps(env.agent_calls, default=str)
        assert {c["action"] for c in env.agent_calls} == {"check", "write", "markers"}
    finally:
        env.close()
