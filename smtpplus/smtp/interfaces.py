"""
The seam between the SMTP wire protocol and the logic behind it.

Twisted's C{IMessageDelivery} hands out one C{IMessage} per recipient and
fixes the final reply; a relay stores one message for all its recipients and
must answer with the queue id, so smtpplus uses these narrower interfaces.
The protocol knows only these; who may send what lives in the avatar.
"""

from __future__ import annotations

import attrs
from zope.interface import Attribute, Interface

from smtpplus.address import BadAddressSyntax, BadInternationalDomain, NonASCIILocalPart, envelope_mailbox


class SMTPReply(Exception):
    """
    Refuse the current command with this reply.

    @ivar code: the three-digit reply code.
    @ivar status: the RFC 3463 enhanced status code, e.g. C{"5.7.1"}.
    @ivar text: human-readable text, one line.
    @ivar reason: why a mail transaction is refused, for the metrics
        (C{"sender"}, C{"size"}, ...; see L{smtpplus.metrics.REFUSAL_REASONS}),
        or None.
    """

    def __init__(self, code: int, status: str, text: str, reason: str | None = None) -> None:
        super().__init__(code, status, text)
        self.code = code
        self.status = status
        self.text = text
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


# RFC 3463 enhanced status for a bad envelope address, by role.
ADDRESS_STATUS = {"sender": "5.1.7", "recipient": "5.1.3"}


def envelope_address(text: str, role: str) -> str:
    """
    Return the envelope mailbox C{text} in the form it is kept, shown and
    relayed in: a domain in Unicode becomes its IDNA A-label form (UTS #46),
    since the next hop need not speak SMTPUTF8 and nor do we.

    @param role: C{"sender"} or C{"recipient"}, for the reply.
    @raise SMTPReply: C{553 5.6.7} for a non-ASCII local part, C{553 5.1.7}
        (sender) or C{553 5.1.3} (recipient) for a domain that is not valid
        IDNA, C{501} with the same status for bad syntax.
    """
    status = ADDRESS_STATUS[role]
    try:
        return envelope_mailbox(text)
    except NonASCIILocalPart:
        raise SMTPReply(553, "5.6.7", "Non-ASCII local part needs SMTPUTF8, which is not offered") from None
    except BadInternationalDomain:
        raise SMTPReply(553, status, f"Bad {role} domain: not a valid internationalized domain name") from None
    except BadAddressSyntax:
        raise SMTPReply(501, status, f"Bad {role} address syntax") from None


class LoginThrottled(Exception):
    """Too many failed logins from this client or for this username: try later."""


class LoginUnavailable(Exception):
    """The accounts cannot be read now (the store is unavailable): try later."""


@attrs.frozen
class SessionInfo:
    """What the protocol knows about the client when a command is checked."""

    peer_ip: str
    local_port: int
    helo: str
    tls: bool


@attrs.frozen
class Envelope:
    """
    The envelope of one message, complete when DATA starts.

    @ivar mail_from: the reverse path, C{""} for the null sender.
    @ivar recipients: forward paths in RCPT order.
    @ivar mt_priority: the RFC 6710 C{MT-PRIORITY} parameter, or None.
    @ivar body: C{"7BIT"} or C{"8BITMIME"}.
    @ivar received: the C{Received:} header line this server prepends, CRLF-terminated.
    """

    session: SessionInfo
    mail_from: str
    recipients: tuple[str, ...]
    mt_priority: int | None
    body: str
    received: bytes


class IMessageWriter(Interface):
    """One incoming message being written, from DATA to the final dot."""

    def write(data: bytes) -> None:
        """
        Append message bytes (dot-unstuffed, CRLF line endings).  The total is
        bounded by the protocol's size limit before this is called.
        """

    def eomReceived():
        """
        The final dot arrived.  Return a Deferred that fires with the queue id
        once the message is durable, or fails with L{SMTPReply}.
        """

    def connectionLost() -> None:
        """The message was abandoned (size exceeded, connection lost): keep nothing."""


class ISubmitter(Interface):
    """
    The avatar of an authenticated SMTP user: what it may send and where its
    messages go.  Methods may return a value or a Deferred; refusing raises
    (or fails with) L{SMTPReply}.
    """

    username = Attribute("The authenticated username (str).")

    def validateFrom(session: SessionInfo, mail_from: str, mt_priority: int | None):
        """Check the envelope sender."""

    def validateTo(session: SessionInfo, mail_from: str, recipient: str):
        """Check one recipient."""

    def openMessage(envelope: Envelope) -> IMessageWriter:
        """Start receiving the message body for C{envelope}."""


class ILoginService(Interface):
    """Turns SMTP AUTH credentials into an L{ISubmitter}."""

    def login(username: str, password: str, peer_ip: str):
        """
        Return a Deferred firing with an L{ISubmitter}; fails with
        C{twisted.cred.error.UnauthorizedLogin} for wrong or disabled
        credentials, L{LoginThrottled} while the IP or username is locked,
        L{LoginUnavailable} while the accounts cannot be read.
        """
