"""
The policy dry-run on the submitter's own checks: its answers, and that it
records, logs and commits nothing where a session would record a refusal.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from smtpplus.delivery.check import PolicyCheck, header_section
from smtpplus.delivery.queue import NewMessage
from smtpplus.delivery.rules import Refusals
from smtpplus.delivery.spool import Spool, TempMessage
from smtpplus.delivery.submitter import Intake, Submitter
from smtpplus.delivery.threads import run_synchronously
from smtpplus.interfaces import IPolicyCheck
from smtpplus.model import User
from tests.harness.fakes import Recorder

USER = User(username="shop", priority=2, authorized_domains=("ok.test",))


class PolicyCheckTests(unittest.TestCase):
    def setUp(self) -> None:
        self.recorder = Recorder()
        self.committed: list[NewMessage] = []
        spool = Spool(os.path.abspath(self.mktemp()))
        self.intake = Intake(
            Clock(), run_synchronously, spool, self._commit, Refusals(self.recorder, self.recorder), "relay.test"
        )
        self.check = PolicyCheck(lambda user: Submitter(user, self.intake.dry_run()), max_recipients=2)
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def _commit(self, temp: TempMessage, message: NewMessage) -> Deferred[str]:
        self.committed.append(message)
        raise AssertionError("a dry-run must not commit")

    def _answer(self, mail_from: str, recipients: list[str], header_from: str | None = None, **headers: Any) -> Any:
        return self.successResultOf(self.check.check(USER, mail_from, header_from, recipients, headers))

    def test_provides_interface(self) -> None:
        """PolicyCheck provides IPolicyCheck."""
        self.assertTrue(verifyObject(IPolicyCheck, self.check))

    def test_refusals_leave_no_trace(self) -> None:
        """
        Refused senders and From: fields give the session's replies; no
        event, statistic, refusal log line or commit follows, where the
        session's own intake records them.
        """
        envelope = self._answer("x@other.test", ["r@dest.test"])
        self.assertEqual(envelope["reply"][:10], "550 5.7.1 ")
        self.assertEqual((envelope["accepted"], envelope["effective_priority"]), (False, None))
        header = self._answer("a@ok.test", ["r@dest.test"], "b@other.test")
        self.assertEqual(header["reply"], "550 5.7.1 From: address b@other.test is not authorized for user shop")
        self.assertEqual((self.recorder.events, self.recorder.calls, self.committed), ([], [], []))
        self.assertFalse([e for e in self.logged if "refused" in str(e.get("log_format", ""))])

    def test_priority_and_header_refusals(self) -> None:
        """The effective priority is the higher of the user's and the message's; a mail loop and X-SMTPAPI refuse."""
        self.assertEqual(self._answer("a@ok.test", ["r@dest.test"])["effective_priority"], 2)
        self.assertEqual(self._answer("a@ok.test", ["r@dest.test"], **{"X-Priority": ["1"]})["effective_priority"], 1)
        loop = self._answer("a@ok.test", ["r@dest.test"], Received=["from x"] * 51)
        self.assertEqual(loop["reply"][:10], "554 5.4.6 ")
        api = self._answer("a@ok.test", ["r@dest.test"], **{"X-SMTPAPI": ["[1]"]})
        self.assertEqual(api["reply"], "550 5.6.0 X-SMTPAPI: must be a JSON object")

    def test_recipients(self) -> None:
        """
        Past max_recipients a recipient gets 452 4.5.3; with none accepted
        the answer is the session's 554 5.5.1 at DATA, or the one RCPT reply.
        """
        answer = self._answer("a@ok.test", ["a@dest.test", "b@dest.test", "c@dest.test"])
        self.assertTrue(answer["accepted"])
        self.assertEqual([r["reply"][:9] for r in answer["recipients"]], ["250 2.1.5", "250 2.1.5", "452 4.5.3"])
        self.assertEqual(self._answer("a@ok.test", ["bad", "worse"])["reply"], "554 5.5.1 No valid recipients")
        one = self._answer("a@ok.test", ["bad"])
        self.assertEqual(one["reply"], "501 5.1.3 Bad recipient address syntax")
        self.assertNotIn("recipients", one)

    def test_disabled_user(self) -> None:
        """A disabled user's dry-run answers what its AUTH would: 535 5.7.8."""
        user = User(username="off", enabled=False, authorized_domains=("ok.test",))
        answer = self.successResultOf(self.check.check(user, "a@ok.test", None, ["r@dest.test"], {}))
        self.assertEqual(answer["reply"], "535 5.7.8 Authentication credentials invalid")

    def test_header_section_ends_where_a_session_sees_it_end(self) -> None:
        """A header name holding a blank line ends the section there, as the session's reader would."""
        section = header_section("a@ok.test", {"X-A\r\n\r\nFrom": ["b@other.test"], "Subject": ["s"]})
        self.assertEqual(section, b"From: a@ok.test\r\nX-A\r\n")
