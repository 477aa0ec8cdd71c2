"""Tests for scripts/emuproxy.py: the fault-injecting, recording proxy in front of moto_server.

Run: .venv/bin/pytest tests/python -q   (scripts/setup-venv creates .venv)
"""
import signal
import subprocess
import threading
import time

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from emutools import ctl, proxy  # noqa: F401 (proxy: one proxy + moto for the module)


@pytest.fixture
def emu(proxy):
    """Clean proxy config and call list for each test. moto's state is not reset (that takes
    ~1 s once EC2 is loaded): tests use distinct names, CIDRs and regions instead."""
    ctl(proxy, "/__proxy/config", {"latency_ms": 0, "fail_rate": 0, "drop_rate": 0, "seed": 0,
                                   "fault_ops": None, "fault_services": None, "fault_mutating_only": False,
                                   "kill_after": None, "rds_hold": None, "rules_off": [],
                                   "rules_time_scale": 1.0, "rules_params": {}, "throttle": None})
    ctl(proxy, "/__proxy/rules/reset", {})
    ctl(proxy, "/__proxy/calls/reset", {})
    return proxy


def client(url, service, region="us-east-1"):
    return boto3.client(service, region_name=region, endpoint_url=url, aws_access_key_id="test",
                        aws_secret_access_key="test",
                        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))


def calls(url):
    return ctl(url, "/__proxy/calls")


def test_records_reads_and_writes(emu):
    ec2 = client(emu, "ec2", "eu-west-1")
    ec2.describe_vpcs()
    ec2.create_vpc(CidrBlock="10.1.0.0/16")
    rec = calls(emu)
    assert [(c["service"], c["region"], c["op"], c["mutating"], c["status"], c["fault"]) for c in rec] == [
        ("ec2", "eu-west-1", "DescribeVpcs", False, 200, None),
        ("ec2", "eu-west-1", "CreateVpc", True, 200, None),
    ]
    assert rec[1]["seq"] == rec[0]["seq"] + 1
    # t_end: the answer went out after the request came in, and before the next request came in
    assert all(c["t_end"] >= c["t"] for c in rec)
    assert rec[1]["t"] >= rec[0]["t_end"]
    # REST (route53) and JSON (secretsmanager) classification
    client(emu, "route53").list_hosted_zones()
    client(emu, "secretsmanager").list_secrets()
    rec = calls(emu)[-2:]
    assert (rec[0]["op"], rec[0]["mutating"]) == ("GET /2013-04-01/hostedzone", False)
    assert (rec[1]["service"], rec[1]["op"], rec[1]["mutating"]) == ("secretsmanager", "ListSecrets", False)


def test_fail_rate_answers_503_without_forwarding(emu):
    ctl(emu, "/__proxy/config", {"fail_rate": 1})
    ec2 = client(emu, "ec2")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.create_vpc(CidrBlock="10.2.0.0/16")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
    with pytest.raises(botocore.exceptions.ClientError) as e:  # JSON protocol
        client(emu, "secretsmanager").list_secrets()
    assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
    # fault_ops restricts faults to the named operations
    ctl(emu, "/__proxy/config", {"fault_ops": ["CreateVpc"]})
    vpcs = ec2.describe_vpcs()["Vpcs"]
    assert all(v["CidrBlock"] != "10.2.0.0/16" for v in vpcs)  # never reached moto
    assert [c["fault"] for c in calls(emu)] == ["503", "503", None]
    # fault_services restricts faults to the named services
    ctl(emu, "/__proxy/config", {"fault_ops": None, "fault_services": ["route53"]})
    ec2.describe_vpcs()
    with pytest.raises(botocore.exceptions.ClientError) as e:
        client(emu, "route53").list_hosted_zones()
    assert e.value.response["Error"]["Code"] == "ServiceUnavailable"
    assert [(c["service"], c["fault"]) for c in calls(emu)[-2:]] == [("ec2", None), ("route53", "503")]


