"""
The input side of an ESMTP session: command-line framing, pipelining and
flow control, beneath the commands of L{smtpplus.smtp.protocol}.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from smtpplus.smtp.registry import SessionRegistry

log = Logger()

# RFC 5321 4.5.3.1.4: 512 octets for a command line with its CRLF; RFC 4954
# section 4 allows 12288 for AUTH and its continuation lines.
COMMAND_LINE_MAX = 512
AUTH_LINE_MAX = 12288


class SessionState(enum.Enum):
    """
    Where the dialogue with the client is; a session is in one state at a time.
    """

    COMMAND = "reading command lines"
    AUTH = "reading the response to an AUTH challenge"
    DISCARDING = "skipping the rest of an over-long line, already answered"
    DATA = "reading message content up to the line with the lone dot"
    WAITING = "a command's reply is pending; the input behind it waits"
    CLOSING = "the last reply is said; input is ignored while output drains"
    CLOSED = "the connection is gone"


# Module globals for the hot path: an Enum attribute lookup costs about
# 0.1 microseconds on Python 3.11, several times per command line.
COMMAND = SessionState.COMMAND
AUTH = SessionState.AUTH
DISCARDING = SessionState.DISCARDING
DATA = SessionState.DATA
WAITING = SessionState.WAITING
CLOSING = SessionState.CLOSING
CLOSED = SessionState.CLOSED


@implementer(IPushProducer)
class PipelinedLineReceiver(Protocol, TimeoutMixin):
    """
    Cuts the input into command lines and hands them to the subclass one at
    a time.  A command that answers later (returns a Deferred) holds every
    later pipelined line until it has replied, so that replies go out once
    each and in order (RFC 2920).

    It is the streaming producer of its own transport: while the client does
    not take its replies (the transport's write buffer is full) it stops
    working through pipelined input and stops reading, so that a client
    cannot make the daemon buffer replies without bound.

    Where the dialogue is, is L{state}.  Three booleans stay beside it
    because they are not places in the dialogue and change independently of
    it: C{_write_blocked} (the transport asked us to pause: the client is
    not reading, in whatever state), C{_paused} (whether we paused the
    transport's reading, so that pause and resume calls pair up) and
    C{_processing} (the input loop is running; a command answered at once
    must not enter it a second time).

    Subclasses implement L{_line_received}, L{_data_step},
    L{_line_too_long} and L{shutdown}.

    @ivar state: a L{SessionState}.
    @ivar registry: the L{SessionRegistry}; while it drains, no further
        command is started.
    """

    def __init__(self, registry: SessionRegistry) -> None:
        self.registry = registry
        self.idle_timeout = registry.settings.idle_timeout
        self.state = COMMAND
        self._buffer = b""
        self._write_blocked = False
        self._paused = False
        self._processing = False

    # hooks for the subclass

    def _line_received(self, line: bytes) -> Deferred[Any] | None:
        """Handle one line (without its CRLF) in state COMMAND or AUTH."""
        raise NotImplementedError

    def _data_step(self) -> bool:
        """
        Consume DATA input from C{_buffer}; return False when more input is
        needed to go on.
        """
        raise NotImplementedError

    def _line_too_long(self) -> None:
        """Answer a line longer than L{AUTH_LINE_MAX}; the rest is skipped."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """The daemon is stopping: hang up now unless a message is in progress."""
        raise NotImplementedError

    # connection lifecycle

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.setTimeout(self.idle_timeout)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.state = CLOSED
        self.setTimeout(None)

    def _close(self, abort: bool = False) -> None:
        """Close the connection after the replies written so far (or at once, with C{abort})."""
        if self.state is CLOSED:
            return
        registered = self.state is not CLOSING
        self.state = CLOSING
        self._buffer = b""
        if registered:
            # loseConnection waits for a registered producer to go away.
            self.transport.unregisterProducer()
        if abort:
            self.transport.abortConnection()
            return
        self.transport.loseConnection()
        # loseConnection first sends what is buffered; the idle time bounds that too.
        self.setTimeout(self.idle_timeout)

    def _start_tls(self, options: Any) -> None:
        """Switch to TLS; plaintext pipelined behind STARTTLS is dropped unread (RFC 3207 4.2)."""
        self._buffer = b""
        self.transport.startTLS(options)
        # startTLS registers this producer again with the TLS layer, which
        # starts out unpaused.
        self._write_blocked = False

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
        self.state = CLOSING
        self._buffer = b""

    def _sync_reading(self) -> None:
        """
        Read while all input read so far has been handled; stop while some
        waits behind a pending command or behind replies the client has not
        taken (and only then: during a TLS handshake the banner waits with
        no input, and the handshake needs reading).
        """
        state = self.state
        if state is CLOSING or state is CLOSED:
            return
        paused = bool(self._buffer) and (state is WAITING or self._write_blocked)
        if paused != self._paused:
            self._paused = paused
            if paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # input

    def dataReceived(self, data: bytes) -> None:
        if self.state is CLOSING:
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
            while self._buffer and not self._write_blocked:
                state = self.state
                if state is DATA:
                    if not self._data_step():
                        break
                    continue
                if state is COMMAND:
                    if self.registry.draining:
                        break
                elif state is not AUTH and state is not DISCARDING:
                    break
                end = self._buffer.find(b"\n", 0, AUTH_LINE_MAX + 1)
                if state is DISCARDING:
                    if end < 0:
                        self._buffer = b""
                        break
                    self.state = COMMAND
                    self._buffer = self._buffer[end + 1 :]
                    continue
                if end < 0:
                    if len(self._buffer) > AUTH_LINE_MAX:
                        self._buffer = b""
                        self.state = DISCARDING
                        self._line_too_long()
                    break
                line = self._buffer[:end].rstrip(b"\r")
                self._buffer = self._buffer[end + 1 :]
                result = self._line_received(line)
                if isinstance(result, Deferred):
                    self._wait(result)
            state = self.state
            if (state is COMMAND or state is AUTH or state is DISCARDING) and self.registry.draining:
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
        # message.  A command that closed the session (say, its reply was
        # the last error allowed) leaves the state alone.
        if self.state is COMMAND:
            self.state = WAITING
        d.addBoth(self._resume)

    def _resume(self, result: object) -> None:
        if isinstance(result, Failure):
            log.failure("a command's reply failed", result)
        if self.state is not WAITING:
            return
        self.state = COMMAND
        self.resetTimeout()
        # Called synchronously from inside _process this returns at once and
        # the running loop goes on; called later, it handles what was buffered.
        self._process()
