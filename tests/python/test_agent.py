"""The in-VPC agent (src/lambda/agent.py) against real PostgreSQL serving TLS
(tests/python/pgpair.py with tls_hosts). Only name resolution is faked: the RDS-like endpoint
names and the writer CNAME are mapped to the loopback clusters, by patching
socket.gethostbyname_ex and socket.create_connection as the DR harness does."""
import json
import logging
import re
import socket
import struct
import threading
import time

import pytest

import agent
import pgpair
import pgwire

PRIMARY_EP = "pgdr-t-us-east-1.abc123.us-east-1.rds.amazonaws.com"
STANDBY_EP = "pgdr-t-eu-west-1.abc123.eu-west-1.rds.amazonaws.com"
WRITER = "postgres.db-t.internal"          # a CNAME to PRIMARY_EP; not in the certificate
STRANGER = "db.not-in-the-cert.example"    # the primary's address, no CNAME, not in the certificate
PASSWORD = 'Agent-S3cr\\et"pw'             # a backslash and a quote: repr and JSON change it
LSN = re.compile(r"^[0-9A-F]+/[0-9A-F]+$")


class Dns:
    """name -> cluster (an A record) and name -> name (a CNAME); the rest resolves for real,
    except *.invalid, which does not."""

    def __init__(self):
        self.a, self.cname = {}, {}

    def point(self, name, target):
        """target: a PgCluster (or an (ip, port) address), or another name (a CNAME)."""
        self.a.pop(name, None)
        self.cname.pop(name, None)
        (self.cname if isinstance(target, str) else self.a)[name] = target

    def final(self, name):
        seen = 0
        while name in self.cname and seen < 8:
            name, seen = self.cname[name], seen + 1
        return name

    def address(self, name):
        target = self.a.get(self.final(name))
        if target is None:
            return None
        return target.address if isinstance(target, pgpair.PgCluster) else target


