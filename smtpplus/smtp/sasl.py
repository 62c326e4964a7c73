"""
SASL for SMTP AUTH (RFC 4954): the mechanisms offered, each a
challenge/response credentials class from C{twisted.mail}, and their base64
wire form.

Only mechanisms that end in a username and a password are offered: the user
store keeps bcrypt hashes, against which CRAM-MD5 or SCRAM cannot be checked.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from twisted.cred.credentials import IUsernamePassword
from twisted.mail.imap4 import IllegalClientResponse, PLAINCredentials
from twisted.mail.interfaces import IChallengeResponse
from twisted.mail.smtp import LOGINCredentials

from smtpplus.smtp.interfaces import SMTPReply

# Mechanism name -> credentials, in the order the EHLO reply lists them.
# Each provides IChallengeResponse and IUsernamePassword; LOGIN's challenges
# are "Username:" and "Password:", as every client expects.
MECHANISMS: dict[bytes, Callable[[], IChallengeResponse]] = {
    b"PLAIN": PLAINCredentials,
    b"LOGIN": LOGINCredentials,
}

# The EHLO keyword line.
EXTENSION = "AUTH " + " ".join(name.decode("ascii") for name in MECHANISMS)


class SASLExchange:
    """
    One AUTH exchange: the challenges of one mechanism and the client's
    responses, until the credentials are complete.

    @ivar mechanism: the mechanism's name, e.g. C{b"PLAIN"}.
    @ivar challenge: the challenge to send next, base64-encoded.
    """

    def __init__(self, mechanism: bytes) -> None:
        """
        @raise KeyError: C{mechanism} is not in L{MECHANISMS}.
        """
        self.mechanism = mechanism
        self._credentials = MECHANISMS[mechanism]()
        # Taken now even when an initial response answers it: LOGIN's
        # credentials count the challenges they hand out.
        self.challenge = _encode(self._credentials.getChallenge())

    @property
    def credentials(self) -> IUsernamePassword:
        """The username and password given, once L{respond} returned True."""
        return IUsernamePassword(self._credentials)

    def respond(self, line: bytes) -> bool:
        """
        Take the client's response line to L{challenge}.

        @return: True when the credentials are complete, False when
            L{challenge} now holds the next challenge.
        @raise SMTPReply: C{501} when the client cancelled with C{*}, or when
            the response is not base64 or not what the mechanism expects.
        """
        line = line.strip()
        if line == b"*":
            raise SMTPReply(501, "5.0.0", "Authentication cancelled")
        try:
            # "=" is the empty response (RFC 4954 section 4).
            response = base64.b64decode(line, validate=True) if line != b"=" else b""
        except (binascii.Error, ValueError):
            raise SMTPReply(501, "5.5.2", "Cannot decode response") from None
        try:
            self._credentials.setResponse(response)
        except IllegalClientResponse:
            raise SMTPReply(501, "5.5.2", f"Malformed {self.mechanism.decode('ascii')} response") from None
        if self._credentials.moreChallenges():
            self.challenge = _encode(self._credentials.getChallenge())
            return False
        return True


def _encode(challenge: bytes) -> str:
    return base64.b64encode(challenge).decode("ascii")
