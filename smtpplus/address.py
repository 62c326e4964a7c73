"""
Mailboxes and domains: RFC 5321 syntax and the IDNA forms kept, shown and
compared.

A leaf: imports nothing from smtpplus.  The SMTP session turns
L{AddressError} into its reply; the user validation turns C{ValueError}
into a field error; the sender rules compare with L{normalize_domain}.
"""

from __future__ import annotations

import re

import idna

_LOCAL_RE = re.compile(r'^(?:[A-Za-z0-9!#$%&\'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&\'*+/=?^_`{|}~-]+)*|"(?:[^"\\\r\n]|\\.)*")$')
_DOMAIN_RE = re.compile(r"^(?:\[[^\]\s]+\]|[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})?)*\.?)$")


class AddressError(ValueError):
    """An envelope address that cannot be used; the subclass says why."""


class NonASCIILocalPart(AddressError):
    """The local part is not ASCII, which needs SMTPUTF8."""


class BadInternationalDomain(AddressError):
    """The domain is Unicode but not a valid internationalized domain name."""


class BadAddressSyntax(AddressError):
    """The address is not an RFC 5321 mailbox."""


def _drop_source_route(text: str) -> str:
    if ":" in text and text.startswith("@"):
        return text.split(":", 1)[1]
    return text


def parse_mailbox(text: str) -> str | None:
    """
    Return C{local@domain} when C{text} is a valid RFC 5321 mailbox (a source
    route is dropped), else None.
    """
    text = _drop_source_route(text)
    local, at, domain = text.rpartition("@")
    if not at or not local or len(text) > 254 or len(local) > 64:
        return None
    if not _LOCAL_RE.match(local):
        return None
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.startswith("[") else domain
    except UnicodeError:
        return None
    if not _DOMAIN_RE.match(ascii_domain):
        return None
    return f"{local}@{domain}"


def envelope_mailbox(text: str) -> str:
    """
    Return the envelope mailbox C{text} in the form it is kept, shown and
    relayed in: a domain in Unicode becomes its IDNA A-label form (UTS #46),
    since the next hop need not speak SMTPUTF8 and nor do we.

    @raise NonASCIILocalPart: the local part is not ASCII.
    @raise BadInternationalDomain: a Unicode domain is not valid IDNA.
    @raise BadAddressSyntax: anything else that is not a mailbox.
    """
    local, at, domain = _drop_source_route(text).rpartition("@")
    if at and not local.isascii():
        raise NonASCIILocalPart(text)
    if at and not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError:
            raise BadInternationalDomain(text) from None
        text = f"{local}@{domain}"
    address = parse_mailbox(text)
    if address is None:
        raise BadAddressSyntax(text)
    return address


def normalize_domain(value: str) -> str:
    """
    Return C{value} as a lower-case IDNA A-label domain (C{Bücher.Example} ->
    C{xn--bcher-kva.example}); raise C{ValueError} when it is not a domain.
    """
    text = value.strip().rstrip(".")
    if not text or any(c.isspace() or c in "@[]/\\:" for c in text):
        raise ValueError(f"{value!r} is not a domain name")
    try:
        ascii_name = idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        raise ValueError(f"{value!r} is not a domain name ({e})") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or any(not label or len(label) > 63 for label in labels):
        raise ValueError(f"{value!r} is not a domain name")
    return ascii_name.lower()


def normalize_address(value: str) -> str:
    """
    Return the mailbox C{local@domain} with its domain normalized as by
    L{normalize_domain}; the local part is kept as written.
    """
    address = parse_mailbox(value.strip())
    if address is None or address.endswith("]"):
        raise ValueError(f"{value!r} is not an email address")
    local, _, domain = address.rpartition("@")
    return f"{local}@{normalize_domain(domain)}"
