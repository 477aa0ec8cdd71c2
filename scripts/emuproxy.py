#!/usr/bin/env python3
"""Loopback HTTP proxy in front of moto_server (stdlib only).

Starts moto_server as a child, forwards every request to it unchanged, and adds what moto
lacks: a call record, latency, injected faults (503 before forwarding, dropped answers after
forwarding), a one-shot SIGKILL of a given pid after N calls, RDS status holds (rewrites
DBInstanceStatus in RDS answers for a while), and AWS rules (scripts/awsrules.py: answers as real
AWS gives them where moto is lenient; all on by default, docs/aws-behaviour.md lists them).
Control API under /__proxy/ (JSON in and out):

  GET  /__proxy/config          current config (JSON)
  POST /__proxy/config          merge a JSON object of any config keys; returns the new config
                                (kill_on {pid, ops, regions?, after?}: SIGKILL pid right after
                                the after-th (default 1st) answered call of one of these ops;
                                faults: fail_rate, drop_rate, seed, fault_ops = only these ops,
                                blackhole_regions = every call to these regions goes unanswered,
                                fault_skip_ops = never these ops, fault_services = only these
                                services, fault_mutating_only)
  GET  /__proxy/calls           recorded calls (JSON list); each has t (request received) and
                                t_end (answer sent, or connection closed for a dropped answer;
                                after the added latency), seconds since the epoch, and for
                                query-protocol calls naming them, params (DBInstanceIdentifier,
                                GroupId, SourceDBInstanceIdentifier)
  GET  /__proxy/calls?since=N   the recorded calls after seq N
  POST /__proxy/calls/reset     clear the in-memory list (the record file is append-only)
  GET  /__proxy/rds_status      active RDS status overrides
  POST /__proxy/rds_status      {"region","id","status","for_s"[,"account"]}; status null clears
  GET  /__proxy/rules           the AWS rules: name, on, summary, citations, durations, state
  POST /__proxy/rules/reset     forget what the rules track (also done by POST /moto-api/reset)
  GET  /__proxy/invoke-hook     {"url": the registered invoke hook or null}
  POST /__proxy/invoke-hook     {"url": "http://127.0.0.1:PORT/..."} registers it, {"url": null} clears
                                it (so does POST /moto-api/reset)

Lambda Invoke (moto cannot run function code without Docker): while an invoke hook is registered,
`POST /2015-03-31/functions/{name}/invocations` is answered by the proxy, not moto. First what
Lambda does before running code (rule `lambda-function-states`): no such function -> 404
ResourceNotFoundException; a function whose State is not Active (a VPC function is Pending for a
while after CreateFunction) -> 409 ResourceConflictException. Then by X-Amz-Invocation-Type:
DryRun -> 204; Event -> 202 at once, the hook called in the background; RequestResponse (the
default) -> the hook is POSTed {"region", "account", "function", "payload": <request body
text>, "invocation_type"} and answers {"payload": <text>, "error": null | "Unhandled" |
"Handled"}; the proxy answers 200 with that payload, `X-Amz-Executed-Version: $LATEST`, and
`X-Amz-Function-Error: <error>` when error is set (Lambda's documented Invoke response). The
invocation takes as long as the hook does; other calls are served meanwhile (a thread per
connection). Recorded like other calls, with params {"FunctionName"} and "hook": true; the
payload is never recorded (it may carry a credential). Faults and rules (throttling, blackholed
regions, fail_rate, drop_rate) apply as to any call. Without a hook, Invoke goes to moto.

Rule config keys: rules_off (["name", ...] or ["all"]), rules_time_scale (float, multiplies every
rule duration), rules_params ({"rule": {"param": seconds}}), throttle (list; rule `throttling`).
A call a rule answered itself is recorded with "rule": its name.

Usage: emuproxy.py --moto-bin PATH/moto_server [--port 0] [--ready-file F] [--record F]
                   [--exit-with-parent]   (stop when the launching process dies, e.g. a test)
                   [--rules-off NAME,NAME|all] [--rules-time-scale F]
"""
import argparse, ctypes, http.client, http.server, json, os, random, re, signal, socket
import struct, subprocess, sys, threading, time, urllib.parse, uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import awsrules  # noqa: E402

