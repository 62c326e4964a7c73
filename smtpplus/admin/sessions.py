"""
The web console's sign-in sessions (contract section 7): a table in the
admin process's memory from a random session id (the cookie) to its CSRF
token and times.  A session ends at sign-out, after L{IDLE_SECONDS} without
a request, or L{ABSOLUTE_SECONDS} after sign-in, whichever comes first;
a restart of the daemon signs everybody out.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from enum import Enum
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

COOKIE = b"smtpplus_console"
CSRF_HEADER = b"X-CSRF-Token"
IDLE_SECONDS = 8 * 3600
ABSOLUTE_SECONDS = 12 * 3600
MAX_SESSIONS = 64

# What a cross-site page can make a browser send without the CSRF token.
_SAFE_METHODS = frozenset({b"GET", b"HEAD"})


class Admission(Enum):
    """What a request's console credentials are worth."""

    NONE = "none"  # no session cookie, or one that is unknown or expired
    ADMITTED = "admitted"
    NO_CSRF = "no_csrf"  # a live session, but a state-changing request without its CSRF token


@attrs.define
class Session:
    """One signed-in console: its cookie value, CSRF token and times (reactor seconds)."""

    id: str
    csrf: str
    started: float
    last_used: float


class ConsoleSessions:
    """
    The session table.  At most L{MAX_SESSIONS} live at once: signing in
    beyond that ends the least recently used, so that repeated sign-ins
    cannot grow the table without bound.
    """

    def __init__(
        self,
        clock: IReactorTime,
        idle: float = IDLE_SECONDS,
        absolute: float = ABSOLUTE_SECONDS,
        limit: int = MAX_SESSIONS,
    ) -> None:
        self._clock = clock
        self._idle = idle
        self._absolute = absolute
        self._limit = limit
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    @property
    def lifetime(self) -> float:
        """The longest a session lives, for the cookie's C{Max-Age}."""
        return self._absolute

    def open(self) -> Session:
        """A new session with fresh random id and CSRF token."""
        now = self._clock.seconds()
        self._sweep(now)
        while len(self._sessions) >= self._limit:
            self._sessions.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        self._sessions[session.id] = session
        return session

    def find(self, session_id: str) -> Session | None:
        """The live session C{session_id}, its idle time restarted; None if unknown or expired."""
        now = self._clock.seconds()
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if self._expired(session, now):
            del self._sessions[session_id]
            return None
        session.last_used = now
        self._sessions.move_to_end(session_id)
        return session

    def close(self, session_id: str) -> None:
        """End the session C{session_id} (sign-out); nothing if there is none."""
        self._sessions.pop(session_id, None)

    def of_request(self, request: Any) -> Session | None:
        """The live session whose id the request's cookie carries."""
        value = request.getCookie(COOKIE)
        if not value:
            return None
        try:
            return self.find(value.decode("ascii"))
        except UnicodeDecodeError:
            return None

    def admit(self, request: Any) -> Admission:
        """
        Whether the request's session cookie admits it: a request that may
        change state (any method but GET and HEAD) also needs the session's
        CSRF token in its C{X-CSRF-Token} header.
        """
        session = self.of_request(request)
        if session is None:
            return Admission.NONE
        if request.method in _SAFE_METHODS:
            return Admission.ADMITTED
        presented = request.getHeader(CSRF_HEADER) or b""
        if hmac.compare_digest(presented.strip(), session.csrf.encode("ascii")):
            return Admission.ADMITTED
        return Admission.NO_CSRF

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_used >= self._idle or now - session.started >= self._absolute

    def _sweep(self, now: float) -> None:
        for session_id in [s.id for s in self._sessions.values() if self._expired(s, now)]:
            del self._sessions[session_id]
