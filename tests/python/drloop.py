"""AWS's control loop, played over what pgdr deployed to the emulator, on a scaled clock.

Nothing here comes from the repository: the schedules, functions (the packages pgdr uploaded,
downloaded through GetFunction's `Code.Location`), their environments, the alarms, the health
checks and the records are read back from the emulator, and the loop does with them what AWS
does:

- EventBridge: a rule's `rate(N minutes)` schedule invokes its Lambda targets (with the rule's
  `Input`, else a scheduled-event shape) while the rule is ENABLED.
- Lambda: the handler runs in-process with the environment pgdr gave the function (and the
  emulator's endpoint); each invocation counts in `AWS/Lambda` `Invocations` and, when it
  raises, `Errors` (dimension `FunctionName`), as Lambda publishes them.
- CloudWatch: the handlers' `PutMetricData` datapoints are recorded at emulated time, in the
  region of the client that put them. Every emulated minute each alarm is evaluated as CloudWatch does: the statistic of each of the last
  `EvaluationPeriods` periods, `DatapointsToAlarm` of them breaching to alarm, missing periods
  treated per `TreatMissingData`; a state change fires its actions (SNS publishes recorded,
  Lambda functions invoked with the alarm-event shape) and the new state is written to the
  emulator (SetAlarmState), so that DescribeAlarms answers what CloudWatch would.
- Route 53: a `CLOUDWATCH_METRIC` health check is healthy while its alarm is OK, per
  `InsufficientDataHealthStatus` while the alarm has no data, inverted if `Inverted`; the
  resolver answers a name by weighted routing with health: unhealthy records out, weight-0
  records only when no healthy record has weight, every record when none is healthy (fail open).

The database network is the harness's: an instance's endpoint (as RDS answers it) reaches the
local PostgreSQL cluster standing behind it, unless a fault cuts it.
"""
import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

MINUTE = 60.0
RUNNER = Path(__file__).resolve().parent / "lambda_runner.py"


class Clock:
    """Emulated seconds since the start, `scale` emulated seconds per real second. The scale can
    change (`set_scale`): while an operator's command runs, its real seconds count as they are
    (scale 1), since a command's latency is not the emulator's to speed up."""

    def __init__(self, scale):
        self.t0 = time.monotonic()
        self.segments = [(self.t0, 0.0, float(scale))]  # (real start, emulated start, scale)

    @property
    def scale(self):
        return self.segments[-1][2]

    def set_scale(self, scale):
        real = time.monotonic()
        self.segments.append((real, self.of_real(real), float(scale)))

    def now(self):
        return self.of_real(time.monotonic())

    def of_real(self, mono):
        """The emulated time of a `time.monotonic()` reading."""
        for real, emulated, scale in reversed(self.segments):
            if mono >= real:
                return emulated + (mono - real) * scale
        real, emulated, scale = self.segments[0]
        return emulated + (mono - real) * scale

    def sleep_until(self, t):
        delay = (t - self.now()) / self.scale
        if delay > 0:
            time.sleep(delay)


# ---------------------------------------------------------------------------------------------
# CloudWatch

def dims_key(dims):
    return tuple(sorted((d["Name"], d["Value"]) for d in dims or []))


class Metrics:
    """Datapoints by (region, namespace, metric, dimensions), at emulated times: CloudWatch is
    regional, and an alarm sees only its own region's metrics."""

    def __init__(self):
        self.points, self.lock = {}, threading.Lock()

    def put(self, region, namespace, name, dims, t, value):
        with self.lock:
            self.points.setdefault((region, namespace, name, dims_key(dims)), []).append((t, float(value)))

    def window(self, region, namespace, name, dims, start, end):
        with self.lock:
            return [v for t, v in self.points.get((region, namespace, name, dims_key(dims)), []) if start <= t < end]


STATISTICS = {"Sum": sum, "Maximum": max, "Minimum": min, "SampleCount": len,
              "Average": lambda vs: sum(vs) / len(vs)}
COMPARE = {"GreaterThanOrEqualToThreshold": lambda v, t: v >= t, "GreaterThanThreshold": lambda v, t: v > t,
           "LessThanThreshold": lambda v, t: v < t, "LessThanOrEqualToThreshold": lambda v, t: v <= t}


