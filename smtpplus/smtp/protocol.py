"""
The ESMTP wire protocol: one L{SMTPSession} per connection, and the factory
that builds it.

Written on L{Protocol} rather than C{twisted.mail.smtp.ESMTP} because the
stock class executes pipelined commands while an earlier asynchronous check
is still pending, keeps plaintext buffered across STARTTLS, offers AUTH
before TLS, has no SIZE or enhanced status codes and fixes the final reply.
The session only speaks the protocol; who may send what is the business of
the L{ISubmitter} avatar that L{ILoginService} returns.

The session is built from parts, each in its own module:
L{smtpplus.smtp.framing} (command lines, pipelining, flow control, the
session state), L{smtpplus.smtp.sasl} (AUTH mechanisms),
L{smtpplus.smtp.data} (the DATA decoder) and L{smtpplus.smtp.registry}
(connection limits and the drain); this module holds the commands.
"""

from __future__ import annotations

import datetime
import email.utils
import re
from collections.abc import Callable
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtpplus.address import parse_mailbox
from smtpplus.smtp.data import DATA_FLUSH_SIZE, decode_data
from smtpplus.smtp.framing import (
    AUTH,
    AUTH_LINE_MAX,
    CLOSED,
    CLOSING,
    COMMAND,
    COMMAND_LINE_MAX,
    DATA,
    WAITING,
    PipelinedLineReceiver,
)
from smtpplus.smtp.interfaces import (
    ADDRESS_STATUS,
    Envelope,
    ILoginService,
    IMessageWriter,
    ISubmitter,
    LoginThrottled,
    LoginUnavailable,
    SessionInfo,
    SMTPReply,
    envelope_address,
)
from smtpplus.smtp.registry import SessionRegistry, SessionSettings
from smtpplus.smtp.sasl import EXTENSION as AUTH_EXTENSION
from smtpplus.smtp.sasl import MECHANISMS, SASLExchange

# Importers of this module use these names from here.
__all__ = [
    "AUTH_LINE_MAX",
    "COMMAND_LINE_MAX",
    "DATA_FLUSH_SIZE",
    "MAX_BAD_COMMANDS",
    "MAX_JUNK_COMMANDS",
    "SMTPServerFactory",
    "SMTPSession",
    "SessionRegistry",
    "SessionSettings",
    "parse_mailbox",
]

log = Logger()

MAX_BAD_COMMANDS = 20
# Replies that count towards MAX_BAD_COMMANDS: syntax and sequence errors,
# and refused or failed authentication (a cheap brake on password guessing).
_BAD_COMMAND_CODES = frozenset((500, 501, 502, 503, 504, 530, 535, 555))
# Commands that move no mail transaction forward; with refused commands they
# count towards MAX_JUNK_COMMANDS, so that a session cannot go on forever
# without sending mail.  As in Postfix (smtpd_junk_command_limit) the count
# starts again after each accepted message: a client that keeps one
# connection open and sends RSET between messages is not cut off.
MAX_JUNK_COMMANDS = 100
_JUNK_VERBS = frozenset(("NOOP", "RSET", "VRFY", "EXPN", "HELP"))
_TOO_MUCH_JUNK = "Too many commands without a mail transaction, closing connection"

_PATH_RE = re.compile(rb"^\s*(?:<(?P<bracketed>[^<>]*)>|(?P<bare>[^\s<>]+))(?:\s+(?P<params>.*))?$", re.S)
# Reply text must stay on its line: no control characters from callers.
_CONTROL_RE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


# --- Envelope addresses -----------------------------------------------------
# The syntax and the IDNA conversion live in the leaf smtpplus.address; their
# errors become replies in smtp.interfaces.envelope_address (the policy
# dry-run answers the same).


def _address_literal(ip: str) -> str:
    """RFC 5321 4.1.3 address literal for C{ip}."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


class SMTPServerFactory(ServerFactory):
    """
    Builds sessions for one kind of port (STARTTLS or implicit TLS); all
    factories share one L{SessionRegistry}.
    """

    noisy = False

    def __init__(
        self,
        registry: SessionRegistry,
        login_service: ILoginService,
        tls_options: Any,
        implicit_tls: bool = False,
    ) -> None:
        self.registry = registry
        self.login_service = login_service
        self.tls_options = tls_options
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> Protocol:
        refusal = self.registry.admit(getattr(addr, "host", str(addr)))
        if refusal is not None:
            return _Refuse(refusal)
        session = SMTPSession(self.registry, self.login_service, self.tls_options, self.implicit_tls)
        session.factory = self
        return session


class _Refuse(Protocol):
    """Says why the connection is not served, then hangs up."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        self.transport.write(self.reply.encode("ascii") + b"\r\n")
        self.transport.loseConnection()


