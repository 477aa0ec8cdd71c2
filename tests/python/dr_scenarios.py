"""DR scenarios with figures: an environment built by `pgdr up` in a private emulator, real
PostgreSQL behind its two instances, AWS's control loop played by drloop.Loop, and a writer
that commits numbered rows through `postgres.<zone>`.

Used by tests/python/test_dr_scenarios.py (asserting outcomes and bounds) and scripts/drill
(printing the figures). Times are emulated seconds.
"""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3

import pgpair
from drloop import CLIENTS_LOCK, MINUTE, RUNNER, Client, Loop, Network, endpoint_answer, lambda_environment
from emutools import ctl, start_proxy
from pgwriter import Writer

REPO = Path(__file__).resolve().parents[2]
PRIMARY, DR = "us-east-1", "eu-west-1"


def pgdr_bin():
    explicit = os.environ.get("PGDR_BIN")
    if explicit:
        return Path(explicit)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    return target / "debug" / "pgdr"


@dataclass
class Side:
    """One side of the pair as RDS shows it and the harness stands behind it."""
    region: str
    id: str
    endpoint: str
    security_groups: list
    cluster: object  # pgpair.PgCluster


# Calls after which the loop rereads what pgdr deployed (functions, schedules, alarms).
LAMBDA_CHANGE = re.compile(r"^(POST|PUT|DELETE) /2015-03-31/functions(/[^/]+(/(configuration|code))?)?/?$")
DEPLOY_CHANGES = {"PutRule", "PutTargets", "DeleteRule", "RemoveTargets", "EnableRule", "DisableRule",
                  "PutMetricAlarm", "DeleteAlarms"}
SECRET_KEYS = ("credentials", "ca_bundle")  # never kept from an invocation's payload


def with_ca_bundle(config, path):
    """The config with `tls_ca_bundle = "<path>"` in its [defaults] (the section added when it
    has none); a config that sets tls_ca_bundle already is kept as it is."""
    text = config or ""
    if re.search(r"^\s*tls_ca_bundle\s*=", text, re.M):
        return text
    line = f"tls_ca_bundle = {json.dumps(str(path))}"
    header = re.search(r"^[ \t]*\[defaults\][ \t]*(#.*)?$", text, re.M)
    if header:
        return text[:header.end()] + "\n" + line + text[header.end():]
    return (text.rstrip("\n") + "\n\n" if text.strip() else "") + "[defaults]\n" + line + "\n"


