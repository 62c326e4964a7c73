"""The user store: one contract, run against the SQLite and the in-memory implementation."""

from __future__ import annotations

import sqlite3
from typing import Any

import attrs
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from smtpplus.auth.memory import MemoryUserStore
from smtpplus.auth.postgres import PostgresUserStore
from smtpplus.auth.store import COMPONENT, MIGRATIONS, DuplicateUser, LoginRecord, SQLiteUserStore
from smtpplus.auth.users import new_user
from smtpplus.interfaces import IUserStore
from smtpplus.model import Aggregation, User
from tests.harness.postgres import fresh_database, make_postgres_database
from tests.harness.stores import make_sqlite_store


def user_fields(username: str, **changes: Any) -> User:
    """A new user as the admin API would validate it from a request body."""
    return new_user({"username": username, **changes})


class UserStoreContract:
    """Behaviour every L{IUserStore} must have; mixed into a TestCase with C{make_store}."""

    clock: Clock

    def make_store(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1714564800)  # 2024-05-01T12:00:00Z
        self.store = self.make_store()
        self.changes: list[str] = []
        self.store.subscribe(self.changes.append)

    def test_provides_interface(self) -> None:
        """The store provides IUserStore, every method with the interface's signature."""
        verifyObject(IUserStore, self.store)

    @inlineCallbacks
    def test_create_and_get(self) -> Any:
        """A created user comes back with its timestamps, shaped like the contract's user object, without any hash."""
        created = yield self.store.create(user_fields("alice", authorized_domains=["example.com"]), b"$2b$hash")
        expected = User(
            "alice",
            authorized_domains=("example.com",),
            created_at="2024-05-01T12:00:00Z",
            updated_at="2024-05-01T12:00:00Z",
        )
        self.assertEqual(created, expected)
        self.assertEqual((yield self.store.get("alice")), expected)
        self.assertEqual((yield self.store.get("ALICE")), expected)
        self.assertIsNone((yield self.store.get("bob")))
        self.assertEqual(self.changes, ["alice"])
        self.assertEqual(created.to_json(), {
            "username": "alice",
            "enabled": True,
            "priority": 3,
            "notes": "",
            "authorized_domains": ["example.com"],
            "authorized_senders": [],
            "aggregation": "day",
            "sandbox": False,
            "priority_budget": 0,
            "created_at": "2024-05-01T12:00:00Z",
            "updated_at": "2024-05-01T12:00:00Z",
        })

    @inlineCallbacks
    def test_duplicate(self) -> Any:
        """A second user with the same username, in any case, is a DuplicateUser."""
        yield self.store.create(user_fields("alice"), b"h")
        with self.assertRaises(DuplicateUser):
            yield self.store.create(user_fields("Alice"), b"h")

    @inlineCallbacks
    def test_list(self) -> Any:
        """All users, enabled and disabled, are listed by username."""
        yield self.store.create(user_fields("bob", enabled=False), b"h")
        yield self.store.create(user_fields("alice"), b"h")
        users = yield self.store.list()
        self.assertEqual([(u.username, u.enabled) for u in users], [("alice", True), ("bob", False)])

    @inlineCallbacks
    def test_update(self) -> Any:
        """Update changes only the given fields and updated_at, and bumps the generation."""
        yield self.store.create(user_fields("alice"), b"h")
        before = yield self.store.login_record("alice")
        self.clock.advance(60)
        user = yield self.store.update("alice", {"priority": 1, "authorized_senders": ["a@example.com"]})
        self.assertEqual(user.priority, 1)
        self.assertEqual(user.authorized_senders, ("a@example.com",))
        self.assertEqual(user.enabled, True)
        self.assertEqual(user.created_at, "2024-05-01T12:00:00Z")
        self.assertEqual(user.updated_at, "2024-05-01T12:01:00Z")
        self.assertEqual((yield self.store.get("alice")), user)
        after = yield self.store.login_record("alice")
        self.assertGreater(after.generation, before.generation)
        self.assertIsNone((yield self.store.update("bob", {"priority": 1})))
        self.assertEqual(self.changes, ["alice", "alice"])

    @inlineCallbacks
    def test_password_hash(self) -> Any:
        """The hash is only reachable through login_record and is replaced by set_password_hash."""
        yield self.store.create(user_fields("alice"), b"old")
        record = yield self.store.login_record("ALICE")
        self.assertEqual(record, LoginRecord("alice", True, b"old", record.generation))
        self.assertNotIn("old", repr(record))
        self.assertTrue((yield self.store.set_password_hash("alice", b"new")))
        self.assertEqual((yield self.store.login_record("alice")).password_hash, b"new")
        self.assertFalse((yield self.store.set_password_hash("bob", b"new")))
        self.assertIsNone((yield self.store.login_record("bob")))

    @inlineCallbacks
    def test_delete(self) -> Any:
        """A deleted user is gone; deleting twice reports False the second time."""
        yield self.store.create(user_fields("alice"), b"h")
        self.assertTrue((yield self.store.delete("Alice")))
        self.assertIsNone((yield self.store.get("alice")))
        self.assertIsNone((yield self.store.login_record("alice")))
        self.assertFalse((yield self.store.delete("alice")))
        self.assertEqual(self.changes, ["alice", "Alice"])

    @inlineCallbacks
    def test_standing_ends_when_disabled(self) -> Any:
        """
        A standing taken before a disable reports "disabled" as soon as the
        update has fired, and stays void after re-enabling; one taken after
        re-enabling is good.
        """
        yield self.store.create(user_fields("alice"), b"h")
        standing = self.store.standing("alice")
        self.assertIsNone(standing.revoked())
        yield self.store.update("ALICE", {"enabled": False})
        self.assertEqual(standing.revoked(), "disabled")
        yield self.store.update("alice", {"enabled": True})
        self.assertEqual(standing.revoked(), "disabled")
        self.assertIsNone(self.store.standing("Alice").revoked())

    @inlineCallbacks
    def test_standing_ends_when_deleted(self) -> Any:
        """A standing reports "deleted" after the user is deleted, and a re-created user's old sessions stay void."""
        yield self.store.create(user_fields("alice"), b"h")
        standing = self.store.standing("alice")
        yield self.store.delete("alice")
        self.assertEqual(standing.revoked(), "deleted")
        yield self.store.create(user_fields("alice"), b"h")
        self.assertEqual(standing.revoked(), "deleted")
        self.assertIsNone(self.store.standing("alice").revoked())

    @inlineCallbacks
    def test_standing_survives_other_changes(self) -> Any:
        """
        Other changes keep a standing good: other fields, a new password,
        another user disabled, and writes that found no user.
        """
        yield self.store.create(user_fields("alice"), b"h")
        yield self.store.create(user_fields("bob"), b"h")
        standing = self.store.standing("alice")
        yield self.store.update("alice", {"priority": 1, "enabled": True})
        yield self.store.set_password_hash("alice", b"new")
        yield self.store.update("bob", {"enabled": False})
        yield self.store.delete("carol")
        yield self.store.update("carol", {"enabled": False})
        self.assertIsNone(standing.revoked())


    @inlineCallbacks
    def test_every_field_round_trips(self) -> Any:
        """Every field of a user comes back as it was stored, lists as tuples and the policy as an Aggregation."""
        user = user_fields(
            "Carol",
            enabled=False,
            priority=5,
            notes="billing ✓",
            authorized_domains="b.example; a.example",
            authorized_senders=["X@c.example"],
            aggregation="sender_email_subject",
        )
        yield self.store.create(user, b"h")
        stored = yield self.store.get("carol")
        self.assertEqual(stored, attrs.evolve(user, created_at=stored.created_at, updated_at=stored.updated_at))
        self.assertIs(stored.aggregation, Aggregation.SENDER_EMAIL_SUBJECT)

    @inlineCallbacks
    def test_list_ignores_case(self) -> Any:
        """Users are listed by username without regard to case."""
        for name in ("bob", "Alice", "carol"):
            yield self.store.create(user_fields(name), b"h")
        self.assertEqual([u.username for u in (yield self.store.list())], ["Alice", "bob", "carol"])

    @inlineCallbacks
    def test_password_change_is_a_change(self) -> Any:
        """A new password hash bumps updated_at and the generation, and tells the listeners."""
        yield self.store.create(user_fields("alice"), b"old")
        before = yield self.store.login_record("alice")
        self.clock.advance(60)
        yield self.store.set_password_hash("ALICE", b"new")
        after = yield self.store.login_record("alice")
        self.assertGreater(after.generation, before.generation)
        self.assertEqual((yield self.store.get("alice")).updated_at, "2024-05-01T12:01:00Z")
        self.assertEqual(self.changes, ["alice", "ALICE"])


