"""
Outbound SMTP: hand one spooled message to the smarthost, or to each
recipient domain's MX hosts, and report the result for every recipient.

The SMTP conversation and the reuse of connections live in
L{smtpplus.delivery.client}; this module chooses the servers: the smarthost,
or MX routing through C{twisted.names}.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import attrs
import idna
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IResolver
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names.error import DNSNameError
from zope.interface import implementer

from smtpplus.config import DeliveryConfig
from smtpplus.delivery.client import Destination, Pool, Transfer
from smtpplus.delivery.interfaces import IRelay

log = Logger()


@attrs.frozen
class HopOutcome:
    """
    The result of offering a message to one next hop.

    @ivar hop: what was tried: C{"host:port"} of the smarthost or the domain.
    @ivar results: address -> (reply code, reply text) for each recipient the
        hop answered for.
    @ivar problem: why the hop could not be used at all (connection refused,
        DNS failure, TLS required but unavailable...), else None.
    @ivar local: the results are this daemon's own verdict (an address it
        cannot write, a domain that takes no mail), not a next hop's reply.
    """

    hop: str
    results: dict[str, tuple[int, str]]
    problem: str | None = None
    local: bool = False


def _server_address(text: str, default_port: int) -> tuple[str, int]:
    """C{"host:port"}, C{"[v6]:port"}, C{"host"} or a bare IPv6 address."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        return host, int(port.lstrip(":") or default_port)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, default_port


def wire_address(address: str) -> str:
    """
    C{address} as it is written towards the next hop: ASCII, its domain in
    IDNA A-labels (messages queued before intake converted them have
    Unicode ones).  Raises ValueError when it cannot be written so: a
    non-ASCII local part (the relay does not speak SMTPUTF8) or a domain
    that is not a valid IDNA name.
    """
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        raise ValueError(f"the local part of {address} is not ASCII")
    try:
        return f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"
    except UnicodeError as e:
        raise ValueError(f"the domain of {address} is not a valid internationalized name: {e}") from None


class _PermanentRoute(Exception):
    """The domain cannot receive mail at all: its recipients bounce."""


def make_resolver(config: DeliveryConfig, reactor: Any) -> IResolver:
    """
    The DNS resolver of C{[delivery] dns_servers} on C{reactor} (which needs
    UDP, TCP and time), or the system's (Twisted's C{createResolver} takes
    no reactor: it uses the global one).
    """
    if config.dns_servers:
        servers = [_server_address(s, 53) for s in config.dns_servers]
        return client.Resolver(servers=servers, reactor=reactor, timeout=(2, 5, 10))
    return client.createResolver()


