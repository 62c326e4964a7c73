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
import smtplib
import socket
import subprocess
import sys
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


def _node_config(name: str, dsn: str, smarthost: int, delivery: str = "") -> Any:
    def config(d: Daemon) -> str:
        return (
            d.toml(hostname=f"{name.lower()}.relay.test", delivery=None)
            .replace("[server]\n", f'[server]\nworkers = 1\nnode_name = "{name}"\n', 1)
            + f'\n[delivery]\nmode = "smarthost"\nsmarthost = "127.0.0.1:{smarthost}"\nsmarthost_tls = "none"\n'
            + f"retry_schedule = [5]\n{delivery}\n"
            + f'\n[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\nlease_seconds = {LEASE}\n'
        )

    return config


class TwoNodeTests(unittest.TestCase):
    """Nodes A and B on one fresh database; B's aiosmtpd smarthost is the next hop of both unless a test says."""

    def start(self, a_smarthost: int | None = None, a_delivery: str = "") -> None:
        self.dsn = fresh_database(self)
        self.b = Daemon(lambda d: _node_config("B", self.dsn, d.sink_port)(d), plain=1, tls=0)
        self.addCleanup(self.b.stop)
        assert self.b.sink is not None
        self.sink = self.b.sink
        hop = self.b.sink_port if a_smarthost is None else a_smarthost
        self.a = Daemon(_node_config("A", self.dsn, hop, a_delivery), plain=1, tls=0, sink=False)
        self.addCleanup(self.a.stop)

    def send(self, daemon: Daemon, username: str, password: str, subjects: list[str], priority: int = 3) -> list[str]:
        client = logged_in(daemon.plain_ports[0], username, password)
        try:
            return [
                queue_id(
                    submit(
                        client, "app@shop.test", [f"{s}@dest.test"],
                        message(s, "app@shop.test", headers=[f"X-Priority: {priority}"]),
                    )
                )
                for s in subjects
            ]
        finally:
            client.quit()

    def _try_send(self, daemon: Daemon, username: str, password: str, subject: str) -> bool:
        """One message on a new session: True once it is answered 250, False on a temporary refusal."""
        try:
            self.send(daemon, username, password, [subject])
        except (smtplib.SMTPAuthenticationError, AssertionError):
            return False
        return True

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
        # Any node answers for all: the API and smtpplusctl on B list both.
        names = [n["name"] for n in self.b.api("GET", "/api/v1/nodes").json["nodes"]]
        self.assertEqual(names, ["A", "B"])
        ctl = os.path.join(os.path.dirname(sys.executable), "smtpplusctl")
        listed = subprocess.run(
            [ctl, "--url", f"http://127.0.0.1:{self.b.admin_port}", "--token", self.b.token, "nodes"],
            capture_output=True, text=True, timeout=30,
        )
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertEqual([line.split()[0] for line in listed.stdout.splitlines()[1:]], ["A", "B"])
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
        self.assertIn("node A is silent or left: took over 8 of its unfinished messages", self.b.process.output())
        self.assertTrue(
            poll(lambda: {self.b.api("GET", f"/api/v1/messages/{i}").json["status"] for i in ids} == {"sent"}, 10)
        )

    def test_priority_one_on_b_overtakes_bulk_on_a(self) -> None:
        """
        A holds a backlog of 60 bulk messages (one delivery at a time, 5 per
        second); a priority-1 message accepted by B reaches the smarthost
        while most of A's bulk is still waiting.
        """
        self.start(a_delivery="max_concurrency = 1\nrate_limit = 5")
        # The user's default is the lowest: each message's own X-Priority decides.
        username, password = self.a.create_user(authorized_domains="shop.test", priority=5)
        self.send(self.a, username, password, [f"bulk-{n}" for n in range(60)], priority=5)
        self.assertTrue(poll(lambda: len(self.sink.find("bulk-")) >= 5, 20))
        self.send(self.b, username, password, ["urgent-b"], priority=1)
        urgent = self.sink.wait_for("urgent-b")
        before = [m for m in self.sink.find("bulk-") if m.at <= urgent.at]
        self.assertLess(len(before), 40, f"{len(before)} bulk messages arrived before the urgent one")
        self.assertTrue(poll(lambda: len(self.sink.find("bulk-")) >= 60, 60))

    def test_postgresql_outage_with_two_nodes(self) -> None:
        """
        PostgreSQL stops while both nodes take mail: every answer is 250
        or 451 4.3.0; once it is back both nodes accept again without a
        restart, and every message answered 250 arrives exactly once.
        """
        from tests.harness.postgres import server

        self.start()
        username, password = self.a.create_user(authorized_domains="shop.test")
        pg = server()
        accepted: list[str] = []
        refused = 0
        clients = {name: logged_in(d.plain_ports[0], username, password) for name, d in (("a", self.a), ("b", self.b))}
        try:
            for n in range(30):
                if n == 10:
                    pg.stop()
                if n == 20:
                    pg.start()
                for name, client in clients.items():
                    subject = f"outage-{name}-{n}"
                    code, text = submit(client, "app@shop.test", [f"{subject}@dest.test"], message(subject, "app@shop.test"))
                    if code == 250:
                        accepted.append(f"{subject}@dest.test")
                    else:
                        self.assertEqual((code, text[:5]), (451, "4.3.0"), text)
                        refused += 1
        finally:
            pg.start()
            for client in clients.values():
                client.quit()
        self.assertGreater(refused, 0)
        for name, d in (("a", self.a), ("b", self.b)):
            # Until the node has reconnected, a login is a 454 and new mail a 451.
            self.assertTrue(poll(lambda d=d, name=name: self._try_send(d, username, password, f"after-{name}"), 20))
            accepted.append(f"after-{name}@dest.test")
        self.assertTrue(poll(lambda: len(self.sink.find("outage-")) + len(self.sink.find("after-")) >= len(accepted), 60))
        poll(lambda: len(self.sink.find("outage-")) + len(self.sink.find("after-")) > len(accepted), 2)
        arrived = sorted(r for m in self.sink.find("outage-") + self.sink.find("after-") for r in m.rcpt_tos)
        self.assertEqual(arrived, sorted(accepted), self.a.process.output()[-6000:] + self.b.process.output()[-6000:])

    def test_user_disabled_on_a_ends_sessions_on_b(self) -> None:
        """
        A session open on B keeps sending until the user is disabled through
        A's API; within a heartbeat B refuses its next MAIL with 550 5.7.13,
        and a new login on B fails.
        """
        self.start()
        username, password = self.a.create_user(authorized_domains="shop.test")
        client = logged_in(self.b.plain_ports[0], username, password)
        try:
            first = submit(client, "app@shop.test", ["before@dest.test"], message("before", "app@shop.test"))
            self.assertEqual(first[0], 250)
            response = self.a.api("PATCH", f"/api/v1/users/{username}", {"enabled": False})
            self.assertEqual(response.status, 200, response.json)

            def refused() -> bool:
                code, text = client.docmd("MAIL", "FROM:<app@shop.test>")
                if code == 250:
                    client.rset()
                    return False
                self.assertEqual((code, text[:6]), (550, b"5.7.13"), text)
                return True

            self.assertTrue(poll(refused, 10), self.b.process.output())
        finally:
            client.close()
        with self.assertRaises(smtplib.SMTPAuthenticationError):
            logged_in(self.b.plain_ports[0], username, password)

    def test_second_node_of_the_same_name_refused(self) -> None:
        """A node started with the name of a running node stops at start-up with one line saying why."""
        self.start()
        twin = Daemon(_node_config("A", self.dsn, self.b.sink_port), plain=1, tls=0, sink=False, wait=False)
        self.addCleanup(twin.stop)
        self.assertEqual(twin.process.wait(30), 1, twin.process.output())
        self.assertIn("smtpplus: cannot start: a node named A wrote its heartbeat", twin.process.output())
        self.assertIn("give each node its own [server] node_name", twin.process.output())

    def test_clean_stop_hands_messages_over(self) -> None:
        """
        A's next hop refuses connections, so its messages wait deferred;
        SIGTERM stops A cleanly: it leaves the nodes, B takes its messages
        at once (no lease to wait out) and delivers them, and A starts
        again right away under its name.
        """
        closed = free_port()
        self.start(a_smarthost=closed)
        username, password = self.b.create_user(authorized_domains="shop.test")
        self.send(self.a, username, password, [f"handed-{n}" for n in range(5)])
        deferred = lambda: _rows(  # noqa: E731
            self.dsn, "SELECT COUNT(*) FROM queue_messages WHERE status = 'deferred' AND claimed_by = 'A'"
        )[0][0]
        self.assertTrue(poll(lambda: deferred() == 5, 15), self.a.process.output())
        self.a.process.proc.send_signal(signal.SIGTERM)
        self.assertIsNotNone(self.a.process.wait(15), self.a.process.output())
        self.assertIn("node A left", self.a.process.output())
        self.assertTrue(poll(lambda: len(self.sink.find("handed-")) >= 5, LEASE + 10), self.b.process.output())
        self.assertIn("node A is silent or left: took over 5 of its unfinished messages", self.b.process.output())
        self.a.restart()
        self.a.wait_ready()
        names = [n["name"] for n in self.b.api("GET", "/api/v1/nodes").json["nodes"]]
        self.assertTrue(poll(lambda: [n["name"] for n in self.b.api("GET", "/api/v1/nodes").json["nodes"]] == ["A", "B"], 10), names)
