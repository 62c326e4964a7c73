"""
Outbound SMTP connections, kept open and reused for consecutive messages to
the same server (as Postfix's connection cache does): one handshake (TCP,
EHLO, STARTTLS, AUTH) serves up to L{MAX_MESSAGES} messages, and an idle
connection is closed after L{IDLE_SECONDS}.

Built on Twisted's C{ESMTPClient}, which already loops over messages
(C{getMailFrom} is asked again after each one); this module adds parking
the connection between messages, per-recipient results and CRLF-preserving
transfer.  An RSET is sent only after a transaction refused before its
data; after the reply to the final dot the next MAIL follows directly.
"""

from __future__ import annotations

import functools
import io
from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.mail.smtp import (
    SUCCESS,
    ESMTPClient,
    LOGINAuthenticator,
    PLAINAuthenticator,
    SMTPClient,
    SMTPClientError,
    quoteaddr,
)
from twisted.python.failure import Failure

log = Logger()

CONNECT_TIMEOUT = 30
# Seconds to wait for each server reply (RFC 5321 4.5.3.2 suggests minutes).
REPLY_TIMEOUT = 300
# A connection idle this long is closed: long enough to carry a stream of
# messages, short enough not to hold a slot on the server (Postfix: 2 s).
IDLE_SECONDS = 5.0
# Messages per connection, then a fresh one: bounds what one session's
# state (and a server's per-session limits) can affect.
MAX_MESSAGES = 100

Results = dict[str, tuple[int, str]]


@attrs.frozen
class Destination:
    """Which connections are interchangeable: same server, same TLS policy."""

    host: str
    port: int
    tls: str  # "opportunistic" | "required" | "none"


class Transfer:
    """
    One message offered over one connection; C{done} fires exactly once,
    with address -> (code, text) for every recipient, or with a string
    saying why the server could not be used.

    @ivar content: the message itself when it was read already (small
        ones are, off the reactor), else None: it is read from C{path}.
    @ivar length: how many bytes of C{path} are the message (the spool
        file's envelope record follows them), None for the whole file.
    @ivar reused: the connection had carried a message before this one.
    @ivar dot_sent: the end of the data was sent, so the server may have
        accepted the message even if no reply came.
    """

    def __init__(
        self, mail_from: str, recipients: Sequence[str], path: str, content: bytes | None = None, length: int | None = None
    ) -> None:
        self.mail_from = mail_from
        self.recipients = list(recipients)
        self.path = path
        self.content = content
        self.length = length
        self.reused = False
        self.dot_sent = False
        self.done: Deferred[Results | str] = Deferred()

    def finish(self, outcome: Results | str) -> None:
        if not self.done.called:
            self.done.callback(outcome)


@functools.lru_cache(maxsize=4096)
def _quoted(address: str) -> bytes:
    # Twisted's quoteaddr runs the email package's address parser: a bulk
    # stream repeats its senders and recipients.
    return quoteaddr(address)


