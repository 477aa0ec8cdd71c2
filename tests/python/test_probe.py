"""The probe (src/lambda/probe.py): healthy only when the server answers the PostgreSQL
protocol (SSLRequest -> b"S" or b"N") within its timeout. In-process fake servers for the
protocol's corner cases, then the real clusters (tests/python/pgpair.py)."""
import socket
import struct
import threading
import time

import pytest

import probe

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


class FakeServer:
    """A loopback listener; `reply(conn, request)` decides what the server does."""

    def __init__(self, reply):
        self.reply = reply
        self.requests = []
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.conns = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(conn)
            conn.settimeout(5)
            try:
                data = b""
                while len(data) < 8:
                    chunk = conn.recv(8 - len(data))
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
                self.reply(conn, data)
            except OSError:
                pass

    def close(self):
        self.srv.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def fake_server():
    made = []

    def make(reply):
        s = FakeServer(reply)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def target(monkeypatch, host, port, timeout=None):
    monkeypatch.setenv("TARGET_HOST", host)
    monkeypatch.setenv("TARGET_PORT", str(port))
    if timeout is None:
        monkeypatch.delenv("TIMEOUT_S", raising=False)
    else:
        monkeypatch.setenv("TIMEOUT_S", str(timeout))


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # bound then closed without listening: nothing accepts there
    return port


# -- in-process --------------------------------------------------------------------------------

@pytest.mark.parametrize("answer", [b"N", b"S"])
def test_ssl_request_answered_is_ok(monkeypatch, fake_server, answer):
    srv = fake_server(lambda conn, req: conn.sendall(answer))
    target(monkeypatch, "127.0.0.1", srv.port)
    out = probe.handler({}, None)
    assert out == {"ok": True, "host": "127.0.0.1", "port": srv.port, "ms": out["ms"]}
    assert isinstance(out["ms"], float) and out["ms"] >= 0
    assert srv.requests == [SSL_REQUEST]  # exactly the 8-byte SSLRequest, nothing more


def test_accepting_but_silent_port_is_unhealthy(monkeypatch):
    srv = socket.socket()  # listens, the kernel accepts, nobody ever answers
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    target(monkeypatch, "127.0.0.1", port, timeout=0.3)
    start = time.monotonic()
    try:
        with pytest.raises(ConnectionError, match=rf"no PostgreSQL answer from 127\.0\.0\.1:{port}.*timed out"):
            probe.handler({}, None)
    finally:
        srv.close()
    assert time.monotonic() - start < 2  # the one timeout bounds connection and answer


@pytest.mark.parametrize("reply,match", [
    (lambda conn, req: conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n"), r"not PostgreSQL .*b'H'"),
    (lambda conn, req: conn.sendall(b"E"), r"not PostgreSQL .*b'E'"),
    (lambda conn, req: conn.close(), r"closed without a PostgreSQL answer"),
])
def test_wrong_answer_is_unhealthy(monkeypatch, fake_server, reply, match):
    srv = fake_server(reply)
    target(monkeypatch, "127.0.0.1", srv.port, timeout=1)
    with pytest.raises(ConnectionError, match=match):
        probe.handler({}, None)


def test_closed_port_raises_naming_host_and_port(monkeypatch):
    port = closed_port()
    target(monkeypatch, "127.0.0.1", port, timeout=1)
    with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port}.*ConnectionRefused"):
        probe.handler({}, None)


def test_unresolvable_host_is_unhealthy(monkeypatch):
    target(monkeypatch, "pgdr-no-such-host.invalid", 5432, timeout=1)
    with pytest.raises(ConnectionError, match=r"cannot connect to pgdr-no-such-host\.invalid:5432.*gaierror"):
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


@pytest.mark.parametrize("var,value", [("TARGET_PORT", "x"), ("TIMEOUT_S", "soon")])
def test_bad_port_or_timeout_raises(monkeypatch, var, value):
    monkeypatch.setenv("TARGET_HOST", "127.0.0.1")
    monkeypatch.setenv(var, value)
    with pytest.raises(RuntimeError, match="bad TARGET_PORT or TIMEOUT_S"):
        probe.handler({}, None)


# -- real PostgreSQL ---------------------------------------------------------------------------

def test_real_server_is_healthy(monkeypatch, pg_pair):
    for cluster in (pg_pair.primary, pg_pair.standby):  # a hot standby answers too
        target(monkeypatch, cluster.host, cluster.port, timeout=2)
        out = probe.handler({}, None)
        assert out["ok"] is True and out["port"] == cluster.port


def test_real_server_hung_is_unhealthy(monkeypatch, pg_pair):
    p = pg_pair.primary
    target(monkeypatch, p.host, p.port, timeout=0.5)
    p.freeze()
    try:
        # The port is open: the kernel still completes the TCP handshake.
        with socket.create_connection(p.address, timeout=1):
            pass
        with pytest.raises(ConnectionError, match=rf"no PostgreSQL answer from {p.host}:{p.port}.*timed out"):
            probe.handler({}, None)
    finally:
        p.thaw()
    assert probe.handler({}, None)["ok"] is True


@pytest.fixture(scope="module")
def single(pg_bindir):
    """One cluster of this module's own, for the tests that stop or fence it."""
    import pgpair
    with pgpair.PgPair(with_standby=False, bindir_=pg_bindir) as pair:
        yield pair.primary


def test_real_server_stopped_is_unhealthy(monkeypatch, single):
    c = single
    target(monkeypatch, c.host, c.port, timeout=1)
    assert probe.handler({}, None)["ok"] is True
    c.stop()
    with pytest.raises(ConnectionError, match=rf"cannot connect to {c.host}:{c.port}.*ConnectionRefused"):
        probe.handler({}, None)
    c.start()
    assert probe.handler({}, None)["ok"] is True


def test_real_server_wrong_host_is_unhealthy(monkeypatch, pg_pair):
    p = pg_pair.primary
    # Another loopback address: the cluster listens on 127.0.0.1 only.
    target(monkeypatch, "127.0.0.2", p.port, timeout=1)
    with pytest.raises(ConnectionError, match=rf"cannot connect to 127\.0\.0\.2:{p.port}.*ConnectionRefused"):
        probe.handler({}, None)


def test_real_server_fenced_at_the_network_is_unhealthy(monkeypatch, single):
    c = single
    target(monkeypatch, c.host, c.port, timeout=1)
    c.fence()  # pg_hba rejects logins: the server is alive and still answers the protocol
    assert probe.handler({}, None)["ok"] is True
    c.fence(network=True)  # no TCP listener, as with the 5432 ingress rules revoked
    try:
        with pytest.raises(ConnectionError, match="ConnectionRefused"):
            probe.handler({}, None)
    finally:
        c.unfence()
    assert probe.handler({}, None)["ok"] is True
