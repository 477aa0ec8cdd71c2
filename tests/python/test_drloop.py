"""The DR harness's control loop: CloudWatch's alarm evaluation and Route 53's weighted routing as
AWS documents them (unit tests), then region loss over real PostgreSQL with what pgdr deployed
(tests/python/test_dr_scenarios.py)."""
import json
import socket
import socketserver
import subprocess
import sys
import threading
import time

import pytest

from drloop import (RUNNER, Alarm, Client, Clock, HarnessServer, HealthCheck, Metrics, Network, Record,
                    endpoint_answer, weighted_answer)


def alarm(**kw):
    base = dict(name="a", region="eu-west-1", namespace="AWS/Lambda", metric="Errors", dims=[], statistic="Sum",
                period=60, evaluation_periods=3, datapoints_to_alarm=3, threshold=1.0,
                comparison="GreaterThanOrEqualToThreshold", treat_missing="breaching", actions={})
    base.update(kw)
    return Alarm(**base)


def feed(metrics, values, period=60):
    """One datapoint per period (None: no datapoint), periods 0, 1, 2, …"""
    for i, v in enumerate(values):
        if v is not None:
            metrics.put("eu-west-1", "AWS/Lambda", "Errors", [], i * period + 1, v)


def test_m_of_n_breaching_periods_alarm():
    m = Metrics()
    feed(m, [1, 1, 0, 1, 1, 1])
    a = alarm()
    # Evaluated at the start of period 3: periods 0-2 are 1, 1, 0: not 3 of 3.
    assert a.evaluate(m, 3 * 60) == "OK"
    assert a.evaluate(m, 6 * 60) == "ALARM"  # periods 3-5
    a2 = alarm(datapoints_to_alarm=2)
    assert a2.evaluate(m, 3 * 60) == "ALARM"  # 2 of 3 is enough


def test_the_open_period_is_not_evaluated():
    m = Metrics()
    feed(m, [0, 0, 1])  # the breach is in period 2: [120, 180)
    a = alarm(datapoints_to_alarm=1, treat_missing="notBreaching")
    assert a.evaluate(m, 179) == "OK"  # period 2 still open
    assert a.evaluate(m, 180) == "ALARM"


@pytest.mark.parametrize("treat, want", [("breaching", "ALARM"), ("notBreaching", "OK"),
                                          ("missing", "INSUFFICIENT_DATA"), ("ignore", "INSUFFICIENT_DATA")])
def test_missing_data_treatments(treat, want):
    m = Metrics()  # no datapoint at all: a silent probe
    assert alarm(treat_missing=treat).evaluate(m, 10 * 60) == want


def test_ignore_keeps_the_state_when_data_stops():
    m = Metrics()
    feed(m, [1])
    a = alarm(metric="Errors", statistic="Maximum", evaluation_periods=1, datapoints_to_alarm=1, treat_missing="ignore")
    assert a.evaluate(m, 60) == "ALARM"
    a.state = "ALARM"
    assert a.evaluate(m, 10 * 60) == "ALARM"  # nothing published since: the state stays


def test_statistics_and_comparisons():
    m = Metrics()
    for v in (1, 5, 3):
        m.put("eu-west-1", "AWS/Lambda", "Errors", [], 10, v)
    one = dict(evaluation_periods=1, datapoints_to_alarm=1)
    assert alarm(statistic="Maximum", threshold=5, **one).evaluate(m, 60) == "ALARM"
    assert alarm(statistic="Minimum", threshold=2, **one).evaluate(m, 60) == "OK"
    assert alarm(statistic="Average", threshold=3, **one).evaluate(m, 60) == "ALARM"
    assert alarm(statistic="Sum", comparison="LessThanThreshold", threshold=10, **one).evaluate(m, 60) == "ALARM"
    assert alarm(statistic="Sum", comparison="GreaterThanThreshold", threshold=9, **one).evaluate(m, 60) == "OK"


def test_dimensions_must_match():
    m = Metrics()
    m.put("eu-west-1", "AWS/Lambda", "Errors", [{"Name": "FunctionName", "Value": "other"}], 10, 1)
    a = alarm(dims=[{"Name": "FunctionName", "Value": "probe"}], evaluation_periods=1, datapoints_to_alarm=1,
              treat_missing="notBreaching")
    assert a.evaluate(m, 60) == "OK"


def test_an_alarm_sees_only_its_own_regions_metrics():
    """CloudWatch is regional: after reprotect the same metric lives in both regions."""
    m = Metrics()
    m.put("us-east-1", "AWS/Lambda", "Errors", [], 10, 1)
    a = alarm(evaluation_periods=1, datapoints_to_alarm=1, treat_missing="notBreaching")
    assert a.evaluate(m, 60) == "OK"
    m.put("eu-west-1", "AWS/Lambda", "Errors", [], 20, 1)
    assert a.evaluate(m, 60) == "ALARM"


