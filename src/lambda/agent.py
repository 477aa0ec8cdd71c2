"""pgdr agent: the PostgreSQL data plane of a planned switchover and of a drill, run in the VPC.

pgdr deploys this file as `pgdr-<env>-agent` in each region's VPC (handler agent.handler,
Python 3.12, timeout 900 s). Everything else pgdr does goes through AWS APIs; what needs a
PostgreSQL session runs here: guarding the login roles and ending the sessions on the primary
(fence), restoring the roles (unguard), waiting for the replica to replay up to an LSN
(catchup), and the drill's marker writer and its count (write, markers). It runs in the VPC
because the RDS instances have no public endpoint: their security groups admit 5432 from the
VPCs only, so neither pgdr on an operator's machine nor a Lambda function outside a VPC can
reach them. Stdlib only (a compact PostgreSQL wire client is embedded: the zip holds this one
file).

The credential: every invocation carries it in its payload, {"credentials": {"username",
"password"}, "ca_bundle": "<PEM text>", ...}, which reaches the function over Lambda's Invoke
API (HTTPS, signed, authorised by IAM for lambda:InvokeFunction on this function). It is never
in the function's environment (readable by anyone allowed lambda:GetFunctionConfiguration, and
kept in the function's configuration), never logged, printed or returned: the log lines name the
action, the host and the outcome only, the event is logged only through `redact()`, and every
error message (the function error Lambda reports) passes through `scrub()`, which replaces the
password, before it leaves the handler.

TLS, verify-full: the client sends SSLRequest and refuses to go on when the server answers `N`
(no credential ever crosses the network in the clear); the server's certificate must chain to
the event's `ca_bundle` (the RDS CA bundle) and name the host (`check_hostname`). Every connect
has a timeout that bounds resolution, TCP, TLS and authentication together.

Hostname verification through a CNAME: applications reach the writer as `postgres.<zone>`, a
Route 53 CNAME to the RDS endpoint, and the RDS certificate names the endpoint
(`<id>.<hash>.<region>.rds.amazonaws.com`), not the CNAME. So the host is resolved with
`socket.gethostbyname_ex()` and the certificate is checked against the canonical name it returns
(the CNAME's target; the host itself when it has no CNAME). This trusts the private zone for the
one step from our name to the endpoint name, the trust every application of the zone already
places in it; the certificate must still be issued by the RDS CA for that endpoint. Connecting
is `socket.create_connection((host, port))`, which resolves the host again: when the CNAME moves
between the two lookups (a switchover), the certificate names the other endpoint and the connect
fails verification; the next connect resolves afresh (the writer retries by design).

Actions (event["action"]); each returns a JSON-able dict with "ms" (the invocation's duration,
an integer)
and raises AgentError with one line ("agent fence: cannot connect to HOST:5432 (...)") on failure:
  check    {host}: in_recovery, server_version and the login roles to guard, each with the
           `previous` database-independent default_transaction_read_only (or null).
  fence    {host, roles, timeout_s=30}: guard the roles (ALTER ROLE ... SET
           default_transaction_read_only = on), end the other client sessions, wait until no
           session older than the guard is left, return pg_current_wal_lsn().
  unguard  {host, roles}: restore each role's previous setting.
  catchup  {host, target_lsn, timeout_s=60, poll_s=0.5}: wait until the replica has replayed
           target_lsn (a timeout is caught_up false, not an error).
  write    {host, run_id, duration_s, ...}: the drill's marker writer (see `write`).
  markers  {host, run_id, table}: the ranges of that run's markers in the table.
Common keys: credentials, ca_bundle, database ("postgres"), port (5432), connect_timeout_s.
"""
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import ssl
import struct
import time

log = logging.getLogger("pgdr.agent")
log.setLevel(logging.INFO)
_active_secrets = []  # the passwords of the invocations running in this process


class _ScrubFilter(logging.Filter):
    """Every log line of this module passes through scrub(): a host, role or run_id that
    happens to hold the password (a caller's mistake) is not logged either."""

    def filter(self, record):
        if _active_secrets:
            msg = record.getMessage()
            for secret in list(_active_secrets):
                msg = scrub(msg, secret)
            record.msg, record.args = msg, None
        return True


log.addFilter(_ScrubFilter())

