"""The application of the DR tests: commits numbered rows at a steady rate through a name.

Standard library only (the wire client is tests/python/pgwire.py). Each attempt inserts one
row `(run, seq)` in its own transaction (autocommit) and is recorded either as an
acknowledged commit (`acks`) or as an error (`errors`), each with the time from `clock`. A new
connection resolves the name again through the pluggable `resolve` callable (the DR harness
passes its Route 53 resolver); any error drops the connection, so the next attempt resolves
afresh. Afterwards, `missing_on(server)` lists the acknowledged rows a server lacks: the RPO.

    w = Writer(lambda name: ("127.0.0.1", 5432), "postgres.pgdr.internal", "pgdr", "secret", rate=50)
    w.setup()                      # CREATE TABLE IF NOT EXISTS on the resolved server
    with w:                        # a background thread writes until the block ends
        time.sleep(2)
    w.rpo_rows(pair.standby)       # acknowledged rows missing there
"""
import collections
import socket
import threading
import time
import uuid

import pgwire

Ack = collections.namedtuple("Ack", "seq t target ms")
Failure = collections.namedtuple("Failure", "seq t target kind code message")


def normalize_target(answer, default_port=5432):
    """A resolver's answer -> (host, port). Accepts (host, port), "host", "host:port"."""
    if answer is None:
        raise LookupError("no answer")
    if isinstance(answer, (tuple, list)):
        host, port = answer[0], int(answer[1]) if len(answer) > 1 and answer[1] is not None else default_port
        return str(host), port
    text = str(answer).strip().rstrip(".")
    if not text:
        raise LookupError("empty answer")
    if text.count(":") == 1:
        host, port = text.split(":")
        return host.rstrip("."), int(port)
    return text, default_port


def classify(exc):
    """(kind, SQLSTATE) of an exception met while connecting or writing."""
    if isinstance(exc, pgwire.PgError):
        code = exc.code
        if code == "25006":
            return "read_only", code
        if code in ("28000", "28P01"):
            return "rejected", code
        if code in ("57P01", "57P02", "57P03"):  # terminated, crash shutdown, cannot connect now
            return "lost", code
        return "error", code
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout", None
    if isinstance(exc, pgwire.PgConnectionLost):
        return "lost", None
    if isinstance(exc, LookupError) or isinstance(exc, socket.gaierror):
        return "resolve", None
    if isinstance(exc, OSError):
        return "connect", None
    return "error", None


class Writer:
    def __init__(self, resolve, name, user, password, dbname="postgres", rate=20.0, default_port=5432,
                 table="pgdr_writer", timeout=1.0, clock=time.monotonic, run_id=None, link=None):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.resolve = resolve
        self.name = name
        self.user = user
        self.password = password
        self.dbname = dbname
        self.rate = float(rate)
        self.default_port = default_port
        self.table = table
        self.timeout = timeout
        self.clock = clock
        # link(target) -> bool: whether the path to an established connection's server still
        # carries packets (False: the query times out, as over a black-holed network)
        self.link = link
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.acks = []
        self.errors = []
        self._seq = 0
        self._conn = None
        self._target = None
        self._thread = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # -- connection ------------------------------------------------------------------------
    def _resolve(self):
        try:
            answer = self.resolve(self.name)
        except Exception as e:
            raise LookupError(f"resolve {self.name}: {type(e).__name__}: {e}") from e
        try:
            return normalize_target(answer, self.default_port)
        except (LookupError, ValueError) as e:
            raise LookupError(f"resolve {self.name}: {e} ({answer!r})") from e

    def _connection(self):
        if self._conn is None or self._conn.closed:
            self._target = None
            target = self._resolve()
            self._target = target  # the server tried, recorded with a failure to connect
            self._conn = pgwire.connect(target[0], target[1], self.user, self.password, self.dbname,
                                        timeout=self.timeout, application_name="pgdr-writer")
        return self._conn

    def _drop(self):
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def setup(self):
        """Create the table on the server the name resolves to (idempotent)."""
        conn = self._connection()
        try:
            conn.query(f"CREATE TABLE IF NOT EXISTS {self.table} (run text NOT NULL, seq bigint NOT NULL, "
                       "written_at timestamptz NOT NULL DEFAULT clock_timestamp(), PRIMARY KEY (run, seq))")
        finally:
            self._drop()

    # -- writing ---------------------------------------------------------------------------
    def write_one(self):
        """One attempt: returns the Ack or the Failure it recorded."""
        with self._lock:
            self._seq += 1
            seq = self._seq
        start = time.monotonic()
        try:
            conn = self._connection()
            target = self._target
            if self.link is not None and not self.link(target):
                time.sleep(self.timeout)
                raise socket.timeout(f"timed out: no answer from {target[0]}:{target[1]}")
            conn.query(f"INSERT INTO {self.table} (run, seq) VALUES ({pgwire.literal(self.run_id)}, {seq})")
        except Exception as e:
            kind, code = classify(e)
            self._drop()
            rec = Failure(seq, self.clock(), self._target, kind, code, f"{type(e).__name__}: {e}")
            self.errors.append(rec)
            return rec
        rec = Ack(seq, self.clock(), target, round((time.monotonic() - start) * 1000, 2))
        self.acks.append(rec)
        return rec

    def _loop(self):
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                break
            self.write_one()
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # an attempt took longer than the interval: no burst to catch up
                next_at = now
        self._drop()

    @property
    def running(self):
        return self._thread is not None

    def start(self):
        if self._thread is not None:
            raise RuntimeError("writer already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="pgdr-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.timeout * 3 + 5)
        self._thread = None

    def run_for(self, seconds):
        self.start()
        try:
            time.sleep(seconds)
        finally:
            self.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- results ---------------------------------------------------------------------------
    @property
    def attempts(self):
        return self._seq

    def acked_seqs(self):
        return {a.seq for a in self.acks}

    def rows_on(self, server):
        """The seqs of this run present on `server`: a PgCluster-like object with .sql()
        (its admin path, which works while fenced), or (host, port) / "host:port"."""
        query = f"SELECT seq FROM {self.table} WHERE run = {pgwire.literal(self.run_id)}"
        if hasattr(server, "sql"):
            rows = server.sql(query)
        else:
            host, port = normalize_target(server, self.default_port)
            with pgwire.connect(host, port, self.user, self.password, self.dbname, timeout=5) as conn:
                rows = conn.query(query)
        return {int(r[0]) for r in rows}

    def missing_on(self, server):
        """Acknowledged rows absent from `server`, sorted: their count is the RPO in rows."""
        return sorted(self.acked_seqs() - self.rows_on(server))

    def rpo_rows(self, server):
        return len(self.missing_on(server))

    def first_ack_after(self, t, target=None):
        """The first acknowledged commit at or after time t (on `target` (host, port) if given)."""
        for a in self.acks:
            if a.t >= t and (target is None or tuple(a.target) == tuple(target)):
                return a
        return None

    def errors_of(self, kind):
        return [e for e in self.errors if e.kind == kind]

    def summary(self):
        kinds = collections.Counter(e.kind for e in self.errors)
        return {"run": self.run_id, "attempts": self._seq, "acked": len(self.acks),
                "errors": len(self.errors), "error_kinds": dict(kinds),
                "targets": sorted({f"{a.target[0]}:{a.target[1]}" for a in self.acks})}

