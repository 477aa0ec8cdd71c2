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

The database network is the harness's (`Network`): an instance's endpoint (as RDS answers it)
reaches the local PostgreSQL cluster standing behind it, unless a fault cuts it, and only for a
client its security groups admit: a client is a place in a VPC (its Region, the CIDR blocks its
addresses come from) and the security groups of its network interface (`Client`).

Invocations run in their own processes (tests/python/lambda_runner.py), which ask the harness, at
every connection attempt, how a name resolves and whether the network lets them in
(`HarnessServer`, GET /lookup): a long invocation sees routes, rules and DNS change while it runs.
"""
import http.server
import io
import ipaddress
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import boto3
from botocore.config import Config

MINUTE = 60.0
CLIENTS_LOCK = threading.Lock()
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

PG_PORT = 5432


@dataclass(frozen=True)
class Client:
    """Where a connection comes from: a VPC (its Region and the CIDR blocks its source
    addresses are in: a VPC's CIDR, or a Lambda function's subnets) and the security groups of
    its network interface. region None: outside every VPC (a Lambda function without a
    VpcConfig), from where no private endpoint is reachable."""
    name: str
    region: object = None
    cidrs: tuple = ()
    groups: frozenset = frozenset()


def ingress_rules(permissions):
    """DescribeSecurityGroups' IpPermissions -> [(protocol, from, to, (cidr, ...), (group, ...))]."""
    out = []
    for p in permissions or []:
        out.append((str(p.get("IpProtocol", "")), p.get("FromPort"), p.get("ToPort"),
                    tuple(r["CidrIp"] for r in p.get("IpRanges") or [] if r.get("CidrIp")),
                    tuple(g["GroupId"] for g in p.get("UserIdGroupPairs") or [] if g.get("GroupId"))))
    return out


def covers_port(rule, port=PG_PORT):
    proto, lo, hi = rule[0], rule[1], rule[2]
    if proto in ("-1", "all"):
        return True
    if proto not in ("tcp", "6"):
        return False
    lo = -1 if lo is None else int(lo)
    hi = -1 if hi is None else int(hi)
    return (lo == -1 and hi == -1) or lo <= port <= hi


def _within(cidr, rule_cidr):
    try:
        return ipaddress.ip_network(cidr, strict=False).subnet_of(ipaddress.ip_network(rule_cidr, strict=False))
    except (ValueError, TypeError):
        return False