PROTOCOL_3_0 = 196608
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
DEFAULT_PORT = 5432
CONNECT_TIMEOUT_S = 5.0   # resolution + TCP + TLS + authentication, per connect
QUERY_TIMEOUT_S = 30.0
MARGIN_S = 5.0            # stop this long before the Lambda deadline
NO_CONTEXT_S = 900.0      # the function's timeout, when called without a Lambda context
DEFAULT_TABLE = "pgdr_drill_markers"
LSN_RE = re.compile(r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$")
TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
sleep = time.sleep  # tests may replace this


class AgentError(RuntimeError):
    """The function error: one line, no secret."""


class PgError(Exception):
    """An ErrorResponse. `code` is the SQLSTATE, `severity` ERROR/FATAL/PANIC."""

    def __init__(self, fields):
        self.fields = fields
        self.severity = fields.get("V") or fields.get("S") or "ERROR"
        self.code = fields.get("C", "")
        self.message = fields.get("M", "")
        super().__init__(f"{self.severity} {self.code}: {self.message}")


class ConnectionLost(ConnectionError):
    """The server closed the connection, or it broke, in the middle of an exchange."""


class TLSRefused(ConnectionError):
    """The server answered N to SSLRequest: no TLS, so no credential is sent."""


# -- secrets -----------------------------------------------------------------------------------

def redact(event):
    """A copy of the event fit for a log line: the password and the CA bundle replaced."""
    if not isinstance(event, dict):
        return f"<{type(event).__name__}>"
    out = {}
    for k, v in event.items():
        if k == "credentials":
            user = v.get("username") if isinstance(v, dict) else None
            out[k] = {"username": user, "password": "<redacted>"}
        elif k == "ca_bundle":
            out[k] = f"<{str(v).count('BEGIN CERTIFICATE')} certificate(s)>"
        else:
            out[k] = v
    return out


def _secret_forms(secret):
    if not secret:
        return []
    forms = {secret, repr(secret)[1:-1], json.dumps(secret)[1:-1]}
    return sorted((f for f in forms if f), key=len, reverse=True)


def scrub(text, secret):
    """The text with every occurrence of the secret (as is, repr'd, JSON-escaped) replaced."""
    text = str(text)
    for form in _secret_forms(secret):
        text = text.replace(form, "<redacted>")
    return text


def scrub_obj(obj, secret):
    if isinstance(obj, str):
        return scrub(obj, secret)
    if isinstance(obj, dict):
        return {scrub_obj(k, secret): scrub_obj(v, secret) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_obj(v, secret) for v in obj]
    return obj


# -- SQL text ----------------------------------------------------------------------------------

def ident(name):
    return '"' + str(name).replace('"', '""') + '"'


def lit(value):
    """A string literal, right whatever standard_conforming_strings is."""
    s = str(value)
    if "\\" in s:
        return "E'" + s.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + s.replace("'", "''") + "'"


def table_ident(name):
    if not isinstance(name, str) or not TABLE_RE.match(name):
        raise ValueError(f"table must be a plain name or schema.name, not {name!r}")
    return ".".join(ident(p) for p in name.split("."))


def ranges(seqs):
    """[1, 2, 3, 7, 8] -> [[1, 3], [7, 8]]"""
    out = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        elif not out or s > out[-1][1]:
            out.append([s, s])
    return out


# -- wire client -------------------------------------------------------------------------------

_ctx_cache = {}


def tls_context(ca_bundle):
    """A verify-full client context trusting exactly the PEM bundle (cached per bundle)."""
    key = hashlib.sha256(ca_bundle.encode()).hexdigest()
    ctx = _ctx_cache.get(key)
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED
        ctx.check_hostname = True
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=ca_bundle)
        _ctx_cache.clear()
        _ctx_cache[key] = ctx
    return ctx


def canonical_name(host):
    """The name the certificate must carry: the canonical name `host` resolves to (the target of
    a CNAME such as postgres.<zone>; the host itself without one). See the module docstring."""
    name = socket.gethostbyname_ex(host)[0]
    return (name or host).rstrip(".")


