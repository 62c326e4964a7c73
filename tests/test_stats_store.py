"""Tests for L{smtpplus.notify.stats}: counting into groups and answering every policy, SQLite and in memory."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from smtpplus.interfaces import IStatsQuery, IStatsRecorder
from smtpplus.notify.postgres import PostgresStatistics
from smtpplus.notify.stats import POLICIES, MemoryStatistics, Statistics, UserPolicy, dynamic_subject, sender_of
from smtpplus.storage.database import Database
from tests.harness.postgres import make_postgres_database

# 2024-05-01T12:00:00Z
START = 1714564800.0


def message(n: int = 1, user: str = "alice", subject: str = "Ticket 4711 solved", recipients: int = 2,
            created_at: str = "2024-05-01T10:00:00Z", campaign_code: str | None = None,
            header_from: str = "Help Desk <Help@Example.COM>") -> dict[str, Any]:
    return {
        "id": f"m{n}",
        "user": user,
        "mail_from": "bounces@example.com",
        "header_from": header_from,
        "subject": subject,
        "campaign_code": campaign_code,
        "created_at": created_at,
        "recipients": recipients,
    }


def zero(key: str, **counts: int) -> dict[str, Any]:
    group = {"key": key, "messages": 0, "recipients": 0, "sent": 0, "deferred": 0, "bounced": 0, "rejected": 0}
    group.update(counts)
    return group


class StatisticsContract:
    """Behaviour every statistics store must have; mixed into a TestCase with C{make_stats}."""

    def make_stats(self, user_policy: UserPolicy) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.policies: dict[str, str] = {}
        self.stats = self.make_stats(lambda user: succeed(self.policies.get(user)))

    @inlineCallbacks
    def groups(self, policy: str | None, user: str | None = None) -> Any:
        result = yield self.stats.stats(user, policy)
        return result["groups"]

    def test_interfaces(self) -> None:
        """The store provides the recorder and the admin query interfaces."""
        verifyObject(IStatsRecorder, self.stats)
        verifyObject(IStatsQuery, self.stats)

    @inlineCallbacks
    def test_every_policy_key(self) -> Any:
        """One message is counted under the key each policy derives from it."""
        self.stats.accepted(message())
        expected = {
            "day": "2024-05-01",
            "week": "2024-W18",
            "month": "2024-05",
            "year": "2024",
            "subject": "Ticket 4711 solved",
            "dynamic_subject": "Ticket {n} solved",
            "sender_email": "help@example.com",
            "sender_name": "Help Desk",
            "sender_email_subject": "help@example.com | Ticket 4711 solved",
            "user": "alice",
        }
        self.assertEqual(sorted(expected), sorted(POLICIES))
        for policy, key in expected.items():
            result = yield self.stats.stats(None, policy)
            self.assertEqual(result, {"policy": policy, "groups": [zero(key, messages=1, recipients=2)]}, policy)

    @inlineCallbacks
    def test_iso_week_at_year_boundary(self) -> Any:
        """Weeks are ISO weeks: 2021-01-03 is in 2020-W53, 2024-12-30 in 2025-W01."""
        self.stats.accepted(message(1, created_at="2021-01-03T23:59:59Z"))
        self.stats.accepted(message(2, created_at="2024-12-30T00:00:00+00:00"))
        groups = yield self.groups("week")
        self.assertEqual([g["key"] for g in groups], ["2020-W53", "2025-W01"])

    @inlineCallbacks
    def test_day_in_utc(self) -> Any:
        """A timestamp with an offset is counted on its UTC day."""
        self.stats.accepted(message(created_at="2024-05-01T23:30:00-02:00"))
        groups = yield self.groups("day")
        self.assertEqual([g["key"] for g in groups], ["2024-05-02"])

    @inlineCallbacks
    def test_dynamic_subject_groups_variants(self) -> Any:
        """Subjects that differ only in variable parts share one dynamic_subject group and not one subject group."""
        for n, subject in enumerate(["Ticket 4711 solved", "Ticket 4712 solved", "Invoice 2024-05-01 for a@b.example"]):
            self.stats.accepted(message(n, subject=subject, recipients=1))
        dynamic = yield self.groups("dynamic_subject")
        self.assertEqual(dynamic, [zero("Invoice {date} for {email}", messages=1, recipients=1),
                                   zero("Ticket {n} solved", messages=2, recipients=2)])
        subjects = yield self.groups("subject")
        self.assertEqual(len(subjects), 3)

    @inlineCallbacks
    def test_campaign_code(self) -> Any:
        """A message with a CampaignCode is counted under that code, whatever the policy."""
        self.stats.accepted(message(1, campaign_code="SPRING24", recipients=3))
        self.stats.recipient_result(message(1, campaign_code="SPRING24"), "sent")
        self.stats.accepted(message(2, recipients=1))
        for policy in POLICIES:
            groups = yield self.groups(policy)
            self.assertIn(zero("SPRING24", messages=1, recipients=3, sent=1), groups, policy)
            self.assertEqual(sum(g["messages"] for g in groups), 2, policy)

    @inlineCallbacks
    def test_recipient_results_current_state(self) -> Any:
        """sent/deferred/bounced count recipients by their current state: leaving deferred decrements it."""
        m = message(recipients=3)
        self.stats.accepted(m)
        self.stats.recipient_result(m, "deferred")
        self.stats.recipient_result(m, "deferred")
        self.stats.recipient_result(m, "deferred", previous="deferred")
        groups = yield self.groups("day")
        self.assertEqual(groups, [zero("2024-05-01", messages=1, recipients=3, deferred=2)])
        self.stats.recipient_result(m, "sent", previous="deferred")
        self.stats.recipient_result(m, "bounced", previous="deferred")
        self.stats.recipient_result(m, "sent")
        groups = yield self.groups("day")
        self.assertEqual(groups, [zero("2024-05-01", messages=1, recipients=3, sent=2, bounced=1)])

    @inlineCallbacks
    def test_rejected(self) -> Any:
        """Refusals count as rejected; one refused at MAIL FROM has key "" for subject policies."""
        self.stats.rejected("alice", "evil@Spoof.example", "", None)
        self.stats.rejected("alice", "ok@example.com", "Boss <boss@other.example>", "Pay now")
        subjects = yield self.groups("subject")
        self.assertEqual(subjects, [zero("", rejected=1), zero("Pay now", rejected=1)])
        email_subject = yield self.groups("sender_email_subject")
        self.assertEqual([g["key"] for g in email_subject], ["", "boss@other.example | Pay now"])
        senders = yield self.groups("sender_email")
        self.assertEqual([g["key"] for g in senders], ["boss@other.example", "evil@spoof.example"])
        days = yield self.groups("day")
        self.assertEqual(days, [zero("2024-05-01", rejected=2)])

    @inlineCallbacks
    def test_user_filter_and_default_policy(self) -> Any:
        """With a user: only that user's data, in the user's own policy unless another is asked for."""
        self.policies["bob"] = "sender_email"
        self.stats.accepted(message(1, user="alice"))
        self.stats.accepted(message(2, user="bob", header_from="bob@example.net", recipients=5))
        result = yield self.stats.stats("bob", None)
        self.assertEqual(result, {"policy": "sender_email", "groups": [zero("bob@example.net", messages=1, recipients=5)]})
        result = yield self.stats.stats("bob", "day")
        self.assertEqual(result["groups"], [zero("2024-05-01", messages=1, recipients=5)])
        result = yield self.stats.stats("alice", None)
        self.assertEqual(result["policy"], "day")
        result = yield self.stats.stats(None, None)
        self.assertEqual(result, {"policy": "day", "groups": [zero("2024-05-01", messages=2, recipients=7)]})
        users = yield self.groups("user")
        self.assertEqual([g["key"] for g in users], ["alice", "bob"])
        nobody = yield self.groups("day", "carol")
        self.assertEqual(nobody, [])

    def test_unknown_policy(self) -> None:
        """An unknown policy is refused."""
        self.failureResultOf(self.stats.stats(None, "hourly"), ValueError)

    @inlineCallbacks
    def test_encoded_words(self) -> Any:
        """RFC 2047 encoded subjects and display names are counted decoded."""
        self.stats.accepted(message(subject="=?utf-8?q?Gr=C3=BC=C3=9Fe_4711?=",
                                    header_from="=?utf-8?q?J=C3=BCrgen?= <j@example.de>"))
        names = yield self.groups("sender_name")
        self.assertEqual([g["key"] for g in names], ["Jürgen"])
        dynamic = yield self.groups("dynamic_subject")
        self.assertEqual([g["key"] for g in dynamic], ["Grüße {n}"])

    @inlineCallbacks
    def test_calendar_policies_sum_days(self) -> Any:
        """week, month and year add up the days that fall into them."""
        for n, day in enumerate(["2024-05-01", "2024-05-03", "2024-06-01", "2023-12-31"]):
            self.stats.accepted(message(n, created_at=f"{day}T08:00:00Z", recipients=1))
        weeks = yield self.groups("week")
        self.assertEqual(
            weeks,
            [zero("2023-W52", messages=1, recipients=1), zero("2024-W18", messages=2, recipients=2),
             zero("2024-W22", messages=1, recipients=1)],
        )
        months = yield self.groups("month")
        self.assertEqual([(g["key"], g["messages"]) for g in months], [("2023-12", 1), ("2024-05", 2), ("2024-06", 1)])
        years = yield self.groups("year")
        self.assertEqual([(g["key"], g["messages"]) for g in years], [("2023", 1), ("2024", 3)])

    @inlineCallbacks
    def test_campaign_code_equal_to_a_key(self) -> Any:
        """A campaign code that equals a policy's key adds up with that group instead of repeating the key."""
        self.stats.accepted(message(1, campaign_code="alice", recipients=3))
        self.stats.accepted(message(2, recipients=1))
        users = yield self.groups("user")
        self.assertEqual(users, [zero("alice", messages=2, recipients=4)])

    def test_flush_on_timer(self) -> None:
        """Counting starts one flush timer; when it fires the counts are written and no timer is left."""
        self.stats.accepted(message())
        self.stats.accepted(message(2))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(1)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SQLiteStatisticsTests(StatisticsContract, unittest.TestCase):
    def make_stats(self, user_policy: UserPolicy) -> Statistics:
        self.path = self.mktemp()
        self.db = Database(reactor, self.path)
        self.addCleanup(self.db.stop)
        return Statistics(self.db, self.clock, user_policy)

    @inlineCallbacks
    def test_flush_timer_and_restart(self) -> Any:
        """Counts reach the database within the flush interval and survive a restart."""
        self.stats.accepted(message())
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        rows = yield self.db.run(lambda conn: conn.execute("SELECT COUNT(*) FROM stats_groups").fetchone()[0])
        self.assertEqual(rows, 0)
        self.clock.advance(1)
        yield self.stats.flush()
        rows = yield self.db.run(lambda conn: conn.execute("SELECT COUNT(*) FROM stats_groups").fetchone()[0])
        self.assertEqual(rows, 14)
        self.stats.startService()
        self.stats.accepted(message(2))
        yield self.stats.stopService()
        self.db.stop()
        db = Database(reactor, self.path)
        self.addCleanup(db.stop)
        again = Statistics(db, self.clock, lambda user: succeed(None))
        result = yield again.stats(None, "day")
        self.assertEqual(result["groups"], [zero("2024-05-01", messages=2, recipients=4)])

    @inlineCallbacks
    def test_failed_flush_keeps_counts_and_logs_once(self) -> Any:
        """
        While the database refuses writes (disk full) every flush fails: the
        counts are kept, the outage is logged once, not once per flush, and
        the counts land with the first flush that works.
        """
        from twisted.internet.defer import fail
        from twisted.logger import globalLogPublisher

        errors: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "smtpplus.notify.stats" and event["log_level"].name in ("error", "critical"):
                errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        transaction = self.db.transaction
        self.db.transaction = lambda *a: fail(Exception("database or disk is full"))  # type: ignore[method-assign]
        self.stats.accepted(message())
        for _ in range(3):
            yield self.stats.flush()
        self.assertEqual(len(errors), 1)
        self.db.transaction = transaction  # type: ignore[method-assign]
        yield self.stats.flush()
        groups = yield self.groups("day")
        self.assertEqual(groups, [zero("2024-05-01", messages=1, recipients=2)])


