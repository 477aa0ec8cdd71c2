"""pgdr failover: promote the DR read replica when the primary is down and move DNS to it.

Runs in the DR region, outside any VPC. Invoked by the CloudWatch alarm that follows the probe,
every minute by a schedule with {"action": "resume"} (which acts only while that alarm is in
ALARM or the replica's promotion has started: it finishes what an earlier invocation could not),
or by hand with {"action": "manual_failover"} or {}; {"action": "check"} is a dry run that
reports what would be done and changes nothing. Stdlib + boto3 only.

What the function holds to (the AWS documentation, not the emulator):
- Down means down: the primary region's RDS API does not answer, the instance is gone, or its
  status is terminal. Maintenance, modifications, reboots, backups and any status not known here
  are not down: the alarm is then reported (probe path broken?) and nothing is promoted.
- Promoted means promoted: the DR instance is `available` and has no
  ReadReplicaSourceDBInstanceIdentifier. DNS moves to it only then, and never back to the old
  primary once the promotion has started.
- Every invocation publishes the metric pgdr/ReplicaPromoted (Environment=PGDR_ENV) in the DR
  region: 1 when the DR instance is promoted, else 0. Route 53's health check on the writer
  record follows it.
- Once promoted, the old primary is fenced when its region answers: its security group's 5432
  ingress rules revoked, the instance rebooted to end the sessions that connection tracking
  keeps, and tagged pgdr:role=fenced. A fence the region did not let us apply is pending: the
  function tries again every minute, and the next `pgdr up`/`pgdr failover` completes it.
"""
import logging
import os
import time
from dataclasses import dataclass

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

log = logging.getLogger("pgdr.failover")
log.setLevel(logging.INFO)

REQUIRED = ("PGDR_ENV", "PRIMARY_REGION", "PRIMARY_DB_ID", "DR_REGION", "REPLICA_DB_ID",
            "HOSTED_ZONE_ID", "RECORD_NAME", "PRIMARY_SET_ID", "REPLICA_SET_ID", "RECORD_TTL",
            "TOPIC_ARN")
ROLE_TAG = "pgdr:role"
PG_PORT = 5432
METRIC_NAMESPACE = "pgdr"
METRIC_NAME = "ReplicaPromoted"
METRIC_DIMENSION = "Environment"
POLL_S = 10          # promotion poll interval
MARGIN_S = 60        # stop this long before the function's own deadline
NO_CONTEXT_S = 840   # time budget when there is no Lambda context
INSYNC_WAIT_S = 60
sleep = time.sleep   # tests replace this

# RDS DB instance statuses (RDS user guide, "Viewing Amazon RDS DB instance status").
# Terminal: the instance does not serve and will not by itself. "stopped" does not serve either.
DOWN_STATUSES = frozenset((
    "failed", "storage-full", "restore-error", "inaccessible-encryption-credentials",
    "inaccessible-encryption-credentials-recoverable", "stopped"))
DOWN_PREFIXES = ("incompatible-",)
# Normal life: maintenance, modifications, reboots, backups. Never a reason to fail over.
ALIVE_STATUSES = frozenset((
    "available", "modifying", "upgrading", "rebooting", "maintenance", "backing-up",
    "storage-optimization", "renaming", "resetting-master-credentials", "starting", "stopping"))
ALIVE_PREFIXES = ("configuring-",)


class ConfigError(Exception):
    pass


def fqdn(name):
    return name.strip().lower().rstrip(".") + "."


def load_config(env=None):
    env = os.environ if env is None else env
    missing = [k for k in REQUIRED if not env.get(k, "").strip()]
    if missing:
        raise ConfigError("pgdr failover: missing environment variable(s): " + ", ".join(missing))
    cfg = {k: env[k].strip() for k in REQUIRED}
    cfg["RECORD_NAME"] = fqdn(cfg["RECORD_NAME"])
    cfg["HEALTH_CHECK_ID"] = env.get("HEALTH_CHECK_ID", "").strip() or None
    cfg["ALARM_NAME"] = env.get("ALARM_NAME", "").strip() or None
    cfg["PRIMARY_SG_ID"] = env.get("PRIMARY_SG_ID", "").strip() or None  # older deployments: none
    for key, conv in (("RECORD_TTL", int), ("PRIMARY_TIMEOUT_S", float)):
        raw = env.get(key, "").strip() or "5"
        try:
            cfg[key] = conv(raw)
        except ValueError:
            raise ConfigError(f"pgdr failover: {key} must be a number, not {raw!r}") from None
    return cfg


