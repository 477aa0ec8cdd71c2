"""Real PostgreSQL for the tests: a primary and a streaming-replication standby on loopback.

Standard library only; the server binaries come from Debian's `postgresql` package, installed
by `scripts/setup-postgres` when missing. As root, the servers run as the system user
`pgdrtest` (created when missing; initdb refuses root); otherwise as the current user.

    with PgPair(user="pgdr", password="s3cret") as pair:      # both clusters up, streaming
        pair.primary.sql("CREATE TABLE t (x int)")            # admin path (Unix socket, trust)
        with pair.primary.connect() as conn:                  # what an application does:
            conn.query("INSERT INTO t VALUES (1)")            # TCP + SCRAM-SHA-256
        pair.wait_caught_up()
        pair.standby.sql("SELECT count(*) FROM t")            # [("1",)]
        pair.primary.freeze()                                 # SIGSTOP: port open, server hung
        pair.primary.thaw()
        pair.primary.fence()                                  # refuse + terminate + read-only
        pair.promote()                                        # the standby becomes writable
    # stopped, temp dir removed (also at exit, and on a failed test through the fixture)

Each cluster listens on its own free port on `host` (127.0.0.1 by default; any 127.0.0.0/8
address works, so a test may give the two "regions" distinct addresses) and on a Unix socket
in the pair's temp directory, which only the server's user (and root) can enter. The TCP path
asks for the password (scram-sha-256); the Unix socket trusts, so the harness can still act
on a fenced cluster.

Faults and controls, on a PgCluster (`pair.primary`, `pair.standby`):
  stop(mode="fast"|"immediate"), start(), restart(), kill()   SIGKILL all: a power loss
  freeze() / thaw()          SIGSTOP / SIGCONT the postmaster and its children: the kernel
                             still accepts TCP connections on the port, nothing answers
  fence(network=False)       pg_hba.conf rejects every TCP login (applications and
                             replication), client sessions are terminated, and
                             default_transaction_read_only is set (ALTER SYSTEM) as a second
                             guard; the server still answers the protocol
  fence(network=True)        the same, and restarted without a TCP listener: connections are
                             refused, as with the 5432 ingress rules revoked
  unfence()                  reverses either
  block_replication() / unblock_replication()   (primary) WAL senders ended and refused: the
                             standby falls behind, commits go on (asynchronous replication)
  pause_replay() / resume_replay() / replay_pause_state()   (standby) pg_wal_replay_pause();
                             note that a promotion still replays all WAL already received
  promote(), in_recovery(), current_wal_lsn(), replay_lsn(), receive_lsn(), wait_replayed(lsn)
  sql(q) / scalar(q)         admin path (Unix socket, trust; works while fenced)
  connect()                  an application's connection (TCP, password)
And on the pair: wait_caught_up(), promote(), reprotect() (rebuild the old primary as a
standby of the promoted one and swap the roles), close().

TLS: `PgPair(tls_hosts=["db.example.test", ...])` makes both clusters (and the one rebuilt by
reprotect()) serve TLS (`ssl = on`) with one server certificate, signed by a CA made for the
pair with the `openssl` CLI, whose subjectAltName holds every name in tls_hosts, `localhost` and
IP 127.0.0.1 (and the clusters' own addresses). `pair.ca_pem` is the CA certificate (PEM text),
`pair.ca_path` its file; `pair.add_tls_hosts(names)` reissues the certificate with more names
and reloads the servers. Plain connections are still accepted (pg_hba `host` lines match both),
so the harness's own paths (pgwire has no TLS) work unchanged. `tls_handshake()` performs the
client side of a verified handshake (SSLRequest, then TLS with hostname check).

Tuned for speed, not durability: fsync off, 16 MB shared buffers, initdb --no-sync.
"""
import atexit
import errno
import glob
import os
import pathlib
import pwd
import random
import shutil
import ipaddress
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time

import pgwire

