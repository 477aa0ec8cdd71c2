"""Tests for the AWS rules of the emulator proxy (scripts/awsrules.py, used by scripts/emuproxy.py).

Each rule has a test here that holds the AWS behaviour it reproduces (docs/aws-behaviour.md maps
behaviour -> rule -> test). The end-to-end tests run boto3 against one proxy + moto for the
module; each test gets its own moto account (x-moto-account-id) so no test sees another's
resources, switches on only the rules it is about, and uses short durations.
"""
import io
import json
import random
import subprocess
import sys
import time
import urllib.error
import zipfile
from pathlib import Path

import boto3
import botocore.exceptions
import botocore.parsers
import botocore.session
import pytest
from botocore.config import Config

from emutools import PROXY, InvokeHook, ctl, proxy, start_proxy  # noqa: F401 (proxy: a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import awsrules  # noqa: E402

ALL_RULES = [cls.name for cls in awsrules.RULES]


class Emu:
    """The proxy, seen from one test: its own account, its own rule switches."""

    def __init__(self, url):
        self.url = url
        self.account = str(random.randrange(10**11, 10**12))

    def config(self, **cfg):
        return ctl(self.url, "/__proxy/config", cfg)

    def only(self, *names, **params):
        """Only these rules on; params: {"rule": {"param": seconds}} (before scaling)."""
        self.config(rules_off=[n for n in ALL_RULES if n not in names], rules_params=params.get("params", {}))

    def client(self, service, region="us-east-1", attempts=1):
        c = boto3.client(service, region_name=region, endpoint_url=self.url, aws_access_key_id="test",
                         aws_secret_access_key="test",
                         config=Config(retries={"total_max_attempts": attempts, "mode": "standard"}))
        c.meta.events.register("before-sign", self._account)
        return c

    def _account(self, request, **_):
        request.headers["x-moto-account-id"] = self.account

    def calls(self):
        return ctl(self.url, "/__proxy/calls")

    def rules(self):
        return {r["name"]: r for r in ctl(self.url, "/__proxy/rules")}

    def role(self, name):
        self.client("iam").create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                    "Principal": {"Service": "lambda.amazonaws.com"}}]}))
        return f"arn:aws:iam::{self.account}:role/{name}"

    def network(self, region="us-east-1", cidr="10.20.0.0/16"):
        ec2 = self.client("ec2", region)
        vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr.replace("0.0/16", "1.0/24"))["Subnet"]["SubnetId"]
        sg = ec2.create_security_group(VpcId=vpc, GroupName=f"g{random.randrange(10**6)}", Description="d")["GroupId"]
        return ec2, vpc, subnet, sg


@pytest.fixture
def emu(proxy):  # noqa: F811
    ctl(proxy, "/__proxy/config", {"latency_ms": 0, "fail_rate": 0, "drop_rate": 0, "seed": 0, "fault_ops": None,
                                   "fault_services": None, "fault_mutating_only": False, "kill_after": None,
                                   "rds_hold": None, "rules_off": [], "rules_time_scale": 1.0, "rules_params": {},
                                   "throttle": None, "kill_on": None})
    ctl(proxy, "/__proxy/invoke-hook", {"url": None})
    ctl(proxy, "/__proxy/rules/reset", {})
    ctl(proxy, "/__proxy/calls/reset", {})
    return Emu(proxy)


def error_of(excinfo):
    err = excinfo.value.response
    return err["ResponseMetadata"]["HTTPStatusCode"], err["Error"]["Code"], err["Error"]["Message"]


ZIP = io.BytesIO()
with zipfile.ZipFile(ZIP, "w") as _z:
    _z.writestr("h.py", "def h(event, context):\n    return event\n")


def create_function(lam, name, role, vpc=None):
    kw = {"VpcConfig": vpc} if vpc else {}
    return lam.create_function(FunctionName=name, Runtime="python3.12", Role=role, Handler="h.h",
                               Code={"ZipFile": ZIP.getvalue()}, **kw)


# ---------------------------------------------------------------------------------------------
# The switches

def test_rules_are_listed_with_citations_and_on_by_default(emu):
    rules = emu.rules()
    assert list(rules) == ALL_RULES
    for r in rules.values():
        assert r["on"] is True
        assert r["summary"]
        assert r["citations"] and all(c["url"].startswith("https://") for c in r["citations"])
        assert any(c["source"] == "AWS" for c in r["citations"])
    assert rules["ec2-eventual-consistency"]["params"] == {"window_s": 0.5}


def test_each_rule_switches_off_alone_or_all_and_durations_scale(emu):
    emu.config(rules_off=["ec2-client-token"])
    rules = emu.rules()
    assert [n for n, r in rules.items() if not r["on"]] == ["ec2-client-token"]
    assert emu.config(rules_off=["all"])["rules_off"] == sorted(ALL_RULES)
    assert not any(r["on"] for r in emu.rules().values())
    emu.config(rules_off=[], rules_time_scale=4, rules_params={"lambda-vpc-enis": {"hold_s": 0.5}})
    params = emu.rules()["lambda-vpc-enis"]["params"]
    assert params == {"hold_s": 2.0, "delete_s": 8.0}
    for bad in ({"rules_off": ["no-such-rule"]}, {"rules_params": {"lambda-vpc-enis": {"nope_s": 1}}},
                {"rules_time_scale": -1}, {"throttle": [{"opz": []}]}):
        with pytest.raises(urllib.error.HTTPError) as e:
            emu.config(**bad)
        assert e.value.code == 400
    assert emu.rules()["lambda-vpc-enis"]["params"]["hold_s"] == 2.0  # a refused config changed nothing


FAKE_MOTO = """#!{python}
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[sys.argv.index("-p") + 1])), H).serve_forever()
"""


