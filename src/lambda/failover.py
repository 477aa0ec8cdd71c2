"""pgdr failover: promote the DR read replica when the primary is down and move DNS to it.

Runs in the DR region, outside any VPC. Invoked by the CloudWatch alarm that follows the probe,
every minute by a schedule with {"action": "resume"} (which acts only while that alarm is in
ALARM or the replica is already promoted: it finishes what an earlier invocation could not),
or by hand with {"action": "manual_failover"} or {}; {"action": "check"} is a dry run that
reports what would be done and changes nothing. Once the replica has been promoted, DNS is never
pointed back at the old primary (that would split the brain). Stdlib + boto3 only.
"""
import logging
import os
import time
from dataclasses import dataclass

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

log = logging.getLogger("pgdr.failover")
log.setLevel(logging.INFO)

REQUIRED = ("PGDR_ENV", "PRIMARY_REGION", "PRIMARY_DB_ID", "DR_REGION", "REPLICA_DB_ID",
            "HOSTED_ZONE_ID", "RECORD_NAME", "PRIMARY_SET_ID", "REPLICA_SET_ID", "RECORD_TTL",
            "TOPIC_ARN")
ROLE_TAG = "pgdr:role"
POLL_S = 10          # promotion poll interval
CALM_POLLS = 3       # "available" this many polls in a row also counts as promoted (see wait_promoted)
MARGIN_S = 60        # stop this long before the function's own deadline
NO_CONTEXT_S = 840   # time budget when there is no Lambda context
INSYNC_WAIT_S = 60
sleep = time.sleep   # tests replace this


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

    @classmethod
    def from_config(cls, cfg):
        t = cfg["PRIMARY_TIMEOUT_S"]
        primary = Config(connect_timeout=t, read_timeout=t,
                         retries={"total_max_attempts": 2, "mode": "standard"})
        return cls(dr_rds=boto3.client("rds", region_name=cfg["DR_REGION"]),
                   primary_rds=boto3.client("rds", region_name=cfg["PRIMARY_REGION"], config=primary),
                   route53=boto3.client("route53"),
                   sns=boto3.client("sns", region_name=cfg["DR_REGION"]),
                   cloudwatch=boto3.client("cloudwatch", region_name=cfg["DR_REGION"]))


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


def is_promoted(rds, inst):
    if not inst.get("ReadReplicaSourceDBInstanceIdentifier"):
        return True
    tags = rds.list_tags_for_resource(ResourceName=inst["DBInstanceArn"])["TagList"]
    return any(t["Key"] == ROLE_TAG and t["Value"] == "primary" for t in tags)


def tag_primary(rds, inst):
    tags = rds.list_tags_for_resource(ResourceName=inst["DBInstanceArn"])["TagList"]
    if not any(t["Key"] == ROLE_TAG and t["Value"] == "primary" for t in tags):
        rds.add_tags_to_resource(ResourceName=inst["DBInstanceArn"],
                                 Tags=[{"Key": ROLE_TAG, "Value": "primary"}])


def primary_state(rds, cfg):
    """(available, why). Any error reaching the primary region counts as not available."""
    try:
        inst = describe(rds, cfg["PRIMARY_DB_ID"])
    except Exception as e:  # unreachable endpoint, timeout, throttling, access denied...
        return False, None, f"{type(e).__name__}: {e}"
    if inst is None:
        return False, None, "instance not found"
    status = inst["DBInstanceStatus"]
    return status == "available", inst, f"status {status}"


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


def wait_promoted(rds, db_id, time_left):
    """Poll until the promoted instance is available again; None if our time runs out.

    Right after PromoteReadReplica the status may still read "available" for a moment, so
    "available" counts only once the source link is gone, after a non-available status was
    seen, or after CALM_POLLS polls in a row (the emulator never clears the source link)."""
    seen_busy, calm = False, 0
    while time_left() > POLL_S:
        sleep(POLL_S)
        inst = describe(rds, db_id)
        status = inst["DBInstanceStatus"] if inst else "not found"
        log.info("replica %s status: %s", db_id, status)
        if status != "available":
            seen_busy, calm = True, 0
            continue
        calm += 1
        if seen_busy or calm >= CALM_POLLS or not inst.get("ReadReplicaSourceDBInstanceIdentifier"):
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


