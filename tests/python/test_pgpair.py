"""The real-PostgreSQL harness: tests/python/pgpair.py (two clusters with streaming
replication), pgwire.py (the wire client) and pgwriter.py (the writer and its RPO count)."""
import os
import pathlib
import socket
import time

import pytest

import pgpair
import pgwire
import pgwriter


def fixed(cluster):
    """A resolver that always answers this cluster."""
    return lambda name: (cluster.host, cluster.port)


# -- pgpair ------------------------------------------------------------------------------------

def test_row_on_primary_appears_on_standby(pg_pair):
    p, s = pg_pair.primary, pg_pair.standby
    assert not p.in_recovery() and s.in_recovery()
    with p.connect() as conn:  # the application's path: TCP + SCRAM-SHA-256
        conn.query("CREATE TABLE IF NOT EXISTS repl_check (k text PRIMARY KEY)")
        conn.query("INSERT INTO repl_check VALUES ('hello') ON CONFLICT DO NOTHING")
    pg_pair.wait_caught_up()
    assert s.sql("SELECT k FROM repl_check") == [("hello",)]
    assert s.replay_lsn() >= 0 and p.current_wal_lsn() <= s.replay_lsn()
    with s.connect() as conn:  # a hot standby is read-only
        with pytest.raises(pgwire.PgError) as e:
            conn.query("INSERT INTO repl_check VALUES ('no')")
        assert e.value.code == "25006"


def test_password_is_required_over_tcp(pg_pair):
    p = pg_pair.primary
    with pytest.raises(pgwire.PgError) as e:
        pgwire.connect(p.host, p.port, p.user, "wrong password", timeout=2)
    assert e.value.code == "28P01"
    with pytest.raises(pgwire.PgError) as e:
        pgwire.connect(p.host, p.port, p.user, None, timeout=2)
    assert e.value.code == "28P01"
    assert p.scalar("SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host' LIMIT 1") == "scram-sha-256"


def test_wire_client_rows_nulls_errors(pg_pair):
    with pg_pair.primary.connect() as conn:
        assert conn.query("SELECT 1 AS a, NULL AS b, 'x''y' AS c") == [("1", None, "x'y")]
        assert conn.query(f"SELECT {pgwire.literal(chr(233) + 'té')}") == [("\u00e9té",)]
        with pytest.raises(pgwire.PgError) as e:
            conn.query("SELECT * FROM no_such_table")
        assert e.value.code == "42P01"
        assert conn.scalar("SELECT 2") == "2"  # an ERROR leaves the connection usable
        assert conn.query("") == []


def test_promotion_makes_standby_writable_then_reprotect(make_pair):
    pair = make_pair()
    p, s = pair.primary, pair.standby
    p.sql("CREATE TABLE t (x int)")
    p.sql("INSERT INTO t VALUES (1)")
    pair.wait_caught_up()
    p.stop()
    pair.promote()
    assert not s.in_recovery()
    with s.connect() as conn:
        conn.query("INSERT INTO t VALUES (2)")
    assert s.sql("SELECT x FROM t ORDER BY x") == [("1",), ("2",)]
    # The way back: the old primary becomes a standby of the promoted one.
    pair.reprotect()
    assert pair.primary is s and pair.standby is p
    assert p.in_recovery()
    s.sql("INSERT INTO t VALUES (3)")
    pair.wait_caught_up()
    assert p.sql("SELECT count(*) FROM t") == [("3",)]


def test_fence_refuses_new_connections_and_ends_sessions(pg_pair):
    p = pg_pair.primary
    existing = p.connect()
    try:
        assert existing.scalar("SELECT 1") == "1"
        ended = p.fence()
        assert ended >= 1
        with pytest.raises((pgwire.PgError, pgwire.PgConnectionLost)):
            existing.query("SELECT 1")
        with pytest.raises(pgwire.PgError) as e:
            p.connect(timeout=2)
        assert e.value.code == "28000"  # pg_hba.conf rejects connection
        # The second guard, for anything that still gets in (here the harness's own path).
        assert p.scalar("SHOW default_transaction_read_only") == "on"
        with pytest.raises(pgwire.PgError) as e:
            p.sql("CREATE TABLE fenced_write (x int)")
        assert e.value.code == "25006"
        assert pg_pair.standby.in_recovery()  # replication is not the fence's business
    finally:
        existing.close()
        p.unfence()
    with p.connect() as conn:
        assert conn.scalar("SHOW default_transaction_read_only") == "off"
        conn.query("CREATE TABLE IF NOT EXISTS after_unfence (x int)")


def test_network_fence_refuses_at_tcp_level(make_pair):
    c = make_pair(with_standby=False).primary
    c.fence(network=True)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(c.address, timeout=1)
    assert c.scalar("SHOW default_transaction_read_only") == "on"  # the admin socket still works
    c.unfence()
    with c.connect() as conn:
        assert conn.scalar("SHOW default_transaction_read_only") == "off"