@implementer(IRelay)
class Relay:
    """
    Delivers spooled messages per C{[delivery]}: to the smarthost, or by MX.

    @param clock: times replies and idle kept connections.
    @param connector: opens the outbound connections.
    @param resolver: looks up MX and address records; when None in MX
        mode, one from L{make_resolver} on C{connector}, which must then be
        a whole reactor.
    @param mx_port: the port MX hosts are contacted on (25; tests change it).
    """

    def __init__(
        self,
        clock: IReactorTime,
        connector: IReactorTCP,
        config: DeliveryConfig,
        hostname: str,
        resolver: IResolver | None = None,
        mx_port: int = 25,
    ) -> None:
        self.config = config
        self.hostname = hostname
        self.mx_port = mx_port
        if resolver is None and config.mode == "mx":
            resolver = make_resolver(config, connector)
        self.resolver = resolver
        # Opportunistic and "required" TLS both encrypt without verifying the
        # peer, like Postfix's "may" and "encrypt" levels: MX and smarthost
        # certificates are often self-signed or for another name.
        context = CertificateOptions(verify=False)
        self.pool = Pool(clock, connector, hostname, config.smarthost_username, config.smarthost_password, context)

    def send(
        self, mail_from: str, recipients: Sequence[str], path: str, content: bytes | None = None, length: int | None = None
    ) -> Deferred[list[HopOutcome]]:
        """
        Offer the message at C{path} (its first C{length} bytes, or
        C{content} when read already) to its next hop(s).  A recipient whose
        address cannot be written for the next hop fails for good, with the
        reason; the others go on.
        """
        message = (path, content, length)
        if mail_from.isascii() and all(address.isascii() for address in recipients):
            return self._send(mail_from, recipients, message)
        try:
            wire_from = wire_address(mail_from)
        except ValueError as e:
            return succeed(
                [HopOutcome("", {a: (553, f"5.6.7 Sender address refused: {e}") for a in recipients}, local=True)]
            )
        unwritable: dict[str, tuple[int, str]] = {}
        originals: dict[str, list[str]] = {}
        for address in recipients:
            try:
                originals.setdefault(wire_address(address), []).append(address)
            except ValueError as e:
                unwritable[address] = (553, f"5.6.7 Recipient address refused: {e}")
        d = self._send(wire_from, list(originals), message) if originals else succeed([])

        def as_given(outcomes: list[HopOutcome]) -> list[HopOutcome]:
            result = [
                attrs.evolve(o, results={a: r for w, r in o.results.items() for a in originals.get(w, [w])})
                for o in outcomes
            ]
            if unwritable:
                result.append(HopOutcome("", unwritable, local=True))
            return result

        return d.addCallback(as_given)

    def _send(
        self, mail_from: str, recipients: Sequence[str], message: tuple[str, bytes | None, int | None]
    ) -> Deferred[list[HopOutcome]]:
        if self.config.mode == "smarthost":
            host, port = _server_address(self.config.smarthost, 25)
            tls = self.config.smarthost_tls
            d = self._offer(self.config.smarthost, [(host, port)], mail_from, recipients, message, tls)
            return d.addCallback(lambda outcome: [outcome])
        by_domain: dict[str, list[str]] = {}
        for address in recipients:
            by_domain.setdefault(address.rpartition("@")[2].lower(), []).append(address)
        attempts = [self._send_domain(domain, mail_from, group, message) for domain, group in by_domain.items()]
        return DeferredList(attempts, consumeErrors=True).addCallback(_unwrap)

    @inlineCallbacks
    def _send_domain(self, domain: str, mail_from: str, recipients: list[str], message: tuple[str, bytes | None, int | None]) -> Any:
        try:
            servers = yield self._route(domain)
        except _PermanentRoute as e:
            return HopOutcome(domain, {a: (550, str(e)) for a in recipients}, local=True)
        except Exception as e:
            return HopOutcome(domain, {}, f"DNS lookup for {domain} failed: {_dns_error(e)}")
        outcome = yield self._offer(domain, servers, mail_from, recipients, message, "opportunistic")
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
        self,
        hop: str,
        servers: Sequence[tuple[str, int]],
        mail_from: str,
        recipients: Sequence[str],
        message: tuple[str, bytes | None, int | None],
        tls: str,
    ) -> Any:
        """Try each server in turn until one gives per-recipient results."""
        problem = "no server to try"
        for host, port in servers:
            destination = Destination(host, port, tls)
            transfer = Transfer(mail_from, recipients, *message)
            outcome = yield self.pool.send(destination, transfer)
            if isinstance(outcome, str) and transfer.reused and not transfer.dot_sent:
                # A kept connection that broke before the message could
                # have been accepted (the server timed it out, say) says
                # nothing about the server: try once on a new one.
                transfer = Transfer(mail_from, recipients, *message)
                outcome = yield self.pool.send(destination, transfer, fresh=True)
            if isinstance(outcome, dict):
                return HopOutcome(hop, outcome)
            problem = f"{host}:{port}: {outcome}"
            log.debug("relay to {hop} via {host}:{port} failed: {problem}", hop=hop, host=host, port=port, problem=outcome)
        return HopOutcome(hop, {}, problem)


    def close(self) -> Deferred[None]:
        """Close the kept connections (at shutdown); fires when they are gone."""
        return self.pool.close()


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
