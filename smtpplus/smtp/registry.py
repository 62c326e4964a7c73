"""
The session registry: every live SMTP session across all listening ports,
the daemon-wide and per-IP connection limits, and the drain on shutdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from smtpplus.metrics import UNCOUNTED, Metrics

if TYPE_CHECKING:
    from smtpplus.smtp.protocol import SMTPSession


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

    @ivar metrics: where the sessions count accepted and refused messages.
    """

    def __init__(self, settings: SessionSettings, clock: IReactorTime, metrics: Metrics = UNCOUNTED) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
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
        """Count C{session}, connected from C{ip}, until L{remove}."""
        self.sessions.add(session)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def remove(self, session: SMTPSession, ip: str) -> None:
        """C{session}'s connection is gone."""
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
