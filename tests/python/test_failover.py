"""The failover handler against moto: a primary in us-east-1, its replica in eu-west-1, a private
zone with two weighted CNAMEs, and an SNS topic read back through an SQS queue."""
import json

import boto3
import pytest
from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
from moto import mock_aws

import failover

PRIMARY, REPLICA = "pgdr-t-us-east-1", "pgdr-t-eu-west-1"
NAME = "postgres.db-t.internal."


class Spy:
    """Wraps a boto3 client: records method calls (names in .calls, keyword arguments in .args),
    can raise or rewrite answers. A fail value that is a list is used up one call at a time
    (None: that call goes through); a callable is called with the arguments and returns what to
    raise."""

    def __init__(self, client, fail=None, rewrite=None):
        self._client, self._fail, self._rewrite, self.calls, self.args = \
            client, fail or {}, rewrite or {}, [], []

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append(name)
            self.args.append((name, kwargs))
            fail = self._fail.get(name)
            if isinstance(fail, list):
                fail = fail.pop(0) if fail else None
            if callable(fail) and not isinstance(fail, BaseException):
                fail = fail(*args, **kwargs)
            if fail is not None:
                raise fail
            out = attr(*args, **kwargs)
            return self._rewrite[name](out) if name in self._rewrite else out
        return call

    def kwargs(self, name):
        return [kw for n, kw in self.args if n == name]


class FakeContext:
    """A Lambda context whose remaining time shrinks only by the handler's (patched) sleeps."""

    def __init__(self, seconds=900):
        self.left_ms = seconds * 1000

    def get_remaining_time_in_millis(self):
        return self.left_ms

    def sleep(self, seconds):
        self.left_ms -= seconds * 1000


