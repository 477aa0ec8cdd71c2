"""AWS rules for the emulator proxy (stdlib only): make moto answer the way real AWS does where
moto is lenient, so that tests catch code that only works against moto.

Each rule is a class below: a small, named behaviour with a docstring that cites the AWS
documentation it reproduces (lines `AWS: "<title>" <url>`; `See: "<title>" <url>` for other
sources such as terraform-provider-aws). All rules are on by default; each can be switched off
alone. `scripts/emuproxy.py` builds one `Engine` and calls, for every AWS request:

    Engine.before(call)        -> None, or (rule name, Answer) to answer without forwarding
    Engine.after(call, answer) -> the Answer to send (rules rewrite moto's answer, track state)
    Engine.done(call)          -> always, once the call is over (releases per-call state)

Configuration (through `POST /__proxy/config`, see `Engine.configure`):

    rules_off          ["name", ...] or ["all"]: rules switched off (default: none)
    rules_time_scale   float, multiplies every rule duration (default 1.0)
    rules_params       {"rule-name": {"param": seconds}}: base durations, before scaling
    throttle           [{"ops": [...], "services": [...], "regions": [...], "times": N,
                         "rate": p, "code": "...", "status": 400}]  (rule `throttling`)

Durations are short by default (0.2 to 2 s) so tests stay fast; real AWS takes seconds to
minutes. Code under test must be right for any duration: scale them up to check.
"""
import json
import random
import re
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

DEFAULT_ACCOUNT = "123456789012"  # moto's account when no x-moto-account-id header is sent
RPCV2_RE = re.compile(r"^/service/[^/]+/operation/([A-Za-z0-9]+)$")
CITE_RE = re.compile(r'^\s*(AWS|See): "([^"]+)"\s+(https?://\S+)', re.M)
XMLNS = {
    "rds": "http://rds.amazonaws.com/doc/2014-10-31/",
    "iam": "https://iam.amazonaws.com/doc/2010-05-08/",
    "route53": "https://route53.amazonaws.com/doc/2013-04-01/",
    "sts": "https://sts.amazonaws.com/doc/2011-06-15/",
    "sns": "http://sns.amazonaws.com/doc/2010-03-31/",
    "monitoring": "http://monitoring.amazonaws.com/doc/2010-08-01/",
}
# REST operations, by (service, method, path regex): the name rules match on
REST_OPS = [
    ("lambda", "POST", r"^/2015-03-31/functions/?$", "CreateFunction"),
    ("lambda", "GET", r"^/2015-03-31/functions/?$", "ListFunctions"),
    ("lambda", "GET", r"^/2015-03-31/functions/[^/]+/?$", "GetFunction"),
    ("lambda", "DELETE", r"^/2015-03-31/functions/[^/]+/?$", "DeleteFunction"),
    ("lambda", "GET", r"^/2015-03-31/functions/[^/]+/configuration/?$", "GetFunctionConfiguration"),
    ("lambda", "PUT", r"^/2015-03-31/functions/[^/]+/configuration/?$", "UpdateFunctionConfiguration"),
    ("lambda", "PUT", r"^/2015-03-31/functions/[^/]+/code/?$", "UpdateFunctionCode"),
    ("lambda", "POST", r"^/2015-03-31/functions/[^/]+/invocations/?$", "Invoke"),
    ("lambda", "POST", r"^/2015-03-31/functions/[^/]+/policy/?$", "AddPermission"),
    ("route53", "POST", r"^/2013-04-01/hostedzone/[^/]+/rrset/?$", "ChangeResourceRecordSets"),
    ("route53", "GET", r"^/2013-04-01/hostedzone/[^/]+/rrset/?$", "ListResourceRecordSets"),
    ("route53", "GET", r"^/2013-04-01/change/[^/]+/?$", "GetChange"),
    ("route53", "POST", r"^/2013-04-01/hostedzone/?$", "CreateHostedZone"),
    ("route53", "GET", r"^/2013-04-01/hostedzone/?$", "ListHostedZones"),
    ("route53", "GET", r"^/2013-04-01/hostedzone/[^/]+/?$", "GetHostedZone"),
    ("route53", "DELETE", r"^/2013-04-01/hostedzone/[^/]+/?$", "DeleteHostedZone"),
    ("route53", "POST", r"^/2013-04-01/healthcheck/?$", "CreateHealthCheck"),
    ("route53", "GET", r"^/2013-04-01/healthcheck/?$", "ListHealthChecks"),
    ("route53", "GET", r"^/2013-04-01/healthcheck/[^/]+/?$", "GetHealthCheck"),
    ("route53", "POST", r"^/2013-04-01/healthcheck/[^/]+/?$", "UpdateHealthCheck"),
    ("route53", "DELETE", r"^/2013-04-01/healthcheck/[^/]+/?$", "DeleteHealthCheck"),
]


def rest_op_name(service, method, path):
    for svc, m, rx, name in REST_OPS:
        if svc == service and m == method and re.match(rx, path):
            return name
    return None


class Answer:
    """An HTTP answer: status, headers (list of pairs), body (bytes)."""

    def __init__(self, status, headers, body, reason=None):
        self.status, self.headers, self.body, self.reason = status, list(headers), body, reason

    @property
    def ok(self):
        return 200 <= self.status < 300

    def header(self, name):
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def copy(self, body=None):
        return Answer(self.status, self.headers, self.body if body is None else body, self.reason)


class Call:
    """One AWS request as the rules see it."""

    def __init__(self, method, path, headers, body, service, region, op, account=None, now=None):
        self.method, self.path, self.headers, self.body = method, path, headers, body or b""
        self.service, self.region, self.op = service, region, op
        self.account = account or DEFAULT_ACCOUNT
        self.now = time.time() if now is None else now
        url = urllib.parse.urlsplit(path)
        self.url_path = urllib.parse.unquote(url.path)
        params = {k: v[0] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        ctype = headers.get("Content-Type", "") or ""
        if "x-www-form-urlencoded" in ctype and self.body:
            form = urllib.parse.parse_qs(self.body.decode("utf-8", "replace"), keep_blank_values=True)
            params.update({k: v[0] for k, v in form.items()})
        self.params = params
        self.rest_op = rest_op_name(service, method, self.url_path)
        self.name = self.rest_op or op  # the operation name rules match on
        if RPCV2_RE.match(url.path):
            self.protocol = "cbor"
        elif headers.get("X-Amz-Target"):
            self.protocol = "json"
        elif service == "ec2":
            self.protocol = "ec2"
        elif "Action" in params:
            self.protocol = "query"
        elif service == "lambda" or "json" in ctype:
            self.protocol = "rest-json"
        else:
            self.protocol = "rest-xml"
        self.key = {}  # per-call state that rules keep between before() and after()
        self.forward_body = None  # set by a rule that changes what is sent to moto

    def forward_params(self, params):
        """Forward these query parameters to moto instead of the request's."""
        self.forward_body = urllib.parse.urlencode(params).encode()

    def json(self):
        try:
            obj = json.loads(self.body or b"{}")
            return obj if isinstance(obj, dict) else {}
        except ValueError:
            return {}

    def list_param(self, prefix):
        """Values of a query list parameter: Prefix.1, Prefix.2, ..."""
        rx = re.compile(re.escape(prefix) + r"\.(\d+)$")
        found = sorted((int(m.group(1)), v) for k, v in self.params.items() if (m := rx.match(k)))
        return [v for _, v in found]

    def filters(self):
        """EC2 filters: {name: [values]}."""
        out = {}
        for k, name in self.params.items():
            m = re.match(r"^Filter\.(\d+)\.Name$", k)
            if m:
                out[name] = self.list_param(f"Filter.{m.group(1)}.Value")
        return out


# ---------------------------------------------------------------------------------------------
# Error answers in each protocol's format

def _cbor_text_map(d):
    def head(major, n):
        if n < 24:
            return bytes([major << 5 | n])
        if n < 256:
            return bytes([major << 5 | 24, n])
        if n < 65536:
            return bytes([major << 5 | 25]) + n.to_bytes(2, "big")
        return bytes([major << 5 | 26]) + n.to_bytes(4, "big")

    def text(s):
        b = s.encode()
        return head(3, len(b)) + b
    return head(5, len(d)) + b"".join(text(k) + text(v) for k, v in d.items())


def aws_error(call, status, code, message, sender=True, extra=None):
    """An error answer as the service would send it (EC2 XML, query XML, REST XML, JSON, REST JSON,
    RPCv2 CBOR)."""
    rid = str(uuid.uuid4())
    fault = "Sender" if sender else "Receiver"
    p = call.protocol
    if call.service == "s3":  # S3's REST-XML errors have an <Error> root, no <ErrorResponse>
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{escape(message)}</Message><RequestId>{rid}</RequestId></Error>")
        return Answer(status, [("Content-Type", "application/xml"), ("x-amz-request-id", rid)], body.encode())
    if p == "ec2":
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
                f"<Message>{escape(message)}</Message></Error></Errors><RequestID>{rid}</RequestID></Response>")
        return Answer(status, [("Content-Type", "text/xml;charset=UTF-8"), ("x-amzn-RequestId", rid)], body.encode())
    if p in ("query", "rest-xml"):
        ns = XMLNS.get(call.service)
        xmlns = f' xmlns="{ns}"' if ns else ""
        body = (f'<?xml version="1.0"?>\n<ErrorResponse{xmlns}><Error><Type>{fault}</Type><Code>{code}</Code>'
                f"<Message>{escape(message)}</Message></Error><RequestId>{rid}</RequestId></ErrorResponse>")
        return Answer(status, [("Content-Type", "text/xml"), ("x-amzn-RequestId", rid)], body.encode())
    if p == "cbor":
        body = _cbor_text_map({"__type": code, "message": message})
        return Answer(status, [("Content-Type", "application/cbor"), ("smithy-protocol", "rpc-v2-cbor"),
                               ("x-amzn-query-error", f"{code};{fault}"), ("x-amzn-RequestId", rid)], body)
    if p == "json":
        obj = {"__type": code, "message": message, **(extra or {})}
        headers = [("Content-Type", call.headers.get("Content-Type") or "application/x-amz-json-1.1"),
                   ("x-amzn-RequestId", rid)]
        if call.headers.get("x-amzn-query-mode"):
            headers.append(("x-amzn-query-error", f"{code};{fault}"))
        return Answer(status, headers, json.dumps(obj).encode())
    obj = {"Type": "User" if sender else "Service", "message": message, **(extra or {})}  # rest-json
    return Answer(status, [("Content-Type", "application/json"), ("x-amzn-ErrorType", code),
                           ("x-amzn-RequestId", rid)], json.dumps(obj).encode())


# ---------------------------------------------------------------------------------------------
# XML helpers

