"""Submission through the real SMTP server: sender rules, priority, spool durability."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from smtpplus.auth.users import normalize_address, normalize_domain
from smtpplus.delivery import queue
from smtpplus.delivery import spool as spool_module
from tests.delivery_helpers import PASSWORD, Stack, queue_id, simple_message

CONTRACT_MESSAGE_KEYS = {
    "id", "user", "mail_from", "header_from", "subject", "priority", "status",
    "recipients", "campaign_code", "created_at", "updated_at",
}


class SenderRulesTests(unittest.TestCase):
    @inlineCallbacks
    def test_unauthorized_envelope_sender(self) -> Any:
        """An envelope sender outside the user's lists gets 550 5.7.1 at MAIL FROM, one sender_domain event and one rejected count."""
        stack = Stack(self, start=False)
        code, text = yield stack.submit("intruder@evil.test", ["rcpt@dest.test"], simple_message())
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith("5.7.1"), text)
        self.assertEqual(len(stack.recorder.of("sender_domain")), 1)
        rejected = [args for name, args in stack.recorder.calls if name == "rejected"]
        self.assertEqual(rejected, [("alice", "intruder@evil.test", "", "")])

    @inlineCallbacks
    def test_authorized_senders_and_domains(self) -> Any:
        """A listed address and any address of a listed domain (any case) are accepted; a subdomain is not."""
        stack = Stack(self, start=False)
        code, _ = yield stack.submit("Someone@EXAMPLE.com", ["r@dest.test"], simple_message(sender="someone@example.com"))
        self.assertEqual(code, 250)
        code, _ = yield stack.submit("boss@other.org", ["r@dest.test"], simple_message(sender="boss@other.org"))
        self.assertEqual(code, 250)
        code, _ = yield stack.submit("x@sub.example.com", ["r@dest.test"], simple_message())
        self.assertEqual(code, 550)

    @inlineCallbacks
    def test_internationalized_domains(self) -> Any:
        """
        A sender domain written in Unicode (any case, envelope and header
        From:) matches the IDNA A-labels the user store keeps; an unlisted
        Unicode domain is still refused.
        """
        user = {
            "username": "alice",
            "priority": 3,
            "authorized_domains": [normalize_domain("Bücher.example")],
            "authorized_senders": [normalize_address("chef@café.example")],
        }
        self.assertEqual(user["authorized_domains"], ["xn--bcher-kva.example"])
        stack = Stack(self, start=False, user=user)
        header = "From: Info <info@BÜCHER.example>\r\nSubject: x\r\n\r\nbody\r\n".encode()
        code, text = yield stack.submit("info@Bücher.example", ["r@dest.test"], header)
        self.assertEqual(code, 250, text)
        header = b"From: info@xn--bcher-kva.example\r\nSubject: x\r\n\r\nbody\r\n"
        code, text = yield stack.submit("Chef@Café.example", ["r@dest.test"], header)
        self.assertEqual(code, 250, text)
        code, _ = yield stack.submit("chef@café.example", ["r@dest.test"], "From: x@büchers.example\r\n\r\nb\r\n".encode())
        self.assertEqual(code, 550)
        code, _ = yield stack.submit("x@büchers.example", ["r@dest.test"], header)
        self.assertEqual(code, 550)

    @inlineCallbacks
    def test_user_without_lists_may_not_send(self) -> Any:
        """A user with both lists empty is refused at MAIL FROM."""
        user = {"username": "alice", "priority": 3, "authorized_domains": [], "authorized_senders": []}
        stack = Stack(self, start=False, user=user)
        code, _ = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        self.assertEqual(code, 550)

    @inlineCallbacks
    def test_unauthorized_header_from(self) -> Any:
        """An unauthorized header From: gets 550 5.7.1 at the end of DATA and leaves nothing in the queue or spool."""
        stack = Stack(self, start=False)
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], simple_message(sender="ceo@bank.test"))
        self.assertEqual(code, 550)
        self.assertIn("5.7.1", text)
        self.assertEqual(len(stack.recorder.of("sender_domain")), 1)
        rejected = [args for name, args in stack.recorder.calls if name == "rejected"]
        self.assertEqual(rejected[0][2], "Me <ceo@bank.test>")
        self.assertEqual(rejected[0][3], "hello")
        yield self._assert_empty(stack)

    @inlineCallbacks
    def test_one_of_several_from_addresses_unauthorized(self) -> Any:
        """Every address of the From: field must be authorized."""
        stack = Stack(self, start=False)
        data = b"From: a@example.com, b@bank.test\r\nSubject: x\r\n\r\nbody\r\n"
        code, _ = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual(code, 550)

    @inlineCallbacks
    def test_several_from_headers_refused(self) -> Any:
        """A message with two From: headers is refused with 550 5.7.1."""
        stack = Stack(self, start=False)
        data = b"From: a@example.com\r\nFrom: b@example.com\r\nSubject: x\r\n\r\nbody\r\n"
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual((code, text[:5]), (550, "5.7.1"))
        yield self._assert_empty(stack)

    @inlineCallbacks
    def test_missing_from_is_completed(self) -> Any:
        """A message without From: is accepted and gets From: <envelope sender>, Date and Message-ID."""
        stack = Stack(self)
        code, _ = yield stack.submit("me@example.com", ["r@dest.test"], b"Subject: bare\r\n\r\nbody\r\n")
        self.assertEqual(code, 250)
        yield _wait(lambda: stack.smarthost.received())
        data = stack.smarthost.received()[0]["data"]
        self.assertIn(b"\r\nFrom: <me@example.com>\r\n", data)
        self.assertIn(b"\r\nDate: ", data)
        self.assertIn(b"\r\nMessage-ID: <", data)

    @inlineCallbacks
    def test_invalid_smtpapi_json(self) -> Any:
        """Invalid JSON in X-SMTPAPI is refused with 550 5.6.0 and the reason; nothing is queued."""
        stack = Stack(self, start=False)
        data = simple_message(extra="X-SMTPAPI: {not json\r\n")
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual(code, 550)
        self.assertTrue(text.startswith("5.6.0"), text)
        self.assertIn("JSON", text)
        yield self._assert_empty(stack)

    @inlineCallbacks
    def _assert_empty(self, stack: Stack) -> Any:
        # The discard runs on a thread: give it a moment, bounded.
        spool = stack.delivery.spool
        for _ in range(100):
            if not os.listdir(spool.tmp_dir):
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(os.listdir(spool.tmp_dir), [])
        self.assertEqual(os.listdir(spool.msg_dir), [])
        messages = yield stack.query.list_messages(None, None, 10)
        self.assertEqual(messages, [])


