"""
A private PostgreSQL server for the tests: Debian's server binaries
(C{initdb}, C{postgres}) run in a temporary directory on a free loopback
port, as an unprivileged user when the tests run as root.  One server per
test process, started at the first use and stopped at exit; each test gets
a fresh database (L{fresh_database}).  Durability settings stay the
server's defaults (C{fsync} and C{synchronous_commit} on): durability is
what the tests check.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.harness.ports import free_port

# The superuser initdb creates; the tests connect as it over loopback (trust).
SUPERUSER = "smtpplus"


def _bin_dir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


class PostgresServer:
    """
    One PostgreSQL cluster in a temporary directory, its postmaster a child
    of this process (it dies with it).  L{stop} and L{start} keep its port
    and data (for outage tests).
    """

    def __init__(self, bin_dir: str) -> None:
        self._bin = bin_dir
        self.base = tempfile.mkdtemp(prefix="smtpplus-pg-")
        self.data = os.path.join(self.base, "data")
        self.log = os.path.join(self.base, "server.log")
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        # initdb and postgres refuse to run as root.
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam("postgres" if _has_user("postgres") else "nobody")
            os.chmod(self.base, 0o755)
            os.chown(self.base, self._user.pw_uid, self._user.pw_gid)
        subprocess.run(
            [os.path.join(self._bin, "initdb"), "-D", self.data, "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
             "--locale=C", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120, preexec_fn=self._child,
        )
        with open(os.path.join(self.data, "postgresql.conf"), "a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.base}'\n"
                "fsync = on\nsynchronous_commit = on\nmax_connections = 200\nshared_buffers = 16MB\n"
            )
        self.start()

    def _child(self) -> None:
        # In the child, before exec: drop to the server's user, then ask for
        # SIGINT (a fast shutdown) when the test process dies, which a
        # change of user would have cleared.
        if self._user is not None:
            os.setgroups([])
            os.setgid(self._user.pw_gid)
            os.setuid(self._user.pw_uid)
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (again) and wait until it accepts connections."""
        import psycopg

        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [os.path.join(self._bin, "postgres"), "-D", self.data],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=self._child,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start; its log:\n{self._log_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server at once (an immediate shutdown: its connections are cut), keeping its data."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    @property
    def running(self) -> bool:
        """Whether the postmaster runs."""
        return self._process is not None and self._process.poll() is None

    def destroy(self) -> None:
        """Stop the server if it runs and remove its directory."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def _log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()[-4000:]

    def dsn(self, dbname: str = "postgres") -> str:
        """The libpq connection string of C{dbname} on this server."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname}"

    def admin(self, sql: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) as the superuser."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


_server: PostgresServer | None = None
_numbers = itertools.count(1)


def server() -> PostgresServer:
    """The process's server, started at the first call; L{SkipTest} when the binaries are absent."""
    global _server
    if _server is None:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise SkipTest("PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb) are not installed")
        _server = PostgresServer(bin_dir)
        atexit.register(_server.destroy)
    return _server


def fresh_database(case: TestCase) -> str:
    """The DSN of a new empty database on the process's server, dropped after C{case}."""
    srv = server()
    name = f"t{os.getpid()}_{next(_numbers)}"
    srv.admin(f"CREATE DATABASE {name} TEMPLATE template0")
    case.addCleanup(_drop, srv, name)
    return srv.dsn(name)


def _drop(srv: PostgresServer, name: str) -> None:
    # A test that stopped the server may leave it stopped.
    import psycopg

    try:
        srv.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    except psycopg.OperationalError:
        # Stopped: the whole directory goes at exit anyway.
        pass


def make_postgres_database(case: TestCase, reactor: Any = None, **options: Any) -> Any:
    """A started L{PostgresDatabase} on a fresh database, stopped after C{case}."""
    from twisted.internet import reactor as global_reactor

    from smtpplus.storage.postgres import PostgresDatabase

    database = PostgresDatabase(reactor or global_reactor, fresh_database(case), **options)
    database.start()
    case.addCleanup(database.stop)
    return database