def xml_edit(body, edit):
    """Parses an XML answer, calls edit(root, q) where q(tag) gives the namespaced tag, and
    re-serialises it if edit returned True. Answers that do not parse are left alone."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return body
    ns = root.tag[1:].split("}")[0] if root.tag.startswith("{") else None

    def q(tag):
        return f"{{{ns}}}{tag}" if ns else tag
    if not edit(root, q):
        return body
    text = ET.tostring(root, encoding="unicode", default_namespace=ns) if ns else ET.tostring(root, encoding="unicode")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + text.encode()


def xml_first(body, tag):
    m = re.search(rb"<" + tag.encode() + rb">([^<]*)</" + tag.encode() + rb">", body)
    return m.group(1).decode() if m else None


def parse_rds_arn(value, default_region, default_account):
    """'arn:aws:rds:REGION:ACCOUNT:db:ID' or 'ID' -> (account, region, id)."""
    m = re.match(r"^arn:aws[a-z-]*:rds:([^:]+):([^:]*):db:(.+)$", value or "")
    if m:
        return (m.group(2) or default_account, m.group(1), m.group(3))
    return (default_account, default_region, value)


def role_name(arn):
    """arn:aws:iam::ACCOUNT:role[/path]/NAME -> NAME."""
    return (arn or "").rsplit("/", 1)[-1] if ":role/" in (arn or "") else None


def lambda_function_name(path_segment):
    seg = urllib.parse.unquote(path_segment)
    if seg.startswith("arn:"):
        parts = seg.split(":")
        return parts[6] if len(parts) > 6 else seg
    return seg.split(":")[0]


# ---------------------------------------------------------------------------------------------
# Rules

class Rule:
    name = ""
    params = {}  # base durations in seconds, scaled by rules_time_scale

    def __init__(self, engine):
        self.e = engine
        self.reset()

    @classmethod
    def citations(cls):
        return [{"source": s, "title": t, "url": u} for s, t, u in CITE_RE.findall(cls.__doc__ or "")]

    @classmethod
    def summary(cls):
        return (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")

    def d(self, key):
        """A duration in seconds, after overrides and scaling."""
        return self.e.duration(self.name, key)

    def reset(self):
        pass

    def before(self, call):
        return None

    def after(self, call, ans):
        return ans

    def sweep(self, now):
        pass

    def done(self, call):
        """The call's answer has been sent (or dropped)."""

    def state(self):
        return None


class Throttling(Rule):
    """Configured operations are throttled, in each service's own error format: EC2 answers 503
    RequestLimitExceeded ("Request limit exceeded."), Lambda 429 TooManyRequestsException, JSON
    services (Secrets Manager, CloudWatch Logs, EventBridge) 400 ThrottlingException, query and
    REST-XML services (RDS, IAM, STS, SNS, CloudWatch, Route 53) 400 Throttling ("Rate exceeded").
    Inert until `throttle` is configured: [{"ops": [...], "services": [...], "regions": [...],
    "times": N (first N matching calls), "rate": p (each matching call with probability p),
    "code": override, "status": override}].

    AWS: "Request throttling for the Amazon EC2 API" https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html
    AWS: "Error retries and exponential backoff in AWS" https://docs.aws.amazon.com/general/latest/gr/api-retries.html
    AWS: "Lambda quotas (API requests)" https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html
    """
    name = "throttling"

    def reset(self):
        self.entries = []

    def configure(self, entries):
        out = []
        for raw in entries or []:
            if not isinstance(raw, dict):
                raise ValueError("throttle entries must be objects")
            unknown = set(raw) - {"ops", "services", "regions", "times", "rate", "code", "status"}
            if unknown:
                raise ValueError(f"unknown throttle keys {sorted(unknown)}")
            out.append({"ops": raw.get("ops"), "services": raw.get("services"), "regions": raw.get("regions"),
                        "times": None if raw.get("times") is None else int(raw["times"]),
                        "rate": None if raw.get("rate") is None else float(raw["rate"]),
                        "code": raw.get("code"), "status": raw.get("status"), "throttled": 0})
        with self.e.lock:
            self.entries = out

    @staticmethod
    def default_error(call):
        if call.service == "ec2":
            return 503, "RequestLimitExceeded", "Request limit exceeded."
        if call.service == "lambda":
            return 429, "TooManyRequestsException", "Rate exceeded"
        if call.protocol in ("json", "rest-json"):
            return 400, "ThrottlingException", "Rate exceeded"
        return 400, "Throttling", "Rate exceeded"

    def before(self, call):
        with self.e.lock:
            for ent in self.entries:
                if ent["ops"] and call.op not in ent["ops"] and call.name not in ent["ops"]:
                    continue
                if ent["services"] and call.service not in ent["services"]:
                    continue
                if ent["regions"] and call.region not in ent["regions"]:
                    continue
                if ent["times"] is not None and ent["throttled"] >= ent["times"]:
                    continue
                if ent["rate"] is not None and self.e.rng.random() >= ent["rate"]:
                    continue
                ent["throttled"] += 1
                status, code, msg = self.default_error(call)
                extra = {"Reason": "CallerRateLimitExceeded"} if call.service == "lambda" else None
                return aws_error(call, int(ent["status"] or status), ent["code"] or code, msg, extra=extra)
        return None

    def state(self):
        return {"throttle": [dict(e) for e in self.entries]}


class PriorRequestNotComplete(Rule):
    """Route 53 processes one change batch per hosted zone at a time: a ChangeResourceRecordSets
    that arrives while the previous change to the same zone is still being processed
    (`processing_s`) answers HTTP 400 PriorRequestNotComplete ("The request was rejected because
    Route 53 was still processing a prior request."). A change is PENDING (in its answer and in
    GetChange) for `pending_s`, then INSYNC; moto says INSYNC at once.

    AWS: "ChangeResourceRecordSets (Amazon Route 53 API Reference)" https://docs.aws.amazon.com/Route53/latest/APIReference/API_ChangeResourceRecordSets.html
    AWS: "GetChange (Amazon Route 53 API Reference)" https://docs.aws.amazon.com/Route53/latest/APIReference/API_GetChange.html
    See: "PriorRequestNotComplete error body, as AWS sends it (hashicorp/terraform #1194, rancher/rancher #2529)" https://github.com/rancher/rancher/issues/2529
    """
    name = "prior-request-not-complete"
    params = {"processing_s": 0.2, "pending_s": 1.0}
    MESSAGE = "The request was rejected because Route 53 was still processing a prior request."

    def reset(self):
        self.zones = {}    # (account, zone id) -> processing until
        self.changes = {}  # (account, change id) -> pending until

    @staticmethod
    def zone_of(call):
        m = re.match(r"^/2013-04-01/hostedzone/([^/]+)/rrset", call.url_path)
        return m.group(1) if m else None

    def before(self, call):
        if call.service != "route53" or call.name != "ChangeResourceRecordSets":
            return None
        with self.e.lock:
            until = self.zones.get((call.account, self.zone_of(call)), 0)
        if call.now < until:
            return aws_error(call, 400, "PriorRequestNotComplete", self.MESSAGE)
        return None

    def after(self, call, ans):
        if call.service != "route53" or not ans.ok or ans.header("Content-Encoding"):
            return ans
        if call.name == "ChangeResourceRecordSets":
            change = (xml_first(ans.body, "Id") or "").rsplit("/", 1)[-1]
            with self.e.lock:
                self.zones[(call.account, self.zone_of(call))] = call.now + self.d("processing_s")
                if change:
                    self.changes[(call.account, change)] = call.now + self.d("pending_s")
            return ans.copy(self.pending(ans.body)) if self.d("pending_s") > 0 else ans
        if call.name == "GetChange":
            change = call.url_path.rstrip("/").rsplit("/", 1)[-1]
            with self.e.lock:
                until = self.changes.get((call.account, change), 0)
            if call.now < until:
                return ans.copy(self.pending(ans.body))
        return ans

    @staticmethod
    def pending(body):
        return body.replace(b"<Status>INSYNC</Status>", b"<Status>PENDING</Status>", 1)

    def sweep(self, now):
        with self.e.lock:
            for d in (self.zones, self.changes):
                for k in [k for k, t in d.items() if t <= now]:
                    del d[k]


class Route53HealthCheckAlarm(Rule):
    """A `CLOUDWATCH_METRIC` health check keeps the alarm it follows: the `AlarmIdentifier`
    (Region, Name) and `InsufficientDataHealthStatus` sent in CreateHealthCheck, or changed by
    UpdateHealthCheck (which accepts both for CLOUDWATCH_METRIC checks), are in the
    `HealthCheckConfig` of GetHealthCheck, ListHealthChecks and the CreateHealthCheck /
    UpdateHealthCheck answers (moto stores neither and drops them from every answer). They are
    placed where the API model puts them in HealthCheckConfig: after `Regions`, before
    `RoutingControlArn`, with `Region` before `Name`; anything moto put there is replaced.
    Tracked per account and health check ID (Route 53 is global); DeleteHealthCheck forgets the
    check.

    AWS: "CreateHealthCheck (Amazon Route 53 API Reference)" https://docs.aws.amazon.com/Route53/latest/APIReference/API_CreateHealthCheck.html
    AWS: "UpdateHealthCheck (Amazon Route 53 API Reference): AlarmIdentifier, InsufficientDataHealthStatus" https://docs.aws.amazon.com/Route53/latest/APIReference/API_UpdateHealthCheck.html
    AWS: "GetHealthCheck (Amazon Route 53 API Reference)" https://docs.aws.amazon.com/Route53/latest/APIReference/API_GetHealthCheck.html
    AWS: "HealthCheckConfig (Amazon Route 53 API Reference)" https://docs.aws.amazon.com/Route53/latest/APIReference/API_HealthCheckConfig.html
    AWS: "AlarmIdentifier (Amazon Route 53 API Reference)" https://docs.aws.amazon.com/Route53/latest/APIReference/API_AlarmIdentifier.html
    """
    name = "route53-health-check-alarm"
    OPS = {"CreateHealthCheck", "UpdateHealthCheck", "GetHealthCheck", "ListHealthChecks", "DeleteHealthCheck"}
    # HealthCheckConfig's members in the order of the Route 53 API model (the order AWS sends)
    CONFIG_ORDER = ["IPAddress", "Port", "Type", "ResourcePath", "FullyQualifiedDomainName", "SearchString",
                    "RequestInterval", "FailureThreshold", "MeasureLatency", "Inverted", "Disabled",
                    "HealthThreshold", "ChildHealthChecks", "EnableSNI", "Regions", "AlarmIdentifier",
                    "InsufficientDataHealthStatus", "RoutingControlArn"]

    def reset(self):
        self.checks = {}  # (account, health check id) -> {"region", "name", "insufficient"} (those known)

    @staticmethod
    def local(tag):
        return tag.rsplit("}", 1)[-1]

    @classmethod
    def child(cls, elem, name):
        return next((c for c in elem if cls.local(c.tag) == name), None) if elem is not None else None

    @classmethod
    def text(cls, elem, name):
        c = cls.child(elem, name)
        return None if c is None else (c.text or "")

    @classmethod
    def requested(cls, call):
        """(type or None, {"region", "name", "insufficient"} as sent) from a Create/Update request."""
        try:
            root = ET.fromstring(call.body)
        except ET.ParseError:
            return None, {}
        holder = cls.child(root, "HealthCheckConfig") if call.name == "CreateHealthCheck" else root
        if holder is None:
            return None, {}
        out = {}
        alarm = cls.child(holder, "AlarmIdentifier")
        if alarm is not None:
            out["region"], out["name"] = cls.text(alarm, "Region") or "", cls.text(alarm, "Name") or ""
        if cls.text(holder, "InsufficientDataHealthStatus") is not None:
            out["insufficient"] = cls.text(holder, "InsufficientDataHealthStatus")
        return cls.text(holder, "Type"), out

    @classmethod
    def answered(cls, body):
        """{health check id: type} of the checks in an answer."""
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            return {}
        return {cls.text(hc, "Id"): cls.text(cls.child(hc, "HealthCheckConfig"), "Type")
                for hc in root.iter() if cls.local(hc.tag) == "HealthCheck" and cls.text(hc, "Id")}

    def after(self, call, ans):
        if call.service != "route53" or call.name not in self.OPS or not ans.ok or ans.header("Content-Encoding"):
            return ans
        path_id = call.url_path.rstrip("/").rsplit("/", 1)[-1]
        if call.name == "DeleteHealthCheck":
            with self.e.lock:
                self.checks.pop((call.account, path_id), None)
            return ans
        if call.name in ("CreateHealthCheck", "UpdateHealthCheck"):
            kind, sent = self.requested(call)
            found = self.answered(ans.body)
            ident = next(iter(found), None) if call.name == "CreateHealthCheck" else path_id
            kind = kind or found.get(ident)
            if sent and ident and kind == "CLOUDWATCH_METRIC":
                with self.e.lock:  # a create starts afresh; an update changes what it sends
                    old = self.checks.get((call.account, ident), {}) if call.name == "UpdateHealthCheck" else {}
                    self.checks[(call.account, ident)] = {**old, **sent}
        with self.e.lock:
            known = {k[1]: dict(v) for k, v in self.checks.items() if k[0] == call.account}
        return ans.copy(xml_edit(ans.body, lambda root, q: self.inject(root, q, known))) if known else ans

    def inject(self, root, q, known):
        changed = False
        for hc in root.iter(q("HealthCheck")):
            rec = known.get(hc.findtext(q("Id")))
            cfg = hc.find(q("HealthCheckConfig"))
            if not rec or cfg is None:
                continue
            for tag, field in (("AlarmIdentifier", "name"), ("InsufficientDataHealthStatus", "insufficient")):
                if field not in rec:
                    continue
                for old in cfg.findall(q(tag)):
                    cfg.remove(old)
                el = ET.Element(q(tag))
                if tag == "AlarmIdentifier":
                    ET.SubElement(el, q("Region")).text = rec["region"]
                    ET.SubElement(el, q("Name")).text = rec["name"]
                else:
                    el.text = rec["insufficient"]
                rank = self.CONFIG_ORDER.index(tag)
                pos = 0
                for i, c in enumerate(list(cfg)):
                    if self.local(c.tag) in self.CONFIG_ORDER and self.CONFIG_ORDER.index(self.local(c.tag)) < rank:
                        pos = i + 1
                cfg.insert(pos, el)
                changed = True
        return changed

    def state(self):
        with self.e.lock:
            return {"checks": [{"account": k[0], "id": k[1], **v} for k, v in sorted(self.checks.items())]}


