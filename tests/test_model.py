"""Tests for L{smtpplus.model}: the shared vocabulary, the user record, and who may import what."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from twisted.trial.unittest import TestCase

import smtpplus
from smtpplus.auth.users import CHECKS
from smtpplus.model import (
    USER_WRITABLE,
    Aggregation,
    EventType,
    MessageStatus,
    RecipientStatus,
    User,
    iso_utc,
)

PACKAGE = Path(smtpplus.__file__).parent


def smtpplus_imports(relative: str) -> set[str]:
    """The smtpplus modules that the module file C{relative} (to the package) imports, at any level."""
    tree = ast.parse((PACKAGE / relative).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return {name for name in names if name.split(".")[0] == "smtpplus"}


class VocabularyTests(TestCase):
    def test_contract_values(self) -> None:
        """The enumerations hold exactly the contract's strings, in the contract's order."""
        self.assertEqual(
            [s.value for s in MessageStatus],
            ["queued", "scheduled", "sending", "deferred", "sent", "bounced", "partial", "deleted", "sandboxed"],
        )
        self.assertEqual(
            [s.value for s in RecipientStatus], ["queued", "sending", "deferred", "sent", "bounced", "deleted", "sandboxed"]
        )
        self.assertEqual(
            [t.value for t in EventType],
            ["sender_domain", "send_problem", "bounce", "delivery_delay", "account_block", "priority_budget"],
        )
        self.assertEqual(
            [a.value for a in Aggregation],
            ["day", "week", "month", "year", "subject", "dynamic_subject", "sender_email", "sender_name",
             "sender_email_subject", "user"],
        )
        self.assertEqual(json.dumps([EventType.BOUNCE, Aggregation.DAY]), '["bounce", "day"]')

    def test_iso_utc(self) -> None:
        """Timestamps are ISO 8601 UTC with a Z, to the second."""
        self.assertEqual(iso_utc(0), "1970-01-01T00:00:00Z")
        self.assertEqual(iso_utc(1714564800.9), "2024-05-01T12:00:00Z")


class UserTests(TestCase):
    def test_defaults_and_json(self) -> None:
        """A user has the contract's defaults and shows as the contract's user object, keys in contract order."""
        user = User("alice", authorized_domains=["example.com"], created_at="2024-05-01T12:00:00Z")
        self.assertEqual(
            json.dumps(user.to_json()),
            '{"username": "alice", "enabled": true, "priority": 3, "notes": "", '
            '"authorized_domains": ["example.com"], "authorized_senders": [], "aggregation": "day", '
            '"sandbox": false, "priority_budget": 0, '
            '"created_at": "2024-05-01T12:00:00Z", "updated_at": ""}',
        )
        self.assertIs(type(user.to_json()["aggregation"]), str)

    def test_frozen_and_converted(self) -> None:
        """A user cannot change in place; lists become tuples and the policy an Aggregation."""
        user = User("alice", authorized_senders=["a@example.com"], aggregation="week")
        self.assertEqual(user.authorized_senders, ("a@example.com",))
        self.assertIs(user.aggregation, Aggregation.WEEK)
        with self.assertRaises(AttributeError):
            user.enabled = False  # type: ignore[misc]
        self.assertRaises(ValueError, User, "alice", aggregation="hourly")

    def test_every_writable_field_is_checked(self) -> None:
        """The admin API's validation has one check per writable field of the model, no more, no fewer."""
        self.assertEqual(list(CHECKS), list(USER_WRITABLE))


class ImportRuleTests(TestCase):
    def test_leaves(self) -> None:
        """model and address import nothing from smtpplus; interfaces imports only model (at run time)."""
        self.assertEqual(smtpplus_imports("model.py"), set())
        self.assertEqual(smtpplus_imports("address.py"), set())
        tree = ast.parse((PACKAGE / "interfaces.py").read_text())
        top_level = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        self.assertEqual({m for m in top_level if m.startswith("smtpplus")}, {"smtpplus.model"})

    def test_auth_and_rules_imports(self) -> None:
        """auth never imports the SMTP protocol; the sender rules never import auth."""
        for path in sorted((PACKAGE / "auth").glob("*.py")):
            imported = smtpplus_imports(f"auth/{path.name}")
            self.assertFalse({m for m in imported if m.startswith("smtpplus.smtp.protocol")}, path.name)
        self.assertFalse({m for m in smtpplus_imports("delivery/rules.py") if m.startswith("smtpplus.auth")})