def test_cli_switches_rules_off(tmp_path):
    moto = tmp_path / "moto_server"  # the rules endpoint does not need moto: a stand-in starts faster
    moto.write_text(FAKE_MOTO.format(python=sys.executable))
    moto.chmod(0o755)
    proc = subprocess.run([sys.executable, str(PROXY), "--moto-bin", str(moto), "--rules-off", "bogus"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown rules ['bogus']" in proc.stderr
    for args, off, window in ((["--rules-off", "ec2-client-token,throttling", "--rules-time-scale", "0.5"],
                               ["ec2-client-token", "throttling"], 0.25),
                              (["--rules-off", "all"], ALL_RULES, 0.5)):
        proc, url = start_proxy(*args, moto_bin=moto)
        try:
            rules = {r["name"]: r for r in ctl(url, "/__proxy/rules")}
            assert sorted(n for n, r in rules.items() if not r["on"]) == sorted(off)
            assert rules["ec2-eventual-consistency"]["params"] == {"window_s": window}
        finally:
            proc.terminate()
            proc.wait(10)


def test_rules_on_by_default_and_moto_behaviour_with_all_off(emu):
    ec2 = emu.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.21.0.0/16")["Vpc"]["VpcId"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.describe_vpcs(VpcIds=[vpc])
    assert error_of(e)[:2] == (400, "InvalidVpcID.NotFound")
    assert emu.calls()[-1]["rule"] == "ec2-eventual-consistency"  # the record names the rule
    emu.config(rules_off=["all"])
    vpc = ec2.create_vpc(CidrBlock="10.22.0.0/16")["Vpc"]["VpcId"]
    assert ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"][0]["VpcId"] == vpc
    assert emu.calls()[-1]["rule"] is None
    emu.config(rules_off=[])
    vpc = ec2.create_vpc(CidrBlock="10.23.0.0/16")["Vpc"]["VpcId"]
    assert "vpc" in str(emu.rules()["ec2-eventual-consistency"]["state"])
    ctl(emu.url, "/__proxy/rules/reset", {})  # the rules forget what they track
    assert ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"]


# ---------------------------------------------------------------------------------------------
# Error formats (no proxy): each protocol's error parses as that error in botocore

@pytest.mark.parametrize("service,protocol,headers,body", [
    ("ec2", "ec2", {"Content-Type": "application/x-www-form-urlencoded"}, b"Action=DescribeVpcs"),
    ("rds", "query", {"Content-Type": "application/x-www-form-urlencoded"}, b"Action=DescribeDBInstances"),
    ("secretsmanager", "json", {"X-Amz-Target": "secretsmanager.GetSecretValue",
                                "Content-Type": "application/x-amz-json-1.1"}, b"{}"),
    ("lambda", "rest-json", {}, b"{}"),
    ("route53", "rest-xml", {}, b""),
])
def test_errors_parse_in_each_protocol(service, protocol, headers, body):
    call = awsrules.Call("POST", "/", headers, body, service, "us-east-1", "Op")
    assert call.protocol == protocol
    ans = awsrules.aws_error(call, 400, "SomeCode", "some <message>")
    parsed = botocore.parsers.create_parser(protocol).parse(
        {"status_code": ans.status, "headers": {k.lower(): v for k, v in ans.headers}, "body": ans.body}, None)
    assert parsed["Error"]["Code"] == "SomeCode" and parsed["Error"]["Message"] == "some <message>"


def test_errors_parse_in_rpcv2_cbor():
    call = awsrules.Call("POST", "/service/GraniteServiceVersion20100801/operation/PutMetricData",
                         {"Content-Type": "application/cbor"}, b"", "monitoring", "us-east-1", "PutMetricData")
    ans = awsrules.aws_error(call, 400, "Throttling", "Rate exceeded")
    parsed = botocore.parsers.create_parser("smithy-rpc-v2-cbor").parse(
        {"status_code": ans.status, "headers": {k.lower(): v for k, v in ans.headers}, "body": ans.body}, None)
    assert (parsed["Error"]["Code"], parsed["Error"]["Message"]) == ("Throttling", "Rate exceeded")


def test_not_found_codes_and_references():
    call = awsrules.Call("POST", "/", {"Content-Type": "application/x-www-form-urlencoded"},
                         b"Action=DescribeSubnets&Filter.1.Name=vpc-id&Filter.1.Value.1=vpc-1&SubnetId.1=subnet-2",
                         "ec2", "us-east-1", "DescribeSubnets")
    assert awsrules.referenced_ids(call, {"vpc-1"}) is None  # a filter value is not a reference
    assert awsrules.referenced_ids(call, {"vpc-1", "subnet-2"}) == "subnet-2"
    codes = {p: code for p, (code, _msg) in awsrules.NOT_FOUND.items()}
    assert codes == {"vpc": "InvalidVpcID.NotFound", "subnet": "InvalidSubnetID.NotFound",
                     "sg": "InvalidGroup.NotFound", "rtb": "InvalidRouteTableID.NotFound",
                     "pcx": "InvalidVpcPeeringConnectionID.NotFound", "vpce": "InvalidVpcEndpointId.NotFound",
                     "eni": "InvalidNetworkInterfaceID.NotFound", "i": "InvalidInstanceID.NotFound"}


# ---------------------------------------------------------------------------------------------
# ec2-client-token

def test_client_token_repeat_returns_first_answer(emu):
    emu.only("ec2-client-token")
    ec2 = emu.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.23.0.0/16")["Vpc"]["VpcId"]
    rtb = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    kw = dict(VpcId=vpc, ServiceName="com.amazonaws.us-east-1.s3", VpcEndpointType="Gateway", RouteTableIds=[rtb])
    # the first answer is lost after moto made the endpoint; the SDK's retry reuses the token
    emu.config(drop_rate=1, fault_ops=["CreateVpcEndpoint"])
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        ec2.create_vpc_endpoint(ClientToken="tok-1", **kw)
    emu.config(drop_rate=0, fault_ops=None)
    first = ec2.create_vpc_endpoint(ClientToken="tok-1", **kw)["VpcEndpoint"]["VpcEndpointId"]
    again = ec2.create_vpc_endpoint(ClientToken="tok-1", **kw)["VpcEndpoint"]["VpcEndpointId"]
    assert first == again
    endpoints = ec2.describe_vpc_endpoints(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["VpcEndpoints"]
    assert [e["VpcEndpointId"] for e in endpoints] == [first]
    assert [c["rule"] for c in emu.calls()[-3:-1]] == ["ec2-client-token", "ec2-client-token"]
    with pytest.raises(botocore.exceptions.ClientError) as e:  # same token, other parameters
        ec2.create_vpc_endpoint(ClientToken="tok-1", **{**kw, "ServiceName": "com.amazonaws.us-east-1.dynamodb"})
    assert error_of(e) == (400, "IdempotentParameterMismatch",
                           "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).")
    # what moto does without the rule: a second endpoint for the same token
    emu.config(rules_off=ALL_RULES)
    ec2.create_vpc_endpoint(ClientToken="tok-2", **kw)
    ec2.create_vpc_endpoint(ClientToken="tok-2", **kw)
    assert len(ec2.describe_vpc_endpoints(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["VpcEndpoints"]) == 3


# ---------------------------------------------------------------------------------------------
# ec2-eventual-consistency, ec2-peering-late-in-accepter

def test_new_ids_answer_not_found_for_a_while(emu):
    emu.only("ec2-eventual-consistency", params={"ec2-eventual-consistency": {"window_s": 0.4}})
    ec2 = emu.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.24.0.0/16")["Vpc"]["VpcId"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.describe_vpcs(VpcIds=[vpc])
    assert error_of(e) == (400, "InvalidVpcID.NotFound", f"The vpc ID '{vpc}' does not exist")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.create_subnet(VpcId=vpc, CidrBlock="10.24.1.0/24")
    assert error_of(e)[1] == "InvalidVpcID.NotFound"
    assert ec2.describe_vpcs(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Vpcs"]  # filters are not references
    time.sleep(0.45)
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.24.1.0/24")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(VpcId=vpc, GroupName="ec", Description="d")["GroupId"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.describe_subnets(SubnetIds=[subnet])
    assert error_of(e) == (400, "InvalidSubnetID.NotFound", f"The subnet ID '{subnet}' does not exist")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}])
    assert error_of(e) == (400, "InvalidGroup.NotFound", f"The security group '{sg}' does not exist")
    rtb = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        ec2.describe_route_tables(RouteTableIds=[rtb])
    assert error_of(e)[1] == "InvalidRouteTableID.NotFound"
    assert emu.client("ec2", "eu-west-1").describe_vpcs()["Vpcs"]  # another Region is not affected
    time.sleep(0.45)
    assert ec2.describe_subnets(SubnetIds=[subnet])["Subnets"][0]["SubnetId"] == subnet
    assert ec2.describe_route_tables(RouteTableIds=[rtb])["RouteTables"]


def test_cross_region_peering_reaches_the_accepter_late(emu):
    emu.only("ec2-peering-late-in-accepter", params={"ec2-peering-late-in-accepter": {"window_s": 0.6}})
    east, west = emu.client("ec2", "us-east-1"), emu.client("ec2", "eu-west-1")
    a = east.create_vpc(CidrBlock="10.25.0.0/16")["Vpc"]["VpcId"]
    b = west.create_vpc(CidrBlock="10.26.0.0/16")["Vpc"]["VpcId"]
    pcx = east.create_vpc_peering_connection(VpcId=a, PeerVpcId=b, PeerRegion="eu-west-1")[
        "VpcPeeringConnection"]["VpcPeeringConnectionId"]
    assert [p["VpcPeeringConnectionId"] for p in east.describe_vpc_peering_connections()["VpcPeeringConnections"]] == [pcx]
    assert pcx not in [p["VpcPeeringConnectionId"] for p in west.describe_vpc_peering_connections()["VpcPeeringConnections"]]
    for op in (lambda: west.accept_vpc_peering_connection(VpcPeeringConnectionId=pcx),
               lambda: west.describe_vpc_peering_connections(VpcPeeringConnectionIds=[pcx])):
        with pytest.raises(botocore.exceptions.ClientError) as e:
            op()
        assert error_of(e) == (400, "InvalidVpcPeeringConnectionID.NotFound",
                               f"The vpcPeeringConnection ID '{pcx}' does not exist")
    time.sleep(0.65)
    assert [p["VpcPeeringConnectionId"] for p in west.describe_vpc_peering_connections()["VpcPeeringConnections"]] == [pcx]
    west.accept_vpc_peering_connection(VpcPeeringConnectionId=pcx)


# ---------------------------------------------------------------------------------------------
# iam-propagation

def test_new_role_is_not_usable_by_lambda_at_once(emu):
    emu.only("iam-propagation", params={"iam-propagation": {"window_s": 0.5}})
    lam = emu.client("lambda")
    _ec2, _vpc, subnet, sg = emu.network(cidr="10.27.0.0/16")
    role = emu.role("fresh")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        create_function(lam, "f1", role)
    assert error_of(e) == (400, "InvalidParameterValueException",
                           "The role defined for the function cannot be assumed by Lambda.")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        create_function(lam, "f2", role, {"SubnetIds": [subnet], "SecurityGroupIds": [sg]})
    assert error_of(e) == (400, "InvalidParameterValueException",
                           "The provided execution role does not have permissions to call CreateNetworkInterface on EC2")
    time.sleep(0.5)
    create_function(lam, "f1", role)
    create_function(lam, "f2", role, {"SubnetIds": [subnet], "SecurityGroupIds": [sg]})
    emu.client("iam").attach_role_policy(RoleName="fresh",
                                         PolicyArn="arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole")
    with pytest.raises(botocore.exceptions.ClientError) as e:  # a changed role is also late
        lam.update_function_configuration(FunctionName="f2", Role=role)
    assert error_of(e)[2].startswith("The provided execution role does not have permissions")
    lam.update_function_configuration(FunctionName="f2", Timeout=10)  # no Role: not checked
    time.sleep(0.5)
    lam.update_function_configuration(FunctionName="f2", Role=role)


# ---------------------------------------------------------------------------------------------
# lambda-vpc-enis

def enis(ec2, subnet, **filters):
    f = [{"Name": "subnet-id", "Values": [subnet]}] + [{"Name": k, "Values": v} for k, v in filters.items()]
    return ec2.describe_network_interfaces(Filters=f)["NetworkInterfaces"]


def test_lambda_network_interface_outlives_the_function(emu):
    emu.only("lambda-vpc-enis", params={"lambda-vpc-enis": {"hold_s": 0.5, "delete_s": 1.0}})
    ec2, _vpc, subnet, sg = emu.network(cidr="10.28.0.0/16")
    lam = emu.client("lambda")
    role = emu.role("eni-role")
    vpc_config = {"SubnetIds": [subnet], "SecurityGroupIds": [sg]}
    create_function(lam, "fn-a", role, vpc_config)
    create_function(lam, "fn-b", role, vpc_config)  # same subnet + group: the same interface
    [eni] = enis(ec2, subnet)
    assert eni["Description"].startswith("AWS Lambda VPC ENI-fn-a-")
    assert (eni["Status"], eni["InterfaceType"], eni["RequesterManaged"]) == ("in-use", "lambda", True)
    assert [g["GroupId"] for g in eni["Groups"]] == [sg]
    refusals = [(lambda: ec2.delete_security_group(GroupId=sg),
                 ("DependencyViolation", f"resource {sg} has a dependent object")),
                (lambda: ec2.delete_subnet(SubnetId=subnet),
                 ("DependencyViolation", f"The subnet '{subnet}' has dependencies and cannot be deleted.")),
                (lambda: ec2.delete_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"]),
                 ("InvalidParameterValue", f"Network interface '{eni['NetworkInterfaceId']}' is currently in use."))]
    for op, (code, msg) in refusals:
        with pytest.raises(botocore.exceptions.ClientError) as e:
            op()
        assert error_of(e) == (400, code, msg)
    lam.delete_function(FunctionName="fn-a")
    lam.delete_function(FunctionName="fn-b")
    assert [e["Status"] for e in enis(ec2, subnet)] == ["in-use"]  # Lambda still holds it
    assert enis(ec2, subnet, status=["available"]) == []
    assert [e["Status"] for e in enis(ec2, subnet, status=["in-use"], **{"interface-type": ["lambda"]})] == ["in-use"]
    time.sleep(0.55)
    assert [e["Status"] for e in enis(ec2, subnet, status=["available"])] == ["available"]
    with pytest.raises(botocore.exceptions.ClientError) as e:  # an available interface still holds its group
        ec2.delete_security_group(GroupId=sg)
    assert error_of(e)[1] == "DependencyViolation"
    time.sleep(0.5)
    assert enis(ec2, subnet) == []  # Lambda deleted it
    ec2.delete_security_group(GroupId=sg)
    ec2.delete_subnet(SubnetId=subnet)


def test_lambda_interface_stays_when_the_role_went_first(emu):
    emu.only("lambda-vpc-enis", params={"lambda-vpc-enis": {"hold_s": 0.2, "delete_s": 0.4}})
    ec2, _vpc, subnet, sg = emu.network(cidr="10.29.0.0/16")
    lam = emu.client("lambda")
    create_function(lam, "fn-c", emu.role("gone-role"), {"SubnetIds": [subnet], "SecurityGroupIds": [sg]})
    emu.client("iam").delete_role(RoleName="gone-role")
    lam.delete_function(FunctionName="fn-c")
    time.sleep(0.5)
    [eni] = enis(ec2, subnet)  # Lambda could not delete it: the customer must
    assert eni["Status"] == "available"
    ec2.delete_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"])
    ec2.delete_security_group(GroupId=sg)
    # what moto does without the rule: no interface, and the group goes at once
    emu.config(rules_off=ALL_RULES)
    sg2 = ec2.create_security_group(VpcId=_vpc, GroupName="plain", Description="d")["GroupId"]
    create_function(lam, "fn-d", emu.role("plain-role"), {"SubnetIds": [subnet], "SecurityGroupIds": [sg2]})
    assert enis(ec2, subnet) == []
    ec2.delete_security_group(GroupId=sg2)


# ---------------------------------------------------------------------------------------------
# rds-state-machine, rds-engine-rules

def create_db(rds, ident, **kw):
    return rds.create_db_instance(DBInstanceIdentifier=ident, DBInstanceClass="db.t3.micro", Engine="postgres",
                                  MasterUsername="pgdr", MasterUserPassword="secret-password-1",
                                  AllocatedStorage=20, BackupRetentionPeriod=1, **kw)["DBInstance"]


def db(rds, ident):
    return rds.describe_db_instances(DBInstanceIdentifier=ident)["DBInstances"][0]


def wait_status(rds, ident, status, timeout=5.0):
    deadline = time.time() + timeout
    while (s := db(rds, ident)["DBInstanceStatus"]) != status:
        assert time.time() < deadline, f"{ident} stayed {s}"
        time.sleep(0.05)


def test_rds_statuses_and_refusals_while_busy(emu):
    emu.only("rds-state-machine", params={"rds-state-machine": {
        "create_s": 0.4, "backup_s": 0.3, "modify_s": 0.3, "reboot_s": 0.3, "promote_s": 0.4}})
    rds = emu.client("rds")
    assert create_db(rds, "sm")["DBInstanceStatus"] == "creating"
    assert db(rds, "sm")["DBInstanceStatus"] == "creating"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        rds.modify_db_instance(DBInstanceIdentifier="sm", AllocatedStorage=30, ApplyImmediately=True)
    assert error_of(e) == (400, "InvalidDBInstanceState", "Database instance is not in available state.")
    for op in (lambda: rds.create_db_snapshot(DBInstanceIdentifier="sm", DBSnapshotIdentifier="s1"),
               lambda: rds.reboot_db_instance(DBInstanceIdentifier="sm"),
               lambda: rds.create_db_instance_read_replica(DBInstanceIdentifier="sm-r", SourceDBInstanceIdentifier="sm")):
        with pytest.raises(botocore.exceptions.ClientError) as e:
            op()
        assert error_of(e) == (400, "InvalidDBInstanceState", "Instance sm is not in available state.")
    wait_status(rds, "sm", "backing-up")
    wait_status(rds, "sm", "available")
    assert rds.modify_db_instance(DBInstanceIdentifier="sm", AllocatedStorage=30,
                                  ApplyImmediately=True)["DBInstance"]["DBInstanceStatus"] == "modifying"
    wait_status(rds, "sm", "available")
    rds.modify_db_instance(DBInstanceIdentifier="sm", AllocatedStorage=40, ApplyImmediately=False)
    assert db(rds, "sm")["DBInstanceStatus"] == "available"  # pending until the maintenance window
    assert rds.reboot_db_instance(DBInstanceIdentifier="sm")["DBInstance"]["DBInstanceStatus"] == "rebooting"
    wait_status(rds, "sm", "available")
    # a forced transitional status refuses too; a non-transitional one does not
    ctl(emu.url, "/__proxy/rds_status", {"region": "us-east-1", "id": "sm", "status": "upgrading",
                                         "for_s": 5, "account": emu.account})
    with pytest.raises(botocore.exceptions.ClientError) as e:
        rds.reboot_db_instance(DBInstanceIdentifier="sm")
    assert error_of(e)[1] == "InvalidDBInstanceState"
    ctl(emu.url, "/__proxy/rds_status", {"region": "us-east-1", "id": "sm", "status": "incompatible-parameters",
                                         "for_s": 5, "account": emu.account})
    rds.reboot_db_instance(DBInstanceIdentifier="sm")
    ctl(emu.url, "/__proxy/rds_status", {"region": "us-east-1", "id": "sm", "status": None, "account": emu.account})


def test_rds_promotion_drops_the_source_once_done(emu):
    emu.only("rds-state-machine", params={"rds-state-machine": {
        "create_s": 0.2, "backup_s": 0.1, "modify_s": 0.2, "reboot_s": 0.2, "promote_s": 0.4}})
    rds = emu.client("rds")
    create_db(rds, "src")
    wait_status(rds, "src", "available")
    rds.create_db_instance_read_replica(DBInstanceIdentifier="rep", SourceDBInstanceIdentifier="src")
    wait_status(rds, "rep", "available")
    assert db(rds, "src")["ReadReplicaDBInstanceIdentifiers"] == ["rep"]
    assert rds.promote_read_replica(DBInstanceIdentifier="rep")["DBInstance"]["DBInstanceStatus"] == "modifying"
    during = db(rds, "rep")
    assert (during["DBInstanceStatus"], during["ReadReplicaSourceDBInstanceIdentifier"]) == ("modifying", "src")
    assert db(rds, "src")["ReadReplicaDBInstanceIdentifiers"] == ["rep"]
    wait_status(rds, "rep", "available")
    done = db(rds, "rep")
    assert "ReadReplicaSourceDBInstanceIdentifier" not in done
    assert db(rds, "src")["ReadReplicaDBInstanceIdentifiers"] == []
    listed = {d["DBInstanceIdentifier"]: d for d in rds.describe_db_instances()["DBInstances"]}
    assert "ReadReplicaSourceDBInstanceIdentifier" not in listed["rep"]
    # a second promotion (another actor that read the replica earlier) is refused
    with pytest.raises(botocore.exceptions.ClientError) as e:
        rds.promote_read_replica(DBInstanceIdentifier="rep")
    assert error_of(e) == (400, "InvalidDBInstanceState", "DB Instance is not a read replica.")
    # moto without the rule: the promoted replica keeps its source forever, and promotes again
    emu.config(rules_off=ALL_RULES)
    assert db(rds, "rep")["ReadReplicaSourceDBInstanceIdentifier"] == "src"
    rds.promote_read_replica(DBInstanceIdentifier="rep")


def test_rds_hold_gives_the_durations_when_set(emu):
    emu.only("rds-state-machine", params={"rds-state-machine": {"backup_s": 0.2}})
    emu.config(rds_hold={"create_s": 0.3, "modify_s": 0.2})
    rds = emu.client("rds")
    t0 = time.time()
    create_db(rds, "held")
    t1 = time.time()
    [hold] = [h for h in ctl(emu.url, "/__proxy/rds_status") if h["id"] == "held"]
    assert hold["status"] == "creating" and t0 + 0.3 <= hold["until"] <= t1 + 0.3
    wait_status(rds, "held", "backing-up")
    wait_status(rds, "held", "available")


def test_rds_refuses_what_postgres_replicas_cannot_do(emu):
    emu.only("rds-engine-rules")
    east, west = emu.client("rds", "us-east-1"), emu.client("rds", "eu-west-1")
    src = create_db(east, "pg-src")["DBInstanceArn"]
    west.create_db_parameter_group(DBParameterGroupName="pg-params", DBParameterGroupFamily="postgres16",
                                   Description="d")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        west.create_db_instance_read_replica(DBInstanceIdentifier="pg-rep", SourceDBInstanceIdentifier=src,
                                             DBParameterGroupName="pg-params")
    assert error_of(e) == (400, "InvalidParameterCombination",
                           "A parameter group can't be specified during Read Replica creation for the following DB engine: postgres")
    west.create_db_instance_read_replica(DBInstanceIdentifier="pg-rep", SourceDBInstanceIdentifier=src)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        west.modify_db_instance(DBInstanceIdentifier="pg-rep", BackupRetentionPeriod=7, ApplyImmediately=True)
    assert error_of(e) == (400, "InvalidDBInstanceState", "DB Backups not supported on a read replica for engine postgres")
    west.modify_db_instance(DBInstanceIdentifier="pg-rep", BackupRetentionPeriod=0, ApplyImmediately=True)
    with pytest.raises(botocore.exceptions.ClientError) as e:
        west.delete_db_instance(DBInstanceIdentifier="pg-rep", SkipFinalSnapshot=False,
                                FinalDBSnapshotIdentifier="pg-rep-final")
    assert error_of(e) == (400, "InvalidParameterCombination",
                           "FinalDBSnapshotIdentifier can not be specified when deleting a replica instance")
    west.promote_read_replica(DBInstanceIdentifier="pg-rep")  # a standalone instance now
    west.modify_db_instance(DBInstanceIdentifier="pg-rep", BackupRetentionPeriod=7, ApplyImmediately=True)
    west.delete_db_instance(DBInstanceIdentifier="pg-rep", SkipFinalSnapshot=False, FinalDBSnapshotIdentifier="pg-rep-final")


# ---------------------------------------------------------------------------------------------
# secrets-replication

def replication(sm, name):
    return {r["Region"]: (r["Status"], r.get("StatusMessage")) for r in sm.describe_secret(SecretId=name)["ReplicationStatus"]}


def test_secret_replicas_are_in_progress_then_in_sync_or_failed(emu):
    emu.only("secrets-replication", params={"secrets-replication": {"window_s": 0.5}})
    east, west = emu.client("secretsmanager"), emu.client("secretsmanager", "eu-west-1")
    emu.client("secretsmanager", "us-west-2").create_secret(Name="db-cred", SecretString="taken")
    out = east.create_secret(Name="db-cred", SecretString="x",
                             AddReplicaRegions=[{"Region": "eu-west-1"}, {"Region": "us-west-2"}])
    assert {r["Status"] for r in out["ReplicationStatus"]} == {"InProgress"}
    assert replication(east, "db-cred") == {"eu-west-1": ("InProgress", None), "us-west-2": ("InProgress", None)}
    assert replication(west, "db-cred")["eu-west-1"] == ("InProgress", None)  # seen from the replica Region
    time.sleep(0.55)
    assert replication(east, "db-cred") == {
        "eu-west-1": ("InSync", "Replication succeeded"),
        "us-west-2": ("Failed", "Secret with this name already exists in this region")}
    east.create_secret(Name="later", SecretString="y")
    assert east.replicate_secret_to_regions(SecretId="later", AddReplicaRegions=[{"Region": "eu-west-1"}])[
        "ReplicationStatus"][0]["Status"] == "InProgress"
    time.sleep(0.55)
    assert replication(east, "later") == {"eu-west-1": ("InSync", "Replication succeeded")}


# ---------------------------------------------------------------------------------------------
# throttling, prior-request-not-complete

def test_throttling_in_each_service_format(emu):
    emu.only("throttling")
    emu.config(throttle=[{"ops": ["DescribeVpcs"], "times": 2}, {"services": ["rds"], "times": 1},
                         {"ops": ["ListSecrets"], "times": 1},
                         {"ops": ["ListFunctions"], "times": 1}, {"ops": ["ListHostedZones"], "times": 1}])
    ec2 = emu.client("ec2")
    for _ in range(2):
        with pytest.raises(botocore.exceptions.ClientError) as e:
            ec2.describe_vpcs()
        assert error_of(e) == (503, "RequestLimitExceeded", "Request limit exceeded.")
    ec2.describe_vpcs()
    for client, op, expect in ((emu.client("rds"), "describe_db_instances", (400, "Throttling")),
                               (emu.client("secretsmanager"), "list_secrets", (400, "ThrottlingException")),
                               (emu.client("lambda"), "list_functions", (429, "TooManyRequestsException")),
                               (emu.client("route53"), "list_hosted_zones", (400, "Throttling"))):
        with pytest.raises(botocore.exceptions.ClientError) as e:
            getattr(client, op)()
            pytest.fail(f"{op} was not throttled")
        assert error_of(e)[:2] == expect
        getattr(client, op)()
    # the SDK retries a throttled call by itself
    emu.config(throttle=[{"ops": ["DescribeSubnets"], "times": 2}])
    emu.client("ec2", attempts=3).describe_subnets()
    assert [c["status"] for c in emu.calls()[-3:]] == [503, 503, 200]
    emu.config(throttle=[{"ops": ["DescribeSubnets"], "rate": 0.5}], seed=1)
    statuses = []
    for _ in range(20):
        try:
            ec2.describe_subnets()
            statuses.append(200)
        except botocore.exceptions.ClientError:
            statuses.append(503)
    assert 3 <= statuses.count(503) <= 17


def test_route53_change_while_the_previous_one_is_processed(emu):
    emu.only("prior-request-not-complete", params={"prior-request-not-complete": {"processing_s": 0.3, "pending_s": 0.6}})
    r53 = emu.client("route53")
    zone = r53.create_hosted_zone(Name="prior.internal", CallerReference=str(time.time()))["HostedZone"]["Id"]
    other = r53.create_hosted_zone(Name="other.internal", CallerReference=str(time.time()))["HostedZone"]["Id"]

    def change(z, value):
        return r53.change_resource_record_sets(HostedZoneId=z, ChangeBatch={"Changes": [{"Action": "UPSERT",
            "ResourceRecordSet": {"Name": f"w.{'prior' if z == zone else 'other'}.internal", "Type": "A", "TTL": 60,
                                  "ResourceRecords": [{"Value": value}]}}]})["ChangeInfo"]
    first = change(zone, "10.0.0.1")
    assert first["Status"] == "PENDING"
    with pytest.raises(botocore.exceptions.ClientError) as e:
        change(zone, "10.0.0.2")
    assert error_of(e) == (400, "PriorRequestNotComplete",
                           "The request was rejected because Route 53 was still processing a prior request.")
    change(other, "10.0.0.3")  # another zone is not held
    assert r53.get_change(Id=first["Id"])["ChangeInfo"]["Status"] == "PENDING"
    time.sleep(0.35)
    second = change(zone, "10.0.0.2")
    time.sleep(0.65)
    assert r53.get_change(Id=second["Id"])["ChangeInfo"]["Status"] == "INSYNC"


# ---------------------------------------------------------------------------------------------
# route53-health-check-alarm

ALARM_CHECK = {"Type": "CLOUDWATCH_METRIC", "AlarmIdentifier": {"Region": "eu-west-1", "Name": "primary-down"},
               "InsufficientDataHealthStatus": "Healthy"}


def hc_config(r53, ident):
    return r53.get_health_check(HealthCheckId=ident)["HealthCheck"]["HealthCheckConfig"]


def test_route53_health_check_keeps_the_alarm_it_follows(emu):
    emu.only("route53-health-check-alarm")
    r53 = emu.client("route53")
    raw = []
    r53.meta.events.register("after-call.route53.GetHealthCheck",
                             lambda http_response, **_: raw.append(http_response.content))
    created = r53.create_health_check(CallerReference=f"hc-{time.time()}", HealthCheckConfig=ALARM_CHECK)["HealthCheck"]
    ident = created["Id"]
    assert created["HealthCheckConfig"]["AlarmIdentifier"] == {"Region": "eu-west-1", "Name": "primary-down"}
    assert created["HealthCheckConfig"]["InsufficientDataHealthStatus"] == "Healthy"
    cfg = hc_config(r53, ident)
    assert (cfg["AlarmIdentifier"], cfg["InsufficientDataHealthStatus"]) == (
        {"Region": "eu-west-1", "Name": "primary-down"}, "Healthy")
    assert (b"<EnableSNI>false</EnableSNI><AlarmIdentifier><Region>eu-west-1</Region><Name>primary-down</Name>"
            b"</AlarmIdentifier><InsufficientDataHealthStatus>Healthy</InsufficientDataHealthStatus>"
            b"</HealthCheckConfig>"
            in raw[-1])  # AWS's shape, in the API model's order
    http = r53.create_health_check(CallerReference=f"http-{time.time()}", HealthCheckConfig={
        "Type": "HTTP", "IPAddress": "192.0.2.10", "Port": 80, "ResourcePath": "/"})["HealthCheck"]["Id"]
    listed = {h["Id"]: h["HealthCheckConfig"] for h in r53.list_health_checks()["HealthChecks"]}
    assert listed[ident]["AlarmIdentifier"] == {"Region": "eu-west-1", "Name": "primary-down"}
    assert "AlarmIdentifier" not in listed[http]  # other checks are left as they are
    # an update changes what it sends and keeps the rest
    updated = r53.update_health_check(HealthCheckId=ident, AlarmIdentifier={"Region": "eu-west-1",
                                                                           "Name": "replica-promoted"})["HealthCheck"]
    assert updated["HealthCheckConfig"]["AlarmIdentifier"] == {"Region": "eu-west-1", "Name": "replica-promoted"}
    assert updated["HealthCheckConfig"]["InsufficientDataHealthStatus"] == "Healthy"
    r53.update_health_check(HealthCheckId=ident, InsufficientDataHealthStatus="LastKnownStatus")
    cfg = hc_config(r53, ident)
    assert cfg["AlarmIdentifier"] == {"Region": "eu-west-1", "Name": "replica-promoted"}
    assert cfg["InsufficientDataHealthStatus"] == "LastKnownStatus"
    assert emu.rules()["route53-health-check-alarm"]["state"]["checks"] == [{
        "account": emu.account, "id": ident, "region": "eu-west-1", "name": "replica-promoted",
        "insufficient": "LastKnownStatus"}]
    # moto without the rule: no alarm at all
    emu.config(rules_off=["route53-health-check-alarm"])
    cfg = hc_config(r53, ident)
    assert "AlarmIdentifier" not in cfg and "InsufficientDataHealthStatus" not in cfg
    emu.config(rules_off=[])
    assert hc_config(r53, ident)["AlarmIdentifier"]["Name"] == "replica-promoted"
    # a deleted check is forgotten; the rules reset forgets the others
    r53.delete_health_check(HealthCheckId=ident)
    assert emu.rules()["route53-health-check-alarm"]["state"]["checks"] == []
    again = r53.create_health_check(CallerReference=f"hc2-{time.time()}",
                                    HealthCheckConfig=ALARM_CHECK)["HealthCheck"]["Id"]
    ctl(emu.url, "/__proxy/rules/reset", {})
    assert "AlarmIdentifier" not in hc_config(r53, again)


def test_route53_health_check_alarm_replaces_and_orders_elements():
    engine = awsrules.Engine(lambda *a: (599, [], b""))
    ns = "https://route53.amazonaws.com/doc/2013-04-01/"
    request = (f'<CreateHealthCheckRequest xmlns="{ns}"><CallerReference>r</CallerReference><HealthCheckConfig>'
               "<Type>CLOUDWATCH_METRIC</Type><AlarmIdentifier><Region>us-west-2</Region><Name>a&amp;b</Name>"
               "</AlarmIdentifier><InsufficientDataHealthStatus>Unhealthy</InsufficientDataHealthStatus>"
               "</HealthCheckConfig></CreateHealthCheckRequest>").encode()
    moto = (f'<?xml version="1.0"?>\n<CreateHealthCheckResponse xmlns="{ns}"><HealthCheck><Id>hc-1</Id>'
            "<HealthCheckConfig><Type>CLOUDWATCH_METRIC</Type><Regions><Region>us-east-1</Region></Regions>"
            "<AlarmIdentifier><Region>x</Region><Name>stale</Name></AlarmIdentifier>"
            "<RoutingControlArn>arn</RoutingControlArn>"
            "</HealthCheckConfig></HealthCheck></CreateHealthCheckResponse>").encode()
    call = awsrules.Call("POST", "/2013-04-01/healthcheck", {}, request, "route53", "us-east-1",
                         "POST /2013-04-01/healthcheck")
    assert call.name == "CreateHealthCheck"
    body = engine.after(call, awsrules.Answer(201, [], moto)).body
    assert (b"<Regions><Region>us-east-1</Region></Regions><AlarmIdentifier><Region>us-west-2</Region>"
            b"<Name>a&amp;b</Name></AlarmIdentifier><InsufficientDataHealthStatus>Unhealthy"
            b"</InsufficientDataHealthStatus><RoutingControlArn>arn</RoutingControlArn>") in body
    assert body.count(b"<AlarmIdentifier>") == 1 and b"stale" not in body
    parsed = botocore.parsers.create_parser("rest-xml").parse(
        {"status_code": 201, "headers": {}, "body": body},
        botocore.session.get_session().get_service_model("route53").operation_model("CreateHealthCheck").output_shape)
    assert parsed["HealthCheck"]["HealthCheckConfig"]["AlarmIdentifier"] == {"Region": "us-west-2", "Name": "a&b"}
    for method, path, name in (("GET", "/2013-04-01/healthcheck", "ListHealthChecks"),
                               ("GET", "/2013-04-01/healthcheck/hc-1", "GetHealthCheck"),
                               ("POST", "/2013-04-01/healthcheck/hc-1", "UpdateHealthCheck"),
                               ("DELETE", "/2013-04-01/healthcheck/hc-1", "DeleteHealthCheck"),
                               ("GET", "/2013-04-01/healthcheck/hc-1/status", None)):
        assert awsrules.rest_op_name("route53", method, path) == name


# ---------------------------------------------------------------------------------------------
# S3: the state backend's bucket

def s3_client(emu, region):
    c = boto3.client("s3", region_name=region, endpoint_url=emu.url, aws_access_key_id="test",
                     aws_secret_access_key="test",
                     config=Config(retries={"total_max_attempts": 1, "mode": "standard"}, s3={"addressing_style": "path"}))
    c.meta.events.register("before-sign", emu._account)
    return c


def new_bucket(emu, region="eu-west-1"):
    name = f"state-{random.randrange(10**9)}"
    s3_client(emu, region).create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
    return name


def raw_s3(emu, method, path, region):
    import urllib.request
    auth = f"AWS4-HMAC-SHA256 Credential=test/20260101/{region}/s3/aws4_request, SignedHeaders=host, Signature=0"
    req = urllib.request.Request(emu.url + path, method=method, headers={"Authorization": auth,
                                                                        "x-moto-account-id": emu.account})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_s3_requests_signed_for_another_region_are_redirected(emu):
    emu.only("s3-bucket-region")
    bucket = new_bucket(emu)
    status, headers, body = raw_s3(emu, "HEAD", f"/{bucket}", "us-east-1")
    assert (status, headers.get("x-amz-bucket-region"), body) == (301, "eu-west-1", b"")
    status, headers, body = raw_s3(emu, "GET", f"/{bucket}/k", "us-east-1")
    assert status == 301 and b"<Code>PermanentRedirect</Code>" in body and headers.get("x-amz-bucket-region") == "eu-west-1"
    assert raw_s3(emu, "HEAD", f"/{bucket}", "eu-west-1")[0] == 200
    emu.config(rules_off=["all"])
    assert raw_s3(emu, "HEAD", f"/{bucket}", "us-east-1")[0] == 200  # moto: any region serves any bucket


def test_s3_tls_only_bucket_policy_denies_nothing_over_https(emu):
    emu.only("s3-secure-transport")
    bucket = new_bucket(emu)
    s3 = s3_client(emu, "eu-west-1")
    policy = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "DenyWithoutTLS", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}}}]})
    s3.put_bucket_policy(Bucket=bucket, Policy=policy)
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"
    assert json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"]) == json.loads(policy)
    # moto alone ignores the condition and denies everything under that policy.
    emu.config(rules_off=["all"])
    other = new_bucket(emu)
    s3.put_bucket_policy(Bucket=other, Policy=policy.replace(bucket, other))
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.put_object(Bucket=other, Key="k", Body=b"v")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_s3_first_conditional_write_on_a_key_conflicts_once(emu):
    emu.only("s3-conditional-conflict")
    bucket = new_bucket(emu)
    s3 = s3_client(emu, "eu-west-1")
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.put_object(Bucket=bucket, Key="env.lock", Body=b"a", IfNoneMatch="*")
    assert error_of(e)[:2] == (409, "ConditionalRequestConflict")
    etag = s3.put_object(Bucket=bucket, Key="env.lock", Body=b"a", IfNoneMatch="*")["ETag"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3.put_object(Bucket=bucket, Key="env.lock", Body=b"b", IfNoneMatch="*")
    assert error_of(e)[:2] == (412, "PreconditionFailed")
    s3.put_object(Bucket=bucket, Key="plain", Body=b"x")  # unconditional writes never conflict
    s3.put_object(Bucket=bucket, Key="plain", Body=b"y")
    s3.delete_object(Bucket=bucket, Key="env.lock", IfMatch=etag)


def test_s3_get_bucket_versioning_answers_the_documented_root(emu):
    emu.only("s3-response-shapes")
    bucket = new_bucket(emu)
    s3_client(emu, "eu-west-1").put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    status, _, body = raw_s3(emu, "GET", f"/{bucket}?versioning", "eu-west-1")
    assert status == 200 and b"<VersioningConfiguration" in body and b"<Status>Enabled</Status>" in body
    emu.config(rules_off=["all"])
    assert b"<GetBucketVersioningResponse" in raw_s3(emu, "GET", f"/{bucket}?versioning", "eu-west-1")[2]


def test_get_function_gives_a_location_to_download_the_uploaded_package(emu):
    import urllib.request
    emu.only("lambda-code-location")
    lam = emu.client("lambda", "eu-west-1")
    role = emu.role(f"r{random.randrange(10**6)}")
    create_function(lam, "fn", role)
    loc = lam.get_function(FunctionName="fn")["Code"]["Location"]
    with urllib.request.urlopen(loc) as r:
        assert r.read() == ZIP.getvalue()
    second = io.BytesIO()
    with zipfile.ZipFile(second, "w") as z:
        z.writestr("h.py", "def h(event, context):\n    return 2\n")
    lam.update_function_code(FunctionName="fn", ZipFile=second.getvalue())
    with urllib.request.urlopen(lam.get_function(FunctionName="fn")["Code"]["Location"]) as r:
        assert r.read() == second.getvalue()
    emu.config(rules_off=["all"])
    assert "Location" not in lam.get_function(FunctionName="fn").get("Code", {}) or \
        not lam.get_function(FunctionName="fn")["Code"]["Location"].startswith(emu.url)


def _states(conf):
    return {k: conf.get(k) for k in ("State", "StateReasonCode", "LastUpdateStatus", "LastUpdateStatusReasonCode")}


def test_vpc_function_is_pending_then_active_and_lambda_refuses_to_invoke_it_meanwhile(emu):
    emu.only("lambda-function-states", params={"lambda-function-states": {"pending_s": 0.8, "update_s": 0.6}})
    _ec2, _vpc, subnet, sg = emu.network(region="eu-west-2", cidr="10.31.0.0/16")
    lam = emu.client("lambda", "eu-west-2")
    role = emu.role(f"r{random.randrange(10**6)}")
    hook = InvokeHook(lambda job: {"payload": json.dumps({"ran": job["function"]}), "error": None})
    try:
        ctl(emu.url, "/__proxy/invoke-hook", {"url": hook.url})
        created = create_function(lam, "in-vpc", role, {"SubnetIds": [subnet], "SecurityGroupIds": [sg]})
        pending = {"State": "Pending", "StateReasonCode": "Creating", "LastUpdateStatus": "InProgress",
                   "LastUpdateStatusReasonCode": "Creating"}
        assert _states(created) == pending
        assert created["StateReason"] == "The function is being created."
        assert _states(lam.get_function_configuration(FunctionName="in-vpc")) == pending
        assert _states(lam.get_function(FunctionName="in-vpc")["Configuration"]) == pending
        assert [_states(f) for f in lam.list_functions()["Functions"] if f["FunctionName"] == "in-vpc"] == [pending]
        with pytest.raises(botocore.exceptions.ClientError) as e:
            lam.invoke(FunctionName="in-vpc", Payload=b"{}")
        assert error_of(e) == (409, "ResourceConflictException", "The operation cannot be performed at this time. "
                               "The function is currently in the following state: Pending")
        assert hook.jobs == []  # Lambda ran nothing
        assert emu.calls()[-1]["rule"] == "lambda-function-states"
        create_function(lam, "no-vpc", role)  # without a VpcConfig: moto's Active at once
        assert lam.get_function_configuration(FunctionName="no-vpc")["State"] == "Active"
        assert lam.invoke(FunctionName="no-vpc", Payload=b"{}")["StatusCode"] == 200
        time.sleep(0.85)
        active = {"State": "Active", "StateReasonCode": None, "LastUpdateStatus": "Successful",
                  "LastUpdateStatusReasonCode": None}
        assert _states(lam.get_function_configuration(FunctionName="in-vpc")) == active
        assert json.loads(lam.invoke(FunctionName="in-vpc", Payload=b"{}")["Payload"].read()) == {"ran": "in-vpc"}
        # An update: InProgress while State stays Active, and the function can still be invoked.
        updated = lam.update_function_configuration(FunctionName="in-vpc", Timeout=30)
        assert _states(updated) == {"State": "Active", "StateReasonCode": None, "LastUpdateStatus": "InProgress",
                                    "LastUpdateStatusReasonCode": "Creating"}
        assert lam.invoke(FunctionName="in-vpc", Payload=b"{}")["StatusCode"] == 200
        time.sleep(0.65)
        assert _states(lam.get_function_configuration(FunctionName="in-vpc")) == active
        lam.delete_function(FunctionName="in-vpc")
        assert "in-vpc" not in str(emu.rules()["lambda-function-states"]["state"])
        # The rule off: moto's Active at once, and the invocation runs.
        emu.config(rules_off=["all"])
        create_function(lam, "in-vpc-2", role, {"SubnetIds": [subnet], "SecurityGroupIds": [sg]})
        assert lam.get_function_configuration(FunctionName="in-vpc-2")["State"] == "Active"
        assert lam.invoke(FunctionName="in-vpc-2", Payload=b"{}")["StatusCode"] == 200
    finally:
        hook.close()


def test_two_promotions_at_once_one_is_refused():
    """The alarm's invocation and the schedule's can promote in the same instant: RDS takes one."""
    engine = awsrules.Engine(lambda *a: (599, [], b""))

    def promote():
        return awsrules.Call("POST", "/", {"Content-Type": "application/x-www-form-urlencoded"},
                             b"Action=PromoteReadReplica&Version=2014-10-31&DBInstanceIdentifier=rep", "rds",
                             "eu-west-1", "PromoteReadReplica")
    first, second = promote(), promote()
    assert engine.before(first) is None  # taken: on its way to RDS
    name, ans = engine.before(second)
    assert (name, ans.status) == ("rds-state-machine", 400) and b"InvalidDBInstanceState" in ans.body
    engine.done(second)
    assert engine.before(promote()) is not None  # the first is still being answered
    engine.done(first)
    assert engine.before(promote()) is None  # answered (and failed here: nothing noted)