class Conn:
    """One PostgreSQL session over TLS: simple query protocol, text results."""

    def __init__(self, sock, host, canonical):
        self.sock = sock
        self.host = host
        self.canonical = canonical
        self.closed = False
        self.params = {}
        self.backend_pid = None

    def _send(self, type_byte, payload=b""):
        try:
            self.sock.sendall(type_byte + struct.pack("!i", len(payload) + 4) + payload)
        except OSError as e:
            self.close()
            raise ConnectionLost(f"send failed: {e}") from None

    def _recv_exact(self, n, deadline=None):
        buf = bytearray()
        while len(buf) < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    raise socket.timeout("timed out")
                self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(n - len(buf))
            except socket.timeout:
                self.close()
                raise
            except OSError as e:
                self.close()
                raise ConnectionLost(f"receive failed: {e}") from None
            if not chunk:
                self.close()
                raise ConnectionLost("server closed the connection")
            buf += chunk
        return bytes(buf)

    def _recv_msg(self, deadline=None):
        head = self._recv_exact(5, deadline)
        length = struct.unpack("!i", head[1:])[0]
        return head[:1], self._recv_exact(length - 4, deadline)

    @staticmethod
    def _fields(payload):
        return {chr(p[0]): p[1:].decode("utf-8", "replace") for p in payload.split(b"\0") if p}

    def _fail(self, code, message):
        self.close()
        return PgError({"S": "FATAL", "C": code, "M": message})

    def startup(self, user, password, dbname, application_name, deadline):
        body = struct.pack("!i", PROTOCOL_3_0)
        for k, v in (("user", user), ("database", dbname), ("application_name", application_name),
                     ("client_encoding", "UTF8")):
            body += k.encode() + b"\0" + v.encode() + b"\0"
        body += b"\0"
        try:
            self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        except OSError as e:
            self.close()
            raise ConnectionLost(f"send failed: {e}") from None
        scram = {}
        while True:
            t, payload = self._recv_msg(deadline)
            if t == b"R":
                code = struct.unpack("!i", payload[:4])[0]
                if code == 0:
                    continue
                if code == 3:  # cleartext (inside TLS)
                    self._send(b"p", password.encode() + b"\0")
                elif code == 5:  # md5
                    inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
                    self._send(b"p", b"md5" + hashlib.md5(inner + payload[4:8]).hexdigest().encode() + b"\0")
                elif code == 10:  # SASL: SCRAM-SHA-256 (RDS's default). No channel binding ("n,,").
                    mechs = [m.decode() for m in payload[4:].split(b"\0") if m]
                    if "SCRAM-SHA-256" not in mechs:
                        raise self._fail("28000", f"no supported SASL mechanism in {mechs}")
                    nonce = base64.b64encode(os.urandom(18)).decode()
                    scram = {"first_bare": f"n=,r={nonce}", "nonce": nonce}
                    first = ("n,," + scram["first_bare"]).encode()
                    self._send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
                elif code == 11:  # SASLContinue: server-first-message
                    server_first = payload[4:].decode()
                    attrs = dict(kv.split("=", 1) for kv in server_first.split(",") if "=" in kv)
                    if not scram or not attrs.get("r", "").startswith(scram["nonce"]):
                        raise self._fail("28000", "SCRAM: server nonce mismatch")
                    # RDS passwords are printable ASCII, for which SASLprep changes nothing.
                    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]),
                                                 int(attrs["i"]))
                    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
                    stored_key = hashlib.sha256(client_key).digest()
                    final_wo_proof = f"c=biws,r={attrs['r']}"
                    auth_msg = f"{scram['first_bare']},{server_first},{final_wo_proof}".encode()
                    signature = hmac.new(stored_key, auth_msg, hashlib.sha256).digest()
                    proof = bytes(a ^ b for a, b in zip(client_key, signature))
                    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
                    scram["expect"] = base64.b64encode(hmac.new(server_key, auth_msg, hashlib.sha256).digest()).decode()
                    self._send(b"p", f"{final_wo_proof},p={base64.b64encode(proof).decode()}".encode())
                elif code == 12:  # SASLFinal: the server proves it knows the password too
                    final = dict(kv.split("=", 1) for kv in payload[4:].decode().split(",") if "=" in kv)
                    if not scram.get("expect") or final.get("v") != scram["expect"]:
                        raise self._fail("28000", "SCRAM: bad server signature")
                else:
                    raise self._fail("28000", f"unsupported authentication method {code}")
            elif t == b"E":
                self.close()
                raise PgError(self._fields(payload))
            elif t == b"S":
                parts = payload.split(b"\0")
                self.params[parts[0].decode()] = parts[1].decode() if len(parts) > 1 else ""
            elif t == b"K":
                self.backend_pid = struct.unpack("!i", payload[:4])[0]
            elif t == b"Z":
                return
            # 'N' (notice) and others: ignored

    def query(self, sql, timeout=QUERY_TIMEOUT_S):
        """Run SQL with the simple protocol; the rows of the last statement that returned rows,
        as tuples of str (None for NULL). PgError for an ErrorResponse (the session stays usable
        unless FATAL), ConnectionLost or socket.timeout otherwise."""
        if self.closed:
            raise ConnectionLost("connection is closed")
        deadline = time.monotonic() + timeout
        self._send(b"Q", sql.encode() + b"\0")
        rows, current, error = [], None, None
        while True:
            t, payload = self._recv_msg(deadline)
            if t == b"T":
                current = []
            elif t == b"D":
                n, pos, row = struct.unpack("!h", payload[:2])[0], 2, []
                for _ in range(n):
                    size = struct.unpack("!i", payload[pos:pos + 4])[0]
                    pos += 4
                    row.append(None if size < 0 else payload[pos:pos + size].decode())
                    pos += max(size, 0)
                if current is not None:
                    current.append(tuple(row))
            elif t == b"C":
                if current is not None:
                    rows = current
                current = None
            elif t == b"E":
                error = PgError(self._fields(payload))
                if error.severity in ("FATAL", "PANIC"):
                    self.close()
                    raise error
            elif t in (b"G", b"H", b"W"):
                raise self._fail("0A000", "COPY is not supported by the agent")
            elif t == b"Z":
                if error:
                    raise error
                return rows

    def scalar(self, sql, timeout=QUERY_TIMEOUT_S):
        rows = self.query(sql, timeout)
        return rows[0][0] if rows else None

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.settimeout(0.2)
            self.sock.sendall(b"X" + struct.pack("!i", 4))
        except (OSError, ValueError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(host, port, user, password, dbname, ca_bundle, timeout=CONNECT_TIMEOUT_S,
            application_name="pgdr-agent"):
    """A verified TLS session, or an exception: socket.gaierror (name), OSError (TCP),
    socket.timeout, TLSRefused (server answered N), ssl.SSLCertVerificationError (chain or name),
    PgError (authentication), ConnectionLost. `timeout` bounds the whole."""
    deadline = time.monotonic() + timeout
    canonical = canonical_name(host)
    ctx = tls_context(ca_bundle)
    sock = socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.01))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        sock.sendall(SSL_REQUEST)
        answer = sock.recv(1)
        if answer == b"N":
            raise TLSRefused("the server does not offer TLS (SSLRequest answered N); no credential sent")
        if answer != b"S":
            raise ConnectionLost(f"not a PostgreSQL TLS answer to SSLRequest: {answer!r}")
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        tls = ctx.wrap_socket(sock, server_hostname=canonical)  # handshake: chain + name checked
    except BaseException:
        sock.close()
        raise
    conn = Conn(tls, host, canonical)
    try:
        conn.startup(user, password, dbname, application_name, deadline)
    except BaseException:
        conn.close()
        raise
    return conn


