"""
Brute-force throttling of SMTP AUTH.

Failures are counted per client IP and per username over a sliding window
of ten minutes.  Each failure answers a little later than the one before
(up to L{MAX_DELAY}); reaching the configured count locks the IP or the
username for C{auth_lock_seconds}, during which every attempt is refused
without checking the password.  Locks expire by themselves.

Anyone who knows a username could otherwise lock its owner out, so the
username lock does not apply to the addresses from which that user logged
in successfully within the last 24 hours (L{KnownAddresses}); those keep the
per-IP limit only.  The record lives in this process's memory: a restart
forgets it, and until the user logs in again the username lock applies to
every address.
"""

from __future__ import annotations

from collections import OrderedDict, deque
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
KNOWN_SECONDS = 24 * 3600.0
# Bounds on the known-address record: only successful logins add to it, so
# it grows with real use, not with an attack; the per-user cap keeps one
# account that logs in from everywhere from pushing out everyone else's.
MAX_KNOWN = 100_000
MAX_KNOWN_PER_USER = 256


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


class KnownAddresses:
    """
    The client addresses each username logged in from successfully within
    C{max_age} seconds, at most C{max_entries} in all and C{max_per_user}
    per username; beyond either cap the least recent entry goes.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_age: float = KNOWN_SECONDS,
        max_entries: int = MAX_KNOWN,
        max_per_user: int = MAX_KNOWN_PER_USER,
    ) -> None:
        self._clock = clock
        self._max_age = max_age
        self._max_entries = max_entries
        self._max_per_user = max_per_user
        # (username, ip) -> last success, least recent first; and per
        # username its addresses in the same order, to evict per user.
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._by_user: dict[str, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, username: str, ip: str) -> None:
        """Record a successful login of C{username} (already case-folded) from C{ip} now."""
        now = self._clock.seconds()
        self._expire(now)
        key = (username, ip)
        addresses = self._by_user.setdefault(username, OrderedDict())
        self._seen[key] = now
        self._seen.move_to_end(key)
        addresses[ip] = None
        addresses.move_to_end(ip)
        if len(addresses) > self._max_per_user:
            self._forget(username, next(iter(addresses)))
        if len(self._seen) > self._max_entries:
            self._forget(*next(iter(self._seen)))

    def __contains__(self, key: tuple[str, str]) -> bool:
        """Whether C{(username, ip)} logged in successfully within the last C{max_age} seconds."""
        when = self._seen.get(key)
        return when is not None and when > self._clock.seconds() - self._max_age

    def _expire(self, now: float) -> None:
        while self._seen:
            key, when = next(iter(self._seen.items()))
            if when > now - self._max_age:
                return
            self._forget(*key)

    def _forget(self, username: str, ip: str) -> None:
        del self._seen[username, ip]
        addresses = self._by_user[username]
        del addresses[ip]
        if not addresses:
            del self._by_user[username]


def report_locks(
    username: str, ip: str, known_user: bool, ip_locks: bool, user_locks: bool, lock_seconds: float, events: Any
) -> None:
    """
    Log the locks a failure just set, and record the C{account_block}
    event of a known username locked (unknown ones are locked alike, so
    that locking reveals nothing, but record no event).  For every throttle.
    """
    if ip_locks:
        log.warn("AUTH from {ip} locked for {seconds} s after repeated failures", ip=ip, seconds=lock_seconds)
    if not user_locks:
        return
    log.warn(
        "AUTH for username {username!r} locked for {seconds} s after repeated failures",
        username=username,
        seconds=lock_seconds,
    )
    if known_user and events is not None:
        detail = f"Too many failed logins for {username}; the last from {ip}. Logins are refused for {lock_seconds} seconds."
        d = events.record("account_block", username, None, detail)
        if d is not None and hasattr(d, "addErrback"):
            d.addErrback(lambda f: log.failure("recording account_block failed", f))


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
        self.known = KnownAddresses(clock)

    def reconfigure(self, security: SecurityConfig) -> None:
        """Apply a reloaded C{[security]}: counts already made are kept, locks in force run out."""
        for tracker, limit in ((self._ips, security.auth_failures_per_ip), (self._users, security.auth_failures_per_user)):
            tracker.limit = limit
            tracker.lock_seconds = security.auth_lock_seconds
            for key, times in tracker.failures.items():
                tracker.failures[key] = deque(times, maxlen=limit)
        self._lock_seconds = security.auth_lock_seconds

    def _trusted(self, username: str, ip: str) -> bool:
        return (username.casefold(), ip) in self.known

    def refused(self, username: str, ip: str) -> bool:
        """Whether an attempt for C{username} from C{ip} must be refused now."""
        now = self._clock.seconds()
        if self._ips.locked(ip, now):
            return True
        return self._users.locked(username.casefold(), now) and not self._trusted(username, ip)

    def failure_delay(self, username: str, ip: str) -> float:
        """Seconds to wait before answering a failure, growing with recent failures."""
        now = self._clock.seconds()
        count = self._ips.recent(ip, now)
        if not self._trusted(username, ip):
            count = max(count, self._users.recent(username.casefold(), now))
        return min(self._max_delay, self._first_delay * 2**count)

    def failed(self, username: str, ip: str, known_user: bool) -> float:
        """
        Count one failed attempt; return how long to wait before answering
        it (L{failure_delay} before this failure counted).  Unknown usernames are locked like known
        ones (so locking reveals nothing) but record no event.  A failure
        from an address the user logged in from recently counts for the IP
        only: the username lock does not apply there, and the user's own
        mistyped client should not lock the username everywhere else.
        """
        delay = self.failure_delay(username, ip)
        now = self._clock.seconds()
        ip_locks = self._ips.fail(ip, now)
        user_locks = not self._trusted(username, ip) and self._users.fail(username.casefold(), now)
        report_locks(username, ip, known_user, ip_locks, user_locks, self._lock_seconds, self._events)
        return delay

    def succeeded(self, username: str, ip: str) -> None:
        """
        A correct login forgives the username's earlier typos (not the
        IP's) and makes C{ip} a known address of the user for 24 hours.
        """
        folded = username.casefold()
        self._users.clear(folded)
        self.known.add(folded, ip)
