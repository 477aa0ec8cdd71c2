"""Helpers for the tests of the emulator proxy (scripts/emuproxy.py and its AWS rules)."""
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

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
