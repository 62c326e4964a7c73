"""
The per-user avatar the SMTP protocol talks to after AUTH: it applies the
sender rules and streams each accepted message into the spool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpplus.auth.store import Standing
from smtpplus.delivery.budget import PriorityBudget
from smtpplus.delivery.headers import (
    MAX_HEADER_SECTION,
    MAX_HOPS,
    SMTPAPI,
    HeaderField,
    decode_text,
    find_header_end,
    format_date,
    message_priority,
    parse_fields,
    parse_smtpapi,
    rewrite,
)
from smtpplus.delivery.interfaces import RunInThread
from smtpplus.delivery.queue import NewMessage
from smtpplus.delivery.rules import RecordsRefusals, SenderRules, header_from_addresses, unauthorized
from smtpplus.delivery.spool import Spool, TempMessage, local_failure, new_queue_id
from smtpplus.interfaces import ISuppressionList
from smtpplus.model import Suppression, User, iso_utc
from smtpplus.smtp.interfaces import Envelope, IMessageWriter, ISubmitter, SessionInfo, SMTPReply
from smtpplus.storage.database import StorageUnavailable

log = Logger()

# The refusal line's reason, by the reply's enhanced status code.
# The same names as the metrics' refusal reasons (a reply may carry its own).
_REASONS = {"5.3.4": "size", "5.4.6": "loop", "5.6.0": "smtpapi", "5.7.1": "sender", "5.7.13": "account"}


def log_refusal(reply: SMTPReply, user: str, mail_from: str, peer: str, message_id: str | None = None) -> None:
    """The log line of a refused sender or message: the reason and the reply."""
    reason = reply.reason or _REASONS.get(reply.status, "storage" if reply.status.startswith("4.3.") else "other")
    log.info(
        "message refused id={id} user={user} mail_from=<{mail_from}> peer={peer} reason={reason} reply={reply}",
        id=message_id or "-",
        user=user,
        mail_from=mail_from,
        peer=peer,
        reason=reason,
        reply=f"{reply.code} {reply.status} {reply.text}",
    )


def suppressed_reply(suppression: Suppression) -> SMTPReply:
    """The refusal of a suppressed recipient: C{550 5.1.1} with the date it was suppressed."""
    day = iso_utc(suppression.created_at)[:10]
    return SMTPReply(550, "5.1.1", f"Recipient suppressed since {day}: {suppression.reason}", reason="suppressed")


def suppression_refusal(
    suppressions: ISuppressionList | None, user: str, recipient: str
) -> Deferred[SMTPReply | None]:
    """
    The suppression rule of C{RCPT TO} (contract section 8): fire with the
    refusal when C{user} has C{recipient} suppressed, else None.  The
    session and the policy dry-run both ask this.
    """
    if suppressions is None:
        return succeed(None)
    d = suppressions.find(user, recipient)
    return d.addCallbacks(lambda found: None if found is None else suppressed_reply(found), _store_down)


def _store_down(failure: Failure) -> NoReturn:
    # The database is away (logged once by the store): the recipient gets
    # the temporary local-error reply, without a traceback per command.
    failure.trap(StorageUnavailable)
    raise local_failure(failure.value)


class Intake:
    """
    What every submitter shares: the clock (queue ids, C{Date:},
    C{created_at}), a way to remove files off the reactor, the spool, the
    committer, the refusal recorder and the hostname; the suppression list
    and the priority budget, shared state asked by every session (None:
    no such rule, in tests).
    """

    def __init__(
        self,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        spool: Spool,
        commit: Callable[[TempMessage, NewMessage], Deferred[str]],
        refusals: RecordsRefusals,
        hostname: str,
        suppressions: ISuppressionList | None = None,
        budget: PriorityBudget | None = None,
    ) -> None:
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.spool = spool
        self.commit = commit
        self.refusals = refusals
        self.hostname = hostname
        self.suppressions = suppressions
        self.budget = budget

    def recipient_refusal(self, user: str, recipient: str) -> Deferred[SMTPReply | None]:
        """L{suppression_refusal} against this daemon's suppression list."""
        return suppression_refusal(self.suppressions, user, recipient)

    def effective_priority(self, user: str, budget: int, notify: bool = True) -> Deferred[int]:
        """
        A priority-1 message's priority once the user's budget is applied
        (1 without a budget); C{notify} false records no event (a dry-run).
        """
        if self.budget is None or budget <= 0:
            return succeed(1)
        return self.budget.effective_priority(user, budget, notify)

    def discard(self, temp: TempMessage) -> None:
        """Delete a refused or abandoned message off the reactor thread."""
        self.run_in_thread(temp.discard).addErrback(
            lambda f: log.failure("discarding message {id} failed", f, id=temp.id)
        )


