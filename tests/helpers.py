"""
Shared test helpers: free ports, the real twistd daemon in a subprocess, and
small SMTP fakes (login service, submitter, message writer) behind the
interfaces of L{smtpplus.smtp.interfaces}.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from smtpplus.smtp.interfaces import (
    Envelope,
    ILoginService,
    IMessageWriter,
    ISubmitter,
    LoginThrottled,
    SessionInfo,
    SMTPReply,
)

# --- ports ------------------------------------------------------------------


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when C{port} can be bound (and listened on) on C{host} right now."""
    s = socket.socket()
    # Like Twisted's listening ports: connections in TIME_WAIT do not count.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        s.listen(1)
    except OSError:
        return False
    finally:
        s.close()
    return True


def free_port_range(count: int, host: str = "127.0.0.1", attempts: int = 50) -> list[int]:
    """
    Find C{count} consecutive free ports in the ephemeral-free band 20000-29999.

    Another process may take one before the caller binds it; daemon tests are
    tolerant of that only in the sense that they fail clearly.
    """
    import random

    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(attempts):
        first = rng.randrange(20000, 30000 - count)
        ports = list(range(first, first + count))
        if all(port_is_free(p, host) for p in ports):
            return ports
    raise RuntimeError(f"no {count} consecutive free ports found")


def occupy(port: int, host: str = "127.0.0.1") -> socket.socket:
    """Listen on C{port} so that the daemon cannot bind it; the caller closes it."""
    s = socket.socket()
    s.bind((host, port))
    s.listen(1)
    return s


def wait_for_ports(ports: Iterable[int], timeout: float, host: str = "127.0.0.1", proc: Any = None) -> bool:
    """
    Poll until every port in C{ports} accepts a TCP connection; False on
    timeout or when C{proc} (a Popen) exits first.
    """
    pending = list(ports)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        still = []
        for port in pending:
            try:
                socket.create_connection((host, port), timeout=1).close()
            except OSError:
                still.append(port)
        pending = still
        if pending:
            time.sleep(0.05)
    return not pending


# --- the real daemon ----------------------------------------------------------


def twistd_command() -> list[str]:
    """The twistd of the running interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class Daemon:
    """
    One C{twistd --nodaemon smtpplus} child process with its output in a
    file.  Use L{start_daemon}; the test's cleanup always kills it.
    """

    def __init__(self, proc: subprocess.Popen[bytes], output_path: str, directory: str) -> None:
        self.proc = proc
        self.output_path = output_path
        self.directory = directory

    def output(self) -> str:
        with open(self.output_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for_output(self, text: str, timeout: float) -> bool:
        """Poll the output file until C{text} appears; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            time.sleep(0.05)
        return text in self.output()

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if the child still runs after C{timeout}."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise
            self.proc.wait(10)


