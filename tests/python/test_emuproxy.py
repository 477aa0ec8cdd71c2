"""Tests for scripts/emuproxy.py: the fault-injecting, recording proxy in front of moto_server.

Run: .venv/bin/pytest tests/python -q   (scripts/setup-venv creates .venv)
"""
import io
import json
import signal
import subprocess
import threading
import time
import zipfile

import urllib.error

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from emutools import InvokeHook, ctl, proxy  # noqa: F401 (proxy: one proxy + moto for the module)


@pytest.fixture
def emu(proxy):
    """Clean proxy config and call list for each test. moto's state is not reset (that takes
    ~1 s once EC2 is loaded): tests use distinct names, CIDRs and regions instead."""
    ctl(proxy, "/__proxy/config", {"latency_ms": 0, "fail_rate": 0, "drop_rate": 0, "seed": 0,
                                   "fault_ops": None, "fault_services": None, "fault_mutating_only": False,
                                   "kill_after": None, "kill_on": None, "rds_hold": None, "rules_off": [],
                                   "rules_time_scale": 1.0, "rules_params": {}, "throttle": None,
                                   "blackhole_regions": None})
    ctl(proxy, "/__proxy/invoke-hook", {"url": None})
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


# ---------------------------------------------------------------------------------------------
# Lambda Invoke through the invoke hook

def _function(url, region, name):
    """A plain (non-VPC) function; every rule off, so that moto takes it at once."""
    ctl(url, "/__proxy/config", {"rules_off": ["all"]})
    iam = client(url, "iam", region)
    role = f"role-{name}"
    arn = iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                "Principal": {"Service": "lambda.amazonaws.com"}}]}))["Role"]["Arn"]
    package = io.BytesIO()
    with zipfile.ZipFile(package, "w") as z:
        z.writestr("h.py", "def h(event, context):\n    return event\n")
    lam = client(url, "lambda", region)
    lam.create_function(FunctionName=name, Runtime="python3.12", Role=arn, Handler="h.h",
                        Code={"ZipFile": package.getvalue()})
    return lam


SECRET = "s3cr3t-never-recorded"


def test_invoke_hook_runs_invocations_and_answers_as_lambda_does(emu):
    lam = _function(emu, "ap-south-1", "hooked")
    hook = InvokeHook(lambda job: {"payload": json.dumps({"echo": json.loads(job["payload"])["n"]}),
                                   "error": "Unhandled" if json.loads(job["payload"])["n"] < 0 else None})
    try:
        assert ctl(emu, "/__proxy/invoke-hook", {"url": hook.url}) == {"url": hook.url}
        assert ctl(emu, "/__proxy/invoke-hook") == {"url": hook.url}
        ctl(emu, "/__proxy/calls/reset", {})
        out = lam.invoke(FunctionName="hooked", Payload=json.dumps({"n": 7, "password": SECRET}))
        assert out["StatusCode"] == 200 and json.loads(out["Payload"].read()) == {"echo": 7}
        assert out["ExecutedVersion"] == "$LATEST" and "FunctionError" not in out
        [job] = hook.jobs
        assert (job["region"], job["function"], job["invocation_type"]) == ("ap-south-1", "hooked", "RequestResponse")
        assert json.loads(job["payload"]) == {"n": 7, "password": SECRET}
        # A function error: 200, the payload, X-Amz-Function-Error.
        out = lam.invoke(FunctionName="hooked", Payload=json.dumps({"n": -1}))
        assert (out["StatusCode"], out["FunctionError"]) == (200, "Unhandled")
        assert json.loads(out["Payload"].read()) == {"echo": -1}
        # DryRun: 204, nothing runs. Event: 202 at once, the hook called in the background.
        assert lam.invoke(FunctionName="hooked", InvocationType="DryRun", Payload=b"{}")["StatusCode"] == 204
        assert len(hook.jobs) == 2
        assert lam.invoke(FunctionName="hooked", InvocationType="Event", Payload=json.dumps({"n": 3}))["StatusCode"] == 202
        deadline = time.time() + 5
        while len(hook.jobs) < 3 and time.time() < deadline:
            time.sleep(0.02)
        assert hook.jobs[-1]["invocation_type"] == "Event"
        # No such function: Lambda's 404, the hook never asked.
        with pytest.raises(botocore.exceptions.ClientError) as e:
            lam.invoke(FunctionName="no-such-function", Payload=b"{}")
        err = e.value.response
        assert (err["ResponseMetadata"]["HTTPStatusCode"], err["Error"]["Code"]) == (404, "ResourceNotFoundException")
        assert "Function not found: arn:aws:lambda:ap-south-1:" in err["Error"]["Message"]
        assert len(hook.jobs) == 3
        rec = [c for c in calls(emu) if c["op"].endswith("/invocations")]
        assert [(c["params"], c["status"], c.get("hook")) for c in rec] == [
            ({"FunctionName": "hooked"}, 200, True), ({"FunctionName": "hooked"}, 200, True),
            ({"FunctionName": "hooked"}, 204, True), ({"FunctionName": "hooked"}, 202, True),
            ({"FunctionName": "no-such-function"}, 404, True)]
        assert all(c["service"] == "lambda" and c["region"] == "ap-south-1" and c["mutating"] for c in rec)
        assert SECRET not in json.dumps(calls(emu))  # the payload is never recorded
        # Cleared: Invoke goes to moto again (not asked here: moto would need Docker).
        assert ctl(emu, "/__proxy/invoke-hook", {"url": None}) == {"url": None}
        assert ctl(emu, "/__proxy/invoke-hook") == {"url": None}
    finally:
        hook.close()


