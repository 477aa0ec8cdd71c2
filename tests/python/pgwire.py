"""A minimal PostgreSQL wire-protocol client (protocol 3.0), standard library only.

Enough for the test harness: TCP or Unix-socket connection, trust / cleartext / md5 /
SCRAM-SHA-256 authentication, the simple query protocol (text results), errors with their
SQLSTATE. No TLS, no extended protocol, no COPY: values are put in SQL text with `literal()`.

    with connect("127.0.0.1", 5432, "pgdr", "secret", timeout=2) as conn:
        conn.query("SELECT 1")            # -> [("1",)]
"""
import base64
import hashlib
import hmac
import os
import socket
import struct

PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103


class PgError(Exception):
    """An ErrorResponse from the server. `code` is the SQLSTATE, `severity` ERROR/FATAL/PANIC."""

    def __init__(self, fields):
        self.fields = fields
        self.severity = fields.get("V") or fields.get("S") or "ERROR"
        self.code = fields.get("C", "")
        self.message = fields.get("M", "")
        super().__init__(f"{self.severity} {self.code}: {self.message}")


class PgConnectionLost(ConnectionError):
    """The server closed the connection (or it broke) in the middle of an exchange."""


def literal(value):
    """SQL literal for None, bool, int, float or str (standard_conforming_strings on)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("'", "''") + "'"


_scram_cache = {}


def _salted_password(password, salt, iterations):
    key = (password, salt, iterations)
    if key not in _scram_cache:
        _scram_cache[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return _scram_cache[key]


class Connection:
    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout
        self.params = {}
        self.backend_pid = None
        self.notices = []
        self.closed = False

    # -- framing --------------------------------------------------------------------------
    def _send(self, type_byte, payload=b""):
        try:
            self.sock.sendall(type_byte + struct.pack("!i", len(payload) + 4) + payload)
        except OSError as e:
            self.close()
            raise PgConnectionLost(f"send failed: {e}") from e

    def _recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except socket.timeout:
                self.close()
                raise
            except OSError as e:
                self.close()
                raise PgConnectionLost(f"receive failed: {e}") from e
            if not chunk:
                self.close()
                raise PgConnectionLost("server closed the connection")
            buf += chunk
        return bytes(buf)

    def _recv_msg(self):
        head = self._recv_exact(5)
        type_byte, length = head[:1], struct.unpack("!i", head[1:])[0]
        return type_byte, self._recv_exact(length - 4)

    @staticmethod
    def _fields(payload):
        out = {}
        for part in payload.split(b"\0"):
            if part:
                out[chr(part[0])] = part[1:].decode("utf-8", "replace")
        return out

    def _param_status(self, payload):
        parts = payload.split(b"\0")
        self.params[parts[0].decode()] = parts[1].decode() if len(parts) > 1 else ""

    # -- startup and authentication -------------------------------------------------------
    def _startup(self, user, password, dbname, application_name):
        params = {"user": user, "database": dbname, "application_name": application_name,
                  "client_encoding": "UTF8"}
        body = struct.pack("!i", PROTOCOL_3_0)
        for k, v in params.items():
            body += k.encode() + b"\0" + v.encode() + b"\0"
        body += b"\0"
        try:
            self.sock.sendall(struct.pack("!i", len(body) + 4) + body)
        except OSError as e:
            self.close()
            raise PgConnectionLost(f"send failed: {e}") from e
        scram = None
        while True:
            t, payload = self._recv_msg()
            if t == b"R":
                code = struct.unpack("!i", payload[:4])[0]
                if code == 0:
                    continue
                if password is None:
                    self.close()
                    raise PgError({"S": "FATAL", "C": "28P01",
                                   "M": f"server asks for a password (method {code}) and none was given"})
                if code == 3:  # cleartext
                    self._send(b"p", password.encode() + b"\0")
                elif code == 5:  # md5
                    salt = payload[4:8]
                    inner = hashlib.md5(password.encode() + user.encode()).hexdigest().encode()
                    self._send(b"p", b"md5" + hashlib.md5(inner + salt).hexdigest().encode() + b"\0")
                elif code == 10:  # SASL: pick SCRAM-SHA-256
                    mechs = [m.decode() for m in payload[4:].split(b"\0") if m]
                    if "SCRAM-SHA-256" not in mechs:
                        self.close()
                        raise PgError({"S": "FATAL", "C": "28000", "M": f"no supported SASL mechanism in {mechs}"})
                    nonce = base64.b64encode(os.urandom(18)).decode()
                    scram = {"first_bare": f"n=,r={nonce}", "nonce": nonce}
                    first = ("n,," + scram["first_bare"]).encode()
                    self._send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first)
                elif code == 11:  # SASLContinue: server-first-message
                    server_first = payload[4:].decode()
                    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
                    if not attrs["r"].startswith(scram["nonce"]):
                        self.close()
                        raise PgError({"S": "FATAL", "C": "28000", "M": "SCRAM: server nonce mismatch"})
                    salted = _salted_password(password, base64.b64decode(attrs["s"]), int(attrs["i"]))
                    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
                    stored_key = hashlib.sha256(client_key).digest()
                    final_wo_proof = f"c=biws,r={attrs['r']}"
                    auth_msg = f"{scram['first_bare']},{server_first},{final_wo_proof}".encode()
                    signature = hmac.new(stored_key, auth_msg, hashlib.sha256).digest()
                    proof = bytes(a ^ b for a, b in zip(client_key, signature))
                    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
                    scram["expect"] = base64.b64encode(
                        hmac.new(server_key, auth_msg, hashlib.sha256).digest()).decode()
                    self._send(b"p", f"{final_wo_proof},p={base64.b64encode(proof).decode()}".encode())
                elif code == 12:  # SASLFinal
                    final = dict(kv.split("=", 1) for kv in payload[4:].decode().split(","))
                    if final.get("v") != scram["expect"]:
                        self.close()
                        raise PgError({"S": "FATAL", "C": "28000", "M": "SCRAM: bad server signature"})
                else:
                    self.close()
                    raise PgError({"S": "FATAL", "C": "28000", "M": f"unsupported auth method {code}"})
            elif t == b"E":
                self.close()
                raise PgError(self._fields(payload))
            elif t == b"S":
                self._param_status(payload)
            elif t == b"K":
                self.backend_pid = struct.unpack("!i", payload[:4])[0]
            elif t == b"N":
                self.notices.append(self._fields(payload))
            elif t == b"Z":
                return

    # -- queries ---------------------------------------------------------------------------
    def query(self, sql, timeout=None):
        """Run SQL (one or more statements) with the simple protocol. Returns the rows of the
        last statement that returned rows, as tuples of str (or None for NULL). Raises PgError
        for an ErrorResponse (after the server is ready again, so the connection stays usable
        unless the error was FATAL), PgConnectionLost or socket.timeout otherwise."""
        if self.closed:
            raise PgConnectionLost("connection is closed")
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        self._send(b"Q", sql.encode() + b"\0")
        rows, current, error = [], None, None
        self.last_status = None
        while True:
            t, payload = self._recv_msg()
            if t == b"T":
                current = []
            elif t == b"D":
                n = struct.unpack("!h", payload[:2])[0]
                pos, row = 2, []
                for _ in range(n):
                    size = struct.unpack("!i", payload[pos:pos + 4])[0]
                    pos += 4
                    if size < 0:
                        row.append(None)
                    else:
                        row.append(payload[pos:pos + size].decode())
                        pos += size
                current.append(tuple(row))
            elif t == b"C":
                self.last_status = payload.rstrip(b"\0").decode()
                if current is not None:
                    rows = current
                current = None
            elif t == b"E":
                error = PgError(self._fields(payload))
                if error.severity in ("FATAL", "PANIC"):
                    self.close()
                    raise error
            elif t == b"N":
                self.notices.append(self._fields(payload))
            elif t == b"S":
                self._param_status(payload)
            elif t in (b"G", b"H", b"W"):
                self.close()
                raise PgError({"S": "ERROR", "C": "0A000", "M": "COPY is not supported by pgwire"})
            elif t == b"Z":
                if error:
                    raise error
                return rows
            # 'I' (empty query), 'A' (notification) and others: ignored

    def scalar(self, sql, timeout=None):
        rows = self.query(sql, timeout)
        return rows[0][0] if rows else None

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.settimeout(0.2)
            self.sock.sendall(b"X" + struct.pack("!i", 4))
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(host=None, port=5432, user="postgres", password=None, dbname="postgres", timeout=5.0,
            unix_dir=None, application_name="pgwire"):
    """Open a connection: TCP to host:port, or the Unix socket `<unix_dir>/.s.PGSQL.<port>`.
    `timeout` bounds the connect, the authentication and (by default) each query."""
    if unix_dir is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(os.path.join(unix_dir, f".s.PGSQL.{port}"))
        except OSError:
            sock.close()
            raise
    else:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(sock, timeout)
    try:
        conn._startup(user, password, dbname, application_name)
    except BaseException:
        conn.close()
        raise
    return conn