@dataclass
class Alarm:
    name: str
    region: str
    namespace: str
    metric: str
    dims: list
    statistic: str
    period: int
    evaluation_periods: int
    datapoints_to_alarm: int
    threshold: float
    comparison: str
    treat_missing: str
    actions: dict  # state -> [ARN]
    state: str = "INSUFFICIENT_DATA"
    changes: list = field(default_factory=list)  # (t, new state)

    @classmethod
    def of(cls, a, region):
        return cls(name=a["AlarmName"], region=region, namespace=a["Namespace"], metric=a["MetricName"],
                   dims=a.get("Dimensions") or [], statistic=a["Statistic"], period=int(a["Period"]),
                   evaluation_periods=int(a["EvaluationPeriods"]),
                   datapoints_to_alarm=int(a.get("DatapointsToAlarm") or a["EvaluationPeriods"]),
                   threshold=float(a["Threshold"]), comparison=a["ComparisonOperator"],
                   treat_missing=a.get("TreatMissingData") or "missing",
                   actions={"ALARM": a.get("AlarmActions") or [], "OK": a.get("OKActions") or [],
                            "INSUFFICIENT_DATA": a.get("InsufficientDataActions") or []})

    def evaluate(self, metrics, now):
        """The state CloudWatch gives the alarm at `now` (the current period still open)."""
        end = now - (now % self.period)
        verdicts = []  # per period, newest first: True breaching, False not, None missing
        for i in range(self.evaluation_periods):
            hi = end - i * self.period
            values = metrics.window(self.region, self.namespace, self.metric, self.dims, hi - self.period, hi)
            if not values:
                verdicts.append(None)
            else:
                verdicts.append(COMPARE[self.comparison](STATISTICS[self.statistic](values), self.threshold))
        if self.treat_missing == "breaching":
            verdicts = [True if v is None else v for v in verdicts]
        elif self.treat_missing == "notBreaching":
            verdicts = [False if v is None else v for v in verdicts]
        present = [v for v in verdicts if v is not None]
        if not present:
            # `ignore` keeps the current state; `missing` goes to INSUFFICIENT_DATA.
            return self.state if self.treat_missing == "ignore" else "INSUFFICIENT_DATA"
        if sum(present) >= self.datapoints_to_alarm:
            return "ALARM"
        if len(present) < self.datapoints_to_alarm and self.treat_missing == "ignore":
            return self.state
        return "OK"


@dataclass
class HealthCheck:
    id: str
    alarm: tuple  # (region, name)
    insufficient: str  # Healthy | Unhealthy | LastKnownStatus
    inverted: bool
    healthy: bool = True

    def update(self, alarm_state):
        if alarm_state == "INSUFFICIENT_DATA":
            h = {"Healthy": True, "Unhealthy": False}.get(self.insufficient, self.healthy)
        else:
            h = alarm_state == "OK"
        self.healthy = (not h) if self.inverted and alarm_state != "INSUFFICIENT_DATA" else h
        return self.healthy


# ---------------------------------------------------------------------------------------------
# Route 53

@dataclass
class Record:
    name: str
    set_id: str
    weight: int
    value: str
    ttl: int
    health_check: str


def weighted_answer(records, healthy):
    """Route 53's weighted routing with health checks: the record it answers with (the heaviest
    of those it may pick, so that answers are deterministic)."""
    ok = [r for r in records if not r.health_check or healthy.get(r.health_check, True)]
    pool = ok or records  # all unhealthy: Route 53 considers them all healthy
    weighted = [r for r in pool if r.weight > 0]
    pool = weighted or pool  # only weight 0 left: equal probability among them
    return max(pool, key=lambda r: (r.weight, r.set_id)) if pool else None


# ---------------------------------------------------------------------------------------------
# The loop