class Scene:
    def __init__(self, monkeypatch):
        self.mp, self.real_from_config = monkeypatch, failover.Clients.from_config
        self.rds_p, self.rds_dr = boto3.client("rds", "us-east-1"), boto3.client("rds", "eu-west-1")
        self.r53, self.sqs = boto3.client("route53"), boto3.client("sqs", "eu-west-1")
        p = self.rds_p.create_db_instance(
            DBInstanceIdentifier=PRIMARY, Engine="postgres", DBInstanceClass="db.t3.micro",
            AllocatedStorage=20, MasterUsername="pgdr", MasterUserPassword="not-a-real-one-1",
            BackupRetentionPeriod=7)["DBInstance"]
        r = self.rds_dr.create_db_instance_read_replica(
            DBInstanceIdentifier=REPLICA, SourceDBInstanceIdentifier=p["DBInstanceArn"],
            DBInstanceClass="db.t3.micro")["DBInstance"]
        self.primary_ep, self.replica_ep = p["Endpoint"]["Address"], r["Endpoint"]["Address"]
        self.replica_arn = r["DBInstanceArn"]
        self.ec2 = boto3.client("ec2", "us-east-1")
        vpc = self.ec2.create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
        # The primary's database group: 5432 from both VPCs, a range that covers 5432, and SSH.
        self.sg = self.ec2.create_security_group(GroupName="pgdr-t-db", Description="db", VpcId=vpc)["GroupId"]
        self.ec2.authorize_security_group_ingress(GroupId=self.sg, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "IpRanges": [{"CidrIp": "10.10.0.0/16"}]},
            {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "IpRanges": [{"CidrIp": "10.20.0.0/16"}]},
            {"IpProtocol": "tcp", "FromPort": 5400, "ToPort": 5500, "IpRanges": [{"CidrIp": "10.30.0.0/16"}]},
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "10.10.0.0/16"}]}])
        self.primary_arn = p["DBInstanceArn"]
        # moto keeps ReadReplicaSourceDBInstanceIdentifier after PromoteReadReplica; RDS drops it
        # once the promotion is done. The handler's DR describes see RDS's behaviour: after the
        # promote call, one (status, source kept) per describe from after_promote, then
        # ("available", no source) for good.
        self.promote_called, self.after_promote = False, []
        self.zone = self.r53.create_hosted_zone(
            Name="db-t.internal", CallerReference="zone-t", HostedZoneConfig={"PrivateZone": True},
            VPC={"VPCRegion": "us-east-1", "VPCId": vpc})["HostedZone"]["Id"]
        self.hc = self.r53.create_health_check(CallerReference="hc-t", HealthCheckConfig={
            "Type": "CLOUDWATCH_METRIC", "InsufficientDataHealthStatus": "Unhealthy",
            "AlarmIdentifier": {"Region": "us-east-1", "Name": "pgdr-t-primary-down"}})["HealthCheck"]["Id"]
        self.r53.change_resource_record_sets(HostedZoneId=self.zone, ChangeBatch={"Changes": [
            {"Action": "CREATE", "ResourceRecordSet": {
                "Name": NAME, "Type": "CNAME", "SetIdentifier": "us-east-1", "Weight": 100, "TTL": 30,
                "ResourceRecords": [{"Value": self.primary_ep}], "HealthCheckId": self.hc}},
            {"Action": "CREATE", "ResourceRecordSet": {
                "Name": NAME, "Type": "CNAME", "SetIdentifier": "eu-west-1", "Weight": 0, "TTL": 30,
                "ResourceRecords": [{"Value": self.replica_ep}]}}]})
        self.cw = boto3.client("cloudwatch", "eu-west-1")
        self.cw.put_metric_alarm(AlarmName="pgdr-t-primary-down", Namespace="AWS/Lambda", MetricName="Errors",
                                 Statistic="Sum", Period=60, EvaluationPeriods=3, Threshold=1.0,
                                 ComparisonOperator="GreaterThanOrEqualToThreshold")
        sns = boto3.client("sns", "eu-west-1")
        topic = sns.create_topic(Name="pgdr-t-alerts")["TopicArn"]
        self.queue = self.sqs.create_queue(QueueName="pgdr-t-alerts")["QueueUrl"]
        qarn = self.sqs.get_queue_attributes(QueueUrl=self.queue, AttributeNames=["QueueArn"])
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=qarn["Attributes"]["QueueArn"])
        for key, value in {"PGDR_ENV": "t", "PRIMARY_REGION": "us-east-1", "PRIMARY_DB_ID": PRIMARY,
                           "DR_REGION": "eu-west-1", "REPLICA_DB_ID": REPLICA, "HOSTED_ZONE_ID": self.zone,
                           "RECORD_NAME": NAME, "PRIMARY_SET_ID": "us-east-1", "REPLICA_SET_ID": "eu-west-1",
                           "RECORD_TTL": "30", "HEALTH_CHECK_ID": self.hc, "TOPIC_ARN": topic,
                           "PRIMARY_TIMEOUT_S": "1", "ALARM_NAME": "pgdr-t-primary-down",
                           "PRIMARY_SG_ID": self.sg}.items():
            monkeypatch.setenv(key, value)
        self.ctx = FakeContext()
        monkeypatch.setattr(failover, "sleep", lambda s: self.ctx.sleep(s))
        self.spy()

    def spy(self, primary_fail=None, dr_rewrite=None, primary_rewrite=None, cw_fail=None, ec2_fail=None):
        """Make the handler's clients Spies (real construction, then wrapped). The DR client's
        describes follow RDS's promotion (see after_promote), then dr_rewrite."""
        def promote(out):
            self.promote_called = True
            return out

        def dr_describe(out):
            if self.promote_called:
                inst = out["DBInstances"][0]
                status, keep = self.after_promote.pop(0) if self.after_promote else ("available", False)
                inst["DBInstanceStatus"] = status
                if not keep:
                    inst.pop("ReadReplicaSourceDBInstanceIdentifier", None)
            extra = (dr_rewrite or {}).get("describe_db_instances")
            return extra(out) if extra else out

        def from_config(cfg):
            c = self.real_from_config(cfg)
            rewrite = dict(dr_rewrite or {}, describe_db_instances=dr_describe, promote_read_replica=promote)
            self.clients = failover.Clients(Spy(c.dr_rds, rewrite=rewrite),
                                            Spy(c.primary_rds, fail=primary_fail, rewrite=primary_rewrite),
                                            Spy(c.route53), Spy(c.sns), Spy(c.cloudwatch, fail=cw_fail),
                                            Spy(c.primary_ec2, fail=ec2_fail))
            return self.clients
        self.mp.setattr(failover.Clients, "from_config", from_config)

    def invoke(self, event=None, seconds=900):
        self.ctx = FakeContext(seconds)
        return failover.handler({} if event is None else event, self.ctx)

    def records(self):
        rrs = self.r53.list_resource_record_sets(HostedZoneId=self.zone)["ResourceRecordSets"]
        return {r["SetIdentifier"]: r for r in rrs if r["Name"] == NAME and r["Type"] == "CNAME"}

    def weights(self):
        return {k: r["Weight"] for k, r in self.records().items()}

    def messages(self):
        out = []
        while True:
            got = self.sqs.receive_message(QueueUrl=self.queue, MaxNumberOfMessages=10).get("Messages", [])
            if not got:
                return out
            for m in got:
                body = json.loads(m["Body"])
                out.append((body.get("Subject"), body["Message"]))
                self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=m["ReceiptHandle"])

    def role_tag(self):
        tags = self.rds_dr.list_tags_for_resource(ResourceName=self.replica_arn)["TagList"]
        return {t["Key"]: t["Value"] for t in tags}.get("pgdr:role")

    def replica_source(self):
        inst = self.rds_dr.describe_db_instances(DBInstanceIdentifier=REPLICA)["DBInstances"][0]
        return inst.get("ReadReplicaSourceDBInstanceIdentifier")

    def stop_primary(self):
        self.rds_p.stop_db_instance(DBInstanceIdentifier=PRIMARY)

    def primary_role_tag(self):
        tags = self.rds_p.list_tags_for_resource(ResourceName=self.primary_arn)["TagList"]
        return {t["Key"]: t["Value"] for t in tags}.get("pgdr:role")

    def ingress(self):
        """The primary group's ingress rules as (from, to, cidr)."""
        rules = self.ec2.describe_security_group_rules(
            Filters=[{"Name": "group-id", "Values": [self.sg]}])["SecurityGroupRules"]
        return sorted((r["FromPort"], r["ToPort"], r.get("CidrIpv4")) for r in rules if not r["IsEgress"])

    def metrics(self):
        """The ReplicaPromoted values the handler published in this invocation, in order."""
        out = []
        for kw in self.clients.cloudwatch.kwargs("put_metric_data"):
            assert kw["Namespace"] == "pgdr", kw
            (d,) = kw["MetricData"]
            assert d["MetricName"] == "ReplicaPromoted" and d["Unit"] == "Count", d
            assert d["Dimensions"] == [{"Name": "Environment", "Value": "t"}], d
            out.append(d["Value"])
        return out


@pytest.fixture
def scene(aws_env, monkeypatch):
    with mock_aws():
        yield Scene(monkeypatch)


