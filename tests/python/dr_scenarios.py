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


class DrEnv:
    """One environment, its emulator, its PostgreSQL pair, its loop and its writer."""

    def __init__(self, name="drt", config="", scale=30.0, bindir_=None):
        self.name, self.work = name, Path(tempfile.mkdtemp(prefix="pgdr-dr-"))
        self.proc, self.url = start_proxy()
        self.pair = self.writer = None
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
            self.endpoints = {}
            for side, region in (("primary", PRIMARY), ("dr", DR)):
                db = self.client("rds", region).describe_db_instances(
                    DBInstanceIdentifier=f"pgdr-{name}-{region}")["DBInstances"][0]
                self.endpoints[side] = db["Endpoint"]["Address"]
            self.network = Network()
            self.network.route(self.endpoints["primary"], self.pair.primary.address)
            self.network.route(self.endpoints["dr"], self.pair.standby.address)
            self.loop = Loop(self.url, name, scale=scale, network=self.network).discover()
            self.writer_name = f"postgres.{self.loop.zone}"
            self._dns = {}
            self.promoted_at = None
            self.writer = Writer(self.resolve, self.writer_name, self.user, self.password, self.dbname,
                                 rate=20.0, timeout=1.0)
            self.writer.setup()
        except BaseException:
            self.close()
            raise

    # --- plumbing ----------------------------------------------------------------------------
    def client(self, service, region):
        return boto3.client(service, region_name=region, endpoint_url=self.url, aws_access_key_id="test",
                            aws_secret_access_key="test")

    def pgdr(self, *args, timeout=600):
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.work), "AWS_ENDPOINT_URL": self.url,
               "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}
        return subprocess.run([str(pgdr_bin()), *args], cwd=self.work, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

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

    def watch_promotion(self):
        """RDS's PromoteReadReplica promotes the standby standing behind the replica."""
        if self.promoted_at is not None:
            return
        calls = ctl(self.url, "/__proxy/calls")
        if any(c["op"] == "PromoteReadReplica" and c.get("status") == 200 for c in calls):
            self.pair.promote()
            self.promoted_at = self.loop.clock.now()
            self.loop.event("standby promoted")

    def promotions(self):
        return sum(1 for c in ctl(self.url, "/__proxy/calls") if c["op"] == "PromoteReadReplica" and c.get("status") == 200)

    def dns_answer(self):
        return self.loop.resolve(self.writer_name)

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


def region_loss(env, warmup_min=5, budget_min=40):
    """The primary region is lost (its API black-holed, the primary cluster stopped): the loop
    alone must promote, move DNS and let the writer resume. Returns the figures."""
    loop, w = env.loop, env.writer
    w.start()
    loop.run(until=loop.clock.now() + warmup_min * MINUTE, between=env.watch_promotion)
    healthy = {"promotions": env.promotions(), "dns": env.dns_answer()}
    t_fault = loop.clock.now()
    ctl(env.url, "/__proxy/config", {"blackhole_regions": [PRIMARY], "blackhole_s": 0.3})
    env.pair.primary.stop(mode="immediate")
    env.network.cut(env.endpoints["primary"])
    standby = tuple(env.pair.standby.address)
    dns_moved = {}

    def between():
        env.watch_promotion()
        if "t" not in dns_moved and env.dns_answer() == env.endpoints["dr"]:
            dns_moved["t"] = loop.clock.now()

    def resumed():
        return any(tuple(a.target) == standby and a.t >= 0 for a in w.acks[-5:])

    loop.run(until=t_fault + budget_min * MINUTE, stop=resumed, between=between)
    time.sleep(1.0)
    w.stop()
    down = next((a for a in loop.alarms.values() if a.name.endswith("-primary-down")), None)
    t_alarm = first_after(down.changes, t_fault, "ALARM") if down else None
    first_ack = next((a for a in w.acks if tuple(a.target) == standby), None)
    t_ack = loop.clock.of_real(first_ack.t) if first_ack else None
    rpo = w.rpo_rows(env.pair.standby)
    return {
        "name": "region-loss",
        "healthy_before": healthy,
        "promotions": env.promotions(),
        "dns_moved": "t" in dns_moved,
        "detection_s": round(t_alarm - t_fault) if t_alarm is not None else None,
        "promotion_s": round(env.promoted_at - t_alarm) if (env.promoted_at and t_alarm is not None) else None,
        "dns_s": round(dns_moved["t"] - env.promoted_at) if ("t" in dns_moved and env.promoted_at) else None,
        "rto_s": round(t_ack - t_fault) if t_ack is not None else None,
        "rpo_rows": rpo,
        "rows_written": len(w.acks),
        "bounds": {"detection_window_s": down.period * down.evaluation_periods if down else None,
                   "ttl_s": max((r.ttl for r in env.records(env.writer_name)), default=None)},
    }


def region_loss_verdict(f):
    """The outcome and bounds region loss must meet; a list of what failed (empty: passed)."""
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
    bound = b["detection_window_s"] + 60 + (f["promotion_s"] or 0) + 60 + b["ttl_s"] + 180
    if f["rto_s"] > bound:
        bad.append(f"RTO {f['rto_s']} s above its bound {bound} s")
    return bad


def no_failover(env, name, fault, heal=None, fault_min=10, after_min=5, warmup_min=5):
    """A fault that must not fail over: figures and what went wrong (empty: passed)."""
    loop, w = env.loop, env.writer
    w.start()
    loop.run(until=loop.clock.now() + warmup_min * MINUTE, between=env.watch_promotion)
    t_fault = loop.clock.now()
    fault()
    loop.run(until=t_fault + fault_min * MINUTE, between=env.watch_promotion)
    if heal:
        heal()
    loop.run(until=loop.clock.now() + after_min * MINUTE, between=env.watch_promotion)
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
    f["passed"] = not bad
    return f, bad


def multi_az_blip(env, blip_s=90):
    """The primary unreachable for 60-120 s (a Multi-AZ failover inside the region), then back."""
    ep = env.endpoints["primary"]
    loop = env.loop

    def fault():
        env.network.cut(ep)
        end = loop.clock.now() + blip_s
        loop.run(until=end, between=env.watch_promotion)
        env.network.heal(ep)
    return no_failover(env, "multi-az-blip", fault, fault_min=blip_s / MINUTE + 5)


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

    between = env.watch_promotion

    def watch():
        env.network.set_vpc_down([] if path_ok() else [env.endpoints["primary"]])
        between()
    env.watch_promotion = watch

    def fault():
        for t in tables:
            ec2.delete_route(RouteTableId=t["RouteTableId"], DestinationCidrBlock=primary_cidr)
    f, bad = no_failover(env, "probe-path-broken", fault, fault_min=10)
    t_fault = f["t_fault"]
    f["notified"] = [p for p in env.loop.published if p.get("sns") and p["t"] > t_fault]
    down = next(a for a in env.loop.alarms.values() if a.name.endswith("-primary-down"))
    f["detection_s"] = (lambda t: round(t - t_fault) if t is not None else None)(first_after(down.changes, t_fault, "ALARM"))
    if f["detection_s"] is None:
        bad.append("the probe never noticed the broken path (no primary-down alarm)")
        f["passed"] = False
    alive = [i for i in env.loop.invocations if i["why"].startswith("alarm") and i["result"] and i["t"] > t_fault
             and "primary" in (i["result"] or {}) and not i["result"]["primary"].get("down")]
    if not alive:
        bad.append("the failover function never judged the primary alive")
        f["passed"] = False
    return f, bad


def main(argv):
    out_json = "--output" in argv and argv[argv.index("--output") + 1] == "json"
    results = []
    with DrEnv() as env:
        figures = region_loss(env)
        figures["passed"] = not region_loss_verdict(figures)
        results.append(figures)
    for scenario in (multi_az_blip, probe_path_broken):
        with DrEnv() as env:
            results.append(scenario(env)[0])
    keys = ["name", "passed", "promotions", "dns_moved", "detection_s", "promotion_s", "dns_s", "rto_s",
            "rpo_rows", "rows_written"]
    if out_json:
        print(json.dumps({"scenarios": [{k: r.get(k) for k in keys} for r in results]}, indent=2))
    else:
        print("  ".join(f"{c:>13}" for c in keys))
        for r in results:
            print("  ".join(f"{str(r.get(c)):>13}" for c in keys))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
