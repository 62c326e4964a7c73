"""
The suppression list: one contract mixin run against the SQLite list and
the in-memory fake, the RCPT rule built on it, and its REST endpoints over
a real HTTP socket.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import treq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface.verify import verifyObject

from smtpplus.admin.api import AdminAPI
from smtpplus.admin.service import admin_site
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.delivery.postgres import PostgresSuppressionList
from smtpplus.delivery.submitter import suppression_refusal
from smtpplus.delivery.suppressions import KeyFilter, MemorySuppressionList, SQLiteSuppressionList
from smtpplus.interfaces import ISuppressionKeys, ISuppressionList
from smtpplus.model import Suppression, User
from smtpplus.storage.database import Database
from tests.harness.postgres import make_postgres_database
from tests.harness.stores import make_sqlite_store
from tests.test_admin_api import SETTINGS, TOKEN, APITestCase

DAY = 1_764_547_200.0  # 2025-12-01T00:00:00Z


class SuppressionListContract:
    """What every L{ISuppressionList} does; mixed into a TestCase with L{make_list}."""

    def make_list(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.list = self.make_list()

    def test_provides_interface(self) -> None:
        """The list provides ISuppressionList with the declared signatures."""
        self.assertTrue(verifyObject(ISuppressionList, self.list))

    @inlineCallbacks
    def test_add_find_remove(self) -> Any:
        """An added address is found (any case, user any case) until removed; removing twice says False."""
        added = yield self.list.add("alice", "Gone@Example.COM", "550 5.1.1 no such user", DAY)
        self.assertEqual(added, Suppression("gone@example.com", "550 5.1.1 no such user", DAY))
        self.assertEqual((yield self.list.find("ALICE", "gone@example.com")), added)
        self.assertEqual((yield self.list.find("alice", "GONE@example.com")), added)
        self.assertIsNone((yield self.list.find("bob", "gone@example.com")))
        self.assertIsNone((yield self.list.find("alice", "other@example.com")))
        self.assertTrue((yield self.list.remove("alice", "gone@EXAMPLE.com")))
        self.assertIsNone((yield self.list.find("alice", "gone@example.com")))
        self.assertFalse((yield self.list.remove("alice", "gone@example.com")))

    @inlineCallbacks
    def test_add_again_takes_the_new_reason_and_date(self) -> Any:
        """Suppressing an address twice keeps one entry, with the later reason and date."""
        yield self.list.add("alice", "a@example.com", "first", DAY)
        yield self.list.add("alice", "A@example.com", "second", DAY + 60)
        self.assertEqual((yield self.list.list("alice")), [Suppression("a@example.com", "second", DAY + 60)])

    @inlineCallbacks
    def test_list_is_per_user_by_address(self) -> Any:
        """A user's list holds only its own entries, ordered by address."""
        yield self.list.add("alice", "z@example.com", "r", DAY)
        yield self.list.add("alice", "b@example.com", "r", DAY)
        yield self.list.add("bob", "c@example.com", "r", DAY)
        self.assertEqual([s.address for s in (yield self.list.list("Alice"))], ["b@example.com", "z@example.com"])
        self.assertEqual([s.address for s in (yield self.list.list("bob"))], ["c@example.com"])
        self.assertEqual((yield self.list.list("carol")), [])


class SQLiteSuppressionListTests(SuppressionListContract, unittest.TestCase):
    def make_list(self) -> SQLiteSuppressionList:
        database = Database(reactor, os.path.abspath(self.mktemp()))
        self.addCleanup(database.stop)
        suppressions = SQLiteSuppressionList(database)
        suppressions.migrate()
        return suppressions


