"""
The priority budget (contract section 8): a user with C{priority_budget}
N sends at most N messages at priority 1 in any rolling hour; further ones
go at priority 2, and one C{priority_budget} event per user and hour tells
the administrators.

The decision reads the queue store (the count of the user's priority-1
messages of the last hour, through a partial index) and the event store
(the user's last such event), never per-process memory, so that sessions
in every process share one budget.  Two messages of one user ending DATA
at the same moment may both be counted under the budget before either is
stored: the budget can be exceeded by the number of that user's
simultaneous sessions, and two events can be recorded in that hour.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smtpplus.delivery.interfaces import IQueueStore
from smtpplus.interfaces import IEventQuery, IEventRecorder
from smtpplus.model import EventType

log = Logger()

WINDOW = 3600.0
# The priority a message over budget gets instead of 1.
DEMOTED = 2


class PriorityBudget:
    """
    Decides a priority-1 message's effective priority.

    @param events: records the C{priority_budget} events and finds the
        hour's last one: an L{IEventRecorder} that is an L{IEventQuery}
        too (the event store), else no event is recorded.
    """

    def __init__(self, clock: IReactorTime, store: IQueueStore, events: IEventRecorder | None = None) -> None:
        self._clock = clock
        self._store = store
        self._events = events if IEventQuery.providedBy(events) else None

    @inlineCallbacks
    def effective_priority(self, user: str, budget: int, notify: bool = True) -> Any:
        """
        Fire with 1 while C{user} has sent fewer than C{budget} messages at
        priority 1 in the last hour (or C{budget} is 0), else with
        L{DEMOTED}, recording the hour's C{priority_budget} event when it
        has none yet (unless C{notify} is false: a dry-run's question).
        """
        if budget <= 0:
            return 1
        now = self._clock.seconds()
        sent = yield self._store.count_urgent(user, now - WINDOW)
        if sent < budget:
            return 1
        if notify:
            yield self._notify(user, budget, now)
        return DEMOTED

    @inlineCallbacks
    def _notify(self, user: str, budget: int, now: float) -> Any:
        if self._events is None:
            return
        try:
            last = yield self._events.list_events(EventType.PRIORITY_BUDGET, user, 1)
            if last and _seconds(last[0]["created_at"]) > now - WINDOW:
                return
            yield maybeDeferred(
                self._events.record,
                EventType.PRIORITY_BUDGET,
                user,
                None,
                f"more than {budget} messages at priority 1 within an hour: further ones go at priority {DEMOTED}",
            )
        except Exception:
            # The message goes on at its demoted priority all the same.
            log.failure("recording a priority_budget event for {user} failed", user=user)


def _seconds(iso: str) -> float:
    """An event's C{created_at} (ISO 8601 UTC) in seconds since the epoch."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()

