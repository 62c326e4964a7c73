"""
The policy dry-run (contract section 8): what an SMTP session of a user
would answer for a sender, recipients and header section, and why.

It runs the session's own code, not a copy: the user's L{Submitter} (from
the same avatar factory as the sessions, on an intake that records and logs
nothing) checks the envelope sender and each recipient, and
L{read_header_section} with L{Submitter.header_from_refusal} check the
header section as the end of DATA does.  Nothing is spooled, queued,
counted or notified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from zope.interface import implementer

from smtpplus.delivery.headers import find_header_end
from smtpplus.delivery.submitter import Submitter, read_header_section
from smtpplus.interfaces import IPolicyCheck
from smtpplus.model import User
from smtpplus.smtp.interfaces import SessionInfo, SMTPReply, envelope_address

# Where the checks are asked from: no client, no port; sessions that could
# authenticate were in TLS.
_SESSION = SessionInfo(peer_ip="dry-run", local_port=0, helo="dry-run", tls=True)

ACCEPTED_REPLY = "250 2.0.0 Ok: would be queued"


def header_section(header_from: str | None, headers: Mapping[str, list[str]]) -> bytes:
    """
    The header section a message with these fields would have, C{From:}
    first, cut where a session would see it end (a name may hold a line
    break).
    """
    lines = [] if header_from is None else [f"From: {header_from}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, values in headers.items() for value in values)
    section = "".join(lines).encode("utf-8", "surrogateescape") + b"\r\n"
    end = find_header_end(section)
    return section if end is None else section[:end]


def _answer(accepted: bool, reply: str, reasons: list[str], priority: int | None) -> dict[str, Any]:
    return {"accepted": accepted, "reply": reply, "reasons": reasons, "effective_priority": priority}


@implementer(IPolicyCheck)
class PolicyCheck:
    """
    The dry-run over the sessions' avatars.

    @param avatar: the user's submitter, as a session would get it after
        AUTH, on an intake that records and logs nothing.
    @param max_recipients: C{[smtp] max_recipients}.
    """

    def __init__(self, avatar: Callable[[User], Submitter], max_recipients: int) -> None:
        self._avatar = avatar
        self._max_recipients = max_recipients

    def check(
        self, user: User, mail_from: str, header_from: str | None, recipients: list[str], headers: Mapping[str, list[str]]
    ) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._check(user, mail_from, header_from, recipients, headers))

    async def _check(
        self, user: User, mail_from: str, header_from: str | None, recipients: list[str], headers: Mapping[str, list[str]]
    ) -> dict[str, Any]:
        if not user.enabled:
            # A disabled user's AUTH fails: the session never reaches MAIL.
            return _answer(False, "535 5.7.8 Authentication credentials invalid", [f"user {user.username} is disabled"], None)
        submitter = self._avatar(user)
        try:
            sender = envelope_address(mail_from, "sender") if mail_from else ""
            await maybeDeferred(submitter.validateFrom, _SESSION, sender, None)
        except SMTPReply as e:
            return _answer(False, str(e), [f"MAIL FROM refused: {e.text}"], None)
        reasons = [f"MAIL FROM <{sender}>: authorized for user {user.username}"]
        answers: list[dict[str, Any]] = []
        for index, recipient in enumerate(recipients):
            try:
                if index >= self._max_recipients:
                    raise SMTPReply(452, "4.5.3", "Too many recipients")
                address = envelope_address(recipient, "recipient")
                await maybeDeferred(submitter.validateTo, _SESSION, sender, address)
            except SMTPReply as e:
                answers.append({"address": recipient, "accepted": False, "reply": str(e)})
                reasons.append(f"RCPT TO <{recipient}> refused: {e.text}")
            else:
                answers.append({"address": recipient, "accepted": True, "reply": "250 2.1.5 Recipient ok"})
                reasons.append(f"RCPT TO <{address}>: accepted")
        answer = await self._data(submitter, sender, header_from, headers, answers, reasons)
        if len(recipients) > 1:
            answer["recipients"] = answers
        return answer

    async def _data(
        self,
        submitter: Submitter,
        sender: str,
        header_from: str | None,
        headers: Mapping[str, list[str]],
        answers: list[dict[str, Any]],
        reasons: list[str],
    ) -> dict[str, Any]:
        """The end of DATA, reached when a recipient was accepted."""
        if not any(a["accepted"] for a in answers):
            # With one recipient the session's answer is its RCPT reply;
            # with several, each has its own and DATA gets this.
            reply = answers[0]["reply"] if len(answers) == 1 else "554 5.5.1 No valid recipients"
            return _answer(False, reply, reasons, None)
        section = read_header_section(header_section(header_from, headers), sender, None, submitter.priority)
        refusal = section.refusal or submitter.header_from_refusal(section)
        if refusal is not None:
            reasons.append(f"end of DATA refused: {refusal.text}")
            return _answer(False, str(refusal), reasons, None)
        if section.has("from"):
            reasons.append(f"From: {', '.join(section.from_addresses)}: authorized")
        else:
            reasons.append(f"no From: header: From: <{sender}> would be added")
        reasons.append(
            f"effective priority {section.priority}: the higher of the user's {submitter.priority}"
            f" and the message's {section.requested_priority}"
        )
        priority = section.priority
        if priority == 1 and submitter.priority_budget > 0:
            # The session's budget question, without the event a session's
            # message past the budget records.
            priority = await submitter.intake.effective_priority(
                submitter.username, submitter.priority_budget, notify=False
            )
            if priority != 1:
                reasons.append(f"priority budget of {submitter.priority_budget} an hour used up: priority {priority}")
        return _answer(True, ACCEPTED_REPLY, reasons, priority)