class Ec2ClientToken(Rule):
    """An EC2 request repeated with the same ClientToken (same account, Region, operation) returns
    the first request's answer and creates nothing; the same token with different parameters
    answers IdempotentParameterMismatch ("Arguments on this idempotent request are inconsistent
    with arguments used in previous request(s)."). moto ignores ClientToken for
    CreateVpcEndpoint (a retried create makes a second endpoint). Only successful answers are
    remembered; a retry that arrives while the first request is in flight waits for it.

    AWS: "Ensuring idempotency in Amazon EC2 API requests" https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-idempotency.html
    AWS: "Error codes for the Amazon EC2 API (IdempotentParameterMismatch)" https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html
    """
    name = "ec2-client-token"
    MISMATCH = "Arguments on this idempotent request are inconsistent with arguments used in previous request(s)."

    def reset(self):
        self.cache = {}     # key -> (signature, Answer)
        self.inflight = {}  # key -> threading.Event

    @staticmethod
    def signature(call):
        return tuple(sorted((k, v) for k, v in call.params.items() if k != "ClientToken"))

    def before(self, call):
        token = call.params.get("ClientToken") if call.service == "ec2" else None
        if not token:
            return None
        key = (call.account, call.region, call.op, token)
        sig = self.signature(call)
        deadline = time.time() + 60
        while True:
            with self.e.lock:
                if key in self.cache:
                    sig0, ans0 = self.cache[key]
                    if sig0 != sig:
                        return aws_error(call, 400, "IdempotentParameterMismatch", self.MISMATCH)
                    return ans0.copy()
                ev = self.inflight.get(key)
                if ev is None:
                    self.inflight[key] = threading.Event()
                    call.key[self.name] = (key, sig)
                    return None
            if not ev.wait(max(0.0, deadline - time.time())):
                return None  # the first request never finished: let this one through

    def after(self, call, ans):
        held = call.key.get(self.name)
        if held and ans.ok:
            with self.e.lock:
                self.cache[held[0]] = (held[1], ans.copy())
        return ans

    def done(self, call):
        held = call.key.pop(self.name, None)
        if held:
            with self.e.lock:
                ev = self.inflight.pop(held[0], None)
            if ev:
                ev.set()

    def state(self):
        return {"tokens": len(self.cache)}


# ID prefix -> (error code, message); the codes are those of the EC2 API error reference
NOT_FOUND = {
    "vpc": ("InvalidVpcID.NotFound", "The vpc ID '{}' does not exist"),
    "subnet": ("InvalidSubnetID.NotFound", "The subnet ID '{}' does not exist"),
    "sg": ("InvalidGroup.NotFound", "The security group '{}' does not exist"),
    "rtb": ("InvalidRouteTableID.NotFound", "The routeTable ID '{}' does not exist"),
    "pcx": ("InvalidVpcPeeringConnectionID.NotFound", "The vpcPeeringConnection ID '{}' does not exist"),
    "vpce": ("InvalidVpcEndpointId.NotFound", "The Vpc Endpoint Id '{}' does not exist"),
    "eni": ("InvalidNetworkInterfaceID.NotFound", "The networkInterface ID '{}' does not exist"),
    "i": ("InvalidInstanceID.NotFound", "The instance ID '{}' does not exist"),
}
CREATED_ID = {"CreateVpc": "vpcId", "CreateSubnet": "subnetId", "CreateSecurityGroup": "groupId",
              "CreateRouteTable": "routeTableId", "CreateVpcPeeringConnection": "vpcPeeringConnectionId",
              "CreateVpcEndpoint": "vpcEndpointId", "CreateNetworkInterface": "networkInterfaceId",
              "RunInstances": "instanceId"}
# parameters whose values are not references to resources (free text, filters, tags)
UNREFERENCING = re.compile(r"^(Action|Version|ClientToken|DryRun|Description|GroupDescription|GroupName"
                           r"|Filter\.\d+\..*|TagSpecification\.\d+\..*|Tag\.\d+\..*)$")


def not_found(call, ident):
    code, msg = NOT_FOUND[ident.split("-", 1)[0]]
    return aws_error(call, 400, code, msg.format(ident))


def referenced_ids(call, ids):
    """The first of `ids` (a set) that the EC2 request names in a parameter, or None."""
    for k, v in call.params.items():
        if v in ids and not UNREFERENCING.match(k):
            return v
    return None


class Ec2EventualConsistency(Rule):
    """An ID that an EC2 Create* call just returned (VpcId, SubnetId, GroupId, RouteTableId,
    VpcPeeringConnectionId, VpcEndpointId, NetworkInterfaceId, InstanceId) is unknown to the next
    calls that name it for `window_s`: they answer the resource's NotFound error
    (InvalidVpcID.NotFound, InvalidSubnetID.NotFound, InvalidGroup.NotFound,
    InvalidRouteTableID.NotFound, InvalidVpcPeeringConnectionID.NotFound,
    InvalidVpcEndpointId.NotFound, InvalidNetworkInterfaceID.NotFound, InvalidInstanceID.NotFound)
    in EC2's XML error format, Describe* by that ID included. Filters (Filter.N.Value) and tags are
    not treated as references.

    AWS: "Eventual consistency in the Amazon EC2 API" https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html
    AWS: "Error codes for the Amazon EC2 API" https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html
    """
    name = "ec2-eventual-consistency"
    params = {"window_s": 0.5}

    def reset(self):
        self.fresh = {}  # (account, region, id) -> until

    def before(self, call):
        if call.service != "ec2":
            return None
        with self.e.lock:
            ids = {k[2] for k, t in self.fresh.items() if k[:2] == (call.account, call.region) and t > call.now}
        ident = referenced_ids(call, ids) if ids else None
        return not_found(call, ident) if ident else None

    def after(self, call, ans):
        tag = CREATED_ID.get(call.op) if call.service == "ec2" and ans.ok else None
        if not tag or self.d("window_s") <= 0:
            return ans
        found = re.findall(rb"<" + tag.encode() + rb">([^<]+)</" + tag.encode() + rb">", ans.body)
        ids = [x.decode() for x in (found if call.op == "RunInstances" else found[:1])]
        with self.e.lock:
            for ident in ids:
                if ident.split("-", 1)[0] in NOT_FOUND:
                    self.fresh[(call.account, call.region, ident)] = call.now + self.d("window_s")
        return ans

    def sweep(self, now):
        with self.e.lock:
            for k in [k for k, t in self.fresh.items() if t <= now]:
                del self.fresh[k]

    def state(self):
        return {"fresh": sorted(k[2] for k in self.fresh)}


class Ec2PeeringLateInAccepter(Rule):
    """A cross-Region VPC peering request reaches the accepter Region late: for `window_s` after
    CreateVpcPeeringConnection (with PeerRegion), DescribeVpcPeeringConnections in the accepter
    Region does not list it, and AcceptVpcPeeringConnection or any other call there that names it
    answers InvalidVpcPeeringConnectionID.NotFound.

    AWS: "Eventual consistency in the Amazon EC2 API" https://docs.aws.amazon.com/ec2/latest/devguide/eventual-consistency.html
    AWS: "AcceptVpcPeeringConnection (inter-Region requests are accepted in the accepter Region)" https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_AcceptVpcPeeringConnection.html
    """
    name = "ec2-peering-late-in-accepter"
    params = {"window_s": 1.5}

    def reset(self):
        self.hidden = {}  # (account, accepter region, pcx id) -> until

    def ids(self, call):
        with self.e.lock:
            return {k[2] for k, t in self.hidden.items() if k[:2] == (call.account, call.region) and t > call.now}

    def before(self, call):
        if call.service != "ec2":
            return None
        ids = self.ids(call)
        ident = referenced_ids(call, ids) if ids else None
        return not_found(call, ident) if ident else None

    def after(self, call, ans):
        if call.service != "ec2" or not ans.ok:
            return ans
        if call.op == "CreateVpcPeeringConnection":
            peer = call.params.get("PeerRegion")
            pcx = xml_first(ans.body, "vpcPeeringConnectionId")
            if peer and peer != call.region and pcx and self.d("window_s") > 0:
                acct = call.params.get("PeerOwnerId") or call.account
                with self.e.lock:
                    self.hidden[(acct, peer, pcx)] = call.now + self.d("window_s")
        elif call.op == "DescribeVpcPeeringConnections" and not ans.header("Content-Encoding"):
            ids = self.ids(call)
            if ids:
                return ans.copy(xml_edit(ans.body, lambda root, q: remove_items(
                    root, q, "vpcPeeringConnectionSet", "vpcPeeringConnectionId", ids)))
        return ans

    def sweep(self, now):
        with self.e.lock:
            for k in [k for k, t in self.hidden.items() if t <= now]:
                del self.hidden[k]

    def state(self):
        return {"hidden": sorted(f"{k[1]}:{k[2]}" for k in self.hidden)}