def describe(e, timeout=None):
    """One line for an exception (no secret in it: the handler scrubs anyway)."""
    if isinstance(e, PgError):
        text = f"{e.code} {e.message}"
    elif isinstance(e, ssl.SSLCertVerificationError):
        text = f"TLS verification failed: {getattr(e, 'verify_message', '') or e}"
    elif isinstance(e, socket.gaierror):
        text = f"name not resolved: {e.strerror or e}"
    elif isinstance(e, socket.timeout):
        text = f"timed out after {timeout:g} s" if timeout else "timed out"
    elif isinstance(e, (TLSRefused, ConnectionLost)):
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())


def error_class(e):
    """The key of a failure in the writer's counts: the SQLSTATE, else the exception class."""
    if isinstance(e, PgError):
        return e.code or "PgError"
    if isinstance(e, socket.timeout):
        return "timeout"
    return type(e).__name__


# -- the invocation ----------------------------------------------------------------------------

_REQUIRED = object()


class Job:
    """One invocation: its arguments, credentials, deadline and connections."""

    def __init__(self, event, context, action, start):
        self.event, self.action, self.start = event, action, start
        creds = event.get("credentials")
        if not isinstance(creds, dict) or not creds.get("username") or not isinstance(creds.get("password"), str):
            raise self.fail('the event has no "credentials": {"username", "password"}')
        self.user, self.password = str(creds["username"]), creds["password"]
        ca = event.get("ca_bundle")
        if not isinstance(ca, str) or "BEGIN CERTIFICATE" not in ca:
            raise self.fail('the event has no "ca_bundle" (PEM text): the server cannot be verified without it')
        try:
            tls_context(ca)
        except (ssl.SSLError, ValueError) as e:
            raise self.fail(f'"ca_bundle" is not a usable PEM bundle ({describe(e)})') from None
        self.ca_bundle = ca
        self.dbname = str(event.get("database") or "postgres")
        self.port = self.number("port", DEFAULT_PORT, int)
        self.connect_timeout = self.number("connect_timeout_s", CONNECT_TIMEOUT_S)
        if context is not None and hasattr(context, "get_remaining_time_in_millis"):
            self.end = start + context.get_remaining_time_in_millis() / 1000.0
        else:
            self.end = start + NO_CONTEXT_S
        self.deadline = self.end - MARGIN_S  # when the work stops

    def fail(self, text):
        return AgentError(f"agent {self.action}: {text}")

    def arg(self, name, default=_REQUIRED):
        value = self.event.get(name)
        if value is None:
            if default is _REQUIRED:
                raise self.fail(f'the event has no "{name}"')
            return default
        return value

    def number(self, name, default=_REQUIRED, conv=float):
        value = self.arg(name, default)
        try:
            value = conv(value)
        except (TypeError, ValueError):
            raise self.fail(f'"{name}" must be a number, not {value!r}') from None
        if value < 0:
            raise self.fail(f'"{name}" must not be negative')
        return value

    def host(self):
        host = self.arg("host")
        if not isinstance(host, str) or not host.strip():
            raise self.fail('"host" must be a host name')
        return host.strip()

    def roles(self):
        """[{"role", "previous"}] (a bare name means previous null)."""
        raw = self.arg("roles")
        if not isinstance(raw, list):
            raise self.fail('"roles" must be a list of {"role", "previous"}')
        out = []
        for r in raw:
            r = {"role": r, "previous": None} if isinstance(r, str) else r
            if not isinstance(r, dict) or not isinstance(r.get("role"), str) or not r["role"]:
                raise self.fail(f'each of "roles" must be {{"role", "previous"}}, not {r!r}')
            prev = r.get("previous")
            if isinstance(prev, bool):
                prev = "on" if prev else "off"
            out.append({"role": r["role"], "previous": None if prev is None else str(prev)})
        return out

    def time_left(self):
        return self.deadline - time.monotonic()

    def ms(self):
        return int(round((time.monotonic() - self.start) * 1000))

    def open(self, host, timeout=None, application_name="pgdr-agent"):
        """connect(), raw exceptions (the writer counts them)."""
        return connect(host, self.port, self.user, self.password, self.dbname, self.ca_bundle,
                       timeout or self.connect_timeout, application_name)

    def connect(self, host):
        """connect(), or AgentError "cannot connect to HOST:PORT (why)"."""
        timeout = max(min(self.connect_timeout, self.end - time.monotonic() - 1), 0.1)
        try:
            return self.open(host, timeout)
        except Exception as e:
            why = describe(e, timeout)
            if isinstance(e, ssl.SSLCertVerificationError):
                try:
                    canonical = canonical_name(host)
                except OSError:
                    canonical = None
                if canonical and canonical.lower() != host.lower():
                    why += f"; certificate checked against {canonical}, the name {host} resolves to"
            raise self.fail(f"cannot connect to {host}:{self.port} ({why})") from None

    def sql(self, conn, sql, what):
        """conn.query(), or AgentError naming what failed."""
        try:
            return conn.query(sql, timeout=max(min(QUERY_TIMEOUT_S, self.end - time.monotonic() - 1), 0.1))
        except Exception as e:
            raise self.fail(f"{what} on {conn.host}:{self.port} failed ({describe(e)})") from None