class DrEnv:
    """One environment, its emulator, its PostgreSQL pair, its loop and its writer.

    The pair serves TLS with a certificate naming both instances' endpoints (as RDS answers
    them), signed by a test CA whose file pgdr.toml names as `tls_ca_bundle`.

    RDS's and EC2's actions reach the real clusters and the network (`follow_rds`, run between
    the loop's minutes, every 0.1 s while an operator's command runs, and before every
    invocation): PromoteReadReplica of the replica promotes the standby; every
    Authorize/RevokeSecurityGroupIngress on a DB security group rereads that group's rules
    (DescribeSecurityGroups), and the rules decide, per client, who may open new connections
    (established ones live on, as connection tracking keeps them); RebootDBInstance ends a
    cluster's sessions; StopDBInstance stops it; DeleteDBInstance makes its name unresolvable;
    CreateDBInstanceReadReplica of the promoted instance in the old primary's region (a reprotect,
    pgdr's own or inside a switchover) rebuilds the old cluster as a standby of the promoted one
    behind the new replica; a Route 53 change is read by the resolver at once (each resolver
    then keeps its cached answer for the record's TTL).

    Clients: the application writer is in the primary Region's VPC (that VPC's CIDR block, no
    security group); a Lambda function is where its VpcConfig puts it (its subnets, its
    security groups), or outside every VPC.

    Lambda Invoke (pgdr's agent) reaches the harness through the emulator's invoke hook
    (`invoke`): the function's configuration and the package pgdr uploaded are read back as the
    loop reads them and run in their own process (tests/python/lambda_runner.py) on the real
    clock, the runner asking the harness at every connection how names resolve and whether the
    network lets it in."""

    def __init__(self, name="drt", config="", scale=30.0, bindir_=None):
        self.name, self.work, self.scale = name, Path(tempfile.mkdtemp(prefix="pgdr-dr-")), scale
        self.proc, self.url = start_proxy()
        self.pair = self.writer = self.loop = None
        self.seen_seq, self.promotion_calls, self.rds_actions, self.hooks = 0, [], [], []
        self.reprotects, self.agent_calls = [], []
        self._follow_lock, self._rediscover, self._stale_sgs, self._closed = threading.RLock(), False, set(), set()
        self._dns = {}
        self.promoted_at = None
        try:
            self.build(config)
            secret = json.loads(self.client("secretsmanager", PRIMARY).get_secret_value(
                SecretId=f"pgdr/{name}/master")["SecretString"])
            self.user, self.password, self.dbname = secret["username"], secret["password"], secret["dbname"]
            endpoints = [self.describe(region, f"pgdr-{name}-{region}")["Endpoint"]["Address"] for region in (PRIMARY, DR)]
            self.pair = pgpair.PgPair(user=self.user, password=self.password, dbname=self.dbname, bindir_=bindir_,
                                      tls_hosts=endpoints)
            self.write_config(config)
            self.network = Network()
            self.vpc_cidrs = self.read_vpcs()
            self.app = Client("application", PRIMARY, (self.vpc_cidrs[PRIMARY],))
            self.primary = self.side(PRIMARY, f"pgdr-{name}-{PRIMARY}", self.pair.primary)
            self.dr = self.side(DR, f"pgdr-{name}-{DR}", self.pair.standby)
            self.loop = Loop(self.url, name, scale=scale, network=self.network).discover()
            self.loop.lookup_hook, self.loop.invoke_hook = self.lookup, self.invoke
            self.hook_url = self.loop.serve() + "/invoke"
            ctl(self.url, "/__proxy/invoke-hook", {"url": self.hook_url})
            self.writer_name = f"postgres.{self.loop.zone}"
            self.writer = Writer(self.resolve, self.writer_name, self.user, self.password, self.dbname,
                                 rate=20.0, timeout=1.0, link=self.network.link_ok)
            self.writer.setup()
            self.follow_rds()  # what up did is not a fault
            self._rediscover = False
        except BaseException:
            self.close()
            raise

    def build(self, config):
        """What the harness stands behind: `pgdr up`."""
        out = self.pgdr("up", "--env", self.name, config=config)
        if out.returncode != 0:
            raise RuntimeError(f"pgdr up failed: {out.stderr[-3000:]}")

    def describe(self, region, db_id):
        return self.client("rds", region).describe_db_instances(DBInstanceIdentifier=db_id)["DBInstances"][0]

    def write_config(self, config):
        """pgdr.toml: the given config, with the pair's CA as `tls_ca_bundle`."""
        (self.work / "pgdr.toml").write_text(with_ca_bundle(config, self.pair.ca_path))

    def read_vpcs(self):
        out = {}
        for region in (PRIMARY, DR):
            vpcs = self.client("ec2", region).describe_vpcs(
                Filters=[{"Name": "tag:pgdr:env", "Values": [self.name]}])["Vpcs"]
            out[region] = vpcs[0]["CidrBlock"]
        return out

    def side(self, region, db_id, cluster):
        db = self.describe(region, db_id)
        side = Side(region, db_id, db["Endpoint"]["Address"],
                    [g["VpcSecurityGroupId"] for g in db.get("VpcSecurityGroups") or []], cluster)
        self.network.route(side.endpoint, cluster.address)
        self.network.heal(side.endpoint)
        self.network.unfence(side.endpoint)
        self.network.place(side.endpoint, region, side.security_groups)
        for sg in side.security_groups:
            self.read_sg(region, sg)
        if self.pair.ca_path and side.endpoint not in self.pair.tls_hosts:  # a new endpoint (reprotect)
            self.pair.add_tls_hosts([side.endpoint])
        return side

    def read_sg(self, region, group):
        """A DB security group's ingress rules as EC2 has them now, into the network."""
        try:
            sg = self.client("ec2", region).describe_security_groups(GroupIds=[group])["SecurityGroups"][0]
        except Exception as e:  # noqa: BLE001 (a silent region: keep the last rules, read again later)
            self._stale_sgs.add((region, group))
            if self.loop is not None:
                self.loop.event("security-group-unreadable", region=region, group=group, error=str(e))
            return
        self._stale_sgs.discard((region, group))
        self.network.set_rules(region, group, sg.get("IpPermissions") or [])

    @property
    def sides(self):
        return [x for x in (self.primary, self.dr) if x is not None]

    @property
    def endpoints(self):
        return {"primary": self.primary.endpoint, "dr": self.dr.endpoint}

    # --- plumbing ----------------------------------------------------------------------------
    def client(self, service, region):
        with CLIENTS_LOCK:
            return boto3.client(service, region_name=region, endpoint_url=self.url, aws_access_key_id="test",
                                aws_secret_access_key="test")

    def pgdr_env(self):
        return {"PATH": os.environ.get("PATH", ""), "HOME": str(self.work), "AWS_ENDPOINT_URL": self.url,
                "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}

    def pgdr(self, *args, timeout=600, config=None):
        if config:
            (self.work / "pgdr.toml").write_text(config)
        return subprocess.run([str(pgdr_bin()), *args], cwd=self.work, env=self.pgdr_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, *args):
        """A pgdr command in the background (the kill tests)."""
        return subprocess.Popen([str(pgdr_bin()), *args], cwd=self.work, env=self.pgdr_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # --- names and reachability ----------------------------------------------------------------
    def lookup(self, host, client):
        """How `host` resolves for `client` and whether it may connect: a zone name through Route
        53 as the client's VPC resolver has it (cached for the record's TTL, per Region), an
        RDS endpoint through the network's routes and security groups."""
        name = host.rstrip(".")
        recs = self.records(name)
        if recs:
            now = self.loop.clock.now()
            key = (client.region if client else None, name)
            cached = self._dns.get(key)
            if cached is None or cached[1] <= now:
                cached = (self.loop.resolve(name), now + max(r.ttl for r in recs))
                self._dns[key] = cached
            if cached[0] is None:
                return {"known": True, "canonical": name, "aliases": [], "ip": None, "addr": None,
                        "error": "nxdomain", "why": "no record"}
            return endpoint_answer(self.network, cached[0], client, aliases=[name])
        if self.network.known(name):
            return endpoint_answer(self.network, name, client)
        return {"known": False}

    def resolve(self, name):
        """What the application gets: Route 53's answer, cached for the record's TTL, and the
        cluster behind it if the network lets the application in."""
        a = self.lookup(name, self.app)
        if not a.get("known") or not a.get("addr"):
            raise LookupError(f"{name} -> {a.get('canonical')}: {a.get('why', 'not a known name')}")
        return tuple(a["addr"])

    def records(self, name):
        return self.loop.records.get(name if name.endswith(".") else name + ".", [])

    # --- Lambda Invoke -------------------------------------------------------------------------
    def invoke(self, job):
        """The emulator's invoke hook: one invocation of the function as pgdr deployed it, in its
        own process, on the real clock. Returns {"payload", "error"}."""
        region, name = job["region"], job["function"]
        try:
            event = json.loads(job.get("payload") or "null")
        except ValueError:
            event = job.get("payload")
        note = ({k: v for k, v in event.items() if k not in SECRET_KEYS and not isinstance(v, (dict, list))}
                if isinstance(event, dict) else {})
        self.follow_rds()  # the network as the calls answered before this one left it
        fn = self.loop.load_function(self.loop.client("lambda", region), name, region)
        t, real, rid = self.loop.clock.now(), time.monotonic(), str(uuid.uuid4())
        run = {"module": fn["module"], "func": fn["func"], "source": fn["source"], "event": event,
               "timeout": fn["timeout"], "resolver": self.loop.resolver_for(fn), "function_name": name,
               "request_id": rid, "memory": fn["memory"]}
        proc = subprocess.Popen([sys.executable, str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=lambda_environment(fn, self.url), text=True)
        try:
            stdout, stderr = proc.communicate(json.dumps(run), timeout=fn["timeout"])
            try:
                out = json.loads(stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                out = {"error": f"Runtime.ExitError: exited {proc.returncode}", "error_type": "Runtime.ExitError",
                       "error_message": f"RequestId: {rid} Error: Runtime exited with error: exit status "
                                        f"{proc.returncode}", "result": None, "metrics": []}
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            out = {"error": "Sandbox.Timedout", "error_type": "Sandbox.Timedout",
                   "error_message": f"RequestId: {rid} Error: Task timed out after {float(fn['timeout']):.2f} seconds",
                   "result": None, "metrics": []}
        self.loop.record_invocation(fn, t, real, f"invoke {note.get('action') or job.get('invocation_type')}", out)
        with self._follow_lock:
            self.agent_calls.append({"t": t, "t_end": self.loop.clock.now(), "real": real, "real_end": time.monotonic(),
                                     "region": region, "function": name, "client": fn["client"], **note,
                                     "error": out["error"], "log_tail": (stderr or "")[-2000:]})
        if out["error"]:
            return {"payload": json.dumps({"errorMessage": out.get("error_message") or out["error"],
                                           "errorType": out.get("error_type") or "Runtime.Error",
                                           "requestId": rid, "stackTrace": out.get("stack") or []}),
                    "error": "Unhandled"}
        return {"payload": json.dumps(out["result"], default=str), "error": None}

    # --- following AWS -------------------------------------------------------------------------
    def between(self):
        """Run between the loop's minutes: RDS's actions on the clusters, then the scenario's hooks."""
        self.follow_rds()
        self.rediscover()
        for hook in self.hooks:
            hook()

    def rediscover(self):
        """The loop rereads what pgdr deployed once a call changed it."""
        if not self._rediscover:
            return
        try:
            self.loop.discover()
            self._rediscover = False
        except Exception as e:  # noqa: BLE001 (a silent region: read again later)
            self.loop.event("rediscover-failed", error=str(e))

    def side_of(self, db_id, region):
        return next((x for x in self.sides if x.id == db_id and x.region == region), None)

    def follow_rds(self):
        with self._follow_lock:
            for c in ctl(self.url, f"/__proxy/calls?since={self.seen_seq}"):
                self.seen_seq = max(self.seen_seq, c["seq"])
                if not c.get("status") or not 200 <= c["status"] < 300:
                    continue
                self.follow_call(c)
            for region, group in list(self._stale_sgs):
                self.read_sg(region, group)
                self.note_fences()

    def follow_call(self, c):
        op, service, region = c["op"], c["service"], c["region"]
        params = c.get("params") or {}
        db_id, now = params.get("DBInstanceIdentifier"), self.loop.clock.now() if self.loop else 0.0
        if service == "rds":
            if op == "PromoteReadReplica" and db_id == self.dr.id and region == self.dr.region:
                self.promotion_calls.append(now)
                if self.promoted_at is None:
                    self.dr.cluster.promote()
                    self.promoted_at = now
                    self.loop.event("standby promoted")
            elif op in ("RebootDBInstance", "StopDBInstance"):
                side = self.side_of(db_id, region)
                if side is None or not side.cluster.running:
                    return
                if op == "RebootDBInstance":
                    side.cluster.terminate_sessions()
                else:
                    side.cluster.stop()
                self.rds_actions.append((now, op, db_id))
            elif op == "DeleteDBInstance":
                side = self.side_of(db_id, region)
                if side is not None:
                    self.network.forget(side.endpoint)
                    self.rds_actions.append((now, op, db_id))
            elif op == "CreateDBInstanceReadReplica":
                source = (params.get("SourceDBInstanceIdentifier") or "").rsplit(":", 1)[-1]
                if self.promoted_at is not None and region == self.primary.region and source == self.dr.id:
                    self.follow_reprotect(db_id)
                elif (db_id == self.dr.id and region == self.dr.region and source == self.primary.id
                      and self.dr.endpoint in self.network.deleted):
                    # The replica made again (a rerun after a half-made one was deleted): the same
                    # standby stands behind it.
                    self.dr = self.side(region, db_id, self.dr.cluster)
        elif service == "ec2" and op in ("AuthorizeSecurityGroupIngress", "RevokeSecurityGroupIngress"):
            group = params.get("GroupId")
            hit = [x for x in self.sides if x.region == region and group in x.security_groups]
            if not hit:
                return
            self.read_sg(region, group)
            for x in hit:
                if op == "RevokeSecurityGroupIngress":
                    self.rds_actions.append((now, "revoked", x.id))
            self.note_fences()
        elif service == "route53" and "/rrset" in op and c.get("mutating"):
            try:  # Route 53's data plane takes the change; resolvers keep their cached answers
                self.loop.apply_routing(self.loop.read_routing())
            except Exception as e:  # noqa: BLE001
                self.loop.event("route53-unreadable", error=str(e))
        elif ((service == "lambda" and LAMBDA_CHANGE.match(op)) or
              (service in ("events", "monitoring", "cloudwatch") and op in DEPLOY_CHANGES)):
            self._rediscover = True

    def fenced_from_vpcs(self, endpoint):
        """No client of either VPC's CIDR block may connect (pgdr's agent, admitted by its
        security group, may still)."""
        rules = self.network.rules_of(endpoint)
        if rules is None:
            return False
        return not any(self.network.admits(endpoint, Client(f"vpc {r}", r, (cidr,)))[0]
                       for r, cidr in self.vpc_cidrs.items())

    def note_fences(self):
        """rds_actions gets (t, "fenced", id) when the last 5432 rule admitting a VPC's CIDR block
        goes, (t, "unfenced", id) when one comes back."""
        now = self.loop.clock.now() if self.loop else 0.0
        for x in self.sides:
            closed = self.fenced_from_vpcs(x.endpoint)
            if closed and x.endpoint not in self._closed:
                self._closed.add(x.endpoint)
                self.rds_actions.append((now, "fenced", x.id))
            elif not closed and x.endpoint in self._closed:
                self._closed.discard(x.endpoint)
                self.rds_actions.append((now, "unfenced", x.id))

    def follow_reprotect(self, new_id):
        """A new replica of the promoted instance in the old primary's region: the old cluster
        rebuilt as a standby of the promoted one behind it, the roles swapped."""
        self.pair.reprotect()
        old_primary, old_dr = self.primary, self.dr
        if new_id != old_primary.id:  # the old instance is kept (retired): no cluster behind it
            self.network.forget(old_primary.endpoint)
        self.primary = self.side(old_dr.region, old_dr.id, self.pair.primary)
        self.dr = self.side(old_primary.region, new_id, self.pair.standby)
        self.promoted_at = None
        self._rediscover = True
        self._dns.clear()
        self.reprotects.append(self.loop.clock.now())
        self.loop.event("reprotect followed", primary=self.primary.id, replica=self.dr.id)

    def promotions(self, since=0.0):
        """Successful PromoteReadReplica calls on the current replica since emulated time `since`."""
        self.follow_rds()
        return sum(1 for t in self.promotion_calls if t >= since)

    def dns_answer(self):
        return self.loop.resolve(self.writer_name)

    # --- an operator's command -----------------------------------------------------------------
    @contextlib.contextmanager
    def realtime(self, loop_runs=True):
        """While an operator's command runs: the clock at one second per second, RDS followed
        every 0.1 s, and AWS's control loop stepping every (real) minute in the background."""
        loop, stop = self.loop, threading.Event()
        loop.clock.set_scale(1.0)

        def follow():
            while not stop.wait(0.1):
                try:
                    self.follow_rds()
                except Exception as e:  # noqa: BLE001
                    loop.event("follow-failed", error=repr(e))

        def run():
            due = loop.clock.now() + MINUTE
            while not stop.wait(max(due - loop.clock.now(), 0.0)):
                try:
                    self.rediscover()
                    loop.step()
                except Exception as e:  # noqa: BLE001
                    loop.event("step-failed", error=repr(e))
                due += MINUTE
        threads = [threading.Thread(target=follow, daemon=True, name="follow-rds")]
        if loop_runs:
            threads.append(threading.Thread(target=run, daemon=True, name="loop-realtime"))
        for t in threads:
            t.start()
        try:
            yield
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=300)
            self.follow_rds()
            self.rediscover()
            loop.clock.set_scale(self.scale)

    def lose_region(self, side, stop_cluster=True):
        """A region lost: its database unreachable (and stopped), its API black-holed. Returns
        the real time (time.monotonic) of the fault: the moment nothing reaches the database."""
        self.network.cut(side.endpoint)
        at = time.monotonic()
        ctl(self.url, "/__proxy/config", {"blackhole_regions": [side.region], "blackhole_s": 0.3})
        if stop_cluster:
            side.cluster.stop(mode="immediate")
        return at

    def region_back(self, side):
        ctl(self.url, "/__proxy/config", {"blackhole_regions": None})
        self.network.heal(side.endpoint)

    def reprotect(self):
        """`pgdr reprotect`, and the harness following it: the old primary's cluster rebuilt as
        a standby of the promoted one, behind the new replica; the roles swapped; the loop reads
        the machinery reprotect deployed in the other region."""
        before = len(self.reprotects)
        out = self.pgdr("reprotect", "--env", self.name, "--yes")
        self.follow_rds()
        if out.returncode != 0:
            return out
        if len(self.reprotects) == before:  # no new replica seen in the call record
            self.follow_reprotect(f"pgdr-{self.name}-{self.primary.region}")
        self.loop.discover()
        self._rediscover = False
        self._dns.clear()
        return out

    def close(self):
        if self.writer is not None:
            self.writer.stop()
        if self.loop is not None:
            self.loop.close()
        if self.pair is not None:
            self.pair.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def first_after(changes, t, state):
    return next((ct for ct, s in changes if ct >= t and s == state), None)


def primary_down_alarm(env):
    """The primary-down alarm watching the current pair (in the DR region)."""
    return next((a for a in env.loop.alarms.values()
                 if a.name.endswith("-primary-down") and a.region == env.dr.region), None)


def until_writes_resume(env, side, real_fault, until):
    """Runs the loop until the writer's writes are acknowledged by `side`'s cluster (or emulated
    time `until`). Returns when `postgres.<zone>` first answered `side`'s endpoint (emulated
    seconds, None: never) and the first acknowledgement there after the fault (None: none)."""
    loop, w, addr, dns = env.loop, env.writer, tuple(side.cluster.address), {}

    def watch_dns():
        if "t" not in dns and env.dns_answer() == side.endpoint:
            dns["t"] = loop.clock.now()

    def acks_there():
        return (a for a in w.acks if tuple(a.target) == addr and a.t >= real_fault)
    env.hooks.append(watch_dns)
    try:
        loop.run(until=until, stop=lambda: any(tuple(a.target) == addr and a.t >= real_fault for a in w.acks[-5:]),
                 between=env.between)
    finally:
        env.hooks.remove(watch_dns)
    return dns.get("t"), next(acks_there(), None)


def region_loss(env, name="region-loss", warmup_min=5, budget_min=40, before_fault=None, stop_cluster=True):
    """The primary region is lost (its API black-holed, the primary cluster stopped): the loop
    alone must promote, move DNS and let the writer resume. Returns the figures."""
    loop, w = env.loop, env.writer
    if not w.running:
        w.start()
    t_start = loop.clock.now()
    loop.run(until=t_start + warmup_min * MINUTE, between=env.between)
    healthy = {"promotions": env.promotions(since=t_start), "dns": env.dns_answer()}
    if before_fault:
        before_fault()
    lost, dr = env.primary, env.dr
    real_fault = env.lose_region(lost, stop_cluster=stop_cluster)
    t_fault = loop.clock.of_real(real_fault)
    t_dns, first_ack = until_writes_resume(env, dr, real_fault, until=t_fault + budget_min * MINUTE)
    dns_moved = {"t": t_dns} if t_dns is not None else {}
    time.sleep(1.0)
    down = primary_down_alarm(env)
    t_alarm = first_after(down.changes, t_fault, "ALARM") if down else None
    t_ack = loop.clock.of_real(first_ack.t) if first_ack else None
    w.stop()
    return {
        "name": name,
        "from": lost.region, "to": dr.region,
        "healthy_before": healthy,
        "promotions": env.promotions(since=t_start),
        "dns_moved": "t" in dns_moved,
        "detection_s": round(t_alarm - t_fault) if t_alarm is not None else None,
        "promotion_s": round(env.promoted_at - t_alarm) if (env.promoted_at and t_alarm is not None) else None,
        "dns_s": round(dns_moved["t"] - env.promoted_at) if ("t" in dns_moved and env.promoted_at) else None,
        "rto_s": round(t_ack - t_fault) if t_ack is not None else None,
        "rpo_rows": w.rpo_rows(dr.cluster),
        "rows_written": len(w.acks),
        "t_fault": t_fault,
        "bounds": {"detection_window_s": down.period * down.evaluation_periods if down else None,
                   "ttl_s": max((r.ttl for r in env.records(env.writer_name)), default=None)},
    }


def region_loss_verdict(f, extra_s=0):
    """The outcome and bounds region loss must meet; a list of what failed (empty: passed).
    `extra_s`: time a scenario adds on purpose (a throttled first promotion)."""
    b, bad = f["bounds"], []
    if f["healthy_before"]["promotions"] != 0:
        bad.append("promoted while the primary was healthy")
    if f["promotions"] != 1:
        bad.append(f"{f['promotions']} promotions, not 1")
    if not f["dns_moved"]:
        bad.append("DNS never answered the new primary")
    if f["rto_s"] is None:
        bad.append("the writer never resumed on the new primary")
        return bad
    # Detection: the alarm's window, give or take the probe's minute and one evaluation.
    if f["detection_s"] is None or not b["detection_window_s"] - 60 <= f["detection_s"] <= b["detection_window_s"] + 120:
        bad.append(f"detection {f['detection_s']} s outside the alarm window {b['detection_window_s']} s (-60, +120)")
    # RTO: detection + promotion + DNS (the promoted alarm's minute, the TTL) + 3 minutes of slack.
    bound = b["detection_window_s"] + 60 + (f["promotion_s"] or 0) + 60 + b["ttl_s"] + 180 + extra_s
    if f["rto_s"] > bound:
        bad.append(f"RTO {f['rto_s']} s above its bound {bound} s")
    return bad


def scored(f, bad):
    f["passed"], f["problems"] = not bad, bad
    return f, bad


def no_failover(env, name, fault, heal=None, fault_min=10, after_min=5, warmup_min=5):
    """A fault that must not fail over: figures and what went wrong (empty: passed)."""
    loop, w = env.loop, env.writer
    w.start()
    loop.run(until=loop.clock.now() + warmup_min * MINUTE, between=env.between)
    t_fault = loop.clock.now()
    fault()
    loop.run(until=t_fault + fault_min * MINUTE, between=env.between)
    if heal:
        heal()
    loop.run(until=loop.clock.now() + after_min * MINUTE, between=env.between)
    time.sleep(1.0)
    w.stop()
    answers = env.dns_answer()
    f = {"name": name, "promotions": env.promotions(), "dns_moved": answers != env.endpoints["primary"],
         "detection_s": None, "promotion_s": None, "dns_s": None, "rto_s": None,
         "rpo_rows": w.rpo_rows(env.pair.primary), "rows_written": len(w.acks),
         "read_only_errors": len(w.errors_of("read_only")), "t_fault": t_fault}
    bad = []
    if f["promotions"]:
        bad.append(f"{f['promotions']} promotions")
    if f["dns_moved"]:
        bad.append(f"DNS answers {answers}")
    if f["rpo_rows"]:
        bad.append(f"{f['rpo_rows']} acknowledged rows missing on the primary")
    if f["read_only_errors"]:
        bad.append(f"the writer met a read-only server {f['read_only_errors']} times")
    last = max((a.t for a in w.acks), default=None)
    if last is None or loop.clock.of_real(last) < t_fault + fault_min * MINUTE:
        bad.append("the writer did not write after the fault")
    return f, bad


def alarmed_and_judged_alive(env, f, bad, why):
    """For a fault that sets off the primary-down alarm: when it did, and that the failover
    function looked and judged the primary alive (`why` in the figures when it did not)."""
    t_fault = f["t_fault"]
    down = primary_down_alarm(env)
    t = first_after(down.changes, t_fault, "ALARM") if down else None
    f["detection_s"] = round(t - t_fault) if t is not None else None
    if t is None:
        bad.append(f"the probe never noticed {why} (no primary-down alarm)")
    alive = [i for i in env.loop.invocations if i["why"].startswith("alarm") and i["result"] and i["t"] > t_fault
             and "primary" in (i["result"] or {}) and not i["result"]["primary"].get("down")]
    if not alive:
        bad.append("the failover function never judged the primary alive")
    f["judged"] = [i["result"]["primary"] for i in alive]
    f["notified"] = [p for p in env.loop.published if p.get("sns") and p["t"] > t_fault]
    return alive


def multi_az_blip(env, blip_s=90):
    """The primary unreachable for 60-120 s (a Multi-AZ failover inside the region), then back."""
    ep = env.endpoints["primary"]
    loop = env.loop

    def fault():
        env.network.cut(ep)
        end = loop.clock.now() + blip_s
        loop.run(until=end, between=env.between)
        env.network.heal(ep)
    return scored(*no_failover(env, "multi-az-blip", fault, fault_min=blip_s / MINUTE + 5))


def probe_path_broken(env):
    """The DR VPC's route to the primary is deleted: the probe fails while the primary is healthy.
    The loop reads the route tables: a function in the DR VPC reaches the primary only while the
    route through the peering is there."""
    ec2 = env.client("ec2", DR)
    tables = ec2.describe_route_tables(Filters=[{"Name": "tag:pgdr:env", "Values": [env.name]}])["RouteTables"]
    primary_cidr = env.client("ec2", PRIMARY).describe_vpcs(
        Filters=[{"Name": "tag:pgdr:env", "Values": [env.name]}])["Vpcs"][0]["CidrBlock"]

    def path_ok():
        for t in ec2.describe_route_tables(RouteTableIds=[x["RouteTableId"] for x in tables])["RouteTables"]:
            if not any(r.get("DestinationCidrBlock") == primary_cidr and r.get("VpcPeeringConnectionId")
                       for r in t["Routes"]):
                return False
        return True

    env.hooks.append(lambda: env.network.set_vpc_down([] if path_ok() else [env.endpoints["primary"]], region=DR))

    def fault():
        for t in tables:
            ec2.delete_route(RouteTableId=t["RouteTableId"], DestinationCidrBlock=primary_cidr)
    f, bad = no_failover(env, "probe-path-broken", fault, fault_min=10)
    alarmed_and_judged_alive(env, f, bad, "the broken path")
    return scored(f, bad)


def maintenance(env, upgrade_min=10, restart_min=5):
    """An engine upgrade: the primary `upgrading` for ten minutes, its database restarting (not
    answering) for the first five of them, long enough for the primary-down alarm. The failover
    function must read the status and leave the pair alone."""
    ep, loop = env.endpoints["primary"], env.loop

    def fault():
        ctl(env.url, "/__proxy/rds_status", {"region": env.primary.region, "id": env.primary.id,
                                             "status": "upgrading", "for_s": upgrade_min * MINUTE / loop.clock.scale})
        env.network.cut(ep)
        loop.run(until=loop.clock.now() + restart_min * MINUTE, between=env.between)
        env.network.heal(ep)
    f, bad = no_failover(env, "maintenance", fault, fault_min=upgrade_min)
    alive = alarmed_and_judged_alive(env, f, bad, "the restart")
    if alive and not any(j.get("status") == "upgrading" for j in f["judged"]):
        bad.append(f"the function never saw the primary upgrading: {f['judged']}")
    return scored(f, bad)


def stalled_promotion(env):
    """Region loss where the first PromoteReadReplica is throttled (every attempt of the
    alarm's invocation): the resume schedule must finish the failover."""
    throttle = [{"ops": ["PromoteReadReplica"], "regions": [env.dr.region]}]
    state = {}

    def before_fault():
        ctl(env.url, "/__proxy/config", {"throttle": throttle})

    def lift():
        # Once the alarm's invocation has failed on the throttled call, the API answers again.
        if "lifted" in state:
            return
        failed = [i for i in env.loop.invocations if i["why"].startswith("alarm") and i["error"]
                  and "Throttl" in i["error"]]
        if failed:
            state["lifted"], state["failed"] = env.loop.clock.now(), failed[0]
            ctl(env.url, "/__proxy/config", {"throttle": []})
    env.hooks.append(lift)
    try:
        f = region_loss(env, name="stalled-promotion", before_fault=before_fault)
    finally:
        env.hooks.remove(lift)
    f["throttled_invocation"] = state.get("failed")
    env.loop.collect(wait=True)  # the invocation that promoted may still be moving DNS
    bad = []
    if "failed" not in state:
        bad.append("no invocation met the throttled PromoteReadReplica")
    finished_by = [i for i in env.loop.invocations if (i["result"] or {}).get("action") == "promoted"]
    f["finished_by"] = [i["why"] for i in finished_by]
    f["failover_invocations"] = [(round(i["t"]), i["why"], (i["result"] or {}).get("action"), i["error"])
                                 for i in env.loop.invocations if i["t"] >= f["t_fault"] and "probe" not in i["why"]]
    if not any(w.startswith("schedule") for w in f["finished_by"]):
        bad.append(f"the resume schedule did not finish the promotion (finished by {f['finished_by']})")
    # The throttled invocation costs its retries plus up to a minute before the schedule's run.
    bad += region_loss_verdict(f, extra_s=2 * MINUTE)
    return scored(f, bad)


def manual_failover_region_down(env, budget_min=30, after_min=5):
    """`pgdr failover --yes` right after the primary region (its API, its database and Route 53's
    control plane) is lost, the old primary still running behind the black hole. pgdr promotes
    and leaves the fence pending; DNS follows through the health check; when the region comes
    back, the next `pgdr up` completes the fence and the records before any write reaches the
    old primary."""
    loop, w = env.loop, env.writer
    w.start()
    t_start = loop.clock.now()
    loop.run(until=t_start + 5 * MINUTE, between=env.between)
    lost, dr = env.primary, env.dr
    old = tuple(lost.cluster.address)
    real_fault = env.lose_region(lost, stop_cluster=False)
    t_fault = loop.clock.of_real(real_fault)
    # The operator's command: its seconds are real ones (the clock runs at 1x meanwhile; the
    # loop's next minute is due after it).
    loop.clock.set_scale(1.0)
    cli = env.pgdr("failover", "--env", env.name, "--yes")
    out, err = cli.stdout, cli.stderr
    env.follow_rds()
    loop.clock.set_scale(env.scale)
    t_dns, first_ack = until_writes_resume(env, dr, real_fault, until=t_fault + budget_min * MINUTE)
    t_cli_promoted = env.promoted_at
    # The region comes back, the old primary with it, unfenced: `pgdr up` before anything else.
    env.region_back(lost)
    t_back = loop.clock.now()
    up = env.pgdr("up", "--env", env.name)
    t_up = loop.clock.now()
    env.follow_rds()
    fenced = [a for a in env.rds_actions if a[1] == "fenced" and a[2] == lost.id]
    rds = env.client("rds", lost.region)
    arn = rds.describe_db_instances(DBInstanceIdentifier=lost.id)["DBInstances"][0]["DBInstanceArn"]
    role = {t["Key"]: t["Value"] for t in rds.list_tags_for_resource(ResourceName=arn)["TagList"]}.get("pgdr:role")
    r53 = env.client("route53", PRIMARY)
    zone_id = next(z["Id"] for z in r53.list_hosted_zones()["HostedZones"] if z["Name"] == env.loop.zone)
    weights = {rr["SetIdentifier"]: rr["Weight"] for rr in r53.list_resource_record_sets(HostedZoneId=zone_id)[
        "ResourceRecordSets"] if rr["Name"].rstrip(".") == env.writer_name.rstrip(".") and "SetIdentifier" in rr}
    loop.run(until=loop.clock.now() + after_min * MINUTE, between=env.between)
    time.sleep(1.0)
    w.stop()
    # A write that started before the fault may be acknowledged just after it (and replicated):
    # what must never happen is a write started after the fault reaching the old primary.
    late_on_old = [a for a in w.acks if tuple(a.target) == old and a.t - a.ms / 1000 > real_fault]
    f = {"name": "manual-failover-region-down", "promotions": env.promotions(since=t_start),
         "dns_moved": env.dns_answer() == dr.endpoint,
         "detection_s": None,  # an operator's decision, not the alarm's
         "promotion_s": round(t_cli_promoted - t_fault) if t_cli_promoted else None,
         "dns_s": round(t_dns - t_cli_promoted) if (t_dns is not None and t_cli_promoted) else None,
         "rto_s": round(loop.clock.of_real(first_ack.t) - t_fault) if first_ack else None,
         "rpo_rows": w.rpo_rows(dr.cluster), "rows_written": len(w.acks),
         "failover_exit": cli.returncode, "failover_output": (out + err)[-5000:],
         "up_exit": up.returncode, "old_primary_role": role, "weights": weights,
         "writes_on_old_primary_after_fault": len(late_on_old),
         "late_on_old": [(round(loop.clock.of_real(a.t) - t_fault, 1), a.ms, a.seq) for a in late_on_old],
         "t_back_s": round(t_back - t_fault), "t_up_done_s": round(t_up - t_fault)}
    bad = []
    if cli.returncode not in (0, 3):
        bad.append(f"pgdr failover exited {cli.returncode}: {(out + err)[-600:]}")
    if f["promotions"] != 1:
        bad.append(f"{f['promotions']} promotions, not 1")
    if t_cli_promoted is None:
        bad.append("nothing promoted the replica")
    if t_dns is None or not f["dns_moved"]:
        bad.append("DNS did not follow the promotion")
    if first_ack is None:
        bad.append("the writer never resumed on the new primary")
    if up.returncode != 0:
        bad.append(f"pgdr up after the region came back exited {up.returncode}: {up.stderr[-600:]}")
    if not fenced or role != "fenced":
        bad.append(f"the old primary was not fenced by up (revoked: {bool(fenced)}, pgdr:role={role})")
    if weights.get(dr.region) != 100 or weights.get(lost.region) != 0:
        bad.append(f"the records were not completed: weights {weights}")
    if late_on_old:
        bad.append(f"{len(late_on_old)} writes acknowledged by the old primary after the fault")
    # RTO: the operator's command (promotion) + the promoted alarm's minute + TTL + slack.
    if f["rto_s"] is not None and f["promotion_s"] is not None:
        bound = f["promotion_s"] + 2 * MINUTE + max((r.ttl for r in env.records(env.writer_name)), default=60) + 180
        if f["rto_s"] > bound:
            bad.append(f"RTO {f['rto_s']} s above its bound {bound} s")
    return scored(f, bad)


def way_back(env):
    """Region loss, `pgdr reprotect` once the region is back, then region loss the other way:
    the machinery reprotect put in the old primary region must fail over on its own."""
    first = region_loss(env, name="region-loss")
    problems = [f"first failover: {p}" for p in region_loss_verdict(first)]
    if problems:
        f = dict(first, name="way-back")
        return scored(f, problems)
    env.region_back(env.primary)
    out = env.reprotect()
    if out.returncode != 0:
        return scored(dict(first, name="way-back", reprotect_exit=out.returncode),
                      [f"pgdr reprotect exited {out.returncode}: {out.stderr[-800:]}"])
    if env.primary.region != DR or env.dr.region != PRIMARY:
        return scored(dict(first, name="way-back"), ["reprotect did not swap the roles"])
    env.writer = Writer(env.resolve, env.writer_name, env.user, env.password, env.dbname, rate=20.0,
                        timeout=1.0, link=env.network.link_ok, run_id=env.writer.run_id + "b")
    f = region_loss(env, name="way-back")
    f["first"] = {k: first[k] for k in ("from", "to", "detection_s", "promotion_s", "dns_s", "rto_s", "rpo_rows")}
    return scored(f, region_loss_verdict(f))


# ---------------------------------------------------------------------------------------------
# Planned switchover and drills: pgdr's agent runs in the VPCs (through the invoke hook), the
# operator's command on the real clock.

def ttl_of(env):
    return max((r.ttl for r in env.records(env.writer_name)), default=60)


def parse_json(text, key=None):
    """A command's JSON output; with `key`, the object holding it (the result may sit in pgdr's
    versioned envelope, one or two levels down)."""
    try:
        obj = json.loads(text)
    except (ValueError, TypeError):
        return None
    if key is None:
        return obj

    def find(o, depth):
        if isinstance(o, dict):
            if key in o:
                return o
            for v in o.values():
                hit = find(v, depth - 1) if depth > 0 else None
                if hit is not None:
                    return hit
        return None
    return find(obj, 3)


def calls_since(env, seq):
    return ctl(env.url, f"/__proxy/calls?since={seq}")


def first_call(calls, op, region=None, after=0.0, ok=True):
    """The first recorded call of `op` (in `region`) received after epoch time `after`."""
    for c in calls:
        if c["op"] == op and (region is None or c["region"] == region) and c["t"] >= after and (
                not ok or (c.get("status") and 200 <= c["status"] < 300)):
            return c
    return None


def first_dns_change(calls, after=0.0):
    return next((c for c in calls if c["service"] == "route53" and "/rrset" in c["op"] and c["mutating"]
                 and c["t"] >= after and c.get("status") == 200), None)


def wait_for_ack(w, addr, since_real, timeout):
    """The first acknowledged write on `addr` at or after time.monotonic() `since_real`, waiting
    (real seconds) up to `timeout` for it."""
    deadline = time.monotonic() + timeout
    while True:
        ack = next((a for a in list(w.acks) if tuple(a.target) == tuple(addr) and a.t >= since_real), None)
        if ack is not None or time.monotonic() > deadline:
            return ack
        time.sleep(0.2)


def outages(w, since_real, until_real, min_gap=2.0):
    """The writer's write pauses in a window, as it saw them: (last ack before, first ack after,
    seconds) for consecutive acknowledged writes at least `min_gap` apart."""
    acks = sorted((a for a in list(w.acks) if since_real - 5 <= a.t <= until_real), key=lambda a: a.t)
    return [(a, b, b.t - a.t) for a, b in zip(acks, acks[1:]) if b.t - a.t >= min_gap]


def role_guarded(cluster, role):
    """Whether `role` carries pgdr's guard (default_transaction_read_only = on for every database)."""
    rows = cluster.sql("SELECT count(*) FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
                       f"WHERE r.rolname = {pgwire_literal(role)} "
                       "AND 'default_transaction_read_only=on' = ANY (s.setconfig)")
    return rows[0][0] != "0"


def pgwire_literal(text):
    return "'" + str(text).replace("'", "''") + "'"


def rds_topology(env):
    """{region: ReadReplicaSourceDBInstanceIdentifier or None} of the environment's instances."""
    out = {}
    for region in (PRIMARY, DR):
        for db in env.client("rds", region).describe_db_instances()["DBInstances"]:
            if db["DBInstanceIdentifier"] == f"pgdr-{env.name}-{region}":
                out[region] = db.get("ReadReplicaSourceDBInstanceIdentifier")
    return out


def protected_problems(env):
    """What is wrong with the pair as it stands (empty: a writable primary behind DNS, a
    streaming replica of it in the other region, the primary open to its clients)."""
    bad = []
    topo = rds_topology(env)
    p, r = env.primary, env.dr
    if topo.get(p.region, "missing") is not None:
        bad.append(f"RDS: the primary {p.id} in {p.region} is {'missing' if p.region not in topo else 'a replica'}")
    src = topo.get(r.region)
    if not src or src.rsplit(":", 1)[-1] != p.id:
        bad.append(f"RDS: {r.region} holds no replica of {p.id} (source {src!r})")
    if p.cluster.in_recovery():
        bad.append(f"the cluster behind {p.id} is in recovery")
    try:
        if not r.cluster.in_recovery():
            bad.append(f"the cluster behind {r.id} is not a standby")
        else:
            env.pair.wait_caught_up(timeout=15)
    except Exception as e:  # noqa: BLE001
        bad.append(f"the standby behind {r.id} does not replicate: {e}")
    if env.dns_answer() != p.endpoint:
        bad.append(f"DNS answers {env.dns_answer()}, not the primary {p.endpoint}")
    ok, why = env.network.admits(p.endpoint, env.app)
    if not ok:
        bad.append(f"the application cannot connect to the primary: {why}")
    peer = Client("peer", r.region, (env.vpc_cidrs[r.region],))
    ok, why = env.network.admits(p.endpoint, peer)
    if not ok:
        bad.append(f"the other VPC cannot reach the primary: {why}")
    ok, why = env.network.admits(r.endpoint, Client("primary's VPC", p.region, (env.vpc_cidrs[p.region],)))
    if not ok:
        bad.append(f"the replica is out of reach from the primary's VPC (a switchover's catch-up reads it): {why}")
    if role_guarded(p.cluster, env.user):
        bad.append(f"the role {env.user} is still guarded read-only on the primary")
    return bad


def warm_up(env, minutes=2):
    loop, w = env.loop, env.writer
    if not w.running:
        w.start()
    t0 = loop.clock.now()
    loop.run(until=t0 + minutes * MINUTE, between=env.between)
    return t0


def agent_write_regions(env, since_real):
    return sorted({c["region"] for c in env.agent_calls if c.get("action") == "write" and c["real"] >= since_real})


def switchover(env):
    """`pgdr switchover --yes` under a steady write load: no acknowledged row lost, the write
    pause (as the application saw it) bounded by the command's fence-to-DNS time plus the TTL,
    the roles swapped and protected."""
    loop, w = env.loop, env.writer
    t_start = warm_up(env)
    old, new = env.primary, env.dr
    old_addr, new_addr, ttl = tuple(old.cluster.address), tuple(new.cluster.address), ttl_of(env)
    seq0 = env.seen_seq
    with env.realtime():
        real0, epoch0 = time.monotonic(), time.time()
        cli = env.pgdr("switchover", "--env", env.name, "--yes", "--output", "json", timeout=1800)
        real_cli = time.monotonic()
        first = wait_for_ack(w, new_addr, real0, timeout=ttl + 30)
        time.sleep(2.0)
        real_end = time.monotonic()
    w.stop()
    calls = calls_since(env, seq0)
    report = parse_json(cli.stdout, "outcome")
    revoke = first_call(calls, "RevokeSecurityGroupIngress", old.region, after=epoch0)
    promote = first_call(calls, "PromoteReadReplica", new.region, after=epoch0)
    dns = first_dns_change(calls, after=promote["t"] if promote else epoch0)
    fence = next((c for c in env.agent_calls if c.get("action") == "fence" and c["real"] >= real0), None)
    gaps = outages(w, real0, real_end)
    pause = max((g[2] for g in gaps), default=0.0)
    to_epoch = epoch0 - real0  # time.monotonic() -> time.time()
    late_on_old = [a for a in w.acks if tuple(a.target) == old_addr and fence
                   and a.t - a.ms / 1000 > fence["real_end"]]
    bound = ((dns["t_end"] - revoke["t"]) if (dns and revoke) else (real_cli - real0)) + ttl + 10
    f = {"name": "switchover", "from": old.region, "to": new.region,
         "promotions": env.promotions(since=t_start), "dns_moved": env.dns_answer() == new.endpoint,
         "detection_s": None,  # an operator's decision
         "promotion_s": round(promote["t_end"] - epoch0, 1) if promote else None,
         "dns_s": round(dns["t_end"] - promote["t_end"], 1) if (dns and promote) else None,
         "rto_s": round(pause, 1), "rpo_rows": w.rpo_rows(env.pair.primary), "rows_written": len(w.acks),
         "exit": cli.returncode, "report": report, "cli_s": round(real_cli - real0, 1),
         "pause_bound_s": round(bound, 1), "ttl_s": ttl,
         "first_ack_new_s": round(first.t - real0, 1) if first else None,
         "fence_to_dns_s": round(dns["t_end"] - revoke["t"], 1) if (dns and revoke) else None,
         "writes_on_old_after_fence": len(late_on_old), "output": (cli.stdout + cli.stderr)[-4000:],
         "t_cmd_epoch": epoch0, "to_epoch": to_epoch}
    bad = []
    if cli.returncode != 0:
        bad.append(f"pgdr switchover exited {cli.returncode}: {cli.stderr[-800:]}")
    if not report or report.get("outcome") != "switched" or (report.get("from_region"), report.get("to_region")) != (
            old.region, new.region):
        bad.append(f"the JSON result is not a switch from {old.region} to {new.region}: {cli.stdout[-600:]}")
    if f["promotions"] != 1:
        bad.append(f"{f['promotions']} promotions, not 1")
    if first is None:
        bad.append(f"the writer never wrote on the new primary through {env.writer_name}")
    if f["rpo_rows"]:
        bad.append(f"{f['rpo_rows']} acknowledged rows missing on the new primary")
    if late_on_old:
        bad.append(f"{len(late_on_old)} writes acknowledged by the old primary after the fence")
    if pause > bound:
        bad.append(f"write pause {pause:.1f} s above its bound {bound:.1f} s (fence to DNS + TTL + 10 s)")
    if (env.primary.region, env.dr.region) != (new.region, old.region):
        bad.append(f"the roles were not swapped: primary {env.primary.region}, replica {env.dr.region}")
    else:
        bad += protected_problems(env)
    return scored(f, bad)


def switchover_timeout(env, catchup_s=10):
    """The standby's replay paused: the switchover cannot catch up, so it must put the fence
    back and promote nothing; writes resume on the old primary, nothing is lost."""
    loop, w = env.loop, env.writer
    t_start = warm_up(env)
    old, dr = env.primary, env.dr
    old_addr = tuple(old.cluster.address)
    seq0 = env.seen_seq
    dr.cluster.pause_replay()
    try:
        with env.realtime():
            real0, epoch0 = time.monotonic(), time.time()
            cli = env.pgdr("switchover", "--env", env.name, "--yes", "--output", "json",
                           "--catchup-timeout", str(catchup_s), timeout=1800)
            real_cli = time.monotonic()
            after = wait_for_ack(w, old_addr, real_cli, timeout=ttl_of(env) + 30)
            time.sleep(2.0)
            real_end = time.monotonic()
    finally:
        dr.cluster.resume_replay()
    w.stop()
    calls = calls_since(env, seq0)
    promoted = [c for c in calls if c["op"] == "PromoteReadReplica"]
    gaps = outages(w, real0, real_end)
    pause = max((g[2] for g in gaps), default=0.0)
    resumed = gaps[-1][1] if gaps else None
    f = {"name": "switchover-timeout", "promotions": env.promotions(since=t_start),
         "dns_moved": env.dns_answer() != old.endpoint, "detection_s": None, "promotion_s": None, "dns_s": None,
         "rto_s": round(pause, 1), "rpo_rows": w.rpo_rows(env.pair.primary), "rows_written": len(w.acks),
         "exit": cli.returncode, "report": parse_json(cli.stdout, "outcome"), "cli_s": round(real_cli - real0, 1),
         "promote_calls": len(promoted), "output": (cli.stdout + cli.stderr)[-4000:], "t_cmd_epoch": epoch0}
    bad = []
    if cli.returncode == 0:
        bad.append("pgdr switchover exited 0 although the replica could not catch up")
    if promoted or f["promotions"] or env.promoted_at is not None:
        bad.append(f"something was promoted ({len(promoted)} PromoteReadReplica calls)")
    if env.primary is not old:
        bad.append("the harness followed a role change")
    if after is None or (resumed is not None and tuple(resumed.target) != old_addr):
        bad.append("writes did not resume on the old primary")
    if f["rpo_rows"]:
        bad.append(f"{f['rpo_rows']} acknowledged rows missing on the primary")
    if f["dns_moved"]:
        bad.append(f"DNS answers {env.dns_answer()}")
    if pause > catchup_s + 60:
        bad.append(f"write pause {pause:.1f} s: longer than the catch-up timeout {catchup_s} s + 60 s")
    bad += protected_problems(env)
    return scored(f, bad)


def drill(env, failover=False):
    """`pgdr drill --yes [--failover] --output json`: a switchover (or a failover) and back,
    under the harness writer's load. The report's figures must agree with what the harness's
    writer saw: rto_seconds within RTO_TOLERANCE_S of its pause (plus the TTL when the agent's
    marker writer resolved the zone in another VPC, whose resolver cache expires at another
    moment), rpo_rows equal to its loss when it lost nothing, and of a matching size when it did."""
    loop, w = env.loop, env.writer
    t_start = warm_up(env)
    start_primary = env.primary.region
    ttl, seq0 = ttl_of(env), env.seen_seq
    with env.realtime():
        real0, epoch0 = time.monotonic(), time.time()
        cli = env.pgdr("drill", "--env", env.name, "--yes", *(["--failover"] if failover else []),
                       "--output", "json", timeout=3600)
        real_cli = time.monotonic()
        first = wait_for_ack(w, tuple(env.primary.cluster.address), real_cli - 1, timeout=ttl + 30)
        time.sleep(2.0)
        real_end = time.monotonic()
    w.stop()
    status = env.pgdr("status", "--env", env.name, "--output", "json")
    report = parse_json(cli.stdout, "legs") or {}
    legs = report.get("legs") or []
    # A failover leg can pause the application for less than 2 s (it writes on the old primary
    # until the fence, by when DNS has moved: those rows are the leg's RPO, not its RTO), so
    # pauses are counted from 0.5 s here (10 missed writes at 20 per second).
    gaps = outages(w, real0, real_end, min_gap=0.5)
    # The legs' pauses: the longest outages, one per leg, in time order.
    top = sorted(sorted(gaps, key=lambda g: -g[2])[:len(legs)], key=lambda g: g[0].t)
    harness_loss = w.rpo_rows(env.pair.primary)
    writes = [c for c in env.agent_calls if c.get("action") == "write" and c["real"] >= real0]
    other_vpc = any(c["region"] != env.app.region for c in writes)
    tol = RTO_TOLERANCE_S + (ttl if other_vpc else 0)
    interval_ms = next((float(c["interval_ms"]) for c in writes if c.get("interval_ms")), 100.0)
    name = "drill-failover" if failover else "drill-switchover"
    f = {"name": name, "promotions": env.promotions(since=t_start),
         "dns_moved": env.dns_answer() != env.endpoints["primary"], "detection_s": None,
         "promotion_s": None, "dns_s": None,
         "rto_s": round(max((g[2] for g in gaps), default=0.0), 1), "rpo_rows": harness_loss,
         "rows_written": len(w.acks), "exit": cli.returncode, "report": report,
         "report_rto_s": report.get("rto_seconds"), "report_rpo_rows": report.get("rpo_rows"),
         "harness_pauses_s": [round(g[2], 1) for g in top], "rto_tolerance_s": tol,
         "agent_write_regions": sorted({c["region"] for c in writes}), "cli_s": round(real_cli - real0, 1),
         "output": (cli.stdout + cli.stderr)[-4000:], "t_cmd_epoch": epoch0}
    bad = []
    if cli.returncode != 0:
        bad.append(f"pgdr drill exited {cli.returncode}: {cli.stdout[-800:]} {cli.stderr[-400:]}")  # JSON errors are on stdout
    if report.get("mode") != ("failover" if failover else "switchover"):
        bad.append(f"the report's mode is {report.get('mode')!r}")
    if [(l.get("from_region"), l.get("to_region")) for l in legs] != [(PRIMARY, DR), (DR, PRIMARY)]:
        bad.append(f"the report's legs are {[(l.get('from_region'), l.get('to_region')) for l in legs]}")
    if f["promotions"] != 2:
        bad.append(f"{f['promotions']} promotions, not 2")
    if env.primary.region != start_primary:
        bad.append(f"the drill did not come back: the primary is in {env.primary.region}")
    if first is None:
        bad.append("the writer did not write on the final primary")
    # A failover leg may show the harness writer no pause at all (its rows went to the old
    # primary, lost: the RPO); a switchover leg always pauses it (the fence).
    need = legs if len(top) >= len(legs) else [l for l in legs if l.get("kind") == "switchover"]
    if len(top) < len(need):
        bad.append(f"the harness writer saw {len(gaps)} pauses of 0.5 s or more for {len(need)} switchover legs")
    for leg, g in zip(need, top):
        if leg.get("rto_seconds") is None or abs(leg["rto_seconds"] - g[2]) > tol:
            bad.append(f"leg {leg.get('from_region')}->{leg.get('to_region')}: rto_seconds {leg.get('rto_seconds')}"
                       f" vs the harness writer's pause {g[2]:.1f} s (tolerance {tol} s)")
    if top and report.get("rto_seconds") is not None:
        match = next((g for leg, g in zip(need, top) if leg.get("rto_seconds") == report["rto_seconds"]),
                     max(top, key=lambda g: g[2]))
        if abs(report["rto_seconds"] - match[2]) > tol:
            bad.append(f"rto_seconds {report['rto_seconds']} vs the harness writer's pause {match[2]:.1f} s "
                       f"(tolerance {tol} s)")
    elif report.get("rto_seconds") is None:
        bad.append("the report has no rto_seconds")
    rpo = report.get("rpo_rows")
    if harness_loss == 0:
        if rpo != 0:
            bad.append(f"rpo_rows {rpo}, but the harness writer lost nothing")
    else:
        # Rows lost in a failover's window: each writer loses what it wrote in it, at its rate.
        expected = harness_loss * (1000.0 / interval_ms) / w.rate
        if not rpo or abs(rpo - expected) > max(3.0, 0.5 * expected):
            bad.append(f"rpo_rows {rpo} vs {expected:.1f} expected from the harness writer's {harness_loss} lost rows")
    if not failover and harness_loss:
        bad.append(f"{harness_loss} acknowledged rows lost in a switchover drill")
    last = (parse_json(status.stdout, "last_drill") or {}).get("last_drill")
    if not last or last.get("mode") != report.get("mode") or last.get("rto_seconds") != report.get("rto_seconds"):
        bad.append(f"status --output json has no matching last_drill: {str(last)[:300]}")
    bad += protected_problems(env)
    return scored(f, bad)


RTO_TOLERANCE_S = 5.0
KILL_POINTS = {
    "kill-after-fence": ("RevokeSecurityGroupIngress", PRIMARY),
    "kill-after-promote": ("PromoteReadReplica", DR),
    "kill-during-reprotect": ("CreateDBInstanceReadReplica", PRIMARY),
}


def killed_switchover(env, point):
    """`pgdr switchover` SIGKILLed right after a call (the proxy's kill_on), then `pgdr unlock`
    and the same command again: the environment must end switched and protected, or with its
    starting roles, unfenced, with no acknowledged row lost."""
    op, region = KILL_POINTS[point]
    loop, w = env.loop, env.writer
    t_start = warm_up(env)
    start = (env.primary.region, env.dr.region)
    ttl, seq0 = ttl_of(env), env.seen_seq
    with env.realtime():
        real0, epoch0 = time.monotonic(), time.time()
        proc = env.popen("switchover", "--env", env.name, "--yes")
        ctl(env.url, "/__proxy/config", {"kill_on": {"pid": proc.pid, "ops": [op], "regions": [region]}})
        try:
            out, err = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        ctl(env.url, "/__proxy/config", {"kill_on": None})
        time.sleep(1.0)  # what was in flight lands (an invocation goes on without its caller)
        unlock = env.pgdr("unlock", "--env", env.name, "--yes")
        rerun = env.pgdr("switchover", "--env", env.name, "--yes", timeout=1800)
        real_rerun = time.monotonic()
        after = wait_for_ack(w, tuple(env.primary.cluster.address), real_rerun, timeout=ttl + 30)
        time.sleep(2.0)
        real_end = time.monotonic()
    w.stop()
    gaps = outages(w, real0, real_end)
    now = (env.primary.region, env.dr.region)
    switched = now == (start[1], start[0])
    f = {"name": point, "promotions": env.promotions(since=t_start), "dns_moved": switched,
         "detection_s": None, "promotion_s": None, "dns_s": None,
         "rto_s": round(max((g[2] for g in gaps), default=0.0), 1),
         "rpo_rows": w.rpo_rows(env.pair.primary), "rows_written": len(w.acks),
         "killed_exit": proc.returncode, "unlock_exit": unlock.returncode, "rerun_exit": rerun.returncode,
         "ended": "switched" if switched else ("starting roles" if now == start else f"{now}"),
         "output": (out + err)[-2000:], "rerun_output": (rerun.stdout + rerun.stderr)[-3000:],
         "t_cmd_epoch": epoch0, "calls": len(calls_since(env, seq0))}
    bad = []
    if proc.returncode != -signal.SIGKILL:
        bad.append(f"the kill point {op} in {region} was never reached (pgdr exited {proc.returncode}: {err[-400:]})")
    if unlock.returncode != 0:
        bad.append(f"pgdr unlock exited {unlock.returncode}: {unlock.stderr[-400:]}")
    if switched and rerun.returncode != 0:
        bad.append(f"the rerun switched but exited {rerun.returncode}: {rerun.stderr[-400:]}")
    if not switched and now != start:
        bad.append(f"the roles ended as {now}")
    if not switched and (env.promoted_at is not None or f["promotions"]):
        bad.append("the starting roles are back but something was promoted")
    if after is None:
        bad.append("the writer did not write on the primary after the rerun")
    if f["rpo_rows"]:
        bad.append(f"{f['rpo_rows']} acknowledged rows missing on the primary")
    if f["promotions"] > 1:
        bad.append(f"{f['promotions']} promotions")
    bad += protected_problems(env)
    return scored(f, bad)


SCENARIOS = {
    "region-loss": lambda env: scored(*(lambda f: (f, region_loss_verdict(f)))(region_loss(env))),
    "multi-az-blip": multi_az_blip,
    "probe-path-broken": probe_path_broken,
    "maintenance": maintenance,
    "stalled-promotion": stalled_promotion,
    "manual-failover-region-down": manual_failover_region_down,
    "way-back": way_back,
    "switchover": switchover,
    "switchover-timeout": switchover_timeout,
    "drill-switchover": lambda env: drill(env, failover=False),
    "drill-failover": lambda env: drill(env, failover=True),
    **{point: (lambda p: lambda env: killed_switchover(env, p))(point) for point in KILL_POINTS},
}
KEYS = ["name", "passed", "promotions", "dns_moved", "detection_s", "promotion_s", "dns_s", "rto_s",
        "rpo_rows", "rows_written"]


def main(argv):
    out_json = "--output" in argv and argv[argv.index("--output") + 1] == "json"
    only = [a for a in argv if a in SCENARIOS]
    results = []
    for name, scenario in SCENARIOS.items():
        if only and name not in only:
            continue
        with DrEnv() as env:
            results.append(scenario(env)[0])
    if out_json:
        print(json.dumps({"scenarios": [{k: r.get(k) for k in KEYS} for r in results]}, indent=2))
    else:
        wide = max([len(r["name"]) for r in results] + [4])
        print(f"{'name':<{wide}}  " + "  ".join(f"{c:>12}" for c in KEYS[1:]))
        for r in results:
            print(f"{r['name']:<{wide}}  " + "  ".join(f"{str(r.get(c)):>12}" for c in KEYS[1:]))
        for r in results:
            for p in r.get("problems") or []:
                print(f"{r['name']}: {p}", file=sys.stderr)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
