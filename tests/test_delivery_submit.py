"""
Submission through the real SMTP server, end to end: refusals on the wire,
unusual header sections relayed intact, spool durability.  The sender
rules, header checks and priority themselves are unit tests in
L{tests.test_delivery_submitter}.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from smtpplus.delivery import queue
from smtpplus.delivery import spool as spool_module
from tests.harness.messages import queue_id, simple_message
from tests.harness.polling import wait_until
from tests.harness.stack import PASSWORD, Stack, wall_clock

CONTRACT_MESSAGE_KEYS = {
    "id", "user", "mail_from", "header_from", "subject", "priority", "status",
    "recipients", "campaign_code", "created_at", "updated_at", "next_attempt_at", "size", "duplicates",
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
        self.assertEqual(stack.recorder.rejections(), [("alice", "intruder@evil.test", "", "")])

    @inlineCallbacks
    def test_unauthorized_header_from(self) -> Any:
        """An unauthorized header From: gets 550 5.7.1 at the end of DATA and leaves nothing in the queue or spool."""
        stack = Stack(self, start=False)
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], simple_message(sender="ceo@bank.test"))
        self.assertEqual(code, 550)
        self.assertIn("5.7.1", text)
        self.assertEqual(len(stack.recorder.of("sender_domain")), 1)
        self.assertEqual(stack.recorder.rejections(), [("alice", "me@example.com", "Me <ceo@bank.test>", "hello")])
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
    def test_large_header_section_relayed_intact(self) -> Any:
        """An ordinary message with a 600 KiB header section is accepted and relayed with every header and its body intact."""
        stack = Stack(self)
        pad = padding(600 * 1024)
        data = b"From: Me <me@example.com>\r\nTo: you@dest.test\r\n" + pad + b"Subject: big\r\n\r\nBody line.\r\n"
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual(code, 250, text)
        message = yield stack.message(queue_id(text))
        self.assertEqual((message["header_from"], message["subject"]), ("Me <me@example.com>", "big"))
        yield wait_until(lambda: stack.smarthost.received())
        relayed = stack.smarthost.received()[0].data
        self.assertIn(b"\r\nFrom: Me <me@example.com>\r\nTo: you@dest.test\r\n" + pad + b"Subject: big\r\n", relayed)
        self.assertTrue(relayed.endswith(b"\r\n\r\nBody line.\r\n"), relayed[-60:])

    @inlineCallbacks
    def test_headers_without_body(self) -> Any:
        """A message that is all header fields (no blank line, no body) is accepted and relayed."""
        stack = Stack(self)
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], b"From: me@example.com\r\nSubject: only\r\n")
        self.assertEqual(code, 250, text)
        yield wait_until(lambda: stack.smarthost.received())
        self.assertIn(b"Subject: only", stack.smarthost.received()[0].data)


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
        ids = yield gatherResults([stack.submit_internal("a@example.com", ["r@dest.test"], b"Subject: x\r\n\r\nb\r\n") for _ in range(5)])
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
        yield wait_until(lambda: not os.listdir(stack.delivery.spool.tmp_dir))
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
