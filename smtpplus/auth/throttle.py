"""
Brute-force throttling of SMTP AUTH.

Failures are counted per client IP and per username over a sliding window
of ten minutes.  Each failure answers a little later than the one before
(up to L{MAX_DELAY}); reaching the configured count locks the IP or the
username for C{auth_lock_seconds}, during which every attempt is refused
without checking the password.  Locks expire by themselves.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smtpplus.config import SecurityConfig

log = Logger()

WINDOW_SECONDS = 600.0
FIRST_DELAY = 0.25
MAX_DELAY = 2.0
# Keys (IPs, usernames) tracked before stale ones are swept, so that a
# spray of random usernames cannot grow memory without bound.
SWEEP_AT = 10000


class _Tracker:
    """Recent failure times and lock expiries for one kind of key."""

    def __init__(self, limit: int, lock_seconds: float) -> None:
        self.limit = limit
        self.lock_seconds = lock_seconds
        self.failures: dict[str, deque[float]] = {}
        self.locked_until: dict[str, float] = {}

    def recent(self, key: str, now: float) -> int:
        times = self.failures.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - WINDOW_SECONDS:
            times.popleft()
        if not times:
            del self.failures[key]
            return 0
        return len(times)

    def locked(self, key: str, now: float) -> bool:
        until = self.locked_until.get(key)
        if until is None:
            return False
        if until <= now:
            del self.locked_until[key]
            return False
        return True

    def fail(self, key: str, now: float) -> bool:
        """Count a failure; return True when it locks C{key} now."""
        if len(self.failures) >= SWEEP_AT:
            self.sweep(now)
        self.failures.setdefault(key, deque(maxlen=self.limit)).append(now)
        if self.recent(key, now) >= self.limit and not self.locked(key, now):
            self.locked_until[key] = now + self.lock_seconds
            # The lock replaces the count: after it, the key starts afresh.
            del self.failures[key]
            return True
        return False

    def clear(self, key: str) -> None:
        self.failures.pop(key, None)

    def sweep(self, now: float) -> None:
        for key in list(self.failures):
            self.recent(key, now)
        for key in list(self.locked_until):
            self.locked(key, now)


class LoginThrottle:
    """
    Tracks failed logins per IP and per username on an injected clock.

    @param events: an C{IEventRecorder} (or None) that receives an
        C{account_block} event when a known username is locked.
    @param first_delay: seconds before the first failure is answered; each
        recent failure doubles it, up to C{max_delay}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        security: SecurityConfig,
        events: Any = None,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
    ) -> None:
        self._clock = clock
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._events = events
        self._ips = _Tracker(security.auth_failures_per_ip, security.auth_lock_seconds)
        self._users = _Tracker(security.auth_failures_per_user, security.auth_lock_seconds)
        self._lock_seconds = security.auth_lock_seconds

    def refused(self, username: str, ip: str) -> bool:
        """Whether an attempt for C{username} from C{ip} must be refused now."""
        now = self._clock.seconds()
        return self._ips.locked(ip, now) or self._users.locked(username.casefold(), now)

    def failure_delay(self, username: str, ip: str) -> float:
        """Seconds to wait before answering a failure, growing with recent failures."""
        now = self._clock.seconds()
        count = max(self._ips.recent(ip, now), self._users.recent(username.casefold(), now))
        return min(self._max_delay, self._first_delay * 2**count)

    def failed(self, username: str, ip: str, known_user: bool) -> None:
        """
        Count one failed attempt.  Unknown usernames are locked like known
        ones (so locking reveals nothing) but record no event.
        """
        now = self._clock.seconds()
        if self._ips.fail(ip, now):
            log.warn("AUTH from {ip} locked for {seconds} s after repeated failures", ip=ip, seconds=self._lock_seconds)
        if self._users.fail(username.casefold(), now):
            log.warn(
                "AUTH for username {username!r} locked for {seconds} s after repeated failures",
                username=username,
                seconds=self._lock_seconds,
            )
            if known_user and self._events is not None:
                detail = (
                    f"Too many failed logins for {username}; the last from {ip}. "
                    f"Logins are refused for {self._lock_seconds} seconds."
                )
                d = self._events.record("account_block", username, None, detail)
                if d is not None and hasattr(d, "addErrback"):
                    d.addErrback(lambda f: log.failure("recording account_block failed", f))

    def succeeded(self, username: str, ip: str) -> None:
        """A correct login forgives the username's earlier typos (not the IP's)."""
        self._users.clear(username.casefold())