class SMTPSession(PipelinedLineReceiver):
    """
    One ESMTP session: the commands, their replies and the session limits;
    see the module docstring.  Input, pipelining and flow control are
    L{PipelinedLineReceiver}'s.
    """

    def __init__(
        self,
        registry: SessionRegistry,
        login_service: ILoginService,
        tls_options: Any,
        implicit_tls: bool,
    ) -> None:
        super().__init__(registry)
        self.settings = registry.settings
        self.login_service = login_service
        self.tls_options = tls_options
        self.tls = implicit_tls
        # TimeoutMixin's timers run on the registry's clock.
        self.callLater = registry.clock.callLater
        # The connection, known from connectionMade on.
        self.peer_ip = ""
        self.peer_port = 0
        self.local_port = 0
        self.started = 0.0
        # Limits.
        self._bad_commands = 0
        self._junk_commands = 0
        self._command = ""
        # The greeting and the login.
        self._helo: str | None = None
        self._esmtp = False
        self._sasl: SASLExchange | None = None
        self.avatar: ISubmitter | None = None
        self._logout: Callable[[], None] | None = None
        self.username: str | None = None
        # The mail transaction.
        self._mail_from: str | None = None
        self._recipients: list[str] = []
        self._mt_priority: int | None = None
        self._body = "7BIT"
        # The message between DATA and its final dot.
        self._writer: IMessageWriter | None = None
        self._data_size = 0
        self._data_line_start = True
        # For the log line at the end.
        self.messages = 0
        self.outcome = "disconnected"

    # connection lifecycle

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", str(peer))
        self.peer_port = getattr(peer, "port", 0)
        self.local_port = getattr(self.transport.getHost(), "port", 0)
        self.started = self.registry.clock.seconds()
        self.registry.add(self, self.peer_ip)
        super().connectionMade()
        admission = self.registry.admit_to_node(self, self.peer_ip)
        if admission is None:
            self.reply(220, "", f"{self.settings.hostname} ESMTP smtpplus")
            return
        # Nothing the client sends is read before the node has answered.
        self.transport.pauseProducing()
        admission.addCallback(self._admitted)

    def _admitted(self, refusal: str | None) -> None:
        if self.registry.draining or self not in self.registry.sessions:
            return
        self.transport.resumeProducing()
        if refusal is not None:
            self.outcome = "refused"
            self.transport.write(refusal.encode("ascii") + b"\r\n")
            self.transport.loseConnection()
            return
        self.reply(220, "", f"{self.settings.hostname} ESMTP smtpplus")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        self._abandon_message()
        if self._logout is not None:
            self._logout()
            self._logout = None
        self.registry.remove(self, self.peer_ip)
        log.info(
            "smtp session peer={peer}:{peer_port} port={port} tls={tls} user={user} messages={messages} "
            "outcome={outcome} seconds={seconds} worker={worker}",
            peer=self.peer_ip,
            peer_port=self.peer_port,
            port=self.local_port,
            tls="yes" if self.tls else "no",
            user=self.username or "-",
            messages=self.messages,
            outcome=self.outcome,
            # Rounded here rather than by the format: a worker's events
            # reach the log flattened, format specifications lost.
            seconds=round(self.registry.clock.seconds() - self.started, 3),
            worker=self.registry.worker,
        )

    def timeoutConnection(self) -> None:
        if self.state is CLOSING:
            # The client has not taken our last replies within the idle time.
            self.transport.abortConnection()
            return
        if self.state is WAITING:
            # It is us who is slow (a command's check or the commit): the
            # client gets its full idle time again once answered.
            self.setTimeout(self.settings.idle_timeout)
            return
        self.outcome = "idle timeout"
        self.reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded")
        # A client that does not read would never let loseConnection finish.
        self._close(abort=self._write_blocked)

    def shutdown(self) -> None:
        """The daemon is stopping: hang up now unless a message is in progress."""
        if self.state in (DATA, WAITING, CLOSING, CLOSED):
            return
        self.outcome = "shutdown"
        self.reply(421, "4.3.2", "Service shutting down")
        self._close()

    def _hang_up(self, outcome: str, text: str) -> None:
        """Say C{421 4.7.0 text} and close: the client is misbehaving."""
        if self.state is CLOSING or self.state is CLOSED:
            return
        self.outcome = outcome
        self.reply(421, "4.7.0", text)
        self._close()

    # output

    def reply(self, code: int, status: str, text: str) -> None:
        """Send one reply line (or several, for a multi-line C{text})."""
        lines = _CONTROL_RE.sub(" ", text).split("\n")
        prefix = f"{status} " if status else ""
        last = len(lines) - 1
        out = [f"{code}{'-' if i < last else ' '}{prefix}{line}".encode() for i, line in enumerate(lines)]
        self.transport.write(b"\r\n".join(out) + b"\r\n")
        if code in _BAD_COMMAND_CODES:
            self._bad_commands += 1
            if self._bad_commands >= MAX_BAD_COMMANDS:
                self._hang_up("too many errors", "Too many errors, closing connection")
        if code != 421 and (code >= 400 or self._command in _JUNK_VERBS):
            self._junk_commands += 1
            if self._junk_commands > MAX_JUNK_COMMANDS:
                self._hang_up("too many junk commands", _TOO_MUCH_JUNK)

    def _reply_error(self, error: SMTPReply) -> None:
        self.reply(error.code, error.status, error.text)

    # input

    def _line_received(self, line: bytes) -> Deferred[Any] | None:
        if self.state is AUTH:
            return self._auth_response(line)
        verb, _, rest = line.strip().partition(b" ")
        command = verb.upper().decode("ascii", "replace")
        self._command = command
        if command in _JUNK_VERBS and self._junk_commands >= MAX_JUNK_COMMANDS:
            self._hang_up("too many junk commands", _TOO_MUCH_JUNK)
            return None
        if command not in ("AUTH",) and len(line) + 2 > COMMAND_LINE_MAX:
            self.reply(500, "5.5.2", "Line too long")
            return None
        handler = getattr(self, "smtp_" + command, None) if command.isalpha() else None
        if handler is None:
            if not command:
                self.reply(500, "5.5.2", "Error: bad syntax")
            else:
                self.reply(500, "5.5.2", "Command not recognized")
            return None
        return handler(rest.strip())

    def _line_too_long(self) -> None:
        self._sasl = None
        self.reply(500, "5.5.2", "Line too long")

    # session commands

    def _extensions(self) -> list[str]:
        ext = ["PIPELINING", f"SIZE {self.settings.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES", "MT-PRIORITY"]
        if not self.tls and self.tls_options is not None and ITLSTransport.providedBy(self.transport):
            ext.append("STARTTLS")
        if self.tls or not self.settings.auth_requires_tls:
            ext.append(AUTH_EXTENSION)
        return ext

    def _client_name(self, rest: bytes, verb: str) -> str | None:
        """The HELO/EHLO argument's first word, or None (after a 501) when unusable."""
        text = rest.decode("utf-8", "replace")
        name = text.split(" ")[0]
        # The name goes into the EHLO reply and the Received: header.
        if not name or _CONTROL_RE.search(text) or len(name) > 255:
            self.reply(501, "5.5.4", f"Syntax: {verb} hostname")
            return None
        return name

    def smtp_EHLO(self, rest: bytes) -> None:
        helo = self._client_name(rest, "EHLO")
        if helo is None:
            return
        self._helo = helo
        self._esmtp = True
        self._reset_transaction()
        lines = [f"{self.settings.hostname} Hello {self._helo} [{self.peer_ip}]", *self._extensions()]
        self.reply(250, "", "\n".join(lines))

    def smtp_HELO(self, rest: bytes) -> None:
        helo = self._client_name(rest, "HELO")
        if helo is None:
            return
        self._helo = helo
        self._esmtp = False
        self._reset_transaction()
        self.reply(250, "", self.settings.hostname)

    def smtp_STARTTLS(self, rest: bytes) -> None:
        if self.tls:
            self.reply(503, "5.5.1", "TLS already active")
            return
        if rest:
            self.reply(501, "5.5.4", "Syntax: STARTTLS")
            return
        if self.tls_options is None or not ITLSTransport.providedBy(self.transport):
            self.reply(454, "4.7.0", "TLS not available")
            return
        self.reply(220, "2.0.0", "Ready to start TLS")
        self._start_tls(self.tls_options)
        # RFC 3207 section 4.2: forget everything learnt before TLS.
        self.tls = True
        self._helo = None
        self._esmtp = False
        self._logout_avatar()
        self._reset_transaction()

    def smtp_NOOP(self, rest: bytes) -> None:
        self.reply(250, "2.0.0", "Ok")

    def smtp_RSET(self, rest: bytes) -> None:
        self._reset_transaction()
        self.reply(250, "2.0.0", "Ok")

    def smtp_QUIT(self, rest: bytes) -> None:
        self.outcome = "quit"
        self.reply(221, "2.0.0", "Bye")
        self._close()

    def smtp_VRFY(self, rest: bytes) -> None:
        self.reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, rest: bytes) -> None:
        self.reply(502, "5.5.1", "EXPN not supported")

    def smtp_HELP(self, rest: bytes) -> None:
        self.reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT")

    # AUTH

    def smtp_AUTH(self, rest: bytes) -> Deferred[Any] | None:
        # TLS first: on plaintext the answer is always "use STARTTLS"; inside
        # TLS a client that skipped the second EHLO gets 503 (RFC 3207 4.2).
        if self.settings.auth_requires_tls and not self.tls:
            self.reply(530, "5.7.0", "Must issue a STARTTLS command first")
            return None
        if self._helo is None:
            self.reply(503, "5.5.1", "Send EHLO first")
            return None
        if self.avatar is not None:
            self.reply(503, "5.5.1", "Already authenticated")
            return None
        if self._mail_from is not None:
            self.reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
            return None
        mechanism, _, initial = rest.partition(b" ")
        mechanism = mechanism.upper()
        initial = initial.strip()
        if not mechanism:
            self.reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return None
        if mechanism not in MECHANISMS:
            self.reply(504, "5.5.4", "Unrecognized authentication type")
            return None
        self._sasl = SASLExchange(mechanism)
        if initial:
            # RFC 4954 4: the initial response answers the first challenge.
            return self._auth_response(initial)
        self.state = AUTH
        self.reply(334, "", self._sasl.challenge)
        return None

    def _auth_response(self, line: bytes) -> Deferred[Any] | None:
        """The client's response to the current SASL challenge."""
        self.state = COMMAND
        exchange, self._sasl = self._sasl, None
        assert exchange is not None
        try:
            complete = exchange.respond(line)
        except SMTPReply as e:
            self._reply_error(e)
            return None
        if not complete:
            self._sasl = exchange
            self.state = AUTH
            self.reply(334, "", exchange.challenge)
            return None
        credentials = exchange.credentials
        return self._login(credentials.username, credentials.password)

    def _login(self, username: bytes, password: bytes) -> Deferred[Any]:
        name = username.decode("utf-8", "replace")
        d = maybeDeferred(
            self.login_service.login, name, password.decode("utf-8", "replace"), self.peer_ip
        )

        def succeeded(result: tuple[ISubmitter, Callable[[], None]]) -> None:
            avatar, logout = result
            if self.state is CLOSING or self.state is CLOSED:
                logout()
                return
            self.avatar = avatar
            self._logout = logout
            self.username = avatar.username
            self.reply(235, "2.7.0", "Authentication successful")

        def failed(failure: Failure) -> None:
            if failure.check(UnauthorizedLogin):
                self.reply(535, "5.7.8", "Authentication credentials invalid")
            elif failure.check(LoginThrottled):
                self.reply(454, "4.7.0", "Too many failed authentication attempts, try again later")
            elif failure.check(LoginUnavailable):
                self.reply(454, "4.7.0", "Temporary authentication failure")
            else:
                log.failure("AUTH for {name!r} failed unexpectedly", failure, name=name)
                self.reply(454, "4.7.0", "Temporary authentication failure")

        return d.addCallbacks(succeeded, failed)

    def _logout_avatar(self) -> None:
        if self._logout is not None:
            self._logout()
        self._logout = None
        self.avatar = None
        self.username = None

    # mail transaction

    def _reset_transaction(self) -> None:
        self._abandon_message()
        self._mail_from = None
        self._recipients = []
        self._mt_priority = None
        self._body = "7BIT"

    def _session_info(self) -> SessionInfo:
        return SessionInfo(peer_ip=self.peer_ip, local_port=self.local_port, helo=self._helo or "", tls=self.tls)

    def smtp_MAIL(self, rest: bytes) -> Deferred[Any] | None:
        if self._helo is None:
            self.reply(503, "5.5.1", "Send EHLO first")
            return None
        if self.avatar is None:
            self.reply(530, "5.7.0", "Authentication required")
            return None
        if self._mail_from is not None:
            self.reply(503, "5.5.1", "Nested MAIL command")
            return None
        if not rest[:5].upper() == b"FROM:":
            self.reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return None
        try:
            address, params = self._parse_path(rest[5:], "sender")
        except SMTPReply as e:
            self._reply_error(e)
            return None
        mt_priority = None
        body = "7BIT"
        for name, value in params.items():
            if name == "SIZE":
                if not value.isdigit():
                    self.reply(501, "5.5.4", "Bad SIZE parameter")
                    return None
                if int(value) > self.settings.max_message_size:
                    self._refuse_size(address)
                    return None
            elif name == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    self.reply(501, "5.5.4", "Bad BODY parameter")
                    return None
                body = value.upper()
            elif name == "MT-PRIORITY":
                if not re.fullmatch(r"[+-]?[0-9]", value):
                    self.reply(501, "5.5.4", "Bad MT-PRIORITY parameter: must be -9 to 9")
                    return None
                mt_priority = int(value)
            elif name == "AUTH":
                continue
            else:
                self.reply(555, "5.5.4", f"Unsupported parameter {name}")
                return None
        avatar = self.avatar
        d = maybeDeferred(avatar.validateFrom, self._session_info(), address, mt_priority)

        def accepted(_: object) -> None:
            self._mail_from = address
            self._mt_priority = mt_priority
            self._body = body
            self._recipients = []
            self.reply(250, "2.1.0", "Sender ok")

        def refused(failure: Failure) -> None:
            self._count_refusal(failure)
            self._command_failed(failure)

        return d.addCallbacks(accepted, refused)

    def smtp_RCPT(self, rest: bytes) -> Deferred[Any] | None:
        if self._mail_from is None:
            self.reply(503, "5.5.1", "Need MAIL command")
            return None
        if not rest[:3].upper() == b"TO:":
            self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return None
        try:
            address, params = self._parse_path(rest[3:], "recipient")
        except SMTPReply as e:
            self._reply_error(e)
            return None
        if params:
            self.reply(555, "5.5.4", f"Unsupported parameter {next(iter(params))}")
            return None
        if len(self._recipients) >= self.settings.max_recipients:
            self.reply(452, "4.5.3", "Too many recipients")
            return None
        assert self.avatar is not None
        d = maybeDeferred(self.avatar.validateTo, self._session_info(), self._mail_from, address)

        def accepted(_: object) -> None:
            self._recipients.append(address)
            self.reply(250, "2.1.5", "Recipient ok")

        return d.addCallbacks(accepted, self._command_failed)

    def _count_refusal(self, failure: Failure) -> None:
        """Count a mail transaction refused by C{failure}; an unexpected error is a local (storage) failure."""
        reason = failure.value.reason if failure.check(SMTPReply) else "storage"
        self.registry.metrics.message_refused(reason)

    def _command_failed(self, failure: Failure) -> None:
        if failure.check(SMTPReply):
            self._reply_error(failure.value)
        else:
            log.failure("command check failed unexpectedly", failure)
            self.reply(451, "4.3.0", "Local error in processing, try again later")

    def _parse_path(self, text: bytes, role: str) -> tuple[str, dict[str, str]]:
        """
        The address (as by L{envelope_address}; a sender may be null) and the
        parameters of a MAIL FROM or RCPT TO argument; raise L{SMTPReply}
        when the address is unusable.
        """
        syntax_error = SMTPReply(501, ADDRESS_STATUS[role], f"Bad {role} address syntax")
        match = _PATH_RE.match(text)
        if match is None:
            raise syntax_error
        raw = match.group("bracketed")
        if raw is None:
            raw = match.group("bare")
        try:
            path = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise syntax_error from None
        params: dict[str, str] = {}
        for item in (match.group("params") or b"").split():
            name, _, value = item.decode("ascii", "replace").partition("=")
            params[name.upper()] = value
        if path == "":
            if role == "sender":
                return "", params
            raise syntax_error
        return envelope_address(path, role), params

    def smtp_DATA(self, rest: bytes) -> None:
        if self._mail_from is None:
            self.reply(503, "5.5.1", "Need MAIL command")
            return
        if not self._recipients:
            self.reply(554, "5.5.1", "No valid recipients")
            return
        if rest:
            self.reply(501, "5.5.4", "Syntax: DATA")
            return
        assert self.avatar is not None
        envelope = Envelope(
            session=self._session_info(),
            mail_from=self._mail_from,
            recipients=tuple(self._recipients),
            mt_priority=self._mt_priority,
            body=self._body,
            received=self._received_header(),
        )
        try:
            writer = IMessageWriter(self.avatar.openMessage(envelope))
        except SMTPReply as e:
            self.registry.metrics.message_refused(e.reason)
            self._reply_error(e)
            return
        except Exception:
            log.failure("could not open a message")
            self.registry.metrics.message_refused("storage")
            self.reply(451, "4.3.0", "Local error in processing, try again later")
            return
        self._writer = writer
        self._data_size = 0
        self._data_line_start = True
        self.state = DATA
        self.reply(354, "", "End data with <CR><LF>.<CR><LF>")

    def _received_header(self) -> bytes:
        protocol = "ESMTP" if self._esmtp else "SMTP"
        if self.tls:
            protocol += "S"
        if self.avatar is not None:
            protocol += "A"
        # UTC from the injected clock: localtime() costs up to a millisecond a message.
        stamp = email.utils.format_datetime(datetime.datetime.fromtimestamp(self.registry.clock.seconds(), datetime.UTC))
        header = (
            f"Received: from {self._helo} ({_address_literal(self.peer_ip)})\r\n"
            f"\tby {self.settings.hostname} (smtpplus) with {protocol};\r\n"
            f"\t{stamp}\r\n"
        )
        return header.encode("utf-8", "replace")

    def _data_step(self) -> bool:
        body, self._buffer, self._data_line_start, self._data_size, end = decode_data(
            self._buffer, self._data_line_start, self._data_size, self.settings.max_message_size
        )
        if body is None:
            # Over the size limit: read on up to the end, store nothing.
            self._abandon_message()
        elif body:
            assert self._writer is not None
            self._writer.write(body)
        if end:
            self._deliver()
            return True
        return len(self._buffer) > DATA_FLUSH_SIZE

    def _deliver(self) -> None:
        """The final dot arrived: have the message stored, then answer."""
        self.state = COMMAND
        writer = self._writer
        self._writer = None
        mail_from = self._mail_from or ""
        self._reset_transaction()
        metrics = self.registry.metrics
        if writer is None:
            # Dropped by _data_step: the message outgrew the limit.
            self._refuse_size(mail_from)
            return
        clock = self.registry.clock
        ended = clock.seconds()
        d = maybeDeferred(writer.eomReceived)

        def queued(queue_id: str) -> None:
            metrics.message_accepted(clock.seconds() - ended)
            self.messages += 1
            self._junk_commands = 0
            self.reply(250, "2.0.0", f"Ok: queued as {queue_id}")

        def failed(failure: Failure) -> None:
            self._count_refusal(failure)
            if failure.check(SMTPReply):
                self._reply_error(failure.value)
            else:
                log.failure("storing a message failed", failure)
                self.reply(451, "4.3.0", "Local error in processing, message not accepted; try again later")

        self._wait(d.addCallbacks(queued, failed))

    def _refuse_size(self, mail_from: str) -> None:
        """Refuse a message over C{max_message_size}, with its log line and count (as the submitter's refusals)."""
        self.registry.metrics.message_refused("size")
        text = "Message size exceeds fixed maximum message size"
        log.info(
            "message refused id={id} user={user} mail_from=<{mail_from}> peer={peer} reason={reason} reply={reply}",
            id="-",
            user=self.username or "-",
            mail_from=mail_from,
            peer=self.peer_ip,
            reason="size",
            reply=f"552 5.3.4 {text}",
        )
        self.reply(552, "5.3.4", text)

    def _abandon_message(self) -> None:
        writer = self._writer
        self._writer = None
        if writer is not None:
            try:
                writer.connectionLost()
            except Exception:
                log.failure("discarding a message failed")
