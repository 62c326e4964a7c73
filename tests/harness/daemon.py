"""
The real daemon: C{twistd --nodaemon smtpplus} in a subprocess with its
output in a file (L{TwistdProcess}), its TOML config, and L{Daemon}, a
started daemon with its ports, state_dir, admin token and (when asked
for) an aiosmtpd smarthost.  Nothing here imports smtpplus.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.logger import formatEvent

from tests.harness.clients import Response, api_request
from tests.harness.ports import free_port_range, wait_for_ports
from tests.harness.smarthost import Smarthost


def _rendered(line: str) -> str:
    """A log line as text: a C{[log] format = "json"} line rendered from its format and fields."""
    if not line.startswith("{"):
        return line.rstrip("\n")
    try:
        return formatEvent(json.loads(line))
    except ValueError:
        return line.rstrip("\n")


def twistd_command() -> list[str]:
    """The twistd of the running interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class TwistdProcess:
    """
    One C{twistd --nodaemon smtpplus} child process with its output in a
    file.  Made by L{spawn_twistd}; whoever made it kills it.
    """

    def __init__(self, proc: subprocess.Popen[bytes], output_path: str, directory: str) -> None:
        self.proc = proc
        self.output_path = output_path
        self.directory = directory

    def output(self) -> str:
        """Everything the daemon wrote so far."""
        with open(self.output_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_serving(self, timeout: float, log_path: str | None = None) -> bool:
        """
        Once its ports accept: wait until every SMTP worker serves (the
        ports listen from the start, before the workers run), as the output
        says, or the file C{log_path} of C{--logfile}.  True at once for a
        daemon without workers.
        """

        def read() -> str:
            if log_path is None:
                return self.output()
            with open(log_path, encoding="utf-8", errors="replace") as f:
                return "\n".join(_rendered(line) for line in f)

        found = re.search(r"SMTP listening on \S+ for (\d+) smtp workers", read())
        if found is None:
            return True
        deadline = time.monotonic() + timeout
        while f"all {found.group(1)} smtp workers serving" not in read():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

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
        """SIGTERM, as an operator stops the daemon."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if the daemon has not exited within C{timeout}."""
        self.terminate()
        if self.wait(timeout) is None:
            self.kill()

    def kill(self) -> None:
        """SIGKILL and reap; nothing if the child has exited."""
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError as e:
                if e.errno != errno.ESRCH:
                    raise
            self.proc.wait(10)


def write_config(directory: str, text: str) -> str:
    """Write C{text} as C{directory}/smtpplus.toml; its path."""
    path = os.path.join(directory, "smtpplus.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def daemon_config(state_dir: str, ports: Iterable[int], admin_port: int, extra: str = "", tls_ports: str = "") -> str:
    """A minimal TOML config for a test daemon on 127.0.0.1; C{extra} goes into [smtp] (and may open more tables)."""
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


def spawn_twistd(
    args: list[str],
    directory: str,
    twistd_args: Iterable[str] = (),
    command: list[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> TwistdProcess:
    """
    Start C{twistd --nodaemon --pidfile= [twistd_args] smtpplus [args]} in
    C{directory}, its output in C{directory}/twistd.out.

    @param command: what runs twistd instead of L{twistd_command} (the
        benchmarks' stall probe wraps it).
    @param env: variables added to the environment.
    """
    output_path = os.path.join(directory, "twistd.out")
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(output_path, "wb") as out:
        proc = subprocess.Popen(
            [*(command or twistd_command()), "--nodaemon", "--pidfile=", *twistd_args, "smtpplus", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=directory,
            env=full_env,
            preexec_fn=_die_with_parent,
        )
    return TwistdProcess(proc, output_path, directory)


def start_daemon(
    testcase: Any,
    config_text: str | None = None,
    args: Iterable[str] = (),
    wait_ports: Iterable[int] = (),
    timeout: float = 20.0,
    directory: str | None = None,
    twistd_args: Iterable[str] = (),
) -> TwistdProcess:
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
    if wait_ports and not (wait_for_ports(wait_ports, timeout, proc=daemon.proc) and daemon.wait_serving(timeout)):
        daemon.kill()
        testcase.fail(f"daemon did not accept on {wait_ports} within {timeout}s; output:\n{daemon.output()}")
    return daemon


def temp_dir(testcase: Any) -> str:
    """A fresh absolute directory under the trial temp dir."""
    path = os.path.abspath(testcase.mktemp())
    os.makedirs(path)
    return path


def run_configs(
    cases: dict[str, tuple[str, Iterable[str]]], timeout: float = 30.0
) -> dict[str, tuple[int | None, str]]:
    """
    Start one daemon per case C{name: (config_text, args)}, all at once,
    expecting each to exit; C{name: (status or None when it kept running, output)}.
    """
    directory = tempfile.mkdtemp(prefix="smtpplus-contract-")
    try:
        processes = {}
        for name, (config_text, args) in cases.items():
            case_dir = os.path.join(directory, name)
            os.makedirs(case_dir)
            path = write_config(case_dir, config_text)
            processes[name] = spawn_twistd(["--config", path, *args], case_dir)
        deadline = time.monotonic() + timeout
        results = {}
        for name, process in processes.items():
            status = process.wait(max(0.1, deadline - time.monotonic()))
            process.kill()
            results[name] = (status, process.output())
        return results
    finally:
        shutil.rmtree(directory, True)


class Daemon:
    """
    A started daemon on fresh ports: C{plain} SMTP ports, C{tls} implicit
    TLS ports, the admin port and a smarthost port (with an aiosmtpd
    smarthost on it unless C{sink} is false).

    @param config: the TOML text for this daemon (often L{Daemon.toml}).
    @param args: command-line arguments after C{--config}.
    @param wait: wait until every port accepts.
    @param prepare: called after the config is written, before the start.
    @param twistd_args: twistd's own options (before C{smtpplus}).
    """

    def __init__(
        self,
        config: Callable[[Daemon], str],
        args: Callable[[Daemon], list[str]] = lambda d: [],
        plain: int = 2,
        tls: int = 1,
        sink: bool = True,
        wait: bool = True,
        prepare: Callable[[Daemon], None] = lambda d: None,
        twistd_args: Iterable[str] = (),
    ) -> None:
        ports = free_port_range(plain + tls + 2)
        self.plain_ports = ports[:plain]
        self.tls_ports = ports[plain : plain + tls]
        self.admin_port = ports[plain + tls]
        self.sink_port = ports[plain + tls + 1]
        self.directory = tempfile.mkdtemp(prefix="smtpplus-contract-")
        self.state_dir = os.path.join(self.directory, "state")
        self.sink = Smarthost(port=self.sink_port, conventions=True) if sink else None
        self.config_path = write_config(self.directory, config(self))
        prepare(self)
        self.args = args(self)
        self.twistd_args = list(twistd_args)
        self.process = spawn_twistd(["--config", self.config_path, *self.args], self.directory, self.twistd_args)
        self._token: str | None = None
        if wait:
            self.wait_ready()

    def toml(
        self,
        hostname: str = "mx.test.example",
        smtp: str = "",
        delivery: str | None = "",
        tables: str = "",
        ports: str | None = None,
    ) -> str:
        """
        A config with every port of this daemon on 127.0.0.1 (C{ports}, if
        given, as the spec of the plain ones): C{smtp} lines added to
        [smtp]; unless C{delivery} is None, a [delivery] table that relays
        to the smarthost port without TLS, C{delivery} lines added; then
        C{tables} (whole tables such as [notifications]).
        """
        if ports is None:
            ports = ",".join(map(str, self.plain_ports))
        text = (
            f'[server]\nhostname = "{hostname}"\nstate_dir = "{self.state_dir}"\n'
            f'[smtp]\nlisten = "127.0.0.1"\nports = "{ports}"\n'
            f'tls_ports = "{",".join(map(str, self.tls_ports))}"\n{smtp}\n'
        )
        if delivery is not None:
            text += (
                f'[delivery]\nmode = "smarthost"\nsmarthost = "127.0.0.1:{self.sink_port}"\n'
                f'smarthost_tls = "none"\n{delivery}\n'
            )
        return text + f'[admin]\nlisten = "127.0.0.1"\nport = {self.admin_port}\n{tables}'

    def restart(self) -> None:
        """Start the daemon again with the same config and arguments, after it stopped."""
        self.process = spawn_twistd(["--config", self.config_path, *self.args], self.directory, self.twistd_args)

    def wait_ready(self, ports: Iterable[int] | None = None, timeout: float = 30.0) -> None:
        """Wait until C{ports} (by default all of them) accept; stop the daemon and fail when they do not."""
        ports = list(self.plain_ports + self.tls_ports + [self.admin_port] if ports is None else ports)
        if not (wait_for_ports(ports, timeout, proc=self.process.proc) and self.process.wait_serving(timeout)):
            output = self.process.output()
            self.stop()
            raise AssertionError(f"daemon did not accept on {ports} within {timeout}s:\n{output}")

    @property
    def token(self) -> str:
        """The admin token the daemon generated in its state_dir."""
        if self._token is None:
            with open(os.path.join(self.state_dir, "admin-token"), encoding="ascii") as f:
                self._token = f.read().strip()
        return self._token

    def api(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        """One admin API request with the daemon's token (unless C{token} is given)."""
        kw.setdefault("token", self.token)
        return api_request(self.admin_port, method, path, body, **kw)

    def create_user(self, **fields: Any) -> tuple[str, str]:
        """Create a user through the API; its (username, password)."""
        response = self.api("POST", "/api/v1/users", fields)
        assert response.status == 201, (response.status, response.json)
        return response.json["username"], response.json["password"]

    def stop(self) -> None:
        """Kill the daemon, stop the smarthost, remove the directory."""
        self.process.kill()
        if self.sink is not None:
            self.sink.stop()
        shutil.rmtree(self.directory, True)


class Shared:
    """A lazily started daemon shared by the tests of one class, stopped when the test run ends."""

    def __init__(self, factory: Callable[[], Daemon]) -> None:
        self._factory = factory
        self._daemon: Daemon | None = None

    def get(self) -> Daemon:
        """The running daemon; a new one when there is none or it died."""
        if self._daemon is None or self._daemon.process.proc.poll() is not None:
            if self._daemon is not None:
                self._daemon.stop()
            self._daemon = self._factory()
            atexit.register(self._daemon.stop)
        return self._daemon