def text_of(value: bytes | str | None) -> str:
    """A server reply as one line of text."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join((value or "").split())


class RelayClient(ESMTPClient):
    """
    One pooled connection.  It is given a L{Transfer} at a time by its
    L{Pool}; between transfers it waits, parked, for the next one.
    """

    timeout = REPLY_TIMEOUT
    # ESMTPClient routes every attribute assignment through a Python
    # __setattr__ that only watches for its deprecated tlsMode, which this
    # class never sets; a message sets a dozen attributes.
    __setattr__ = object.__setattr__

    def __init__(self, pool: Pool, destination: Destination, transfer: Transfer) -> None:
        require_tls = destination.tls == "required"
        context = None if destination.tls == "none" else pool.context
        secret = pool.password.encode("utf-8") if pool.username else None
        ESMTPClient.__init__(self, secret, context, identity=pool.hostname.encode("idna"))
        self.pool = pool
        self.destination = destination
        self.transfer: Transfer | None = transfer
        self.requireTransportSecurity = require_tls
        self.heloFallback = not require_tls and not pool.username
        self.requireAuthentication = bool(pool.username)
        if pool.username:
            self.registerAuthenticator(PLAINAuthenticator(pool.username.encode("utf-8")))
            self.registerAuthenticator(LOGINAuthenticator(pool.username.encode("utf-8")))
        # SMTPClient reads these after a refused MAIL FROM on a fresh session.
        self.toAddressesResult: list[tuple[str, int, bytes]] = []
        self.successAddresses: list[str] = []
        self.sent = 0
        self.parked = False
        self.usable = True
        self.lost: Deferred[None] = Deferred()
        self._file: Any = None
        self._at_line_start = True
        # The server offers PIPELINING (RFC 2920): MAIL, RCPT and DATA go out
        # in one write and their replies are matched in order.
        self.pipelining = False
        self._mail_reply: tuple[int, bytes] | None = None
        self._awaiting: deque[str] = deque()

    # -- the pool's side ---------------------------------------------------

    def start(self, transfer: Transfer) -> None:
        """Send C{transfer} on this parked connection."""
        self.parked = False
        self.transfer = transfer
        transfer.reused = True
        self.setTimeout(self.timeout)
        self._send_envelope()

    def park(self) -> None:
        """Wait for the next transfer without a reply timeout."""
        self.parked = True
        self.setTimeout(None)

    def quit(self) -> None:
        """Say goodbye; used for idle, worn-out and shutting-down connections."""
        self.usable = False
        self.parked = False
        self.setTimeout(self.timeout)
        self._disconnectFromServer()

    # -- SMTPClient callbacks ------------------------------------------------

    def lineReceived(self, line: bytes) -> Any:
        if self.parked:
            # Typically "421 idle timeout" before the server hangs up.
            self.usable = False
            self.pool.unpark(self)
            self.transport.loseConnection()
            return None
        return ESMTPClient.lineReceived(self, line)

    def tryTLS(self, code: int, resp: bytes, items: dict[bytes, Any]) -> None:
        # The EHLO capabilities, read again after STARTTLS.
        self.pipelining = any(key.upper() == b"PIPELINING" for key in items)
        ESMTPClient.tryTLS(self, code, resp, items)

    def smtpState_from(self, code: int, resp: bytes) -> None:
        if self.transfer is None:
            # RSET answered: the connection is free for the next message.
            self.pool.ready(self)
            return
        self._send_envelope()

    def _send_envelope(self) -> None:
        transfer = self.transfer
        if transfer is None or not self.pipelining:
            SMTPClient.smtpState_from(self, 250, b"")
            return
        self._from = transfer.mail_from
        self.toAddressesResult = []
        self.successAddresses = []
        self._mail_reply = None
        self._awaiting = deque(transfer.recipients)
        lines = [b"MAIL FROM:" + _quoted(transfer.mail_from)]
        lines.extend(b"RCPT TO:" + _quoted(address) for address in transfer.recipients)
        lines.append(b"DATA\r\n")
        self._expected = range(0, 1000)
        self._okresponse = self._failresponse = self._pipelined_reply
        self.transport.write(b"\r\n".join(lines))

    def _pipelined_reply(self, code: int, resp: bytes) -> None:
        """
        One reply to the pipelined group, in order: MAIL, each RCPT, DATA.
        Once all are in, go on exactly as Twisted's one-command-at-a-time
        states would have after the same replies.
        """
        if self._mail_reply is None:
            self._mail_reply = (code, resp)
            return
        if self._awaiting:
            address = self._awaiting.popleft()
            self.toAddressesResult.append((address, code, resp))
            if code in SUCCESS:
                self.successAddresses.append(address)
            return
        self._failresponse = self.smtpTransferFailed
        mail_code, mail_resp = self._mail_reply
        if mail_code == 250 and self.successAddresses:
            if code == 354:
                self.smtpState_data(code, resp)
            else:
                self.smtpTransferFailed(code, resp)
            return
        if mail_code != 250:
            # Twisted stops at a refused MAIL: every recipient gets its reply.
            self.toAddressesResult = []
            outcome = (mail_code, mail_resp)
        else:
            outcome = (self.toAddressesResult[-1][1], b"No recipients accepted")
        if code == 354:
            # The server had to refuse DATA (RFC 2920 3.1) but did not:
            # hanging up is the only way out of its DATA mode.
            self.usable = False
            self.sentMail(*outcome, 0, self.toAddressesResult, self.log)
            self.pool.unpark(self)
            self.transport.loseConnection()
            return
        self.smtpState_msgSent(*outcome)

    def getMailFrom(self) -> str | None:
        return None if self.transfer is None else self.transfer.mail_from

    def getMailTo(self) -> list[str]:
        assert self.transfer is not None
        return self.transfer.recipients

    def getMailData(self) -> Any:
        assert self.transfer is not None
        self._at_line_start = True
        if self.transfer.content is not None:
            self._file = io.BytesIO(self.transfer.content)
        else:
            file = open(self.transfer.path, "rb")  # noqa: SIM115 - closed when the transfer ends
            self._file = file if self.transfer.length is None else _Prefix(file, self.transfer.length)
        return self._file

    def smtpState_data(self, code: int, resp: bytes) -> None:
        transfer = self.transfer
        if transfer is None or transfer.content is None:
            SMTPClient.smtpState_data(self, code, resp)
            return
        # A message read already goes out in one write with its final dot,
        # without a file producer.
        self._expected = SUCCESS
        self._okresponse = self.smtpState_msgSent
        self._at_line_start = True
        self.transport.write(self.transformChunk(transfer.content))
        self.finishedFileTransfer(b"")

    def transformChunk(self, chunk: bytes) -> bytes:
        # The spool holds CRLF lines already; only dot-stuff, also across
        # chunk boundaries.
        self.resetTimeout()
        if not chunk:
            return chunk
        stuffed = chunk.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and chunk.startswith(b"."):
            stuffed = b"." + stuffed
        self._at_line_start = chunk.endswith(b"\r\n")
        return stuffed

    def finishedFileTransfer(self, lastsent: bytes) -> None:
        self._close_file()
        if self.transfer is not None:
            self.transfer.dot_sent = True
        self.sendLine(b"." if self._at_line_start else b"\r\n.")

    def sentMail(self, code: int, resp: bytes, numOk: int, addresses: list[tuple[str, int, bytes]], log: Any) -> None:
        transfer, self.transfer = self.transfer, None
        self.sent += 1
        if transfer is None:
            return
        final = (code, text_of(resp))
        results: Results = {}
        for address, rcpt_code, rcpt_resp in addresses:
            results[address] = final if 200 <= rcpt_code < 300 else (rcpt_code, text_of(rcpt_resp))
        for address in transfer.recipients:
            results.setdefault(address, final)
        self.pool.resetting(self)
        transfer.finish(results)

    def smtpState_msgSent(self, code: int, resp: bytes) -> None:
        transfer = self.transfer
        if transfer is not None and transfer.dot_sent:
            # The reply to the final dot ends the transaction (RFC 5321
            # 4.1.1.4): the next MAIL may follow without an RSET round trip.
            self.sentMail(code, resp, len(self.successAddresses), self.toAddressesResult, self.log)
            self.toAddressesResult = []
            self._from = None
            self.pool.ready(self)
            return
        # A transaction refused before its data is reset before the next one.
        SMTPClient.smtpState_msgSent(self, code, resp)
        # Twisted would answer a refused RSET with another RSET, forever.
        self._failresponse = self._reset_refused

    def _reset_refused(self, code: int, resp: bytes) -> None:
        self.usable = False
        self.pool.unpark(self)
        self._disconnectFromServer()

    def sendError(self, exc: Exception) -> None:
        self.usable = False
        if isinstance(exc, SMTPClientError):
            reason = f"{exc.code} {text_of(exc.resp)}" if exc.code and exc.code > 0 else text_of(exc.resp)
        else:
            reason = str(exc)
        transfer, self.transfer = self.transfer, None
        if transfer is not None:
            transfer.finish(reason or exc.__class__.__name__)
        self.pool.unpark(self)
        ESMTPClient.sendError(self, exc)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        ESMTPClient.connectionLost(self, reason)
        self.usable = False
        self._close_file()
        transfer, self.transfer = self.transfer, None
        if transfer is not None:
            transfer.finish(f"connection lost: {text_of(reason.getErrorMessage())}")
        self.pool.gone(self)
        self.lost.callback(None)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Prefix:
    """The first C{length} bytes of a file, read as Twisted's C{FileSender} reads files."""

    def __init__(self, file: Any, length: int) -> None:
        self._file = file
        self._left = length

    def read(self, size: int) -> bytes:
        data = self._file.read(min(size, self._left))
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._file.close()


