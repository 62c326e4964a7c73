"""
Outbound SMTP: hand one spooled message to the smarthost, or to each
recipient domain's MX hosts, and report the result for every recipient.

Built on Twisted's C{ESMTPClient} (EHLO, STARTTLS, AUTH); this module adds
per-recipient results, CRLF-preserving transfer and MX routing through
C{twisted.names}.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.protocol import ClientFactory
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.mail.smtp import ESMTPClient, LOGINAuthenticator, PLAINAuthenticator, SMTPClientError
from twisted.names import client, dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

from smtpplus.config import DeliveryConfig

log = Logger()

CONNECT_TIMEOUT = 30
# Seconds to wait for each server reply (RFC 5321 4.5.3.2 suggests minutes).
REPLY_TIMEOUT = 300


@attrs.frozen
class HopOutcome:
    """
    The result of offering a message to one next hop.

    @ivar hop: what was tried: C{"host:port"} of the smarthost or the domain.
    @ivar results: address -> (reply code, reply text) for each recipient the
        hop answered for.
    @ivar problem: why the hop could not be used at all (connection refused,
        DNS failure, TLS required but unavailable...), else None.
    """

    hop: str
    results: dict[str, tuple[int, str]]
    problem: str | None = None


class _Transfer:
    """One message offered to one connection; fires C{done} exactly once."""

    def __init__(self, mail_from: str, recipients: Sequence[str], path: str) -> None:
        self.mail_from = mail_from
        self.recipients = list(recipients)
        self.path = path
        self.done: Deferred[dict[str, tuple[int, str]] | str] = Deferred()

    def finish(self, outcome: dict[str, tuple[int, str]] | str) -> None:
        if not self.done.called:
            self.done.callback(outcome)


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return " ".join((value or "").split())


class _RelayClient(ESMTPClient):
    """Sends one L{_Transfer}, then quits."""

    timeout = REPLY_TIMEOUT

    def __init__(self, transfer: _Transfer, username: str, secret: bytes | None, context: Any, identity: str, require_tls: bool) -> None:
        ESMTPClient.__init__(self, secret, context, identity=identity.encode("idna"))
        self.transfer = transfer
        self.requireTransportSecurity = require_tls
        self.heloFallback = not require_tls and not username
        self.requireAuthentication = bool(username)
        if username:
            self.registerAuthenticator(PLAINAuthenticator(username.encode("utf-8")))
            self.registerAuthenticator(LOGINAuthenticator(username.encode("utf-8")))
        # SMTPClient reads these after a refused MAIL FROM on a fresh session.
        self.toAddressesResult: list[tuple[str, int, bytes]] = []
        self.successAddresses: list[str] = []
        self._started = False
        self._at_line_start = True

    def getMailFrom(self) -> str | None:
        if self._started:
            return None
        self._started = True
        return self.transfer.mail_from

    def getMailTo(self) -> list[str]:
        return self.transfer.recipients

    def getMailData(self) -> Any:
        return open(self.transfer.path, "rb")  # noqa: SIM115 - FileSender reads it to the end

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
        self.sendLine(b"." if self._at_line_start else b"\r\n.")

    def sentMail(self, code: int, resp: bytes, numOk: int, addresses: list[tuple[str, int, bytes]], log: Any) -> None:
        final = (code, _text(resp))
        results: dict[str, tuple[int, str]] = {}
        for address, rcpt_code, rcpt_resp in addresses:
            results[address] = final if 200 <= rcpt_code < 300 else (rcpt_code, _text(rcpt_resp))
        for address in self.transfer.recipients:
            results.setdefault(address, final)
        self.transfer.finish(results)

    def sendError(self, exc: Exception) -> None:
        if isinstance(exc, SMTPClientError):
            reason = f"{exc.code} {_text(exc.resp)}" if exc.code and exc.code > 0 else _text(exc.resp)
        else:
            reason = str(exc)
        self.transfer.finish(reason or exc.__class__.__name__)
        ESMTPClient.sendError(self, exc)


class _RelayFactory(ClientFactory):
    noisy = False

    def __init__(self, transfer: _Transfer, relay: Relay, require_tls: bool, context: Any) -> None:
        self.transfer = transfer
        self.relay = relay
        self.require_tls = require_tls
        self.context = context

    def buildProtocol(self, addr: Any) -> _RelayClient:
        relay = self.relay
        secret = relay.password.encode("utf-8") if relay.username else None
        proto = _RelayClient(self.transfer, relay.username, secret, self.context, relay.hostname, self.require_tls)
        proto.callLater = relay.reactor.callLater
        proto.factory = self
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.transfer.finish(f"connection failed: {_text(reason.getErrorMessage())}")

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        self.transfer.finish(f"connection lost: {_text(reason.getErrorMessage())}")


def _server_address(text: str, default_port: int) -> tuple[str, int]:
    """C{"host:port"}, C{"[v6]:port"}, C{"host"} or a bare IPv6 address."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        return host, int(port.lstrip(":") or default_port)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, default_port


class _PermanentRoute(Exception):
    """The domain cannot receive mail at all: its recipients bounce."""


