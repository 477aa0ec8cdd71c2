"""pgdr probe: can the DR VPC open a TCP connection to the primary database?

Runs every minute inside the DR VPC. A failed connection raises, so the invocation counts in
the function's own `Errors` metric, which the failover alarm follows. Stdlib only.
Env: TARGET_HOST (required), TARGET_PORT (default 5432), TIMEOUT_S (default 3).
"""
import os
import socket
import time


def handler(event, context):
    host = os.environ.get("TARGET_HOST", "").strip()
    if not host:
        raise RuntimeError("probe: TARGET_HOST is not set")
    try:
        port = int(os.environ.get("TARGET_PORT", "").strip() or 5432)
        timeout = float(os.environ.get("TIMEOUT_S", "").strip() or 3)
    except ValueError as e:
        raise RuntimeError(f"probe: bad TARGET_PORT or TIMEOUT_S: {e}") from None
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:  # refused, timed out, unreachable, name not resolved
        ms = round((time.monotonic() - start) * 1000, 1)
        raise ConnectionError(
            f"probe: cannot connect to {host}:{port} (timeout {timeout} s, after {ms} ms): "
            f"{type(e).__name__}: {e}") from e
    ms = round((time.monotonic() - start) * 1000, 1)
    print(f"probe: connected to {host}:{port} in {ms} ms")
    return {"ok": True, "host": host, "port": port, "ms": ms}