class SQLiteUserStoreTests(UserStoreContract, TestCase):
    def make_store(self) -> SQLiteUserStore:
        return make_sqlite_store(self, self.clock)

    def test_migration_versioned(self) -> None:
        """The users schema is recorded as a versioned migration component, and re-migrating is harmless."""
        self.store.migrate()
        conn = sqlite3.connect(self.store._db.path)
        self.addCleanup(conn.close)
        row = conn.execute("SELECT version FROM schema_migrations WHERE component = ?", (COMPONENT,)).fetchone()
        self.assertEqual(row[0], len(MIGRATIONS))


class MemoryUserStoreTests(UserStoreContract, TestCase):
    def make_store(self) -> MemoryUserStore:
        return MemoryUserStore(self.clock)


class PostgresUserStoreTests(UserStoreContract, TestCase):
    """The contract against the PostgreSQL store on the tests' private server."""

    def make_store(self) -> PostgresUserStore:
        store = PostgresUserStore(make_postgres_database(self), self.clock)
        store.migrate()
        return store

    @inlineCallbacks
    def test_migration_versioned(self) -> Any:
        """The users schema is recorded under the same component and version as in SQLite; re-migrating is harmless."""
        self.store.migrate()
        version = yield self.store._db.run(
            lambda conn: conn.execute("SELECT version FROM schema_migrations WHERE component = %s", (COMPONENT,)).fetchone()[0]
        )
        self.assertEqual(version, len(MIGRATIONS))