def remove_items(root, q, set_tag, id_tag, ids):
    changed = False
    for s in root.iter(q(set_tag)):
        for item in list(s.findall(q("item"))):
            if item.findtext(q(id_tag)) in ids:
                s.remove(item)
                changed = True
    return changed


class IamPropagation(Rule):
    """IAM changes take time to reach Lambda: CreateFunction, or UpdateFunctionConfiguration that
    names a Role, with a role created or changed (CreateRole, PutRolePolicy, AttachRolePolicy,
    UpdateAssumeRolePolicy through this proxy) less than `window_s` ago answers 400
    InvalidParameterValueException: "The role defined for the function cannot be assumed by
    Lambda." or, for a function with a VpcConfig, "The provided execution role does not have
    permissions to call CreateNetworkInterface on EC2". IAM is global: calls are tracked per
    account, whatever Region they were signed for.

    AWS: "Troubleshoot IAM: changes that I make are not always immediately visible" https://docs.aws.amazon.com/IAM/latest/UserGuide/troubleshoot_general.html#troubleshoot_general_eventual-consistency
    AWS: "Defining Lambda function permissions with an execution role" https://docs.aws.amazon.com/lambda/latest/dg/lambda-intro-execution-role.html
    See: "Lambda's error texts as AWS sends them (danilop/LambdAuth #49, aws/aws-sam-cli #617)" https://github.com/aws/aws-sam-cli/issues/617
    """
    name = "iam-propagation"
    params = {"window_s": 1.0}
    CHANGES = {"CreateRole", "PutRolePolicy", "AttachRolePolicy", "UpdateAssumeRolePolicy"}
    ASSUME = "The role defined for the function cannot be assumed by Lambda."
    VPC = "The provided execution role does not have permissions to call CreateNetworkInterface on EC2"

    def reset(self):
        self.changed = {}  # (account, role name) -> last change
        self.vpc_functions = set()  # (account, region, function name) with a VpcConfig

    def after(self, call, ans):
        if not ans.ok:
            return ans
        if call.service == "iam" and call.op in self.CHANGES and call.params.get("RoleName"):
            with self.e.lock:
                self.changed[(call.account, call.params["RoleName"])] = call.now
        elif call.service == "lambda" and call.name in ("CreateFunction", "UpdateFunctionConfiguration", "DeleteFunction"):
            req = call.json()
            fn = (lambda_function_name(req.get("FunctionName", "")) if call.name == "CreateFunction"
                  else LambdaVpcEnis.function_of(call))
            key = (call.account, call.region, fn)
            with self.e.lock:
                if call.name == "DeleteFunction":
                    self.vpc_functions.discard(key)
                elif "VpcConfig" in req:
                    if (req["VpcConfig"] or {}).get("SubnetIds"):
                        self.vpc_functions.add(key)
                    else:
                        self.vpc_functions.discard(key)
        return ans

    def before(self, call):
        if call.service != "lambda" or call.name not in ("CreateFunction", "UpdateFunctionConfiguration"):
            return None
        req = call.json()
        name = role_name(req.get("Role"))
        if not name:
            return None
        with self.e.lock:
            t = self.changed.get((call.account, name))
        if t is None or call.now - t >= self.d("window_s"):
            return None
        vpc = bool((req.get("VpcConfig") or {}).get("SubnetIds"))
        if call.name == "UpdateFunctionConfiguration" and "VpcConfig" not in req:
            with self.e.lock:
                vpc = (call.account, call.region, LambdaVpcEnis.function_of(call)) in self.vpc_functions
        return aws_error(call, 400, "InvalidParameterValueException", self.VPC if vpc else self.ASSUME)


class LambdaVpcEnis(Rule):
    """A VPC-enabled Lambda function gets a Hyperplane network interface for each subnet and
    security-group combination (created in moto with CreateNetworkInterface, described "AWS Lambda
    VPC ENI-<function>-<uuid>", shown with InterfaceType lambda and RequesterManaged true); functions
    with the same combination share it. When no function uses it any more (DeleteFunction, or a
    VpcConfig change), it stays `in-use` for `hold_s`, then shows `available`; the proxy deletes it
    `delete_s` after the release, as Lambda does, unless the function's execution role was deleted
    first (then it stays until the customer deletes it). While it exists, DeleteSecurityGroup of
    its groups answers DependencyViolation ("resource sg-... has a dependent object") and
    DeleteSubnet of its subnet DependencyViolation ("The subnet '...' has dependencies and cannot
    be deleted."); DeleteNetworkInterface of an in-use interface answers InvalidParameterValue
    ("Network interface '...' is currently in use."); an available one can be deleted.

    AWS: "VPC networking for Lambda: Lambda Hyperplane ENIs" https://docs.aws.amazon.com/lambda/latest/dg/foundation-networking.html
    AWS: "AWS::Lambda::Function VpcConfig (CloudFormation waits for Lambda to delete the interfaces)" https://docs.aws.amazon.com/AWSCloudFormation/latest/TemplateReference/aws-properties-lambda-function-vpcconfig.html
    See: "terraform-provider-aws aws_security_group: Lambda ENIs can take up to 45 minutes to delete" https://registry.terraform.io/providers/hashicorp/aws/latest/docs/resources/security_group#timeouts
    See: "DeleteNetworkInterface of an interface in use, as AWS answers it (gruntwork-io/cloud-nuke #1132)" https://github.com/gruntwork-io/cloud-nuke/pull/1132
    """
    name = "lambda-vpc-enis"
    params = {"hold_s": 1.0, "delete_s": 2.0}

    def reset(self):
        self.enis = {}       # eni id -> record
        self.functions = {}  # (account, region, function) -> {"combos": set, "role": name}
        self.deleted_roles = set()  # (account, role name)

    # --- lifecycle ---------------------------------------------------------------------------
    @staticmethod
    def combos(vpc):
        subnets = (vpc or {}).get("SubnetIds") or []
        groups = frozenset((vpc or {}).get("SecurityGroupIds") or [])
        return {(s, groups) for s in subnets}

    def eni_for(self, account, region, combo):
        return next((e for e in self.enis.values() if (e["account"], e["region"], e["subnet"], e["groups"])
                     == (account, region, combo[0], combo[1])), None)

    def attach(self, call, fn, combos, role):
        for combo in combos:
            with self.e.lock:
                eni = self.eni_for(call.account, call.region, combo)
                if eni:
                    eni["users"].add(fn)
                    eni["released"] = None
                    eni["role"] = role
                    continue
            params = {"Action": "CreateNetworkInterface", "Version": "2016-11-15", "SubnetId": combo[0],
                      "Description": f"AWS Lambda VPC ENI-{fn}-{uuid.uuid4()}"}
            params.update({f"SecurityGroupId.{i}": g for i, g in enumerate(sorted(combo[1]), 1)})
            status, body = self.e.query("ec2", call.region, call.account, params)
            ident = xml_first(body, "networkInterfaceId") if 200 <= status < 300 else None
            if not ident:
                self.e.log(f"lambda-vpc-enis: CreateNetworkInterface for {fn} failed: {status} {body[:200]!r}")
                continue
            with self.e.lock:
                self.enis[ident] = {"id": ident, "account": call.account, "region": call.region,
                                    "subnet": combo[0], "groups": combo[1], "users": {fn},
                                    "released": None, "role": role}

    def release(self, account, region, fn, combos, now):
        with self.e.lock:
            for eni in self.enis.values():
                if (eni["account"], eni["region"]) == (account, region) and (eni["subnet"], eni["groups"]) in combos:
                    eni["users"].discard(fn)
                    if not eni["users"] and eni["released"] is None:
                        eni["released"] = now

    def status(self, eni, now):
        if eni["users"] or (eni["released"] is not None and now < eni["released"] + self.d("hold_s")):
            return "in-use"
        return "available"

    @staticmethod
    def function_of(call):
        m = re.match(r"^/2015-03-31/functions/([^/]+)", call.url_path)
        return lambda_function_name(m.group(1)) if m else None

    # --- hooks -------------------------------------------------------------------------------
    REWRITTEN_FILTERS = ("status", "interface-type", "requester-managed")

    def before(self, call):
        if call.service != "ec2":
            return None
        if call.op == "DescribeNetworkInterfaces":
            self.take_filters(call)
            return None
        with self.e.lock:
            here = [e for e in self.enis.values() if (e["account"], e["region"]) == (call.account, call.region)]
            if call.op == "DeleteSecurityGroup":
                sg = call.params.get("GroupId")
                if sg and any(sg in e["groups"] for e in here):
                    return aws_error(call, 400, "DependencyViolation", f"resource {sg} has a dependent object")
            elif call.op == "DeleteSubnet":
                sn = call.params.get("SubnetId")
                if sn and any(sn == e["subnet"] for e in here):
                    return aws_error(call, 400, "DependencyViolation",
                                     f"The subnet '{sn}' has dependencies and cannot be deleted.")
            elif call.op == "DeleteNetworkInterface":
                eni = self.enis.get(call.params.get("NetworkInterfaceId"))
                if eni and eni in here and self.status(eni, call.now) == "in-use":
                    return aws_error(call, 400, "InvalidParameterValue",
                                     f"Network interface '{eni['id']}' is currently in use.")
        return None

    def after(self, call, ans):
        if not ans.ok:
            return ans
        if call.service == "iam":
            key = (call.account, call.params.get("RoleName"))
            with self.e.lock:
                if call.op == "DeleteRole":
                    self.deleted_roles.add(key)
                elif call.op == "CreateRole":
                    self.deleted_roles.discard(key)
        elif call.service == "lambda":
            self.after_lambda(call)
        elif call.service == "ec2":
            if call.op == "DeleteNetworkInterface":
                with self.e.lock:
                    self.enis.pop(call.params.get("NetworkInterfaceId"), None)
            elif call.op == "DescribeNetworkInterfaces" and not ans.header("Content-Encoding"):
                return ans.copy(self.rewrite_describe(call, ans.body))
        return ans

    def after_lambda(self, call):
        req = call.json()
        if call.name == "CreateFunction" and req.get("FunctionName"):
            fn = lambda_function_name(req["FunctionName"])
            combos = self.combos(req.get("VpcConfig"))
            role = role_name(req.get("Role"))
            with self.e.lock:
                self.functions[(call.account, call.region, fn)] = {"combos": combos, "role": role}
            self.attach(call, fn, combos, role)
        elif call.name == "UpdateFunctionConfiguration":
            fn = self.function_of(call)
            key = (call.account, call.region, fn)
            with self.e.lock:
                rec = self.functions.setdefault(key, {"combos": set(), "role": None})
                if req.get("Role"):
                    rec["role"] = role_name(req["Role"])
                old = set(rec["combos"])
                new = self.combos(req["VpcConfig"]) if "VpcConfig" in req else old
                rec["combos"] = new
                role = rec["role"]
            self.release(call.account, call.region, fn, old - new, call.now)
            self.attach(call, fn, new - old, role)
        elif call.name == "DeleteFunction" and "Qualifier" not in call.params:
            fn = self.function_of(call)
            with self.e.lock:
                rec = self.functions.pop((call.account, call.region, fn), None)
            if rec:
                self.release(call.account, call.region, fn, rec["combos"], call.now)

    def take_filters(self, call):
        """moto filters on its own status and type: the filters on values this rule rewrites are
        applied after the rewrite instead (moto gets the request without them)."""
        filters = call.filters()
        taken = {k: v for k, v in filters.items() if k in self.REWRITTEN_FILTERS}
        if not taken:
            return
        call.key[self.name] = taken
        params = {k: v for k, v in call.params.items() if not k.startswith("Filter.")}
        kept = [(k, v) for k, v in filters.items() if k not in taken]
        for i, (name, values) in enumerate(kept, 1):
            params[f"Filter.{i}.Name"] = name
            params.update({f"Filter.{i}.Value.{j}": v for j, v in enumerate(values, 1)})
        call.forward_params(params)

    def rewrite_describe(self, call, body):
        taken = call.key.get(self.name, {})

        def keep(item, q):
            for name, values in taken.items():
                tag = {"status": "status", "interface-type": "interfaceType", "requester-managed": "requesterManaged"}[name]
                if item.findtext(q(tag)) not in values:
                    return False
            return True

        def edit(root, q):
            changed = False
            for s in root.iter(q("networkInterfaceSet")):
                for item in list(s.findall(q("item"))):
                    with self.e.lock:
                        eni = self.enis.get(item.findtext(q("networkInterfaceId")))
                        status = self.status(eni, call.now) if eni else item.findtext(q("status"))
                    if eni:
                        for tag, value in (("status", status), ("interfaceType", "lambda"),
                                           ("requesterManaged", "true")):
                            el = item.find(q(tag))
                            if el is None:
                                el = ET.SubElement(item, q(tag))
                            el.text = value
                        changed = True
                    if taken and not keep(item, q):
                        s.remove(item)
                        changed = True
            return changed
        return xml_edit(body, edit)

    def sweep(self, now):
        with self.e.lock:
            due = [e for e in self.enis.values() if e["released"] is not None and not e["users"]
                   and now >= e["released"] + self.d("delete_s")
                   and (e["account"], e["role"]) not in self.deleted_roles]
        for eni in due:
            status, body = self.e.query("ec2", eni["region"], eni["account"], {
                "Action": "DeleteNetworkInterface", "Version": "2016-11-15", "NetworkInterfaceId": eni["id"]})
            if 200 <= status < 300 or b"NotFound" in body:
                with self.e.lock:
                    if self.enis.get(eni["id"]) is eni and not eni["users"]:
                        del self.enis[eni["id"]]

    def state(self):
        now = self.e.clock()
        with self.e.lock:
            return {"enis": [{"id": e["id"], "region": e["region"], "subnet": e["subnet"],
                              "groups": sorted(e["groups"]), "users": sorted(e["users"]),
                              "status": self.status(e, now)} for e in self.enis.values()]}