@dataclass
class Clients:
    dr_rds: object
    primary_rds: object
    route53: object
    sns: object
    cloudwatch: object = None
    primary_ec2: object = None

    @classmethod
    def from_config(cls, cfg):
        t = cfg["PRIMARY_TIMEOUT_S"]
        primary = Config(connect_timeout=t, read_timeout=t,
                         retries={"total_max_attempts": 2, "mode": "standard"})
        return cls(dr_rds=boto3.client("rds", region_name=cfg["DR_REGION"]),
                   primary_rds=boto3.client("rds", region_name=cfg["PRIMARY_REGION"], config=primary),
                   route53=boto3.client("route53"),
                   sns=boto3.client("sns", region_name=cfg["DR_REGION"]),
                   cloudwatch=boto3.client("cloudwatch", region_name=cfg["DR_REGION"]),
                   primary_ec2=boto3.client("ec2", region_name=cfg["PRIMARY_REGION"], config=primary))


def time_budget(context):
    """Seconds left before we must stop (deadline minus a safety margin)."""
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        return lambda: context.get_remaining_time_in_millis() / 1000.0 - MARGIN_S
    end = time.monotonic() + NO_CONTEXT_S
    return lambda: end - time.monotonic()


def describe(rds, db_id):
    """The instance, or None when it does not exist."""
    try:
        return rds.describe_db_instances(DBInstanceIdentifier=db_id)["DBInstances"][0]
    except ClientError as e:
        if e.response["Error"]["Code"] in ("DBInstanceNotFound", "DBInstanceNotFoundFault"):
            return None
        raise


def endpoint(inst):
    return (inst or {}).get("Endpoint", {}).get("Address")


