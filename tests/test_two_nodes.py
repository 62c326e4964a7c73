"""
Two nodes on one PostgreSQL (contract section 5), each a real twistd with
its own state_dir and node_name: a user created on one logs in on the
other, every message either accepted is relayed exactly once, and when a
node is SIGKILLed with deliveries in flight the other delivers them once
its lease has run out.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import psycopg
from twisted.trial import unittest

from tests.harness.clients import logged_in, submit
from tests.harness.daemon import Daemon
from tests.harness.messages import message, queue_id
from tests.harness.polling import poll
from tests.harness.ports import free_port
from tests.harness.postgres import fresh_database

LEASE = 5


def _rows(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, args).fetchall()


def _node_config(name: str, dsn: str, smarthost: int) -> Any:
    def config(d: Daemon) -> str:
        return (
            d.toml(hostname=f"{name.lower()}.relay.test", delivery=None)
            .replace("[server]\n", f'[server]\nworkers = 1\nnode_name = "{name}"\n', 1)
            + f'\n[delivery]\nmode = "smarthost"\nsmarthost = "127.0.0.1:{smarthost}"\nsmarthost_tls = "none"\n'
            + "retry_schedule = [5]\n"
            + f'\n[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\nlease_seconds = {LEASE}\n'
        )

    return config


class TwoNodeTests(unittest.TestCase):
    """Nodes A and B on one fresh database; B's aiosmtpd smarthost is the next hop of both unless a test says."""

    def start(self, a_smarthost: int | None = None) -> None:
        self.dsn = fresh_database(self)
        self.b = Daemon(lambda d: _node_config("B", self.dsn, d.sink_port)(d), plain=1, tls=0)
        self.addCleanup(self.b.stop)
        assert self.b.sink is not None
        self.sink = self.b.sink
        hop = self.b.sink_port if a_smarthost is None else a_smarthost
        self.a = Daemon(_node_config("A", self.dsn, hop), plain=1, tls=0, sink=False)
        self.addCleanup(self.a.stop)

    def send(self, daemon: Daemon, username: str, password: str, subjects: list[str]) -> list[str]:
        client = logged_in(daemon.plain_ports[0], username, password)
        try:
            return [
                queue_id(submit(client, "app@shop.test", [f"{s}@dest.test"], message(s, "app@shop.test")))
                for s in subjects
            ]
        finally:
            client.quit()

    def test_shared_users_and_exactly_once(self) -> None:
        """
        A user created through A's API logs in on B; ten messages accepted by
        each node reach the smarthost once each, claimed by the node that
        accepted them, and both nodes' APIs show them sent.
        """
        self.start()
        username, password = self.a.create_user(authorized_domains="shop.test")
        ids = self.send(self.a, username, password, [f"from-a-{n}" for n in range(10)])
        ids += self.send(self.b, username, password, [f"from-b-{n}" for n in range(10)])
        self.assertTrue(poll(lambda: len(self.sink.find("from-")) >= 20, 30), self.a.process.output())
        # Time for a second copy, were one to come.
        self.assertFalse(poll(lambda: len(self.sink.find("from-")) > 20, 2))
        recipients = sorted(r for m in self.sink.find("from-") for r in m.rcpt_tos)
        expected = [f"from-a-{n}@dest.test" for n in range(10)] + [f"from-b-{n}@dest.test" for n in range(10)]
        self.assertEqual(recipients, sorted(expected))
        claims = dict(_rows(self.dsn, "SELECT claimed_by, COUNT(*) FROM queue_messages GROUP BY claimed_by"))
        self.assertEqual(claims, {"A": 10, "B": 10})
        for daemon in (self.a, self.b):
            statuses = {daemon.api("GET", f"/api/v1/messages/{i}").json["status"] for i in ids}
            self.assertEqual(statuses, {"sent"})

    def test_killed_node_taken_over(self) -> None:
        """
        A relays to a next hop that never answers; with A's deliveries in
        flight, A is SIGKILLed; once A's lease (5 s) has run out, B delivers
        every message A had answered 250, and logs the takeover.
        """
        stall = socket.socket()
        stall.bind(("127.0.0.1", free_port()))
        # Listening, never accepting: A's connections wait for a banner.
        stall.listen(64)
        self.addCleanup(stall.close)
        self.start(a_smarthost=stall.getsockname()[1])
        username, password = self.b.create_user(authorized_domains="shop.test")
        ids = self.send(self.a, username, password, [f"stuck-{n}" for n in range(8)])
        sending = lambda: _rows(  # noqa: E731
            self.dsn, "SELECT COUNT(*) FROM queue_messages WHERE status = 'sending' AND claimed_by = 'A'"
        )[0][0]
        self.assertTrue(poll(lambda: sending() > 0, 10), self.a.process.output())
        os.kill(self.a.process.proc.pid, signal.SIGKILL)
        self.a.process.proc.wait(10)
        arrived = poll(lambda: len(self.sink.find("stuck-")) >= 8, LEASE * 2 + 15)
        self.assertTrue(arrived, self.b.process.output())
        recipients = sorted(r for m in self.sink.find("stuck-") for r in m.rcpt_tos)
        self.assertEqual(recipients, sorted(f"stuck-{n}@dest.test" for n in range(8)))
        self.assertIn("node A is silent: took over 8 of its unfinished messages", self.b.process.output())
        self.assertTrue(
            poll(lambda: {self.b.api("GET", f"/api/v1/messages/{i}").json["status"] for i in ids} == {"sent"}, 10)
        )