class PriorityTests(unittest.TestCase):
    @inlineCallbacks
    def _priority(self, user_priority: int, data: bytes, options: tuple[str, ...] = ()) -> Any:
        user = {"username": "alice", "priority": user_priority, "authorized_domains": ["example.com"]}
        stack = Stack(self, start=False, user=user)
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], data, options)
        self.assertEqual(code, 250, text)
        message = yield stack.message(queue_id(text))
        return message["priority"]

    @inlineCallbacks
    def test_sources_in_order(self) -> Any:
        """X-SMTPAPI Priority beats MT-PRIORITY, which beats X-Priority; none means 3."""
        api = simple_message(extra='X-SMTPAPI: {"Priority": 4}\r\nX-Priority: 1\r\n')
        self.assertEqual((yield self._priority(5, api, ("MT-PRIORITY=9",))), 4)
        xp = simple_message(extra="X-Priority: 2 (High)\r\n")
        self.assertEqual((yield self._priority(5, xp, ("MT-PRIORITY=-9",))), 5)
        self.assertEqual((yield self._priority(5, xp)), 2)
        self.assertEqual((yield self._priority(5, simple_message())), 3)

    @inlineCallbacks
    def test_mt_priority_mapping(self) -> Any:
        """MT-PRIORITY maps as clamp(3 - round(n/3), 1, 5): 9 -> 1, 0 -> 3, -9 -> 5, 4 -> 2."""
        for n, expected in ((9, 1), (0, 3), (-9, 5), (4, 2)):
            self.assertEqual((yield self._priority(5, simple_message(), (f"MT-PRIORITY={n}",))), expected)

    @inlineCallbacks
    def test_user_default_caps(self) -> Any:
        """Effective priority is the numerically lower of the user's default and the message's."""
        self.assertEqual((yield self._priority(2, simple_message(extra="X-Priority: 5\r\n"))), 2)
        self.assertEqual((yield self._priority(2, simple_message(extra="X-Priority: 1\r\n"))), 1)


