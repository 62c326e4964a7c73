"""
The session registry: every live SMTP session across all listening ports,
the daemon-wide and per-IP connection limits, and the drain on shutdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

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


SHUTTING_DOWN = "421 4.3.2 Service shutting down"


def limit_refusal(settings: SessionSettings, sessions: int, from_ip: int) -> str | None:
    """Why one more connection is refused when C{sessions} are open, C{from_ip} of them from its address; or None."""
    if sessions >= settings.max_connections:
        return "421 4.7.0 Too many connections, try again later"
    if from_ip >= settings.max_connections_per_ip:
        return "421 4.7.0 Too many connections from your address, try again later"
    return None


class NodeLimits(Protocol):
    """
    The connection limits of a node whose sessions are spread over worker
    processes: the coordinator counts every worker's connections.
    """

    def admit(self, ip: str) -> Deferred[str | None]:
        """Take a slot for a connection from C{ip}; fires with why not, or None."""

    def release(self, ip: str) -> None:
        """Give back a slot L{admit} gave."""


class SessionRegistry:
    """
    Every live session across all listening ports: enforces the daemon-wide
    and per-IP connection limits and drains sessions on shutdown.

    @ivar metrics: where the sessions count accepted and refused messages.
    @ivar worker: which process serves these sessions, for the session log
        (0: the daemon's only process; 1 to N: an SMTP worker).
    @ivar node: in a worker, the node-wide limits every session is admitted
        by before its greeting; None in a single process, where this
        registry's own counts are the node's.
    """

    def __init__(
        self,
        settings: SessionSettings,
        clock: IReactorTime,
        metrics: Metrics = UNCOUNTED,
        worker: int = 0,
        node: NodeLimits | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = metrics
        self.worker = worker
        self.node = node
        self.sessions: set[SMTPSession] = set()
        self.per_ip: dict[str, int] = {}
        self.draining = False
        self._drained: Deferred[None] | None = None
        # Sessions holding one of the node's slots.
        self._node_slots: set[SMTPSession] = set()

    def admit(self, ip: str) -> str | None:
        """Return why a new connection from C{ip} must be refused, or None."""
        if self.draining:
            return SHUTTING_DOWN
        return limit_refusal(self.settings, len(self.sessions), self.per_ip.get(ip, 0))

    def admit_to_node(self, session: SMTPSession, ip: str) -> Deferred[str | None] | None:
        """
        In a worker: ask the node for a slot for C{session} (fires with why
        not, or None).  None when there is no node to ask (one process).
        """
        if self.node is None:
            return None
        node = self.node

        def admitted(refusal: str | None) -> str | None:
            if refusal is None:
                if session in self.sessions:
                    self._node_slots.add(session)
                else:
                    # The client left while the coordinator answered.
                    node.release(ip)
            return refusal

        def unanswered(_: object) -> str:
            return "421 4.3.0 Service temporarily unavailable, try again later"

        return node.admit(ip).addCallbacks(admitted, unanswered)

    def add(self, session: SMTPSession, ip: str) -> None:
        """Count C{session}, connected from C{ip}, until L{remove}."""
        self.sessions.add(session)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1

    def remove(self, session: SMTPSession, ip: str) -> None:
        """C{session}'s connection is gone."""
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        if session in self._node_slots and self.node is not None:
            self._node_slots.discard(session)
            self.node.release(ip)
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