def assert_failed_over(scene, out):
    assert out["action"] == "promoted", out
    assert "promote_read_replica" in scene.clients.dr_rds.calls
    assert scene.role_tag() == "primary"
    recs = scene.records()
    assert scene.weights() == {"us-east-1": 0, "eu-west-1": 100}
    assert recs["eu-west-1"]["ResourceRecords"] == [{"Value": scene.replica_ep}]
    assert recs["us-east-1"]["ResourceRecords"] == [{"Value": scene.primary_ep}]
    assert recs["us-east-1"].get("HealthCheckId") == scene.hc
    assert "HealthCheckId" not in recs["eu-west-1"]
    assert scene.metrics() == [1]  # published once, after the promotion
    msgs = scene.messages()
    assert len(msgs) == 1 and msgs[0][0] == "pgdr t: failed over to eu-west-1", msgs
    return msgs[0][1]


def test_healthy_primary_changes_nothing(scene):
    before = scene.records()
    out = scene.invoke()
    assert out["action"] == "none" and out["reason"] == "primary available" and not out["dns_changes"]
    assert "promote_read_replica" not in scene.clients.dr_rds.calls
    assert "change_resource_record_sets" not in scene.clients.route53.calls
    assert scene.replica_source() and scene.role_tag() is None
    assert scene.records() == before and scene.weights() == {"us-east-1": 100, "eu-west-1": 0}
    assert scene.messages() == []


def test_healthy_primary_repairs_weights(scene):
    scene.r53.change_resource_record_sets(HostedZoneId=scene.zone, ChangeBatch={"Changes": [
        {"Action": "UPSERT", "ResourceRecordSet": dict(scene.records()["us-east-1"], Weight=0)}]})
    out = scene.invoke()
    assert out["action"] == "none" and len(out["dns_changes"]) == 2
    assert scene.clients.route53.calls.count("change_resource_record_sets") == 1
    assert scene.weights() == {"us-east-1": 100, "eu-west-1": 0}
    assert scene.records()["us-east-1"]["HealthCheckId"] == scene.hc
    assert "promote_read_replica" not in scene.clients.dr_rds.calls


def test_stopped_primary_fails_over(scene):
    scene.stop_primary()
    body = assert_failed_over(scene, scene.invoke())
    assert "status stopped" in body and "eu-west-1" in body
    assert scene.clients.route53.calls.count("change_resource_record_sets") == 1


def test_alarm_event_fails_over(scene):
    scene.stop_primary()
    event = {"source": "aws.cloudwatch", "alarmArn": "arn:aws:cloudwatch:eu-west-1:123456789012:alarm:x",
             "alarmData": {"alarmName": "pgdr-t-primary-down", "state": {"value": "ALARM"}}}
    assert_failed_over(scene, scene.invoke(event))


def test_alarm_back_to_ok_does_nothing(scene):
    scene.stop_primary()
    out = scene.invoke({"source": "aws.cloudwatch", "alarmData": {"state": {"value": "OK"}}})
    assert out["action"] == "none" and scene.role_tag() is None
    assert scene.weights() == {"us-east-1": 100, "eu-west-1": 0}


@pytest.mark.parametrize("replica", ["storage-full", "deleted"])
def test_primary_and_replica_down_is_an_error_without_changes(scene, replica):
    scene.stop_primary()
    if replica == "deleted":
        try:
            scene.rds_dr.delete_db_instance(DBInstanceIdentifier=REPLICA, SkipFinalSnapshot=True)
        except (ClientError, ValueError):
            pass  # moto: deleting an unpromoted cross-region replica fails after deleting it
        with pytest.raises(ClientError, match="DBInstanceNotFound"):
            scene.rds_dr.describe_db_instances(DBInstanceIdentifier=REPLICA)
    else:
        # AWS (and moto) refuse to stop a read replica: fake a status it cannot be promoted in.
        def broken(out):
            out["DBInstances"][0]["DBInstanceStatus"] = replica
            return out
        scene.spy(dr_rewrite={"describe_db_instances": broken})
    before = scene.records()
    out = scene.invoke()
    status = "not found" if replica == "deleted" else replica
    assert out["action"] == "none" and f"({status})" in out["error"], out
    assert "promote_read_replica" not in scene.clients.dr_rds.calls
    assert scene.records() == before
    msgs = scene.messages()
    assert len(msgs) == 1, msgs
    assert msgs[0][0] == f"pgdr t: primary down but replica not available ({status}) - no failover"


def test_second_invocation_is_a_no_op(scene):
    scene.stop_primary()
    assert_failed_over(scene, scene.invoke())
    after = scene.records()
    out = scene.invoke()
    assert out["action"] == "none" and out["reason"] == "already failed over" and not out["dns_changes"]
    assert "promote_read_replica" not in scene.clients.dr_rds.calls
    assert "change_resource_record_sets" not in scene.clients.route53.calls
    assert scene.records() == after and scene.messages() == []


def test_unreachable_primary_region_counts_as_down(scene):
    scene.spy(primary_fail={"describe_db_instances": EndpointConnectionError(
        endpoint_url="https://rds.us-east-1.amazonaws.com/")})
    out = scene.invoke()
    body = assert_failed_over(scene, out)
    assert "EndpointConnectionError" in body
    assert out["primary"]["down"] is True and out["primary"]["kind"] == "unreachable"
    # asked once to decide, once to fence (which is then pending)
    assert scene.clients.primary_rds.calls == ["describe_db_instances"] * 2
    assert out["fence"]["state"] == "pending"


def test_primary_client_has_short_timeouts(scene):
    cfg = failover.load_config()
    client = failover.Clients.from_config(cfg).primary_rds._client
    assert client.meta.region_name == "us-east-1"
    assert client.meta.config.connect_timeout == 1 and client.meta.config.read_timeout == 1
    assert client.meta.config.retries["total_max_attempts"] == 2