class Network:
    """How the DR VPC (and the application) reach the databases: endpoint host -> (host, port)
    of a local cluster.

    `cut(host)`: the path is gone (a lost region, an outage): nothing reaches the host, and
    established connections time out too. `fence(host)`: its security group lets nothing in
    (ingress revoked): new connections time out, but established ones live on, as connection
    tracking keeps them (only a reboot ends them). `set_vpc_down`: unreachable from the DR VPC
    only (its route to them is gone)."""

    def __init__(self):
        self.routes, self.down, self.fenced, self.lock = {}, set(), set(), threading.Lock()
        self.vpc_down = set()

    def route(self, endpoint, addr):
        with self.lock:
            self.routes[endpoint] = tuple(addr)

    def cut(self, endpoint):
        with self.lock:
            self.down.add(endpoint)

    def heal(self, endpoint):
        with self.lock:
            self.down.discard(endpoint)

    def fence(self, endpoint):
        with self.lock:
            self.fenced.add(endpoint)

    def unfence(self, endpoint):
        with self.lock:
            self.fenced.discard(endpoint)

    def set_vpc_down(self, endpoints):
        with self.lock:
            self.vpc_down = set(endpoints)

    def snapshot(self):
        """The routes as a function in the DR VPC sees them: host -> (host, port), None if cut."""
        with self.lock:
            blocked = self.down | self.vpc_down | self.fenced
            return {h: (None if h in blocked else list(a)) for h, a in self.routes.items()}

    def target(self, endpoint):
        """Where a new connection to `endpoint` goes (None: it times out)."""
        with self.lock:
            if endpoint in self.down or endpoint in self.fenced:
                return None
            return self.routes.get(endpoint)

    def link_ok(self, addr):
        """Whether an established connection to the cluster at `addr` still carries packets."""
        with self.lock:
            return not any(tuple(a) == tuple(addr) and h in self.down for h, a in self.routes.items())


