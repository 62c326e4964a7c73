"""
The real twistd's nodes: C{GET /api/v1/nodes} on PostgreSQL (from the
heartbeat) and on SQLite, the node in the metrics and the start-up line,
and the admin API through a PostgreSQL outage: 503 while it lasts, 200
again once the server is back, without restarting the daemon.
"""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from tests.harness.daemon import Daemon
from tests.harness.polling import poll
from tests.harness.postgres import fresh_database, server


def _node_info(daemon: Daemon) -> list[str]:
    text = daemon.api("GET", "/metrics").body.decode()
    return [line for line in text.splitlines() if line.startswith("smtpplus_node_info")]


class NodesDaemonTests(unittest.TestCase):
    """One node, end to end."""

    def _daemon(self, workers: int, storage: str) -> Daemon:
        daemon = Daemon(
            lambda d: d.toml(hostname="relay.example.test").replace(
                "[server]\n", f'[server]\nworkers = {workers}\nnode_name = "node-east"\n', 1
            )
            + storage,
            plain=1,
            tls=0,
        )
        self.addCleanup(daemon.stop)
        return daemon

    def test_postgresql_nodes_and_outage(self) -> None:
        """
        The node lists itself from its heartbeat; with PostgreSQL stopped
        the API answers 503 with the error shape (and /health 503); once it
        is started again, 200 within seconds, and the heartbeat goes on.
        """
        dsn = fresh_database(self)
        daemon = self._daemon(1, f'\n[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\nlease_seconds = 6\n')
        response = daemon.api("GET", "/api/v1/nodes")
        self.assertEqual(response.status, 200, response.json)
        (node,) = response.json["nodes"]
        self.assertEqual(
            (node["name"], node["workers"], node["queued"], node["sending"]), ("node-east", 1, 0, 0), node
        )
        self.assertEqual(_node_info(daemon), ['smtpplus_node_info{backend="postgresql",node="node-east"} 1.0'])
        self.assertIn("smtpplus node node-east starting: postgresql store", daemon.process.output())
        pg = server()
        pg.stop()
        try:
            response = daemon.api("GET", "/api/v1/users")
            self.assertEqual(response.status, 503, response.json)
            self.assertEqual(set(response.json), {"error"})
            self.assertEqual(response.json["error"]["code"], "store_unavailable")
            self.assertEqual(daemon.api("GET", "/api/v1/nodes").status, 503)
            self.assertTrue(poll(lambda: daemon.api("GET", "/health", token=None).status == 503, 5))
        finally:
            pg.start()
        self.assertTrue(poll(lambda: daemon.api("GET", "/api/v1/users").status == 200, 10), daemon.process.output())
        self.assertTrue(poll(lambda: daemon.api("GET", "/health", token=None).status == 200, 5))
        self.assertTrue(
            poll(lambda: _last_seen(daemon) > node["last_seen"], 10), (node, daemon.process.output())
        )
        output = daemon.process.output()
        self.assertEqual(output.count("is unavailable ("), 1, output)
        self.assertNotIn("Traceback", output)

    def test_sqlite_node_with_workers(self) -> None:
        """On SQLite the node lists itself; with two workers its info metric still appears once."""
        daemon = self._daemon(2, "")
        (node,) = daemon.api("GET", "/api/v1/nodes").json["nodes"]
        self.assertEqual((node["name"], node["workers"], node["queued"], node["sending"]), ("node-east", 2, 0, 0))
        self.assertLessEqual(node["started_at"], node["last_seen"])
        self.assertEqual(_node_info(daemon), ['smtpplus_node_info{backend="sqlite",node="node-east"} 1.0'])


def _last_seen(daemon: Daemon) -> Any:
    response = daemon.api("GET", "/api/v1/nodes")
    return response.json["nodes"][0]["last_seen"] if response.status == 200 else ""