def run(c, cfg, dry_run=False, time_left=None):
    time_left, t0 = time_left or time_budget(None), time.monotonic()
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

    dr = describe(c.dr_rds, rid)
    dr_status = dr["DBInstanceStatus"] if dr else "not found"
    res["replica"] = {"id": rid, "region": dr_region, "status": dr_status, "endpoint": endpoint(dr)}
    log.info("DR instance %s in %s: %s", rid, dr_region, dr_status)
    if dr and is_promoted(c.dr_rds, dr):
        log.info("%s is already promoted: DNS must point at it", rid)
        changes = to_dr(dr, dry_run)
        if not dry_run:
            tag_primary(c.dr_rds, dr)
            if changes:
                res["notified"] = notify(c, cfg, f"pgdr {env}: DNS moved to {dr_region}",
                                         f"{rid} was already promoted; DNS now sends writers to it:\n"
                                         + "\n".join(changes))
        return done("none", reason="already failed over", dns_changes=changes)

    up, pinst, why = primary_state(c.primary_rds, cfg)
    res["primary"] = {"id": cfg["PRIMARY_DB_ID"], "region": cfg["PRIMARY_REGION"],
                      "available": up, "why": why}
    log.info("primary %s in %s: %s", cfg["PRIMARY_DB_ID"], cfg["PRIMARY_REGION"], why)
    if up:
        changes = set_weights(c, cfg, {cfg["PRIMARY_SET_ID"]: 100, cfg["REPLICA_SET_ID"]: 0},
                              {cfg["PRIMARY_SET_ID"]: endpoint(pinst)}, dry_run, time_left)
        return done("none", reason="primary available", dns_changes=changes)

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
        msg = f"promotion of {rid} refused, instance busy: {e}"
        log.error(msg)
        res["notified"] = notify(c, cfg, f"pgdr {env}: failover postponed, {rid} busy", msg)
        return done("retry_later", error=msg)
    # The decision is irreversible: record it at once, so that a later invocation that finds
    # the promotion still running (or DNS not yet moved) finishes the job instead of stalling.
    tag_primary(c.dr_rds, dr)
    t_promote = time.monotonic()
    inst = wait_promoted(c.dr_rds, rid, time_left)
    if inst is None:
        msg = f"promotion of {rid} requested (primary down: {why}) but not finished in time; " \
              "DNS not moved yet: invoke the failover function again to finish"
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
    timings = {"promotion_s": round(t_avail - t_promote, 1), "dns_s": round(time.monotonic() - t_avail, 1)}
    body = (f"pgdr {env} failed over from {cfg['PRIMARY_REGION']} to {dr_region}.\n"
            f"Why: primary {cfg['PRIMARY_DB_ID']} judged down: {why}.\n"
            f"Promoted {rid} (endpoint {endpoint(inst) or endpoint(dr)}) in {timings['promotion_s']} s.\n"
            f"DNS {cfg['RECORD_NAME']}: " + ("; ".join(changes) or "already as wanted")
            + f" ({timings['dns_s']} s).\nThe old primary must not be used again: build a new replica.")
    res["notified"] = notify(c, cfg, f"pgdr {env}: failed over to {dr_region}", body)
    return done("promoted", reason=f"primary down ({why})", dns_changes=changes, timings=timings)


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
    than one invocation, DNS update failed) or whose invocation was lost is retried here."""
    state = alarm_state(c, cfg)
    if state == "ALARM":
        log.info("resume: alarm %s is in ALARM", cfg["ALARM_NAME"])
        return run(c, cfg, False, time_left)
    dr = describe(c.dr_rds, cfg["REPLICA_DB_ID"])
    if dr and is_promoted(c.dr_rds, dr):
        log.info("resume: %s is promoted: DNS must point at it", cfg["REPLICA_DB_ID"])
        return run(c, cfg, False, time_left)
    return {"action": "none", "reason": f"alarm state is {state or 'unknown'} and the replica is not promoted",
            "env": cfg["PGDR_ENV"]}


def handler(event, context):
    cfg = load_config()
    event = event if isinstance(event, dict) else {}
    if event.get("source") == "aws.cloudwatch" or "alarmData" in event:
        data = event.get("alarmData") or {}
        state = (data.get("state") or {}).get("value")
        log.info("invoked by alarm %s (state %s)", data.get("alarmName"), state)
        if state and state != "ALARM":
            return {"action": "none", "reason": f"alarm state is {state}", "env": cfg["PGDR_ENV"]}
        dry_run = False
    elif event.get("action") == "resume":
        return resume(Clients.from_config(cfg), cfg, time_budget(context))
    else:
        action = event.get("action") or "manual_failover"
        if action not in ("manual_failover", "check"):
            raise ValueError(f"unknown action {action!r}: expected 'manual_failover', 'check' or 'resume'")
        log.info("invoked by hand: %s", action)
        dry_run = action == "check"
    return run(Clients.from_config(cfg), cfg, dry_run, time_budget(context))