class RdsStateMachine(Rule):
    """RDS instances pass through the statuses AWS shows (moto shows `available` at once):
    CreateDBInstance / CreateDBInstanceReadReplica -> `creating` (`create_s`) then `backing-up`
    (`backup_s`; skipped when BackupRetentionPeriod is 0) then `available`; ModifyDBInstance with
    ApplyImmediately -> `modifying` (`modify_s`); RebootDBInstance -> `rebooting` (`reboot_s`);
    PromoteReadReplica -> `modifying` (`promote_s`) with ReadReplicaSourceDBInstanceIdentifier still
    set, then `available` without it, and the source no longer lists the replica in
    ReadReplicaDBInstanceIdentifiers (moto keeps both forever). DBInstanceStatus is rewritten in
    every RDS answer. ModifyDBInstance ("Database instance is not in available state."),
    PromoteReadReplica, RebootDBInstance, StopDBInstance, CreateDBSnapshot and
    CreateDBInstanceReadReplica on its source ("Instance <id> is not in available state.") answer
    400 InvalidDBInstanceState while the instance is in a transitional status; PromoteReadReplica
    of an instance already promoted answers 400 InvalidDBInstanceState ("DB Instance is not a read
    replica."; moto promotes it again), and of two promotions of one instance at once, the second
    is refused as the first's `modifying`. `rds_hold`, when set, gives the `creating` and
    `modifying` durations.

    AWS: "Viewing Amazon RDS DB instance status" https://docs.aws.amazon.com/AmazonRDS/latest/UserGuide/accessing-monitoring.html#Overview.DBInstance.Status
    AWS: "Promoting a read replica to be a standalone DB instance" https://docs.aws.amazon.com/AmazonRDS/latest/UserGuide/USER_ReadRepl.Promote.html
    AWS: "ModifyDBInstance (Amazon RDS API Reference): InvalidDBInstanceState" https://docs.aws.amazon.com/AmazonRDS/latest/APIReference/API_ModifyDBInstance.html
    See: "InvalidDBInstanceState texts as AWS sends them (cloud-custodian #178, #1687; terraform-provider-aws #31594)" https://github.com/hashicorp/terraform-provider-aws/issues/31594
    See: "A second promotion: InvalidDBInstanceState 'DB Instance is not a read replica' (amazon.aws module_utils/rds.py handle_errors)" https://github.com/ansible-collections/amazon.aws/blob/main/plugins/module_utils/rds.py
    """
    name = "rds-state-machine"
    params = {"create_s": 1.0, "backup_s": 0.5, "modify_s": 1.0, "reboot_s": 0.5, "promote_s": 1.0}
    REFUSED = {"ModifyDBInstance": "DBInstanceIdentifier", "PromoteReadReplica": "DBInstanceIdentifier",
               "RebootDBInstance": "DBInstanceIdentifier", "StopDBInstance": "DBInstanceIdentifier",
               "CreateDBSnapshot": "DBInstanceIdentifier",
               "CreateDBInstanceReadReplica": "SourceDBInstanceIdentifier"}

    def before(self, call):
        field = self.REFUSED.get(call.op) if call.service == "rds" else None
        if not field or not call.params.get(field):
            return None
        key = parse_rds_arn(call.params[field], call.region, call.account)
        if call.op == "PromoteReadReplica" and self.e.rds.promoted(key, call.now):
            # A promoted replica is a standalone instance: a second promotion (by another actor
            # that read the replica before the first) is refused, not repeated.
            return aws_error(call, 400, "InvalidDBInstanceState", "DB Instance is not a read replica.")
        status = self.e.rds.transitional(key, call.now)
        msg = ("Database instance is not in available state." if call.op == "ModifyDBInstance"
               else f"Instance {key[2]} is not in available state.")
        if not status and call.op == "PromoteReadReplica":
            # RDS serialises an instance's operations: of two promotions at the same moment (the
            # alarm's invocation and the schedule's), one is taken, the other refused.
            with self.e.lock:
                if key in self.promoting:
                    status = "modifying"
                else:
                    self.promoting.add(key)
                    call.key[self.name] = key
        if not status:
            return None
        return aws_error(call, 400, "InvalidDBInstanceState", msg)

    def reset(self):
        self.promoting = set()  # PromoteReadReplica calls being answered

    def done(self, call):
        key = call.key.pop(self.name, None)
        if key:
            with self.e.lock:
                self.promoting.discard(key)


class RdsEngineRules(Rule):
    """What RDS refuses for PostgreSQL and for read replicas (moto accepts all three):
    CreateDBInstanceReadReplica with DBParameterGroupName for a PostgreSQL source answers
    InvalidParameterCombination ("A parameter group can't be specified during Read Replica
    creation for the following DB engine: postgres"; the API reference supports it only for MySQL
    cross-Region, Oracle, Db2 and Multi-AZ DB cluster replicas); DeleteDBInstance of a read replica
    with FinalDBSnapshotIdentifier answers InvalidParameterCombination ("FinalDBSnapshotIdentifier
    can not be specified when deleting a replica instance"); ModifyDBInstance with
    BackupRetentionPeriod > 0 on a PostgreSQL read replica answers InvalidDBInstanceState ("DB
    Backups not supported on a read replica for engine postgres": a PostgreSQL replica takes manual
    snapshots but no automated backups). A promoted replica is no longer a replica.

    AWS: "CreateDBInstanceReadReplica (Amazon RDS API Reference): DBParameterGroupName" https://docs.aws.amazon.com/AmazonRDS/latest/APIReference/API_CreateDBInstanceReadReplica.html
    AWS: "DeleteDBInstance (Amazon RDS API Reference): FinalDBSnapshotIdentifier, SkipFinalSnapshot" https://docs.aws.amazon.com/AmazonRDS/latest/APIReference/API_DeleteDBInstance.html
    AWS: "Working with DB instance read replicas: can backups be performed on the replica?" https://docs.aws.amazon.com/AmazonRDS/latest/UserGuide/USER_ReadRepl.Overview.Differences.html
    See: "terraform-provider-aws #38056 (parameter group on a cross-Region PostgreSQL replica)" https://github.com/hashicorp/terraform-provider-aws/issues/38056
    See: "terraform-provider-aws #4276 (final snapshot of a replica)" https://github.com/hashicorp/terraform-provider-aws/issues/4276
    """
    name = "rds-engine-rules"
    PARAMETER_GROUP = "A parameter group can't be specified during Read Replica creation for the following DB engine: {}"
    FINAL_SNAPSHOT = "FinalDBSnapshotIdentifier can not be specified when deleting a replica instance"
    BACKUPS = "DB Backups not supported on a read replica for engine {}"
    PARAMETER_GROUP_ENGINES = ("postgres",)
    NO_REPLICA_BACKUP_ENGINES = ("postgres",)

    def describe(self, key):
        status, body = self.e.query("rds", key[1], key[0], {
            "Action": "DescribeDBInstances", "Version": "2014-10-31", "DBInstanceIdentifier": key[2]})
        if not 200 <= status < 300:
            return None
        return {"engine": xml_first(body, "Engine"),
                "source": xml_first(body, "ReadReplicaSourceDBInstanceIdentifier")}

    def is_replica(self, key, info):
        return bool(info and info["source"]) and not self.e.rds.promoted(key, self.e.clock())

    def before(self, call):
        if call.service != "rds":
            return None
        p = call.params
        if call.op == "CreateDBInstanceReadReplica" and p.get("DBParameterGroupName") and p.get("SourceDBInstanceIdentifier"):
            info = self.describe(parse_rds_arn(p["SourceDBInstanceIdentifier"], call.region, call.account))
            if info and info["engine"] in self.PARAMETER_GROUP_ENGINES:
                return aws_error(call, 400, "InvalidParameterCombination", self.PARAMETER_GROUP.format(info["engine"]))
        elif call.op == "DeleteDBInstance" and p.get("FinalDBSnapshotIdentifier") and p.get("DBInstanceIdentifier"):
            key = (call.account, call.region, p["DBInstanceIdentifier"])
            if self.is_replica(key, self.describe(key)):
                return aws_error(call, 400, "InvalidParameterCombination", self.FINAL_SNAPSHOT)
        elif call.op == "ModifyDBInstance" and p.get("DBInstanceIdentifier") and p.get("BackupRetentionPeriod", "0") not in ("", "0"):
            key = (call.account, call.region, p["DBInstanceIdentifier"])
            info = self.describe(key)
            if self.is_replica(key, info) and info["engine"] in self.NO_REPLICA_BACKUP_ENGINES:
                return aws_error(call, 400, "InvalidDBInstanceState", self.BACKUPS.format(info["engine"]))
        return None


