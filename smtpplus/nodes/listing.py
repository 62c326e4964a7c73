"""
What C{GET /api/v1/nodes} answers (contract section 5): the nodes sharing
this store, each C{{"name", "workers", "started_at", "last_seen",
"queued", "sending"}}.

With SQLite there is one node, this one.  With PostgreSQL every node's
heartbeat row (L{smtpplus.nodes.heartbeat}) is listed, with the active
messages each one claims, counted in the same query.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from smtpplus.interfaces import INodeList
from smtpplus.model import MessageStatus, iso_utc

# Active but not in an attempt: what "queued" counts.
WAITING = (MessageStatus.QUEUED.value, MessageStatus.SCHEDULED.value, MessageStatus.DEFERRED.value)
SENDING = MessageStatus.SENDING.value

_NODES = """
SELECT n.name, n.workers, n.started_at, n.last_seen, COALESCE(c.queued, 0), COALESCE(c.sending, 0)
FROM nodes n LEFT JOIN (
    SELECT claimed_by,
           COUNT(*) FILTER (WHERE status = ANY(%(waiting)s)) AS queued,
           COUNT(*) FILTER (WHERE status = %(sending)s) AS sending
    FROM queue_messages
    WHERE status = ANY(%(active)s) AND claimed_by IS NOT NULL
    GROUP BY claimed_by
) c ON c.claimed_by = n.name
ORDER BY n.name
"""


def node_json(name: str, workers: int, started_at: float, last_seen: float, queued: int, sending: int) -> dict[str, Any]:
    """One entry of the list, times as the rest of the API gives them (ISO 8601 UTC)."""
    return {
        "name": name,
        "workers": workers,
        "started_at": iso_utc(started_at),
        "last_seen": iso_utc(last_seen),
        "queued": queued,
        "sending": sending,
    }


@implementer(INodeList)
class SingleNode:
    """
    The one node of an SQLite store: this process, seen now, with the
    queue's counts (C{count_active}: messages per active status and
    priority, as the metrics read them).
    """

    def __init__(
        self,
        clock: IReactorTime,
        name: str,
        workers: int,
        started_at: float,
        count_active: Callable[[], Deferred[Mapping[tuple[str, int], int]]],
    ) -> None:
        self._clock = clock
        self._name = name
        self._workers = workers
        self._started_at = started_at
        self._count_active = count_active

    def nodes(self) -> Deferred[list[dict[str, Any]]]:
        def listed(counts: Mapping[tuple[str, int], int]) -> list[dict[str, Any]]:
            queued = sum(n for (status, _), n in counts.items() if status in WAITING)
            sending = sum(n for (status, _), n in counts.items() if status == SENDING)
            now = self._clock.seconds()
            return [node_json(self._name, self._workers, self._started_at, now, queued, sending)]

        return self._count_active().addCallback(listed)


def list_nodes(conn: Any) -> list[dict[str, Any]]:
    """Database thread: every node's row with its claimed messages' counts, by name."""
    rows = conn.execute(
        _NODES, {"waiting": list(WAITING), "sending": SENDING, "active": [*WAITING, SENDING]}
    ).fetchall()
    return [node_json(*row) for row in rows]


@implementer(INodeList)
class PostgresNodes:
    """The nodes sharing a PostgreSQL store, from their heartbeats (C{nodes}) and claims."""

    def __init__(self, database: Any) -> None:
        self._database = database

    def nodes(self) -> Deferred[list[dict[str, Any]]]:
        return self._database.run(list_nodes)