@implementer(ISubmitter)
class Submitter:
    """
    The avatar of one authenticated user.

    @param standing: tells whether the account was disabled or deleted
        since the login; asked (in memory, no I/O) at every MAIL, RCPT,
        DATA and end of DATA.  None: the account cannot change (tests).
    """

    def __init__(self, user: User, intake: Intake, standing: Standing | None = None) -> None:
        self.username = user.username
        self.priority = user.priority
        self.sandbox = user.sandbox
        self.priority_budget = user.priority_budget
        self.rules = SenderRules.from_user(user)
        self.intake = intake
        self.standing = standing

    def check_account(self) -> None:
        """
        Refuse with C{550 5.7.13} (RFC 7372, "user account disabled") once
        the account has been disabled or deleted: a permanent refusal a
        client must not answer by asking for the password again.
        """
        if self.standing is None:
            return
        reason = self.standing.revoked()
        if reason is not None:
            raise SMTPReply(550, "5.7.13", f"User account {self.username} has been {reason}", reason="account")

    def validateFrom(self, session: SessionInfo, mail_from: str, mt_priority: int | None) -> None:
        try:
            self.check_account()
        except SMTPReply as e:
            log_refusal(e, self.username, mail_from, session.peer_ip)
            raise
        if not self.rules.authorizes(mail_from):
            sender = mail_from or "<>"
            self.intake.refusals.record(
                self.username, mail_from, "", "", f"envelope sender {sender} is not authorized for user {self.username}"
            )
            reply = SMTPReply(
                550, "5.7.1", f"Sender address {sender} is not authorized for user {self.username}", reason="sender"
            )
            log_refusal(reply, self.username, mail_from, session.peer_ip)
            raise reply

    def validateTo(self, session: SessionInfo, mail_from: str, recipient: str) -> Deferred[None]:
        # An authenticated user may relay to anyone not on its suppression
        # list; the protocol already refuses everything before AUTH.
        self.check_account()

        def checked(refusal: SMTPReply | None) -> None:
            if refusal is None:
                return
            self.intake.refusals.recipient(self.username, mail_from)
            log.info(
                "recipient refused user={user} mail_from=<{mail_from}> to=<{to}> peer={peer} reply={reply}",
                user=self.username,
                mail_from=mail_from,
                to=recipient,
                peer=session.peer_ip,
                reply=f"{refusal.code} {refusal.status} {refusal.text}",
            )
            raise refusal

        return self.intake.recipient_refusal(self.username, recipient).addCallback(checked)

    def openMessage(self, envelope: Envelope) -> IMessageWriter:
        self.check_account()
        try:
            return MessageWriter(self, envelope)
        except OSError as e:
            log.error("cannot create a spool file: {error}", error=e)
            raise local_failure(e) from None


