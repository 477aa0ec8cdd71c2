"""DR scenarios with figures: an environment built by `pgdr up` in a private emulator, real
PostgreSQL behind its two instances, AWS's control loop played by drloop.Loop, and a writer
that commits numbered rows through `postgres.<zone>`.

Used by tests/python/test_dr_scenarios.py (asserting outcomes and bounds) and scripts/drill
(printing the figures). Times are emulated seconds.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import boto3

import pgpair
from drloop import MINUTE, Loop, Network
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


class DrEnv:
    """One environment, its emulator, its PostgreSQL pair, its loop and its writer.

    RDS's actions reach the real clusters (`follow_rds`, run between the loop's minutes):
    PromoteReadReplica of the replica promotes the standby; revoking the primary security
    group's ingress fences the primary's endpoint (new connections time out, established ones
    live on, as connection tracking keeps them); RebootDBInstance ends a cluster's sessions;
    StopDBInstance stops it."""

    def __init__(self, name="drt", config="", scale=30.0, bindir_=None):
        self.name, self.work, self.scale = name, Path(tempfile.mkdtemp(prefix="pgdr-dr-")), scale
        self.proc, self.url = start_proxy()
        self.pair = self.writer = None
        self.seen_seq, self.promotion_calls, self.rds_actions, self.hooks = 0, [], [], []
        try:
            if config:
                (self.work / "pgdr.toml").write_text(config)
            out = self.pgdr("up", "--env", name)
            if out.returncode != 0:
                raise RuntimeError(f"pgdr up failed: {out.stderr[-3000:]}")
            secret = json.loads(self.client("secretsmanager", PRIMARY).get_secret_value(
                SecretId=f"pgdr/{name}/master")["SecretString"])
            self.user, self.password, self.dbname = secret["username"], secret["password"], secret["dbname"]
            self.pair = pgpair.PgPair(user=self.user, password=self.password, dbname=self.dbname, bindir_=bindir_)
            self.network = Network()
            self.primary = self.side(PRIMARY, f"pgdr-{name}-{PRIMARY}", self.pair.primary)
            self.dr = self.side(DR, f"pgdr-{name}-{DR}", self.pair.standby)
            self.loop = Loop(self.url, name, scale=scale, network=self.network).discover()
            self.writer_name = f"postgres.{self.loop.zone}"
            self._dns = {}
            self.promoted_at = None
            self.writer = Writer(self.resolve, self.writer_name, self.user, self.password, self.dbname,
                                 rate=20.0, timeout=1.0, link=self.network.link_ok)
            self.writer.setup()
            self.follow_rds()  # what up did is not a fault
        except BaseException:
            self.close()
            raise

    def side(self, region, db_id, cluster):
        db = self.client("rds", region).describe_db_instances(DBInstanceIdentifier=db_id)["DBInstances"][0]
        side = Side(region, db_id, db["Endpoint"]["Address"],
                    [g["VpcSecurityGroupId"] for g in db.get("VpcSecurityGroups") or []], cluster)
        self.network.route(side.endpoint, cluster.address)
        self.network.heal(side.endpoint)
        self.network.unfence(side.endpoint)
        return side

    @property
    def endpoints(self):
        return {"primary": self.primary.endpoint, "dr": self.dr.endpoint}

    # --- plumbing ----------------------------------------------------------------------------
    def client(self, service, region):
        return boto3.client(service, region_name=region, endpoint_url=self.url, aws_access_key_id="test",
                            aws_secret_access_key="test")

    def pgdr(self, *args, timeout=600):
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.work), "AWS_ENDPOINT_URL": self.url,
               "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}
        return subprocess.run([str(pgdr_bin()), *args], cwd=self.work, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def resolve(self, name):
        """What an application's resolver gets: Route 53's answer, cached for the record's TTL."""
        now = self.loop.clock.now()
        cached = self._dns.get(name)
        if cached is None or cached[1] <= now:
            value = self.loop.resolve(name)
            ttl = max((r.ttl for r in self.records(name)), default=60)
            cached = (value, now + ttl)
            self._dns[name] = cached
        target = self.network.target(cached[0]) if cached[0] else None
        if target is None:
            raise LookupError(f"{name} -> {cached[0]}: unreachable")
        return target

    def records(self, name):
        return self.loop.records.get(name if name.endswith(".") else name + ".", [])

    def between(self):
        """Run between the loop's minutes: RDS's actions on the clusters, then the scenario's hooks."""
        self.follow_rds()
        for hook in self.hooks:
            hook()

    def follow_rds(self):
        for c in ctl(self.url, f"/__proxy/calls?since={self.seen_seq}"):
            self.seen_seq = max(self.seen_seq, c["seq"])
            if c.get("status") != 200:
                continue
            op, db_id, now = c["op"], (c.get("params") or {}).get("DBInstanceIdentifier"), self.loop.clock.now()
            if op == "PromoteReadReplica" and db_id == self.dr.id:
                self.promotion_calls.append(now)
                if self.promoted_at is None:
                    self.dr.cluster.promote()
                    self.promoted_at = now
                    self.loop.event("standby promoted")
            elif (op == "RevokeSecurityGroupIngress" and c["region"] == self.primary.region
                  and (c.get("params") or {}).get("GroupId") in self.primary.security_groups):
                self.network.fence(self.primary.endpoint)
                self.rds_actions.append((now, "fenced", self.primary.id))
            elif op in ("RebootDBInstance", "StopDBInstance"):
                side = next((x for x in (self.primary, self.dr) if x.id == db_id and x.region == c["region"]), None)
                if side is None or not side.cluster.running:
                    continue
                if op == "RebootDBInstance":
                    side.cluster.terminate_sessions()
                else:
                    side.cluster.stop()
                self.rds_actions.append((now, op, db_id))

    def promotions(self, since=0.0):
        """Successful PromoteReadReplica calls on the current replica since emulated time `since`."""
        self.follow_rds()
        return sum(1 for t in self.promotion_calls if t >= since)

    def dns_answer(self):
        return self.loop.resolve(self.writer_name)

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
        out = self.pgdr("reprotect", "--env", self.name, "--yes")
        self.follow_rds()
        if out.returncode != 0:
            return out
        self.pair.reprotect()
        old_primary, old_dr = self.primary, self.dr
        self.primary = self.side(old_dr.region, old_dr.id, self.pair.primary)
        self.dr = self.side(old_primary.region, f"pgdr-{self.name}-{old_primary.region}", self.pair.standby)
        self.promoted_at = None
        self.loop.discover()
        self._dns.clear()
        return out

    def close(self):
        if self.writer is not None:
            self.writer.stop()
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

    env.hooks.append(lambda: env.network.set_vpc_down([] if path_ok() else [env.endpoints["primary"]]))

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


SCENARIOS = {
    "region-loss": lambda env: scored(*(lambda f: (f, region_loss_verdict(f)))(region_loss(env))),
    "multi-az-blip": multi_az_blip,
    "probe-path-broken": probe_path_broken,
    "maintenance": maintenance,
    "stalled-promotion": stalled_promotion,
    "manual-failover-region-down": manual_failover_region_down,
    "way-back": way_back,
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
