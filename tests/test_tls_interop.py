"""
TLS interoperability of the real daemon, seen by outside tools: testssl.sh's
client simulations (replays of real clients' ClientHellos) over STARTTLS, and
the OpenSSL command-line client offering ALPN as Android's and Go's stacks do.
Each test is skipped, with the reason, when its tool is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

from twisted.trial import unittest

from tests.harness.daemon import daemon_config, start_daemon, temp_dir
from tests.harness.ports import free_port_range

SCANNER_TIMEOUT = 240
# One result line of testssl's client simulation, e.g.
# " Android 11 (native)          TLSv1.3 TLS_AES_128_GCM_SHA256, 253 bit ECDH (X25519)".
SIMULATION_LINE = re.compile(r"^ (?P<client>\S.*?)\s{2,}(?P<result>TLSv1\.\d \S+|No connection)")


def testssl_command() -> str | None:
    """The installed testssl.sh (Debian calls it C{testssl})."""
    return shutil.which("testssl") or shutil.which("testssl.sh")


def run_bounded(argv: list[str], timeout: float, stdin: bytes = b"") -> str:
    """
    Run C{argv} in a process group of its own and return its output; on
    timeout kill that group (testssl forks openssl and bash helpers).
    """
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ, TERM="dumb"),
    )
    try:
        output, _ = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise unittest.FailTest(f"{argv[0]} did not finish within {timeout}s") from None
    return output.decode("utf-8", "replace")


def must_negotiate(client: str) -> bool:
    """
    Whether the issue's list names C{client}: Android 9 and later, Go, Java
    11 and later, OpenSSL 1.1.1 and 3, Thunderbird, Apple Mail.
    """
    if m := re.match(r"Android (\d+)", client):
        return int(m.group(1)) >= 9
    if m := re.match(r"Java (\d+)\.", client):
        return int(m.group(1)) >= 11
    if re.match(r"OpenSSL (1\.1\.1|3\.)", client):
        return True
    return client.lower().startswith(("go ", "thunderbird", "apple mail"))


class InteropMixin:
    """Starts the real daemon with a STARTTLS port and the given [tls] profile."""

    profile = "intermediate"

    def start(self) -> int:
        port, admin = free_port_range(2)
        state_dir = temp_dir(self)
        config = daemon_config(state_dir, [port], admin, extra=f'[tls]\nprofile = "{self.profile}"\n')
        start_daemon(self, config, wait_ports=[port])
        return port


class ClientSimulationTests(InteropMixin, unittest.TestCase):
    """testssl.sh --starttls smtp -c against the daemon."""

    def setUp(self) -> None:
        self.testssl = testssl_command()
        if self.testssl is None:
            raise unittest.SkipTest("testssl.sh is not installed (Debian package testssl.sh)")

    def simulate(self) -> dict[str, str]:
        port = self.start()
        output = run_bounded(
            [self.testssl, "--starttls", "smtp", "-c", "--color", "0", "--warnings", "off", f"127.0.0.1:{port}"],
            SCANNER_TIMEOUT,
        )
        results: dict[str, str] = {}
        for line in output.split("Running client simulations", 1)[-1].splitlines():
            if m := SIMULATION_LINE.match(line):
                results[m.group("client")] = m.group("result")
        if not results:
            self.fail(f"no client simulation results in testssl's output:\n{output}")
        return results

    def test_clients_negotiate(self) -> None:
        """
        Every simulated Android 9+, Go, Java 11+, OpenSSL 1.1.1/3,
        Thunderbird and Apple Mail client gets TLS 1.2 or 1.3 over
        STARTTLS; no client gets anything older.
        """
        results = self.simulate()
        required = {client: result for client, result in results.items() if must_negotiate(client)}
        for family in ("Android 1", "go ", "Java 1", "OpenSSL 3", "Thunderbird", "Apple Mail"):
            self.assertTrue(any(c.startswith(family) for c in required), f"testssl simulated no {family!r} client: {results}")
        failed = {client: result for client, result in required.items() if not result.startswith(("TLSv1.2", "TLSv1.3"))}
        self.assertEqual(failed, {}, results)
        old = {client: result for client, result in results.items() if result.startswith(("TLSv1.0", "TLSv1.1"))}
        self.assertEqual(old, {})


class OpenSSLClientTests(InteropMixin, unittest.TestCase):
    """The OpenSSL command-line client, a stack independent of the daemon's."""

    def setUp(self) -> None:
        self.openssl = shutil.which("openssl")
        if self.openssl is None:
            raise unittest.SkipTest("the openssl command-line tool is not installed")
        self.port = self.start()

    def s_client(self, *args: str) -> str:
        argv = [self.openssl, "s_client", "-connect", f"127.0.0.1:{self.port}", "-starttls", "smtp", *args]
        return run_bounded(argv, 30, stdin=b"QUIT\r\n")

    def test_alpn_offer(self) -> None:
        """
        A ClientHello offering ALPN h2 and http/1.1 (what the failing
        simulations sent) gets TLS 1.3 and no protocol, not an
        internal_error alert.
        """
        output = self.s_client("-alpn", "h2,http/1.1")
        self.assertNotIn("internal error", output)
        self.assertIn("New, TLSv1.3, Cipher is TLS_AES_128_GCM_SHA256", output)
        self.assertIn("No ALPN negotiated", output)

    def test_tls12_x25519_only(self) -> None:
        """A TLS 1.2 client whose only group is X25519 is served the RSA certificate."""
        output = self.s_client("-tls1_2", "-groups", "X25519")
        self.assertIn("Cipher is ECDHE-RSA-AES128-GCM-SHA256", output)
        self.assertIn("Server Temp Key: X25519", output)