class Network:
    """How clients reach the databases: endpoint host -> (host, port) of a local cluster, and
    who may open a connection to it.

    `cut(host)`: the path is gone (a lost region, an outage): nothing reaches the host, and
    established connections time out too. Security groups (`place` an endpoint with its groups,
    `set_rules` a group's ingress as DescribeSecurityGroups answers it): a client may open a NEW
    connection iff some rule covering TCP 5432 admits one of the CIDR blocks its addresses are
    in, or references one of its own security groups; a security group reference counts only
    from the same Region, since a peer VPC's group in another Region cannot be referenced (the
    peer's CIDR block can). Established connections live on when rules go (connection tracking):
    only the server ends them. `fence(host)`: the old blanket form, no new connection from
    anyone. `set_vpc_down(endpoints, region)`: unreachable from that Region's VPC (its route to
    them is gone); region None: from every function. `forget(host)`: the instance was deleted,
    its name no longer resolves. An endpoint without known rules admits every client in a VPC."""

    def __init__(self):
        self.routes, self.down, self.fenced, self.lock = {}, set(), set(), threading.RLock()
        self.vpc_down = {}     # region (None: every function) -> endpoints
        self.places = {}       # endpoint -> (region, (security group, ...))
        self.sg_rules = {}     # (region, group) -> ingress_rules()
        self.deleted = set()

    def route(self, endpoint, addr):
        with self.lock:
            self.routes[endpoint] = tuple(addr)
            self.deleted.discard(endpoint)

    def forget(self, endpoint):
        with self.lock:
            self.deleted.add(endpoint)

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

    def set_vpc_down(self, endpoints, region=None):
        with self.lock:
            self.vpc_down[region] = set(endpoints)

    def place(self, endpoint, region, groups):
        with self.lock:
            self.places[endpoint] = (region, tuple(groups))

    def set_rules(self, region, group, permissions):
        with self.lock:
            self.sg_rules[(region, group)] = ingress_rules(permissions)

    def rules_of(self, endpoint):
        """The ingress rules covering 5432 of the endpoint's groups; None: not known."""
        with self.lock:
            place = self.places.get(endpoint)
            if place is None:
                return None
            region, groups = place
            known = [self.sg_rules[(region, g)] for g in groups if (region, g) in self.sg_rules]
            if not known:
                return None
            return [r for rules in known for r in rules if covers_port(r)]

    def admits(self, endpoint, client):
        """(True, why) if `client` may open a new connection to `endpoint`, else (False, why)."""
        with self.lock:
            if endpoint in self.deleted:
                return False, "no such host (the instance was deleted)"
            if endpoint in self.down:
                return False, "cut: nothing answers"
            if endpoint in self.fenced:
                return False, "fenced: no ingress"
            if client is None:  # the old, client-less view: routes and the faults above only
                return True, "routed"
            if endpoint in self.vpc_down.get(None, set()) or endpoint in self.vpc_down.get(client.region, set()):
                return False, f"no route from the {client.region} VPC"
            if client.region is None:
                return False, f"{client.name} is not in a VPC: a private endpoint is out of its reach"
            rules = self.rules_of(endpoint)
            if rules is None:
                return True, "no security group known"
            region = self.places[endpoint][0]
            for proto, lo, hi, cidrs, groups in rules:
                if client.cidrs and all(any(_within(c, rc) for rc in cidrs) for c in client.cidrs):
                    return True, f"{proto} {lo}-{hi} from {', '.join(cidrs)}"
                if client.region == region and set(groups) & set(client.groups):
                    return True, f"{proto} {lo}-{hi} from {', '.join(sorted(set(groups) & set(client.groups)))}"
            cross = "" if client.region == region else " (another Region: security group references do not count)"
            return False, (f"no ingress rule on 5432 of {', '.join(self.places[endpoint][1])} admits "
                           f"{client.name} ({', '.join(client.cidrs) or 'no address'}; "
                           f"groups {', '.join(sorted(client.groups)) or 'none'}){cross}")

    def closed(self, endpoint):
        """No rule on 5432 left at all (fully fenced); False when the rules are not known."""
        rules = self.rules_of(endpoint)
        return rules is not None and not rules

    def known(self, endpoint):
        with self.lock:
            return endpoint in self.routes or endpoint in self.deleted

    def snapshot(self, client=None):
        """The routes as `client` sees them: host -> (host, port), None where it cannot connect."""
        with self.lock:
            hosts = list(self.routes)
        out = {}
        for h in hosts:
            ok, _ = self.admits(h, client)
            if client is None:
                with self.lock:
                    ok = ok and not any(h in v for v in self.vpc_down.values())
            out[h] = list(self.routes[h]) if ok else None
        return out

    def target(self, endpoint, client=None):
        """Where a new connection to `endpoint` from `client` goes (None: it times out)."""
        ok, _ = self.admits(endpoint, client)
        with self.lock:
            return self.routes.get(endpoint) if ok else None

    def link_ok(self, addr):
        """Whether an established connection to the cluster at `addr` still carries packets."""
        with self.lock:
            return not any(tuple(a) == tuple(addr) and h in self.down for h, a in self.routes.items())