class _ClientFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: Pool, destination: Destination, transfer: Transfer) -> None:
        self.pool = pool
        self.destination = destination
        self.transfer = transfer

    def buildProtocol(self, addr: Any) -> RelayClient:
        proto = RelayClient(self.pool, self.destination, self.transfer)
        # The reply timeouts (TimeoutMixin) run on the pool's clock.
        proto.callLater = self.pool.clock.callLater
        proto.factory = self
        self.pool.opened(proto)
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.transfer.finish(f"connection failed: {text_of(reason.getErrorMessage())}")


class _Slot:
    """The connections of one destination."""

    def __init__(self) -> None:
        self.idle: list[RelayClient] = []
        self.timers: dict[RelayClient, IDelayedCall] = {}
        # Connections whose message is done and whose RSET is pending:
        # transfers may wait for them instead of opening a connection.
        self.resetting: set[RelayClient] = set()
        self.waiting: deque[Transfer] = deque()


class Pool:
    """
    Connections by L{Destination}.  L{send} gives a transfer to an idle
    connection, or to one about to be free, or opens a new one through
    C{connector}; C{clock} times replies and idle connections.

    @ivar idle_seconds: how long a connection may wait for the next message.
    @ivar max_messages: messages per connection, then a fresh one.
    """

    def __init__(
        self,
        clock: IReactorTime,
        connector: IReactorTCP,
        hostname: str,
        username: str,
        password: str,
        context: CertificateOptions,
        idle_seconds: float = IDLE_SECONDS,
        max_messages: int = MAX_MESSAGES,
    ) -> None:
        self.clock = clock
        self.connector = connector
        self.idle_seconds = idle_seconds
        self.max_messages = max_messages
        self.hostname = hostname
        self.username = username
        self.password = password
        self.context = context
        self._slots: dict[Destination, _Slot] = {}
        self._all: set[RelayClient] = set()
        self._closing = False
        # Observable in tests: connections opened so far.
        self.connections_opened = 0

    def send(self, destination: Destination, transfer: Transfer, fresh: bool = False) -> Deferred[Results | str]:
        """Offer C{transfer} to C{destination}; C{fresh}: on a new connection."""
        slot = self._slots.setdefault(destination, _Slot())
        if not fresh and not self._closing:
            while slot.idle:
                conn = slot.idle.pop()
                self._cancel_timer(slot, conn)
                if conn.usable:
                    conn.start(transfer)
                    return transfer.done
            if len(slot.waiting) < len(slot.resetting):
                slot.waiting.append(transfer)
                return transfer.done
        self._connect(destination, transfer)
        return transfer.done

    def _connect(self, destination: Destination, transfer: Transfer) -> None:
        self.connections_opened += 1
        factory = _ClientFactory(self, destination, transfer)
        self.connector.connectTCP(destination.host, destination.port, factory, timeout=CONNECT_TIMEOUT)

    def opened(self, conn: RelayClient) -> None:
        self._all.add(conn)

    def resetting(self, conn: RelayClient) -> None:
        """C{conn} finished a message and sent RSET."""
        self._slots[conn.destination].resetting.add(conn)

    def ready(self, conn: RelayClient) -> None:
        """C{conn} may carry another message: give it one, park it or retire it."""
        slot = self._slots[conn.destination]
        slot.resetting.discard(conn)
        if self._closing or conn.sent >= self.max_messages:
            conn.quit()
            self._rescue(conn.destination)
            return
        if slot.waiting:
            conn.start(slot.waiting.popleft())
            return
        conn.park()
        slot.idle.append(conn)
        slot.timers[conn] = self.clock.callLater(self.idle_seconds, self._expire, slot, conn)

    def _expire(self, slot: _Slot, conn: RelayClient) -> None:
        slot.timers.pop(conn, None)
        if conn in slot.idle:
            slot.idle.remove(conn)
            conn.quit()

    def unpark(self, conn: RelayClient) -> None:
        """C{conn} can carry no more messages (error, server closing)."""
        slot = self._slots.get(conn.destination)
        if slot is None:
            return
        if conn in slot.idle:
            slot.idle.remove(conn)
        self._cancel_timer(slot, conn)
        if conn in slot.resetting:
            slot.resetting.discard(conn)
            self._rescue(conn.destination)

    def gone(self, conn: RelayClient) -> None:
        """C{conn} is disconnected."""
        self.unpark(conn)
        self._all.discard(conn)

    def _rescue(self, destination: Destination) -> None:
        # Transfers waiting for connections that will not be free after all
        # get connections of their own.
        slot = self._slots[destination]
        while len(slot.waiting) > len(slot.resetting):
            self._connect(destination, slot.waiting.popleft())

    def _cancel_timer(self, slot: _Slot, conn: RelayClient) -> None:
        timer = slot.timers.pop(conn, None)
        if timer is not None and timer.active():
            timer.cancel()

    def close(self) -> Deferred[None]:
        """
        Close idle connections now and busy ones after their message;
        fires when every connection is gone (the caller bounds the wait).
        """
        self._closing = True
        for slot in self._slots.values():
            for conn in list(slot.idle):
                self._cancel_timer(slot, conn)
                conn.quit()
            slot.idle.clear()
        waits = [conn.lost for conn in self._all if not conn.lost.called]
        return DeferredList(waits).addCallback(lambda _: None)