class Relay:
    """
    Delivers spooled messages per C{[delivery]}: to the smarthost, or by MX.

    @param mx_port: the port MX hosts are contacted on (25; tests change it).
    """

    def __init__(
        self,
        reactor: Any,
        config: DeliveryConfig,
        hostname: str,
        resolver: Any = None,
        mx_port: int = 25,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.hostname = hostname
        self.username = config.smarthost_username
        self.password = config.smarthost_password
        self.mx_port = mx_port
        if resolver is None and config.mode == "mx":
            if config.dns_servers:
                servers = [_server_address(s, 53) for s in config.dns_servers]
                resolver = client.Resolver(servers=servers, reactor=reactor, timeout=(2, 5, 10))
            else:
                resolver = client.createResolver()
        self.resolver = resolver
        # Opportunistic and "required" TLS both encrypt without verifying the
        # peer, like Postfix's "may" and "encrypt" levels: MX and smarthost
        # certificates are often self-signed or for another name.
        self._context = CertificateOptions(verify=False)

    def send(self, mail_from: str, recipients: Sequence[str], path: str) -> Deferred[list[HopOutcome]]:
        """Offer the message at C{path} to its next hop(s)."""
        if self.config.mode == "smarthost":
            host, port = _server_address(self.config.smarthost, 25)
            tls = self.config.smarthost_tls
            d = self._offer(self.config.smarthost, [(host, port)], mail_from, recipients, path, tls)
            return d.addCallback(lambda outcome: [outcome])
        by_domain: dict[str, list[str]] = {}
        for address in recipients:
            by_domain.setdefault(address.rpartition("@")[2].lower(), []).append(address)
        attempts = [self._send_domain(domain, mail_from, group, path) for domain, group in by_domain.items()]
        return DeferredList(attempts, consumeErrors=True).addCallback(_unwrap)

    @inlineCallbacks
    def _send_domain(self, domain: str, mail_from: str, recipients: list[str], path: str) -> Any:
        try:
            servers = yield self._route(domain)
        except _PermanentRoute as e:
            return HopOutcome(domain, {a: (550, str(e)) for a in recipients})
        except Exception as e:
            return HopOutcome(domain, {}, f"DNS lookup for {domain} failed: {_dns_error(e)}")
        outcome = yield self._offer(domain, servers, mail_from, recipients, path, "opportunistic")
        return outcome

    @inlineCallbacks
    def _route(self, domain: str) -> Any:
        """The (address, port) pairs to try for C{domain}, best first."""
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]
            return [(literal.removeprefix("IPv6:"), self.mx_port)]
        try:
            answers, _, _ = yield self.resolver.lookupMailExchange(domain)
        except DNSNameError:
            raise _PermanentRoute(f"5.1.2 Domain {domain} does not exist") from None
        exchanges = sorted(
            (record.payload.preference, str(record.payload.name))
            for record in answers
            if record.type == dns.MX
        )
        if any(name in ("", ".") for _, name in exchanges):
            raise _PermanentRoute(f"5.1.10 Domain {domain} accepts no mail (null MX)")
        # RFC 5321 5.1: without MX records the domain itself is the host.
        hosts = [name for _, name in exchanges] or [domain]
        servers: list[tuple[str, int]] = []
        for host in hosts:
            addresses = yield self._addresses(host)
            servers.extend((address, self.mx_port) for address in addresses)
        if not servers:
            raise RuntimeError(f"no address for the mail hosts of {domain}")
        return servers

    @inlineCallbacks
    def _addresses(self, host: str) -> Any:
        found: list[str] = []
        for lookup, kind, family in (
            (self.resolver.lookupAddress, dns.A, socket.AF_INET),
            (self.resolver.lookupIPV6Address, dns.AAAA, socket.AF_INET6),
        ):
            try:
                answers, _, _ = yield lookup(host)
            except Exception:
                continue
            found.extend(socket.inet_ntop(family, r.payload.address) for r in answers if r.type == kind)
        return found

    @inlineCallbacks
    def _offer(
        self, hop: str, servers: Sequence[tuple[str, int]], mail_from: str, recipients: Sequence[str], path: str, tls: str
    ) -> Any:
        """Try each server in turn until one gives per-recipient results."""
        problem = "no server to try"
        for host, port in servers:
            transfer = _Transfer(mail_from, recipients, path)
            factory = _RelayFactory(transfer, self, tls == "required", None if tls == "none" else self._context)
            self.reactor.connectTCP(host, port, factory, timeout=CONNECT_TIMEOUT)
            outcome = yield transfer.done
            if isinstance(outcome, dict):
                return HopOutcome(hop, outcome)
            problem = f"{host}:{port}: {outcome}"
            log.info("relay to {hop} via {host}:{port} failed: {problem}", hop=hop, host=host, port=port, problem=outcome)
        return HopOutcome(hop, {}, problem)


def _dns_error(error: Exception) -> str:
    return error.__class__.__name__ if not str(error) else f"{error.__class__.__name__}: {error}"


def _unwrap(results: list[tuple[bool, Any]]) -> list[HopOutcome]:
    outcomes = []
    for ok, value in results:
        if not ok:
            log.failure("relaying failed unexpectedly", value)
            continue
        outcomes.append(value)
    return outcomes
