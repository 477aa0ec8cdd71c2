"""The DR harness's control loop: CloudWatch's alarm evaluation and Route 53's weighted routing as
AWS documents them (unit tests), then region loss over real PostgreSQL with what pgdr deployed
(tests/python/test_dr_scenarios.py)."""
import pytest

from drloop import Alarm, Clock, HealthCheck, Metrics, Network, Record, weighted_answer


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