class SQLiteSuppressionKeysTests(unittest.TestCase):
    """Lookups of addresses the table cannot hold are answered without the database thread."""

    def setUp(self) -> None:
        self.database = Database(reactor, os.path.abspath(self.mktemp()))
        self.addCleanup(self.database.stop)
        SQLiteSuppressionList(self.database).migrate()
        self.trips: list[str] = []
        run = self.database.run

        def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
            self.trips.append(fn.__name__)
            return run(fn, *args, **kwargs)

        self.database.run = counted  # type: ignore[method-assign]

    @inlineCallbacks
    def test_rows_written_before_start_are_found(self) -> Any:
        """Keys already in the table (a restart) are loaded: found, and other addresses answered at once."""
        yield SQLiteSuppressionList(self.database).add("Alice", "gone@example.com", "r", DAY)
        del self.trips[:]
        suppressions = SQLiteSuppressionList(self.database)
        # The first lookup asks the table and loads the keys meanwhile.
        self.assertIsNone((yield suppressions.find("alice", "other@example.com")))
        self.assertEqual(self.trips, ["_key_filter", "_find"])
        del self.trips[:]
        found = yield suppressions.find("ALICE", "Gone@Example.com")
        self.assertEqual(found.address, "gone@example.com")
        self.assertEqual(self.trips, ["_find"])
        del self.trips[:]
        for n in range(50):
            self.assertIsNone((yield suppressions.find("alice", f"r{n}@example.com")))
            self.assertIsNone((yield suppressions.find("bob", "gone@example.com")))
        self.assertLess(len(self.trips), 5, self.trips)

    def test_provides_keys(self) -> None:
        """The SQLite list hands out its keys (its process is the table's only writer)."""
        self.assertTrue(verifyObject(ISuppressionKeys, SQLiteSuppressionList(self.database)))

    @inlineCallbacks
    def test_added_and_removed_after_loading(self) -> Any:
        """An address added after the keys were loaded is found; once removed it is not."""
        suppressions = SQLiteSuppressionList(self.database)
        yield suppressions.find("alice", "x@example.com")
        yield suppressions.add("alice", "new@example.com", "550 5.1.1", DAY)
        self.assertEqual((yield suppressions.find("alice", "NEW@example.com")).reason, "550 5.1.1")
        self.assertTrue((yield suppressions.remove("alice", "new@example.com")))
        self.assertIsNone((yield suppressions.find("alice", "new@example.com")))


class KeyFilterTests(unittest.TestCase):
    def test_no_false_negatives_and_few_false_positives(self) -> None:
        """Every key added is held; of 20,000 keys never added, few are (users compared case-insensitively)."""
        keys = KeyFilter()
        for n in range(20_000):
            keys.add("Shop", f"a{n}@example.com")
        self.assertTrue(all(keys.may_hold("SHOP", f"a{n}@example.com") for n in range(20_000)))
        wrong = sum(keys.may_hold("shop", f"b{n}@example.com") for n in range(20_000))
        self.assertLess(wrong, 20)
        self.assertFalse(keys.may_hold("other", "a1@example.com"))


class MemorySuppressionListTests(SuppressionListContract, unittest.TestCase):
    def make_list(self) -> MemorySuppressionList:
        return MemorySuppressionList()


class RefusalTests(unittest.TestCase):
    def test_suppressed_recipient_refused_with_the_date(self) -> None:
        """A suppressed recipient's refusal is 550 5.1.1 "Recipient suppressed" with the ISO date and the reason."""
        suppressions = MemorySuppressionList()
        suppressions.add("alice", "gone@example.com", "550 5.1.1 No such user here", DAY + 3600)
        reply = self.successResultOf(suppression_refusal(suppressions, "alice", "Gone@example.com"))
        assert reply is not None
        self.assertEqual((reply.code, reply.status), (550, "5.1.1"))
        self.assertTrue(reply.text.startswith("Recipient suppressed since 2025-12-01"), reply.text)
        self.assertIn("No such user here", reply.text)

    def test_other_recipients_and_users_pass(self) -> None:
        """An address not on the user's list, or on another user's, is no refusal; nor is anything without a list."""
        suppressions = MemorySuppressionList()
        suppressions.add("alice", "gone@example.com", "r", DAY)
        self.assertIsNone(self.successResultOf(suppression_refusal(suppressions, "alice", "here@example.com")))
        self.assertIsNone(self.successResultOf(suppression_refusal(suppressions, "bob", "gone@example.com")))
        self.assertIsNone(self.successResultOf(suppression_refusal(None, "alice", "gone@example.com")))