def test_network_cut_and_fence():
    """A cut path stops established connections too; a fence (ingress revoked) only new ones."""
    n = Network()
    n.route("db.example", ("127.0.0.1", 5433))
    assert n.target("db.example") == ("127.0.0.1", 5433) and n.link_ok(("127.0.0.1", 5433))
    n.fence("db.example")
    assert n.target("db.example") is None and n.link_ok(("127.0.0.1", 5433))
    assert n.snapshot()["db.example"] is None
    n.unfence("db.example")
    n.cut("db.example")
    assert n.target("db.example") is None and not n.link_ok(("127.0.0.1", 5433))
    n.heal("db.example")
    assert n.link_ok(("127.0.0.1", 5433)) and n.snapshot()["db.example"] == ["127.0.0.1", 5433]


def test_health_check_follows_its_alarm():
    hc = HealthCheck("h", ("eu-west-1", "a"), "Healthy", False)
    assert hc.update("INSUFFICIENT_DATA") is True
    assert hc.update("ALARM") is False
    assert hc.update("OK") is True
    last = HealthCheck("h", ("eu-west-1", "a"), "LastKnownStatus", False)
    last.update("ALARM")
    assert last.update("INSUFFICIENT_DATA") is False
    inv = HealthCheck("h", ("eu-west-1", "a"), "Healthy", True)
    assert inv.update("ALARM") is True


def rec(set_id, weight, hc=""):
    return Record("postgres.db-x.internal.", set_id, weight, f"{set_id}.example", 60, hc)


def test_weighted_routing_with_health():
    primary, dr = rec("us-east-1", 100, "hp"), rec("eu-west-1", 0)
    assert weighted_answer([primary, dr], {"hp": True}).set_id == "us-east-1"
    # The weighted record unhealthy: the weight-0 one answers.
    assert weighted_answer([primary, dr], {"hp": False}).set_id == "eu-west-1"
    # Every record unhealthy: Route 53 fails open and routes as if all were healthy.
    both = [rec("us-east-1", 100, "hp"), rec("eu-west-1", 0, "hd")]
    assert weighted_answer(both, {"hp": False, "hd": False}).set_id == "us-east-1"
    assert weighted_answer([], {}) is None


def test_the_clock_changes_scale_without_jumping():
    c = Clock(30)
    base = c.t0
    c.segments = [(base, 0.0, 30.0), (base + 10, 300.0, 1.0), (base + 20, 310.0, 30.0)]
    assert c.of_real(base + 5) == 150.0
    assert c.of_real(base + 15) == 305.0  # an operator's command: real seconds
    assert c.of_real(base + 21) == 340.0
    assert c.scale == 30.0


# ---------------------------------------------------------------------------------------------
# Security groups decide who connects; the runner asks the harness at every connection

PRIMARY_CIDR, DR_CIDR = "10.0.0.0/16", "10.1.0.0/16"
AGENT_SG, DB_SG = "sg-agent", "sg-db"


def db_rules(cidrs=(PRIMARY_CIDR, DR_CIDR), agent=True):
    """DescribeSecurityGroups' IpPermissions as EC2 merges them: one entry per protocol and port."""
    perm = {"IpProtocol": "tcp", "FromPort": 5432, "ToPort": 5432,
            "IpRanges": [{"CidrIp": c} for c in cidrs], "UserIdGroupPairs": []}
    if agent:
        perm["UserIdGroupPairs"].append({"GroupId": AGENT_SG, "UserId": "123456789012", "Description": "pgdr agent"})
    return [perm] if perm["IpRanges"] or perm["UserIdGroupPairs"] else []


def placed_network():
    n = Network()
    n.route("db.primary", ("127.0.0.1", 5433))
    n.place("db.primary", "us-east-1", [DB_SG])
    n.set_rules("us-east-1", DB_SG, db_rules())
    return n


APP = Client("application", "us-east-1", (PRIMARY_CIDR,))
AGENT = Client("us-east-1/agent", "us-east-1", ("10.0.1.0/24", "10.0.2.0/24"), frozenset({AGENT_SG}))
PEER_AGENT = Client("eu-west-1/agent", "eu-west-1", ("10.1.1.0/24",), frozenset({AGENT_SG}))
PROBE = Client("eu-west-1/probe", "eu-west-1", ("10.1.1.0/24",), frozenset({"sg-probe"}))
NO_VPC = Client("eu-west-1/failover", None)


