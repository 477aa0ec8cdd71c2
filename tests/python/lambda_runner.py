"""Runs one invocation of a deployed Lambda function in its own process, as Lambda does: the
function's environment, its handler, the harness's database network (routes passed in). Reads
the invocation on stdin, prints its outcome as one JSON line on stdout:
{"error", "result", "metrics": [{"dt", "region", "namespace", "metric", "dims", "value"}]} where dt is
seconds since the start (the caller places them on its clock). Used by drloop.Loop."""
import json
import socket
import sys
import time


def main():
    job = json.load(sys.stdin)
    start = time.monotonic()
    metrics = []
    import boto3
    session = boto3.DEFAULT_SESSION or boto3.setup_default_session() or boto3.DEFAULT_SESSION

    def capture(params, model, context, **_):
        region = (context or {}).get("client_region")
        for d in params.get("MetricData", []):
            metrics.append({"dt": time.monotonic() - start, "region": region, "namespace": params["Namespace"],
                            "metric": d["MetricName"], "dims": d.get("Dimensions") or [], "value": d.get("Value", 0)})
    session.events.register("provide-client-params.cloudwatch.PutMetricData", capture)
    routes = job.get("routes") or {}
    orig = socket.create_connection

    def create_connection(address, timeout=None, *args, **kw):
        host, port = address
        if host not in routes:
            return orig(address, timeout, *args, **kw)
        if routes[host] is None:  # cut: nothing answers
            time.sleep(min(timeout or 1.0, 0.2))
            raise socket.timeout(f"timed out connecting to {host}:{port}")
        return orig(tuple(routes[host]), timeout, *args, **kw)
    socket.create_connection = create_connection

    class Context:
        def __init__(self, timeout):
            self.deadline = start + timeout

        def get_remaining_time_in_millis(self):
            return max(int((self.deadline - time.monotonic()) * 1000), 0)

    module = {"__name__": job["module"]}
    error = result = None
    try:
        exec(compile(job["source"], f"<{job['module']}>", "exec"), module)
        result = module[job["func"]](job["event"], Context(job["timeout"]))
    except Exception as e:  # noqa: BLE001 (what Lambda records as an error)
        error = f"{type(e).__name__}: {e}"
    sys.stdout.write(json.dumps({"error": error, "result": result, "metrics": metrics}, default=str) + "\n")


if __name__ == "__main__":
    main()
