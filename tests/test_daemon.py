"""
The real daemon: `twistd --nodaemon smtpplus --config FILE` in a subprocess,
talked to over 127.0.0.1 — ports, warnings, TLS, limits, signals, privileges.
"""

from __future__ import annotations

import os
import pwd
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import time

from twisted.trial import unittest

from tests.harness.daemon import daemon_config, start_daemon, twistd_command
from tests.harness.ports import free_port_range, occupy, port_is_free, wait_for_ports
from tests.test_smtp_limits import read_until_closed


def tls_client() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connect_smtp(port: int, attempts: int = 50) -> smtplib.SMTP:
    """smtplib on C{port}, retrying while the per-IP limit still counts the port probes."""
    for _ in range(attempts):
        try:
            return smtplib.SMTP("127.0.0.1", port, timeout=10)
        except smtplib.SMTPConnectError as e:
            if e.smtp_code != 421:
                raise
            time.sleep(0.1)
    raise AssertionError(f"port {port} kept refusing")


class DaemonTests(unittest.TestCase):
    def setUp(self) -> None:
        ports = free_port_range(5)
        self.ports, self.admin_port = ports[:4], ports[4]
        self.state_dir = os.path.abspath(self.mktemp())

    def config(self, extra: str = "", ports: list[int] | None = None) -> str:
        return daemon_config(self.state_dir, ports or self.ports, self.admin_port, extra)

    def test_serves_and_stops(self) -> None:
        """
        The daemon serves every port with STARTTLS, logs one session line
        per connection, refuses the per-IP excess with 421 4.7.0, and exits
        0 within 10 s of SIGTERM.
        """
        daemon = start_daemon(self, self.config("max_connections_per_ip = 2"), wait_ports=self.ports)
        with connect_smtp(self.ports[1]) as smtp:
            code, banner = smtp.ehlo("client.test")
            self.assertEqual(code, 250)
            self.assertTrue(banner.startswith(b"mx.test.example Hello client.test"), banner)
            self.assertIn("starttls", smtp.esmtp_features)
            self.assertNotIn("auth", smtp.esmtp_features)
            smtp.starttls(context=tls_client())
            smtp.ehlo("client.test")
            self.assertIn("auth", smtp.esmtp_features)
            self.assertNotIn("starttls", smtp.esmtp_features)
            with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
                smtp.login("nobody", "wrong")
            self.assertEqual(caught.exception.smtp_code, 535)
        self.assertTrue(os.path.exists(os.path.join(self.state_dir, "tls", "cert.pem")))

        # Sessions of connections closed just before may still count for a
        # moment, so the refusal can come before the third connection.
        held = []
        try:
            for _ in range(3):
                s = socket.create_connection(("127.0.0.1", self.ports[0]), timeout=10)
                held.append(s)
                first = s.recv(1024)
                if not first.startswith(b"220 mx.test.example "):
                    break
            self.assertEqual(first + read_until_closed(s), b"421 4.7.0 Too many connections from your address, try again later\r\n")
        finally:
            for s in held:
                s.close()

        self.assertTrue(daemon.wait_for_output("outcome=quit", 10), daemon.output())
        line = next(x for x in daemon.output().splitlines() if "outcome=quit" in x)
        self.assertIn("peer=127.0.0.1:", line)
        self.assertIn(f"port={self.ports[1]}", line)
        self.assertIn("tls=yes", line)
        self.assertIn("user=-", line)

        daemon.terminate()
        status = daemon.wait(10)
        self.assertIsNotNone(status, "still running 10 s after SIGTERM")
        self.assertIn(status, (0, -signal.SIGTERM), daemon.output())
        self.assertNotIn("Traceback", daemon.output())
        self.assertTrue(all(port_is_free(p) for p in self.ports))

    def test_sigterm_with_idle_session(self) -> None:
        """An idle session gets 421 4.3.2 on SIGTERM and the daemon still exits promptly."""
        daemon = start_daemon(self, self.config(), wait_ports=self.ports)
        with socket.create_connection(("127.0.0.1", self.ports[0]), timeout=10) as s:
            self.assertTrue(s.recv(1024).startswith(b"220 "))
            daemon.terminate()
            self.assertEqual(read_until_closed(s), b"421 4.3.2 Service shutting down\r\n")
        self.assertIn(daemon.wait(10), (0, -signal.SIGTERM), daemon.output())

    def test_one_port_in_use(self) -> None:
        """A port already taken is named in a warning line; the others are served."""
        taken = occupy(self.ports[2])
        self.addCleanup(taken.close)
        free = [p for p in self.ports if p != self.ports[2]]
        daemon = start_daemon(self, self.config(), wait_ports=free)
        self.assertTrue(daemon.wait_for_output("could not bind", 10), daemon.output())
        warning = [x for x in daemon.output().splitlines() if "could not bind" in x]
        self.assertEqual(len(warning), 1)
        self.assertIn(f"{self.ports[2]}: address already in use", warning[0])
        self.assertIsNone(daemon.proc.poll())

    def test_all_ports_in_use(self) -> None:
        """When no SMTP port can be bound the daemon fails with a clear line and a non-zero status."""
        taken = [occupy(p) for p in self.ports]
        for s in taken:
            self.addCleanup(s.close)
        daemon = start_daemon(self, self.config())
        status = daemon.wait(30)
        self.assertIsNotNone(status, daemon.output())
        self.assertNotEqual(status, 0)
        self.assertIn("no SMTP port could be bound", daemon.output())
        self.assertNotIn("Traceback", daemon.output())

    def test_require_all_ports(self) -> None:
        """With require_all_ports one busy port stops start-up, and no port is left listening."""
        taken = occupy(self.ports[0])
        self.addCleanup(taken.close)
        daemon = start_daemon(self, self.config("require_all_ports = true"))
        status = daemon.wait(30)
        self.assertIsNotNone(status, daemon.output())
        self.assertNotEqual(status, 0)
        self.assertIn("require_all_ports", daemon.output())
        self.assertNotIn("Traceback", daemon.output())
        self.assertTrue(all(port_is_free(p) for p in self.ports[1:]))

    def test_command_line_overrides(self) -> None:
        """--ports and --state-dir override the file."""
        other_state = os.path.abspath(self.mktemp())
        daemon = start_daemon(
            self,
            self.config(),
            args=["--ports", str(self.ports[3]), "--state-dir", other_state],
            wait_ports=[self.ports[3]],
        )
        self.assertTrue(port_is_free(self.ports[0]))
        self.assertTrue(os.path.isdir(other_state))
        self.assertIsNone(daemon.proc.poll())

    def test_help(self) -> None:
        """`twistd smtpplus --help` lists the plugin's options and exits 0."""
        result = subprocess.run(
            [*twistd_command(), "smtpplus", "--help"], capture_output=True, timeout=60, text=True, check=False
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in ("--config", "--ports", "--state-dir", "--admin-port"):
            self.assertIn(option, result.stdout)


class PrivilegeTests(unittest.TestCase):
    def test_privileged_port_then_drop(self) -> None:
        """
        With --uid/--gid, a privileged port is bound as root before the
        daemon drops to the given user, and state_dir, the database and the
        spool belong to that user with modes 0700/0600.
        """
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root")
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            raise unittest.SkipTest("no user nobody") from None
        privileged = next((p for p in range(700, 1000) if port_is_free(p)), None)
        if privileged is None:
            raise unittest.SkipTest("no free privileged port")
        admin = free_port_range(1)[0]
        state_dir = os.path.abspath(self.mktemp())
        os.makedirs(state_dir)
        os.chown(state_dir, nobody.pw_uid, nobody.pw_gid)
        daemon = start_daemon(
            self,
            daemon_config(state_dir, [privileged], admin),
            wait_ports=[privileged],
            twistd_args=["--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid)],
        )
        # The port accepts as soon as it is bound, a moment before twistd
        # sheds root: wait for its log line before looking at the process.
        self.assertTrue(daemon.wait_for_output("set uid/gid", 30), daemon.output())
        with open(f"/proc/{daemon.proc.pid}/status") as f:
            uid_line = next(line for line in f if line.startswith("Uid:"))
        self.assertEqual(set(uid_line.split()[1:]), {str(nobody.pw_uid)})
        # What it writes is handed to that user, and to it alone.
        for name, mode in (("", 0o700), ("smtpplus.db", 0o600), ("smtpplus.db-wal", 0o600), ("spool", 0o700), ("spool/msg", 0o700)):
            st = os.stat(os.path.join(state_dir, name))
            self.assertEqual((st.st_uid, oct(stat.S_IMODE(st.st_mode))), (nobody.pw_uid, oct(mode)), name)
        with smtplib.SMTP("127.0.0.1", privileged, timeout=10) as smtp:
            self.assertEqual(smtp.ehlo("client.test")[0], 250)
        self.assertTrue(wait_for_ports([privileged], 1))