def test_freeze_keeps_the_port_open_but_nothing_answers(pg_pair):
    p = pg_pair.primary
    p.freeze()
    try:
        assert all(pgpair._proc_stat(pid)[0] in "Tt" for pid in p.pids())
        with pytest.raises(socket.timeout):
            pgwire.connect(p.host, p.port, p.user, p.password, timeout=0.3)
    finally:
        p.thaw()
    assert not p.frozen
    with p.connect(timeout=2) as conn:
        assert conn.scalar("SELECT 1") == "1"


def test_kill_is_a_crash_the_restart_recovers(pg_pair):
    p, s = pg_pair.primary, pg_pair.standby
    p.sql("CREATE TABLE IF NOT EXISTS crash_check (x int)")
    p.sql("INSERT INTO crash_check VALUES (1)")
    p.kill()  # SIGKILL, no shutdown checkpoint
    assert not p.running and p.pids() == []
    p.start()  # crash recovery
    assert p.scalar("SELECT count(*) FROM crash_check") == "1"
    p.sql("INSERT INTO crash_check VALUES (2)")
    pg_pair.wait_caught_up()  # the standby reconnected by itself
    assert s.scalar("SELECT count(*) FROM crash_check") == "2"
    p.sql("DROP TABLE crash_check")


def test_replay_pause_stops_the_replay_lsn(pg_pair):
    p, s = pg_pair.primary, pg_pair.standby
    p.sql("CREATE TABLE IF NOT EXISTS pause_check (x int)")
    pg_pair.wait_caught_up()
    s.pause_replay()
    try:
        assert s.replay_pause_state() == "paused"
        replay0 = s.replay_lsn()
        p.sql("INSERT INTO pause_check SELECT generate_series(1, 500)")
        written = p.current_wal_lsn()
        deadline = time.monotonic() + 5
        while s.receive_lsn() < written and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.receive_lsn() >= written  # the WAL arrives...
        time.sleep(0.2)
        assert s.replay_lsn() == replay0  # ...but is not applied
        assert s.scalar("SELECT count(*) FROM pause_check") == "0"
    finally:
        s.resume_replay()
    assert s.wait_replayed(written) >= written
    assert s.scalar("SELECT count(*) FROM pause_check") == "500"
    p.sql("DROP TABLE pause_check")


def test_tls_clusters_verify_against_the_pair_ca(make_pair):
    import ssl
    import stat
    names = ["pgdr-t-us-east-1.abc123.us-east-1.rds.amazonaws.com", "db.example.test"]
    pair = make_pair(tls_hosts=names)
    assert pair.ca_pem.startswith("-----BEGIN CERTIFICATE-----") and pair.ca_path.read_text() == pair.ca_pem
    key = pair.primary.tls[1]
    st = os.stat(key)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == (os.stat(f"/proc/{pair.primary.postmaster_pid()}").st_uid)  # the server's user
    for c in pair.clusters:
        assert c.scalar("SHOW ssl") == "on"
        for name in names + ["localhost", "127.0.0.1"]:
            cert = pgpair.tls_handshake(c.host, c.port, name, pair.ca_pem)
            assert ("DNS", names[0]) in cert["subjectAltName"]
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            pgpair.tls_handshake(c.host, c.port, "postgres.db-t.internal", pair.ca_pem)
        with c.connect() as conn:  # plain (no TLS) TCP logins are still accepted
            assert conn.scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") == "f"
    other = pgpair.CertAuthority(pair.root / "other-ca", "another CA")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        pgpair.tls_handshake(pair.primary.host, pair.primary.port, names[0], other.pem)
    # A name added later: the certificate is reissued and the servers reload it.
    pair.add_tls_hosts(["postgres.db-t.internal"])
    assert pgpair.tls_handshake(pair.standby.host, pair.standby.port, "postgres.db-t.internal", pair.ca_pem)
    # The cluster rebuilt by reprotect() serves the same certificate.
    pair.promote()
    pair.reprotect()
    assert pair.standby.in_recovery() and pair.standby.scalar("SHOW ssl") == "on"
    assert pgpair.tls_handshake(pair.standby.host, pair.standby.port, names[1], pair.ca_pem)


def test_close_stops_the_servers_and_removes_the_directory(make_pair):
    pair = make_pair(with_standby=False)
    root, pids = pair.root, pair.primary.pids()
    assert root.is_dir() and len(pids) >= 5 and pair.standby is None
    pair.primary.freeze()  # close() copes with a frozen cluster
    pair.close()
    assert not root.exists()
    time.sleep(0.05)
    assert not any(pgpair._proc_stat(pid) and pgpair._proc_stat(pid)[0] not in "ZX" for pid in pids)
    pair.close()  # idempotent