def test_invoke_hook_refuses_a_bad_url(emu):
    for bad in ({"url": "ftp://x/"}, {"url": "nohost"}, {}):
        with pytest.raises(urllib.error.HTTPError) as e:
            ctl(emu, "/__proxy/invoke-hook", bad)
        assert e.value.code == 400
    assert ctl(emu, "/__proxy/invoke-hook") == {"url": None}


def test_long_invocations_run_side_by_side_with_other_calls(emu):
    lam = _function(emu, "ap-southeast-2", "slow")
    started = threading.Event()

    def slow(job):
        started.set()
        time.sleep(1.5)
        return {"payload": job["payload"], "error": None}
    hook = InvokeHook(slow)
    try:
        ctl(emu, "/__proxy/invoke-hook", {"url": hook.url})
        clients = [client(emu, "lambda", "ap-southeast-2") for _ in range(3)]
        ec2 = client(emu, "ec2", "ap-southeast-2")
        ec2.describe_vpcs()
        out, errors = [], []

        def run(c, i):
            try:
                out.append(json.loads(c.invoke(FunctionName="slow", Payload=json.dumps({"i": i}))["Payload"].read())["i"])
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=run, args=(c, i)) for i, c in enumerate(clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        assert started.wait(5)
        t1 = time.time()
        ec2.describe_vpcs()  # answered while the invocations run
        assert time.time() - t1 < 1.0
        for t in threads:
            t.join(10)
        assert not errors and sorted(out) == [0, 1, 2]
        assert time.time() - t0 < 3.5  # three 1.5 s invocations at once, not one after another
        rec = [c for c in calls(emu) if c["op"].endswith("/invocations")]
        assert len(rec) == 3 and all(c["t_end"] - c["t"] >= 1.5 for c in rec)  # the wall time is the run's
    finally:
        hook.close()


def test_kill_on_kills_after_the_named_operation(emu):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        ctl(emu, "/__proxy/config", {"kill_on": {"pid": victim.pid, "ops": ["CreateVpc"], "regions": ["eu-north-1"]}})
        client(emu, "ec2", "eu-north-1").describe_vpcs()
        client(emu, "ec2", "eu-south-1").create_vpc(CidrBlock="10.7.0.0/16")  # another region: not this one
        time.sleep(0.2)
        assert victim.poll() is None
        client(emu, "ec2", "eu-north-1").create_vpc(CidrBlock="10.8.0.0/16")
        assert victim.wait(5) == -signal.SIGKILL
        assert ctl(emu, "/__proxy/config")["kill_on"] is None  # one-shot
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