class SecretsReplication(Rule):
    """A secret's replica Regions are `InProgress` in DescribeSecret (and CreateSecret,
    ReplicateSecretToRegions answers) for `window_s` after CreateSecret with AddReplicaRegions or
    ReplicateSecretToRegions, then `InSync` (moto says InSync at once). A replica Region that
    already holds a secret of that name ends `Failed` with StatusMessage "Secret with this name
    already exists in this region" (moto fails it too, but with a message about a secret named
    "simple").

    AWS: "ReplicateSecretToRegions (AWS Secrets Manager API Reference)" https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_ReplicateSecretToRegions.html
    AWS: "aws secretsmanager replicate-secret-to-regions (example output: InProgress)" https://docs.aws.amazon.com/cli/latest/reference/secretsmanager/replicate-secret-to-regions.html
    AWS: "ReplicationStatusType (AWS Secrets Manager API Reference)" https://docs.aws.amazon.com/secretsmanager/latest/apireference/API_ReplicationStatusType.html
    AWS: "Troubleshoot AWS Secrets Manager replication: a secret with the same name exists in the selected Region" https://docs.aws.amazon.com/secretsmanager/latest/userguide/replicate-secrets_troubleshoot.html
    """
    name = "secrets-replication"
    params = {"window_s": 1.0}
    OPS = {"CreateSecret", "DescribeSecret", "ReplicateSecretToRegions", "RemoveRegionsFromReplication", "ListSecrets"}
    EXISTS = "Secret with this name already exists in this region"

    def reset(self):
        self.started = {}  # (account, primary region, name, replica region) -> start

    @staticmethod
    def secret_name(value):
        m = re.match(r"^arn:aws[a-z-]*:secretsmanager:[^:]+:[^:]*:secret:(.+)-[A-Za-z0-9]{6}$", value or "")
        return m.group(1) if m else value

    def after(self, call, ans):
        if call.service != "secretsmanager" or call.op not in self.OPS or not ans.ok:
            return ans
        try:
            obj = json.loads(ans.body)
        except ValueError:
            return ans
        req = call.json()
        fallback = req.get("Name") or self.secret_name(req.get("SecretId"))
        if call.op in ("CreateSecret", "ReplicateSecretToRegions"):
            with self.e.lock:
                for st in obj.get("ReplicationStatus") or []:
                    self.started[(call.account, call.region, fallback, st.get("Region"))] = call.now
        changed = False
        for entry in [obj] + list(obj.get("SecretList") or []):
            if not isinstance(entry, dict) or not entry.get("ReplicationStatus"):
                continue
            name = entry.get("Name") or fallback
            primary = entry.get("PrimaryRegion") or call.region
            for st in entry["ReplicationStatus"]:
                msg = st.get("StatusMessage") or ""
                if st.get("Status") == "Failed" and "already exists" in msg and msg != self.EXISTS:
                    st["StatusMessage"] = self.EXISTS
                    changed = True
                with self.e.lock:
                    t0 = self.started.get((call.account, primary, name, st.get("Region")))
                if t0 is not None and call.now < t0 + self.d("window_s"):
                    st["Status"] = "InProgress"
                    st.pop("StatusMessage", None)
                    changed = True
        return ans.copy(json.dumps(obj).encode()) if changed else ans


class LambdaCodeLocation(Rule):
    """GetFunction answers `Code.Location`, a presigned URL from which the deployment package can
    be downloaded (moto gives none for a package uploaded as `ZipFile`). Here the URL is the
    proxy's `/__proxy/lambda-code/<account>/<region>/<function>`, serving the last package
    CreateFunction or UpdateFunctionCode uploaded: what the DR harness runs is the code pgdr
    deployed, read back as one would from AWS.

    AWS: "GetFunction (AWS Lambda API Reference): Code" https://docs.aws.amazon.com/lambda/latest/api/API_GetFunction.html
    AWS: "FunctionCodeLocation: Location, a presigned URL" https://docs.aws.amazon.com/lambda/latest/api/API_FunctionCodeLocation.html
    """
    name = "lambda-code-location"

    def reset(self):
        self.packages = {}  # (account, region, function) -> zip bytes

    def package(self, account, region, name):
        with self.e.lock:
            return self.packages.get((account, region, name))

    def after(self, call, ans):
        if call.service != "lambda" or not ans.ok:
            return ans
        m = re.match(r"^/2015-03-31/functions/([^/]+)", call.url_path)
        if call.name == "CreateFunction":
            req = call.json()
            zipped = (req.get("Code") or {}).get("ZipFile")
            key = (call.account, call.region, lambda_function_name(req.get("FunctionName", "")))
        elif call.name == "UpdateFunctionCode" and m:
            zipped = call.json().get("ZipFile")
            key = (call.account, call.region, lambda_function_name(m.group(1)))
        elif call.name == "DeleteFunction" and m:
            with self.e.lock:
                self.packages.pop((call.account, call.region, lambda_function_name(m.group(1))), None)
            return ans
        elif call.name == "GetFunction" and m:
            name = lambda_function_name(m.group(1))
            if self.package(call.account, call.region, name) is None:
                return ans
            try:
                obj = json.loads(ans.body)
            except ValueError:
                return ans
            host = call.headers.get("Host") or "127.0.0.1"
            obj["Code"] = {"RepositoryType": "S3",
                           "Location": f"http://{host}/__proxy/lambda-code/{call.account}/{call.region}/{name}"}
            return ans.copy(json.dumps(obj).encode())
        else:
            return ans
        if zipped:
            import base64
            with self.e.lock:
                self.packages[key] = base64.b64decode(zipped)
        return ans


class LambdaFunctionStates(Rule):
    """A function with a VpcConfig is `Pending` for `pending_s` after CreateFunction while Lambda
    sets up its network interfaces (State `Pending`, StateReason "The function is being
    created.", StateReasonCode `Creating`, LastUpdateStatus `InProgress`), then `Active` with
    LastUpdateStatus `Successful`; moto says `Active` at once. An update of such a function
    (UpdateFunctionConfiguration, UpdateFunctionCode) shows LastUpdateStatus `InProgress` for
    `update_s` while State stays `Active` (invocations go on with the previous configuration).
    Rewritten in the CreateFunction, GetFunction, GetFunctionConfiguration, ListFunctions and
    Update* answers. When the proxy answers Invoke itself (its invoke hook, `/__proxy/invoke-hook`),
    Invoke of a function that does not exist answers 404 ResourceNotFoundException ("Function
    not found: <arn>") and of a function whose State is not `Active` 409 ResourceConflictException
    ("The operation cannot be performed at this time. The function is currently in the following
    state: Pending").

    AWS: "Lambda function states (Pending: Lambda does not invoke a function during pending state)" https://docs.aws.amazon.com/lambda/latest/dg/functions-states.html
    AWS: "UpdateFunctionConfiguration: a VPC function's update can take a minute; it can still be invoked" https://docs.aws.amazon.com/lambda/latest/api/API_UpdateFunctionConfiguration.html
    AWS: "Invoke (AWS Lambda API Reference): ResourceConflictException 409, ResourceNotFoundException 404" https://docs.aws.amazon.com/lambda/latest/api/API_Invoke.html
    See: "Invoke of a Pending function, the message as AWS sends it (remotion-dev/remotion #1186)" https://github.com/remotion-dev/remotion/issues/1186
    """
    name = "lambda-function-states"
    params = {"pending_s": 1.0, "update_s": 0.5}
    CREATING = "The function is being created."
    REASONS = ("StateReason", "StateReasonCode", "LastUpdateStatusReason", "LastUpdateStatusReasonCode")
    SHOWN = {"CreateFunction", "GetFunction", "GetFunctionConfiguration", "ListFunctions",
             "UpdateFunctionConfiguration", "UpdateFunctionCode"}

    def reset(self):
        self.functions = {}  # (account, region, name) -> {"vpc", "pending_until", "updating_until"}

    def view(self, account, region, name, now):
        """The fields the function shows now (None: not tracked, moto's answer stands)."""
        with self.e.lock:
            rec = self.functions.get((account, region, name))
            if rec is None:
                return None
            pending = now < rec["pending_until"]
            updating = now < rec["updating_until"]
        if pending:
            return {"State": "Pending", "StateReason": self.CREATING, "StateReasonCode": "Creating",
                    "LastUpdateStatus": "InProgress", "LastUpdateStatusReason": self.CREATING,
                    "LastUpdateStatusReasonCode": "Creating"}
        if updating:
            # As the user guide's example of a function being updated shows it.
            return {"State": "Active", "LastUpdateStatus": "InProgress",
                    "LastUpdateStatusReason": self.CREATING, "LastUpdateStatusReasonCode": "Creating"}
        return {"State": "Active", "LastUpdateStatus": "Successful"}

    def state_of(self, account, region, name, now):
        v = self.view(account, region, name, now)
        return v["State"] if v else None

    def after(self, call, ans):
        if call.service != "lambda" or not ans.ok:
            return ans
        if call.name == "DeleteFunction" and "Qualifier" not in call.params:
            with self.e.lock:
                self.functions.pop((call.account, call.region, LambdaVpcEnis.function_of(call)), None)
            return ans
        if call.name not in self.SHOWN:
            return ans
        req = call.json() if call.name in ("CreateFunction", "UpdateFunctionConfiguration") else {}
        now = call.now
        if call.name == "CreateFunction":
            name = lambda_function_name(req.get("FunctionName", ""))
            if (req.get("VpcConfig") or {}).get("SubnetIds"):
                with self.e.lock:
                    self.functions[(call.account, call.region, name)] = {
                        "vpc": True, "pending_until": now + self.d("pending_s"), "updating_until": 0.0}
            else:
                with self.e.lock:
                    self.functions.pop((call.account, call.region, name), None)
        elif call.name in ("UpdateFunctionConfiguration", "UpdateFunctionCode"):
            key = (call.account, call.region, LambdaVpcEnis.function_of(call))
            with self.e.lock:
                rec = self.functions.get(key)
                to_vpc = bool((req.get("VpcConfig") or {}).get("SubnetIds"))
                if rec is None and to_vpc:
                    rec = self.functions[key] = {"vpc": True, "pending_until": 0.0, "updating_until": 0.0}
                if rec is not None:
                    rec["updating_until"] = now + self.d("update_s")
                    if "VpcConfig" in req:
                        rec["vpc"] = to_vpc
        try:
            obj = json.loads(ans.body)
        except ValueError:
            return ans
        if not isinstance(obj, dict):
            return ans
        if call.name == "ListFunctions":
            confs = [c for c in obj.get("Functions") or [] if isinstance(c, dict)]
        elif call.name == "GetFunction":
            confs = [obj["Configuration"]] if isinstance(obj.get("Configuration"), dict) else []
        else:
            confs = [obj]
        changed = False
        for conf in confs:
            v = self.view(call.account, call.region, conf.get("FunctionName") or "", now)
            if v is None:
                continue
            for k in self.REASONS:
                conf.pop(k, None)
            conf.update(v)
            changed = True
        return ans.copy(json.dumps(obj).encode()) if changed else ans

    def invoke_refusal(self, call, name):
        """What Lambda answers instead of running the function, or None (it runs)."""
        status, body = self.e.lambda_configuration(call, name)
        arn = f"arn:aws:lambda:{call.region}:{call.account}:function:{name}"
        if status == 404:
            return aws_error(call, 404, "ResourceNotFoundException", f"Function not found: {arn}")
        if not 200 <= status < 300:
            return aws_error(call, 500, "ServiceException", f"emuproxy: GetFunctionConfiguration of {name} "
                             f"answered {status}", sender=False)
        state = self.state_of(call.account, call.region, name, call.now) if self.e.on(self.name) else None
        if state is None:
            try:
                state = json.loads(body).get("State") or "Active"
            except (ValueError, AttributeError):
                state = "Active"
        if state != "Active":
            return aws_error(call, 409, "ResourceConflictException", "The operation cannot be performed at "
                             f"this time. The function is currently in the following state: {state}")
        return None

    def state(self):
        now = self.e.clock()
        with self.e.lock:
            keys = list(self.functions)
        return {"functions": [{"region": k[1], "name": k[2], **(self.view(*k, now) or {})} for k in keys]}


