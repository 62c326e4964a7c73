"""
C{[admin] tls}: the admin API over TLS with the server certificate, and the
warning for a plain-HTTP admin API that other hosts can reach.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.error
import urllib.request
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.ssl import Certificate
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import BrowserLikePolicyForHTTPS

from smtpplus.admin.api import AdminAPI
from smtpplus.admin.service import admin_service, is_loopback
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.config import AdminConfig, TLSConfig
from smtpplus.smtp.tls import server_context
from tests.harness.daemon import daemon_config, start_daemon
from tests.harness.ports import free_port_range
from tests.harness.stores import make_sqlite_store
from tests.harness.web import http_client

WARNING = "without TLS"


def make_api(case: TestCase) -> AdminAPI:
    return AdminAPI("tok", make_sqlite_store(case), PasswordHasher(None, rounds=4), lambda: {"hostname": "x"})


class WarningTests(TestCase):
    """One warning line names a plain-HTTP admin API on a non-loopback address."""

    def start(self, listen: str, tls: bool) -> tuple[MemoryReactor, list[dict[str, Any]]]:
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        memory = MemoryReactor()
        options = server_context(TLSConfig("", ""), "localhost", self.mktemp()) if tls else None
        service = admin_service(memory, AdminConfig(listen, 8025, "tok", tls), make_api(self), options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return memory, [e for e in logged if WARNING in e.get("log_format", "")]

    def test_warns_for_public_plain_http(self) -> None:
        """0.0.0.0, ::, a public address or a host name without TLS: exactly one warning naming address and port."""
        for listen in ("0.0.0.0", "::", "192.0.2.10", "2001:db8::1", "admin.example.net"):
            memory, warnings = self.start(listen, tls=False)
            self.assertEqual(len(warnings), 1, listen)
            self.assertEqual((warnings[0]["address"], warnings[0]["port"]), (listen, 8025))
            self.assertEqual(warnings[0]["log_level"], LogLevel.warn)
            self.assertEqual([p[3] for p in memory.tcpServers], [listen])
            self.assertEqual(memory.sslServers, [])

    def test_no_warning_for_loopback_or_tls(self) -> None:
        """Loopback addresses without TLS, and any address with TLS, start without the warning."""
        for listen, tls in [
            ("127.0.0.1", False),
            ("127.0.0.2", False),
            ("::1", False),
            ("::ffff:127.0.0.1", False),
            ("localhost", False),
            ("0.0.0.0", True),
            ("::", True),
        ]:
            memory, warnings = self.start(listen, tls)
            self.assertEqual(warnings, [], listen)
            servers = memory.sslServers if tls else memory.tcpServers
            self.assertEqual([p[-1] for p in servers], [listen])

    def test_loopback_names(self) -> None:
        """Only loopback addresses (and "localhost") count as loopback."""
        self.assertTrue(all(map(is_loopback, ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1", "localhost"])))
        self.assertFalse(any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "::ffff:10.0.0.1", "example.org", ""])))

    def test_tls_needs_options(self) -> None:
        """Asking for TLS without the server's TLS options is a programming error, caught at once."""
        with self.assertRaises(ValueError):
            admin_service(MemoryReactor(), AdminConfig("127.0.0.1", 8025, "tok", True), make_api(self))


class InProcessTLSTests(TestCase):
    @inlineCallbacks
    def test_https_with_treq(self) -> Any:
        """With tls = true the API answers over HTTPS, verified against the generated certificate."""
        state_dir = self.mktemp()
        options = server_context(TLSConfig("", ""), "localhost", state_dir)
        service = admin_service(reactor, AdminConfig("127.0.0.1", 0, "tok", True), make_api(self), options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        with open(os.path.join(state_dir, "tls", "cert.pem"), "rb") as f:
            authority = Certificate.loadPEM(f.read())
        client = http_client(self, BrowserLikePolicyForHTTPS(authority))
        url = f"https://localhost:{service.port.getHost().port}/api/v1/settings"
        response = yield client.get(url, headers={"Authorization": ["Bearer tok"]})
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json()), {"hostname": "x"})


def https_call(url: str, cafile: str, token: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    """urllib over HTTPS, trusting C{cafile} only and checking the host name."""
    context = ssl.create_default_context(cafile=cafile)
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {token}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


class DaemonTLSTests(TestCase):
    """The real twistd with [admin] tls."""

    def setUp(self) -> None:
        self.smtp_port, self.admin_port = free_port_range(2)
        self.state_dir = os.path.abspath(self.mktemp())

    def config(self, listen: str, tls: bool) -> str:
        text = daemon_config(self.state_dir, [self.smtp_port], self.admin_port)
        text = text.replace('hostname = "mx.test.example"', 'hostname = "localhost"')
        return text.replace('[admin]\nlisten = "127.0.0.1"', f'[admin]\nlisten = "{listen}"\ntls = {str(tls).lower()}')

    def test_admin_api_over_tls(self) -> None:
        """
        With tls = true every endpoint answers over HTTPS with the [tls]
        certificate (verified by name against it), plain HTTP gets no API
        answer, and no warning is logged.
        """
        daemon = start_daemon(self, self.config("127.0.0.1", True), wait_ports=[self.smtp_port, self.admin_port])
        self.assertTrue(daemon.wait_for_output(f"port {self.admin_port} (HTTPS)", 10), daemon.output())
        cafile = os.path.join(self.state_dir, "tls", "cert.pem")
        with open(os.path.join(self.state_dir, "admin-token")) as f:
            token = f.read().strip()
        base = f"https://localhost:{self.admin_port}/api/v1"
        code, settings = https_call(base + "/settings", cafile, token)
        self.assertEqual((code, settings["hostname"], settings["listening_ports"]), (200, "localhost", [self.smtp_port]))
        code, user = https_call(base + "/users", cafile, token, "POST", {"username": "app1"})
        self.assertEqual((code, user["username"]), (201, "app1"))
        self.assertEqual(https_call(base + "/users/app1", cafile, token, "PATCH", {"notes": "n"})[1]["notes"], "n")
        self.assertEqual([u["username"] for u in https_call(base + "/users", cafile, token)[1]["users"]], ["app1"])
        self.assertEqual(https_call(base + "/openapi.json", cafile, token)[0], 200)
        self.assertEqual(https_call(base + "/users", cafile, "wrong")[0], 401)
        with self.assertRaises((OSError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/api/v1/settings", timeout=5)
        with self.assertRaises(urllib.error.URLError) as caught:
            urllib.request.urlopen(base + "/settings", timeout=5, context=ssl.create_default_context())
        self.assertIsInstance(caught.exception.reason, ssl.SSLCertVerificationError)
        self.assertNotIn(WARNING, daemon.output())

    def test_loopback_plain_http_no_warning(self) -> None:
        """On ::1 without TLS the API answers plain HTTP and no warning is logged."""
        daemon = start_daemon(self, self.config("::1", False), wait_ports=[self.smtp_port])
        self.assertTrue(daemon.wait_for_output(f"port {self.admin_port} (HTTP)", 10), daemon.output())
        with open(os.path.join(self.state_dir, "admin-token")) as f:
            token = f.read().strip()
        request = urllib.request.Request(
            f"http://[::1]:{self.admin_port}/api/v1/settings", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            self.assertEqual(json.load(response)["hostname"], "localhost")
        self.assertNotIn(WARNING, daemon.output())