def _in_recovery(job, conn):
    return job.sql(conn, "SELECT pg_is_in_recovery()", "pg_is_in_recovery()")[0][0] == "t"


# -- actions -----------------------------------------------------------------------------------

ROLES_SQL = """
SELECT r.rolname,
       (SELECT substr(c, strpos(c, '=') + 1)
          FROM pg_db_role_setting s, unnest(s.setconfig) AS c
         WHERE s.setrole = r.oid AND s.setdatabase = 0
           AND split_part(c, '=', 1) = 'default_transaction_read_only'
         LIMIT 1)
  FROM pg_roles r
 WHERE (r.rolcanlogin AND NOT r.rolsuper
        AND r.rolname NOT IN ('rdsadmin', 'rdsrepladmin', 'rdstopmgr')
        AND left(r.rolname, 4) <> 'rds_' AND left(r.rolname, 3) <> 'pg_')
    OR r.rolname = current_user
 ORDER BY r.rolname
"""


def check(job):
    """Connects; the server's state and the login roles a fence would guard: every role that
    can log in, but not RDS's own (rdsadmin, rdsrepladmin, rdstopmgr, rds_*), not pg_*, and no
    superuser (on RDS only rdsadmin is one, and the master user may not alter a superuser),
    and always the connecting user. Run it before the first fence: afterwards `previous`
    reads the guard itself ("on")."""
    host = job.host()
    with job.connect(host) as c:
        rec, version = job.sql(c, "SELECT pg_is_in_recovery(), current_setting('server_version')", "check")[0]
        roles = [{"role": r, "previous": p} for r, p in job.sql(c, ROLES_SQL, "reading pg_roles")]
    log.info("agent check: %s:%s in_recovery=%s version=%s roles=%s", host, job.port, rec, version,
             [r["role"] for r in roles])
    return {"ok": True, "in_recovery": rec == "t", "server_version": version, "roles": roles}