def test_old_primary_back_does_not_move_dns_back(scene):
    scene.stop_primary()
    assert_failed_over(scene, scene.invoke())
    scene.rds_p.start_db_instance(DBInstanceIdentifier=PRIMARY)
    out = scene.invoke()
    assert out["action"] == "none" and out["reason"] == "already failed over"
    assert scene.weights() == {"us-east-1": 0, "eu-west-1": 100}
    # the old primary is only read, to see that it is fenced; nothing is asked of it
    assert scene.clients.primary_rds.calls == ["describe_db_instances"]
    assert out["fence"]["state"] == "already" and scene.primary_role_tag() == "fenced"


def test_dns_reverted_by_hand_after_failover_is_moved_back_to_dr(scene):
    scene.stop_primary()
    assert_failed_over(scene, scene.invoke())
    scene.rds_p.start_db_instance(DBInstanceIdentifier=PRIMARY)
    recs = scene.records()
    scene.r53.change_resource_record_sets(HostedZoneId=scene.zone, ChangeBatch={"Changes": [
        {"Action": "UPSERT", "ResourceRecordSet": dict(recs["us-east-1"], Weight=100)},
        {"Action": "UPSERT", "ResourceRecordSet": dict(recs["eu-west-1"], Weight=0)}]})
    out = scene.invoke()
    assert out["reason"] == "already failed over" and len(out["dns_changes"]) == 2
    assert scene.weights() == {"us-east-1": 0, "eu-west-1": 100}
    assert scene.records()["us-east-1"]["HealthCheckId"] == scene.hc
    assert [s for s, _ in scene.messages()] == ["pgdr t: DNS moved to eu-west-1"]


def test_check_reports_and_changes_nothing(scene):
    scene.stop_primary()
    before = scene.records()
    out = scene.invoke({"action": "check"})
    assert out["action"] == "check" and out["would"] == "promoted" and out["dry_run"] is True, out
    assert any("eu-west-1 weight 100" in c for c in out["dns_changes"])
    assert "status stopped" in out["reason"]
    assert "promote_read_replica" not in scene.clients.dr_rds.calls
    assert "change_resource_record_sets" not in scene.clients.route53.calls
    assert scene.records() == before and scene.role_tag() is None and scene.messages() == []


def test_busy_replica_means_retry_later(scene):
    scene.stop_primary()
    def from_config(cfg):
        c = scene.real_from_config(cfg)
        busy = ClientError({"Error": {"Code": "InvalidDBInstanceState", "Message": "backing-up"}},
                           "PromoteReadReplica")
        scene.clients = failover.Clients(Spy(c.dr_rds, fail={"promote_read_replica": busy}),
                                         c.primary_rds, Spy(c.route53), c.sns)
        return scene.clients
    scene.mp.setattr(failover.Clients, "from_config", from_config)
    before = scene.records()
    out = scene.invoke()
    assert out["action"] == "retry_later" and "busy" in out["error"]
    assert "change_resource_record_sets" not in scene.clients.route53.calls
    assert scene.records() == before and scene.role_tag() is None
    assert len(scene.messages()) == 1


def test_a_promotion_made_meanwhile_is_finished_not_postponed(scene):
    """`pgdr failover` promoted the replica after this invocation read it: RDS refuses the
    second promotion (InvalidDBInstanceState), and the invocation finishes the failover that
    started instead of reporting a busy replica."""
    scene.stop_primary()

    def promoted_by_pgdr(**kw):
        scene.promote_called = True  # RDS promotes it (the scene's describes follow)
        scene.rds_dr.add_tags_to_resource(ResourceName=scene.replica_arn, Tags=[{"Key": "pgdr:role", "Value": "primary"}])
        return ClientError({"Error": {"Code": "InvalidDBInstanceState", "Message": "DB Instance is not a read replica."}},
                           "PromoteReadReplica")

    scene.spy()
    spied = failover.Clients.from_config

    def from_config(cfg):
        c = spied(cfg)
        c.dr_rds._fail = {"promote_read_replica": [promoted_by_pgdr]}
        return c
    scene.mp.setattr(failover.Clients, "from_config", from_config)
    out = scene.invoke()
    assert out["action"] == "none" and out["reason"] == "already failed over", out
    assert scene.clients.dr_rds.calls.count("promote_read_replica") == 1
    assert scene.weights() == {"us-east-1": 0, "eu-west-1": 100}
    assert [s for s, _ in scene.messages()] == ["pgdr t: DNS moved to eu-west-1"]


def test_slow_promotion_is_finished_by_the_next_invocation(scene):
    scene.stop_primary()

    def modifying(out):
        if "promote_read_replica" in scene.clients.dr_rds.calls:
            out["DBInstances"][0]["DBInstanceStatus"] = "modifying"
        return out
    scene.spy(dr_rewrite={"describe_db_instances": modifying})

    out = scene.invoke(seconds=95)  # 35 s of budget after the margin; each poll sleeps 10 s of it
    assert out["action"] == "promotion_in_progress", out
    assert scene.clients.dr_rds.calls.count("describe_db_instances") == 1 + 3  # polls at 25, 15, 5 s left
    assert scene.weights() == {"us-east-1": 100, "eu-west-1": 0}  # DNS not moved yet
    assert scene.role_tag() == "primary"  # but the decision is recorded
    assert len(scene.messages()) == 1
    scene.spy()
    out = scene.invoke()
    assert out["action"] == "none" and out["reason"] == "already failed over"
    assert "promote_read_replica" not in scene.clients.dr_rds.calls
    assert scene.weights() == {"us-east-1": 0, "eu-west-1": 100}
    assert scene.records()["eu-west-1"]["ResourceRecords"] == [{"Value": scene.replica_ep}]