class HarnessServer:
    """A loopback HTTP server of the harness (a thread per request):

    GET /lookup?client=ID&host=NAME   how NAME resolves for the client and whether the network
        lets it connect: {"known", "canonical", "aliases", "ip", "addr": [host, port] | null,
        "error": null | "timeout" | "nxdomain", "why"} (known false: not a harness name)
    POST /invoke                     the emulator proxy's invoke hook (when `invoke` is set)
    """

    def __init__(self, lookup, invoke=None):
        self.lookup, self.invoke = lookup, invoke
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def answer(self, status, obj):
                body = json.dumps(obj, default=str).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                if url.path != "/lookup" or "host" not in q:
                    return self.answer(404, {"error": f"no {self.path}"})
                try:
                    return self.answer(200, outer.lookup(q["host"], q.get("client")))
                except Exception as e:  # noqa: BLE001 (a harness bug: say so to the runner)
                    return self.answer(500, {"error": f"{type(e).__name__}: {e}"})

            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if urllib.parse.urlsplit(self.path).path != "/invoke" or outer.invoke is None:
                    return self.answer(404, {"error": f"no {self.path}"})
                try:
                    return self.answer(200, outer.invoke(json.loads(data)))
                except Exception as e:  # noqa: BLE001
                    return self.answer(500, {"error": f"{type(e).__name__}: {e}"})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="harness-server", daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def endpoint_answer(network, endpoint, client, aliases=()):
    """The lookup answer for an endpoint name (after any CNAME): what DNS gives and whether the
    client may connect."""
    endpoint = endpoint.rstrip(".")
    if not network.known(endpoint):
        return {"known": bool(aliases), "canonical": endpoint, "aliases": list(aliases), "ip": None, "addr": None,
                "error": "nxdomain", "why": f"{endpoint} does not resolve"}
    if endpoint in network.deleted:
        return {"known": True, "canonical": endpoint, "aliases": list(aliases), "ip": None, "addr": None,
                "error": "nxdomain", "why": "no such host (the instance was deleted)"}
    ok, why = network.admits(endpoint, client)
    with network.lock:
        addr = network.routes.get(endpoint)
    return {"known": True, "canonical": endpoint, "aliases": list(aliases), "ip": addr[0] if addr else None,
            "addr": list(addr) if ok and addr else None, "error": None if ok else "timeout", "why": why}


