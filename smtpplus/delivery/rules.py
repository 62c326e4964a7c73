"""
Who may send as whom: the per-user sender rules, applied to the envelope
sender at C{MAIL FROM} and to the header C{From:} at the end of DATA.
"""

from __future__ import annotations

import email.utils
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

from smtpplus.auth.users import normalize_domain
from smtpplus.smtp.interfaces import SMTPReply

log = Logger()


def _items(value: Any) -> tuple[str, ...]:
    # The user store hands out lists; a ";"-separated string is tolerated
    # because that is what the admin API accepts on input.
    if isinstance(value, str):
        value = value.split(";")
    return tuple(item.strip() for item in value or () if item and item.strip())


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
    def from_user(cls, user: dict[str, Any]) -> SenderRules:
        """Build the rules from a user dict (contract section 4)."""
        # The store normalizes already; doing it again is cheap and keeps
        # rules built from other sources (tests, older rows) comparable.
        return cls(
            senders=frozenset(address_key(a) for a in _items(user.get("authorized_senders")) if "@" in a),
            domains=frozenset(_domain_key(d) for d in _items(user.get("authorized_domains"))),
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
    fields, or one without a readable address, are refused with 550 5.7.1.
    An absent field yields no addresses (the submitter adds one).
    """
    if len(values) > 1:
        raise SMTPReply(550, "5.7.1", "Message has more than one From: header")
    if not values:
        return []
    addresses = _addresses_of(values[0])
    if addresses is None:
        raise SMTPReply(550, "5.7.1", "From: header has no valid address")
    return list(addresses)


@functools.lru_cache(maxsize=4096)
def _addresses_of(value: str) -> tuple[str, ...] | None:
    # Bulk senders repeat one From: value, and the email package's address
    # parser costs more than all the rest of reading the header section.
    addresses = tuple(address for _, address in email.utils.getaddresses([value]) if address)
    if not addresses or any("@" not in a for a in addresses):
        return None
    return addresses


class Refusals:
    """
    Records a refusal by the sender rules: one C{sender_domain} event and
    one C{rejected} count.  Either recorder may be None; their failures are
    logged, never turned into a different SMTP reply.
    """

    def __init__(self, events: Any, stats: Any) -> None:
        self._events = events
        self._stats = stats

    def record(self, user: str, mail_from: str, header_from: str, subject: str, detail: str) -> None:
        """Record one refused message; returns at once."""
        if self._events is not None:
            maybeDeferred(self._events.record, "sender_domain", user, None, detail).addErrback(
                lambda f: log.failure("recording a sender_domain event failed", f)
            )
        if self._stats is not None:
            maybeDeferred(self._stats.rejected, user, mail_from, header_from, subject).addErrback(
                lambda f: log.failure("counting a rejected message failed", f)
            )


def unauthorized(addresses: Iterable[str], rules: SenderRules) -> list[str]:
    """The addresses in C{addresses} that C{rules} does not authorize."""
    return [a for a in addresses if not rules.authorizes(a)]