class PostgresUserChangesTests(TestCase):
    """Nodes A and B sharing one database learn each other's user changes through poll_changes."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        from smtpplus.storage.postgres import PostgresDatabase

        self.clock = Clock()
        self.clock.advance(1714564800)
        dsn = fresh_database(self)
        self.stores = {}
        self.heard: dict[str, list[str]] = {}
        for name in ("A", "B"):
            database = PostgresDatabase(reactor, dsn)
            database.start()
            self.addCleanup(database.stop)
            store = PostgresUserStore(database, self.clock, node=name)
            store.migrate()
            self.heard[name] = []
            store.subscribe(self.heard[name].append)
            self.stores[name] = store

    @inlineCallbacks
    def test_other_nodes_changes_applied_once(self) -> Any:
        """
        B hears A's create, password change and disabling once each, and
        the disabling voids B's standings of the user; A does not hear its
        own changes again; changes made before B started are skipped.
        """
        yield self.stores["A"].create(user_fields("early"), b"$2b$hash")
        self.stores["B"].skip_past_changes()
        yield self.stores["A"].create(user_fields("alice"), b"$2b$hash")
        standing = self.stores["B"].standing("alice")
        self.assertEqual((yield self.stores["B"].poll_changes()), 1)
        self.assertEqual(self.heard["B"], ["alice"])
        yield self.stores["A"].set_password_hash("alice", b"$2b$other")
        yield self.stores["A"].update("alice", {"enabled": False})
        self.assertIsNone(standing.revoked())
        self.assertEqual((yield self.stores["B"].poll_changes()), 2)
        self.assertEqual(standing.revoked(), "disabled")
        self.assertEqual((yield self.stores["B"].poll_changes()), 0)
        self.assertEqual((yield self.stores["A"].poll_changes()), 0)
        self.assertEqual(self.heard["A"], ["early", "alice", "alice", "alice"])

    @inlineCallbacks
    def test_deleted_on_a_revoked_on_b(self) -> Any:
        """A user deleted through A: B's open standings of it end with reason 'deleted'."""
        yield self.stores["A"].create(user_fields("bob"), b"$2b$hash")
        yield self.stores["B"].poll_changes()
        standing = self.stores["B"].standing("bob")
        self.assertTrue((yield self.stores["A"].delete("bob")))
        yield self.stores["B"].poll_changes()
        self.assertEqual(standing.revoked(), "deleted")