def unanswered(e):
    """True when the region's API did not answer: endpoint unreachable, connect or read timeout,
    connection dropped, or a server error (5xx) that persisted through the retries. An answer
    that refuses (access denied, throttling, a bad request) is an answer."""
    if isinstance(e, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(e, ClientError):
        return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return False


def tags_of(rds, inst):
    if "TagList" in inst:  # DescribeDBInstances returns the tags
        return {t["Key"]: t["Value"] for t in inst["TagList"]}
    tags = rds.list_tags_for_resource(ResourceName=inst["DBInstanceArn"])["TagList"]
    return {t["Key"]: t["Value"] for t in tags}


def promoted(inst):
    """Promoted means promoted: available, and no longer anybody's read replica."""
    return bool(inst) and inst.get("DBInstanceStatus") == "available" \
        and not inst.get("ReadReplicaSourceDBInstanceIdentifier")


def promotion_started(rds, inst):
    """The decision is taken: the replica is tagged primary (we asked RDS to promote it) or has
    no source any more. From then on DNS never goes back to the old primary."""
    return bool(inst) and (not inst.get("ReadReplicaSourceDBInstanceIdentifier")
                           or tags_of(rds, inst).get(ROLE_TAG) == "primary")


def tag_primary(rds, inst):
    tags = rds.list_tags_for_resource(ResourceName=inst["DBInstanceArn"])["TagList"]
    if not any(t["Key"] == ROLE_TAG and t["Value"] == "primary" for t in tags):
        rds.add_tags_to_resource(ResourceName=inst["DBInstanceArn"],
                                 Tags=[{"Key": ROLE_TAG, "Value": "primary"}])


def status_class(status):
    """"down" (terminal), "alive" (normal life) or "unknown" (not down either)."""
    if status in DOWN_STATUSES or status.startswith(DOWN_PREFIXES):
        return "down"
    if status in ALIVE_STATUSES or status.startswith(ALIVE_PREFIXES):
        return "alive"
    return "unknown"


def primary_state(rds, cfg):
    """A dict: down (bool), kind (unreachable|gone|terminal|alive|unknown|error), status, inst, why.

    Down only when the region's RDS API does not answer, the instance is gone, or its status is
    terminal. An answer that refuses (access denied, throttling) tells nothing: not down."""
    try:
        inst = describe(rds, cfg["PRIMARY_DB_ID"])
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        kind = "unreachable" if unanswered(e) else "error"
        return {"down": kind == "unreachable", "kind": kind, "status": None, "inst": None, "why": why}
    if inst is None:
        return {"down": True, "kind": "gone", "status": None, "inst": None, "why": "instance not found"}
    status = inst["DBInstanceStatus"]
    kind = {"down": "terminal"}.get(status_class(status), status_class(status))
    return {"down": kind == "terminal", "kind": kind, "status": status, "inst": inst,
            "why": f"status {status}"}


def read_records(r53, cfg):
    """The current weighted CNAME records of RECORD_NAME, by SetIdentifier. Listing starts at
    that name and type, so its records come first and fit one page."""
    page = r53.list_resource_record_sets(HostedZoneId=cfg["HOSTED_ZONE_ID"], MaxItems="20",
                                         StartRecordName=cfg["RECORD_NAME"], StartRecordType="CNAME")
    return {rr["SetIdentifier"]: rr for rr in page["ResourceRecordSets"]
            if fqdn(rr["Name"]) == cfg["RECORD_NAME"] and rr["Type"] == "CNAME" and "SetIdentifier" in rr}


def value_of(rr):
    return ((rr or {}).get("ResourceRecords") or [{}])[0].get("Value")


def same_record(want, cur):
    norm = lambda v: (v or "").lower().rstrip(".")  # noqa: E731
    return cur is not None and norm(value_of(want)) == norm(value_of(cur)) and all(
        want.get(k) == cur.get(k) for k in ("Weight", "TTL", "HealthCheckId"))


def set_weights(c, cfg, weights, values, dry_run, time_left):
    """UPSERT both weighted records in one batch if they differ from what is there.

    weights/values: by SetIdentifier; a value of None keeps the record's current value.
    Returns a list of the records written (or, in a dry run, that would be written)."""
    current = read_records(c.route53, cfg)
    wanted = []
    for set_id in (cfg["PRIMARY_SET_ID"], cfg["REPLICA_SET_ID"]):
        cur = current.get(set_id)
        value = values.get(set_id) or value_of(cur)
        if not value:
            log.warning("no record %s and no value known for it: leaving it out", set_id)
            continue
        rec = {"Name": cfg["RECORD_NAME"], "Type": "CNAME", "SetIdentifier": set_id,
               "Weight": weights[set_id], "TTL": cfg["RECORD_TTL"], "ResourceRecords": [{"Value": value}]}
        hc = cur.get("HealthCheckId") if cur else (
            cfg["HEALTH_CHECK_ID"] if set_id == cfg["PRIMARY_SET_ID"] else None)
        if hc:
            rec["HealthCheckId"] = hc
        wanted.append(rec)
    if all(same_record(r, current.get(r["SetIdentifier"])) for r in wanted):
        log.info("DNS already as wanted: %s", weights)
        return []
    summary = [f"{r['SetIdentifier']} weight {r['Weight']} -> {value_of(r)}" for r in wanted]
    if dry_run:
        log.info("dry run: would set DNS %s", summary)
        return summary
    log.info("setting DNS: %s", summary)
    change = c.route53.change_resource_record_sets(
        HostedZoneId=cfg["HOSTED_ZONE_ID"],
        ChangeBatch={"Comment": f"pgdr {cfg['PGDR_ENV']} failover function",
                     "Changes": [{"Action": "UPSERT", "ResourceRecordSet": r} for r in wanted]})
    start, change_id = time.monotonic(), change["ChangeInfo"]["Id"]
    while min(INSYNC_WAIT_S - (time.monotonic() - start), time_left()) > 0:
        if c.route53.get_change(Id=change_id)["ChangeInfo"]["Status"] == "INSYNC":
            log.info("DNS change %s is INSYNC", change_id)
            break
        sleep(5)
    return summary


def wait_promoted(rds, db_id, time_left, seen):
    """Poll until the instance is promoted (available, no source); None if our time runs out.

    Right after PromoteReadReplica the status may still read "available" with the source link in
    place: only the link's disappearance says the promotion is done."""
    while time_left() > POLL_S:
        sleep(POLL_S)
        inst = describe(rds, db_id)
        note_dr(seen, inst)
        status = inst["DBInstanceStatus"] if inst else "not found"
        source = (inst or {}).get("ReadReplicaSourceDBInstanceIdentifier")
        log.info("replica %s status: %s, source: %s", db_id, status, source or "none")
        if seen["promoted"]:
            return inst
    return None


def notify(c, cfg, subject, body):
    subject = subject.encode("ascii", "replace").decode()[:99]  # SNS: ASCII, < 100 chars
    try:
        c.sns.publish(TopicArn=cfg["TOPIC_ARN"], Subject=subject, Message=body)
        return True
    except Exception as e:
        log.error("could not publish %r to %s: %s", subject, cfg["TOPIC_ARN"], e)
        return False


def note_dr(seen, inst):
    """Notes what was seen of the DR instance: promoted (writable: available, no source) and
    whether it is no longer a replica at all (the signal the writer record's health check
    follows: an instance whose promotion finished stays "promoted" through its own maintenance,
    so DNS never swings back to the old primary while the new one is `modifying`)."""
    seen["promoted"] = promoted(inst)
    seen["source_gone"] = inst is not None and not inst.get("ReadReplicaSourceDBInstanceIdentifier")


def publish_promoted(c, cfg, seen):
    """PutMetricData pgdr/ReplicaPromoted in the DR region: 1 when the DR instance was seen
    promoted, else 0. Nothing when it could not be observed. A failure is logged, never raised."""
    if "promoted" not in seen:
        log.warning("DR instance not observed: no %s datapoint", METRIC_NAME)
        return None
    value = 1 if seen.get("source_gone", seen["promoted"]) else 0
    if c.cloudwatch is None:
        log.warning("no CloudWatch client: %s=%s not published", METRIC_NAME, value)
        return None
    try:
        c.cloudwatch.put_metric_data(Namespace=METRIC_NAMESPACE, MetricData=[{
            "MetricName": METRIC_NAME, "Value": value, "Unit": "Count",
            "Dimensions": [{"Name": METRIC_DIMENSION, "Value": cfg["PGDR_ENV"]}]}])
    except Exception as e:
        log.error("could not publish %s/%s=%s: %s", METRIC_NAMESPACE, METRIC_NAME, value, e)
        return None
    log.info("published %s/%s=%s", METRIC_NAMESPACE, METRIC_NAME, value)
    return value


def revoke_pg_rules(ec2, sg):
    """Revoke the group's ingress rules whose port range covers 5432 (tcp, or all traffic);
    the descriptions of the revoked rules."""
    rules, token = [], None
    while True:
        kw = {"NextToken": token} if token else {}
        page = ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [sg]}], **kw)
        rules += page.get("SecurityGroupRules", [])
        token = page.get("NextToken")
        if not token:
            break

    def covers(r):
        if r.get("IsEgress") or r.get("GroupId", sg) != sg:
            return False
        if str(r.get("IpProtocol")) == "-1":
            return True
        return str(r.get("IpProtocol")).lower() in ("tcp", "6") and \
            r.get("FromPort", -1) <= PG_PORT <= r.get("ToPort", -1)

    hit = [r for r in rules if covers(r)]
    if not hit:
        return []
    try:
        ec2.revoke_security_group_ingress(GroupId=sg, SecurityGroupRuleIds=[r["SecurityGroupRuleId"] for r in hit])
    except ClientError as e:
        if e.response["Error"]["Code"] not in ("InvalidSecurityGroupRuleId.NotFound", "InvalidPermission.NotFound"):
            raise
        log.info("rules of %s already revoked (a concurrent fence?): %s", sg, e)
    peer = lambda r: r.get("CidrIpv4") or r.get("CidrIpv6") or r.get("PrefixListId") or \
        (r.get("ReferencedGroupInfo") or {}).get("GroupId") or "?"  # noqa: E731
    return [f"{r['SecurityGroupRuleId']} ({r.get('IpProtocol')} {r.get('FromPort')}-{r.get('ToPort')} from {peer(r)})"
            for r in hit]