def test_promotion_waits_for_the_reboot_not_the_stale_available(scene):
    """AWS may still say "available" just after PromoteReadReplica, then goes through
    "modifying": DNS must move only once the instance is available again afterwards."""
    scene.stop_primary()
    scene.after_promote = [("available", True), ("modifying", True), ("modifying", True)]
    assert_failed_over(scene, scene.invoke())
    assert scene.clients.dr_rds.calls.count("describe_db_instances") == 1 + 4


def test_failover_writes_the_real_replica_endpoint(scene):
    rec = scene.records()["eu-west-1"]
    scene.r53.change_resource_record_sets(HostedZoneId=scene.zone, ChangeBatch={"Changes": [
        {"Action": "UPSERT", "ResourceRecordSet": dict(rec, ResourceRecords=[{"Value": "stale.example."}])}]})
    scene.stop_primary()
    assert_failed_over(scene, scene.invoke())  # asserts the value is the replica's endpoint


def test_check_with_nothing_to_fail_over_to_publishes_nothing(scene):
    scene.stop_primary()

    def broken(out):
        out["DBInstances"][0]["DBInstanceStatus"] = "storage-full"
        return out
    scene.spy(dr_rewrite={"describe_db_instances": broken})
    out = scene.invoke({"action": "check"})
    assert out["action"] == "check" and out["would"] == "none" and "storage-full" in out["error"]
    assert scene.messages() == []