def lambda_environment(fn, endpoint):
    """The environment a function's invocation runs with: pgdr's variables, Lambda's own, and
    the AWS endpoint pointing at the emulator."""
    return {"PATH": os.environ.get("PATH", ""), **fn["env"], "AWS_REGION": fn["region"],
            "AWS_DEFAULT_REGION": fn["region"], "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "PYTHONDONTWRITEBYTECODE": "1",
            "AWS_LAMBDA_FUNCTION_NAME": fn["name"], "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12"}


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
        # Name resolution and reachability for the invocations' processes (HarnessServer):
        # clients by id; lookup_hook(host, client) replaces the plain lookup (DrEnv's adds the
        # resolvers' TTL caches); invoke_hook(job) answers the emulator's invoke hook.
        self.server, self.clients, self.lookup_hook, self.invoke_hook = None, {}, None, None

    def client(self, service, region="us-east-1"):
        with CLIENTS_LOCK:  # creating clients on the default session is not thread-safe
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
        previous = self.alarms
        alarms, schedules, functions = {}, [], {}
        for region in self.regions:  # read everything first: a failed read changes nothing
            cw = self.client("cloudwatch", region)
            for a in cw.describe_alarms(AlarmNamePrefix=prefix)["MetricAlarms"]:
                alarm = Alarm.of(a, region)
                old = previous.get((region, alarm.name))
                if old:
                    alarm.state, alarm.changes = old.state, old.changes
                alarms[(region, alarm.name)] = alarm
            ev = self.client("events", region)
            for rule in ev.list_rules(NamePrefix=prefix)["Rules"]:
                m = re.match(r"rate\((\d+) minutes?\)", rule.get("ScheduleExpression") or "")
                if not m or rule.get("State") != "ENABLED":
                    continue
                for t in ev.list_targets_by_rule(Rule=rule["Name"])["Targets"]:
                    schedules.append({"rule": rule["Name"], "every": int(m.group(1)) * MINUTE,
                                      "arn": t["Arn"], "input": t.get("Input")})
            lam = self.client("lambda", region)
            for f in lam.list_functions()["Functions"]:
                if f["FunctionName"].startswith(prefix):
                    functions[f["FunctionArn"]] = self.load_function(lam, f["FunctionName"], region)
        routing = self.read_routing()
        self.alarms, self.schedules, self.next_fire = alarms, schedules, {}
        self.functions = functions
        self.apply_routing(routing)
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
        """A function as pgdr deployed it: its configuration and the package GetFunction's
        Code.Location serves; its place in the network from its VpcConfig (the subnets' CIDR
        blocks, its security groups), or outside every VPC."""
        f = lam.get_function(FunctionName=name)
        conf = f["Configuration"]
        with urllib.request.urlopen(f["Code"]["Location"], timeout=10) as r:
            package = r.read()
        module_name, func = conf["Handler"].rsplit(".", 1)
        with zipfile.ZipFile(io.BytesIO(package)) as z:
            source = z.read(f"{module_name}.py").decode()
        vpc = conf.get("VpcConfig") or {}
        if vpc.get("SubnetIds"):
            subnets = self.client("ec2", region).describe_subnets(SubnetIds=vpc["SubnetIds"])["Subnets"]
            client = Client(f"{region}/{name}", region, tuple(sorted(x["CidrBlock"] for x in subnets)),
                            frozenset(vpc.get("SecurityGroupIds") or []))
        else:
            client = Client(f"{region}/{name}", None)
        return {"name": name, "region": region, "module": module_name, "func": func, "source": source,
                "env": (conf.get("Environment") or {}).get("Variables") or {}, "timeout": conf.get("Timeout", 3),
                "memory": conf.get("MemorySize", 128), "client": client}

    # --- the invocations' view of DNS and the network ------------------------------------------
    def serve(self):
        """The harness server's URL (started on first use)."""
        with self.lock:
            if self.server is None:
                self.server = HarnessServer(self.lookup, lambda job: self.invoke_hook(job))
            return self.server.url

    def register(self, client):
        """An id the runner passes back at every lookup."""
        with self.lock:
            self.clients[client.name] = client
        return client.name

    def lookup(self, host, client_id):
        client = self.clients.get(client_id)
        if self.lookup_hook is not None:
            return self.lookup_hook(host, client)
        name = host.rstrip(".")
        with self.lock:
            in_zone = (name + ".") in self.records
        if in_zone:  # Route 53's answer (no resolver cache here: DrEnv adds one)
            value = self.resolve(name)
            if value is None:
                return {"known": True, "canonical": name, "aliases": [], "ip": None, "addr": None,
                        "error": "nxdomain", "why": "no record"}
            return endpoint_answer(self.network, value, client, aliases=[name])
        if not self.network.known(name):
            return {"known": False}
        return endpoint_answer(self.network, name, client)

    def resolver_for(self, fn):
        return {"url": self.serve() + "/lookup", "client": self.register(fn["client"])}

    def close(self):
        if self.server is not None:
            self.server.close()
            self.server = None

    # --- Lambda ------------------------------------------------------------------------------
    def invoke(self, arn, event, why, t=None):
        """Starts one invocation in its own process (Lambda runs invocations side by side); its
        outcome is collected by `collect()`."""
        fn = self.functions.get(arn)
        if fn is None:
            self.event("invoke-missing", arn=arn, why=why)
            return
        t = self.clock.now() if t is None else t
        env = lambda_environment(fn, self.endpoint)
        job = {"module": fn["module"], "func": fn["func"], "source": fn["source"], "event": event,
               "timeout": fn["timeout"], "resolver": self.resolver_for(fn)}
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

    def record_invocation(self, fn, t, real, why, out):
        """An invocation that ran elsewhere (the invoke hook's): its metrics and its record, as
        for the loop's own."""
        self._finish({"fn": fn, "t": t, "real": real, "why": why}, out)

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
