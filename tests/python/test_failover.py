"""The failover handler against moto: a primary in us-east-1, its replica in eu-west-1, a private
zone with two weighted CNAMEs, and an SNS topic read back through an SQS queue."""
import json

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from moto import mock_aws

import failover

PRIMARY, REPLICA = "pgdr-t-us-east-1", "pgdr-t-eu-west-1"
NAME = "postgres.db-t.internal."


class Spy:
    """Wraps a boto3 client: records method calls, can raise or rewrite answers."""

    def __init__(self, client, fail=None, rewrite=None):
        self._client, self._fail, self._rewrite, self.calls = client, fail or {}, rewrite or {}, []

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append(name)
            if name in self._fail:
                raise self._fail[name]
            out = attr(*args, **kwargs)
            return self._rewrite[name](out) if name in self._rewrite else out
        return call


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
        vpc = boto3.client("ec2", "us-east-1").create_vpc(CidrBlock="10.10.0.0/16")["Vpc"]["VpcId"]
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
                           "PRIMARY_TIMEOUT_S": "1", "ALARM_NAME": "pgdr-t-primary-down"}.items():
            monkeypatch.setenv(key, value)
        self.ctx = FakeContext()
        monkeypatch.setattr(failover, "sleep", lambda s: self.ctx.sleep(s))
        self.spy()

    def spy(self, primary_fail=None, dr_rewrite=None):
        """Make the handler's clients Spies (real construction, then wrapped)."""
        def from_config(cfg):
            c = self.real_from_config(cfg)
            self.clients = failover.Clients(Spy(c.dr_rds, rewrite=dr_rewrite),
                                            Spy(c.primary_rds, fail=primary_fail), Spy(c.route53), Spy(c.sns),
                                            Spy(c.cloudwatch))
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
    body = assert_failed_over(scene, scene.invoke())
    assert "EndpointConnectionError" in body
    assert scene.clients.primary_rds.calls == ["describe_db_instances"]


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
    assert scene.clients.primary_rds.calls == []  # the old primary is not even asked


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
    after_promote = iter(["available", "modifying", "modifying", "available"])

    def sequence(out):
        if "promote_read_replica" in scene.clients.dr_rds.calls:
            out["DBInstances"][0]["DBInstanceStatus"] = next(after_promote)
        return out
    scene.spy(dr_rewrite={"describe_db_instances": sequence})
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
