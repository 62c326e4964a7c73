"""Validation and normalization of user fields."""

from __future__ import annotations

import math

from twisted.trial.unittest import TestCase

from smtpplus.auth.users import (
    PASSWORD_ALPHABET,
    ValidationError,
    generate_password,
    generate_username,
    new_user,
    validate_fields,
)
from smtpplus.model import Aggregation, User


class GeneratedTests(TestCase):
    def test_username_shape(self) -> None:
        """Generated usernames are smtp- and 8 lower-case letters or digits, and differ."""
        names = {generate_username() for _ in range(50)}
        self.assertEqual(len(names), 50)
        for name in names:
            self.assertRegex(name, r"^smtp-[a-z0-9]{8}$")

    def test_password_entropy_and_alphabet(self) -> None:
        """Passwords hold at least 128 random bits of unambiguous symbols and differ every time."""
        password = generate_password()
        symbols = password.replace("-", "")
        self.assertTrue(set(symbols) <= set(PASSWORD_ALPHABET))
        self.assertFalse(set("0o1li") & set(symbols))
        self.assertGreaterEqual(len(symbols) * math.log2(len(PASSWORD_ALPHABET)), 128)
        self.assertNotEqual(generate_password(), password)
        self.assertRegex(password, r"^[a-z0-9]{4}(-[a-z0-9]{4})+$")


class FieldTests(TestCase):
    def assertInvalid(self, data: object, field: str | None) -> ValidationError:
        with self.assertRaises(ValidationError) as caught:
            validate_fields(data)
        self.assertEqual(caught.exception.field, field)
        if field:
            self.assertIn(field, str(caught.exception))
        return caught.exception

    def test_defaults(self) -> None:
        """A new user without fields gets the contract's defaults and a generated username."""
        user = new_user({})
        self.assertRegex(user.username, r"^smtp-[a-z0-9]{8}$")
        self.assertEqual(user, User(user.username))
        self.assertEqual((user.enabled, user.priority, user.aggregation), (True, 3, Aggregation.DAY))

    def test_new_user_takes_fields(self) -> None:
        """A new user takes the validated, normalized fields of the request body."""
        user = new_user({"username": "alice", "authorized_domains": "A.example; b.example", "aggregation": "week"})
        self.assertEqual(user, User("alice", authorized_domains=("a.example", "b.example"), aggregation="week"))
        with self.assertRaises(ValidationError):
            new_user({"username": "alice", "created_at": "now"})

    def test_username(self) -> None:
        """Usernames follow the contract's pattern; anything else names the field."""
        for good in ("a", "Alice.Smith@example.com", "x+y_z-1", "a" * 64):
            self.assertEqual(validate_fields({"username": good})["username"], good)
        for bad in ("", "-a", ".a", "a b", "a" * 65, "ä", 5, None, "a/b"):
            self.assertInvalid({"username": bad}, "username")

    def test_priority(self) -> None:
        """Priority is an integer 1-5; booleans, strings and floats are refused."""
        for good in (1, 3, 5):
            self.assertEqual(validate_fields({"priority": good})["priority"], good)
        for bad in (0, 6, -1, True, False, "3", 3.0, None):
            self.assertInvalid({"priority": bad}, "priority")

    def test_enabled_and_notes(self) -> None:
        """Enabled must be a JSON boolean and notes a string."""
        self.assertIs(validate_fields({"enabled": False})["enabled"], False)
        self.assertInvalid({"enabled": 1}, "enabled")
        self.assertInvalid({"enabled": "true"}, "enabled")
        self.assertEqual(validate_fields({"notes": "billing app"})["notes"], "billing app")
        self.assertInvalid({"notes": 5}, "notes")

    def test_aggregation(self) -> None:
        """Aggregation is one of the ten statistics policies."""
        self.assertEqual(
            validate_fields({"aggregation": "sender_email_subject"})["aggregation"], "sender_email_subject"
        )
        self.assertInvalid({"aggregation": "hour"}, "aggregation")
        self.assertInvalid({"aggregation": None}, "aggregation")

    def test_domains_list_and_string(self) -> None:
        """Domains come as a list or a ;-separated string, stripped, lower-cased, de-duplicated."""
        self.assertEqual(
            validate_fields({"authorized_domains": " Example.COM ; ;b.example.org.;example.com"})["authorized_domains"],
            ["example.com", "b.example.org"],
        )
        self.assertEqual(
            validate_fields({"authorized_domains": ["A.example", " "]})["authorized_domains"], ["a.example"]
        )
        self.assertEqual(validate_fields({"authorized_domains": ""})["authorized_domains"], [])

    def test_domain_idna(self) -> None:
        """
        An internationalized domain, written in Unicode or as its A-labels,
        is stored as its lower-case A-labels, in domains and in senders.
        """
        for written in ("XN--Bcher-kva.Example", "Bücher.Example", "bücher.example."):
            self.assertEqual(
                validate_fields({"authorized_domains": [written]})["authorized_domains"], ["xn--bcher-kva.example"]
            )
        self.assertEqual(
            validate_fields({"authorized_senders": ["Info@Bücher.example"]})["authorized_senders"],
            ["Info@xn--bcher-kva.example"],
        )
        self.assertInvalid({"authorized_senders": ["jörg@example.com"]}, "authorized_senders")

    def test_bad_domains(self) -> None:
        """Malformed domains are refused naming authorized_domains."""
        for bad in ("exa mple.com", "user@example.com", "-bad-.com", "a..b", "a" * 64 + ".com", "[1.2.3.4]"):
            self.assertInvalid({"authorized_domains": [bad]}, "authorized_domains")
        self.assertInvalid({"authorized_domains": [1]}, "authorized_domains")
        self.assertInvalid({"authorized_domains": {"a": 1}}, "authorized_domains")

    def test_senders(self) -> None:
        """Sender addresses are validated; their domain is normalized, the local part kept."""
        self.assertEqual(
            validate_fields({"authorized_senders": "Info@Example.COM; news@b.example"})["authorized_senders"],
            ["Info@example.com", "news@b.example"],
        )
        self.assertEqual(
            validate_fields({"authorized_senders": ['"a b"@X.example.']})["authorized_senders"], ['"a b"@x.example']
        )
        for bad in ("no-at-sign", "a@", "@example.com", "a b@example.com", "a@exa mple.com"):
            self.assertInvalid({"authorized_senders": [bad]}, "authorized_senders")

    def test_unknown_and_read_only(self) -> None:
        """Unknown fields and read-only fields are refused, naming the field."""
        error = self.assertInvalid({"colour": "blue"}, "colour")
        self.assertIn("unknown", str(error))
        for field in ("created_at", "updated_at", "password"):
            error = self.assertInvalid({field: "x"}, field)
            self.assertIn("read-only", str(error))

    def test_not_an_object(self) -> None:
        """A body that is not a JSON object is refused as a whole."""
        for bad in ([], "x", 5, None):
            self.assertInvalid(bad, None)
