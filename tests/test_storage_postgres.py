"""
The PostgreSQL database object and the migration lists shared with SQLite:
migrations in both dialects (fresh and upgraded), a server that goes away
and comes back, and the DSN kept out of the logs.  Against the tests' own
server (L{tests.harness.postgres}).
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.trial import unittest

from smtpplus.auth import store as users
from smtpplus.delivery import dkim, queue, suppressions
from smtpplus.delivery.postgres import PostgresQueueStore
from smtpplus.notify import events, stats
from smtpplus.storage import postgres
from smtpplus.storage.database import Database, apply_migrations
from smtpplus.storage.migrations import sqlite_steps
from smtpplus.storage.postgres import PostgresDatabase, StoreUnavailable, redact_dsn
from tests.harness.polling import wait_until
from tests.harness.postgres import fresh_database, make_postgres_database, server
from tests.test_delivery_queue_store import _message

COMPONENTS = {
    users.COMPONENT: users.MIGRATIONS,
    queue.COMPONENT: queue.MIGRATIONS,
    suppressions.COMPONENT: suppressions.MIGRATIONS,
    "events": events.MIGRATIONS,
    "stats": stats.MIGRATIONS,
    dkim.COMPONENT: dkim.MIGRATIONS,
}
# What only PostgreSQL has: the shared message contents and the nodes' room.
POSTGRESQL_ONLY = {
    "queue_contents", "queue_contents.message_id", "queue_contents.content",
    "nodes", "nodes.name", "nodes.workers", "nodes.started_at", "nodes.last_seen",
    "queue_messages.claimed_by",
    "user_changes", "user_changes.seq", "user_changes.username", "user_changes.revoked", "user_changes.node",
    "user_changes.at",
}


def _sqlite_schema(path: str) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        return sorted(conn.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall())
    finally:
        conn.close()


def _sqlite_columns(path: str) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        found = set(tables)
        for table in tables:
            found.update(f"{table}.{row[1]}" for row in conn.execute(f"PRAGMA table_info({table})"))
        return found - {"sqlite_sequence", "sqlite_sequence.name", "sqlite_sequence.seq"}
    finally:
        conn.close()


def _postgresql_columns(conn: Any) -> set[str]:
    rows = conn.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
    ).fetchall()
    return {table for table, _ in rows} | {f"{table}.{column}" for table, column in rows}


def _postgresql_schema(conn: Any) -> list[tuple[Any, ...]]:
    columns = conn.execute(
        "SELECT table_name, column_name, data_type, is_nullable, column_default, collation_name "
        "FROM information_schema.columns WHERE table_schema = 'public' ORDER BY table_name, column_name"
    ).fetchall()
    indexes = conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1").fetchall()
    return columns + indexes


class MigrationTests(unittest.TestCase):
    """One migration list per component, both dialects."""

    def _sqlite(self, name: str, previous: bool = False) -> str:
        """
        A SQLite database with every component's schema; with C{previous},
        as the release before the PostgreSQL-only steps left it (the steps
        up to each list's last one with SQLite text).
        """
        path = os.path.abspath(self.mktemp())
        database = Database(reactor, path)
        self.addCleanup(database.stop)
        for component, migrations in COMPONENTS.items():
            if not previous:
                database.migrate(component, migrations)
            else:
                known = max(n + 1 for n, m in enumerate(migrations) if m.sqlite is not None)
                database.open()
                database.run_sync(apply_migrations, component, sqlite_steps(migrations)[:known])
        return path

    def test_sqlite_upgrade_from_previous_schema(self) -> None:
        """
        A SQLite database made by the previous release (the steps it knew)
        upgrades to the schema a fresh database gets, keeping its rows; the
        new PostgreSQL-only step changes nothing in SQLite.
        """
        previous = self._sqlite("previous", previous=True)
        before = _sqlite_schema(previous)
        conn = sqlite3.connect(previous)
        conn.execute(
            "INSERT INTO queue_messages (id, mail_from, priority, status, created_at, updated_at) "
            "VALUES ('M1', 'a@b.c', 2, 'queued', 1.0, 1.0)"
        )
        conn.commit()
        conn.close()
        database = Database(reactor, previous)
        self.addCleanup(database.stop)
        for component, migrations in COMPONENTS.items():
            self.assertEqual(database.migrate(component, migrations), len(migrations))
        self.assertEqual(_sqlite_schema(previous), before)
        self.assertEqual(_sqlite_schema(previous), _sqlite_schema(self._sqlite("fresh")))
        conn = sqlite3.connect(previous)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT id FROM queue_messages").fetchall(), [("M1",)])
        versions = dict(conn.execute("SELECT component, version FROM schema_migrations").fetchall())
        self.assertEqual(versions, {component: len(migrations) for component, migrations in COMPONENTS.items()})

    @inlineCallbacks
    def test_postgresql_has_the_sqlite_tables_and_columns(self) -> Any:
        """From the same lists, PostgreSQL gets every SQLite table and column, plus its own shared-store ones."""
        database = make_postgres_database(self)
        for component, migrations in COMPONENTS.items():
            self.assertEqual(database.migrate(component, migrations), len(migrations))
        found = yield database.run(_postgresql_columns)
        self.assertEqual(found - {"schema_migrations", "schema_migrations.component", "schema_migrations.version"},
                         (_sqlite_columns(self._sqlite("fresh")) - {"schema_migrations", "schema_migrations.component",
                                                                     "schema_migrations.version"}) | POSTGRESQL_ONLY)

    @inlineCallbacks
    def test_postgresql_upgrade_matches_fresh(self) -> Any:
        """A PostgreSQL database migrated step by step, rows in it, ends with a fresh one's schema and keeps them."""
        old = make_postgres_database(self)
        for component, migrations in COMPONENTS.items():
            old.migrate(component, migrations[:1])
        yield old.run(
            lambda conn: conn.execute(
                "INSERT INTO queue_messages (id, mail_from, priority, status, created_at, updated_at) "
                "VALUES ('M1', 'a@b.c', 2, 'queued', 1.0, 1.0)"
            )
        )
        for component, migrations in COMPONENTS.items():
            old.migrate(component, migrations)
            # Again: nothing left to do.
            self.assertEqual(old.migrate(component, migrations), len(migrations))
        fresh = make_postgres_database(self)
        for component, migrations in COMPONENTS.items():
            fresh.migrate(component, migrations)
        self.assertEqual((yield old.run(_postgresql_schema)), (yield fresh.run(_postgresql_schema)))
        row = yield old.run(lambda conn: conn.execute("SELECT id, sandbox, claimed_by FROM queue_messages").fetchall())
        self.assertEqual(row, [("M1", 0, None)])

    def test_postgresql_refuses_a_newer_schema(self) -> None:
        """A database migrated by a newer release (more steps) is refused at start-up, not downgraded."""
        database = make_postgres_database(self)
        database.migrate("events", events.MIGRATIONS)
        database.run_sync(lambda conn: conn.execute("UPDATE schema_migrations SET version = 99"))
        self.assertRaises(RuntimeError, database.migrate, "events", events.MIGRATIONS)


class ConnectionLossTests(unittest.TestCase):
    """PostgreSQL stopped and started under a running store."""

    def setUp(self) -> None:
        self.logged: list[dict[str, Any]] = []
        self.patch(postgres, "log", Logger(observer=self.logged.append))
        self.server = server()
        self.database = PostgresDatabase(reactor, fresh_database(self), timeout=2.0, retry=0.2)
        self.database.start()
        self.addCleanup(self.database.stop)
        # Whatever happens in a test, the next one finds the server up.
        self.addCleanup(self._ensure_started)
        self.store = PostgresQueueStore(self.database)
        self.store.migrate()

    def _ensure_started(self) -> None:
        if not self.server.running:
            self.server.start()

    def _errors(self) -> list[dict[str, Any]]:
        return [e for e in self.logged if e["log_level"].name == "error"]

    @inlineCallbacks
    def test_outage_fails_calls_then_recovers(self) -> Any:
        """
        With the server stopped, calls fail with StoreUnavailable (logged
        once for the outage, nothing committed); once it is back, the same
        store object works again, and the recovery is logged.
        """
        yield self.store.insert_with_content([(_message("M1"), b"one")])
        self.server.stop()
        for name in ("M2", "M3"):
            yield self.assertFailure(self.store.insert_with_content([(_message(name), b"x")]), StoreUnavailable)
        yield self.assertFailure(self.store.load_message("M1"), StoreUnavailable)
        yield wait_until(lambda: self._errors())
        self.assertEqual(len(self._errors()), 1)
        self.assertTrue(self.database.lost)
        self.server.start()
        yield wait_until(lambda: not self.database.lost)
        loaded = yield self.store.load_message("M1")
        self.assertEqual(loaded["id"], "M1")
        self.assertIsNone((yield self.store.load_message("M2")))
        yield self.store.insert_with_content([(_message("M2"), b"two")])
        self.assertEqual((yield self.store.load_content("M2")), b"two")
        self.assertEqual(len(self._errors()), 1)
        self.assertEqual(len([e for e in self.logged if e["log_level"].name == "warn"]), 1)

    @inlineCallbacks
    def test_statement_errors_are_not_outages(self) -> Any:
        """A failing statement fails its call with its own error; the store is not marked unavailable."""
        yield self.store.insert([_message("M1")])
        failure = yield self.assertFailure(self.store.insert([_message("M1")]), Exception)
        self.assertNotIsInstance(failure, StoreUnavailable)
        self.assertFalse(self.database.lost)
        self.assertEqual(self._errors(), [])

    def test_unreachable_at_start(self) -> None:
        """Opening a database whose server is down fails at once with a clear error naming no password."""
        database = PostgresDatabase(reactor, f"host=127.0.0.1 port={self.server.port} user=x password=s3cret dbname=y",
                                    timeout=1.0)
        self.server.stop()
        error = self.assertRaises(StoreUnavailable, database.open)
        self.assertIn("cannot connect to PostgreSQL", str(error))
        self.assertNotIn("s3cret", str(error))


class RedactionTests(unittest.TestCase):
    """The DSN as it may appear in a log line."""

    def test_passwords_are_hidden(self) -> None:
        """Passwords in URL and key=value DSNs are replaced; the rest stays for the operator."""
        self.assertEqual(redact_dsn("postgresql://relay:pa:ss@db.example:5432/smtp"),
                         "postgresql://relay:***@db.example:5432/smtp")
        self.assertEqual(redact_dsn("host=db user=relay password=secret dbname=smtp"),
                         "host=db user=relay password=*** dbname=smtp")
        self.assertEqual(redact_dsn("host=db password = 'a b\\' c' dbname=smtp"), "host=db password = *** dbname=smtp")
        self.assertEqual(redact_dsn("postgresql://relay@db/smtp"), "postgresql://relay@db/smtp")


class DurabilityTests(unittest.TestCase):
    """What the 250 relies on."""

    @inlineCallbacks
    def test_commits_are_synchronous_whatever_the_role_says(self) -> Any:
        """A role defaulting to synchronous_commit = off still gets synchronous commits, pooled and at start-up."""
        dsn = fresh_database(self)
        server().admin("ALTER ROLE smtpplus IN DATABASE " + dsn.rsplit("=", 1)[1] + " SET synchronous_commit = off")
        database = PostgresDatabase(reactor, dsn)
        database.start()
        self.addCleanup(database.stop)
        show = "SHOW synchronous_commit"
        self.assertEqual((yield database.run(lambda conn: conn.execute(show).fetchone()[0])), "on")
        self.assertEqual(database.run_sync(lambda conn: conn.execute(show).fetchone()[0]), "on")