def write_config(directory: str, text: str) -> str:
    path = os.path.join(directory, "smtpplus.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def daemon_config(state_dir: str, ports: Iterable[int], admin_port: int, extra: str = "", tls_ports: str = "") -> str:
    """A minimal TOML config for a test daemon on 127.0.0.1."""
    spec = ",".join(str(p) for p in ports)
    return (
        "[server]\n"
        'hostname = "mx.test.example"\n'
        f'state_dir = "{state_dir}"\n'
        "[smtp]\n"
        'listen = "127.0.0.1"\n'
        f'ports = "{spec}"\n'
        f'tls_ports = "{tls_ports}"\n'
        f"{extra}\n"
        "[admin]\n"
        'listen = "127.0.0.1"\n'
        f"port = {admin_port}\n"
    )


def _die_with_parent() -> None:
    # A crashed or killed test runner must not leave daemons behind.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_twistd(args: list[str], directory: str, twistd_args: Iterable[str] = ()) -> Daemon:
    """Start C{twistd --nodaemon --pidfile= [twistd_args] smtpplus [args]}."""
    output_path = os.path.join(directory, "twistd.out")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(output_path, "wb") as out:
        proc = subprocess.Popen(
            [*twistd_command(), "--nodaemon", "--pidfile=", *twistd_args, "smtpplus", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=directory,
            env=env,
            preexec_fn=_die_with_parent,
        )
    return Daemon(proc, output_path, directory)


def start_daemon(
    testcase: Any,
    config_text: str | None = None,
    args: Iterable[str] = (),
    wait_ports: Iterable[int] = (),
    timeout: float = 20.0,
    directory: str | None = None,
    twistd_args: Iterable[str] = (),
) -> Daemon:
    """
    Start the daemon with C{config_text} (written to a temp file and passed
    as C{--config}), register its kill as a cleanup of C{testcase}, and wait
    until every port of C{wait_ports} accepts connections.  Fails the test
    with the daemon's output if they do not within C{timeout}.
    """
    if directory is None:
        directory = tempfile.mkdtemp(prefix="smtpplus-daemon-")
        testcase.addCleanup(shutil.rmtree, directory, True)
    all_args = list(args)
    if config_text is not None:
        all_args = ["--config", write_config(directory, config_text), *all_args]
    daemon = spawn_twistd(all_args, directory, twistd_args)
    testcase.addCleanup(daemon.kill)
    wait_ports = list(wait_ports)
    if wait_ports and not wait_for_ports(wait_ports, timeout, proc=daemon.proc):
        daemon.kill()
        testcase.fail(f"daemon did not accept on {wait_ports} within {timeout}s; output:\n{daemon.output()}")
    return daemon


def temp_dir(testcase: Any) -> str:
    """A fresh absolute directory under the trial temp dir."""
    path = os.path.abspath(testcase.mktemp())
    os.makedirs(path)
    return path


# --- SMTP fakes -----------------------------------------------------------------


@implementer(IMessageWriter)
class FakeWriter:
    """Collects the message; C{result} decides what eomReceived answers."""

    def __init__(self, envelope: Envelope, result: Any = "Q1") -> None:
        self.envelope = envelope
        self.result = result
        self.chunks: list[bytes] = []
        self.eom = False
        self.lost = False

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        assert not self.lost, "write after connectionLost"
        self.chunks.append(data)

    def eomReceived(self) -> Deferred[str]:
        self.eom = True
        if isinstance(self.result, Deferred):
            return self.result
        if isinstance(self.result, BaseException):
            return fail(self.result)
        return succeed(self.result)

    def connectionLost(self) -> None:
        self.lost = True


@implementer(ISubmitter)
class FakeSubmitter:
    """
    An avatar that accepts everything unless told otherwise.  With
    C{asynchronous = True}, validateFrom/validateTo return Deferreds kept in
    C{pending} for the test to fire.
    """

    def __init__(self, username: str = "alice") -> None:
        self.username = username
        self.asynchronous = False
        self.pending: list[Deferred[None]] = []
        self.from_calls: list[tuple[SessionInfo, str, int | None]] = []
        self.to_calls: list[str] = []
        self.refuse_from: Exception | None = None
        self.refuse_to: dict[str, Exception] = {}
        self.writers: list[FakeWriter] = []
        self.eom_result: Any = "Q1"

    def _answer(self, error: Exception | None) -> Any:
        if self.asynchronous:
            d: Deferred[None] = Deferred()
            self.pending.append(d)
            if error is not None:
                d.addCallback(lambda _: (_ for _ in ()).throw(error))
            return d
        if error is not None:
            raise error
        return None

    def validateFrom(self, session: SessionInfo, mail_from: str, mt_priority: int | None) -> Any:
        self.from_calls.append((session, mail_from, mt_priority))
        return self._answer(self.refuse_from)

    def validateTo(self, session: SessionInfo, mail_from: str, recipient: str) -> Any:
        self.to_calls.append(recipient)
        return self._answer(self.refuse_to.get(recipient))

    def openMessage(self, envelope: Envelope) -> FakeWriter:
        writer = FakeWriter(envelope, self.eom_result)
        self.writers.append(writer)
        return writer


@implementer(ILoginService)
class FakeLogin:
    """
    C{alice}/C{secret} logs in; C{locked} is throttled; anything else is
    unauthorized.  With C{deferred} set, login answers only when the test
    fires it.
    """

    def __init__(self) -> None:
        self.submitter = FakeSubmitter()
        self.logouts = 0
        self.attempts: list[tuple[str, str, str]] = []
        self.deferred: Deferred[Any] | None = None

    def _logout(self) -> None:
        self.logouts += 1

    def login(self, username: str, password: str, peer_ip: str) -> Deferred[Any]:
        self.attempts.append((username, password, peer_ip))
        if self.deferred is not None:
            return self.deferred
        if username == "locked":
            return fail(LoginThrottled())
        if (username, password) == ("alice", "secret"):
            return succeed((self.submitter, self._logout))
        return fail(UnauthorizedLogin())


__all__ = [
    "Daemon",
    "FakeLogin",
    "FakeSubmitter",
    "FakeWriter",
    "SMTPReply",
    "daemon_config",
    "free_port_range",
    "occupy",
    "port_is_free",
    "spawn_twistd",
    "start_daemon",
    "temp_dir",
    "wait_for_ports",
    "write_config",
]