def test_drop_forwards_but_loses_the_answer(emu):
    ctl(emu, "/__proxy/config", {"drop_rate": 1, "fault_mutating_only": True})
    ec2 = client(emu, "ec2")
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        ec2.create_vpc(CidrBlock="10.3.0.0/16")
    assert any(v["CidrBlock"] == "10.3.0.0/16" for v in ec2.describe_vpcs()["Vpcs"])
    rec = calls(emu)
    assert [(c["op"], c["fault"]) for c in rec] == [("CreateVpc", "drop"), ("DescribeVpcs", None)]
    assert rec[0]["t"] <= rec[0]["t_end"] <= rec[1]["t"]  # t_end of a drop: the connection's reset


def _create_db(rds, ident):
    rds.create_db_instance(DBInstanceIdentifier=ident, DBInstanceClass="db.t3.micro", Engine="postgres",
                           MasterUsername="pgdr", MasterUserPassword="secret-password-1",
                           AllocatedStorage=20)


def _statuses(rds):
    return {d["DBInstanceIdentifier"]: d["DBInstanceStatus"]
            for d in rds.describe_db_instances()["DBInstances"]}


def test_rds_hold_shows_creating_then_available(emu):
    # rds_hold alone (the AWS rule that adds backing-up, rebooting and refusals is off)
    ctl(emu, "/__proxy/config", {"rules_off": ["rds-state-machine"]})
    rds = client(emu, "rds", "eu-west-1")
    _create_db(rds, "plain")  # created before the hold was set: not held
    ctl(emu, "/__proxy/config", {"rds_hold": {"create_s": 1.5, "modify_s": 1.0}})
    _create_db(rds, "held")
    assert _statuses(rds) == {"plain": "available", "held": "creating"}
    assert rds.describe_db_instances(DBInstanceIdentifier="held")["DBInstances"][0]["DBInstanceStatus"] == "creating"
    # the same id in another region is not held
    other = client(emu, "rds", "us-west-2")
    _create_db(other, "x")
    time.sleep(1.6)
    assert _statuses(rds) == {"plain": "available", "held": "available"}
    rds.modify_db_instance(DBInstanceIdentifier="plain", BackupRetentionPeriod=3, ApplyImmediately=True)
    assert _statuses(rds)["plain"] == "modifying"
    # a forced status wins over everything, then ends
    ctl(emu, "/__proxy/rds_status", {"region": "eu-west-1", "id": "held", "status": "delete-precheck", "for_s": 0.5})
    assert _statuses(rds)["held"] == "delete-precheck"
    time.sleep(1.1)
    assert _statuses(rds) == {"plain": "available", "held": "available"}


def test_kill_after_kills_the_pid(emu):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        ctl(emu, "/__proxy/config", {"kill_after": {"pid": victim.pid, "calls": 2}})
        ec2 = client(emu, "ec2")
        ec2.describe_vpcs()
        time.sleep(0.2)
        assert victim.poll() is None
        ec2.describe_vpcs()
        assert victim.wait(5) == -signal.SIGKILL
        assert ctl(emu, "/__proxy/config")["kill_after"] is None  # one-shot
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


def test_concurrent_requests_and_latency(emu):
    errors = []
    clients = [client(emu, "sts") for _ in range(8)]  # creating clients is slow: not timed
    clients[0].get_caller_identity()  # moto loads its STS backend on the first call
    ctl(emu, "/__proxy/config", {"latency_ms": 300})
    ctl(emu, "/__proxy/calls/reset", {})

    def worker(sts):
        try:
            sts.get_caller_identity()
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert time.time() - t0 < 2.0  # 8 x 300 ms in parallel, not in series
    rec = calls(emu)
    assert [c["op"] for c in rec] == ["GetCallerIdentity"] * 8
    # t_end includes the added latency, and the record shows the calls overlapping
    assert all(c["t_end"] - c["t"] >= 0.3 for c in rec)
    assert min(c["t_end"] for c in rec) > sorted(c["t"] for c in rec)[1]
