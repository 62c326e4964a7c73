"""The admin token and the admin listening service."""

from __future__ import annotations

import os
import secrets
import stat
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from smtpplus.admin.api import AdminAPI
from smtpplus.admin.service import TOKEN_FILE, admin_service, admin_token, new_token
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.config import AdminConfig
from tests.harness.stores import make_sqlite_store


class TokenTests(TestCase):
    def setUp(self) -> None:
        self.state_dir = self.mktemp()
        os.makedirs(self.state_dir)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def test_configured_token_wins(self) -> None:
        """A configured [admin] token is used and no file is written."""
        self.assertEqual(admin_token(AdminConfig("127.0.0.1", 8025, "configured"), self.state_dir), "configured")
        self.assertFalse(os.path.exists(os.path.join(self.state_dir, TOKEN_FILE)))

    def test_generated_once(self) -> None:
        """Without a configured token one is generated into a 0600 file and reused; only its path is logged."""
        config = AdminConfig("127.0.0.1", 8025, "")
        token = admin_token(config, self.state_dir)
        path = os.path.join(self.state_dir, TOKEN_FILE)
        self.assertGreaterEqual(len(token), 40)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            self.assertEqual(f.read().strip(), token)
        self.assertEqual(admin_token(config, self.state_dir), token)
        text = repr(self.logged)
        self.assertIn(path, text)
        self.assertNotIn(token, text)


    def test_generated_token_never_starts_with_a_dash(self) -> None:
        """A token drawn with a leading '-' (smtpplusctl --token would read it as an option) is drawn again."""
        drawn = iter(["-first", "-second", "third"])
        self.patch(secrets, "token_urlsafe", lambda n: next(drawn))
        self.assertEqual(new_token(), "third")


class ServiceTests(TestCase):
    def make_service(self, port: int) -> Any:
        api = AdminAPI("tok", make_sqlite_store(self), PasswordHasher(None, rounds=4), dict)
        service = admin_service(reactor, AdminConfig("127.0.0.1", port, ""), api)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @inlineCallbacks
    def test_serves_on_configured_address(self) -> Any:
        """The admin service listens on [admin] listen:port and serves the API."""
        service = self.make_service(0)
        port = service.port.getHost().port
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        response = yield treq.get(
            f"http://127.0.0.1:{port}/api/v1/users", headers={"Authorization": ["Bearer tok"]}, pool=pool
        )
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json()), {"users": []})

    def test_port_in_use(self) -> None:
        """A port that cannot be bound is named in a warning; the service still starts and stops."""
        busy = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(busy.stopListening)
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        service = self.make_service(busy.getHost().port)
        self.assertIsNone(service.port)
        warnings = [e for e in logged if "cannot listen" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["port"], busy.getHost().port)