class SuppressionAPITests(APITestCase):
    """The suppression endpoints (contract section 8) over a real HTTP socket."""

    def start_server(self, case: unittest.TestCase, queries: Any = None) -> None:
        self.store = make_sqlite_store(case)
        self.hasher = PasswordHasher(None, rounds=4)
        self.suppressions = MemorySuppressionList()
        self.clock = Clock()
        self.clock.advance(DAY)
        api = AdminAPI(
            TOKEN, self.store, self.hasher, lambda: dict(SETTINGS), suppressions=self.suppressions, clock=self.clock
        )
        port = reactor.listenTCP(0, admin_site(api), interface="127.0.0.1")
        case.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        case.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    @inlineCallbacks
    def test_add_list_remove(self) -> Any:
        """POST adds (201, the entry), GET lists it, DELETE (the address as typed) lifts it (204) and then answers 404."""
        yield self.store.create(User("alice"), b"hash")
        code, entry = yield self.call(
            "POST", "/api/v1/users/alice/suppressions", {"address": "Gone@Bücher.example", "reason": "asked"}
        )
        self.assertEqual(code, 201, entry)
        self.assertEqual(
            entry, {"address": "gone@xn--bcher-kva.example", "reason": "asked", "created_at": "2025-12-01T00:00:00Z"}
        )
        code, listing = yield self.call("GET", "/api/v1/users/ALICE/suppressions")
        self.assertEqual((code, listing), (200, {"suppressions": [entry]}))
        self.assertIsNotNone(self.successResultOf(self.suppressions.find("alice", "gone@xn--bcher-kva.example")))
        # The address as typed: any case, its domain in Unicode.
        code, body = yield self.call("DELETE", "/api/v1/users/alice/suppressions/" + quote("GONE@Bücher.example"))
        self.assertEqual((code, body), (204, None))
        self.assertEqual((yield self.call("GET", "/api/v1/users/alice/suppressions")), (200, {"suppressions": []}))
        self.assertError((yield self.call("DELETE", "/api/v1/users/alice/suppressions/gone@xn--bcher-kva.example")), 404)

    @inlineCallbacks
    def test_default_reason(self) -> Any:
        """Without a reason the entry says an administrator added it."""
        yield self.store.create(User("alice"), b"hash")
        code, entry = yield self.call("POST", "/api/v1/users/alice/suppressions", {"address": "x@example.com"})
        self.assertEqual((code, entry["reason"]), (201, "added by an administrator"))

    @inlineCallbacks
    def test_unknown_user_is_404(self) -> Any:
        """Every suppression endpoint of an unknown user answers 404 in the error shape."""
        self.assertError((yield self.call("GET", "/api/v1/users/nobody/suppressions")), 404, "nobody")
        self.assertError(
            (yield self.call("POST", "/api/v1/users/nobody/suppressions", {"address": "x@example.com"})), 404
        )
        self.assertError((yield self.call("DELETE", "/api/v1/users/nobody/suppressions/x@example.com")), 404)

    @inlineCallbacks
    def test_invalid_input_is_400(self) -> Any:
        """A missing or malformed address, an unknown field or a non-string reason is a 400 naming it."""
        yield self.store.create(User("alice"), b"hash")
        path = "/api/v1/users/alice/suppressions"
        for body, field in (
            ({}, "address"),
            ({"address": "not an address"}, "address"),
            ({"address": "a@b@c.example"}, "address"),
            ({"address": 5}, "address"),
            ({"address": "x@example.com", "reason": 5}, "reason"),
            ({"address": "x@example.com", "why": "x"}, "why"),
        ):
            self.assertError((yield self.call("POST", path, body)), 400, field)
        self.assertEqual(self.suppressions.entries, {})


class PostgresSuppressionListTests(SuppressionListContract, unittest.TestCase):
    """The contract against the PostgreSQL list on the tests' private server."""

    def make_list(self) -> PostgresSuppressionList:
        suppressions = PostgresSuppressionList(make_postgres_database(self))
        suppressions.migrate()
        return suppressions