class SpoolTests(unittest.TestCase):
    @inlineCallbacks
    def test_record_and_file_exist_at_250(self) -> Any:
        """When 250 is received the spool file and the queue record (with its recipients) both exist."""
        stack = Stack(self, start=False)
        data = simple_message(extra='X-SMTPAPI: {"CampaignCode": "spring", "CampaignName": "Spring"}\r\n')
        code, text = yield stack.submit("me@example.com", ["a@dest.test", "b@dest.test"], data)
        self.assertEqual(code, 250)
        message_id = queue_id(text)
        self.assertEqual(len(message_id), 16)
        path = stack.delivery.spool.path(message_id)
        self.assertTrue(os.path.exists(path))
        row = stack.database.run_sync(queue.load_message, message_id)
        self.assertEqual(row["status"], "queued")
        self.assertEqual([r["address"] for r in row["recipients"]], ["a@dest.test", "b@dest.test"])
        with open(path, "rb") as f:
            stored = f.read()
        self.assertTrue(stored.startswith(b"Received: from client.test"))
        self.assertNotIn(b"X-SMTPAPI", stored)
        self.assertIn(b"X-Priority: 3\r\n", stored)
        message = yield stack.message(message_id)
        self.assertEqual(set(message), CONTRACT_MESSAGE_KEYS)
        self.assertEqual(message["campaign_code"], "spring")
        self.assertEqual(message["header_from"], "Me <me@example.com>")
        self.assertEqual(message["subject"], "hello")
        self.assertEqual(message["recipients"][0], {"address": "a@dest.test", "status": "queued", "attempts": 0, "last_response": None})
        self.assertRegex(message["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        accepted = [args[0] for name, args in stack.recorder.calls if name == "accepted"]
        self.assertEqual([m["id"] for m in accepted], [message_id])

    @inlineCallbacks
    def test_group_commit(self) -> Any:
        """Messages finishing at the same moment share one batch (one directory fsync, one transaction)."""
        stack = Stack(self, start=False)
        committer = stack.delivery.committer
        ids = yield _gather([stack.submit_internal("a@example.com", ["r@dest.test"], b"Subject: x\r\n\r\nb\r\n") for _ in range(5)])
        self.assertEqual(len(set(ids)), 5)
        self.assertEqual(committer.batches, 2)

    @inlineCallbacks
    def test_connection_lost_during_data(self) -> Any:
        """A connection lost in the middle of DATA leaves no trace."""
        stack = Stack(self, start=False)

        def run() -> None:
            import base64

            with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as s:
                f = s.makefile("rb")
                f.readline()
                token = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
                s.sendall(f"EHLO x\r\nAUTH PLAIN {token}\r\nMAIL FROM:<me@example.com>\r\nRCPT TO:<r@dest.test>\r\nDATA\r\n".encode())
                for _ in range(20):
                    if f.readline().startswith(b"354"):
                        break
                s.sendall(b"Subject: cut\r\n\r\n" + b"x" * 100000)
                time.sleep(0.2)

        yield deferToThread(run)
        yield _wait(lambda: not os.listdir(stack.delivery.spool.tmp_dir))
        self.assertEqual(os.listdir(stack.delivery.spool.msg_dir), [])
        self.assertEqual((yield stack.query.list_messages(None, None, 10)), [])

    @inlineCallbacks
    def test_spool_unwritable_is_temporary(self) -> Any:
        """A spool file that cannot be created answers 451 4.3.0, never 5xx and never 250."""
        stack = Stack(self, start=False)
        stack.delivery.spool.tmp_dir = os.path.join(stack.state_dir, "missing")
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        self.assertEqual(code, 451)
        self.assertTrue(text.startswith("4.3.0"), text)

    @inlineCallbacks
    def test_disk_full_is_temporary(self) -> Any:
        """A full disk at fsync time answers 452 4.3.1 and leaves no file or record."""
        stack = Stack(self, start=False)

        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(spool_module.os, "fsync", full)
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], simple_message())
        self.assertEqual(code, 452)
        self.assertTrue(text.startswith("4.3.1"), text)
        self.assertEqual(os.listdir(stack.delivery.spool.msg_dir), [])
        self.assertEqual(os.listdir(stack.delivery.spool.tmp_dir), [])
        self.assertEqual((yield stack.query.list_messages(None, None, 10)), [])

    @inlineCallbacks
    def test_schedule_holds_message(self) -> Any:
        """A Schedule in the future keeps the message 'scheduled' and undelivered until its time."""
        stack = Stack(self)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1.5))
        data = simple_message(extra=f"X-SMTPAPI: {json.dumps({'Schedule': when})}\r\n")
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual(code, 250)
        message = yield stack.message(queue_id(text))
        self.assertEqual(message["status"], "scheduled")
        self.assertEqual(stack.smarthost.received(), [])
        yield stack.wait_status(queue_id(text), "sent", timeout=8)
        self.assertEqual(len(stack.smarthost.received()), 1)


def _wait(predicate: Any, timeout: float = 10.0) -> Any:
    from tests.delivery_helpers import wait_until

    return wait_until(predicate, timeout)


def _gather(ds: list[Any]) -> Any:
    from twisted.internet.defer import gatherResults

    return gatherResults(ds)
