"""
What two nodes on one PostgreSQL share beyond the queue (contract section
5: "login throttling ..., one notification per coalescing window"), each a
real twistd: failed logins on both count towards one username lock that
holds on both, and the events of one user recorded on both nodes within
one window become one mail and one summary, sent by the leader alone.
"""

from __future__ import annotations

import smtplib
from typing import Any

from twisted.trial import unittest

from smtpplus.notify.dispatch import COALESCE_SECONDS
from tests.harness.clients import logged_in, submit
from tests.harness.daemon import Daemon
from tests.harness.messages import message
from tests.harness.polling import poll
from tests.harness.postgres import fresh_database
from tests.test_two_nodes import _node_config

ADMIN = "admin@ops.test"
FAILURES_PER_USER = 4


def _config(name: str, dsn: str, smarthost: Any) -> Any:
    def config(d: Daemon) -> str:
        hop = d.sink_port if smarthost is None else smarthost
        return _node_config(name, dsn, hop)(d) + (
            f'\n[notifications]\nrecipients = ["{ADMIN}"]\n'
            f"\n[security]\nauth_failures_per_user = {FAILURES_PER_USER}\n"
        )

    return config


def _auth_code(daemon: Daemon, username: str, password: str) -> int:
    """The reply code to AUTH PLAIN on a new session from a new loopback address."""
    try:
        client = logged_in(daemon.plain_ports[0], username, password)
    except smtplib.SMTPAuthenticationError as e:
        return e.smtp_code
    client.quit()
    return 235


class TwoNodeDutiesTests(unittest.TestCase):
    """Nodes A and B on one fresh database, B's aiosmtpd smarthost the next hop of both."""

    def setUp(self) -> None:
        self.dsn = fresh_database(self)
        self.b = Daemon(_config("B", self.dsn, None), plain=1, tls=0)
        self.addCleanup(self.b.stop)
        assert self.b.sink is not None
        self.sink = self.b.sink
        self.a = Daemon(_config("A", self.dsn, self.b.sink_port), plain=1, tls=0, sink=False)
        self.addCleanup(self.a.stop)

    def admin_mail(self) -> list[str]:
        """The subjects of the notification mails the smarthost received."""
        return [str(m.message["Subject"]) for m in self.sink.received() if ADMIN in m.rcpt_tos]

    def test_username_lock_across_nodes(self) -> None:
        """
        Four wrong passwords for one user, alternating between A and B (each
        from a new address), lock the username on both: the right password
        is then refused with 454 on A and on B; one account_block event.
        """
        username, password = self.a.create_user(authorized_domains="shop.test")
        codes = [_auth_code(node, username, "wrong") for node in (self.a, self.b) * (FAILURES_PER_USER // 2)]
        self.assertEqual(codes, [535] * FAILURES_PER_USER)
        self.assertEqual(_auth_code(self.a, username, password), 454)
        self.assertEqual(_auth_code(self.b, username, password), 454)
        blocks = self.b.api("GET", f"/api/v1/notifications?type=account_block&user={username}").json
        self.assertEqual(len(blocks["notifications"]), 1)
        self.assertTrue(poll(lambda: len(self.admin_mail()) >= 1, 15), self.a.process.output())
        self.assertEqual(self.admin_mail(), [f"[smtpplus] Account {username} locked after failed logins"])

    def test_one_summary_per_window_across_nodes(self) -> None:
        """
        A user's messages refused for their sender domain, two on A and two
        on B within one window: the administrators get the first event's
        mail and, when the window closes, one summary of the three others,
        from one node; nothing more.
        """
        username, password = self.a.create_user(authorized_domains="shop.test")
        for node in (self.a, self.b, self.a, self.b):
            client = logged_in(node.plain_ports[0], username, password)
            code, _ = submit(client, "app@other.test", ["x@dest.test"], message("refused", "app@other.test"))
            client.quit()
            self.assertEqual(code // 100, 5)
        first = f"[smtpplus] Unauthorized sender for user {username}"
        self.assertTrue(poll(lambda: self.admin_mail(), 15), self.a.process.output())
        self.assertEqual(self.admin_mail(), [first])
        summary = f"[smtpplus] 3 more sender_domain events for user {username}"
        arrived = poll(lambda: len(self.admin_mail()) >= 2, COALESCE_SECONDS + 20)
        self.assertTrue(arrived, self.b.process.output())
        # Time for a second node's copy, were one to come.
        self.assertFalse(poll(lambda: len(self.admin_mail()) > 2, 3))
        self.assertEqual(self.admin_mail(), [first, summary])
        leaders = [n for n in (self.a, self.b) if "leads: it runs the singleton duties" in n.process.output()]
        self.assertEqual(len(leaders), 1)
