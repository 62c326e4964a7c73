"""
The ESMTP wire protocol: one L{SMTPSession} per connection.

Written on L{Protocol} rather than C{twisted.mail.smtp.ESMTP} because the
stock class executes pipelined commands while an earlier asynchronous check
is still pending, keeps plaintext buffered across STARTTLS, offers AUTH
before TLS, has no SIZE or enhanced status codes and fixes the final reply.
The session only speaks the protocol; who may send what is the business of
the L{ISubmitter} avatar that L{ILoginService} returns.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import email.utils
import re
from collections.abc import Callable
from typing import Any

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime, ITLSTransport
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpplus.address import BadAddressSyntax, BadInternationalDomain, NonASCIILocalPart, envelope_mailbox
from smtpplus.smtp.interfaces import (
    Envelope,
    ILoginService,
    IMessageWriter,
    ISubmitter,
    LoginThrottled,
    SessionInfo,
    SMTPReply,
)

log = Logger()

# RFC 5321 4.5.3.1.4: 512 octets for a command line with its CRLF; RFC 4954
# section 4 allows 12288 for AUTH and its continuation lines.
COMMAND_LINE_MAX = 512
AUTH_LINE_MAX = 12288
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
# Without a CRLF in this much DATA input the line is passed on in pieces so
# that no single line can make the session buffer grow without bound.
DATA_FLUSH_SIZE = 65536

_PATH_RE = re.compile(rb"^\s*(?:<(?P<bracketed>[^<>]*)>|(?P<bare>[^\s<>]+))(?:\s+(?P<params>.*))?$", re.S)
# Bare CR or LF inside DATA; RFC 5321 2.3.8 allows line breaks only as CRLF.
_BARE_NEWLINE_RE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# Reply text must stay on its line: no control characters from callers.
_CONTROL_RE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


# RFC 3463 enhanced status for a bad envelope address, by role.
_ADDRESS_STATUS = {"sender": "5.1.7", "recipient": "5.1.3"}


def _envelope_mailbox(text: str, role: str) -> str:
    """
    Return the envelope mailbox C{text} in the form it is kept, shown and
    relayed in: a domain in Unicode becomes its IDNA A-label form (UTS #46),
    since the next hop need not speak SMTPUTF8 and nor do we.

    @param role: C{"sender"} or C{"recipient"}, for the reply.
    @raise SMTPReply: C{553 5.6.7} for a non-ASCII local part, C{553 5.1.7}
        (sender) or C{553 5.1.3} (recipient) for a domain that is not valid
        IDNA, C{501} with the same status for bad syntax.
    """
    status = _ADDRESS_STATUS[role]
    try:
        return envelope_mailbox(text)
    except NonASCIILocalPart:
        raise SMTPReply(553, "5.6.7", "Non-ASCII local part needs SMTPUTF8, which is not offered") from None
    except BadInternationalDomain:
        raise SMTPReply(553, status, f"Bad {role} domain: not a valid internationalized domain name") from None
    except BadAddressSyntax:
        raise SMTPReply(501, status, f"Bad {role} address syntax") from None


def _address_literal(ip: str) -> str:
    """RFC 5321 4.1.3 address literal for C{ip}."""
    return f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"


@attrs.frozen
class SessionSettings:
    """The parts of the configuration a session needs."""

    hostname: str
    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    idle_timeout: int
    auth_requires_tls: bool


class SessionRegistry:
    """
    Every live session across all listening ports: enforces the daemon-wide
    and per-IP connection limits and drains sessions on shutdown.
    """

    def __init__(self, settings: SessionSettings, clock: IReactorTime) -> None:
        self.settings = settings
        self.clock = clock
        self.sessions: set[SMTPSession] = set()
        self.per_ip: dict[str, int] = {}
        self.draining = False
        self._drained: Deferred[None] | None = None

    def admit(self, ip: str) -> str | None:
        """Return why a new connection from C{ip} must be refused, or None."""
        if self.draining:
            return "421 4.3.2 Service shutting down"
        if len(self.sessions) >= self.settings.max_connections:
            return "421 4.7.0 Too many connections, try again later"
        if self.per_ip.get(ip, 0) >= self.settings.max_connections_per_ip:
            return "421 4.7.0 Too many connections from your address, try again later"
        return None

    def add(self, session: SMTPSession, ip: str) -> None:
        self.sessions.add(session)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def remove(self, session: SMTPSession, ip: str) -> None:
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        remaining = self.per_ip.get(ip, 1) - 1
        if remaining:
            self.per_ip[ip] = remaining
        else:
            self.per_ip.pop(ip, None)
        if self.draining and not self.sessions and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def drain(self, grace: float) -> Deferred[None]:
        """
        Close idle sessions now with C{421}, let those receiving or storing a
        message finish for up to C{grace} seconds, then cut the rest.
        """
        self.draining = True
        drained: Deferred[None] = Deferred()
        if not self.sessions:
            drained.callback(None)
            return drained
        self._drained = drained
        for session in list(self.sessions):
            session.shutdown()

        def cut() -> None:
            for session in list(self.sessions):
                session.transport.abortConnection()

        timer = self.clock.callLater(grace, cut)
        drained.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        return drained


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
        session = SMTPSession(self.registry.settings, self.login_service, self.tls_options, self.implicit_tls)
        session.registry = self.registry
        session.factory = self
        return session


class _Refuse(Protocol):
    """Says why the connection is not served, then hangs up."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        self.transport.write(self.reply.encode("ascii") + b"\r\n")
        self.transport.loseConnection()


_COMMAND, _AUTH, _DATA = "COMMAND", "AUTH", "DATA"
_TOO_MUCH_JUNK = "Too many commands without a mail transaction, closing connection"


@implementer(IPushProducer)
class SMTPSession(Protocol, TimeoutMixin):
    """
    One ESMTP session; see the module docstring.

    The session is the streaming producer of its own transport: while the
    client does not take its replies (the transport's write buffer is full)
    it stops working through pipelined input and stops reading, so that a
    client cannot make the daemon buffer replies without bound.
    """

    registry: SessionRegistry

    def __init__(self, settings: SessionSettings, login_service: ILoginService, tls_options: Any, implicit_tls: bool) -> None:
        self.settings = settings
        self.login_service = login_service
        self.tls_options = tls_options
        self.tls = implicit_tls
        self._buffer = b""
        self._state = _COMMAND
        self._waiting = False
        self._paused = False
        self._write_blocked = False
        self._registered = False
        self._discarding = False
        self._processing = False
        self._closing = False
        self._lost = False
        self._bad_commands = 0
        self._junk_commands = 0
        self._command = ""
        self._helo: str | None = None
        self._esmtp = False
        self.avatar: ISubmitter | None = None
        self._logout: Callable[[], None] | None = None
        self.username: str | None = None
        self._auth_step: Callable[[bytes], Any] | None = None
        self._login_name = b""
        self.messages = 0
        self.outcome = "disconnected"
        self._reset_transaction()

    # connection lifecycle

    def connectionMade(self) -> None:
        self.callLater = self.registry.clock.callLater
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", str(peer))
        self.peer_port = getattr(peer, "port", 0)
        self.local_port = getattr(self.transport.getHost(), "port", 0)
        self.started = self.registry.clock.seconds()
        self.registry.add(self, self.peer_ip)
        self.transport.registerProducer(self, True)
        self._registered = True
        self.setTimeout(self.settings.idle_timeout)
        self.reply(220, "", f"{self.settings.hostname} ESMTP smtpplus")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost = True
        self.setTimeout(None)
        self._abandon_message()
        if self._logout is not None:
            self._logout()
            self._logout = None
        self.registry.remove(self, self.peer_ip)
        log.info(
            "smtp session peer={peer}:{peer_port} port={port} tls={tls} user={user} messages={messages} "
            "outcome={outcome} seconds={seconds:.3f}",
            peer=self.peer_ip,
            peer_port=self.peer_port,
            port=self.local_port,
            tls="yes" if self.tls else "no",
            user=self.username or "-",
            messages=self.messages,
            outcome=self.outcome,
            seconds=self.registry.clock.seconds() - self.started,
        )

    def timeoutConnection(self) -> None:
        if self._closing:
            # The client has not taken our last replies within the idle time.
            self.transport.abortConnection()
            return
        if self._waiting:
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
        if self._state == _DATA or self._waiting:
            return
        self.outcome = "shutdown"
        self.reply(421, "4.3.2", "Service shutting down")
        self._close()

    def _close(self, abort: bool = False) -> None:
        self._closing = True
        self._buffer = b""
        if self._registered:
            # loseConnection waits for a registered producer to go away.
            self._registered = False
            self.transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        # loseConnection first sends what is buffered; the idle time bounds that too.
        self.setTimeout(self.settings.idle_timeout)

    def _hang_up(self, outcome: str, text: str) -> None:
        """Say C{421 4.7.0 text} and close: the client is misbehaving."""
        if self._closing:
            return
        self.outcome = outcome
        self.reply(421, "4.7.0", text)
        self._close()

    # flow control: IPushProducer, called by the transport

    def pauseProducing(self) -> None:
        """The transport's write buffer is full: hold input until it drains."""
        self._write_blocked = True
        self._sync_reading()

    def resumeProducing(self) -> None:
        """The transport's write buffer has drained: go on with the input."""
        self._write_blocked = False
        self._process()

    def stopProducing(self) -> None:
        """The connection is gone; connectionLost follows."""
        self._closing = True
        self._buffer = b""

    def _sync_reading(self) -> None:
        """
        Read while all input read so far has been handled; stop while some
        waits behind a pending command or behind replies the client has not
        taken (and only then: during a TLS handshake the banner waits with
        no input, and the handshake needs reading).
        """
        if self._closing or self._lost:
            return
        paused = bool(self._buffer) and (self._waiting or self._write_blocked)
        if paused != self._paused:
            self._paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

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

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if b"\n" in data:
            # idle_timeout bounds each line: only a line's end resets it,
            # not bytes trickling in.
            self.resetTimeout()
        self._buffer += data
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._buffer and not (self._waiting or self._write_blocked or self._closing):
                if self._state == _DATA:
                    if not self._data_step():
                        break
                    continue
                if self.registry.draining and self._state == _COMMAND:
                    break
                end = self._buffer.find(b"\n", 0, AUTH_LINE_MAX + 1)
                if self._discarding:
                    # The rest of an over-long line, already answered.
                    if end < 0:
                        self._buffer = b""
                        break
                    self._discarding = False
                    self._buffer = self._buffer[end + 1 :]
                    continue
                if end < 0:
                    if len(self._buffer) > AUTH_LINE_MAX:
                        self._buffer = b""
                        self._discarding = True
                        self._state = _COMMAND
                        self._auth_step = None
                        self.reply(500, "5.5.2", "Line too long")
                    break
                line = self._buffer[:end].rstrip(b"\r")
                self._buffer = self._buffer[end + 1 :]
                result = self._line_received(line)
                if isinstance(result, Deferred):
                    self._wait(result)
            if self.registry.draining and not (self._waiting or self._closing or self._state == _DATA):
                # A message finished while the daemon stops: say goodbye now.
                self.shutdown()
            self._sync_reading()
        finally:
            self._processing = False

    def _wait(self, d: Deferred[Any]) -> None:
        """
        Hold later pipelined commands until C{d}, the current one, has
        answered, so that replies go out once each and in order (RFC 2920).
        """
        # While it is pending, input behind it stays buffered and reading
        # stops (see _sync_reading).  Without input behind it (the usual wait
        # for the commit at the end of DATA) reading goes on, and pauses if
        # the client sends meanwhile: that saves two epoll_ctl calls per
        # message.
        self._waiting = True
        d.addBoth(self._resume)

    def _resume(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure("a command's reply failed", result)
        self._waiting = False
        if self._lost or self._closing:
            return
        self.resetTimeout()
        # Called synchronously from inside _process this returns at once and
        # the running loop goes on; called later, it handles what was buffered.
        self._process()

    def _line_received(self, line: bytes) -> Deferred[Any] | None:
        if self._state == _AUTH:
            assert self._auth_step is not None
            return self._auth_continue(line)
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

    # session commands

    def _extensions(self) -> list[str]:
        ext = ["PIPELINING", f"SIZE {self.settings.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES", "MT-PRIORITY"]
        if not self.tls and self.tls_options is not None and ITLSTransport.providedBy(self.transport):
            ext.append("STARTTLS")
        if self.tls or not self.settings.auth_requires_tls:
            ext.append("AUTH PLAIN LOGIN")
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
        # RFC 3207 section 4.2: forget everything learnt before TLS, and never
        # execute plaintext that was pipelined behind STARTTLS.
        self._buffer = b""
        self.transport.startTLS(self.tls_options)
        # startTLS registers this producer again with the TLS layer, which
        # starts out unpaused.
        self._write_blocked = False
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
        if mechanism == b"PLAIN":
            self._auth_step = self._auth_plain
            if initial:
                return self._auth_continue(initial)
            self._state = _AUTH
            self.reply(334, "", "")
            return None
        if mechanism == b"LOGIN":
            self._auth_step = self._auth_login_user
            if initial:
                return self._auth_continue(initial)
            self._state = _AUTH
            self.reply(334, "", base64.b64encode(b"Username:").decode())
            return None
        self.reply(504, "5.5.4", "Unrecognized authentication type")
        return None

    def _auth_continue(self, line: bytes) -> Deferred[Any] | None:
        self._state = _COMMAND
        step = self._auth_step
        assert step is not None
        line = line.strip()
        if line == b"*":
            self._auth_step = None
            self.reply(501, "5.0.0", "Authentication cancelled")
            return None
        try:
            decoded = base64.b64decode(line, validate=True) if line != b"=" else b""
        except (binascii.Error, ValueError):
            self._auth_step = None
            self.reply(501, "5.5.2", "Cannot decode response")
            return None
        return step(decoded)

    def _auth_plain(self, decoded: bytes) -> Deferred[Any] | None:
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            self.reply(501, "5.5.2", "Malformed PLAIN response")
            return None
        return self._login(parts[1], parts[2])

    def _auth_login_user(self, decoded: bytes) -> None:
        self._login_name = decoded
        self._auth_step = self._auth_login_password
        self._state = _AUTH
        self.reply(334, "", base64.b64encode(b"Password:").decode())

    def _auth_login_password(self, decoded: bytes) -> Deferred[Any]:
        return self._login(self._login_name, decoded)

    def _login(self, username: bytes, password: bytes) -> Deferred[Any]:
        self._auth_step = None
        name = username.decode("utf-8", "replace")
        d = maybeDeferred(
            self.login_service.login, name, password.decode("utf-8", "replace"), self.peer_ip
        )

        def succeeded(result: tuple[ISubmitter, Callable[[], None]]) -> None:
            avatar, logout = result
            if self._closing or self._lost:
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
        self._mail_from: str | None = None
        self._recipients: list[str] = []
        self._mt_priority: int | None = None
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
                    self.reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
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

        return d.addCallbacks(accepted, self._command_failed)

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

    def _command_failed(self, failure: Failure) -> None:
        if failure.check(SMTPReply):
            self._reply_error(failure.value)
        else:
            log.failure("command check failed unexpectedly", failure)
            self.reply(451, "4.3.0", "Local error in processing, try again later")

    def _parse_path(self, text: bytes, role: str) -> tuple[str, dict[str, str]]:
        """
        The address (as by L{_envelope_mailbox}; a sender may be null) and the
        parameters of a MAIL FROM or RCPT TO argument; raise L{SMTPReply}
        when the address is unusable.
        """
        syntax_error = SMTPReply(501, _ADDRESS_STATUS[role], f"Bad {role} address syntax")
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
        return _envelope_mailbox(path, role), params

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
            self._reply_error(e)
            return
        except Exception:
            log.failure("could not open a message")
            self.reply(451, "4.3.0", "Local error in processing, try again later")
            return
        self._writer: IMessageWriter | None = writer
        self._data_size = 0
        self._data_overflow = False
        self._at_line_start = True
        self._state = _DATA
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
        """
        Consume DATA input from the buffer; return False when more input is
        needed to go on.
        """
        buf = self._buffer
        if self._at_line_start and buf.startswith(b".\r\n"):
            self._buffer = buf[3:]
            self._deliver(b"")
            return True
        end = buf.find(b"\r\n.\r\n")
        if end >= 0:
            self._buffer = buf[end + 5 :]
            self._deliver(buf[: end + 2])
            return True
        cut = buf.rfind(b"\r\n")
        if cut >= 0:
            # Keep a trailing "." (a possible terminator) for the next read.
            chunk, self._buffer = buf[: cut + 2], buf[cut + 2 :]
            self._feed(chunk)
            self._at_line_start = True
            return len(self._buffer) > DATA_FLUSH_SIZE
        if len(buf) > DATA_FLUSH_SIZE:
            keep = 1 if buf.endswith(b"\r") else 0
            chunk, self._buffer = buf[: len(buf) - keep], buf[len(buf) - keep :]
            self._feed(chunk)
            self._at_line_start = False
        return False

    def _feed(self, chunk: bytes) -> None:
        if self._at_line_start and chunk.startswith(b"."):
            chunk = chunk[1:]
        chunk = chunk.replace(b"\r\n.", b"\r\n")
        # Store CRLF only, so that a bare LF or CR cannot turn into a line
        # break (or an end-of-data) at a less careful next hop: SMTP smuggling.
        # Chunks never split a CRLF (see _data_step).
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
            chunk = _BARE_NEWLINE_RE.sub(b"\r\n", chunk)
        if self._data_overflow:
            return
        self._data_size += len(chunk)
        if self._data_size > self.settings.max_message_size:
            self._data_overflow = True
            self._abandon_message()
            return
        assert self._writer is not None
        self._writer.write(chunk)

    def _deliver(self, last: bytes) -> None:
        if last:
            self._feed(last)
        self._state = _COMMAND
        writer = self._writer
        overflow = self._data_overflow
        self._writer = None
        self._reset_transaction()
        if overflow or writer is None:
            self.reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
            return
        d = maybeDeferred(writer.eomReceived)

        def queued(queue_id: str) -> None:
            self.messages += 1
            self._junk_commands = 0
            self.reply(250, "2.0.0", f"Ok: queued as {queue_id}")

        def failed(failure: Failure) -> None:
            if failure.check(SMTPReply):
                self._reply_error(failure.value)
            else:
                log.failure("storing a message failed", failure)
                self.reply(451, "4.3.0", "Local error in processing, message not accepted; try again later")

        self._wait(d.addCallbacks(queued, failed))

    def _abandon_message(self) -> None:
        writer = getattr(self, "_writer", None)
        self._writer = None
        if writer is not None:
            try:
                writer.connectionLost()
            except Exception:
                log.failure("discarding a message failed")
