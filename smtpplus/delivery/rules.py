"""
Who may send as whom: the per-user sender rules, applied to the envelope
sender at C{MAIL FROM} and to the header C{From:} at the end of DATA.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Protocol

import attrs
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

from smtpplus.address import normalize_domain
from smtpplus.interfaces import IEventRecorder, IStatsRecorder
from smtpplus.model import EventType, User
from smtpplus.smtp.interfaces import SMTPReply

log = Logger()


@functools.lru_cache(maxsize=4096)
def _domain_key(domain: str) -> str:
    """
    C{domain} as the user store keeps it: a lower-case IDNA A-label, so
    that C{Bücher.example} in a sender matches C{xn--bcher-kva.example} in
    the lists.  What IDNA refuses is compared lower-cased as written; it
    can only match an identical entry.
    """
    if domain.isascii():
        # The common case, and what IDNA would do to a valid ASCII name
        # (the lists hold only valid ones): lower-case it.
        return domain.strip().rstrip(".").lower()
    try:
        return normalize_domain(domain)
    except ValueError:
        return domain.strip().rstrip(".").lower()


def address_key(address: str) -> str:
    """C{local@domain} lower-cased, with its domain as by L{_domain_key}."""
    local, _, domain = address.strip().rpartition("@")
    return f"{local.lower()}@{_domain_key(domain)}"


@attrs.frozen
class SenderRules:
    """The addresses and exact domains one user may send as."""

    senders: frozenset[str]
    domains: frozenset[str]

    @classmethod
    def from_user(cls, user: User) -> SenderRules:
        """Build the rules from a user's authorized senders and domains."""
        # The store normalizes the domains already; the keys also fold the
        # case of local parts, which the store keeps as written.
        return cls(
            senders=frozenset(address_key(a) for a in user.authorized_senders if "@" in a),
            domains=frozenset(_domain_key(d) for d in user.authorized_domains),
        )

    def authorizes(self, address: str) -> bool:
        """True when C{address} is listed itself or its domain is (exactly, IDNA-normalized)."""
        if "@" not in address:
            return False
        key = address_key(address)
        return key in self.senders or key.rpartition("@")[2] in self.domains


def header_from_addresses(values: Sequence[str]) -> list[str]:
    """
    The addresses of the message's C{From:} field.  Several C{From:}
    fields, one without an address, or one that does not parse strictly
    as an RFC 5322 address list are refused with 550 5.7.1.  An absent
    field yields no addresses (the submitter adds one).
    """
    if len(values) > 1:
        raise SMTPReply(550, "5.7.1", "Message has more than one From: header")
    if not values:
        return []
    addresses = _addresses_of(values[0])
    if addresses is None:
        raise SMTPReply(550, "5.7.1", "From: header is not a valid address list")
    if not addresses:
        raise SMTPReply(550, "5.7.1", "From: header has no address")
    return list(addresses)


@functools.lru_cache(maxsize=4096)
def _addresses_of(value: str) -> tuple[str, ...] | None:
    # Bulk senders repeat one From: value; parsing it once is enough.
    return parse_address_list(value)


# RFC 5322 specials plus whitespace: what ends an atom.  Anything else that
# is printable, non-ASCII included (RFC 6532), is atom text.
_ATOM_END = frozenset('()<>[]:;@\\,."') | frozenset(" \t\r\n")


def _tokens(text: str) -> list[str] | None:
    """
    Split an address list into atoms, quoted strings (quotes kept) and
    single special characters, dropping whitespace and comments; None when
    it cannot be split (unbalanced quote or comment, stray C{\\} or C{]},
    control character, domain literal).
    """
    tokens: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == "(":
            depth = 0
            while i < n:
                if text[i] == "\\":
                    i += 1
                elif text[i] == "(":
                    depth += 1
                elif text[i] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            if i >= n:
                return None
            i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                return None
            tokens.append(text[i : j + 1])
            i = j + 1
        elif c in "<>:;@,.":
            tokens.append(c)
            i += 1
        elif c in ")[]\\" or not c.isprintable():
            return None
        else:
            j = i
            while j < n and text[j] not in _ATOM_END and text[j].isprintable():
                j += 1
            tokens.append(text[i:j])
            i = j
    return tokens


def _is_word(token: str) -> bool:
    return token not in ("<", ">", ":", ";", "@", ",", ".")