def fence(job):
    """On the primary: guard every role (new sessions default to read-only), end every other
    client session, wait until none that began before the guard is left (sessions that began
    after it are guarded; they are ended too while we wait), then read pg_current_wal_lsn().

    The guard is a default, not a wall: a session may still SET default_transaction_read_only
    = off itself. pgdr's fence proper is the network (security group) and the promotion; this
    stops the applications' writes for the planned switchover. Idempotent: a rerun re-applies
    (its own session turns the guard off for itself first). A role that no longer exists is
    skipped and reported."""
    host, roles = job.host(), job.roles()
    timeout_s = job.number("timeout_s", 30.0)
    with job.connect(host) as c:
        if _in_recovery(job, c):
            raise job.fail(f"{host} is in recovery (a replica), not the primary: nothing to fence")
        job.sql(c, "SET default_transaction_read_only = off", "SET default_transaction_read_only")
        guarded, skipped = [], []
        for r in roles:
            try:
                c.query(f"ALTER ROLE {ident(r['role'])} SET default_transaction_read_only = on")
                guarded.append(r["role"])
            except PgError as e:
                if e.code != "42704":  # undefined_object: the role is gone
                    raise job.fail(f"cannot guard role {r['role']} on {host} ({describe(e)})") from None
                skipped.append(r["role"])
            except Exception as e:
                raise job.fail(f"cannot guard role {r['role']} on {host} ({describe(e)})") from None
        cutoff = job.sql(c, "SELECT clock_timestamp()", "clock_timestamp()")[0][0]
        sessions = ("SELECT pid, backend_start < {cutoff}::timestamptz, pg_terminate_backend(pid) "
                    "FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND pid <> pg_backend_pid() AND coalesce(usename, '') <> 'rdsadmin'").format(cutoff=lit(cutoff))
        ended, bound = set(), time.monotonic() + min(timeout_s, max(job.time_left(), 0))
        while True:
            rows = job.sql(c, sessions, "ending the sessions")
            ended |= {int(pid) for pid, _, ok in rows if ok == "t"}
            old = sorted(int(pid) for pid, is_old, _ in rows if is_old == "t")
            if not old:
                break
            if time.monotonic() >= bound:
                raise job.fail(f"{len(old)} session(s) begun before the guard still on {host} after "
                               f"{timeout_s:g} s (pids {', '.join(map(str, old[:10]))}); the guard stays applied")
            sleep(0.05)
        lsn = job.sql(c, "SELECT pg_current_wal_lsn()", "pg_current_wal_lsn()")[0][0]
    log.info("agent fence: %s:%s guarded %s (skipped %s), %d session(s) ended, lsn %s",
             host, job.port, guarded, skipped, len(ended), lsn)
    return {"lsn": lsn, "sessions_ended": len(ended), "guarded": guarded, "skipped": skipped}


def unguard(job):
    """Restore each role: RESET when its previous setting was null, else SET it back.

    ALTER ROLE writes catalog data (pg_db_role_setting), and catalog data replicates: the guard
    a fence set on the old primary reaches the replica, so after promotion the new primary
    carries it too. That is why pgdr runs unguard on the new primary as well (and on the old one
    once it is back). Idempotent; a role that no longer exists is skipped and reported."""
    host, roles = job.host(), job.roles()
    restored, skipped = [], []
    with job.connect(host) as c:
        if _in_recovery(job, c):
            raise job.fail(f"{host} is in recovery (a replica): roles can only be changed on the primary")
        job.sql(c, "SET default_transaction_read_only = off", "SET default_transaction_read_only")
        for r in roles:
            exists = job.sql(c, f"SELECT count(*) FROM pg_roles WHERE rolname = {lit(r['role'])}", "reading pg_roles")
            if exists[0][0] == "0":
                skipped.append(r["role"])
                continue
            if r["previous"] is None:
                stmt = f"ALTER ROLE {ident(r['role'])} RESET default_transaction_read_only"
            else:
                stmt = f"ALTER ROLE {ident(r['role'])} SET default_transaction_read_only = {lit(r['previous'])}"
            try:
                c.query(stmt)
                restored.append(r["role"])
            except PgError as e:
                if e.code != "42704":
                    raise job.fail(f"cannot restore role {r['role']} on {host} ({describe(e)})") from None
                skipped.append(r["role"])
            except Exception as e:
                raise job.fail(f"cannot restore role {r['role']} on {host} ({describe(e)})") from None
    log.info("agent unguard: %s:%s restored %s, skipped %s", host, job.port, restored, skipped)
    return {"restored": restored, "skipped": skipped}


