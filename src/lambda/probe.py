"""pgdr probe: does the primary database answer the PostgreSQL protocol, seen from the DR VPC?

Runs every minute inside the DR VPC. A TCP accept proves little (a hung or storage-full server
still accepts, the kernel completes the handshake), so the probe sends an SSLRequest (8 bytes:
length 8, code 80877103) and requires the server's one-byte answer, `S` or `N`, within the
timeout. No credential is needed and no session is started: the probe closes right after the
byte. A refused or unresolvable connection, no answer in time (hung server), a closed
connection or any other byte raises, so the invocation counts in the function's own `Errors`
metric, which the failover alarm follows. Stdlib only.
Env: TARGET_HOST (required), TARGET_PORT (default 5432), TIMEOUT_S (default 3; one budget for
the connection and the answer).
"""
import os
import socket
import struct
import time

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


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

    def fail(what, cause=None):
        ms = round((time.monotonic() - start) * 1000, 1)
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        return ConnectionError(f"probe: {what} {host}:{port} (timeout {timeout} s, after {ms} ms){detail}")

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:  # refused, timed out, unreachable, name not resolved
        raise fail("cannot connect to", e) from e
    with sock:
        try:
            sock.settimeout(max(timeout - (time.monotonic() - start), 0.001))
            sock.sendall(SSL_REQUEST)
            answer = sock.recv(1)
        except OSError as e:  # socket.timeout (accepted, never answered: hung), reset
            raise fail("no PostgreSQL answer from", e) from e
    if not answer:
        raise fail("connection closed without a PostgreSQL answer by")
    if answer not in (b"S", b"N"):
        raise fail(f"not PostgreSQL (SSLRequest answered {answer!r}, not b'S' or b'N') at")
    ms = round((time.monotonic() - start) * 1000, 1)
    print(f"probe: PostgreSQL at {host}:{port} answered {answer.decode()} in {ms} ms")
    return {"ok": True, "host": host, "port": port, "ms": ms}
