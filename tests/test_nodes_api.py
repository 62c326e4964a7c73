"""
The admin API's side of several nodes: C{GET /api/v1/nodes}, a 503 with
the contract's error shape when the store is unavailable, and the node's
name in the metrics and the JSON log.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from smtpplus.admin.api import AdminAPI
from smtpplus.admin.openapi import openapi_document
from smtpplus.admin.service import admin_site
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.auth.memory import MemoryUserStore
from smtpplus.config import LogConfig
from smtpplus.log import DaemonLog, Destination
from smtpplus.metrics import daemon_metrics
from smtpplus.storage.database import StorageUnavailable
from smtpplus.workers.pool import merge_expositions
from tests import test_admin_api
from tests.harness.web import http_client, serve

NODES = [
    {"name": "a", "workers": 2, "started_at": "2024-05-01T12:00:00Z", "last_seen": "2024-05-01T12:00:09Z",
     "queued": 4, "sending": 1},
]


class UnavailableUsers(MemoryUserStore):
    """A memory user store whose reads fail as a store in an outage does while C{down}."""

    down = False

    def list(self) -> Deferred[Any]:
        if self.down:
            return fail(StorageUnavailable("PostgreSQL is unavailable: connection refused"))
        return super().list()


class FixedNodes:
    """An L{smtpplus.interfaces.INodeList} answering L{NODES}."""

    def nodes(self) -> Deferred[list[dict[str, Any]]]:
        return succeed([dict(node) for node in NODES])


class NodesAPITests(test_admin_api.AdminServer, TestCase):
    """C{/api/v1/nodes} and the answers during a store outage."""

    def setUp(self) -> None:
        self.store = UnavailableUsers(reactor)
        api = AdminAPI(
            test_admin_api.TOKEN, self.store, PasswordHasher(None, rounds=4), lambda: {}, nodes=FixedNodes()
        )
        self.base = serve(self, admin_site(api))
        self.http = http_client(self)

    @inlineCallbacks
    def test_lists_nodes(self) -> Any:
        """The nodes come back as the contract's C{{"nodes": [...]}}, behind the token."""
        self.assertEqual((yield self.call("GET", "/api/v1/nodes")), (200, {"nodes": NODES}))
        code, _ = yield self.call("GET", "/api/v1/nodes", token=None)
        self.assertEqual(code, 401)

    @inlineCallbacks
    def test_without_a_node_list(self) -> Any:
        """An API built without one lists no nodes."""
        api = AdminAPI(test_admin_api.TOKEN, self.store, PasswordHasher(None, rounds=4), lambda: {})
        self.base = serve(self, admin_site(api))
        self.assertEqual((yield self.call("GET", "/api/v1/nodes")), (200, {"nodes": []}))

    @inlineCallbacks
    def test_store_unavailable_is_503(self) -> Any:
        """
        A store failing with StorageUnavailable gives 503 with the error
        shape and a Retry-After, nothing logged as an error; once it is
        back the same request answers 200.
        """
        self.store.down = True
        code, document = yield self.call("GET", "/api/v1/users")
        self.assertEqual(code, 503)
        self.assertEqual(set(document), {"error"})
        self.assertEqual(document["error"]["code"], "store_unavailable")
        self.assertIsInstance(document["error"]["message"], str)
        self.assertEqual(self.last_headers.getRawHeaders("Content-Type"), ["application/json"])
        self.assertEqual(self.last_headers.getRawHeaders("Retry-After"), ["5"])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.store.down = False
        self.assertEqual((yield self.call("GET", "/api/v1/users")), (200, {"users": []}))

    def test_openapi(self) -> None:
        """The document describes /api/v1/nodes, and 503 on the store's routes."""
        paths = openapi_document()["paths"]
        responses = paths["/api/v1/nodes"]["get"]["responses"]
        self.assertEqual(responses["200"]["content"]["application/json"]["schema"],
                         {"$ref": "#/components/schemas/NodeList"})
        self.assertIn("503", responses)
        self.assertIn("503", paths["/api/v1/users"]["get"]["responses"])
        node = openapi_document()["components"]["schemas"]["Node"]
        self.assertEqual(set(node["required"]), set(NODES[0]))


class NodeInfoMetricTests(TestCase):
    """C{smtpplus_node_info}: which node and store the metrics are of."""

    @inlineCallbacks
    def test_node_info_once(self) -> Any:
        """The coordinator's gauge is 1 with the node and backend, once after the workers' texts are added in."""
        coordinator = daemon_metrics()
        coordinator.node_info("relay-1", "postgresql")
        own = yield Deferred.fromCoroutine(coordinator.scrape())
        workers = []
        for _ in range(2):
            workers.append((yield Deferred.fromCoroutine(daemon_metrics().scrape())))
        merged = merge_expositions([own, *workers]).decode()
        lines = [line for line in merged.splitlines() if line.startswith("smtpplus_node_info")]
        self.assertEqual(lines, ['smtpplus_node_info{backend="postgresql",node="relay-1"} 1.0'])


class NodeInLogTests(TestCase):
    """The node's name in the JSON log; text lines as before."""

    def test_json_lines_carry_the_node(self) -> None:
        """Every JSON object has C{node}."""
        out = io.StringIO()
        observer = DaemonLog(Destination(stream=out), LogConfig("json", "info"), "relay-1")
        observer({"log_format": "hello {x}", "x": 1, "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "t"})
        record = json.loads(out.getvalue())
        self.assertEqual((record["node"], record["x"]), ("relay-1", 1))

    def test_text_lines_unchanged(self) -> None:
        """Text lines do not carry the node (it is named once, in the start-up line)."""
        out = io.StringIO()
        observer = DaemonLog(Destination(stream=out), LogConfig("text", "info"), "relay-1")
        observer({"log_format": "hello", "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "t"})
        self.assertNotIn("relay-1", out.getvalue())
        self.assertIn("[t#info] hello", out.getvalue())

