import socket

import pytest

import probe


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    yield srv.getsockname()[1]
    srv.close()


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # bound then closed without listening: nothing accepts there
    return port


def test_listening_port_is_ok(monkeypatch, listener):
    monkeypatch.setenv("TARGET_HOST", "127.0.0.1")
    monkeypatch.setenv("TARGET_PORT", str(listener))
    out = probe.handler({}, None)
    assert out["ok"] is True and out["host"] == "127.0.0.1" and out["port"] == listener
    assert isinstance(out["ms"], float) and out["ms"] >= 0


def test_closed_port_raises_naming_host_and_port(monkeypatch):
    port = closed_port()
    monkeypatch.setenv("TARGET_HOST", "127.0.0.1")
    monkeypatch.setenv("TARGET_PORT", str(port))
    monkeypatch.setenv("TIMEOUT_S", "1")
    with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port}.*ConnectionRefused"):
        probe.handler({}, None)


def test_default_port_is_5432(monkeypatch):
    seen = {}

    def fake_connect(addr, timeout):
        seen.update(addr=addr, timeout=timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(probe.socket, "create_connection", fake_connect)
    monkeypatch.setenv("TARGET_HOST", "db.example.internal")
    monkeypatch.delenv("TARGET_PORT", raising=False)
    monkeypatch.delenv("TIMEOUT_S", raising=False)
    with pytest.raises(ConnectionError, match=r"db\.example\.internal:5432.*timed out"):
        probe.handler({}, None)
    assert seen == {"addr": ("db.example.internal", 5432), "timeout": 3.0}


@pytest.mark.parametrize("value", [None, "", "  "])
def test_missing_target_host_raises(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("TARGET_HOST", raising=False)
    else:
        monkeypatch.setenv("TARGET_HOST", value)
    with pytest.raises(RuntimeError, match="TARGET_HOST"):
        probe.handler({}, None)