def test_stale_directory_of_a_dead_run_is_cleaned():
    stale = pathlib.Path(pgpair.BASE_DIR) / (pgpair.TMP_PREFIX + "staletest")
    stale.mkdir(exist_ok=True)
    (stale / "owner.pid").write_text("999999999")  # no such process
    pgpair.cleanup_stale()
    assert not stale.exists()


def test_lsn_conversion():
    assert pgpair.lsn_to_int("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert pgpair.int_to_lsn(pgpair.lsn_to_int("0/3000060")) == "0/3000060"
    assert pgpair.lsn_to_int(None) is None


# -- pgwriter ----------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,want", [
    (("10.0.0.1", 5433), ("10.0.0.1", 5433)),
    ("db.internal", ("db.internal", 5432)),
    ("db.internal.:6000", ("db.internal", 6000)),
    (["h", None], ("h", 5432)),
])
def test_normalize_target(answer, want):
    assert pgwriter.normalize_target(answer) == want


def test_writer_records_resolver_failures():
    def broken(name):
        raise KeyError(name)

    w = pgwriter.Writer(broken, "postgres.pgdr.internal", "pgdr", "x", rate=1000)
    rec = w.write_one()
    assert isinstance(rec, pgwriter.Failure) and rec.kind == "resolve" and "postgres.pgdr.internal" in rec.message
    assert w.acks == [] and w.attempts == 1


def test_writer_steady_rate_and_no_loss_on_the_standby(pg_pair):
    p, s = pg_pair.primary, pg_pair.standby
    w = pgwriter.Writer(fixed(p), "postgres.pgdr.internal", p.user, p.password, rate=100)
    w.setup()
    w.run_for(1.0)
    assert 60 <= len(w.acks) <= 110, w.summary()  # steady, no burst
    assert w.errors == []
    assert [a.seq for a in w.acks] == list(range(1, len(w.acks) + 1))
    assert all(a.target == (p.host, p.port) for a in w.acks)
    pg_pair.wait_caught_up()
    assert w.missing_on(p) == [] and w.rpo_rows(s) == 0
    assert w.rpo_rows(s.address) == 0  # over TCP too


def test_writer_failover_and_rpo(make_pair):
    pair = make_pair(user="app", password="Pass-word-2", dbname="appdb")
    p, s = pair.primary, pair.standby
    dns = {"postgres.pgdr.internal": p.address}
    w = pgwriter.Writer(lambda name: dns[name], "postgres.pgdr.internal", "app", "Pass-word-2",
                        dbname="appdb", rate=200, timeout=0.5)
    w.setup()
    w.start()
    try:
        time.sleep(0.3)
        pair.wait_caught_up(timeout=5)
        t_block_start = w.clock()
        p.block_replication()  # the standby gets nothing more: what follows is lost
        t_block = w.clock()
        time.sleep(0.3)
        # Region loss: the primary dies; the standby is promoted; DNS moves.
        p.kill()
        t_fault = w.clock()
        pair.promote()
        t_dns = w.clock()
        dns["postgres.pgdr.internal"] = s.address
        time.sleep(0.4)
    finally:
        w.stop()
    acked_on_old = [a for a in w.acks if a.target == p.address]
    acked_on_new = [a for a in w.acks if a.target == s.address]
    assert acked_on_old and acked_on_new, w.summary()
    # Errors between the fault and DNS: refused connections to the dead primary.
    assert w.errors and all(t_fault - 0.6 <= e.t for e in w.errors), w.errors[:3]
    assert {e.kind for e in w.errors} <= {"connect", "lost", "timeout"}, w.summary()
    first_new = w.first_ack_after(t_dns, target=s.address)
    assert first_new is not None and first_new.t - t_fault < 5
    # The RPO: exactly the rows acknowledged by the old primary after replication was cut.
    missing = set(w.missing_on(s))
    assert w.rpo_rows(s) == len(missing) > 0
    assert missing <= {a.seq for a in acked_on_old if a.t >= t_block_start}
    assert missing >= {a.seq for a in acked_on_old if a.t >= t_block + 0.05}
    assert not missing & {a.seq for a in acked_on_new}

def test_writer_meets_a_read_only_server(pg_pair):
    s = pg_pair.standby
    w = pgwriter.Writer(fixed(s), "postgres.pgdr.internal", s.user, s.password, rate=1000)
    rec = w.write_one()
    assert isinstance(rec, pgwriter.Failure) and rec.kind == "read_only" and rec.code == "25006"
    assert w.errors_of("read_only") == [rec]


@pytest.mark.skipif(os.geteuid() != 0, reason="the dedicated OS user is only used as root")
def test_servers_run_as_the_unprivileged_user(pg_pair):
    import pwd
    uid = pwd.getpwnam(pgpair.OS_USER).pw_uid
    assert all(os.stat(f"/proc/{pid}").st_uid == uid for pid in pg_pair.primary.pids())
