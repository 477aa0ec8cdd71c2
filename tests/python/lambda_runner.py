"""Runs one invocation of a deployed Lambda function in its own process, as Lambda does: the
function's environment, its handler, the harness's database network. Reads the invocation on
stdin, prints its outcome as one JSON line on stdout:
{"error", "error_type", "error_message", "stack", "result",
 "metrics": [{"dt", "region", "namespace", "metric", "dims", "value"}]}
where dt is seconds since the start (the caller places them on its clock). Used by drloop.Loop
and by the DR harness's invoke hook (tests/python/dr_scenarios.py).

The network: job["resolver"] = {"url", "client"} makes every connection attempt and every
`socket.gethostbyname_ex` of a name ask the harness (GET <url>?client=..&host=..): how the name
resolves now (a Route 53 CNAME to an RDS endpoint: its target is the canonical name, as the VPC
resolver gives it) and whether the network lets this function in now (routes, cuts, security
group rules). A long invocation thus sees changes while it runs. A name the harness does not
know, and every IP literal (the emulator's endpoint), goes to the real network. The older
job["routes"] ({host: [host, port] | None}, a table fixed at the start) still works.

Unreachable: a connection attempt "times out" after min(timeout, 0.2) s (shortened so that the
tests stay fast); a name that no longer exists raises socket.gaierror.
"""
import http.client
import ipaddress
import json
import socket
import sys
import time
import traceback
import urllib.parse


def main():
    job = json.load(sys.stdin)
    start = time.monotonic()
    metrics = []
    if "boto3" in job["source"]:  # the metrics a handler puts, placed on the harness's clock
        import boto3
        session = boto3.DEFAULT_SESSION or boto3.setup_default_session() or boto3.DEFAULT_SESSION

        def capture(params, model, context, **_):
            region = (context or {}).get("client_region")
            for d in params.get("MetricData", []):
                metrics.append({"dt": time.monotonic() - start, "region": region, "namespace": params["Namespace"],
                                "metric": d["MetricName"], "dims": d.get("Dimensions") or [],
                                "value": d.get("Value", 0)})
        session.events.register("provide-client-params.cloudwatch.PutMetricData", capture)

    routes = job.get("routes")
    resolver = job.get("resolver")
    orig_connect = socket.create_connection
    orig_gethostbyname_ex = socket.gethostbyname_ex

    def literal(host):
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            return host in ("localhost", "")

    def ask(host):
        """The harness's answer for `host`, or None when it is not a harness name."""
        if resolver is None or literal(host):
            return None
        url = urllib.parse.urlsplit(resolver["url"])
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
        conn.sock = orig_connect((url.hostname, url.port), 10)  # not through the patched connect
        try:
            q = urllib.parse.urlencode({"client": resolver["client"], "host": host})
            conn.request("GET", f"{url.path}?{q}")
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            if resp.status != 200:
                raise RuntimeError(f"the harness could not resolve {host}: {answer}")
        finally:
            conn.close()
        return answer if answer.get("known") else None

    def unreachable(host, port, timeout, why=""):
        time.sleep(min(timeout or 1.0, 0.2))
        raise socket.timeout(f"timed out connecting to {host}:{port}" + (f" ({why})" if why else ""))

    def create_connection(address, timeout=None, *args, **kw):
        host, port = address[0], address[1]
        if routes is not None and host in routes:
            if routes[host] is None:  # cut: nothing answers
                unreachable(host, port, timeout)
            return orig_connect(tuple(routes[host]), timeout, *args, **kw)
        answer = ask(host)
        if answer is None:
            return orig_connect(address, timeout, *args, **kw)
        if answer.get("error") == "nxdomain":
            raise socket.gaierror(socket.EAI_NONAME, f"Name or service not known: {host}")
        if not answer.get("addr"):
            unreachable(host, port, timeout, answer.get("why", ""))
        return orig_connect(tuple(answer["addr"]), timeout, *args, **kw)

    def gethostbyname_ex(host):
        if routes is not None and host in routes:
            return host, [], [(routes[host] or ["127.0.0.1"])[0]]
        answer = ask(host)
        if answer is None:
            return orig_gethostbyname_ex(host)
        if answer.get("error") == "nxdomain" or not answer.get("ip"):
            raise socket.gaierror(socket.EAI_NONAME, f"Name or service not known: {host}")
        # The canonical name: the CNAME's target (the RDS endpoint), the host itself without one.
        return answer["canonical"], list(answer.get("aliases") or []), [answer["ip"]]

    socket.create_connection = create_connection
    socket.gethostbyname_ex = gethostbyname_ex

    class Context:
        def __init__(self, timeout):
            self.deadline = start + timeout
            self.function_name = job.get("function_name", job["module"])
            self.aws_request_id = job.get("request_id", "")
            self.memory_limit_in_mb = job.get("memory", 128)

        def get_remaining_time_in_millis(self):
            return max(int((self.deadline - time.monotonic()) * 1000), 0)

    module = {"__name__": job["module"]}
    error = error_type = error_message = result = None
    stack = []
    try:
        exec(compile(job["source"], f"<{job['module']}>", "exec"), module)
        result = module[job["func"]](job["event"], Context(job["timeout"]))
    except Exception as e:  # noqa: BLE001 (what Lambda records as an error)
        error = f"{type(e).__name__}: {e}"
        error_type, error_message = type(e).__name__, str(e)
        # As Lambda's Python runtime reports it: frames only (the source is not on disk, so no
        # line of it, nor any local variable, is in the trace).
        stack = [line for line in traceback.format_tb(e.__traceback__)]
    sys.stdout.write(json.dumps({"error": error, "error_type": error_type, "error_message": error_message,
                                 "stack": stack, "result": result, "metrics": metrics}, default=str) + "\n")


if __name__ == "__main__":
    main()
