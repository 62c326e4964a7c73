"""
Contract section 8's per-user policies end to end: the real twistd, real
clients (smtplib over STARTTLS, the admin API over HTTP) and the aiosmtpd
smarthost, which refuses C{bounce*} recipients with C{550 5.1.1} and holds
C{slow*} ones for a few seconds.  Nothing from smtpplus is imported.
"""

from __future__ import annotations

import datetime
import time
import uuid
from typing import Any

from twisted.trial import unittest

from tests.harness.clients import logged_in, submit
from tests.harness.daemon import Daemon, Shared
from tests.harness.messages import message, queue_id
from tests.harness.polling import poll

FINAL = ("sent", "bounced", "partial", "sandboxed")
# Seconds the smarthost holds the message that occupies the delivery slot.
HOLD = 10.0


def unique(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def policies_config(d: Daemon) -> str:
    # One delivery at a time, so that the order messages leave in shows.
    return d.toml(
        hostname="mx.policies.test",
        delivery="max_concurrency = 1\nretry_schedule = [1]",
        tables="[security]\nauth_failures_per_ip = 100000\nauth_failures_per_user = 100000\n",
    )


DAEMON = Shared(lambda: Daemon(policies_config, plain=1, tls=0))


class PoliciesDaemonTests(unittest.TestCase):
    def setUp(self) -> None:
        self.d = DAEMON.get()
        self.port = self.d.plain_ports[0]

    def user(self, **fields: Any) -> tuple[str, str]:
        fields.setdefault("username", unique())
        fields.setdefault("authorized_domains", ["allowed.test"])
        return self.d.create_user(**fields)

    def message(self, message_id: str) -> dict[str, Any]:
        response = self.d.api("GET", f"/api/v1/messages/{message_id}")
        assert response.status == 200, response
        return response.json

    def wait_status(self, message_id: str, statuses: tuple[str, ...] = FINAL, timeout: float = 20.0) -> dict[str, Any]:
        found = poll(lambda: (m := self.message(message_id))["status"] in statuses and m, timeout, 0.2)
        assert found, f"message {message_id} never reached {statuses}: {self.message(message_id)}"
        return found

    def stats(self, username: str) -> dict[str, int]:
        response = self.d.api("GET", f"/api/v1/stats?user={username}&policy=user")
        assert response.status == 200, response
        groups = response.json["groups"]
        return {k: sum(g[k] for g in groups) for k in ("messages", "recipients", "sent", "bounced", "rejected")}

    def test_hard_bounce_suppresses_the_recipient(self) -> None:
        """
        A recipient the smarthost refuses with 550 5.1.1 is suppressed for
        its sender: a later RCPT TO it gets 550 5.1.1 Recipient suppressed
        with the bounce's date, counted as rejected; other users may still
        send to it; after a DELETE the user may again.
        """
        username, password = self.user()
        gone = f"{unique('bounce')}@dest.test"
        with logged_in(self.port, username, password) as client:
            first = queue_id(submit(client, "s@allowed.test", [gone], message(subject=unique("first"))))
        self.assertEqual(self.wait_status(first)["status"], "bounced")
        listed = poll(lambda: self.d.api("GET", f"/api/v1/users/{username}/suppressions").json["suppressions"], 10, 0.2)
        self.assertEqual([(s["address"], s["reason"][:9]) for s in listed], [(gone, "550 5.1.1")])
        today = datetime.datetime.now(datetime.UTC).date().isoformat()
        with logged_in(self.port, username, password) as client:
            self.assertEqual(client.mail("s@allowed.test")[0], 250)
            code, text = client.rcpt(gone)
            self.assertEqual(code, 550)
            self.assertTrue(text.decode().startswith(f"5.1.1 Recipient suppressed since {today}"), text)
            self.assertEqual(client.rcpt("fine@dest.test")[0], 250)
            client.rset()
        self.assertEqual(poll(lambda: self.stats(username)["rejected"], 10, 0.2), 1)
        other, other_password = self.user()
        with logged_in(self.port, other, other_password) as client:
            self.assertEqual(client.mail("s@allowed.test")[0], 250)
            self.assertEqual(client.rcpt(gone)[0], 250)
            client.rset()
        self.assertEqual(self.d.api("DELETE", f"/api/v1/users/{username}/suppressions/{gone}").status, 204)
        with logged_in(self.port, username, password) as client:
            self.assertEqual(client.mail("s@allowed.test")[0], 250)
            self.assertEqual(client.rcpt(gone)[0], 250)
            client.rset()

    def test_manual_suppression(self) -> None:
        """An address added through the API is refused at RCPT for that user at once."""
        username, password = self.user()
        response = self.d.api("POST", f"/api/v1/users/{username}/suppressions", {"address": "Blocked@Dest.test"})
        self.assertEqual(response.status, 201, response.json)
        with logged_in(self.port, username, password) as client:
            self.assertEqual(client.mail("s@allowed.test")[0], 250)
            code, text = client.rcpt("blocked@dest.test")
            self.assertEqual((code, text.decode().split(" ")[:3]), (550, ["5.1.1", "Recipient", "suppressed"]))
            client.rset()

    def test_suppression_reaches_open_sessions_on_every_worker(self) -> None:
        """
        Sessions opened before a suppression is added through the API, on
        whichever SMTP worker, refuse the address at their next RCPT once
        the API has answered; a hard bounce's suppression too.
        """
        username, password = self.user()
        opened = [logged_in(self.port, username, password) for _ in range(8)]
        try:
            for client in opened:
                self.assertEqual(client.mail("s@allowed.test")[0], 250)
                self.assertEqual(client.rcpt("early@dest.test")[0], 250)
            response = self.d.api("POST", f"/api/v1/users/{username}/suppressions", {"address": "later@dest.test"})
            self.assertEqual(response.status, 201, response.json)
            for client in opened:
                self.assertEqual(client.rcpt("later@dest.test")[0], 550)
                self.assertEqual(client.rcpt("other@dest.test")[0], 250)
                client.rset()
        finally:
            for client in opened:
                client.close()

    def test_sandbox_user_never_relayed(self) -> None:
        """
        A sandbox user's message gets 250 queued as ID, ends sandboxed
        (its recipients too), never reaches the smarthost, and counts in
        messages and recipients but not in sent.
        """
        username, password = self.user(sandbox=True)
        self.assertIs(self.d.api("GET", f"/api/v1/users/{username}").json["sandbox"], True)
        marker = unique("sandbox")
        with logged_in(self.port, username, password) as client:
            code, text = submit(client, "s@allowed.test", ["a@dest.test", "b@dest.test"], message(subject=marker))
        self.assertEqual(code, 250, text)
        self.assertIn("queued as", text)
        found = self.wait_status(queue_id((code, text)))
        self.assertEqual(found["status"], "sandboxed")
        self.assertEqual([r["status"] for r in found["recipients"]], ["sandboxed", "sandboxed"])
        counted = poll(lambda: (s := self.stats(username))["messages"] and s, 10, 0.2)
        self.assertEqual(counted, {"messages": 1, "recipients": 2, "sent": 0, "bounced": 0, "rejected": 0})
        # An ordinary message sent afterwards arrives: had the sandboxed one
        # been relayed, it would have arrived before it (one at a time).
        other, other_password = self.user()
        with logged_in(self.port, other, other_password) as client:
            queue_id(submit(client, "s@allowed.test", ["c@dest.test"], message(subject=f"{marker} after")))
        self.d.sink.wait_for(f"{marker} after")
        self.assertEqual([m for m in self.d.sink.find(marker) if m.message["Subject"] == marker], [])

    def test_priority_budget(self) -> None:
        """
        With budget 10, a user's 11th and 12th priority-1 messages within
        the hour get 250, are relayed with X-Priority: 2 and leave after a
        priority-1 message queued after them; one priority_budget event is
        recorded.
        """
        username, password = self.user(priority=1, priority_budget=10)
        marker = unique("budget")
        with logged_in(self.port, username, password) as client:
            for i in range(10):
                queue_id(submit(client, "s@allowed.test", ["r@dest.test"], message(subject=f"{marker} n{i}")))
        for i in range(10):
            self.assertIn(b"X-Priority: 1\r\n", self.d.sink.wait_for(f"{marker} n{i}").data)
        # A slow message holds the one delivery slot while the others queue:
        # the smarthost holds it HOLD seconds at the end of DATA.
        holder, holder_password = self.user(priority=5)
        self.d.sink.delay = HOLD
        self.addCleanup(setattr, self.d.sink, "delay", 0.0)
        held = f"{unique('slow')}@dest.test"
        with logged_in(self.port, holder, holder_password) as client:
            slow = queue_id(submit(client, "s@allowed.test", [held], message(subject=f"{marker} slow")))
        self.assertTrue(poll(lambda: (held, "250 2.1.5 OK") in self.d.sink.rcpt_log, 10, 0.05))
        self.assertEqual(self.message(slow)["status"], "sending")
        with logged_in(self.port, username, password) as client:
            demoted = [
                queue_id(submit(client, "s@allowed.test", ["r@dest.test"], message(subject=f"{marker} over{i}")))
                for i in range(2)
            ]
        urgent, urgent_password = self.user(priority=1)
        with logged_in(self.port, urgent, urgent_password) as client:
            queue_id(submit(client, "s@allowed.test", ["r@dest.test"], message(subject=f"{marker} urgent")))
        queued_at = time.time()
        self.d.sink.delay = 0.0
        self.assertEqual([self.message(m)["priority"] for m in demoted], [2, 2])
        arrived = poll(lambda: len(self.d.sink.find(marker)) == 14 and self.d.sink.find(marker), 30)
        self.assertTrue(arrived, len(self.d.sink.find(marker)))
        slow_at = next(m.at for m in arrived if m.message["Subject"].endswith(" slow"))
        if slow_at < queued_at:
            raise unittest.SkipTest("machine too slow: the slow delivery ended before the others were queued")
        order = [m.message["Subject"].rsplit(" ", 1)[1] for m in arrived if m.at >= slow_at]
        self.assertEqual(order, ["slow", "urgent", "over0", "over1"])
        for m in arrived:
            if "over" in m.message["Subject"]:
                self.assertEqual(m.message.get_all("X-Priority"), ["2"])
        events = self.d.api("GET", f"/api/v1/notifications?type=priority_budget&user={username}").json["notifications"]
        self.assertEqual(len(events), 1, events)
        self.assertEqual(events[0]["user"], username)