CRED_RE = re.compile(r"Credential=[^/,\s]+/\d{8}/([^/]+)/([^/]+)/aws4_request")
RPCV2_RE = re.compile(r"^/service/[^/]+/operation/([A-Za-z0-9]+)$")  # Smithy RPCv2 (CBOR)
# Identifiers recorded with a query-protocol call (which instance, which security group), so that
# a harness can act on what a call named: never values, never secrets.
RECORDED_PARAMS = ("DBInstanceIdentifier", "GroupId", "SourceDBInstanceIdentifier")
INVOKE_RE = re.compile(r"^/2015-03-31/functions/([^/]+)/invocations/?$")
INVOKE_TYPES = ("RequestResponse", "Event", "DryRun")
HOOK_TIMEOUT_S = 960.0  # longer than Lambda's longest function timeout (900 s)
HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
       "transfer-encoding", "upgrade", "expect", "content-length"}

lock = threading.RLock()
answered = threading.Condition(lock)  # notified when a recorded call gets its t_end
CONFIG = {"record": None, "latency_ms": 0.0, "fail_rate": 0.0, "drop_rate": 0.0, "seed": None,
          "fault_ops": None, "fault_skip_ops": None, "fault_services": None, "fault_mutating_only": False, "kill_after": None,
          "kill_on": None, "rds_hold": None,
          "rules_off": [], "rules_time_scale": 1.0, "rules_params": {}, "throttle": None,
          "blackhole_regions": None, "blackhole_s": 0.5}
STATE = {"calls": [], "seq": 0, "kill_count": 0, "kill_on_count": 0, "rng": random.Random(),
         "moto_port": None, "stopping": False, "invoke_hook": None}


def log(msg):
    print(f"emuproxy: {msg}", file=sys.stderr, flush=True)


def set_config(new):
    """Merge a dict of config keys (validated loosely); returns the current config."""
    with lock:
        for k in new:
            if k not in CONFIG:
                raise ValueError(f"unknown config key {k!r}")
        rules = {k: v for k, v in new.items() if k in awsrules.Engine.KEYS}
        if "rds_hold" in rules and rules["rds_hold"] is not None:
            v = rules["rds_hold"]
            rules["rds_hold"] = {"create_s": float(v.get("create_s", 0)), "modify_s": float(v.get("modify_s", 0))}
        ENGINE.configure(rules)  # validates the rule keys before anything changes
        for k, v in new.items():
            if k in ("latency_ms", "fail_rate", "drop_rate"):
                v = float(v or 0)
            elif k == "seed":
                STATE["rng"] = random.Random(v)
            elif k == "fault_skip_ops":
                v = None if v is None else [str(x) for x in v]
            elif k == "blackhole_regions":
                v = None if v is None else [str(x) for x in v]
            elif k == "blackhole_s":
                v = float(v)
            elif k in ("fault_ops", "fault_services"):
                v = None if v is None else [str(x) for x in v]
            elif k == "fault_mutating_only":
                v = bool(v)
            elif k == "kill_after" and v is not None:
                v = {"pid": int(v["pid"]), "calls": int(v["calls"])}
                STATE["kill_count"] = 0
            elif k == "kill_on" and v is not None:
                v = {"pid": int(v["pid"]), "ops": [str(x) for x in v["ops"]],
                     "regions": None if v.get("regions") is None else [str(x) for x in v["regions"]],
                     "after": int(v.get("after") or 1)}
                STATE["kill_on_count"] = 0
            elif k == "rds_hold" and v is not None:
                v = rules["rds_hold"]
            elif k == "rules_off":
                v = sorted(ENGINE.off)
            elif k == "rules_time_scale":
                v = ENGINE.scale
            elif k == "rules_params":
                v = ENGINE.overrides
            CONFIG[k] = v
        return dict(CONFIG)


def classify(method, path, headers, body):
    """Returns (service, region, op, mutating, is_json)."""
    m = CRED_RE.search(headers.get("Authorization", ""))
    url = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(url.query)
    if not m and "X-Amz-Credential" in query:  # presigned URL
        m = CRED_RE.search("Credential=" + query["X-Amz-Credential"][0] + ",")
    region, service = (m.group(1), m.group(2)) if m else (None, None)
    target = headers.get("X-Amz-Target")
    ctype = headers.get("Content-Type", "")
    is_json = bool(target) or "json" in ctype or service == "lambda"
    form = {}
    if "x-www-form-urlencoded" in ctype and body:
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
    rpc = RPCV2_RE.match(url.path)
    if target:
        op = target.rsplit(".", 1)[-1]
    elif "Action" in form or "Action" in query:
        op = (form.get("Action") or query.get("Action"))[0]
    elif rpc:
        op = rpc.group(1)
    else:  # REST protocol: route53, lambda, ...
        return service, region, f"{method} {url.path}", method not in ("GET", "HEAD"), is_json, form
    mutating = not op.startswith(("Describe", "Get", "List"))
    return service, region, op, mutating, is_json, form