@implementer(IMessageWriter)
class MessageWriter:
    """
    Receives one message: buffers the header section (at most
    L{MAX_HEADER_SECTION}), streams the body into the spool, and commits at
    the final dot.
    """

    def __init__(self, submitter: Submitter, envelope: Envelope) -> None:
        self._submitter = submitter
        self._intake = submitter.intake
        self._envelope = envelope
        self._id = new_queue_id(self._intake.clock.seconds())
        self._temp: TempMessage | None = self._intake.spool.create(self._id)
        # The header section received so far; None once it has been read
        # (or refused as too large).
        self._head: bytearray | None = bytearray()
        self._refusal: SMTPReply | None = None
        self._header_from = ""
        self._subject = ""
        self._api = SMTPAPI()
        self._priority = 3
        # Where the digit of the written X-Priority: field is, should the
        # priority budget change it at the final dot.
        self._priority_at: int | None = None
        self._from_addresses: list[str] = []
        self._from_error: SMTPReply | None = None

    def write(self, data: bytes) -> None:
        if self._temp is None:
            return
        head = self._head
        if head is None:
            if self._refusal is None:
                self._temp.write(data)
            return
        # The blank line may straddle the previous chunk and this one.
        start = max(len(head) - 3, 0)
        head += data
        end = find_header_end(head, start)
        if end is not None and end <= MAX_HEADER_SECTION:
            self._finish_head(end)
        elif len(head) > MAX_HEADER_SECTION:
            # Whatever follows is read and dropped: a From: in it could not
            # be checked, so the message is refused at the final dot.
            self._head = None
            self._refusal = SMTPReply(
                552, "5.3.4", f"Message header section too large (limit {MAX_HEADER_SECTION // 1024} KiB)", reason="size"
            )

    def _finish_head(self, end: int) -> None:
        assert self._head is not None
        head, rest = bytes(self._head[:end]), bytes(self._head[end:])
        self._head = None
        fields = parse_fields(head)
        by_name: dict[str, list[HeaderField]] = {}
        for field in fields:
            by_name.setdefault(field.name, []).append(field)

        def values(name: str) -> list[str]:
            return [f.value for f in by_name.get(name, [])]

        hops = len(by_name.get("received", ()))
        if hops > MAX_HOPS:
            self._refusal = SMTPReply(554, "5.4.6", f"Too many hops ({hops} Received: headers): mail loop?", reason="loop")
            return
        from_values = values("from")
        self._header_from = from_values[0] if from_values else ""
        self._subject = decode_text(values("subject")[0]) if "subject" in by_name else ""
        try:
            self._api = parse_smtpapi(values("x-smtpapi"))
        except SMTPReply as e:
            self._refusal = SMTPReply(e.code, e.status, e.text, reason="smtpapi")
            return
        try:
            self._from_addresses = header_from_addresses(from_values)
        except SMTPReply as e:
            self._from_error = SMTPReply(e.code, e.status, e.text, reason="sender")
        x_priority = values("x-priority")
        level = message_priority(self._api, self._envelope.mt_priority, x_priority[0] if x_priority else None)
        self._priority = min(self._submitter.priority, level)
        added = self._missing_fields(by_name)
        assert self._temp is not None
        head = rewrite(fields, self._envelope.received, self._priority, added)
        # rewrite() ends the section with "X-Priority: <digit>\r\n".
        self._priority_at = self._temp.size + len(head) - 3
        self._temp.write(head)
        self._temp.write(rest)

    def _missing_fields(self, by_name: dict[str, list[HeaderField]]) -> list[bytes]:
        # A submission server completes what RFC 5322 requires, as Postfix
        # does for its own clients.
        added = []
        mail_from = self._envelope.mail_from
        if "from" not in by_name and mail_from:
            added.append(b"From: <%s>\r\n" % mail_from.encode("utf-8"))
            self._header_from = f"<{mail_from}>"
            self._from_addresses = [mail_from]
        if "date" not in by_name:
            added.append(b"Date: " + format_date(self._intake.clock.seconds()) + b"\r\n")
        if "message-id" not in by_name:
            added.append(f"Message-ID: <{self._id}@{self._intake.hostname}>\r\n".encode())
        return added

    def eomReceived(self) -> Deferred[str]:
        temp = self._temp
        if temp is None:
            return fail(SMTPReply(451, "4.3.0", "Local error in processing, try again later", reason="storage"))
        if self._head is not None:
            self._finish_head(len(self._head))
        self._temp = None
        try:
            self._submitter.check_account()
        except SMTPReply as e:
            self._intake.discard(temp)
            return fail(self._refused(e))
        refusal = self._refusal or self._sender_refusal()
        if refusal is None and temp.error is not None:
            log.error("cannot write message {id}: {error}", id=self._id, error=temp.error)
            refusal = local_failure(temp.error)
        if refusal is not None:
            self._intake.discard(temp)
            return fail(self._refused(refusal))
        submitter = self._submitter
        if self._priority != 1 or submitter.priority_budget <= 0:
            return self._commit(temp)
        d = self._intake.effective_priority(submitter.username, submitter.priority_budget)
        d.addErrback(self._budget_unknown)
        return d.addCallback(self._apply_priority, temp)

    def _budget_unknown(self, failure: Failure) -> int:
        # A fairness rule, not a protection: when the store cannot tell,
        # the message keeps its priority rather than wait or be refused.
        log.failure("cannot check the priority budget of {user}", failure, user=self._submitter.username)
        return 1

    def _apply_priority(self, priority: int, temp: TempMessage) -> Deferred[str]:
        if priority != self._priority and self._priority_at is not None:
            temp.overwrite(self._priority_at, b"%d" % priority)
            if temp.error is not None:
                log.error("cannot write message {id}: {error}", id=self._id, error=temp.error)
                self._intake.discard(temp)
                return fail(self._refused(local_failure(temp.error)))
            self._priority = priority
        return self._commit(temp)

    def _commit(self, temp: TempMessage) -> Deferred[str]:
        envelope = self._envelope
        message = NewMessage(
            id=self._id,
            user=self._submitter.username,
            mail_from=envelope.mail_from,
            header_from=self._header_from,
            subject=self._subject,
            priority=self._priority,
            recipients=envelope.recipients,
            campaign_name=self._api.campaign_name,
            campaign_code=self._api.campaign_code,
            schedule_at=self._api.schedule,
            size=temp.size,
            internal=False,
            created_at=self._intake.clock.seconds(),
            sandbox=self._submitter.sandbox,
        )

        def accepted(queue_id: str) -> str:
            log.info(
                "message accepted id={id} user={user} mail_from=<{mail_from}> recipients={recipients} size={size}"
                " priority={priority} peer={peer}",
                id=queue_id,
                user=message.user,
                mail_from=message.mail_from,
                recipients=len(message.recipients),
                size=message.size,
                priority=message.priority,
                peer=envelope.session.peer_ip,
            )
            return queue_id

        def not_stored(failure: Failure) -> Failure:
            if failure.check(SMTPReply):
                self._refused(failure.value)
            return failure

        return self._intake.commit(temp, message).addCallbacks(accepted, not_stored)

    def _refused(self, reply: SMTPReply) -> SMTPReply:
        envelope = self._envelope
        log_refusal(reply, self._submitter.username, envelope.mail_from, envelope.session.peer_ip, self._id)
        return reply

    def _sender_refusal(self) -> SMTPReply | None:
        user = self._submitter.username
        error = self._from_error
        if error is None:
            bad = unauthorized(self._from_addresses, self._submitter.rules)
            if not bad:
                return None
            error = SMTPReply(
                550, "5.7.1", f"From: address {', '.join(bad)} is not authorized for user {user}", reason="sender"
            )
        self._intake.refusals.record(
            user, self._envelope.mail_from, self._header_from, self._subject, f"header From: refused: {error.text}"
        )
        return error

    def connectionLost(self) -> None:
        temp, self._temp = self._temp, None
        if temp is not None:
            self._intake.discard(temp)