def s3_bucket_key(call):
    """(bucket, key) of a path-style S3 request; key is '' for a bucket request."""
    parts = call.url_path.lstrip("/").split("/", 1)
    return parts[0], (parts[1] if len(parts) > 1 else "")


class S3ResponseShapes(Rule):
    """S3 answers in the shapes the S3 API reference gives, where moto's differ: GetBucketVersioning
    answers a `VersioningConfiguration` root (moto: `GetBucketVersioningResponse`, which the SDK
    refuses to parse).

    AWS: "GetBucketVersioning (Amazon S3 API Reference): response syntax" https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetBucketVersioning.html
    """
    name = "s3-response-shapes"

    def after(self, call, ans):
        if call.service != "s3" or call.method != "GET" or "versioning" not in call.params or not ans.ok:
            return ans
        body = re.sub(rb"<(/?)GetBucketVersioningResponse\b", rb"<\1VersioningConfiguration", ans.body)
        return ans.copy(body) if body != ans.body else ans


class S3BucketRegion(Rule):
    """A request for a bucket signed for another Region than the bucket's is refused with `301
    PermanentRedirect` and an `x-amz-bucket-region` header naming the bucket's Region (HeadBucket:
    the status and the header, no body); moto serves every bucket from every Region. A client must
    look the Region up (HeadBucket) and use it, never assume it.

    AWS: "HeadBucket (Amazon S3 API Reference): x-amz-bucket-region" https://docs.aws.amazon.com/AmazonS3/latest/API/API_HeadBucket.html
    AWS: "Making requests: Regions and endpoints, PermanentRedirect" https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html
    """
    name = "s3-bucket-region"

    def reset(self):
        self.regions = {}  # bucket -> region

    def bucket_region(self, bucket):
        with self.e.lock:
            if bucket in self.regions:
                return self.regions[bucket]
        auth = ("AWS4-HMAC-SHA256 Credential=emuproxy/20260101/us-east-1/s3/aws4_request, "
                "SignedHeaders=host, Signature=0")
        status, headers, _ = self.e.send("HEAD", f"/{urllib.parse.quote(bucket)}", {"Authorization": auth}, b"")
        pairs = headers.items() if hasattr(headers, "items") else headers
        region = next((v for k, v in pairs if k.lower() == "x-amz-bucket-region"), None) if status == 200 else None
        if region:
            with self.e.lock:
                self.regions[bucket] = region
        return region

    def before(self, call):
        if call.service != "s3" or not call.region:
            return None
        bucket, key = s3_bucket_key(call)
        if not bucket or (call.method == "PUT" and not key and not call.params):  # ListBuckets, CreateBucket
            return None
        if call.method == "DELETE" and not key and not call.params:  # DeleteBucket: forget its region
            with self.e.lock:
                self.regions.pop(bucket, None)
            return None
        region = self.bucket_region(bucket)
        if not region or region == call.region:
            return None
        headers = [("x-amz-bucket-region", region)]
        if call.method == "HEAD":
            return Answer(301, headers, b"", reason="Moved Permanently")
        ans = aws_error(call, 301, "PermanentRedirect",
                        "The bucket you are attempting to access must be addressed using the specified endpoint.")
        ans.headers += headers
        return ans


class S3SecureTransport(Rule):
    """Requests through the emulator stand for the HTTPS requests the SDK sends to S3
    (`aws:SecureTransport` is true), and a bucket-policy Deny applies only when its Condition
    holds; moto ignores the Condition and would deny every request under a TLS-only policy (Deny
    when `aws:SecureTransport` is false). The proxy keeps Deny statements whose only condition is
    `aws:SecureTransport: false` out of moto's copy and answers GetBucketPolicy with the policy as
    it was put.

    AWS: "Policy examples: managing access based on HTTP or HTTPS requests (aws:SecureTransport)" https://docs.aws.amazon.com/AmazonS3/latest/userguide/example-bucket-policies.html
    AWS: "IAM JSON policy elements: Condition" https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_elements_condition.html
    """
    name = "s3-secure-transport"

    def reset(self):
        self.policies = {}  # bucket -> the policy as put

    @staticmethod
    def tls_only(stmt):
        cond = stmt.get("Condition") or {}
        return (stmt.get("Effect") == "Deny" and list(cond) == ["Bool"]
                and {k.lower(): str(v).lower() for k, v in cond["Bool"].items()} == {"aws:securetransport": "false"})

    def before(self, call):
        if call.service != "s3" or "policy" not in call.params:
            return None
        bucket, key = s3_bucket_key(call)
        if key:
            return None
        if call.method == "PUT":
            try:
                doc = json.loads(call.body)
            except ValueError:
                return None
            stmts = doc.get("Statement") if isinstance(doc, dict) else None
            if isinstance(stmts, dict):
                stmts = [stmts]
            if not isinstance(stmts, list):
                return None
            kept = [st for st in stmts if not (isinstance(st, dict) and self.tls_only(st))]
            with self.e.lock:
                self.policies[bucket] = call.body
            if len(kept) == len(stmts):
                return None
            if not kept:  # moto refuses an empty policy: an Allow that matches nothing stands in
                kept = [{"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{call.account}:root"},
                         "Action": "s3:GetBucketTagging", "Resource": f"arn:aws:s3:::{bucket}"}]
            call.forward_body = json.dumps({**doc, "Statement": kept}).encode()
        elif call.method == "DELETE":
            with self.e.lock:
                self.policies.pop(bucket, None)
        return None

    def after(self, call, ans):
        if call.service != "s3" or call.method != "GET" or "policy" not in call.params or not ans.ok:
            return ans
        with self.e.lock:
            put = self.policies.get(s3_bucket_key(call)[0])
        return ans.copy(put) if put is not None else ans


class S3ConditionalConflict(Rule):
    """A conditional write or delete (`If-Match`, `If-None-Match`) can meet a concurrent one on the
    same key and answer `409 ConditionalRequestConflict`, which S3 says to retry; moto never does.
    Here the first conditional request on each key (each lock, each state object) is answered 409
    once, so a client that does not retry fails every time.

    AWS: "How to prevent object overwrites with conditional writes: 409 ConditionalRequestConflict" https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-writes.html
    AWS: "How to perform conditional deletes" https://docs.aws.amazon.com/AmazonS3/latest/userguide/conditional-deletes.html
    """
    name = "s3-conditional-conflict"

    def reset(self):
        self.seen = set()  # (bucket, key) already answered 409

    def before(self, call):
        if call.service != "s3" or call.method not in ("PUT", "DELETE"):
            return None
        if not (call.headers.get("If-Match") or call.headers.get("If-None-Match")):
            return None
        bucket, key = s3_bucket_key(call)
        with self.e.lock:
            if (bucket, key) in self.seen:
                return None
            self.seen.add((bucket, key))
        return aws_error(call, 409, "ConditionalRequestConflict",
                         "A conflicting conditional operation is currently in progress against this resource. Please try again.")


RULES = [Throttling, PriorRequestNotComplete, Route53HealthCheckAlarm, Ec2ClientToken, Ec2EventualConsistency,
         Ec2PeeringLateInAccepter, IamPropagation, LambdaVpcEnis, LambdaFunctionStates, RdsStateMachine, RdsEngineRules,
         SecretsReplication, S3BucketRegion, S3SecureTransport, S3ConditionalConflict, S3ResponseShapes,
         LambdaCodeLocation]
# answers are rewritten in this order; the client-token cache keeps the final answer
AFTER_ORDER = ["prior-request-not-complete", "route53-health-check-alarm", "ec2-eventual-consistency",
               "ec2-peering-late-in-accepter", "iam-propagation", "lambda-vpc-enis", "lambda-function-states",
               "secrets-replication",
               "s3-response-shapes", "s3-secure-transport", "lambda-code-location", "ec2-client-token"]


# ---------------------------------------------------------------------------------------------
# RDS statuses: the machinery behind `rds_hold`, `/__proxy/rds_status` and rds-state-machine

