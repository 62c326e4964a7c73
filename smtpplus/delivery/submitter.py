"""
The per-user avatar the SMTP protocol talks to after AUTH: it applies the
sender rules and streams each accepted message into the spool.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import NoReturn

import attrs
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
from smtpplus.delivery.rules import RecordsRefusals, Refusals, SenderRules, header_from_addresses, unauthorized
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


def log_recipient_refusal(reply: SMTPReply, user: str, mail_from: str, recipient: str, peer: str) -> None:
    """The log line of a refused recipient (a suppressed one)."""
    log.info(
        "recipient refused user={user} mail_from=<{mail_from}> to=<{to}> peer={peer} reply={reply}",
        user=user,
        mail_from=mail_from,
        to=recipient,
        peer=peer,
        reply=f"{reply.code} {reply.status} {reply.text}",
    )


@attrs.frozen
class HeaderSection:
    """
    What smtpplus reads from a message's header section (see
    L{read_header_section}): the fields, the values the queue keeps, the
    effective priority (and the message's own), and the header C{From:}
    addresses or why they cannot be read.  C{refusal}: the message is
    refused whatever its sender (a mail loop, a bad X-SMTPAPI).
    """

    fields: tuple[HeaderField, ...] = ()
    names: frozenset[str] = frozenset()
    refusal: SMTPReply | None = None
    header_from: str = ""
    subject: str = ""
    api: SMTPAPI = SMTPAPI()
    priority: int = 3
    requested_priority: int = 3
    from_addresses: tuple[str, ...] = ()
    from_error: SMTPReply | None = None
    message_id: str | None = None

    def has(self, name: str) -> bool:
        """Whether a field of this lower-cased name is present."""
        return name in self.names


def read_header_section(head: bytes, mail_from: str, mt_priority: int | None, user_priority: int) -> HeaderSection:
    """
    Read a message's header section as the end of DATA checks it, in the
    session and in the policy dry-run alike: hop count, X-SMTPAPI, the
    C{From:} addresses (the envelope sender's when there is no C{From:},
    as one is added then), subject, Message-ID and the effective priority
    (the higher of C{user_priority} and the message's own).
    """
    fields = parse_fields(head)
    by_name: dict[str, list[HeaderField]] = {}
    for field in fields:
        by_name.setdefault(field.name, []).append(field)

    def values(name: str) -> list[str]:
        return [f.value for f in by_name.get(name, [])]

    hops = len(by_name.get("received", ()))
    if hops > MAX_HOPS:
        return HeaderSection(
            refusal=SMTPReply(554, "5.4.6", f"Too many hops ({hops} Received: headers): mail loop?", reason="loop")
        )
    try:
        api = parse_smtpapi(values("x-smtpapi"))
    except SMTPReply as e:
        return HeaderSection(refusal=SMTPReply(e.code, e.status, e.text, reason="smtpapi"))
    from_values = values("from")
    header_from = from_values[0] if from_values else ""
    from_addresses: list[str] = []
    from_error = None
    try:
        from_addresses = header_from_addresses(from_values)
    except SMTPReply as e:
        from_error = SMTPReply(e.code, e.status, e.text, reason="sender")
    if not from_values and mail_from:
        header_from, from_addresses = f"<{mail_from}>", [mail_from]
    x_priority = values("x-priority")
    level = message_priority(api, mt_priority, x_priority[0] if x_priority else None)
    message_ids = values("message-id")
    return HeaderSection(
        fields=tuple(fields),
        names=frozenset(by_name),
        header_from=header_from,
        subject=decode_text(values("subject")[0]) if "subject" in by_name else "",
        api=api,
        priority=min(user_priority, level),
        requested_priority=level,
        from_addresses=tuple(from_addresses),
        from_error=from_error,
        message_id=message_ids[0] if message_ids and message_ids[0] else None,
    )


def _not_logged(*args: object) -> None:
    """The dry-run's refusals leave no log line: no message was refused."""


def _not_committed(temp: TempMessage, message: NewMessage) -> Deferred[str]:
    raise AssertionError("the policy dry-run never commits a message")


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
        self.log_refusal: Callable[..., None] = log_refusal
        self.log_recipient_refusal: Callable[..., None] = log_recipient_refusal

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

    def dry_run(self) -> Intake:
        """
        This intake for the policy dry-run: the same rules and stores, but
        a refusal is neither recorded (event, statistics) nor logged, and
        nothing can be committed.
        """
        dry = copy.copy(self)
        dry.refusals = Refusals(None, None)
        dry.log_refusal = dry.log_recipient_refusal = _not_logged
        dry.commit = _not_committed
        return dry

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
            self.intake.log_refusal(e, self.username, mail_from, session.peer_ip)
            raise
        if not self.rules.authorizes(mail_from):
            sender = mail_from or "<>"
            self.intake.refusals.record(
                self.username, mail_from, "", "", f"envelope sender {sender} is not authorized for user {self.username}"
            )
            reply = SMTPReply(
                550, "5.7.1", f"Sender address {sender} is not authorized for user {self.username}", reason="sender"
            )
            self.intake.log_refusal(reply, self.username, mail_from, session.peer_ip)
            raise reply

    def header_from_refusal(self, section: HeaderSection) -> SMTPReply | None:
        """
        The refusal of a message whose header C{From:} this user may not
        send as (several or unreadable C{From:} fields, or an address not
        authorized), else None; records nothing (the caller does).
        """
        if section.from_error is not None:
            return section.from_error
        bad = unauthorized(section.from_addresses, self.rules)
        if not bad:
            return None
        return SMTPReply(
            550, "5.7.1", f"From: address {', '.join(bad)} is not authorized for user {self.username}", reason="sender"
        )

    def validateTo(self, session: SessionInfo, mail_from: str, recipient: str) -> Deferred[None]:
        # An authenticated user may relay to anyone not on its suppression
        # list; the protocol already refuses everything before AUTH.
        self.check_account()

        def checked(refusal: SMTPReply | None) -> None:
            if refusal is None:
                return
            self.intake.refusals.recipient(self.username, mail_from)
            self.intake.log_recipient_refusal(refusal, self.username, mail_from, recipient, session.peer_ip)
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
        # What the header section says, once read and not refused.
        self._section = HeaderSection()
        # The effective priority; the priority budget may lower it at the final dot.
        self._priority = 3
        # Where the digit of the written X-Priority: field is, should the
        # priority budget change it at the final dot.
        self._priority_at: int | None = None

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
        envelope = self._envelope
        section = read_header_section(head, envelope.mail_from, envelope.mt_priority, self._submitter.priority)
        if section.refusal is not None:
            self._refusal = section.refusal
            return
        self._section = section
        assert self._temp is not None
        self._priority = section.priority
        head = rewrite(section.fields, envelope.received, section.priority, self._missing_fields(section))
        # rewrite() ends the section with "X-Priority: <digit>\r\n".
        self._priority_at = self._temp.size + len(head) - 3
        self._temp.write(head)
        self._temp.write(rest)

    def _missing_fields(self, section: HeaderSection) -> list[bytes]:
        # A submission server completes what RFC 5322 requires, as Postfix
        # does for its own clients.
        added = []
        mail_from = self._envelope.mail_from
        if not section.has("from") and mail_from:
            added.append(b"From: <%s>\r\n" % mail_from.encode("utf-8"))
        if not section.has("date"):
            added.append(b"Date: " + format_date(self._intake.clock.seconds()) + b"\r\n")
        if not section.has("message-id"):
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
        section = self._section
        message = NewMessage(
            id=self._id,
            user=self._submitter.username,
            mail_from=envelope.mail_from,
            header_from=section.header_from,
            subject=section.subject,
            priority=self._priority,
            recipients=envelope.recipients,
            campaign_name=section.api.campaign_name,
            campaign_code=section.api.campaign_code,
            schedule_at=section.api.schedule,
            size=temp.size,
            internal=False,
            created_at=self._intake.clock.seconds(),
            header_message_id=section.message_id,
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
        section = self._section
        error = self._submitter.header_from_refusal(section)
        if error is None:
            return None
        self._intake.refusals.record(
            self._submitter.username,
            self._envelope.mail_from,
            section.header_from,
            section.subject,
            f"header From: refused: {error.text}",
        )
        return error

    def connectionLost(self) -> None:
        temp, self._temp = self._temp, None
        if temp is not None:
            self._intake.discard(temp)
