"""Helpers for the tests of the emulator proxy (scripts/emuproxy.py and its AWS rules). The
`proxy` fixture is imported by each test module, so each module gets its own proxy + moto (one
moto shared by both modules is slower: moto slows down for an account after many others)."""
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# PGDR_VENV, else the project's .venv, else the venv running these tests (it has moto_server too)
VENV = Path(os.environ.get("PGDR_VENV") or (REPO / ".venv" if (REPO / ".venv").exists() else sys.prefix))
MOTO_BIN = VENV / "bin" / "moto_server"
PROXY = REPO / "scripts" / "emuproxy.py"


def start_proxy(*args, moto_bin=MOTO_BIN):
    """Starts emuproxy.py on a free loopback port; returns (process, endpoint URL)."""
    proc = subprocess.Popen([sys.executable, str(PROXY), "--moto-bin", str(moto_bin), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    assert line.startswith("PGDR_EMULATOR_ENDPOINT=http://127.0.0.1:"), line
    return proc, line.split("=", 1)[1]


def ctl(url, path, body=None):
    """A control call: GET without a body, POST with one; returns the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """One proxy + moto for the module; yields the endpoint URL."""
    if not MOTO_BIN.exists():
        pytest.fail(f"{MOTO_BIN} missing: run scripts/setup-venv")
    record = tmp_path_factory.mktemp("emu") / "calls.jsonl"
    proc, url = start_proxy("--record", str(record))
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    # the record file got one line per recorded call
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    assert lines and all({"seq", "t", "t_end", "service", "op", "mutating", "status", "fault"} <= set(x)
                         for x in lines)
    assert all(x["t_end"] >= x["t"] for x in lines)


class InvokeHook:
    """A loopback HTTP server standing in for the proxy's invoke hook (POST /__proxy/invoke-hook):
    records every invocation it gets and answers with `answer(job)` -> {"payload", "error"}
    (default: the payload echoed). Several invocations are served at once (a thread each)."""

    def __init__(self, answer=None):
        import http.server
        import threading
        self.jobs, self.lock = [], threading.Lock()
        self.answer = answer or (lambda job: {"payload": job["payload"], "error": None})
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                job = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with hook.lock:
                    hook.jobs.append(job)
                body = json.dumps(hook.answer(job)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/invoke"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