def error_body(is_json):
    rid = str(uuid.uuid4())
    if is_json:
        body = json.dumps({"__type": "ServiceUnavailable", "message": "injected"}).encode()
        return body, [("Content-Type", "application/x-amz-json-1.1"),
                      ("x-amzn-ErrorType", "ServiceUnavailable"), ("x-amzn-RequestId", rid)]
    body = (f"<ErrorResponse><Error><Type>Receiver</Type><Code>ServiceUnavailable</Code>"
            f"<Message>injected</Message></Error><RequestId>{rid}</RequestId></ErrorResponse>").encode()
    return body, [("Content-Type", "text/xml"), ("x-amzn-RequestId", rid)]


def record(entry):
    """Lists a call once its outcome is known (seq in that order); finish() completes it."""
    with lock:
        STATE["seq"] += 1
        entry = {"seq": STATE["seq"], **entry, "t_end": None}
        STATE["calls"].append(entry)
        return entry


def finish(entry):
    """Stamps t_end once the answer is sent (or dropped) and writes the record file line."""
    with answered:
        entry["t_end"] = time.time()
        path = CONFIG["record"]
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")
        answered.notify_all()


def calls_answered(timeout=5.0):
    """The recorded calls, after waiting (bounded) for answers still being sent: a client that
    reads the record right after its last answer must see that call's t_end."""
    with answered:
        answered.wait_for(lambda: all(c["t_end"] is not None for c in STATE["calls"]), timeout)
        return [dict(c) for c in STATE["calls"]]


def moto_request(method, path, headers, body):
    """One request to moto (headers: (name, value) pairs, hop-by-hop ones dropped); returns
    (status, reason, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", STATE["moto_port"], timeout=300)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            if k.lower() not in HOP:
                conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP]
        return resp.status, resp.reason, out, data
    finally:
        conn.close()


def moto_send(method, path, headers, body):
    """The AWS rules' own calls to moto (no record, no faults, no rules)."""
    headers = {"Host": f"127.0.0.1:{STATE['moto_port']}", **headers}
    status, _reason, out, data = moto_request(method, path, headers.items(), body)
    return status, out, data