def test_security_group_rules_decide_per_client():
    n = placed_network()
    for c in (APP, AGENT, PEER_AGENT, PROBE):
        assert n.admits("db.primary", c)[0], c
    assert n.target("db.primary", APP) == ("127.0.0.1", 5433)
    assert not n.admits("db.primary", NO_VPC)[0]  # outside every VPC: no private endpoint
    # The switchover's fence: the CIDR rules revoked, the agent's rule kept.
    n.set_rules("us-east-1", DB_SG, db_rules(cidrs=()))
    assert not n.admits("db.primary", APP)[0] and n.target("db.primary", APP) is None
    assert n.admits("db.primary", AGENT)[0]
    ok, why = n.admits("db.primary", PEER_AGENT)  # same group id, other Region: no reference across Regions
    assert not ok and "another Region" in why
    assert not n.admits("db.primary", PROBE)[0]
    assert not n.closed("db.primary")
    # The failover's fence: every 5432 rule revoked.
    n.set_rules("us-east-1", DB_SG, [])
    assert n.closed("db.primary") and not n.admits("db.primary", AGENT)[0]
    # A rule for other ports, or all traffic
    n.set_rules("us-east-1", DB_SG, [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
                                      "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    assert not n.admits("db.primary", APP)[0]
    n.set_rules("us-east-1", DB_SG, [{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}])
    assert n.admits("db.primary", APP)[0] and n.admits("db.primary", PROBE)[0]
    # Cuts, a Region's route, a deleted instance
    n.set_vpc_down(["db.primary"], region="eu-west-1")
    assert not n.admits("db.primary", PROBE)[0] and n.admits("db.primary", APP)[0]
    n.set_vpc_down([], region="eu-west-1")
    n.cut("db.primary")
    assert not n.admits("db.primary", APP)[0]
    n.heal("db.primary")
    n.forget("db.primary")
    assert endpoint_answer(n, "db.primary", APP)["error"] == "nxdomain"
    n.route("db.primary", ("127.0.0.1", 5433))  # made again
    assert endpoint_answer(n, "db.primary", APP)["addr"] == ["127.0.0.1", 5433]


def test_an_endpoint_without_known_rules_admits_every_vpc_client():
    n = Network()
    n.route("db.x", ("127.0.0.1", 5434))
    assert n.admits("db.x", APP)[0] and n.admits("db.x", PROBE)[0] and not n.admits("db.x", NO_VPC)[0]
    assert n.snapshot()["db.x"] == ["127.0.0.1", 5434]


class Echo(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(100)
            if not data:
                return
            self.request.sendall(data)


FUNCTION = """
import socket, time

def handler(event, context):
    canonical = socket.gethostbyname_ex(event["name"])
    first = socket.create_connection((event["name"], 5432), timeout=1)
    first.sendall(b"a")
    out = {"canonical": canonical[0], "aliases": canonical[1], "first": first.recv(10).decode()}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # new connections, until the network refuses one
        try:
            socket.create_connection((event["name"], 5432), timeout=1).close()
        except socket.timeout as e:
            out["refused"] = str(e)
            break
        time.sleep(0.05)
    first.sendall(b"b")  # the established connection lives on
    out["established"] = first.recv(10).decode()
    try:
        socket.gethostbyname_ex("gone.example")
    except socket.gaierror:
        out["gone"] = "nxdomain"
    return out
"""


def test_the_runner_asks_the_harness_at_every_connection():
    echo = Echo(("127.0.0.1", 0), EchoHandler)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    n = Network()
    n.route("db.primary.rds.example", echo.server_address)
    n.place("db.primary.rds.example", "us-east-1", [DB_SG])
    n.set_rules("us-east-1", DB_SG, db_rules())
    n.route("gone.example", ("127.0.0.1", 1))
    n.forget("gone.example")
    clients = {"app": APP}

    def lookup(host, client_id):
        if host == "postgres.db-x.internal":  # a CNAME to the endpoint
            return endpoint_answer(n, "db.primary.rds.example", clients[client_id], aliases=[host])
        return endpoint_answer(n, host, clients[client_id]) if n.known(host) else {"known": False}
    server = HarnessServer(lookup)
    try:
        job = {"module": "fn", "func": "handler", "source": FUNCTION, "event": {"name": "postgres.db-x.internal"},
               "timeout": 30, "resolver": {"url": server.url + "/lookup", "client": "app"}}
        proc = subprocess.Popen([sys.executable, str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        time.sleep(1.0)  # the function runs: its first connection is up
        n.set_rules("us-east-1", DB_SG, db_rules(cidrs=()))  # the application's rule revoked meanwhile
        out = json.loads(proc.stdout.read().strip().splitlines()[-1])
        proc.wait(10)
    finally:
        server.close()
        echo.shutdown()
        echo.server_close()
    assert out["error"] is None, out
    r = out["result"]
    assert (r["canonical"], r["aliases"]) == ("db.primary.rds.example", ["postgres.db-x.internal"])
    assert r["first"] == "a" and r["established"] == "b"
    assert "refused" in r and "no ingress rule" in r["refused"]
    assert r["gone"] == "nxdomain"


def test_the_runner_reports_an_error_as_lambda_does():
    job = {"module": "fn", "func": "handler", "timeout": 5, "event": {},
           "source": "class AgentError(RuntimeError):\n    pass\n\ndef handler(event, context):\n"
                     "    raise AgentError('agent fence: cannot connect')\n"}
    out = subprocess.run([sys.executable, str(RUNNER)], input=json.dumps(job), capture_output=True, text=True,
                         timeout=30)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert (res["error_type"], res["error_message"]) == ("AgentError", "agent fence: cannot connect")
    assert res["error"] == "AgentError: agent fence: cannot connect" and res["stack"]
