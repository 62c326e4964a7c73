"""
Which message is delivered next.

Ready messages wait in memory, one heap of arrival numbers per (priority,
user); within a priority the users take turns, so one user's flood cannot
starve another's mail, and a message of a higher priority always starts
before any of lower priority that has not started yet.  Messages waiting
for a retry or a schedule sit on timers of the injected clock.  Started
attempts take turns, in the same order, for the slots that bound the
transfers to next hops.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# An attempt that fails unexpectedly (a bug, not a delivery result) is
# tried again after this long rather than lost or retried in a tight loop.
FAILED_ATTEMPT_RETRY = 60.0
# Attempts in flight per delivery slot: while max_concurrency of them talk
# to next hops, the others load their message or record their result.
IN_FLIGHT_PER_SLOT = 4
# Past that bound, a message still starts when its priority is higher than
# that of every attempt waiting for a slot, up to this many per slot.
IN_FLIGHT_PER_SLOT_URGENT = 5


@attrs.frozen
class Job:
    """One queued message as the scheduler sees it."""

    id: str
    priority: int
    seq: int
    user: str | None


class _Level:
    """The ready messages of one priority: a heap per user, users in turn."""

    def __init__(self) -> None:
        self.heaps: dict[str | None, list[tuple[int, str]]] = {}
        self.turns: deque[str | None] = deque()
        self.size = 0

    def push(self, job: Job) -> None:
        heap = self.heaps.get(job.user)
        if heap is None:
            heap = self.heaps[job.user] = []
            self.turns.append(job.user)
        heapq.heappush(heap, (job.seq, job.id))
        self.size += 1

    def pop(self) -> str:
        user = self.turns.popleft()
        heap = self.heaps[user]
        _, message_id = heapq.heappop(heap)
        if heap:
            self.turns.append(user)
        else:
            del self.heaps[user]
        self.size -= 1
        return message_id

    def remove(self, job: Job) -> None:
        """Take a ready C{job} out of its turn (an administrator deleted it)."""
        heap = self.heaps[job.user]
        heap.remove((job.seq, job.id))
        heapq.heapify(heap)
        if not heap:
            del self.heaps[job.user]
            self.turns.remove(job.user)
        self.size -= 1


class Scheduler:
    """
    Starts deliveries by priority, arrival and fair turns, at most
    C{rate_limit} per second (0: unlimited), and lets at most
    C{max_concurrency} of them talk to next hops at once.

    C{deliver(message_id)} returns a Deferred firing with the time of the
    next attempt, or None when the message is finished.  An attempt asks
    for a slot (L{acquire}) once its message is loaded, read and signed, and
    gives it back (L{release}) when the next hop has answered: loading and
    recording wait for the disk and the database, and holding a slot
    meanwhile left the next hop idle (a backlog drained at the pace of the
    database thread, not of the transfers).  Slots go to waiting attempts
    in priority and start order.  At most L{IN_FLIGHT_PER_SLOT} times
    C{max_concurrency} attempts are in flight, which also bounds the
    results waiting to be stored while the store is down (a delivery whose
    result is lost in a crash is made again); a message of a higher
    priority than every attempt waiting for a slot starts all the same (up
    to L{IN_FLIGHT_PER_SLOT_URGENT} times C{max_concurrency}), so that it
    overtakes them.

    @ivar started: how many attempts were started (observable in tests).
    @ivar holding: the attempts holding a slot.
    """

    def __init__(
        self,
        clock: IReactorTime,
        deliver: Callable[[str], Deferred[float | None]],
        max_concurrency: int,
        rate_limit: float = 0,
    ) -> None:
        self._clock = clock
        self._deliver = deliver
        self.max_concurrency = max_concurrency
        self._interval = 1.0 / rate_limit if rate_limit else 0.0
        self._levels = {priority: _Level() for priority in range(1, 6)}
        self._jobs: dict[str, Job] = {}
        self._timers: dict[str, IDelayedCall] = {}
        self.in_flight: dict[str, Deferred[Any]] = {}
        # Attempts in flight: their job and start number.
        self._attempts: dict[str, tuple[Job, int]] = {}
        self.holding: set[str] = set()
        # Attempts waiting for a slot: a heap of (priority, start number, id),
        # so within a priority the slots follow the start order and its fair
        # turns; and each one's Deferred.  An attempt that ends leaves the
        # waiters at once and the heap when its entry comes up.
        self._slot_turns: list[tuple[int, int, str]] = []
        self._slot_waiters: dict[str, Deferred[None]] = {}
        # Jobs added again while their attempt was in flight -> not_before.
        self._queued_again: dict[str, float | None] = {}
        self._next_start = 0.0
        self._wakeup: IDelayedCall | None = None
        self._running = False
        self._pumping = False
        self._again = False
        self.started = 0

    def add(self, job: Job, not_before: float | None = None) -> None:
        """
        Queue C{job}, now or at C{not_before}; a job already queued is
        ignored.  A job whose attempt is in flight is queued again when that
        attempt ends without a retry time (the queue was rebuilt meanwhile).
        """
        if job.id in self._jobs:
            return
        if job.id in self.in_flight:
            self._queued_again[job.id] = not_before
            return
        self._jobs[job.id] = job
        delay = (not_before - self._clock.seconds()) if not_before is not None else 0.0
        if delay > 0:
            self._timers[job.id] = self._clock.callLater(delay, self._due, job.id)
            return
        self._levels[job.priority].push(job)
        self._pump()

    def hurry(self, job: Job) -> None:
        """
        Start C{job} as soon as a delivery slot is free: a job waiting on a
        timer (a retry, a schedule) leaves it, a job unknown here is added,
        a ready or in-flight one is left as it is.
        """
        timer = self._timers.pop(job.id, None)
        if timer is not None:
            timer.cancel()
            self._levels[self._jobs[job.id].priority].push(self._jobs[job.id])
            self._pump()
        elif job.id not in self._jobs and job.id not in self.in_flight:
            self.add(job)

    def remove(self, message_id: str) -> tuple[Job, float | None] | None:
        """
        Forget a waiting job, ready or on a timer, so that it does not
        start.  Returns it and the time it was due (None: it was ready), to
        L{add} back if need be; None when it is not waiting here (unknown,
        or its attempt is in flight).
        """
        job = self._jobs.pop(message_id, None)
        if job is None:
            return None
        timer = self._timers.pop(message_id, None)
        if timer is not None:
            due = timer.getTime()
            timer.cancel()
            return job, due
        self._levels[job.priority].remove(job)
        return job, None

    def _due(self, message_id: str) -> None:
        del self._timers[message_id]
        job = self._jobs[message_id]
        self._levels[job.priority].push(job)
        self._pump()

    def acquire(self, message_id: str) -> Deferred[None]:
        """Fires when C{message_id}'s attempt may talk to the next hop, a slot being its own until L{release}."""
        d: Deferred[None] = Deferred()
        attempt = self._attempts.get(message_id)
        if attempt is None:
            raise KeyError(f"no attempt of {message_id} is in flight")
        job, number = attempt
        self._slot_waiters[message_id] = d
        heapq.heappush(self._slot_turns, (job.priority, number, message_id))
        self._grant()
        return d

    def release(self, message_id: str) -> None:
        """C{message_id}'s attempt is done with the next hop: its slot goes to the next attempt waiting."""
        if message_id in self.holding:
            self.holding.discard(message_id)
            self._grant()
            # Who waits for a slot changed, and with it who may overtake them.
            self._pump()

    def _grant(self) -> None:
        while self._slot_turns and len(self.holding) < self.max_concurrency:
            _, _, message_id = heapq.heappop(self._slot_turns)
            d = self._slot_waiters.pop(message_id, None)
            if d is not None:
                self.holding.add(message_id)
                d.callback(None)

    def reconfigure(self, max_concurrency: int, rate_limit: float) -> None:
        """Apply a reloaded C{max_concurrency} and C{rate_limit}; attempts in flight go on."""
        self.max_concurrency = max_concurrency
        self._interval = 1.0 / rate_limit if rate_limit else 0.0
        self._grant()
        self._pump()

    def ready_count(self) -> int:
        """How many messages wait for a delivery slot."""
        return sum(level.size for level in self._levels.values())

    def start(self) -> None:
        """Begin starting deliveries."""
        self._running = True
        self._pump()

    def stop(self) -> Deferred[None]:
        """
        Start nothing more and drop the timers; fires when the attempts in
        flight have ended (the caller bounds the wait).
        """
        self._running = False
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        return DeferredList([_observe(d) for d in self.in_flight.values()]).addCallback(lambda _: None)

    def _pump(self) -> None:
        # Re-entrancy guard: a delivery may finish synchronously and call
        # back into _pump while it is looping.
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._start_ready()
        finally:
            self._pumping = False

    def _start_ready(self) -> None:
        while self._running:
            priority, level = next(((p, lv) for p, lv in sorted(self._levels.items()) if lv.size), (0, None))
            if level is None or not self._may_start(priority):
                return
            if self._interval:
                now = self._clock.seconds()
                if now < self._next_start:
                    if self._wakeup is None or not self._wakeup.active():
                        self._wakeup = self._clock.callLater(self._next_start - now, self._pump)
                    return
                self._next_start = max(now, self._next_start) + self._interval
            message_id = level.pop()
            job = self._jobs.pop(message_id)
            self.started += 1
            self._attempts[message_id] = (job, self.started)
            d = maybeDeferred(self._deliver, message_id)
            self.in_flight[message_id] = d
            d.addBoth(self._finished, job)

    def _may_start(self, priority: int) -> bool:
        flying = len(self.in_flight)
        if flying < IN_FLIGHT_PER_SLOT * self.max_concurrency:
            return True
        if flying >= IN_FLIGHT_PER_SLOT_URGENT * self.max_concurrency or not self._slot_waiters:
            return False
        # The heap's first entry has the highest priority waiting (or ended,
        # which errs towards not starting).
        return priority < self._slot_turns[0][0]

    def _finished(self, result: float | None | Failure, job: Job) -> None:
        self.in_flight.pop(job.id, None)
        self._attempts.pop(job.id, None)
        self._slot_waiters.pop(job.id, None)
        # Its slot, if it still held one (the _pump below starts what may start).
        self.holding.discard(job.id)
        self._grant()
        again = job.id in self._queued_again
        not_before = self._queued_again.pop(job.id, None) if again else None
        if isinstance(result, Failure):
            log.failure("delivery attempt of {id} failed", result, id=job.id)
            result = self._clock.seconds() + FAILED_ATTEMPT_RETRY
        if self._running:
            if result is not None:
                self.add(job, result)
            elif again:
                self.add(job, not_before)
        self._pump()


def _observe(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires (with None) when C{d} does, leaving C{d} alone."""
    observer: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        observer.callback(None)
        return result

    d.addBoth(fire)
    return observer