class RdsTracker:
    """Per (account, region, id): a list of automatic phases [(status, until)] shown while moto
    says `available`, a forced status (any moto status; `/__proxy/rds_status`), and promotions."""
    TRANSITIONAL = {"creating", "backing-up", "modifying", "rebooting", "deleting", "upgrading", "renaming",
                    "resetting-master-credentials", "starting", "stopping", "maintenance", "delete-precheck",
                    "moving-to-vpc", "configuring-enhanced-monitoring", "configuring-iam-database-auth",
                    "configuring-log-exports", "converting-to-vpc"}
    STATUS_OPS = {"CreateDBInstance", "CreateDBInstanceReadReplica", "ModifyDBInstance", "PromoteReadReplica",
                  "RebootDBInstance", "DeleteDBInstance"}
    DBI_RE = re.compile(rb"<DBInstance>.*?</DBInstance>", re.S)
    ID_RE = re.compile(rb"<DBInstanceIdentifier>([^<]*)</DBInstanceIdentifier>")
    STATUS_RE = re.compile(rb"<DBInstanceStatus>([^<]*)</DBInstanceStatus>")
    SOURCE_RE = re.compile(rb"<ReadReplicaSourceDBInstanceIdentifier>[^<]*</ReadReplicaSourceDBInstanceIdentifier>")
    REPLICA_RE = re.compile(rb"<ReadReplicaDBInstanceIdentifier>([^<]*)</ReadReplicaDBInstanceIdentifier>")

    def __init__(self, engine):
        self.e = engine
        self.legacy = None  # {"create_s", "modify_s"} from the rds_hold config key
        self.reset()

    def reset(self):
        self.phases = {}     # key -> [(status, until)]
        self.forced = {}     # key -> (status, until or None)
        self.promotions = {}  # key -> time the promotion is done

    @staticmethod
    def norm(key):
        return (key[0] or DEFAULT_ACCOUNT, key[1], key[2])

    def force(self, key, status, for_s):
        key = self.norm(key)
        with self.e.lock:
            if status is None:
                self.forced.pop(key, None)
            else:
                self.forced[key] = (status, None if for_s is None else self.e.clock() + float(for_s))

    def _expire(self, now):
        for key in [k for k, (_, u) in self.forced.items() if u is not None and u <= now]:
            del self.forced[key]
        for key, ph in list(self.phases.items()):
            ph = [p for p in ph if p[1] > now]
            if ph:
                self.phases[key] = ph
            else:
                del self.phases[key]

    def phase(self, key, now):
        with self.e.lock:
            self._expire(now)
            ph = self.phases.get(self.norm(key))
            return ph[0][0] if ph else None

    def transitional(self, key, now):
        """The transitional status the instance shows, if any (forced statuses included)."""
        with self.e.lock:
            self._expire(now)
            forced = self.forced.get(self.norm(key))
        if forced and forced[0] in self.TRANSITIONAL:
            return forced[0]
        return self.phase(key, now)

    def promoted(self, key, now):
        with self.e.lock:
            t = self.promotions.get(self.norm(key))
        return t is not None and now >= t

    def holds(self):
        now = self.e.clock()
        with self.e.lock:
            self._expire(now)
            out = [{"account": k[0], "region": k[1], "id": k[2], "status": s, "until": u, "only_available": False}
                   for k, (s, u) in self.forced.items()]
            out += [{"account": k[0], "region": k[1], "id": k[2], "status": ph[0][0], "until": ph[0][1],
                     "only_available": True} for k, ph in self.phases.items()]
            return out

    def plan(self, call, machine):
        """The phases an operation starts: [(status, seconds)]."""
        legacy, op, p = self.legacy, call.op, call.params
        rule = self.e.rules["rds-state-machine"]
        if not machine:
            if not legacy:
                return []
            if op in ("CreateDBInstance", "CreateDBInstanceReadReplica"):
                return [("creating", legacy["create_s"])]
            if op in ("ModifyDBInstance", "PromoteReadReplica"):
                return [("modifying", legacy["modify_s"])]
            return []
        if op in ("CreateDBInstance", "CreateDBInstanceReadReplica"):
            create = legacy["create_s"] if legacy else rule.d("create_s")
            backup = 0 if p.get("BackupRetentionPeriod") == "0" else rule.d("backup_s")
            return [("creating", create), ("backing-up", backup)]
        if op == "ModifyDBInstance" and (legacy or p.get("ApplyImmediately") == "true"):
            return [("modifying", legacy["modify_s"] if legacy else rule.d("modify_s"))]
        if op == "PromoteReadReplica":
            return [("modifying", legacy["modify_s"] if legacy else rule.d("promote_s"))]
        if op == "RebootDBInstance":
            return [("rebooting", rule.d("reboot_s"))]
        return []

    def note(self, call, ans, machine):
        ident = call.params.get("DBInstanceIdentifier")
        if call.service != "rds" or call.op not in self.STATUS_OPS or not ans.ok or not ident:
            return
        key = (call.account, call.region, ident)
        now = call.now
        with self.e.lock:
            if call.op == "DeleteDBInstance":
                self.phases.pop(key, None)
                self.forced.pop(key, None)
                self.promotions.pop(key, None)
                return
            t, phases = now, []
            for status, secs in self.plan(call, machine):
                if secs > 0:
                    t += secs
                    phases.append((status, t))
            if phases:
                self.phases[key] = phases
            if call.op == "PromoteReadReplica":
                self.promotions[key] = t
            elif call.op in ("CreateDBInstance", "CreateDBInstanceReadReplica"):
                self.promotions.pop(key, None)

    def rewrite(self, call, body, machine):
        """Statuses per the phases and forced statuses; after a promotion (rds-state-machine on),
        no ReadReplicaSourceDBInstanceIdentifier on the promoted instance and no promoted replica
        in its source's ReadReplicaDBInstanceIdentifiers."""
        if b"<DBInstance>" not in body:
            return body
        now = call.now
        with self.e.lock:
            self._expire(now)
            forced = {k[2]: v for k, v in self.forced.items() if k[:2] == (call.account, call.region)}
            phases = {k[2]: v for k, v in self.phases.items() if k[:2] == (call.account, call.region)}
            done = [k for k, t in self.promotions.items() if now >= t] if machine else []
        done_here = {k[2] for k in done if k[:2] == (call.account, call.region)}
        done_refs = {f"arn:aws:rds:{k[1]}:{k[0]}:db:{k[2]}".encode() for k in done}
        done_refs |= {d.encode() for d in done_here}
        if not (forced or phases or done):
            return body

        def one(m):
            elem = m.group(0)
            idm = self.ID_RE.search(elem)
            ident = idm.group(1).decode() if idm else None

            def status(sm):
                if ident in forced:
                    new = forced[ident][0]
                elif ident in phases and sm.group(1) == b"available":
                    new = phases[ident][0][0]
                else:
                    return sm.group(0)
                return b"<DBInstanceStatus>" + new.encode() + b"</DBInstanceStatus>"
            elem = self.STATUS_RE.sub(status, elem, count=1)
            if ident in done_here:
                elem = self.SOURCE_RE.sub(b"", elem)
            if done_refs:
                elem = self.REPLICA_RE.sub(lambda r: b"" if r.group(1) in done_refs else r.group(0), elem)
            return elem
        return self.DBI_RE.sub(one, body)


# ---------------------------------------------------------------------------------------------

class Engine:
    """The rules, their configuration and the state they share. `send(method, path, headers,
    body)` makes a request to moto (the proxy's own calls, which no rule sees)."""

    def __init__(self, send, clock=time.time, log=lambda msg: None):
        self.lock = threading.RLock()
        self.send, self.clock, self.log = send, clock, log
        self.off, self.scale, self.overrides = set(), 1.0, {}
        self.rng = random.Random()
        self.rds = RdsTracker(self)
        self.rules = {cls.name: cls(self) for cls in RULES}

    @property
    def names(self):
        return [cls.name for cls in RULES]

    def on(self, name):
        return name not in self.off

    def duration(self, rule, key):
        base = self.overrides.get(rule, {}).get(key, self.rules[rule].params[key])
        return float(base) * self.scale

    KEYS = ("rules_off", "rules_time_scale", "rules_params", "throttle", "seed", "rds_hold")

    def configure(self, updates):
        """Validates and applies the rules' config keys present in `updates` (others are left as
        they are). Raises ValueError on a bad value, before changing anything."""
        off, scale, overrides = self.off, self.scale, self.overrides
        if "rules_off" in updates:
            names = [str(x) for x in updates["rules_off"] or []]
            unknown = [n for n in names if n != "all" and n not in self.rules]
            if unknown:
                raise ValueError(f"unknown rules {unknown}; known: {self.names} or 'all'")
            off = set(self.names) if "all" in names else set(names)
        if "rules_time_scale" in updates:
            scale = float(1.0 if updates["rules_time_scale"] is None else updates["rules_time_scale"])
            if scale < 0:
                raise ValueError("rules_time_scale must be >= 0")
        if "rules_params" in updates:
            params = updates["rules_params"] or {}
            if not isinstance(params, dict):
                raise ValueError("rules_params must be an object")
            for rule, vals in params.items():
                if rule not in self.rules or not isinstance(vals, dict):
                    raise ValueError(f"rules_params: unknown rule {rule!r}")
                bad = set(vals) - set(self.rules[rule].params)
                if bad:
                    raise ValueError(f"rules_params: {rule} has no {sorted(bad)}; it has {sorted(self.rules[rule].params)}")
            overrides = {r: {k: float(v) for k, v in vals.items()} for r, vals in params.items()}
        if "throttle" in updates:
            self.rules["throttling"].configure(updates["throttle"])  # validates first
        with self.lock:
            self.off, self.scale, self.overrides = off, scale, overrides
            if "seed" in updates:
                self.rng = random.Random(updates["seed"])
            if "rds_hold" in updates:
                self.rds.legacy = updates["rds_hold"]

    def describe(self):
        out = []
        for cls in RULES:
            rule = self.rules[cls.name]
            out.append({"name": cls.name, "on": self.on(cls.name), "summary": cls.summary(),
                        "citations": cls.citations(),
                        "params": {k: self.duration(cls.name, k) for k in cls.params},
                        "state": rule.state()})
        return out

    def reset(self):
        with self.lock:
            for rule in self.rules.values():
                if isinstance(rule, Throttling):  # the throttle config stays; its counts restart
                    for ent in rule.entries:
                        ent["throttled"] = 0
                elif not isinstance(rule, Ec2ClientToken):  # in-flight waiters keep their events
                    rule.reset()
            self.rules["ec2-client-token"].cache.clear()
            self.rds.reset()

    # --- the hooks the proxy calls -----------------------------------------------------------
    def sweep(self, now=None):
        now = self.clock() if now is None else now
        for name, rule in self.rules.items():
            if self.on(name):
                try:
                    rule.sweep(now)
                except Exception as e:  # noqa: BLE001 (a failing sweep must not fail a request)
                    self.log(f"rule {name}: sweep failed: {e!r}")

    def before(self, call):
        self.sweep(call.now)
        for cls in RULES:
            if self.on(cls.name):
                ans = self.rules[cls.name].before(call)
                if ans is not None:
                    return cls.name, ans
        return None

    def after(self, call, ans):
        call.now = self.clock()  # windows start when the answer leaves, not when the request came
        machine = self.on("rds-state-machine")
        if call.service == "rds":
            self.rds.note(call, ans, machine)
            if not ans.header("Content-Encoding"):
                ans = ans.copy(self.rds.rewrite(call, ans.body, machine))
        for name in AFTER_ORDER:
            if self.on(name):
                ans = self.rules[name].after(call, ans)
        return ans

    def done(self, call):
        for rule in self.rules.values():
            rule.done(call)

    # --- the proxy's own calls to moto -------------------------------------------------------
    def lambda_configuration(self, call, name):
        """GetFunctionConfiguration of `name` as moto has it, for the call's account and Region:
        (status, body)."""
        headers = {"Authorization": f"AWS4-HMAC-SHA256 Credential=emuproxy/20260101/{call.region}/lambda/aws4_request, "
                                    "SignedHeaders=host, Signature=0",
                   "X-Amz-Date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())}
        if call.account and call.account != DEFAULT_ACCOUNT:
            headers["x-moto-account-id"] = call.account
        try:
            status, _headers, data = self.send("GET", f"/2015-03-31/functions/{urllib.parse.quote(name, safe='')}"
                                               "/configuration", headers, b"")
            return status, data
        except OSError as e:
            self.log(f"rules: internal lambda GetFunctionConfiguration failed: {e!r}")
            return 599, b""

    def query(self, service, region, account, params):
        """A query-protocol call to moto (EC2, RDS): returns (status, body)."""
        body = urllib.parse.urlencode(params).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
                   "Authorization": f"AWS4-HMAC-SHA256 Credential=emuproxy/20260101/{region}/{service}/aws4_request, "
                                    "SignedHeaders=host, Signature=0",
                   "X-Amz-Date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())}
        if account and account != DEFAULT_ACCOUNT:
            headers["x-moto-account-id"] = account
        try:
            status, _headers, data = self.send("POST", "/", headers, body)
            return status, data
        except OSError as e:
            self.log(f"rules: internal {service} {params.get('Action')} failed: {e!r}")
            return 599, b""