class HelperTests(unittest.TestCase):
    def test_dynamic_subject(self) -> None:
        """Numbers, ids, hex, dates, times, e-mail addresses, URLs and UUIDs become placeholders; words stay."""
        cases = {
            "Ticket 4711 solved": "Ticket {n} solved",
            "Order #12345 shipped on 2024-05-01": "Order #{n} shipped on {date}",
            "Invoice INV-2024-0042 for bob@example.com": "Invoice {id} for {email}",
            "Reset code 3f2a9c1d7e": "Reset code {hex}",
            "Meeting at 10:30 on 01.05.2024": "Meeting at {time} on {date}",
            "Job 123e4567-e89b-12d3-a456-426614174000 done": "Job {uuid} done",
            "Total 1,234.50 EUR": "Total {n} EUR",
            "See https://x.example/a?b=1 now": "See {url} now",
            "Welcome,   Alice": "Welcome, Alice",
            "Your weekly digest": "Your weekly digest",
        }
        for subject, expected in cases.items():
            self.assertEqual(dynamic_subject(subject), expected, subject)

    def test_sender_of(self) -> None:
        """The sender is the header From's lower-cased address and display name, else the envelope sender."""
        self.assertEqual(sender_of("x@y", '"Doe, Jane" <Jane@Example.com>'), ("jane@example.com", "Doe, Jane"))
        self.assertEqual(sender_of("Env@Example.org", ""), ("env@example.org", ""))


class MemoryStatisticsTests(StatisticsContract, unittest.TestCase):
    def make_stats(self, user_policy: UserPolicy) -> MemoryStatistics:
        return MemoryStatistics(self.clock, user_policy)


class PostgresStatisticsTests(StatisticsContract, unittest.TestCase):
    """The contract against the PostgreSQL store on the tests' private server."""

    def make_stats(self, user_policy: UserPolicy) -> PostgresStatistics:
        return PostgresStatistics(make_postgres_database(self), self.clock, user_policy)