ENGINE = awsrules.Engine(moto_send, log=log)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else delayed ACKs add ~40 ms per call

    def log_message(self, fmt, *args):  # quiet: moto logs every request already
        pass

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status, body, headers=(), reason=None):
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def reply_json(self, obj, status=200):
        self.reply(status, json.dumps(obj).encode(), [("Content-Type", "application/json")])

    def forward(self, body):
        """Sends the request to moto unchanged; returns (status, reason, headers, body)."""
        return moto_request(self.command, self.path, self.headers.items(), body)

    def control(self, body):
        path = urllib.parse.urlsplit(self.path).path
        try:
            req = json.loads(body or b"{}") if self.command == "POST" else None
            if path == "/__proxy/config" and self.command == "GET":
                with lock:
                    return self.reply_json(dict(CONFIG))
            if path == "/__proxy/config" and self.command == "POST":
                return self.reply_json(set_config(req))
            if path == "/__proxy/calls" and self.command == "GET":
                since = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("since", ["0"])[0]
                return self.reply_json([c for c in calls_answered() if c["seq"] > int(since)])
            if path == "/__proxy/calls/reset" and self.command == "POST":
                with lock:
                    STATE["calls"].clear()
                return self.reply_json({"ok": True})
            if path == "/__proxy/rds_status" and self.command == "GET":
                return self.reply_json(ENGINE.rds.holds())
            if path == "/__proxy/rds_status" and self.command == "POST":
                ENGINE.rds.force((req.get("account", ""), req["region"], req["id"]), req.get("status"),
                                 req.get("for_s"))
                return self.reply_json({"ok": True})
            if path.startswith("/__proxy/lambda-code/") and self.command == "GET":
                account, region, name = path[len("/__proxy/lambda-code/"):].split("/", 2)
                data = ENGINE.rules["lambda-code-location"].package(account, region, name)
                if data is None:
                    return self.reply_json({"error": f"no package uploaded for {region}/{name}"}, 404)
                return self.reply(200, data, [("Content-Type", "application/zip")])
            if path == "/__proxy/rules" and self.command == "GET":
                ENGINE.sweep()
                return self.reply_json(ENGINE.describe())
            if path == "/__proxy/rules/reset" and self.command == "POST":
                ENGINE.reset()
                return self.reply_json({"ok": True})
            if path == "/__proxy/invoke-hook" and self.command == "GET":
                with lock:
                    return self.reply_json({"url": STATE["invoke_hook"]})
            if path == "/__proxy/invoke-hook" and self.command == "POST":
                url = req["url"]
                if url is not None:
                    parts = urllib.parse.urlsplit(str(url))
                    if parts.scheme != "http" or not parts.hostname:
                        raise ValueError(f"the invoke hook must be an http:// URL, not {url!r}")
                    url = str(url)
                with lock:
                    STATE["invoke_hook"] = url
                return self.reply_json({"url": url})
            return self.reply_json({"error": f"no such control endpoint {self.command} {path}"}, 404)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return self.reply_json({"error": f"bad request: {e!r}"}, 400)

    def handle_any(self):
        body = self.read_body()
        if self.path.startswith("/__proxy/"):
            return self.control(body)
        if self.path.startswith("/moto-api"):  # moto's own API: plain pass-through
            answer = self.pass_through(body)
            if self.path.startswith("/moto-api/reset") and answer[0] == 200:
                ENGINE.reset()  # moto forgot everything: so do the rules
                with lock:
                    STATE["invoke_hook"] = None
            return self.reply(*answer)
        t = time.time()
        service, region, op, mutating, is_json, form = classify(self.command, self.path, self.headers, body)
        with lock:
            cfg = dict(CONFIG)
            eligible = ((not cfg["fault_ops"] or op in cfg["fault_ops"])
                        and (not cfg["fault_services"] or service in cfg["fault_services"])
                        and op not in (cfg["fault_skip_ops"] or [])
                        and (mutating or not cfg["fault_mutating_only"]))
            rng = STATE["rng"]
            fault = None
            if eligible and cfg["fail_rate"] > 0 and rng.random() < cfg["fail_rate"]:
                fault = "503"
            elif eligible and cfg["drop_rate"] > 0 and rng.random() < cfg["drop_rate"]:
                fault = "drop"
        if cfg["latency_ms"] > 0:
            time.sleep(cfg["latency_ms"] / 1000.0)
        entry = {"t": t, "service": service, "region": region, "op": op, "mutating": mutating, "rule": None}
        ids = {k: form[k][0] for k in RECORDED_PARAMS if form.get(k)}
        invoked = INVOKE_RE.match(urllib.parse.urlsplit(self.path).path) if service == "lambda" else None
        if invoked and self.command == "POST":  # the function's name, never the payload
            ids["FunctionName"] = awsrules.lambda_function_name(invoked.group(1))
        if ids:
            entry["params"] = ids
        if region and region in (cfg["blackhole_regions"] or []):
            # A lost region: the request goes nowhere; after blackhole_s the connection is reset
            # (a client's timeout, shortened so that tests stay fast).
            rec = record({**entry, "status": None, "fault": "blackhole"})
            time.sleep(cfg["blackhole_s"])
            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            finally:
                finish(rec)
            return
        if fault == "503":
            err, headers = error_body(is_json)
            rec = record({**entry, "status": 503, "fault": "503"})
            try:
                return self.reply(503, err, headers)
            finally:
                finish(rec)
        call = awsrules.Call(self.command, self.path, self.headers, body, service, region, op,
                             self.headers.get("x-moto-account-id"))
        try:
            self.answer(call, entry, body, fault)
        finally:
            ENGINE.done(call)

    def answer(self, call, entry, body, fault):
        """Lets the AWS rules answer, or forwards to moto and lets the rules rewrite the answer."""
        try:
            ruled = ENGINE.before(call)
        except Exception as e:  # noqa: BLE001 (a broken rule must not break the proxy)
            log(f"rules: before {call.op} failed: {e!r}")
            ruled = None
        if ruled:
            name, ans = ruled
            rec = record({**entry, "status": ans.status, "fault": None, "rule": name})
            try:
                return self.reply(ans.status, ans.body, ans.headers, ans.reason)
            finally:
                finish(rec)
        with lock:
            hook = STATE["invoke_hook"]
        if hook and call.name == "Invoke" and self.command == "POST":
            return self.invoke(call, entry, body, fault, hook)
        try:
            status, reason, headers, data = self.forward(body if call.forward_body is None else call.forward_body)
        except OSError as e:  # moto gave no answer
            rec = record({**entry, "status": None, "fault": None})
            try:
                return self.reply_json({"error": f"emuproxy: moto did not answer: {e!r}"}, 502)
            finally:
                finish(rec)
        ans = awsrules.Answer(status, headers, data, reason)
        try:
            ans = ENGINE.after(call, ans)  # also when the answer is then dropped: moto did the work
        except Exception as e:  # noqa: BLE001
            log(f"rules: after {call.op} failed: {e!r}")
        rec = record({**entry, "status": ans.status, "fault": fault})
        try:
            if fault == "drop":  # moto did the work; the client gets a reset and no answer
                self.close_connection = True
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                return
            self.reply(ans.status, ans.body, ans.headers, ans.reason)
        finally:
            finish(rec)
        self.after_answer(call)

    def invoke(self, call, entry, body, fault, hook):
        """Lambda Invoke answered through the invoke hook (see the module docstring)."""
        name = awsrules.LambdaVpcEnis.function_of(call)
        itype = self.headers.get("X-Amz-Invocation-Type") or "RequestResponse"
        rid = str(uuid.uuid4())
        rule = None
        if itype not in INVOKE_TYPES:
            refusal = awsrules.aws_error(call, 400, "InvalidParameterValueException",
                                         f"Unsupported invocation type {itype!r}; valid: {', '.join(INVOKE_TYPES)}")
        else:
            try:
                refusal = ENGINE.rules["lambda-function-states"].invoke_refusal(call, name)
            except Exception as e:  # noqa: BLE001
                log(f"invoke: checking {name} failed: {e!r}")
                refusal = awsrules.aws_error(call, 500, "ServiceException", f"emuproxy: {e!r}", sender=False)
            if refusal is not None and refusal.status == 409:
                rule = "lambda-function-states"
        if refusal is not None:
            status, data, headers = refusal.status, refusal.body, refusal.headers
        else:
            job = {"region": call.region, "account": call.account, "function": name,
                   "payload": body.decode("utf-8", "replace"), "invocation_type": itype}
            if itype == "DryRun":
                status, data, headers = 204, b"", [("x-amzn-RequestId", rid)]
            elif itype == "Event":  # queued: Lambda answers at once and runs it later
                threading.Thread(target=self.post_hook, args=(hook, job), daemon=True).start()
                status, data, headers = 202, b"", [("x-amzn-RequestId", rid)]
            else:
                try:
                    out = self.post_hook(hook, job)
                    payload = out.get("payload")
                    data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                    status = 200
                    headers = [("Content-Type", "application/json"), ("X-Amz-Executed-Version", "$LATEST"),
                               ("x-amzn-RequestId", rid)]
                    if out.get("error"):
                        headers.append(("X-Amz-Function-Error", str(out["error"])))
                except (OSError, ValueError, AttributeError) as e:
                    log(f"invoke: the hook {hook} failed for {call.region}/{name}: {e!r}")
                    err = awsrules.aws_error(call, 500, "ServiceException", f"emuproxy: the invoke hook failed: {e!r}",
                                             sender=False)
                    status, data, headers = err.status, err.body, err.headers
        rec = record({**entry, "status": status, "fault": fault if refusal is None else None, "rule": rule,
                      "hook": True})
        try:
            if fault == "drop" and refusal is None:  # it ran; the client gets a reset and no answer
                self.close_connection = True
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                return
            try:
                self.reply(status, data, headers)
            except OSError as e:  # the caller went away meanwhile (killed): the function ran anyway
                self.close_connection = True
                log(f"invoke: the answer for {call.region}/{name} could not be sent: {e!r}")
        finally:
            finish(rec)
        self.after_answer(call)

    @staticmethod
    def post_hook(hook, job):
        """POSTs one invocation to the hook; returns its JSON answer."""
        url = urllib.parse.urlsplit(hook)
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=HOOK_TIMEOUT_S)
        try:
            data = json.dumps(job).encode()
            conn.request("POST", (url.path or "/") + (f"?{url.query}" if url.query else ""), body=data,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            text = resp.read()
            if resp.status != 200:
                raise ValueError(f"the hook answered {resp.status}: {text[:300]!r}")
            out = json.loads(text or b"{}")
            if not isinstance(out, dict):
                raise ValueError(f"the hook answered {type(out).__name__}, not an object")
            return out
        finally:
            conn.close()

    def pass_through(self, body):
        try:
            status, reason, headers, data = self.forward(body)
            return status, data, headers, reason
        except OSError as e:
            return 502, f"moto did not answer: {e!r}".encode(), [("Content-Type", "text/plain")], None

    def after_answer(self, call=None):
        """kill_after: SIGKILL the pid once N calls were forwarded and answered; kill_on: once
        the Nth call of one of its operations (in one of its regions) was answered."""
        victims = []
        with lock:
            ka = CONFIG["kill_after"]
            if ka:
                STATE["kill_count"] += 1
                if STATE["kill_count"] >= ka["calls"]:
                    CONFIG["kill_after"] = None
                    victims.append(("kill_after", ka["pid"]))
            ko = CONFIG["kill_on"]
            if ko and call is not None and call.name in ko["ops"] and (
                    ko["regions"] is None or call.region in ko["regions"]):
                STATE["kill_on_count"] += 1
                if STATE["kill_on_count"] >= ko["after"]:
                    CONFIG["kill_on"] = None
                    victims.append((f"kill_on {call.name}", ko["pid"]))
        for why, pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                log(f"{why}: sent SIGKILL to pid {pid}")
            except OSError as e:
                log(f"{why}: kill {pid} failed: {e}")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = handle_any


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():  # runs in the moto child: SIGKILL it if the proxy dies (Linux)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start_moto(moto_bin):
    port = free_port()
    env = dict(os.environ, MOTO_IAM_LOAD_MANAGED_POLICIES="true")
    child = subprocess.Popen([moto_bin, "-H", "127.0.0.1", "-p", str(port)], env=env,
                             stdin=subprocess.DEVNULL, stdout=sys.stderr, start_new_session=True,
                             preexec_fn=die_with_parent)
    deadline = time.time() + 30
    while time.time() < deadline:
        if child.poll() is not None:
            sys.exit(f"emuproxy: moto_server exited with {child.returncode} during start")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/moto-api/")
            if conn.getresponse().status < 500:
                conn.close()
                return child, port
        except OSError:
            time.sleep(0.1)
    child.kill()
    sys.exit("emuproxy: moto_server did not answer within 30 s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moto-bin", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file")
    ap.add_argument("--record")
    ap.add_argument("--exit-with-parent", action="store_true")
    ap.add_argument("--rules-off", default="", metavar="NAME,NAME|all",
                    help=f"AWS rules to switch off (all are on by default): {', '.join(ENGINE.names)}, or all")
    ap.add_argument("--rules-time-scale", type=float, default=None, metavar="F",
                    help="multiply every AWS rule duration by F (default 1)")
    args = ap.parse_args()
    parent = os.getppid()
    if args.record:
        set_config({"record": os.path.abspath(args.record)})
    try:
        rules = {"rules_off": [x.strip() for x in args.rules_off.split(",") if x.strip()]}
        if args.rules_time_scale is not None:
            rules["rules_time_scale"] = args.rules_time_scale
        set_config(rules)
    except ValueError as e:
        ap.error(str(e))

    child, STATE["moto_port"] = start_moto(args.moto_bin)

    def stop(signum, _frame):
        STATE["stopping"] = True
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def watch():  # the proxy is useless without moto
        code = child.wait()
        if not STATE["stopping"]:
            log(f"moto_server exited unexpectedly with {code}")
            os._exit(1)
    threading.Thread(target=watch, daemon=True).start()

    def watch_parent():  # --exit-with-parent: no orphans when a test runner is killed
        while os.getppid() == parent:
            time.sleep(0.5)
        log("parent process gone; stopping")
        stop(None, None)
    if args.exit_with_parent:
        threading.Thread(target=watch_parent, daemon=True).start()

    server = Server(("127.0.0.1", args.port), Handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(url + "\n")
        os.replace(tmp, args.ready_file)
    print(f"PGDR_EMULATOR_ENDPOINT={url}", flush=True)
    log(f"listening on {url}, moto_server pid {child.pid} on port {STATE['moto_port']}")
    server.serve_forever()


if __name__ == "__main__":
    main()