def catchup(job):
    """On the replica: poll pg_last_wal_replay_lsn() until it reaches target_lsn or timeout_s
    passes (caught_up false then, not an error). The host must be in recovery."""
    host = job.host()
    target = str(job.arg("target_lsn")).strip()
    if not LSN_RE.match(target):
        raise job.fail(f'"target_lsn" must be an LSN such as 0/3000060, not {target!r}')
    timeout_s = job.number("timeout_s", 60.0)
    poll_s = max(job.number("poll_s", 0.5), 0.01)
    q = (f"SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), "
         f"coalesce(pg_wal_lsn_diff(pg_last_wal_replay_lsn(), {lit(target)}::pg_lsn) >= 0, false)")
    with job.connect(host) as c:
        t0 = time.monotonic()
        bound = t0 + min(timeout_s, max(job.time_left(), 0))
        while True:
            rec, replayed, done = job.sql(c, q, "reading the replay position")[0]
            if rec != "t":
                raise job.fail(f"{host} is not in recovery: not a replica (promoted already?)")
            now = time.monotonic()
            if done == "t" or now >= bound:
                break
            sleep(min(poll_s, max(bound - now, 0.001)))
    waited = int(round((time.monotonic() - t0) * 1000))
    log.info("agent catchup: %s:%s replayed %s, target %s, caught_up=%s after %s ms",
             host, job.port, replayed, target, done == "t", waited)
    return {"caught_up": done == "t", "target_lsn": target, "replayed_lsn": replayed, "waited_ms": waited}


def write(job):
    """The drill's marker writer, acting as an application would.

    Connects through `host`, resolving it afresh at every (re)connect (so it follows DNS),
    creates the table if needed (retrying until that works or the duration ends), then every
    interval_ms one INSERT of (run_id, seq) in autocommit; seq grows by one per attempt. An
    INSERT whose CommandComplete arrived is acknowledged; an error, a timeout (the session's
    statement_timeout, statement_timeout_s=2, or no answer within it + 1 s) or a lost connection
    is a failure, and the connection is dropped and reopened for the next attempt. Stops after
    duration_s, or, with stop_after_resumed_s, once a failure was seen and writes have succeeded
    again for that long, and always 5 s before the Lambda deadline.

    Returns the acknowledged seqs as ranges, their count and the failures' (per SQLSTATE or
    exception class), the first and last ack and the longest time between two consecutive acks
    (the write-unavailability window this writer saw; 0.0 and gap null with fewer than two
    acks), in seconds since the invocation began. Durations in ms are integers."""
    host = job.host()
    run_id = job.arg("run_id")
    if not isinstance(run_id, str) or not run_id:
        raise job.fail('"run_id" must be a non-empty string')
    duration_s = job.number("duration_s")
    interval = max(job.number("interval_ms", 100.0), 1.0) / 1000.0
    table_name = job.arg("table", DEFAULT_TABLE)
    try:
        table = table_ident(table_name)
    except ValueError as e:
        raise job.fail(str(e)) from None
    stop_after = job.event.get("stop_after_resumed_s")
    stop_after = None if stop_after is None else job.number("stop_after_resumed_s")
    connect_timeout = job.number("connect_timeout_s", 2.0)
    stmt_s = max(job.number("statement_timeout_s", 2.0), 0.001)
    t0 = job.start
    end = min(t0 + duration_s, job.deadline)

    def attempt_timeout(want):  # never past the Lambda deadline (minus a second)
        return max(min(want, job.end - 1 - time.monotonic()), 0.05)

    def open_conn():
        c = job.open(host, attempt_timeout(connect_timeout), "pgdr-drill-writer")
        try:
            c.query(f"SET statement_timeout = {max(int(stmt_s * 1000), 1)}", timeout=attempt_timeout(stmt_s + 1))
        except BaseException:
            c.close()
            raise
        return c

    conn, setup_errors, last_error = None, {}, None
    while True:
        try:
            conn = conn or open_conn()
            conn.query(f"CREATE TABLE IF NOT EXISTS {table} (run_id text, seq bigint, "
                       f"at timestamptz DEFAULT now(), PRIMARY KEY (run_id, seq))",
                       timeout=attempt_timeout(stmt_s + 1))
            break
        except Exception as e:
            last_error = e
            setup_errors[error_class(e)] = setup_errors.get(error_class(e), 0) + 1
            if conn is not None:
                conn.close()
                conn = None
            if time.monotonic() + interval >= end:
                raise job.fail(f"table {table_name} not ready on {host}:{job.port} after "
                               f"{time.monotonic() - t0:.1f} s ({describe(last_error)})") from None
            sleep(interval)

    insert = f"INSERT INTO {table} (run_id, seq) VALUES ({lit(run_id)}, {{}})"
    seq, acks, errors, failed = 0, [], {}, 0
    outage, resumed_at, stopped, last_ok = False, None, "duration", True
    next_at = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                stopped = "duration" if end == t0 + duration_s else "deadline"
                break
            if stop_after is not None and resumed_at is not None and now - resumed_at >= stop_after:
                stopped = "resumed"
                break
            seq += 1
            try:
                if conn is None:
                    conn = open_conn()
                conn.query(insert.format(seq), timeout=attempt_timeout(stmt_s + 1))
                t = time.monotonic()
                acks.append((seq, t - t0))
                last_ok = True
                if outage and resumed_at is None:
                    resumed_at = t
            except Exception as e:
                failed += 1
                errors[error_class(e)] = errors.get(error_class(e), 0) + 1
                outage, resumed_at, last_ok = True, None, False
                if conn is not None:
                    conn.close()
                    conn = None
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # a slow attempt: the next one at once, no burst to catch up
                next_at = now
            delay = min(next_at, end) - now
            if delay > 0:
                sleep(delay)
    finally:
        if conn is not None:
            conn.close()

    longest, gap = None, None
    for (_, a), (_, b) in zip(acks, acks[1:]):
        if longest is None or b - a > longest:
            longest, gap = b - a, {"from_s": round(a, 3), "to_s": round(b, 3)}
    result = {
        "run_id": run_id, "attempts": seq, "acked": ranges(s for s, _ in acks), "acked_count": len(acks),
        "failed_count": failed,
        "first_ack_s": round(acks[0][1], 3) if acks else None,
        "last_ack_s": round(acks[-1][1], 3) if acks else None,
        "longest_gap_s": 0.0 if longest is None else round(longest, 3), "gap": gap,
        "errors": errors, "setup_errors": setup_errors, "ended_in_outage": not last_ok, "stopped": stopped,
    }
    log.info("agent write: %s:%s run %s: %d attempts, %d acked, %d failed %s, longest gap %s s, stopped: %s",
             host, job.port, run_id, seq, len(acks), failed, errors, result["longest_gap_s"], stopped)
    return result