def test_no_context_means_840_s_budget(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(failover.time, "monotonic", lambda: clock[0])
    left = failover.time_budget(None)
    clock[0] += 40
    assert left() == 800
    assert failover.time_budget(FakeContext(100))() == 40


def test_missing_env_var_is_named(scene, monkeypatch):
    monkeypatch.delenv("HOSTED_ZONE_ID")
    with pytest.raises(failover.ConfigError, match="HOSTED_ZONE_ID"):
        scene.invoke()
    monkeypatch.setenv("HOSTED_ZONE_ID", "Z1")
    monkeypatch.setenv("RECORD_TTL", "thirty")
    with pytest.raises(failover.ConfigError, match="RECORD_TTL"):
        scene.invoke()


def test_unknown_action_is_refused(scene):
    with pytest.raises(ValueError, match="promote_now"):
        scene.invoke({"action": "promote_now"})


RESUME = {"action": "resume"}


def test_resume_does_nothing_while_the_alarm_is_not_in_alarm(scene):
    scene.stop_primary()  # down, but the alarm has not fired: the schedule must not decide alone
    out = scene.invoke(RESUME)
    assert out["action"] == "none" and "not promoted" in out["reason"], out
    assert "promote_read_replica" not in scene.clients.dr_rds.calls
    assert "change_resource_record_sets" not in scene.clients.route53.calls
    assert scene.weights() == {"us-east-1": 100, "eu-west-1": 0}


def test_resume_fails_over_while_the_alarm_is_in_alarm(scene):
    scene.stop_primary()
    scene.cw.set_alarm_state(AlarmName="pgdr-t-primary-down", StateValue="ALARM", StateReason="probe failing")
    assert_failed_over(scene, scene.invoke(RESUME))


def test_resume_finishes_a_failover_whose_dns_update_failed(scene):
    scene.stop_primary()
    scene.cw.set_alarm_state(AlarmName="pgdr-t-primary-down", StateValue="ALARM", StateReason="probe failing")
    scene.invoke(RESUME)
    # DNS put back by hand (or a failed update), the alarm back to OK: the promoted replica wins.
    scene.r53.change_resource_record_sets(HostedZoneId=scene.zone, ChangeBatch={"Changes": [
        {"Action": "UPSERT", "ResourceRecordSet": dict(scene.records()["us-east-1"], Weight=100)},
        {"Action": "UPSERT", "ResourceRecordSet": dict(scene.records()["eu-west-1"], Weight=0)}]})
    scene.cw.set_alarm_state(AlarmName="pgdr-t-primary-down", StateValue="OK", StateReason="back")
    scene.spy()
    out = scene.invoke(RESUME)
    assert out["action"] == "none" and out["reason"] == "already failed over", out
    assert scene.weights() == {"us-east-1": 0, "eu-west-1": 100}
    assert "promote_read_replica" not in scene.clients.dr_rds.calls
    # Once DNS is right, a minute later changes nothing (no tag rewritten either).
    scene.spy()
    scene.invoke(RESUME)
    assert "change_resource_record_sets" not in scene.clients.route53.calls
    assert "add_tags_to_resource" not in scene.clients.dr_rds.calls


# -- promoted means promoted: available and no ReadReplicaSourceDBInstanceIdentifier -----------

ALARM = {"source": "aws.cloudwatch", "alarmArn": "arn:aws:cloudwatch:eu-west-1:123456789012:alarm:pgdr-t-primary-down",
         "alarmData": {"alarmName": "pgdr-t-primary-down", "state": {"value": "ALARM"}}}


def test_available_with_the_source_link_is_not_promoted(scene):
    """RDS may say "available" for a while after PromoteReadReplica, source link still in place:
    DNS waits for the link to go, however many polls that takes (no "calm polls" shortcut)."""
    scene.stop_primary()
    scene.after_promote = [("available", True)] * 5
    orig = failover.set_weights

    def guarded(c, cfg, weights, *a, **kw):
        if weights[cfg["REPLICA_SET_ID"]] == 100:
            assert not scene.after_promote, "DNS moved while the instance was still a replica"
        return orig(c, cfg, weights, *a, **kw)
    scene.mp.setattr(failover, "set_weights", guarded)
    assert_failed_over(scene, scene.invoke())
    assert scene.clients.dr_rds.calls.count("describe_db_instances") == 1 + 6


def test_resume_does_not_move_dns_to_an_instance_still_promoting(scene):
    """The schedule finds the replica tagged primary (the promotion was requested) but still a
    replica: DNS stays on the primary, the metric says 0, until the promotion is done."""
    scene.stop_primary()
    scene.after_promote = [("modifying", True)] * 6
    out = scene.invoke(seconds=95)  # 3 polls, all "modifying" with the source
    assert out["action"] == "promotion_in_progress" and scene.role_tag() == "primary", out
    assert scene.metrics() == [0]
    scene.messages()
    # looks ready, but the source link is still there (each resume describes it twice)
    scene.after_promote = [("available", True)] * 4
    for _ in range(2):
        scene.spy()
        out = scene.invoke(RESUME)
        assert out["action"] == "promotion_in_progress", out
        assert scene.weights() == {"us-east-1": 100, "eu-west-1": 0}
        assert "change_resource_record_sets" not in scene.clients.route53.calls
        assert scene.metrics() == [0]
        assert scene.clients.primary_rds.calls == []  # no fence before the promotion is done
    assert scene.messages() == []  # the schedule does not spam
    scene.spy()
    out = scene.invoke(RESUME)  # now available without source
    assert out["action"] == "none" and out["reason"] == "already failed over", out
    assert scene.weights() == {"us-east-1": 0, "eu-west-1": 100}
    assert scene.metrics() == [1]
    assert "promote_read_replica" not in scene.clients.dr_rds.calls


def test_promoted_helper():
    base = {"DBInstanceStatus": "available"}
    assert failover.promoted(base)
    assert not failover.promoted(dict(base, ReadReplicaSourceDBInstanceIdentifier="arn:x"))
    assert not failover.promoted({"DBInstanceStatus": "modifying"})
    assert not failover.promoted(None)
    assert not hasattr(failover, "CALM_POLLS")


# -- maintenance must not cause a failover --------------------------------------------------

DOWN = ["failed", "storage-full", "restore-error", "inaccessible-encryption-credentials",
        "inaccessible-encryption-credentials-recoverable", "incompatible-parameters", "incompatible-network",
        "incompatible-restore", "incompatible-option-group", "stopped"]
ALIVE = ["available", "modifying", "upgrading", "rebooting", "maintenance", "backing-up",
         "configuring-enhanced-monitoring", "configuring-iam-database-auth", "configuring-log-exports",
         "storage-optimization", "renaming", "resetting-master-credentials", "starting", "stopping"]


def with_status(status):
    def rewrite(out):
        out["DBInstances"][0]["DBInstanceStatus"] = status
        return out
    return {"describe_db_instances": rewrite}


@pytest.mark.parametrize("status", DOWN)
def test_terminal_primary_status_is_down(scene, status):
    scene.spy(primary_rewrite=with_status(status))
    out = scene.invoke(ALARM)
    assert out["primary"]["down"] is True and out["primary"]["kind"] == "terminal", out
    body = assert_failed_over(scene, out)
    assert f"status {status}" in body


@pytest.mark.parametrize("status", ALIVE + ["some-status-from-2030"])
def test_alive_or_unknown_primary_status_is_not_down(scene, status):
    scene.spy(primary_rewrite=with_status(status))
    before = scene.records()
    out = scene.invoke(ALARM)
    assert out["action"] == "none" and out["primary"]["down"] is False, out
    assert out["primary"]["kind"] == ("unknown" if status.startswith("some-") else "alive")
    assert "promote_read_replica" not in scene.clients.dr_rds.calls
    assert scene.records() == before and scene.role_tag() is None and scene.replica_source()
    assert scene.metrics() == [0]
    msgs = scene.messages()
    assert len(msgs) == 1, msgs
    subject, body = msgs[0]
    assert subject == f"pgdr t: alarm but primary looks alive ({status}) - no failover"
    assert status in body and "looks alive" in body
    assert all(w in body for w in ("peering", "route", "security group", "probe function"))
    if status.startswith("some-"):
        assert "does not know" in body


def test_not_down_statuses_do_not_notify_from_the_schedule(scene):
    """The alarm stays in ALARM through a maintenance: the minute's resume neither promotes nor
    notifies; the alarm's own invocation notified once."""
    scene.cw.set_alarm_state(AlarmName="pgdr-t-primary-down", StateValue="ALARM", StateReason="probe failing")
    scene.spy(primary_rewrite=with_status("upgrading"))
    scene.invoke(ALARM)
    assert len(scene.messages()) == 1
    for _ in range(3):
        scene.spy(primary_rewrite=with_status("upgrading"))
        out = scene.invoke(RESUME)
        assert out["action"] == "none" and out["reason"] == "primary not down (status upgrading)", out
        assert "promote_read_replica" not in scene.clients.dr_rds.calls
    assert scene.messages() == []


def test_healthy_primary_by_hand_does_not_notify(scene):
    scene.spy(primary_rewrite=with_status("backing-up"))
    out = scene.invoke()
    assert out["action"] == "none" and "backing-up" in out["reason"]
    assert scene.messages() == []


def client_error(code, http):
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": http}}, "DescribeDBInstances")


@pytest.mark.parametrize("error,kind", [
    (ConnectTimeoutError(endpoint_url="https://rds.us-east-1.amazonaws.com/"), "unreachable"),
    (ReadTimeoutError(endpoint_url="https://rds.us-east-1.amazonaws.com/"), "unreachable"),
    (client_error("ServiceUnavailable", 503), "unreachable"),
    (client_error("DBInstanceNotFound", 404), "gone"),
])
def test_primary_api_silent_or_instance_gone_is_down(scene, error, kind):
    scene.spy(primary_fail={"describe_db_instances": error})
    out = scene.invoke(ALARM)
    assert out["primary"]["kind"] == kind and out["primary"]["down"] is True, out
    assert_failed_over(scene, out)


@pytest.mark.parametrize("error", [client_error("AccessDenied", 403), client_error("Throttling", 400)])
def test_primary_api_that_answers_with_a_refusal_is_not_down(scene, error):
    scene.spy(primary_fail={"describe_db_instances": error})
    out = scene.invoke(ALARM)
    assert out["action"] == "none" and out["primary"]["down"] is False and out["primary"]["kind"] == "error", out
    assert "promote_read_replica" not in scene.clients.dr_rds.calls
    assert scene.weights() == {"us-east-1": 100, "eu-west-1": 0}
    msgs = scene.messages()
    assert len(msgs) == 1 and "could not be read" in msgs[0][1], msgs


def test_status_classes():
    assert failover.status_class("incompatible-anything-new") == "down"
    assert failover.status_class("configuring-something-new") == "alive"
    assert failover.status_class("deleting") == "unknown"


# -- the ReplicaPromoted metric --------------------------------------------------------------

def test_metric_is_0_before_and_1_after_promotion(scene):
    out = scene.invoke()
    assert scene.metrics() == [0] and out["replica_promoted_metric"] == 0
    scene.spy()
    scene.invoke(RESUME)
    assert scene.metrics() == [0]
    scene.spy()
    scene.invoke({"source": "aws.cloudwatch", "alarmData": {"state": {"value": "OK"}}})
    assert scene.metrics() == [0]
    scene.stop_primary()
    scene.spy()
    out = scene.invoke(ALARM)
    assert out["action"] == "promoted" and scene.metrics() == [1] and out["replica_promoted_metric"] == 1
    for event in (RESUME, {}, {"action": "check"}):
        scene.spy()
        out = scene.invoke(event)
        assert scene.metrics() == [1], event
    # and CloudWatch has it, under the namespace, name and dimension the health check follows
    listed = scene.cw.list_metrics(Namespace="pgdr", MetricName="ReplicaPromoted")["Metrics"]
    assert listed and listed[0]["Dimensions"] == [{"Name": "Environment", "Value": "t"}]


def test_check_publishes_the_metric_and_changes_nothing(scene):
    scene.stop_primary()
    out = scene.invoke({"action": "check"})
    assert out["would"] == "promoted" and scene.metrics() == [0]
    assert scene.role_tag() is None and scene.messages() == []


def test_metric_failure_does_not_break_a_failover(scene):
    scene.stop_primary()
    scene.spy(cw_fail={"put_metric_data": client_error("AccessDenied", 403)})
    out = scene.invoke(ALARM)
    assert out["action"] == "promoted" and out["replica_promoted_metric"] is None
    assert scene.weights() == {"us-east-1": 0, "eu-west-1": 100}
    assert scene.clients.cloudwatch.calls.count("put_metric_data") == 1


def test_metric_published_even_when_the_dns_update_fails(scene):
    scene.stop_primary()

    def from_config(cfg):
        c = scene.real_from_config(cfg)
        scene.clients = failover.Clients(Spy(c.dr_rds, rewrite={"promote_read_replica": lambda o: (
            setattr(scene, "promote_called", True), o)[1], "describe_db_instances": lambda o: (
            o["DBInstances"][0].pop("ReadReplicaSourceDBInstanceIdentifier", None) if scene.promote_called else None, o)[1]}),
            Spy(c.primary_rds), Spy(c.route53, fail={"change_resource_record_sets": client_error("Throttling", 400)}),
            Spy(c.sns), Spy(c.cloudwatch), Spy(c.primary_ec2))
        return scene.clients
    scene.mp.setattr(failover.Clients, "from_config", from_config)
    with pytest.raises(RuntimeError, match="DNS update failed"):
        scene.invoke()
    assert scene.metrics() == [1]


# -- fencing that fences ------------------------------------------------------------------------

REMAINING = [(22, 22, "10.10.0.0/16")]
ALL_RULES = sorted([(5432, 5432, "10.10.0.0/16"), (5432, 5432, "10.20.0.0/16"), (5400, 5500, "10.30.0.0/16")]
                   + REMAINING)


def test_fence_revokes_5432_rules_reboots_and_tags_the_old_primary(scene):
    """The primary's region did not answer when the alarm came (so: down), and answers again by
    the time DNS has moved: the old primary, available, is fenced in the same invocation."""
    assert scene.ingress() == ALL_RULES
    scene.spy(primary_fail={"describe_db_instances": [EndpointConnectionError(endpoint_url="https://x/")]})
    order = []
    orig_set, orig_fence = failover.set_weights, failover.fence
    scene.mp.setattr(failover, "set_weights", lambda *a, **k: (order.append("dns"), orig_set(*a, **k))[1])
    scene.mp.setattr(failover, "fence", lambda *a, **k: (order.append("fence"), orig_fence(*a, **k))[1])
    out = scene.invoke(ALARM)
    body = assert_failed_over(scene, out)
    assert order == ["dns", "fence"]  # writers have somewhere to go before the old primary is cut
    assert out["fence"]["state"] == "done", out["fence"]
    assert scene.ingress() == REMAINING  # every rule covering 5432 is gone, SSH stays
    assert len(out["fence"]["revoked"]) == 3
    (revoke,) = scene.clients.primary_ec2.kwargs("revoke_security_group_ingress")
    assert revoke["GroupId"] == scene.sg and len(revoke["SecurityGroupRuleIds"]) == 3
    assert scene.clients.primary_ec2.kwargs("describe_security_group_rules")[0]["Filters"] == [
        {"Name": "group-id", "Values": [scene.sg]}]
    assert scene.clients.primary_rds.kwargs("reboot_db_instance") == [{"DBInstanceIdentifier": PRIMARY}]
    assert scene.primary_role_tag() == "fenced"
    assert "rebooted" in body and "fenced" in body
    # a later minute finds it fenced and does nothing to it
    scene.spy()
    out = scene.invoke(RESUME)
    assert out["fence"]["state"] == "already"
    assert scene.clients.primary_rds.calls == ["describe_db_instances"]
    assert scene.clients.primary_ec2.calls == [] and scene.messages() == []


def test_fence_does_not_reboot_an_old_primary_that_is_not_available(scene):
    scene.stop_primary()
    out = scene.invoke()
    body = assert_failed_over(scene, out)
    assert "reboot_db_instance" not in scene.clients.primary_rds.calls
    assert any("not rebooted: status stopped" in s for s in out["fence"]["steps"]), out["fence"]
    assert "not rebooted: status stopped" in body
    assert scene.ingress() == REMAINING and scene.primary_role_tag() == "fenced"


def test_fence_without_primary_sg_id_still_reboots_and_tags(scene, monkeypatch):
    monkeypatch.delenv("PRIMARY_SG_ID")
    scene.spy(primary_fail={"describe_db_instances": [EndpointConnectionError(endpoint_url="https://x/")]})
    out = scene.invoke()
    assert_failed_over(scene, out)
    assert out["fence"]["state"] == "done"
    assert scene.clients.primary_ec2.calls == [] and scene.ingress() == ALL_RULES
    assert "reboot_db_instance" in scene.clients.primary_rds.calls and scene.primary_role_tag() == "fenced"
    assert "PRIMARY_SG_ID not set" in out["fence"]["why"]


def test_fence_with_the_primary_region_unreachable_is_pending_then_completed(scene):
    down = EndpointConnectionError(endpoint_url="https://rds.us-east-1.amazonaws.com/")
    scene.spy(primary_fail={"describe_db_instances": down})
    out = scene.invoke(ALARM)
    body = assert_failed_over(scene, out)  # the promotion and DNS are done all the same
    assert out["fence"]["state"] == "pending", out["fence"]
    assert "pending" in body and "pgdr up" in body and "pgdr failover" in body
    assert scene.primary_role_tag() is None and scene.ingress() == ALL_RULES
    # the minutes while the region stays down: no error, no message, still pending
    for _ in range(2):
        scene.spy(primary_fail={"describe_db_instances": down})
        out = scene.invoke(RESUME)
        assert out["action"] == "none" and out["fence"]["state"] == "pending"
    assert scene.messages() == []
    # the region answers again: the schedule completes the fence, says so once
    scene.spy()
    out = scene.invoke(RESUME)
    assert out["fence"]["state"] == "done"
    assert scene.ingress() == REMAINING and scene.primary_role_tag() == "fenced"
    assert "reboot_db_instance" in scene.clients.primary_rds.calls
    assert [s for s, _ in scene.messages()] == [f"pgdr t: old primary {PRIMARY} fenced"]
    assert scene.weights() == {"us-east-1": 0, "eu-west-1": 100}
    scene.spy()
    scene.invoke(RESUME)
    assert scene.messages() == [] and "reboot_db_instance" not in scene.clients.primary_rds.calls


def test_fence_interrupted_by_the_region_is_pending_and_not_tagged(scene):
    scene.spy(primary_fail={"describe_db_instances": [EndpointConnectionError(endpoint_url="https://x/")]},
              ec2_fail={"describe_security_group_rules": ConnectTimeoutError(endpoint_url="https://ec2/")})
    out = scene.invoke()
    assert_failed_over(scene, out)
    assert out["fence"]["state"] == "pending" and scene.primary_role_tag() is None
    assert "reboot_db_instance" not in scene.clients.primary_rds.calls


def test_fence_refused_is_reported_not_raised(scene):
    scene.spy(primary_fail={"describe_db_instances": [EndpointConnectionError(endpoint_url="https://x/")]},
              ec2_fail={"revoke_security_group_ingress": client_error("UnauthorizedOperation", 403)})
    out = scene.invoke()
    body = assert_failed_over(scene, out)
    assert out["fence"]["state"] == "failed" and "pgdr failover --env t" in body
    assert scene.primary_role_tag() is None and scene.ingress() == ALL_RULES


def test_check_after_failover_reports_the_fence_it_would_do(scene):
    scene.spy(primary_fail={"describe_db_instances": EndpointConnectionError(endpoint_url="https://x/")})
    scene.invoke()
    scene.messages()
    scene.spy()
    out = scene.invoke({"action": "check"})
    assert out["fence"]["state"] == "would" and scene.primary_role_tag() is None
    assert scene.ingress() == ALL_RULES and "reboot_db_instance" not in scene.clients.primary_rds.calls
    assert scene.messages() == []


def test_the_promoted_signal_holds_through_the_new_writers_maintenance():
    # Promotion finished (no source), then the new writer is `modifying`: still 1, or DNS would
    # swing back to the old primary while Route 53's API is down.
    import failover as f
    seen = {}
    f.note_dr(seen, {"DBInstanceStatus": "modifying"})
    assert seen["source_gone"] and not seen["promoted"]

    class CW:
        def __init__(self):
            self.sent = []

        def put_metric_data(self, **kw):
            self.sent.append(kw["MetricData"][0]["Value"])

    cw = CW()
    c = f.Clients(dr_rds=None, primary_rds=None, route53=None, sns=None, cloudwatch=cw)
    assert f.publish_promoted(c, {"PGDR_ENV": "dev"}, seen) == 1 and cw.sent == [1]
    # Still a replica, mid-promotion: 0.
    f.note_dr(seen, {"DBInstanceStatus": "modifying", "ReadReplicaSourceDBInstanceIdentifier": "arn:src"})
    assert f.publish_promoted(c, {"PGDR_ENV": "dev"}, seen) == 0