def fence(c, cfg, dry_run=False):
    """Fence the old primary once the replica is promoted: revoke its 5432 ingress rules (when
    PRIMARY_SG_ID is set), reboot it when available (revoking does not end tracked connections),
    tag it pgdr:role=fenced. Never raises. Returns a dict with state:
    done | already | gone | would | pending (region does not answer) | failed (refused)."""
    pid, region, sg = cfg["PRIMARY_DB_ID"], cfg["PRIMARY_REGION"], cfg.get("PRIMARY_SG_ID")
    out = {"id": pid, "region": region, "steps": []}
    try:
        old = describe(c.primary_rds, pid)
        if old is None:
            return dict(out, state="gone", why=f"{pid} not found in {region}: nothing to fence")
        if tags_of(c.primary_rds, old).get(ROLE_TAG) == "fenced":
            return dict(out, state="already", why=f"{pid} is already tagged {ROLE_TAG}=fenced")
        status = old["DBInstanceStatus"]
        if dry_run:
            return dict(out, state="would", why=f"would fence {pid} ({status}): "
                        + ("revoke the 5432 ingress rules of " + sg if sg else "no PRIMARY_SG_ID, no rule revoked")
                        + (", reboot it" if status == "available" else f", not reboot it ({status})")
                        + f", tag it {ROLE_TAG}=fenced")
        if sg and c.primary_ec2 is not None:
            revoked = revoke_pg_rules(c.primary_ec2, sg)
            out["revoked"] = revoked
            out["steps"].append(f"revoked {len(revoked)} ingress rule(s) of {sg} covering {PG_PORT}: "
                                + (", ".join(revoked) or "none left"))
        else:
            out["steps"].append("PRIMARY_SG_ID not set: no ingress rule revoked" if not sg
                                else "no EC2 client: no ingress rule revoked")
        if status == "available":
            try:
                c.primary_rds.reboot_db_instance(DBInstanceIdentifier=pid)
                out["steps"].append(f"rebooted {pid} to end its open sessions")
                out["rebooted"] = True
            except ClientError as e:
                if e.response["Error"]["Code"] != "InvalidDBInstanceState":
                    raise
                out["steps"].append(f"not rebooted: {pid} became busy ({e.response['Error'].get('Message')})")
        else:
            out["steps"].append(f"not rebooted: status {status} (a reboot needs 'available'); "
                                "open sessions, if any, were not ended")
        c.primary_rds.add_tags_to_resource(ResourceName=old["DBInstanceArn"],
                                           Tags=[{"Key": ROLE_TAG, "Value": "fenced"}])
        out["steps"].append(f"tagged {ROLE_TAG}=fenced")
        log.info("fenced %s in %s: %s", pid, region, "; ".join(out["steps"]))
        return dict(out, state="done", why="; ".join(out["steps"]))
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
        if unanswered(e):
            why = (f"{region} does not answer ({err}): the fence of {pid} is pending; this function "
                   "retries every minute and the next `pgdr up` or `pgdr failover` completes it")
            log.warning(why)
            return dict(out, state="pending", why=why)
        why = (f"fencing {pid} in {region} failed ({err}) after: {'; '.join(out['steps']) or 'nothing'}; "
               f"run `pgdr failover --env {cfg['PGDR_ENV']}` to fence it")
        log.error(why)
        return dict(out, state="failed", why=why)