class _AddressParser:
    """A strict recursive-descent parser over L{_tokens}."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, token: str) -> bool:
        if self.peek() == token:
            self.pos += 1
            return True
        return False

    def phrase(self) -> int:
        """Skip a display name (obs-phrase: words and dots); how many tokens."""
        start = self.pos
        while (token := self.peek()) is not None and (_is_word(token) or token == "."):
            self.pos += 1
        return self.pos - start

    def addr_spec(self) -> str | None:
        """C{local@domain}: words joined by dots, then atoms joined by dots."""
        local = self.dotted(allow_quoted=True)
        if local is None or not self.take("@"):
            return None
        domain = self.dotted(allow_quoted=False)
        return None if domain is None else f"{local}@{domain}"

    def dotted(self, allow_quoted: bool) -> str | None:
        parts = []
        while True:
            token = self.peek()
            if token is None or not _is_word(token) or (token.startswith('"') and not allow_quoted):
                return None
            parts.append(token)
            self.pos += 1
            if not self.take("."):
                return ".".join(parts)

    def mailbox(self) -> str | None:
        start = self.pos
        self.phrase()
        if self.take("<"):
            address = self.addr_spec()
            return address if address is not None and self.take(">") else None
        self.pos = start
        return self.addr_spec()

    def address_list(self) -> list[str] | None:
        """Every mailbox of the list (group members included); None on any error."""
        addresses: list[str] = []
        while self.peek() is not None:
            if self.take(","):
                continue  # obs-addr-list: empty elements are allowed
            start = self.pos
            if self.phrase() and self.take(":"):
                while not self.take(";"):
                    if self.take(","):
                        continue
                    address = self.mailbox()
                    if address is None:
                        return None
                    addresses.append(address)
                    if self.peek() not in (",", ";"):
                        return None
            else:
                self.pos = start
                address = self.mailbox()
                if address is None:
                    return None
                addresses.append(address)
            if self.peek() not in (",", None):
                return None
        return addresses


def parse_address_list(value: str) -> tuple[str, ...] | None:
    """
    The addresses (C{local@domain}, as written) of an RFC 5322 address
    list such as a C{From:} value, display names, comments and groups
    allowed; None when it is not one.

    Strict where L{email.utils.getaddresses} guesses: C{a@b@c}, C{@c},
    C{a@}, C{a@b..c}, C{a b@c} and a route C{<@r:a@b>} are errors, never
    mangled into some other address.  A domain literal (C{a@[192.0.2.1]})
    is an error too: no user may be authorized for one.
    """
    tokens = _tokens(value)
    if tokens is None:
        return None
    addresses = _AddressParser(tokens).address_list()
    return None if addresses is None else tuple(addresses)


class RecordsRefusals(Protocol):
    """Where a refusal by the sender rules is recorded: L{Refusals}, or a worker's link to the coordinator's."""

    def record(self, user: str, mail_from: str, header_from: str, subject: str, detail: str) -> None:
        """Record one refused message; returns at once."""

    def recipient(self, user: str, mail_from: str) -> None:
        """Count one refused recipient; returns at once."""


class Refusals:
    """
    Records a refusal by the sender rules: one C{sender_domain} event and
    one C{rejected} count.  Either recorder may be None; their failures are
    logged, never turned into a different SMTP reply.
    """

    def __init__(self, events: IEventRecorder | None, stats: IStatsRecorder | None) -> None:
        self._events = events
        self._stats = stats

    def record(self, user: str, mail_from: str, header_from: str, subject: str, detail: str) -> None:
        """Record one refused message; returns at once."""
        if self._events is not None:
            maybeDeferred(self._events.record, EventType.SENDER_DOMAIN, user, None, detail).addErrback(
                lambda f: log.failure("recording a sender_domain event failed", f)
            )
        if self._stats is not None:
            maybeDeferred(self._stats.rejected, user, mail_from, header_from, subject).addErrback(
                lambda f: log.failure("counting a rejected message failed", f)
            )

    def recipient(self, user: str, mail_from: str) -> None:
        """Count one refused recipient (a suppressed one) as C{rejected}; returns at once."""
        if self._stats is not None:
            maybeDeferred(self._stats.rejected, user, mail_from, "", None).addErrback(
                lambda f: log.failure("counting a rejected recipient failed", f)
            )


def unauthorized(addresses: Iterable[str], rules: SenderRules) -> list[str]:
    """The addresses in C{addresses} that C{rules} does not authorize."""
    return [a for a in addresses if not rules.authorizes(a)]