def markers(job):
    """The seqs of run_id present in the table (read on whatever `host` reaches), as ranges."""
    host = job.host()
    run_id = job.arg("run_id")
    table_name = job.arg("table", DEFAULT_TABLE)
    try:
        table = table_ident(table_name)
    except ValueError as e:
        raise job.fail(str(e)) from None
    q = (f"SELECT min(seq), max(seq), count(*) FROM (SELECT seq, seq - row_number() OVER (ORDER BY seq) AS g "
         f"FROM {table} WHERE run_id = {lit(run_id)}) AS s GROUP BY g ORDER BY 1")
    with job.connect(host) as c:
        rec = _in_recovery(job, c)
        try:
            rows = c.query(q, timeout=max(min(QUERY_TIMEOUT_S, job.end - time.monotonic() - 1), 0.1))
        except PgError as e:
            if e.code != "42P01":  # undefined_table
                raise job.fail(f"reading {table_name} on {host}:{job.port} failed ({describe(e)})") from None
            rows, exists = [], False
        except Exception as e:
            raise job.fail(f"reading {table_name} on {host}:{job.port} failed ({describe(e)})") from None
        else:
            exists = True
    present = [[int(lo), int(hi)] for lo, hi, _ in rows]
    count = sum(int(n) for _, _, n in rows)
    log.info("agent markers: %s:%s run %s: %d present in %d range(s)", host, job.port, run_id, count, len(present))
    return {"present": present, "count": count, "table_exists": exists, "in_recovery": rec}


ACTIONS = {"check": check, "fence": fence, "unguard": unguard, "catchup": catchup, "write": write,
           "markers": markers}


def handler(event, context):
    start = time.monotonic()
    secret = None
    if isinstance(event, dict) and isinstance(event.get("credentials"), dict):
        secret = event["credentials"].get("password")
        secret = secret if isinstance(secret, str) else None
    error = None
    if secret:
        _active_secrets.append(secret)
    try:
        if not isinstance(event, dict):
            raise AgentError("agent: the event must be a JSON object")
        action = event.get("action")
        fn = ACTIONS.get(action) if isinstance(action, str) else None
        if fn is None:
            raise AgentError(f"agent: unknown action {action!r} (one of {', '.join(ACTIONS)})")
        log.info("agent %s: %s", action, json.dumps(redact(event), default=str))
        job = Job(event, context, action, start)
        out = fn(job)
        out["ms"] = job.ms()
        return scrub_obj(out, secret)
    except AgentError as e:
        error = str(e)
    except Exception as e:  # a bug or an unforeseen failure: still one line, still scrubbed
        action = event.get("action") if isinstance(event, dict) else None
        error = f"agent {action}: {type(e).__name__}: {e}"
    finally:
        if secret:
            _active_secrets.remove(secret)
    # Raised outside the except clause, so no original exception (and none of its text) rides
    # along as __context__.
    error = scrub(" ".join(error.split()), secret)
    log.error("%s", error)
    raise AgentError(error)