def alive_advice(cfg, st):
    """The notification when the alarm fired but the primary is not down."""
    pid, region = cfg["PRIMARY_DB_ID"], cfg["PRIMARY_REGION"]
    if st["kind"] == "error":
        seen = f"Its status could not be read ({st['why']}): an answer that refuses is not an outage."
    elif st["kind"] == "unknown":
        seen = f"RDS reports status {st['status']!r}, which pgdr does not know: not counted as down."
    elif st["status"] == "available":
        seen = "RDS reports it available."
    else:
        seen = (f"RDS reports status {st['status']!r}: maintenance or a modification is under way; "
                "the probe may recover once it ends.")
    return (f"The primary-down alarm fired: the probe cannot reach {pid} in {region}, but the "
            f"primary looks alive. {seen}\nNo failover: the replica {cfg['REPLICA_DB_ID']} stays a "
            "replica and DNS stays on the primary.\nCheck the probe's path: the VPC peering "
            "connection and the routes to the peer VPC in both route tables, the security groups "
            f"(the primary's group must allow {PG_PORT} from the DR VPC, the probe's group must allow "
            "egress), and the probe function itself (its logs, errors and timeouts).")


def run(c, cfg, dry_run=False, time_left=None, trigger="manual"):
    """Decide and act; then publish ReplicaPromoted, whatever happened (even on an error)."""
    seen = {}
    try:
        res = _run(c, cfg, dry_run, time_left or time_budget(None), trigger, seen)
    except BaseException:
        publish_promoted(c, cfg, seen)
        raise
    res["replica_promoted_metric"] = publish_promoted(c, cfg, seen)
    return res