@pytest.fixture
def dns(monkeypatch):
    d = Dns()
    real_connect, real_lookup = socket.create_connection, socket.gethostbyname_ex

    def gethostbyname_ex(name):
        if d.address(name) is not None:
            final = d.final(name)
            return final, ([name] if final != name else []), [d.address(name)[0]]
        if name.endswith(".invalid") or name in d.cname:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_lookup(name)

    def create_connection(address, *args, **kw):
        host, _port = address  # the endpoint's port is the cluster's, whatever the client asks
        if d.address(host) is not None:
            return real_connect(d.address(host), *args, **kw)
        if host.endswith(".invalid") or host in d.cname:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_connect(address, *args, **kw)

    monkeypatch.setattr(socket, "gethostbyname_ex", gethostbyname_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return d


def route(dns, pair):
    dns.point(PRIMARY_EP, pair.primary)
    dns.point(STANDBY_EP, pair.standby)
    dns.point(WRITER, PRIMARY_EP)
    dns.point(STRANGER, pair.primary)


@pytest.fixture(scope="module")
def tls_pair(pg_bindir):
    with pgpair.PgPair(user="pgdr", password=PASSWORD, bindir_=pg_bindir,
                       tls_hosts=[PRIMARY_EP, STANDBY_EP]) as pair:
        pair.primary.sql("CREATE TABLE agent_t (x int); GRANT ALL ON agent_t TO PUBLIC")
        yield pair


@pytest.fixture
def pair(tls_pair, dns):
    route(dns, tls_pair)
    return tls_pair


def ev(pair, action, user=None, password=None, **kw):
    e = {"action": action, "credentials": {"username": user or pair.user, "password": password or pair.password},
         "ca_bundle": pair.ca_pem, "connect_timeout_s": 3}
    e.update(kw)
    return e


def run(pair, action, **kw):
    return agent.handler(ev(pair, action, **kw), None)


def login_role(pair, name, previous=None):
    """A login role with the pair's password (created once per pair); its database-independent
    default_transaction_read_only set to `previous` (or none)."""
    p = pair.primary
    if p.scalar(f"SELECT count(*) FROM pg_roles WHERE rolname = '{name}'") == "0":
        p.sql(f"CREATE ROLE {name} LOGIN PASSWORD {pgwire.literal(pair.password)}")
        p.sql(f"GRANT CREATE, USAGE ON SCHEMA public TO {name}")
    if previous is not None:
        p.sql(f"ALTER ROLE {name} SET default_transaction_read_only = {previous}")
    return {"role": name, "previous": previous}


def session(cluster, user, password):
    """An application's plain-TCP session (pgwire has no TLS; the clusters accept both)."""
    return pgwire.connect(cluster.host, cluster.port, user, password, timeout=3)


def role_setting(cluster, name):
    return cluster.sql("SELECT s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
                       f"WHERE r.rolname = '{name}' AND s.setdatabase = 0")


# -- TLS -------------------------------------------------------------------------------------

def test_check_through_the_cname_verifies_the_endpoint_name(pair):
    login_role(pair, "app_ck_off", previous="off")
    pair.primary.sql("DO $$ BEGIN CREATE ROLE no_login_ck; CREATE ROLE rds_ck LOGIN; "
                     "CREATE ROLE rdsrepladmin LOGIN REPLICATION; CREATE ROLE super_ck LOGIN SUPERUSER; "
                     "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    out = run(pair, "check", host=WRITER)  # the certificate names PRIMARY_EP, not WRITER
    assert out["ok"] is True and out["in_recovery"] is False
    assert out["server_version"].split(".")[0].isdigit() and isinstance(out["ms"], int)
    roles = {r["role"]: r["previous"] for r in out["roles"]}
    assert roles["pgdr"] is None and roles["app_ck_off"] == "off"
    assert not {"no_login_ck", "rds_ck", "rdsrepladmin", "super_ck"} & set(roles)
    assert not any(r.startswith("pg_") for r in roles)
    assert run(pair, "check", host=STANDBY_EP)["in_recovery"] is True


def test_a_name_not_in_the_certificate_is_refused(pair, dns):
    with pytest.raises(agent.AgentError, match=rf"^agent check: cannot connect to {re.escape(STRANGER)}:5432 "
                                               r"\(TLS verification failed: Hostname mismatch"):
        run(pair, "check", host=STRANGER)
    # Through a CNAME whose target the certificate does not name either.
    dns.point("evil.example.com", pair.primary)
    dns.point("sneaky.db-t.internal", "evil.example.com")
    with pytest.raises(agent.AgentError, match="Hostname mismatch.*checked against evil.example.com, "
                                               "the name sneaky.db-t.internal resolves to"):
        run(pair, "check", host="sneaky.db-t.internal")


def test_a_certificate_from_another_ca_is_refused(pair, tmp_path):
    other = pgpair.CertAuthority(tmp_path / "other", "not the RDS CA")
    with pytest.raises(agent.AgentError, match=r"cannot connect to .*certificate verify failed|"
                                               r"unable to get local issuer certificate"):
        agent.handler(dict(ev(pair, "check", host=PRIMARY_EP), ca_bundle=other.pem), None)
    with pytest.raises(agent.AgentError, match='agent check: the event has no "ca_bundle"'):
        agent.handler(dict(ev(pair, "check", host=PRIMARY_EP), ca_bundle=None), None)


def test_a_server_without_tls_is_refused_before_any_credential(dns, tmp_path):
    got, srv = [], socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve():  # a PostgreSQL without TLS: answers N, then records whatever comes
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(3)
            data = b""
            while len(data) < 8:
                data += conn.recv(8 - len(data))
            conn.sendall(b"N")
            try:
                while True:
                    chunk = conn.recv(1024)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            got.append(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    dns.point("plain.db-t.internal", srv.getsockname())
    event = {"action": "check", "host": "plain.db-t.internal",
             "ca_bundle": "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
             "credentials": {"username": "pgdr", "password": PASSWORD}}
    with pytest.raises(agent.AgentError, match='agent check: "ca_bundle" is not a usable PEM bundle'):
        agent.handler(event, None)  # refused before connecting
    event["ca_bundle"] = pgpair.CertAuthority(tmp_path, "some CA").pem
    with pytest.raises(agent.AgentError, match=r"cannot connect to plain.db-t.internal:5432 \(the server does "
                                               r"not offer TLS \(SSLRequest answered N\); no credential sent\)"):
        agent.handler(event, None)
    t.join(5)
    srv.close()
    assert got == [struct.pack("!ii", 8, 80877103)]  # the SSLRequest, and nothing after it


# -- fence, unguard, catchup -----------------------------------------------------------------

def test_fence_ends_the_sessions_and_new_ones_are_read_only(pair):
    p = pair.primary
    role = login_role(pair, "app_f")
    existing = session(p, "app_f", pair.password)
    try:
        assert existing.scalar("SELECT 1") == "1"
        out = run(pair, "fence", host=WRITER, roles=[role], timeout_s=5)
        assert LSN.match(out["lsn"]) and out["sessions_ended"] >= 1 and out["guarded"] == ["app_f"]
        assert pgpair.lsn_to_int(out["lsn"]) <= p.current_wal_lsn()
        with pytest.raises((pgwire.PgError, pgwire.PgConnectionLost)):
            existing.query("SELECT 1")
        with session(p, "app_f", pair.password) as new:
            assert new.scalar("SHOW default_transaction_read_only") == "on"
            with pytest.raises(pgwire.PgError) as e:
                new.query("INSERT INTO agent_t VALUES (1)")
            assert e.value.code == "25006"
            # A rerun re-applies and ends this session too.
            again = run(pair, "fence", host=PRIMARY_EP, roles=[role, {"role": "gone_f", "previous": None}])
            assert again["guarded"] == ["app_f"] and again["skipped"] == ["gone_f"] and again["sessions_ended"] == 1
            assert pgpair.lsn_to_int(again["lsn"]) >= pgpair.lsn_to_int(out["lsn"])
            with pytest.raises((pgwire.PgError, pgwire.PgConnectionLost)):
                new.query("SELECT 1")
    finally:
        existing.close()
        run(pair, "unguard", host=WRITER, roles=[role])
    with session(p, "app_f", pair.password) as conn:
        conn.query("INSERT INTO agent_t VALUES (2)")


def test_unguard_restores_null_and_off(pair):
    p = pair.primary
    login_role(pair, "app_un")
    login_role(pair, "app_uo", previous="off")
    roles = [r for r in run(pair, "check", host=WRITER)["roles"] if r["role"] in ("app_un", "app_uo")]
    assert roles == [{"role": "app_un", "previous": None}, {"role": "app_uo", "previous": "off"}]
    run(pair, "fence", host=WRITER, roles=roles)
    assert role_setting(p, "app_un") == [("{default_transaction_read_only=on}",)]
    assert role_setting(p, "app_uo") == [("{default_transaction_read_only=on}",)]
    for _ in range(2):  # idempotent
        out = run(pair, "unguard", host=WRITER, roles=roles + [{"role": "gone_u", "previous": "off"}])
        assert out["restored"] == ["app_un", "app_uo"] and out["skipped"] == ["gone_u"]
        assert role_setting(p, "app_un") == []
        assert role_setting(p, "app_uo") == [("{default_transaction_read_only=off}",)]
    with session(p, "app_un", pair.password) as conn:
        assert conn.scalar("SHOW default_transaction_read_only") == "off"
    with pytest.raises(agent.AgentError, match=f"agent unguard: {STANDBY_EP} is in recovery"):
        run(pair, "unguard", host=STANDBY_EP, roles=roles)


def test_catchup_true_when_streaming_false_when_replay_is_paused(pair):
    p, s = pair.primary, pair.standby
    role = login_role(pair, "app_c")
    try:
        lsn = run(pair, "fence", host=WRITER, roles=[role])["lsn"]
        out = run(pair, "catchup", host=STANDBY_EP, target_lsn=lsn, timeout_s=10, poll_s=0.05)
        assert out["caught_up"] is True and out["target_lsn"] == lsn
        assert pgpair.lsn_to_int(out["replayed_lsn"]) >= pgpair.lsn_to_int(lsn)
        with pytest.raises(agent.AgentError, match=f"agent catchup: {WRITER} is not in recovery"):
            run(pair, "catchup", host=WRITER, target_lsn=lsn, timeout_s=1)
        with pytest.raises(agent.AgentError, match='"target_lsn" must be an LSN'):
            run(pair, "catchup", host=STANDBY_EP, target_lsn="0/1'; DROP TABLE agent_t; --", timeout_s=1)
    finally:
        run(pair, "unguard", host=WRITER, roles=[role])
    s.pause_replay()
    try:
        p.sql("INSERT INTO agent_t SELECT generate_series(1, 100)")
        target = p.scalar("SELECT pg_current_wal_lsn()")
        start = time.monotonic()
        out = run(pair, "catchup", host=STANDBY_EP, target_lsn=target, timeout_s=1, poll_s=0.1)
        took = time.monotonic() - start
        assert out["caught_up"] is False and out["target_lsn"] == target
        assert pgpair.lsn_to_int(out["replayed_lsn"]) < pgpair.lsn_to_int(target)
        assert isinstance(out["waited_ms"], int) and 1000 <= out["waited_ms"] < 1600 and took < 2.5
    finally:
        s.resume_replay()
    assert run(pair, "catchup", host=STANDBY_EP, target_lsn=target, timeout_s=10, poll_s=0.05)["caught_up"]


def test_the_guard_replicates_and_unguard_on_the_promoted_standby(make_pair, dns):
    pair = make_pair(password=PASSWORD, tls_hosts=[PRIMARY_EP, STANDBY_EP])
    route(dns, pair)
    p, s = pair.primary, pair.standby
    p.sql("CREATE TABLE g (x int); GRANT ALL ON g TO PUBLIC")
    login_role(pair, "app_g")
    roles = run(pair, "check", host=WRITER)["roles"]
    assert roles == [{"role": "app_g", "previous": None}, {"role": "pgdr", "previous": None}]
    fenced = run(pair, "fence", host=WRITER, roles=roles)
    assert fenced["guarded"] == ["app_g", "pgdr"]
    # The agent's own user is guarded too: a rerun still works (its session turns it off).
    fenced = run(pair, "fence", host=WRITER, roles=roles)
    assert run(pair, "catchup", host=STANDBY_EP, target_lsn=fenced["lsn"], timeout_s=10, poll_s=0.05)["caught_up"]
    pair.promote()
    with session(s, "app_g", pair.password) as conn:  # the promoted standby carries the guard
        assert conn.scalar("SELECT pg_is_in_recovery()") == "f"
        assert conn.scalar("SHOW default_transaction_read_only") == "on"
        with pytest.raises(pgwire.PgError) as e:
            conn.query("INSERT INTO g VALUES (1)")
        assert e.value.code == "25006"
    after = run(pair, "check", host=STANDBY_EP)
    assert after["in_recovery"] is False and {r["previous"] for r in after["roles"]} == {"on"}
    out = run(pair, "unguard", host=STANDBY_EP, roles=roles)  # the roles as they were before the fence
    assert out["restored"] == ["app_g", "pgdr"] and out["skipped"] == []
    with session(s, "app_g", pair.password) as conn:
        assert conn.scalar("SHOW default_transaction_read_only") == "off"
        conn.query("INSERT INTO g VALUES (2)")
    assert run(pair, "check", host=STANDBY_EP)["roles"] == roles


# -- the drill's writer ----------------------------------------------------------------------

def test_write_acks_and_markers_finds_exactly_them(pair):
    out = run(pair, "write", host=WRITER, run_id="run-ok", duration_s=1.0, interval_ms=50)
    n = out["acked_count"]
    assert 12 <= n <= 21, out
    assert out["acked"] == [[1, n]] and out["attempts"] == n and out["failed_count"] == 0 and out["errors"] == {}
    assert 0 <= out["first_ack_s"] < 0.6 and out["first_ack_s"] < out["last_ack_s"] <= 1.1
    assert 0.03 < out["longest_gap_s"] < 0.3 and out["gap"]["to_s"] - out["gap"]["from_s"] == pytest.approx(
        out["longest_gap_s"], abs=0.002)
    assert out["stopped"] == "duration" and out["ended_in_outage"] is False and out["run_id"] == "run-ok"
    found = run(pair, "markers", host=WRITER, run_id="run-ok", table="pgdr_drill_markers")
    assert found["present"] == out["acked"] and found["count"] == n and found["in_recovery"] is False
    pair.wait_caught_up()
    assert run(pair, "markers", host=STANDBY_EP, run_id="run-ok")["present"] == out["acked"]
    assert run(pair, "markers", host=WRITER, run_id="no-such-run")["present"] == []
    missing = run(pair, "markers", host=WRITER, run_id="run-ok", table="no_such_table")
    assert missing == {"present": [], "count": 0, "table_exists": False, "in_recovery": False, "ms": missing["ms"]}


def test_write_through_a_fence_counts_the_failures_and_stops_once_resumed(pair):
    p = pair.primary
    role = login_role(pair, "app_w")
    result = {}

    def writer():
        try:
            result["out"] = run(pair, "write", user="app_w", host=WRITER, run_id="run-fence", duration_s=15,
                                interval_ms=50, stop_after_resumed_s=0.6, table="markers_w")
        except Exception as e:  # noqa: BLE001 (reported by the assertion below)
            result["error"] = e

    t = threading.Thread(target=writer, daemon=True)
    start = time.monotonic()
    t.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if p.scalar("SELECT to_regclass('markers_w') IS NOT NULL") == "t" and int(p.scalar(
                    "SELECT count(*) FROM markers_w WHERE run_id = 'run-fence'")) >= 5:
                break
            time.sleep(0.05)
        fenced = run(pair, "fence", host=WRITER, roles=[role])
        assert fenced["sessions_ended"] >= 1  # the writer's session
        time.sleep(0.5)
    finally:
        run(pair, "unguard", host=WRITER, roles=[role])
    t.join(15)
    took = time.monotonic() - start
    assert "error" not in result, result.get("error")
    out = result["out"]
    assert out["stopped"] == "resumed" and took < 6, (took, out)
    assert out["failed_count"] >= 3 and out["errors"].get("25006", 0) >= 1, out["errors"]
    assert set(out["errors"]) <= {"25006", "57P01", "ConnectionLost", "timeout"}, out["errors"]
    assert out["attempts"] == out["acked_count"] + out["failed_count"]
    assert len(out["acked"]) >= 2 and out["acked"][0][0] == 1 and out["acked"][-1][1] == out["attempts"]
    assert out["longest_gap_s"] >= 0.45 and out["gap"]["from_s"] < out["gap"]["to_s"] <= out["last_ack_s"]
    assert out["last_ack_s"] - out["gap"]["to_s"] >= 0.55  # it wrote on for stop_after_resumed_s
    found = run(pair, "markers", host=WRITER, run_id="run-fence", table="markers_w")
    acked = {s for lo, hi in out["acked"] for s in range(lo, hi + 1)}
    present = {s for lo, hi in found["present"] for s in range(lo, hi + 1)}
    # Every acknowledged write is there; a failed one at most once (a session ended between its
    # commit and the acknowledgement).
    assert acked <= present and len(present - acked) <= 1


def test_write_on_a_read_only_server_fails_its_setup(pair):
    with pytest.raises(agent.AgentError, match=rf"agent write: table pgdr_drill_markers not ready on "
                                               rf"{STANDBY_EP}:5432 after .* s \(25006 cannot execute CREATE TABLE"):
        run(pair, "write", host=STANDBY_EP, run_id="run-ro", duration_s=0.5, interval_ms=100)


def test_write_stops_before_the_lambda_deadline(pair):
    class Context:
        end = time.monotonic() + 6.5

        def get_remaining_time_in_millis(self):
            return int((self.end - time.monotonic()) * 1000)

    start = time.monotonic()
    out = agent.handler(ev(pair, "write", host=WRITER, run_id="run-deadline", duration_s=60), Context())
    assert out["stopped"] == "deadline" and 1.0 <= time.monotonic() - start < 2.5 and out["acked_count"] >= 8


# -- secrets and bad events ------------------------------------------------------------------

def test_the_password_never_leaves_the_function(pair, caplog, capsys):
    caplog.set_level(logging.DEBUG, logger="pgdr.agent")
    forms = [PASSWORD, repr(PASSWORD)[1:-1], json.dumps(PASSWORD)[1:-1]]
    outs = [run(pair, "check", host=WRITER),
            run(pair, "write", host=WRITER, run_id="run-secret", duration_s=0.3),
            run(pair, "markers", host=WRITER, run_id="run-secret"),
            run(pair, "unguard", host=WRITER, roles=[PASSWORD + "x"])]
    assert outs[-1]["skipped"] == ["<redacted>x"]  # scrubbed even where it was our own input
    errors = []
    for event in (ev(pair, "check", host="nowhere.invalid"),                      # a wrong host
                  ev(pair, "check", host=WRITER, password="Wrong-" + PASSWORD),    # a wrong password
                  ev(pair, "check", host=PASSWORD),                                # the password as host
                  ev(pair, "markers", host=WRITER, run_id=PASSWORD, table=PASSWORD)):
        with pytest.raises(agent.AgentError) as e:
            agent.handler(event, None)
        assert e.value.__context__ is None and e.value.__cause__ is None
        assert "\n" not in str(e.value)
        errors.append(str(e.value))
    assert re.match(r"agent check: cannot connect to nowhere\.invalid:5432 \(name not resolved", errors[0])
    assert "28P01 password authentication failed for user" in errors[1]
    assert errors[2].startswith("agent check: cannot connect to <redacted>:5432")
    text = json.dumps(outs) + "\n".join(errors) + caplog.text + "".join(capsys.readouterr())
    assert "Wrong-" not in text.replace("Wrong-<redacted>", "")
    for form in forms:
        assert form not in text
    assert "agent check: " in caplog.text and "<redacted>" in caplog.text  # the redacted event is logged
    assert PASSWORD not in json.dumps(agent.redact(ev(pair, "check", host=WRITER)))


@pytest.fixture(scope="module")
def some_ca(tmp_path_factory):
    return pgpair.CertAuthority(tmp_path_factory.mktemp("ca"), "some CA").pem


@pytest.mark.parametrize("event,match", [
    ("not a dict", "agent: the event must be a JSON object"),
    ({"action": "drop_everything"}, "agent: unknown action 'drop_everything'"),
    ({"action": "check", "host": "h"}, 'agent check: the event has no "credentials"'),
    ({"action": "check", "credentials": {"username": "u", "password": "pw-0123"},
      "ca_bundle": "CA"}, 'agent check: the event has no "host"'),
    ({"action": "fence", "host": "h", "roles": "app", "credentials": {"username": "u", "password": "pw-0123"},
      "ca_bundle": "CA"}, 'agent fence: "roles" must be a list'),
    ({"action": "write", "host": "h", "run_id": "r", "duration_s": 1, "table": "x; DROP TABLE y",
      "credentials": {"username": "u", "password": "pw-0123"}, "ca_bundle": "CA"},
     "agent write: table must be a plain name"),
])
def test_bad_events_are_one_line_errors(event, match, some_ca):
    if isinstance(event, dict) and event.get("ca_bundle") == "CA":
        event = dict(event, ca_bundle=some_ca)
    with pytest.raises(agent.AgentError, match=match):
        agent.handler(event, None)
