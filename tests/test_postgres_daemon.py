"""
The real twistd with C{[storage] backend = "postgresql"} on the tests'
private server: mail sent with smtplib is relayed to an aiosmtpd
smarthost, and the users, the queue rows and each message's content are in
PostgreSQL; with the server stopped, new mail gets a 451 and nothing is
answered 250 until it is back.
"""

from __future__ import annotations

import os
import smtplib
from typing import Any

import psycopg
from twisted.trial import unittest

from tests.harness.clients import logged_in, submit
from tests.harness.daemon import Daemon
from tests.harness.messages import message, queue_id
from tests.harness.polling import poll
from tests.harness.postgres import fresh_database, server


def _rows(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, args).fetchall()


class PostgresDaemonTests(unittest.TestCase):
    """One node on PostgreSQL, end to end."""

    def _daemon(self, workers: int) -> tuple[Daemon, str]:
        # The tests' server trusts loopback: the password is never asked
        # for, and must never be logged.
        dsn = fresh_database(self) + " password=s3cret-pw"
        daemon = Daemon(
            lambda d: d.toml(hostname="relay.example.test", delivery="retry_schedule = [600]")
            .replace("[server]\n", f"[server]\nworkers = {workers}\n", 1)
            + f'\n[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\n',
            plain=1,
            tls=0,
        )
        self.addCleanup(daemon.stop)
        return daemon, dsn

    def _relays_through_postgresql(self, workers: int) -> None:
        daemon, dsn = self._daemon(workers)
        assert daemon.sink is not None
        _, password = daemon.create_user(username="shop", authorized_domains="example.com")
        self.assertEqual(_rows(dsn, "SELECT username FROM users"), [("shop",)])
        self.assertFalse(os.path.exists(os.path.join(daemon.state_dir, "smtpplus.db")))
        client = logged_in(daemon.plain_ports[0], "shop", password)
        body = message("stored in postgresql", "a@example.com")
        reply = submit(client, "a@example.com", ["x@dest.test", "y@dest.test"], body)
        # Past the spool's in-memory limit: the coordinator reads the bytes from the file.
        big_body = "\r\n".join(f"line {i:05d} " + "x" * 50 for i in range(2000))
        big_id = queue_id(submit(client, "a@example.com", ["z@dest.test"], message("big", "a@example.com", body=big_body)))
        client.quit()
        message_id = queue_id(reply)
        (big,) = _rows(dsn, "SELECT content FROM queue_contents WHERE message_id = %s", big_id)
        self.assertIn(big_body.encode(), bytes(big[0]))
        # The 250 came after the commit: the row and the content are there now.
        content = _rows(dsn, "SELECT content FROM queue_contents WHERE message_id = %s", message_id)
        self.assertEqual(len(content), 1)
        self.assertIn(b"stored in postgresql", bytes(content[0][0]))
        received = daemon.sink.wait_for("stored in postgresql")
        self.assertEqual(sorted(received.rcpt_tos), ["x@dest.test", "y@dest.test"])
        self.assertTrue(
            poll(lambda: _rows(dsn, "SELECT status FROM queue_messages WHERE id = %s", message_id) == [("sent",)], 10),
            daemon.process.output(),
        )
        self.assertEqual(
            _rows(dsn, "SELECT address, status FROM queue_recipients WHERE message_id = %s ORDER BY idx", message_id),
            [("x@dest.test", "sent"), ("y@dest.test", "sent")],
        )
        self.assertEqual(daemon.api("GET", f"/api/v1/messages/{message_id}").json["status"], "sent")
        self.assertNotIn("Traceback", daemon.process.output())

    def test_relays_through_postgresql(self) -> None:
        """One SMTP process: users, queue rows and content in PostgreSQL; the message is relayed and marked sent."""
        self._relays_through_postgresql(workers=1)

    def test_relays_through_postgresql_with_workers(self) -> None:
        """With SMTP worker processes, the coordinator stores what they accepted in PostgreSQL, content included."""
        self._relays_through_postgresql(workers=2)

    def _outage(self, workers: int) -> None:
        daemon, dsn = self._daemon(workers)
        assert daemon.sink is not None
        _, password = daemon.create_user(username="shop", authorized_domains="example.com")
        pg = server()
        client = logged_in(daemon.plain_ports[0], "shop", password)
        pg.stop()
        try:
            code, text = submit(client, "a@example.com", ["x@dest.test"], message("during outage", "a@example.com"))
            self.assertEqual((code, text[:5]), (451, "4.3.0"))
            code, _ = submit(client, "a@example.com", ["x@dest.test"], message("during outage 2", "a@example.com"))
            self.assertEqual(code, 451)
        finally:
            pg.start()
        self.assertTrue(poll(lambda: "PostgreSQL at" in daemon.process.output() and "reachable again" in
                             daemon.process.output(), 15), daemon.process.output())
        self.assertEqual(daemon.process.output().count("is unavailable ("), 1, daemon.process.output())
        self.assertNotIn("s3cret-pw", daemon.process.output())
        # The session's refusals are replies, not tracebacks; the link to the workers holds.
        self.assertNotIn("Traceback", daemon.process.output())
        message_id = queue_id(submit(client, "a@example.com", ["x@dest.test"], message("after outage", "a@example.com")))
        client.quit()
        daemon.sink.wait_for("after outage")
        self.assertEqual(_rows(dsn, "SELECT id FROM queue_messages"), [(message_id,)])
        self.assertEqual(daemon.sink.find("during outage"), [])

    def test_outage_refuses_new_mail_then_recovers(self) -> None:
        """
        With PostgreSQL stopped, new mail is answered 451 4.3.0 (no 250
        without a commit) and the outage is logged once; once it is back,
        the node reconnects by itself and the same session sends again.
        """
        self._outage(workers=1)

    def test_outage_with_workers(self) -> None:
        """The same with SMTP worker processes: their sessions get the 451 and keep their link to the coordinator."""
        self._outage(workers=2)

    def test_login_during_outage_with_workers(self) -> None:
        """
        A login while PostgreSQL is stopped gets a temporary failure (454)
        from the worker, which keeps serving (its link to the coordinator
        holds); once PostgreSQL is back the same worker logs the user in.
        """
        daemon, _ = self._daemon(workers=2)
        _, password = daemon.create_user(username="shop", authorized_domains="example.com")
        pg = server()
        pg.stop()
        try:
            for _ in range(4):
                with self.assertRaises(smtplib.SMTPAuthenticationError) as caught:
                    logged_in(daemon.plain_ports[0], "shop", password)
                self.assertEqual(caught.exception.smtp_code, 454)
        finally:
            pg.start()
        self.assertNotIn("ended after", daemon.process.output())
        self.assertIn("AUTH for 'shop' from 127.", daemon.process.output())
        self.assertTrue(poll(lambda: self._logs_in(daemon, password), 15), daemon.process.output())
        self.assertNotIn("ended after", daemon.process.output())
        # The outage is logged once by the store; the logins each in one line, without a traceback.
        self.assertNotIn("Traceback", daemon.process.output())

    def _logs_in(self, daemon: Daemon, password: str) -> bool:
        try:
            logged_in(daemon.plain_ports[0], "shop", password).quit()
        except smtplib.SMTPAuthenticationError:
            return False
        return True