def _run(c, cfg, dry_run, time_left, trigger, seen):
    t0 = time.monotonic()
    env, dr_region, rid = cfg["PGDR_ENV"], cfg["DR_REGION"], cfg["REPLICA_DB_ID"]
    res = {"env": env, "dry_run": dry_run}

    def to_dr(inst, dry):  # writers to the DR instance; the primary record keeps its value
        return set_weights(c, cfg, {cfg["PRIMARY_SET_ID"]: 0, cfg["REPLICA_SET_ID"]: 100},
                           {cfg["REPLICA_SET_ID"]: endpoint(inst) or endpoint(dr)}, dry, time_left)

    def done(action, **kw):
        res.update(kw, seconds=round(time.monotonic() - t0, 1))
        res.update({"action": "check", "would": action} if dry_run else {"action": action})
        log.info("result: %s", res)
        return res

    def fence_line(f):
        return f"Fence of the old primary {f['id']} ({f['state']}): {f['why']}."

    dr = describe(c.dr_rds, rid)
    note_dr(seen, dr)
    dr_status = dr["DBInstanceStatus"] if dr else "not found"
    res["replica"] = {"id": rid, "region": dr_region, "status": dr_status, "endpoint": endpoint(dr),
                      "source": (dr or {}).get("ReadReplicaSourceDBInstanceIdentifier"),
                      "promoted": seen["promoted"]}
    log.info("DR instance %s in %s: %s", rid, dr_region, dr_status)
    if dr and promotion_started(c.dr_rds, dr):
        if not seen["promoted"]:
            if dry_run or trigger == "resume":  # the schedule comes back in a minute: no waiting
                inst = None
            else:
                inst = wait_promoted(c.dr_rds, rid, time_left, seen)
            if inst is None:
                msg = (f"promotion of {rid} started but not finished (status {dr_status}, source "
                       f"{res['replica']['source'] or 'none'}): DNS stays as it is until it is promoted")
                log.warning(msg)
                return done("promotion_in_progress", reason=msg)
            dr = inst
            res["replica"].update(status=inst["DBInstanceStatus"], source=None, promoted=True)
        log.info("%s is promoted: DNS must point at it", rid)
        changes = to_dr(dr, dry_run)
        if not dry_run:
            tag_primary(c.dr_rds, dr)
        f = res["fence"] = fence(c, cfg, dry_run)
        if not dry_run:
            if changes:
                res["notified"] = notify(c, cfg, f"pgdr {env}: DNS moved to {dr_region}",
                                         f"{rid} was already promoted; DNS now sends writers to it:\n"
                                         + "\n".join(changes) + "\n" + fence_line(f))
            elif f["state"] == "done":
                res["notified"] = notify(c, cfg, f"pgdr {env}: old primary {f['id']} fenced", fence_line(f))
            elif f["state"] in ("pending", "failed") and trigger != "resume":
                res["notified"] = notify(c, cfg, f"pgdr {env}: fence of {f['id']} {f['state']}", fence_line(f))
        return done("none", reason="already failed over", dns_changes=changes)

    st = primary_state(c.primary_rds, cfg)
    why, pinst = st["why"], st["inst"]
    res["primary"] = {"id": cfg["PRIMARY_DB_ID"], "region": cfg["PRIMARY_REGION"],
                      "available": st["status"] == "available", "down": st["down"], "kind": st["kind"],
                      "status": st["status"], "why": why}
    log.info("primary %s in %s: %s (%s)", cfg["PRIMARY_DB_ID"], cfg["PRIMARY_REGION"], why, st["kind"])
    if not st["down"]:
        changes = set_weights(c, cfg, {cfg["PRIMARY_SET_ID"]: 100, cfg["REPLICA_SET_ID"]: 0},
                              {cfg["PRIMARY_SET_ID"]: endpoint(pinst)}, dry_run, time_left)
        reason = "primary available" if st["status"] == "available" else f"primary not down ({why})"
        if trigger == "alarm" and not dry_run:  # once per alarm, not from every minute's resume
            res["notified"] = notify(
                c, cfg, f"pgdr {env}: alarm but primary looks alive ({st['status'] or st['kind']}) - no failover",
                alive_advice(cfg, st))
        return done("none", reason=reason, dns_changes=changes)

    if dr_status != "available":
        msg = f"primary down ({why}) but replica {rid} not available ({dr_status}) - no failover"
        log.error(msg)
        if not dry_run:
            res["notified"] = notify(c, cfg, f"pgdr {env}: primary down but replica not available "
                                             f"({dr_status}) - no failover", msg)
        return done("none", error=msg)

    if dry_run:
        return done("promoted", reason=f"primary down ({why})", dns_changes=to_dr(dr, True))

    log.info("primary judged down (%s): promoting %s in %s", why, rid, dr_region)
    try:
        c.dr_rds.promote_read_replica(DBInstanceIdentifier=rid, BackupRetentionPeriod=7)
    except ClientError as e:
        if e.response["Error"]["Code"] != "InvalidDBInstanceState":
            notify(c, cfg, f"pgdr {env}: failover FAILED", f"promoting {rid} failed: {e}")
            raise
        again = describe(c.dr_rds, rid)
        if again and promotion_started(c.dr_rds, again):
            # Promoted meanwhile by another hand (`pgdr failover`, a concurrent invocation):
            # RDS refuses a second promotion; finish the one that started.
            log.info("%s was promoted meanwhile (%s): finishing that failover", rid, e)
            return _run(c, cfg, dry_run, time_left, trigger, seen)
        msg = f"promotion of {rid} refused, instance busy: {e}"
        log.error(msg)
        res["notified"] = notify(c, cfg, f"pgdr {env}: failover postponed, {rid} busy", msg)
        return done("retry_later", error=msg)
    # The decision is irreversible: record it at once, so that a later invocation that finds
    # the promotion still running (or DNS not yet moved) finishes the job instead of stalling.
    tag_primary(c.dr_rds, dr)
    t_promote = time.monotonic()
    inst = wait_promoted(c.dr_rds, rid, time_left, seen)
    if inst is None:
        msg = f"promotion of {rid} requested (primary down: {why}) but not finished in time; " \
              "DNS not moved yet: the resume schedule (or invoking the function again) finishes it"
        log.warning(msg)
        res["notified"] = notify(c, cfg, f"pgdr {env}: promotion of {rid} in progress", msg)
        return done("promotion_in_progress", reason=msg)
    t_avail = time.monotonic()
    try:
        changes = to_dr(inst, False)
    except Exception as e:
        msg = f"{rid} promoted but the DNS update failed ({type(e).__name__}: {e}); invoke again"
        log.error(msg)
        notify(c, cfg, f"pgdr {env}: promoted {rid} but DNS update FAILED", msg)
        raise RuntimeError(msg) from e
    t_dns = time.monotonic()
    f = res["fence"] = fence(c, cfg)  # after DNS: writers must have somewhere to go
    timings = {"promotion_s": round(t_avail - t_promote, 1), "dns_s": round(t_dns - t_avail, 1),
               "fence_s": round(time.monotonic() - t_dns, 1)}
    body = (f"pgdr {env} failed over from {cfg['PRIMARY_REGION']} to {dr_region}.\n"
            f"Why: primary {cfg['PRIMARY_DB_ID']} judged down: {why}.\n"
            f"Promoted {rid} (endpoint {endpoint(inst) or endpoint(dr)}) in {timings['promotion_s']} s.\n"
            f"DNS {cfg['RECORD_NAME']}: " + ("; ".join(changes) or "already as wanted")
            + f" ({timings['dns_s']} s).\n" + fence_line(f)
            + "\nThe old primary must not be used again: build a new replica.")
    res["notified"] = notify(c, cfg, f"pgdr {env}: failed over to {dr_region}", body)
    return done("promoted", reason=f"primary down ({why})", dns_changes=changes, timings=timings)