REPO = pathlib.Path(__file__).resolve().parents[2]
SETUP_POSTGRES = REPO / "scripts" / "setup-postgres"
OS_USER = "pgdrtest"
TMP_PREFIX = "pgdr-pg-"
# Where the pairs' temp directories go. /tmp by default; a tmpfs (PGDR_PG_TMPDIR=/dev/shm) makes
# initdb and pg_basebackup several times faster where /tmp's file creation is slow.
BASE_DIR = os.environ.get("PGDR_PG_TMPDIR") or "/tmp"
_SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", "")
_RUNUSER = shutil.which("runuser", path=_SBIN_PATH) or "runuser"


class PgUnavailable(RuntimeError):
    """PostgreSQL's server binaries are missing and could not be installed."""


class PgHarnessError(RuntimeError):
    """A cluster operation failed (the message carries the end of the server log)."""


_bindir = None
_bindir_error = None
_bindir_lock = threading.Lock()


def bindir():
    """The server bin directory (runs scripts/setup-postgres once per process, installing
    PostgreSQL when missing). Raises PgUnavailable when it cannot."""
    global _bindir, _bindir_error
    with _bindir_lock:
        if _bindir_error is not None:  # tried once already in this process: no second install
            raise _bindir_error
        if _bindir is None:
            try:
                out = subprocess.run([str(SETUP_POSTGRES)], capture_output=True, text=True, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as e:
                _bindir_error = PgUnavailable(f"scripts/setup-postgres could not run: {e}")
                raise _bindir_error from e
            if out.returncode != 0 or not out.stdout.strip():
                tail = "\n".join(out.stderr.strip().splitlines()[-15:])
                _bindir_error = PgUnavailable(f"scripts/setup-postgres failed (exit {out.returncode}): {tail}")
                raise _bindir_error
            _bindir = out.stdout.strip().splitlines()[-1]
        return _bindir


def lsn_to_int(text):
    """'16/B374D848' -> int; None stays None."""
    if text is None:
        return None
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def int_to_lsn(value):
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def _ensure_os_user():
    """As root: the unprivileged user the servers run as (created when missing). Else None."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        useradd = shutil.which("useradd", path=_SBIN_PATH) or "useradd"
        out = subprocess.run([useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
                              "--shell", "/usr/sbin/nologin", OS_USER], capture_output=True, text=True)
        try:
            pwd.getpwnam(OS_USER)  # a concurrent run may have created it first
        except KeyError:
            raise PgHarnessError(f"cannot create the system user {OS_USER}: {out.stderr.strip()}") from None
    return OS_USER


def _pid_alive(pid):
    """Is there a live (not zombie) process with this pid?"""
    try:
        os.kill(pid, 0)
    except OSError as e:
        if e.errno != errno.EPERM:
            return False
    st = _proc_stat(pid)
    return st is not None and st[0] not in "ZX"


def _proc_stat(pid):
    """(state, ppid) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _children(ppid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st and st[1] == ppid:
                out.append(int(entry))
    return out


def _port_range_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def free_port(host="127.0.0.1", taken=()):
    """A free TCP port below the ephemeral range (so an outgoing connection cannot occupy it
    while its cluster is stopped)."""
    high = min(_port_range_low(), 65536) - 1
    low = max(1025, min(15000, high - 2000))
    for _ in range(200):
        port = random.randint(low, high)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise PgHarnessError("no free port found")


def _openssl(args, cwd, what):
    exe = shutil.which("openssl", path=_SBIN_PATH)
    if not exe:
        raise PgUnavailable("the openssl CLI is missing (scripts/setup-postgres installs Debian's openssl as root)")
    out = subprocess.run([exe] + list(args), capture_output=True, text=True, timeout=60, cwd=cwd,
                         env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": str(cwd)})
    if out.returncode != 0:
        raise PgHarnessError(f"openssl could not {what} (exit {out.returncode}): {out.stderr.strip()}")


class CertAuthority:
    """A throwaway certificate authority (EC P-256, 30 days) in `directory`: `ca.pem` (the
    certificate, `path`/`pem`) and `ca.key` (0600, never leaves the directory). `issue()` signs
    server certificates. Uses the `openssl` CLI."""

    def __init__(self, directory, common_name="pgdr test CA"):
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "ca.pem"
        self.key_path = self.dir / "ca.key"
        _openssl(["req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                  "-nodes", "-keyout", str(self.key_path), "-out", str(self.path), "-days", "30", "-sha256",
                  "-subj", "/CN=" + common_name.replace("/", " "),
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign"], self.dir, "make the test CA")
        os.chmod(self.key_path, 0o600)
        os.chmod(self.path, 0o644)
        self.pem = self.path.read_text()

    def issue(self, stem, dns_names, ips=("127.0.0.1",), owner=None):
        """A server certificate for every name in dns_names and address in ips (subjectAltName;
        the first DNS name is also the CN). Writes `<stem>.crt` and `<stem>.key` (mode 0600,
        chowned to the OS user `owner` when given), each replaced atomically (a running server
        may reload them). Returns (cert_path, key_path)."""
        names = [str(n).strip().rstrip(".") for n in dns_names if str(n).strip()]
        for n in names:
            if not all(c.isalnum() or c in "-._*" for c in n):
                raise ValueError(f"not a DNS name for a certificate: {n!r}")
        alt = [f"DNS:{n}" for n in names] + [f"IP:{ipaddress.ip_address(a)}" for a in ips]
        if not alt:
            raise ValueError("a certificate needs at least one name or address")
        key_tmp, csr, ext, crt_tmp = (self.dir / f"{stem}.new.{s}" for s in ("key", "csr", "ext", "crt"))
        try:
            _openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", str(key_tmp), "-out", str(csr),
                      "-subj", "/CN=" + (names[0] if names else str(ips[0]))], self.dir, "make a server key")
            ext.write_text("basicConstraints = critical,CA:FALSE\n"
                           "keyUsage = critical,digitalSignature,keyEncipherment\n"
                           "extendedKeyUsage = serverAuth\n"
                           "subjectKeyIdentifier = hash\n"
                           "authorityKeyIdentifier = keyid,issuer\n"
                           f"subjectAltName = {','.join(alt)}\n")
            _openssl(["x509", "-req", "-in", str(csr), "-CA", str(self.path), "-CAkey", str(self.key_path),
                      "-set_serial", "0x" + os.urandom(12).hex(), "-days", "30", "-sha256",
                      "-extfile", str(ext), "-out", str(crt_tmp)], self.dir, "sign a server certificate")
            for path in (key_tmp, crt_tmp):
                os.chmod(path, 0o600)  # PostgreSQL refuses a key file others can read
                if owner:
                    pw = pwd.getpwnam(owner)
                    os.chown(path, pw.pw_uid, pw.pw_gid)
            cert, key = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
            os.replace(key_tmp, key)
            os.replace(crt_tmp, cert)
            return cert, key
        finally:
            for path in (key_tmp, csr, ext, crt_tmp):
                path.unlink(missing_ok=True)


def tls_handshake(host, port, server_hostname, cadata, timeout=5.0):
    """The client side of PostgreSQL's TLS start: SSLRequest, `S`, then a TLS handshake that
    verifies the chain against `cadata` (PEM text) and the certificate against
    `server_hostname`. Returns the peer certificate (dict). Raises ssl.SSLCertVerificationError
    on a bad chain or name, PgHarnessError when the server declines TLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=cadata)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack("!ii", 8, pgwire.SSL_REQUEST_CODE))
        answer = sock.recv(1)
        if answer != b"S":
            raise PgHarnessError(f"{host}:{port} answered {answer!r} to SSLRequest, not b'S'")
        with ctx.wrap_socket(sock, server_hostname=server_hostname) as tls:
            return tls.getpeercert()


def cleanup_stale(base_dir=None):
    """Stop and remove the clusters of earlier runs whose process is gone (a killed pytest)."""
    for root in glob.glob(os.path.join(base_dir or BASE_DIR, TMP_PREFIX + "*")):
        try:
            owner = int(pathlib.Path(root, "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        for pidfile in glob.glob(os.path.join(root, "*", "postmaster.pid")):
            try:
                pid = int(pathlib.Path(pidfile).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            if _pid_alive(pid) and _proc_stat(pid):
                for p in [pid] + _children(pid):
                    try:
                        os.kill(p, signal.SIGCONT)
                        os.kill(p, signal.SIGKILL)
                    except OSError:
                        pass
        shutil.rmtree(root, ignore_errors=True)


class PgCluster:
    """One PostgreSQL cluster (data directory + server) in a PgPair's temp directory."""

    def __init__(self, root, name, host, port, user, password, dbname, os_user, bindir_):
        self.root = pathlib.Path(root)
        self.name = name
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.dbname = dbname
        self.os_user = os_user
        self.bindir = bindir_
        self.datadir = self.root / name
        self.log_path = self.root / f"{name}.log"
        self.sockdir = str(self.root)
        self.fenced = False
        self.replication_blocked = False
        self.network_fenced = False
        self.frozen = False
        self.tls = None  # (cert_path, key_path) when the cluster serves TLS

    def __repr__(self):
        return f"PgCluster({self.name} {self.host}:{self.port})"

    @property
    def address(self):
        return (self.host, self.port)

    # -- processes ---------------------------------------------------------------------------
    def _cmd(self, argv, timeout=60, check=True):
        argv = [os.path.join(self.bindir, argv[0])] + list(argv[1:])
        if self.os_user:
            argv = [_RUNUSER, "-u", self.os_user, "--"] + argv
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.root, env=env)
        if check and out.returncode != 0:
            raise PgHarnessError(
                f"{self.name}: {' '.join(argv)} failed (exit {out.returncode}):\n{out.stdout}{out.stderr}"
                f"\n--- server log ---\n{self.log_tail()}")
        return out

    def log_tail(self, lines=25):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def postmaster_pid(self):
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        st = _proc_stat(pid)
        return pid if st and st[0] not in "ZX" else None  # a killed postmaster may stay a zombie

    @property
    def running(self):
        return self.postmaster_pid() is not None

    def pids(self):
        """The postmaster and its children (backends, walsender/receiver, background workers)."""
        pm = self.postmaster_pid()
        if pm is None:
            return []
        return [pm] + [c for c in _children(pm) if (_proc_stat(c) or "Z")[0] not in "ZX"]

    def _chown(self, path):
        if self.os_user:
            pw = pwd.getpwnam(self.os_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _write(self, path, text, mode=0o600):
        path = pathlib.Path(path)
        path.write_text(text)
        os.chmod(path, mode)
        self._chown(path)

    # -- configuration -------------------------------------------------------------------------
    def _write_local_conf(self):
        """Settings of this cluster (its port and address), included last by postgresql.conf."""
        self._write(self.datadir / "pgdr.conf", (
            f"port = {self.port}\n"
            f"listen_addresses = '{'' if self.network_fenced else self.host}'\n"
            f"unix_socket_directories = '{self.sockdir}'\n"
            f"cluster_name = 'pgdr-{self.name}'\n"
            + (f"ssl = on\nssl_cert_file = '{self.tls[0]}'\nssl_key_file = '{self.tls[1]}'\n" if self.tls else "")))

    def _write_hba(self):
        tcp = "reject" if self.fenced else "scram-sha-256"
        repl = "reject" if self.fenced or self.replication_blocked else "scram-sha-256"
        self._write(self.datadir / "pg_hba.conf", (
            "# pgdr test harness (pgpair.py); the Unix socket is the harness's own path\n"
            "local all all trust\n"
            "local replication all trust\n"
            f"host all all 127.0.0.0/8 {tcp}\n"
            f"host replication all 127.0.0.0/8 {repl}\n"))

    def initdb(self):
        pwfile = self.root / f"{self.name}.pw"
        self._write(pwfile, self.password + "\n")
        try:
            self._cmd(["initdb", "-D", str(self.datadir), "-U", self.user, f"--pwfile={pwfile}",
                       "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions"])
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# pgdr test harness (pgpair.py): fast, not durable\n"
                    "shared_buffers = 16MB\n"
                    "max_connections = 60\n"
                    "fsync = off\n"
                    "synchronous_commit = on\n"
                    "full_page_writes = on\n"
                    "wal_level = replica\n"
                    "max_wal_senders = 8\n"
                    "wal_keep_size = 256MB\n"
                    "max_wal_size = 256MB\n"
                    "hot_standby = on\n"
                    "wal_receiver_status_interval = 1s\n"
                    "wal_retrieve_retry_interval = 200ms\n"
                    "password_encryption = 'scram-sha-256'\n"
                    "dynamic_shared_memory_type = posix\n"
                    "log_line_prefix = '%m [%p] %q%u@%d '\n"
                    "include_if_exists = 'pgdr.conf'\n")
        self._write_local_conf()
        self._write_hba()

    def basebackup_from(self, source):
        """Make this cluster a streaming standby of `source` (pg_basebackup -R)."""
        passfile = self.root / f"{self.name}.pgpass"
        # .pgpass fields escape backslash and colon (PostgreSQL docs, "The Password File").
        esc = source.password.replace("\\", "\\\\").replace(":", "\\:")
        self._write(passfile, f"*:*:*:{source.user}:{esc}\n")
        conninfo = (f"host={source.host} port={source.port} user={source.user} passfile={passfile} "
                    f"application_name=pgdr-{self.name}")
        self._cmd(["pg_basebackup", "-D", str(self.datadir), "-R", "-X", "stream", "-c", "fast",
                   "--no-sync", "--no-manifest", "-d", conninfo], timeout=120)
        self.fenced = False
        self.replication_blocked = False
        self.network_fenced = False
        self._write_local_conf()
        self._write_hba()

    def start(self, timeout=30):
        if self.running:
            return
        self._cmd(["pg_ctl", "-D", str(self.datadir), "-l", str(self.log_path), "-w", "-t", str(timeout),
                   "start"], timeout=timeout + 10)

    def stop(self, mode="fast", timeout=30):
        """Stop the server; mode "fast" (clean) or "immediate" (like a crash)."""
        if self.frozen:
            self.thaw()
        if not self.running:
            return
        self._cmd(["pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", str(timeout), "stop"],
                  timeout=timeout + 10)

    def restart(self):
        self.stop()
        self.start()

    def kill(self):
        """SIGKILL the postmaster, then its children, at once: a power loss. Nothing more is
        sent to a standby; `start()` afterwards runs crash recovery."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while any(_proc_stat(p) and _proc_stat(p)[0] not in "ZX" for p in pids) and time.monotonic() < deadline:
            time.sleep(0.005)
        self.frozen = False
        if pids and not any(_proc_stat(p) and _proc_stat(p)[0] not in "ZX" for p in pids):
            # The dead postmaster may stay a zombie for a while (whoever inherits orphans reaps
            # it late), and its lock files name it: the next start would take it for a live
            # server. It is dead, so its lock files go.
            (self.datadir / "postmaster.pid").unlink(missing_ok=True)
            pathlib.Path(self.sockdir, f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def freeze(self):
        """SIGSTOP the postmaster, then its children: the port still accepts TCP connections
        (the kernel completes the handshake) but nothing answers."""
        pm = self.postmaster_pid()
        if pm is None:
            raise PgHarnessError(f"{self.name}: not running, nothing to freeze")
        os.kill(pm, signal.SIGSTOP)
        self.frozen = True
        deadline = time.monotonic() + 5
        while True:
            pids = self.pids()
            for pid in pids[1:]:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except OSError:
                    pass
            if all((_proc_stat(p) or ("T",))[0] in "Tt" for p in pids) or time.monotonic() > deadline:
                return
            time.sleep(0.005)

    def thaw(self):
        for pid in reversed(self.pids()):  # children first, the postmaster last
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        self.frozen = False

    # -- SQL -------------------------------------------------------------------------------------
    def admin(self, timeout=5.0, dbname=None):
        """A superuser connection to the cluster's database over the Unix socket (trust): works
        while fenced."""
        return pgwire.connect(port=self.port, user=self.user, dbname=dbname or self.dbname, timeout=timeout,
                              unix_dir=self.sockdir, application_name="pgdr-harness")

    def sql(self, query, timeout=5.0, dbname=None):
        """Run SQL through the admin path; rows as tuples of str."""
        with self.admin(timeout, dbname) as conn:
            return conn.query(query)

    def scalar(self, query, timeout=5.0):
        rows = self.sql(query, timeout)
        return rows[0][0] if rows else None

    def connect(self, timeout=5.0, dbname=None, application_name="pgdr-test"):
        """A connection as an application makes it: TCP to host:port, password (SCRAM)."""
        return pgwire.connect(self.host, self.port, self.user, self.password, dbname or self.dbname,
                              timeout=timeout, application_name=application_name)

    def in_recovery(self):
        return self.scalar("SELECT pg_is_in_recovery()") == "t"

    def current_wal_lsn(self):
        """pg_current_wal_lsn() as an int (primary only)."""
        return lsn_to_int(self.scalar("SELECT pg_current_wal_lsn()"))

    def replay_lsn(self):
        """pg_last_wal_replay_lsn() as an int (standby; None on a primary that never recovered)."""
        return lsn_to_int(self.scalar("SELECT pg_last_wal_replay_lsn()"))

    def receive_lsn(self):
        """pg_last_wal_receive_lsn() as an int (standby)."""
        return lsn_to_int(self.scalar("SELECT pg_last_wal_receive_lsn()"))

    def wait_replayed(self, lsn, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            got = self.replay_lsn()
            if got is not None and got >= lsn:
                return got
            if time.monotonic() > deadline:
                raise PgHarnessError(f"{self.name}: replay at {int_to_lsn(got or 0)} after {timeout} s, "
                                     f"waiting for {int_to_lsn(lsn)}\n{self.log_tail()}")
            time.sleep(0.02)

    def pause_replay(self, timeout=5.0):
        """pg_wal_replay_pause(); waits until the server reports 'paused' (the request alone
        already stops the replay of further records)."""
        self.sql("SELECT pg_wal_replay_pause()")
        deadline = time.monotonic() + timeout
        while self.replay_pause_state() != "paused" and time.monotonic() < deadline:
            time.sleep(0.01)

    def resume_replay(self):
        self.sql("SELECT pg_wal_replay_resume()")

    def replay_pause_state(self):
        """'not paused', 'pause requested' or 'paused'."""
        return self.scalar("SELECT pg_get_wal_replay_pause_state()")

    def promote(self, timeout=30):
        """Promote this standby (pg_promote, waiting until it accepts writes)."""
        ok = self.scalar(f"SELECT pg_promote(true, {int(timeout)})", timeout=timeout + 5)
        if ok != "t":
            raise PgHarnessError(f"{self.name}: pg_promote returned {ok}\n{self.log_tail()}")

    # -- fence -----------------------------------------------------------------------------------
    def _tcp_login(self):
        """'ok', 'rejected' (pg_hba) or an error text: one application-style login attempt."""
        try:
            with self.connect(timeout=2.0):
                return "ok"
        except pgwire.PgError as e:
            return "rejected" if e.code == "28000" else f"error {e}"
        except (OSError, socket.timeout) as e:
            return f"error {e}"

    def _wait_login(self, want, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            got = self._tcp_login()
            if got == want:
                return
            if time.monotonic() > deadline:
                raise PgHarnessError(f"{self.name}: TCP login is {got!r}, want {want!r}\n{self.log_tail()}")
            time.sleep(0.02)

    def terminate_sessions(self):
        """End every client session (not the harness's own, not replication). Returns how many."""
        rows = self.sql("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
        return int(rows[0][0])

    def fence(self, network=False):
        """Refuse new TCP connections, end the existing client sessions, and make new
        transactions read-only as a second guard. Returns the number of sessions ended.

        network=False: pg_hba.conf rejects every TCP login (the server still answers the
        protocol, so the probe finds it alive); the server keeps running.
        network=True: also restarts the server without its TCP listener, so a connection is
        refused by the kernel, as a revoked security group makes the port unreachable (the
        probe fails); the restart ends every session, replication included."""
        self.fenced = True
        self._write_hba()
        with self.admin() as conn:
            conn.query("ALTER SYSTEM SET default_transaction_read_only = on")
            conn.query("SELECT pg_reload_conf()")
        if network:
            n = int(self.scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                                "AND pid <> pg_backend_pid()"))
            self.network_fenced = True
            self._write_local_conf()
            self.restart()
            return n
        self._wait_login("rejected")
        # Sessions that were still authenticating when the reload landed are caught by the
        # second pass.
        n = self.terminate_sessions()
        time.sleep(0.02)
        n += self.terminate_sessions()
        return n

    def unfence(self):
        self.fenced = False
        self._write_hba()
        with self.admin() as conn:
            conn.query("ALTER SYSTEM RESET default_transaction_read_only")
            conn.query("SELECT pg_reload_conf()")
        if self.network_fenced:
            self.network_fenced = False
            self._write_local_conf()
            self.restart()
        self._wait_login("ok")

    def block_replication(self):
        """On a primary: end the WAL senders and refuse new replication connections, so its
        standby receives nothing more (commits go on: replication is asynchronous). With a
        promotion or kill() afterwards, what was committed meanwhile is the RPO."""
        self.replication_blocked = True
        self._write_hba()
        self.sql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 5
        while True:
            # Terminate until the reload has landed and no sender is left (a standby retries
            # every wal_retrieve_retry_interval).
            time.sleep(0.05)
            n = int(self.scalar("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE backend_type = 'walsender'"))
            if n == 0:
                time.sleep(0.3)  # longer than the standby's retry interval: did one come back?
                if self.scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'") == "0":
                    return
            if time.monotonic() > deadline:
                raise PgHarnessError(f"{self.name}: WAL senders still connecting after block\n{self.log_tail()}")

    def unblock_replication(self):
        self.replication_blocked = False
        self._write_hba()
        self.sql("SELECT pg_reload_conf()")

    def replication_connected(self):
        """Number of WAL senders (standbys streaming from this cluster)."""
        return int(self.scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'"))


class PgPair:
    """A primary and (unless with_standby=False) a streaming standby, in one temp directory
    under /tmp (or base_dir, or $PGDR_PG_TMPDIR). Closed by close(), by the context manager,
    or at interpreter exit."""

    def __init__(self, user="pgdr", password=None, dbname="postgres", host="127.0.0.1",
                 standby_host=None, with_standby=True, bindir_=None, base_dir=None, tls_hosts=None):
        self.user = user
        self.password = password or "pgdr-test-" + os.urandom(6).hex()
        self.dbname = dbname
        self.os_user = None
        self.root = None
        self.primary = None
        self.standby = None
        self.ca = None          # CertAuthority when the clusters serve TLS
        self.tls_hosts = []
        self._tls_files = None  # (cert_path, key_path), shared by both clusters
        self._tls_ips = sorted({"127.0.0.1", host, standby_host or host})
        self._closed = False
        self._lock = threading.Lock()
        atexit.register(self.close)
        try:
            self._bindir = bindir_ or bindir()
            self.os_user = _ensure_os_user()
            base_dir = base_dir or BASE_DIR
            cleanup_stale(base_dir)
            self.root = pathlib.Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=base_dir))
            (self.root / "owner.pid").write_text(str(os.getpid()))
            if self.os_user:
                pw = pwd.getpwnam(self.os_user)
                os.chown(self.root, pw.pw_uid, pw.pw_gid)
            os.chmod(self.root, 0o700)
            if tls_hosts is not None:
                self._issue_tls(list(tls_hosts))
            p_port = free_port(host)
            self.primary = self._cluster("a", host, p_port)
            self.primary.initdb()
            self.primary.start()
            if dbname != "postgres":
                self.primary.sql(f'CREATE DATABASE "{dbname}"', dbname="postgres")
            if with_standby:
                s_host = standby_host or host
                self.standby = self._cluster("b", s_host, free_port(s_host, taken={p_port}))
                self.standby.basebackup_from(self.primary)
                self.standby.start()
        except BaseException:
            self.close()
            raise

    def _cluster(self, name, host, port):
        c = PgCluster(self.root, name, host, port, self.user, self.password, self.dbname,
                      self.os_user, self._bindir)
        c.tls = self._tls_files
        return c

    # -- TLS ---------------------------------------------------------------------------------------
    @property
    def ca_pem(self):
        """The test CA's certificate (PEM text), or None without TLS."""
        return self.ca.pem if self.ca else None

    @property
    def ca_path(self):
        return self.ca.path if self.ca else None

    def _issue_tls(self, names):
        """Make the CA (once) and (re)issue the server certificate for tls_hosts + names."""
        if self.ca is None:
            tls_dir = self.root / "tls"
            self.ca = CertAuthority(tls_dir, common_name=f"pgdr test CA {self.root.name}")
            if self.os_user:  # the servers enter the directory to read their certificate
                pw = pwd.getpwnam(self.os_user)
                os.chown(tls_dir, pw.pw_uid, pw.pw_gid)
            os.chmod(tls_dir, 0o700)
        for n in names:
            n = str(n).strip().rstrip(".")
            if n and n not in self.tls_hosts:
                self.tls_hosts.append(n)
        dns = self.tls_hosts + ([] if "localhost" in self.tls_hosts else ["localhost"])
        ips = [a for a in self._tls_ips if _is_ip(a)]
        self._tls_files = self.ca.issue("server", dns, ips, owner=self.os_user)
        return self._tls_files

    def add_tls_hosts(self, names, timeout=5.0):
        """Reissue the server certificate with these names added (turning TLS on if the pair had
        none) and reload the running clusters; returns when they present the new certificate."""
        files = self._issue_tls(list(names))
        for c in self.clusters:
            c.tls = files
            c._write_local_conf()
            if c.running and not c.frozen:
                c.sql("SELECT pg_reload_conf()")
                want = self.tls_hosts[-1] if self.tls_hosts else "localhost"
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        tls_handshake(c.host, c.port, want, self.ca_pem, timeout=2)
                        break
                    except (ssl.SSLError, OSError, PgHarnessError):
                        if time.monotonic() > deadline:
                            raise PgHarnessError(f"{c.name}: new certificate not served after {timeout} s\n"
                                                 f"{c.log_tail()}") from None
                        time.sleep(0.02)

    @property
    def clusters(self):
        return [c for c in (self.primary, self.standby) if c is not None]

    def wait_caught_up(self, timeout=10.0):
        """Wait until the standby has replayed everything the primary has written so far."""
        return self.standby.wait_replayed(self.primary.current_wal_lsn(), timeout)

    def promote(self, timeout=30):
        """Promote the standby. The roles do not swap: `primary` is still the old one."""
        self.standby.promote(timeout)

    def reprotect(self):
        """After a promotion: rebuild the old primary as a standby of the promoted one (same
        name, address and port) and swap the roles, so `primary` is the promoted cluster."""
        new_primary, old = self.standby, self.primary
        if new_primary.in_recovery():
            raise PgHarnessError("reprotect: the standby has not been promoted")
        old.stop(mode="immediate")
        shutil.rmtree(old.datadir)
        old.basebackup_from(new_primary)
        old.start()
        self.primary, self.standby = new_primary, old

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for c in self.clusters:
            try:
                c.stop(mode="immediate", timeout=10)
            except Exception:
                pass
            c.kill()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        atexit.unregister(self.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
