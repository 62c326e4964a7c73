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

from smtpplus.address import normalize_address, normalize_domain
from smtpplus.delivery import queue
from smtpplus.delivery import spool as spool_module
from smtpplus.model import User
from tests.delivery_helpers import PASSWORD, Stack, queue_id, simple_message, wall_clock

CONTRACT_MESSAGE_KEYS = {
    "id", "user", "mail_from", "header_from", "subject", "priority", "status",
    "recipients", "campaign_code", "created_at", "updated_at", "next_attempt_at", "size",
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
        user = User(
            "alice",
            authorized_domains=[normalize_domain("Bücher.example")],
            authorized_senders=[normalize_address("chef@café.example")],
        )
        self.assertEqual(user.authorized_domains, ("xn--bcher-kva.example",))
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
        user = User("alice")
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
    def test_malformed_from_addresses_refused(self) -> Any:
        """
        A From: address with a doubled or empty local part or domain is
        refused with 550 5.7.1 and a sender_domain record, never read as
        some other address (C{evil@evil.test@example.com} is not
        C{@example.com}).
        """
        stack = Stack(self, start=False)
        bad = ["evil@evil.test@example.com", "a@b@example.com", "@example.com", "a@", "Me <a@b@example.com>", "x@example..com"]
        for value in bad:
            data = f"From: {value}\r\nSubject: x\r\n\r\nbody\r\n".encode()
            code, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
            self.assertEqual((code, text[:5]), (550, "5.7.1"), value)
        self.assertEqual(len(stack.recorder.of("sender_domain")), len(bad))
        rejected = [args[2] for name, args in stack.recorder.calls if name == "rejected"]
        self.assertEqual(rejected, bad)
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


def padding(size: int) -> bytes:
    """Header fields of about C{size} bytes, in ordinary 80-byte lines."""
    lines = [b"X-Pad-%05d: %s\r\n" % (i, b"p" * 66) for i in range(size // 80 + 1)]
    return b"".join(lines)


class HeaderSectionTests(unittest.TestCase):
    """The whole header section is checked, however large (contract section 9)."""

    @inlineCallbacks
    def _refused(self, data: bytes, code: int, status: str) -> Any:
        stack = Stack(self)
        got, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual((got, text[:5]), (code, status), text)
        yield SenderRulesTests._assert_empty(self, stack)  # type: ignore[arg-type]
        self.assertEqual(stack.smarthost.received(), [])
        return stack, text

    @inlineCallbacks
    def test_from_after_padding_with_legitimate_from(self) -> Any:
        """A second From: after 300 KiB of header fields is seen: several From: headers, 550 5.7.1."""
        data = b"From: me@example.com\r\n" + padding(300 * 1024) + b"From: ceo@bank.test\r\nSubject: x\r\n\r\nbody\r\n"
        stack, text = yield self._refused(data, 550, "5.7.1")
        self.assertIn("more than one From:", text)
        self.assertEqual(len(stack.recorder.of("sender_domain")), 1)

    @inlineCallbacks
    def test_from_after_padding_alone(self) -> Any:
        """The only From: placed after 300 KiB of header fields is checked and refused, not replaced by an added one."""
        data = b"Subject: x\r\n" + padding(300 * 1024) + b"From: ceo@bank.test\r\n\r\nbody\r\n"
        stack, text = yield self._refused(data, 550, "5.7.1")
        self.assertIn("ceo@bank.test", text)
        self.assertEqual(len(stack.recorder.of("sender_domain")), 1)

    @inlineCallbacks
    def test_invalid_smtpapi_after_padding(self) -> Any:
        """An X-SMTPAPI after 300 KiB of header fields is parsed: invalid JSON gets 550 5.6.0."""
        data = simple_message(extra=padding(300 * 1024).decode() + "X-SMTPAPI: {not json\r\n")
        yield self._refused(data, 550, "5.6.0")

    @inlineCallbacks
    def test_valid_smtpapi_after_padding(self) -> Any:
        """A valid X-SMTPAPI after 300 KiB of header fields is obeyed and removed before relaying."""
        stack = Stack(self)
        data = simple_message(extra=padding(300 * 1024).decode() + 'X-SMTPAPI: {"CampaignCode": "late", "Priority": 1}\r\n')
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual(code, 250, text)
        message = yield stack.message(queue_id(text))
        self.assertEqual((message["campaign_code"], message["priority"]), ("late", 1))
        yield _wait(lambda: stack.smarthost.received())
        relayed = stack.smarthost.received()[0]["data"]
        self.assertNotIn(b"X-SMTPAPI", relayed)
        self.assertIn(b"\r\nX-Priority: 1\r\n", relayed)

    @inlineCallbacks
    def test_header_section_over_limit(self) -> Any:
        """A 1.1 MiB header section gets 552 5.3.4 at the end of DATA; nothing is queued or left in the spool."""
        data = simple_message(extra=padding(1126 * 1024).decode())
        _, text = yield self._refused(data, 552, "5.3.4")
        self.assertIn("header section too large", text)

    @inlineCallbacks
    def test_large_header_section_relayed_intact(self) -> Any:
        """An ordinary message with a 600 KiB header section is accepted and relayed with every header and its body intact."""
        stack = Stack(self)
        pad = padding(600 * 1024)
        data = b"From: Me <me@example.com>\r\nTo: you@dest.test\r\n" + pad + b"Subject: big\r\n\r\nBody line.\r\n"
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual(code, 250, text)
        message = yield stack.message(queue_id(text))
        self.assertEqual((message["header_from"], message["subject"]), ("Me <me@example.com>", "big"))
        yield _wait(lambda: stack.smarthost.received())
        relayed = stack.smarthost.received()[0]["data"]
        self.assertIn(b"\r\nFrom: Me <me@example.com>\r\nTo: you@dest.test\r\n" + pad + b"Subject: big\r\n", relayed)
        self.assertTrue(relayed.endswith(b"\r\n\r\nBody line.\r\n"), relayed[-60:])

    @inlineCallbacks
    def test_headers_without_body(self) -> Any:
        """A message that is all header fields (no blank line, no body) is accepted and relayed."""
        stack = Stack(self)
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], b"From: me@example.com\r\nSubject: only\r\n")
        self.assertEqual(code, 250, text)
        yield _wait(lambda: stack.smarthost.received())
        self.assertIn(b"Subject: only", stack.smarthost.received()[0]["data"])

    @inlineCallbacks
    def test_header_split_across_writes(self) -> Any:
        """
        Fed to the message writer one byte at a time, a message is stored
        exactly as when written in one piece (the blank line and the
        fields are found across chunk boundaries).
        """
        from smtpplus.smtp.interfaces import Envelope, SessionInfo
        from tests.delivery_helpers import USER

        stack = Stack(self, start=False)
        submitter = stack.avatar_factory(USER)
        data = simple_message(
            extra='X-SMTPAPI: {"CampaignCode": "c"}\r\nX-Priority: 2\r\n'
            "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <split@example.com>\r\n"
        )
        envelope = Envelope(SessionInfo("127.0.0.1", 25, "client.test", False), "me@example.com", ("r@dest.test",), None, "7BIT", b"Received: x\r\n")
        stored = []
        for pieces in ([data], [data[i : i + 1] for i in range(len(data))]):
            writer = submitter.openMessage(envelope)
            for piece in pieces:
                writer.write(piece)
            message_id = yield writer.eomReceived()
            content, _ = stack.delivery.spool.read_small(message_id)
            stored.append(content)
        self.assertEqual(stored[0], stored[1])
        self.assertNotIn(b"X-SMTPAPI", stored[0])
        self.assertIn(b"X-Priority: 2\r\n", stored[0])


class MailLoopTests(unittest.TestCase):
    """More than 50 Received: fields: 554 5.4.6 (contract section 9)."""

    @staticmethod
    def _message(hops: int) -> bytes:
        received = "".join(f"Received: from hop{i}.test by hop{i + 1}.test; Mon, 1 Jan 2024 00:00:{i % 60:02d} +0000\r\n" for i in range(hops))
        return (received + "From: me@example.com\r\nSubject: loop\r\n\r\nbody\r\n").encode()

    @inlineCallbacks
    def test_fifty_hops_accepted(self) -> Any:
        """A message with 50 Received: fields is accepted (our own Received: is not counted) and relayed with 51."""
        stack = Stack(self)
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], self._message(50))
        self.assertEqual(code, 250, text)
        yield _wait(lambda: stack.smarthost.received())
        self.assertEqual(stack.smarthost.received()[0]["data"].count(b"Received: "), 51)

    @inlineCallbacks
    def test_fifty_one_hops_refused(self) -> Any:
        """A message with 51 Received: fields is refused with 554 5.4.6 at the end of DATA; nothing is queued."""
        stack = Stack(self, start=False)
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], self._message(51))
        self.assertEqual((code, text[:5]), (554, "5.4.6"), text)
        self.assertIn("hops", text)
        yield SenderRulesTests._assert_empty(self, stack)  # type: ignore[arg-type]