def observe(c, cfg):
    """Publish ReplicaPromoted from one look at the DR instance (invocations that decide nothing)."""
    seen = {}
    try:
        note_dr(seen, describe(c.dr_rds, cfg["REPLICA_DB_ID"]))
    except Exception as e:
        log.error("cannot describe %s: %s", cfg["REPLICA_DB_ID"], e)
    return publish_promoted(c, cfg, seen)


def alarm_state(c, cfg):
    """The primary-down alarm's state, or None when it is not configured or cannot be read."""
    name = cfg.get("ALARM_NAME")
    if not name or c.cloudwatch is None:
        return None
    try:
        alarms = c.cloudwatch.describe_alarms(AlarmNames=[name])["MetricAlarms"]
    except Exception as e:  # a failed read must not stop a later minute from acting
        log.warning("cannot read alarm %s: %s", name, e)
        return None
    return alarms[0]["StateValue"] if alarms else None


def resume(c, cfg, time_left):
    """The schedule's invocation, every minute. The alarm invokes the function once per change
    of state: a failover it asked for that could not finish (replica busy, promotion longer
    than one invocation, DNS update failed, fence pending) or whose invocation was lost is
    retried here."""
    state = alarm_state(c, cfg)
    if state == "ALARM":
        log.info("resume: alarm %s is in ALARM", cfg["ALARM_NAME"])
        return run(c, cfg, False, time_left, trigger="resume")
    seen = {}
    dr = describe(c.dr_rds, cfg["REPLICA_DB_ID"])
    note_dr(seen, dr)
    if dr and promotion_started(c.dr_rds, dr):
        log.info("resume: the promotion of %s has started: DNS must follow it", cfg["REPLICA_DB_ID"])
        return run(c, cfg, False, time_left, trigger="resume")
    return {"action": "none", "reason": f"alarm state is {state or 'unknown'} and the replica is not promoted",
            "env": cfg["PGDR_ENV"], "replica_promoted_metric": publish_promoted(c, cfg, seen)}


def handler(event, context):
    cfg = load_config()
    event = event if isinstance(event, dict) else {}
    trigger = "manual"
    if event.get("source") == "aws.cloudwatch" or "alarmData" in event:
        data = event.get("alarmData") or {}
        state = (data.get("state") or {}).get("value")
        log.info("invoked by alarm %s (state %s)", data.get("alarmName"), state)
        if state and state != "ALARM":
            return {"action": "none", "reason": f"alarm state is {state}", "env": cfg["PGDR_ENV"],
                    "replica_promoted_metric": observe(Clients.from_config(cfg), cfg)}
        dry_run, trigger = False, "alarm"
    elif event.get("action") == "resume":
        return resume(Clients.from_config(cfg), cfg, time_budget(context))
    else:
        action = event.get("action") or "manual_failover"
        if action not in ("manual_failover", "check"):
            raise ValueError(f"unknown action {action!r}: expected 'manual_failover', 'check' or 'resume'")
        log.info("invoked by hand: %s", action)
        dry_run = action == "check"
    return run(Clients.from_config(cfg), cfg, dry_run, time_budget(context), trigger)
