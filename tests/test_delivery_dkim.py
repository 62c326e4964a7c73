"""
DKIM keys and signing: the key store contract (SQLite and memory), key
generation and the TXT record, signatures dkimpy verifies, and the From:
domain a message is signed for.
"""

from __future__ import annotations

import email
import os
import re
from typing import Any

import attrs
import dkim
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from smtpplus.delivery.dkim import (
    _RSA_KEYS,
    DKIMKeys,
    IDKIMStore,
    MemoryDKIMStore,
    SQLiteDKIMStore,
    StoredKey,
    dns_txt,
    from_domain,
    generate_key,
    sign,
)
from smtpplus.delivery.threads import run_synchronously
from smtpplus.interfaces import DKIMKeyConflict, IDKIMKeys
from smtpplus.storage.database import Database
from tests.harness.postgres import make_postgres_database

MESSAGE = (
    b"Received: from client by relay\r\nFrom: A <a@example.org>\r\nTo: b@dest.test\r\nSubject: hi\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@example.org>\r\nX-Priority: 3\r\n\r\nBody.\r\n"
)


def _key(domain: str = "example.org", enabled: bool = True) -> StoredKey:
    return StoredKey(domain, "s1", "ed25519-sha256", "private", "public", enabled, 100.0)


class DKIMStoreContract:
    """What every IDKIMStore does; mixed into a TestCase with L{make_store}."""

    def make_store(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.store = self.make_store()

    def test_provides_interface(self) -> None:
        """The store provides IDKIMStore."""
        self.assertTrue(verifyObject(IDKIMStore, self.store))

    @inlineCallbacks
    def test_insert_list_load(self) -> Any:
        """Inserted keys list by domain, asynchronously and synchronously; a second key of a domain is refused."""
        self.assertTrue((yield self.store.insert(_key("b.test"))))
        self.assertTrue((yield self.store.insert(_key("a.test"))))
        self.assertFalse((yield self.store.insert(attrs.evolve(_key("a.test"), selector="other"))))
        listed = yield self.store.list()
        self.assertEqual(listed, [_key("a.test"), _key("b.test")])
        self.assertEqual(self.store.load_all(), listed)

    @inlineCallbacks
    def test_enable_and_delete(self) -> Any:
        """set_enabled answers the changed key (None when absent); delete is True once, then False."""
        yield self.store.insert(_key())
        self.assertEqual((yield self.store.set_enabled("example.org", False)), _key(enabled=False))
        self.assertIsNone((yield self.store.set_enabled("none.test", False)))
        self.assertTrue((yield self.store.delete("example.org")))
        self.assertFalse((yield self.store.delete("example.org")))
        self.assertEqual((yield self.store.list()), [])


class SQLiteDKIMStoreTests(DKIMStoreContract, unittest.TestCase):
    def make_store(self) -> SQLiteDKIMStore:
        database = Database(reactor, os.path.abspath(self.mktemp()))
        self.addCleanup(database.stop)
        store = SQLiteDKIMStore(database)
        store.migrate()
        return store


class MemoryDKIMStoreTests(DKIMStoreContract, unittest.TestCase):
    def make_store(self) -> MemoryDKIMStore:
        return MemoryDKIMStore()


class PostgresDKIMStoreTests(DKIMStoreContract, unittest.TestCase):
    """The contract against the PostgreSQL store on the tests' private server."""

    def make_store(self) -> Any:
        from smtpplus.delivery.postgres import PostgresDKIMStore

        store = PostgresDKIMStore(make_postgres_database(self))
        store.migrate()
        return store


class SigningTests(unittest.TestCase):
    def test_signatures_verify(self) -> None:
        """
        For RSA and Ed25519 keys, the signed message verifies against the
        TXT record, and no longer does once its body or a signed header
        changes; a header not signed (X-Priority) may change.
        """
        for algorithm, kind in (("rsa-sha256", b"k=rsa"), ("ed25519-sha256", b"k=ed25519")):
            key = generate_key("example.org", "s1", algorithm, 0.0)
            txt = dns_txt(algorithm, key.public_key).encode()
            self.assertIn(kind, txt)
            looked_up: list[bytes] = []

            def dnsfunc(name: bytes, timeout: int = 5, txt: bytes = txt, looked_up: list[bytes] = looked_up) -> bytes:
                looked_up.append(name)
                return txt

            signed = sign(MESSAGE, key)
            self.assertTrue(signed.endswith(MESSAGE))
            self.assertTrue(dkim.verify(signed, dnsfunc=dnsfunc), algorithm)
            self.assertEqual(looked_up[0], b"s1._domainkey.example.org.")
            self.assertTrue(dkim.verify(signed.replace(b"X-Priority: 3", b"X-Priority: 1"), dnsfunc=dnsfunc))
            self.assertFalse(dkim.verify(signed.replace(b"Body.", b"Body!"), dnsfunc=dnsfunc), algorithm)
            self.assertFalse(dkim.verify(signed.replace(b"Subject: hi", b"Subject: ho"), dnsfunc=dnsfunc), algorithm)

    def test_rsa_signed_by_openssl(self) -> None:
        """
        dkimpy, imported at the first signature, signs RSA through OpenSSL
        (L{_openssl_rsa_sign} caches each key it has loaded), not with its
        own big-integer arithmetic.
        """
        _RSA_KEYS.clear()
        key = generate_key("example.org", "s1", "rsa-sha256", 0.0)
        sign(MESSAGE, key)
        self.assertEqual(len(_RSA_KEYS), 1)

    def test_signed_headers(self) -> None:
        """The signature covers From, To, Subject, Date and Message-ID when present, and no absent field."""
        signed = sign(MESSAGE, generate_key("example.org", "s1", "ed25519-sha256", 0.0))
        field = email.message_from_bytes(signed)["DKIM-Signature"]
        tags = dict(t.strip().split("=", 1) for t in re.sub(r"\s+", "", field).split(";") if "=" in t)
        self.assertEqual(tags["c"], "relaxed/relaxed")
        self.assertEqual(tags["h"].split(":"), ["from", "to", "subject", "date", "message-id"])

    def test_from_domain(self) -> None:
        """The first From: address's domain, lower-case A-labels; None for no or an unreadable From:."""
        self.assertEqual(from_domain("A <a@Example.ORG>, b@other.test"), "example.org")
        self.assertEqual(from_domain("a@Bücher.example"), "xn--bcher-kva.example")
        self.assertIsNone(from_domain(""))
        self.assertIsNone(from_domain("not an address"))


class DKIMKeysTests(unittest.TestCase):
    def setUp(self) -> None:
        self.store = MemoryDKIMStore()
        self.keys = DKIMKeys(self.store, Clock(), run_synchronously)

    def test_provides_interface(self) -> None:
        """DKIMKeys provides IDKIMKeys."""
        self.assertTrue(verifyObject(IDKIMKeys, self.keys))

    def test_keys_shown_and_used(self) -> None:
        """
        A created key is shown without its private key and signs its
        domain's mail at once; disabled, it signs nothing; a second key of
        the domain is a conflict.
        """
        shown = self.successResultOf(self.keys.create("example.org", "smtpplus", "rsa-sha256"))
        self.assertEqual(shown["dns_name"], "smtpplus._domainkey.example.org")
        self.assertNotIn("private_key", shown)
        self.assertNotIn("PRIVATE", repr(shown))
        self.assertEqual(self.keys.signing_key("a@example.org").domain, "example.org")
        self.assertIsNone(self.keys.signing_key("a@other.test"))
        self.failureResultOf(self.keys.create("example.org", "s2", "rsa-sha256"), DKIMKeyConflict)
        self.assertFalse(self.successResultOf(self.keys.set_enabled("example.org", False))["enabled"])
        self.assertIsNone(self.keys.signing_key("a@example.org"))
        self.assertEqual([k["domain"] for k in self.successResultOf(self.keys.list())], ["example.org"])
        self.assertTrue(self.successResultOf(self.keys.delete("example.org")))
        self.assertIsNone(self.successResultOf(self.keys.get("example.org")))