class PriorityTests(unittest.TestCase):
    @inlineCallbacks
    def _priority(self, user_priority: int, data: bytes, options: tuple[str, ...] = ()) -> Any:
        user = User("alice", priority=user_priority, authorized_domains=["example.com"])
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
                # Hang up only once the server has the message on disk in tmp/.
                for _ in range(1000):
                    if os.listdir(stack.delivery.spool.tmp_dir):
                        break
                    time.sleep(0.01)
                else:
                    raise AssertionError("the message never reached tmp/")

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
        stack = Stack(self, clock=wall_clock())
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stack.clock.seconds() + 3600))
        data = simple_message(extra=f"X-SMTPAPI: {json.dumps({'Schedule': when})}\r\n")
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual(code, 250)
        message = yield stack.message(queue_id(text))
        self.assertEqual(message["status"], "scheduled")
        stack.clock.advance(3599)
        self.assertEqual(stack.delivery.scheduler.started, 0)
        stack.clock.advance(1)
        self.assertEqual(stack.delivery.scheduler.started, 1)
        yield stack.wait_status(queue_id(text), "sent")
        self.assertEqual(len(stack.smarthost.received()), 1)


def _wait(predicate: Any, timeout: float = 10.0) -> Any:
    from tests.delivery_helpers import wait_until

    return wait_until(predicate, timeout)


def _gather(ds: list[Any]) -> Any:
    from twisted.internet.defer import gatherResults

    return gatherResults(ds)