class Loop:
    def __init__(self, endpoint, env, regions=("us-east-1", "eu-west-1"), scale=30.0, network=None):
        self.endpoint, self.env, self.regions = endpoint, env, regions
        self.clock, self.metrics, self.network = Clock(scale), Metrics(), network or Network()
        self.invocations, self.published, self.events, self.running = [], [], [], []
        self.alarms, self.health, self.functions, self.schedules = {}, {}, {}, []
        self.next_fire = {}
        self.lock, self.refreshing = threading.Lock(), threading.Lock()
        self.zone, self.records = None, {}
        self.cfg = Config(retries={"total_max_attempts": 2, "mode": "standard"}, connect_timeout=2, read_timeout=5)
        # The alarms' states as CloudWatch shows them (DescribeAlarms): written to the emulator in
        # order by one thread per region, so that a lost region's timeouts hold nothing back.
        self.mirrors = {}

    def client(self, service, region="us-east-1"):
        return boto3.client(service, region_name=region, endpoint_url=self.endpoint, aws_access_key_id="test",
                            aws_secret_access_key="test", config=self.cfg)

    def event(self, what, **kw):
        with self.lock:
            self.events.append({"t": self.clock.now(), "what": what, **kw})

    # --- what pgdr deployed ------------------------------------------------------------------
    def discover(self):
        """Reads what pgdr deployed (again, after a pgdr command changed it: alarms keep their
        state and history, schedules start from now)."""
        prefix = f"pgdr-{self.env}"
        previous, self.alarms, self.schedules, self.next_fire = self.alarms, {}, [], {}
        for region in self.regions:
            cw = self.client("cloudwatch", region)
            for a in cw.describe_alarms(AlarmNamePrefix=prefix)["MetricAlarms"]:
                alarm = Alarm.of(a, region)
                old = previous.get((region, alarm.name))
                if old:
                    alarm.state, alarm.changes = old.state, old.changes
                self.alarms[(region, alarm.name)] = alarm
            ev = self.client("events", region)
            for rule in ev.list_rules(NamePrefix=prefix)["Rules"]:
                m = re.match(r"rate\((\d+) minutes?\)", rule.get("ScheduleExpression") or "")
                if not m or rule.get("State") != "ENABLED":
                    continue
                for t in ev.list_targets_by_rule(Rule=rule["Name"])["Targets"]:
                    self.schedules.append({"rule": rule["Name"], "every": int(m.group(1)) * MINUTE,
                                           "arn": t["Arn"], "input": t.get("Input")})
            lam = self.client("lambda", region)
            for f in lam.list_functions()["Functions"]:
                if f["FunctionName"].startswith(prefix):
                    self.functions[f["FunctionArn"]] = self.load_function(lam, f["FunctionName"], region)
        self.apply_routing(self.read_routing())
        return self

    # --- Route 53: its control plane read back, its data plane played ---------------------------
    def read_routing(self):
        """The zone, the CNAME records and the CLOUDWATCH_METRIC health checks, as Route 53's
        control plane holds them now."""
        r53 = self.client("route53")
        checks = []
        for hc in r53.list_health_checks()["HealthChecks"]:
            c = hc["HealthCheckConfig"]
            if c.get("Type") == "CLOUDWATCH_METRIC":
                ai = c["AlarmIdentifier"]
                checks.append((hc["Id"], (ai["Region"], ai["Name"]), c.get("InsufficientDataHealthStatus", "LastKnownStatus"),
                               bool(c.get("Inverted"))))
        zones = [z for z in r53.list_hosted_zones()["HostedZones"] if z["Name"].startswith(f"db-{self.env}.")]
        records = {}
        for z in zones:
            for rr in r53.list_resource_record_sets(HostedZoneId=z["Id"])["ResourceRecordSets"]:
                if rr["Type"] != "CNAME":
                    continue
                records.setdefault(rr["Name"], []).append(Record(
                    rr["Name"], rr.get("SetIdentifier", ""), int(rr.get("Weight", 1)),
                    rr["ResourceRecords"][0]["Value"], int(rr.get("TTL", 60)), rr.get("HealthCheckId", "")))
        return (zones[0]["Name"] if zones else None), records, checks

    def apply_routing(self, routing):
        zone, records, checks = routing
        health = {}
        for hc_id, alarm, insufficient, inverted in checks:
            old = self.health.get(hc_id)
            health[hc_id] = HealthCheck(hc_id, alarm, insufficient, inverted, old.healthy if old else True)
        with self.lock:
            self.zone, self.records, self.health = zone, records, health

    def refresh_routing(self):
        """Route 53's data plane answers from the last configuration it got, whether or not its
        control plane answers: the loop rereads it in the background every emulated minute and
        keeps the last one it could read."""
        if self.refreshing.locked():
            return

        def read():
            with self.refreshing:
                try:
                    self.apply_routing(self.read_routing())
                except Exception as e:  # noqa: BLE001 (control plane unreachable: keep serving)
                    self.event("route53-unreadable", error=str(e))
        threading.Thread(target=read, daemon=True).start()

    def load_function(self, lam, name, region):
        f = lam.get_function(FunctionName=name)
        conf = f["Configuration"]
        with urllib.request.urlopen(f["Code"]["Location"], timeout=10) as r:
            package = r.read()
        module_name, func = conf["Handler"].rsplit(".", 1)
        with zipfile.ZipFile(io.BytesIO(package)) as z:
            source = z.read(f"{module_name}.py").decode()
        return {"name": name, "region": region, "module": module_name, "func": func, "source": source,
                "env": (conf.get("Environment") or {}).get("Variables") or {}, "timeout": conf.get("Timeout", 3)}

    # --- Lambda ------------------------------------------------------------------------------
    def invoke(self, arn, event, why, t=None):
        """Starts one invocation in its own process (Lambda runs invocations side by side); its
        outcome is collected by `collect()`."""
        fn = self.functions.get(arn)
        if fn is None:
            self.event("invoke-missing", arn=arn, why=why)
            return
        t = self.clock.now() if t is None else t
        env = {"PATH": os.environ.get("PATH", ""), **fn["env"], "AWS_REGION": fn["region"],
               "AWS_DEFAULT_REGION": fn["region"], "AWS_ENDPOINT_URL": self.endpoint,
               "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "PYTHONDONTWRITEBYTECODE": "1"}
        job = {"module": fn["module"], "func": fn["func"], "source": fn["source"], "event": event,
               "timeout": fn["timeout"], "routes": self.network.snapshot()}
        proc = subprocess.Popen([sys.executable, str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, text=True)
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        with self.lock:
            self.running.append({"proc": proc, "t": t, "real": time.monotonic(), "fn": fn, "why": why})

    def collect(self, wait=False):
        """Records the invocations that finished: Lambda's Invocations and Errors metrics at
        their start, the datapoints they published when they published them."""
        with self.lock:
            running, self.running = self.running, []
        still = []
        for r in running:
            proc = r["proc"]
            if proc.poll() is None and not wait:
                if time.monotonic() - r["real"] > r["fn"]["timeout"]:
                    proc.kill()
                    proc.wait()
                    self._finish(r, {"error": "Task timed out", "result": None, "metrics": []})
                else:
                    still.append(r)
                continue
            text = proc.stdout.read()
            proc.wait()
            try:
                out = json.loads(text.strip().splitlines()[-1])
            except (ValueError, IndexError):
                out = {"error": f"runtime exited {proc.returncode}", "result": None, "metrics": []}
            self._finish(r, out)
        with self.lock:
            self.running = still + self.running

    def _finish(self, r, out):
        fn, t = r["fn"], r["t"]
        for m in out["metrics"]:
            mt = t + self.clock.of_real(r["real"] + m["dt"]) - self.clock.of_real(r["real"])
            region = m.get("region") or fn["region"]
            self.metrics.put(region, m["namespace"], m["metric"], m["dims"], mt, m["value"])
            with self.lock:
                self.published.append({"t": mt, "region": region, "namespace": m["namespace"],
                                       "metric": m["metric"], "value": m["value"]})
        dims = [{"Name": "FunctionName", "Value": fn["name"]}]
        self.metrics.put(fn["region"], "AWS/Lambda", "Invocations", dims, t, 1)
        self.metrics.put(fn["region"], "AWS/Lambda", "Errors", dims, t, 1 if out["error"] else 0)
        with self.lock:
            self.invocations.append({"t": t, "function": fn["name"], "why": r["why"], "error": out["error"],
                                     "result": out["result"], "t_end": self.clock.of_real(time.monotonic())})

    # --- one emulated minute -------------------------------------------------------------------
    def step(self):
        self.collect()
        self.refresh_routing()
        now = self.clock.now()
        for s in self.schedules:
            key = (s["rule"], s["arn"])
            self.next_fire.setdefault(key, now)
            while self.next_fire[key] <= now:  # every due run, at its own time
                t = self.next_fire[key]
                self.next_fire[key] = t + s["every"]
                event = json.loads(s["input"]) if s["input"] else {"source": "aws.events", "detail-type": "Scheduled Event"}
                self.invoke(s["arn"], event, f"schedule {s['rule']}", t=t)
        now = self.clock.now()
        for alarm in self.alarms.values():
            new = alarm.evaluate(self.metrics, now)
            if new != alarm.state:
                old, alarm.state = alarm.state, new
                alarm.changes.append((now, new))
                self.event("alarm", alarm=alarm.name, old=old, new=new)
                self.mirror(alarm.region, alarm.name, new)
                for arn in alarm.actions.get(new, []):
                    self.act(arn, alarm, old, new, now)
        with self.lock:
            checks = list(self.health.values())
        for hc in checks:
            alarm = self.alarms.get(hc.alarm)
            before = hc.healthy
            if hc.update(alarm.state if alarm else "INSUFFICIENT_DATA") != before:
                self.event("health", id=hc.id, healthy=hc.healthy)

    def mirror(self, region, name, state):
        if region not in self.mirrors:
            self.mirrors[region] = queue.Queue()
            threading.Thread(target=self._mirror_states, args=(region, self.mirrors[region]), daemon=True).start()
        self.mirrors[region].put((name, state))

    def _mirror_states(self, region, states):
        cw = self.client("cloudwatch", region)
        while True:
            name, state = states.get()
            try:
                cw.set_alarm_state(AlarmName=name, StateValue=state, StateReason="drloop evaluation")
            except Exception as e:  # noqa: BLE001 (a lost region: nobody reads its alarms either)
                self.event("alarm-mirror-failed", alarm=name, error=str(e))

    def act(self, arn, alarm, old, new, now):
        if ":sns:" in arn:
            with self.lock:
                self.published.append({"t": now, "sns": arn, "alarm": alarm.name, "state": new})
            return
        if ":lambda:" in arn:
            self.invoke(arn, {"source": "aws.cloudwatch", "alarmArn": f"arn:aws:cloudwatch:{alarm.region}:123456789012:alarm:{alarm.name}",
                              "alarmData": {"alarmName": alarm.name, "state": {"value": new},
                                            "previousState": {"value": old}}}, f"alarm {alarm.name}")

    def resolve(self, name):
        """The CNAME value Route 53 answers for `name` now (None: no such record)."""
        with self.lock:
            recs = self.records.get(name if name.endswith(".") else name + ".", [])
            healthy = {i: h.healthy for i, h in self.health.items()}
        r = weighted_answer(recs, healthy)
        return r.value if r else None

    def run(self, until, every=MINUTE, stop=None, between=None):
        """Steps once per emulated `every` until emulated time `until` or `stop()`."""
        t = self.clock.now()
        while t < until:
            self.step()
            if between:
                between()
            if stop and stop():
                return True
            t += every
            self.clock.sleep_until(t)
        return False
