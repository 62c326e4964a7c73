"""
What delivery needs from its collaborators, owned by delivery (the consumer):
the queue store, the next hop, and a way to run blocking work off the
reactor thread.  The wiring (L{smtpplus.tap}, the tests) picks the
implementations: SQLite or memory, a real relay or a fake, a thread pool or
synchronous calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Interface


class RunInThread(Protocol):
    """
    C{run_in_thread(fn, *args)}: call C{fn(*args)} where it may block (a
    worker thread) and fire the Deferred with its result on the reactor
    thread.  See L{smtpplus.delivery.threads}.
    """

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]: ...


class DeliverySlots(Protocol):
    """
    Bounds the attempts talking to next hops at once
    (L{smtpplus.delivery.scheduler.Scheduler}).
    """

    def acquire(self, message_id: str) -> Deferred[None]:
        """Fires when C{message_id}'s attempt holds a slot."""

    def release(self, message_id: str) -> None:
        """Give C{message_id}'s slot back (nothing when it holds none)."""


@attrs.frozen
class MessageFilter:
    """
    Which messages a listing shows; a field left None does not filter.
    C{user}, C{status}, C{campaign_code} match exactly; C{recipient} is one
    recipient's address (ASCII letters case-insensitive); C{created_at}
    runs from C{since} (inclusive) to C{until} (exclusive); C{before} is a
    page cursor: only C{seq} below it.
    """

    user: str | None = None
    status: str | None = None
    recipient: str | None = None
    campaign_code: str | None = None
    since: float | None = None
    until: float | None = None
    before: int | None = None


@attrs.frozen
class Duplicate:
    """What L{IQueueStore.insert} answers for a resent message: the id it was first accepted as."""

    first_id: str


class IQueueStore(Interface):
    """
    The queue records: one row per accepted message with its recipients.

    Messages are given as L{smtpplus.delivery.queue.NewMessage}; stored
    messages come back as dicts with the columns of C{queue_messages} and a
    C{recipients} list of dicts (C{idx}, C{address}, C{status},
    C{attempts}, C{last_response}, C{next_attempt}), in index order.
    Scheduling rows are dicts with C{id}, C{seq}, C{user}, C{priority} and
    C{next_attempt}.

    Writes are batched by the callers: L{insert} and L{write_state} each
    take one transaction for the whole batch (one sync for every message
    finishing together), never one per message.
    """

    def recover(now: float) -> list[dict[str, Any]]:
        """
        Synchronous, at start-up before the reactor runs: what was
        C{sending} goes back to C{queued} (or C{deferred} after attempts),
        and the scheduling rows of every active message are returned in
        arrival order.
        """

    def insert(messages: list[Any], dedup_window: float = 0) -> Deferred[list[int | Duplicate]]:
        """
        Insert new messages in one transaction (all or none); fires with
        their arrival sequence numbers, in order.

        With C{dedup_window} > 0, a message whose
        L{smtpplus.delivery.queue.dedup_key} matches one inserted at most
        that many seconds before its C{created_at} (the batch's own
        included) is not inserted: its answer is a L{Duplicate} of the
        first, whose C{duplicates} count grows by one.  Found through an
        index, not a scan.
        """

    def prune_dedup(before: float, limit: int) -> Deferred[int]:
        """Forget at most C{limit} dedup records older than C{before}; fires with how many."""

    def statuses(message_ids: list[str]) -> Deferred[dict[str, str]]:
        """The status of each of C{message_ids} that has a queue row."""

    def load_message(message_id: str) -> Deferred[dict[str, Any] | None]:
        """One message with its recipients, or None."""

    def load_for_attempts(message_ids: list[str]) -> Deferred[dict[str, dict[str, Any]]]:
        """
        L{load_message} of each of C{message_ids} for this node's delivery
        attempts, by id, in one trip: a message without a row, or not this
        node's to attempt (with stores shared by nodes, another node claimed
        it), is left out.
        """

    def list_messages(where: MessageFilter, limit: int) -> Deferred[list[dict[str, Any]]]:
        """At most C{limit} messages matching C{where}, newest (highest C{seq}) first."""

    def retry_message(message_id: str, now: float) -> Deferred[tuple[str, dict[str, Any]] | None]:
        """
        Make a scheduled or deferred message due at C{now}: its
        C{next_attempt} (and its deferred recipients') becomes C{now}, a
        scheduled one turns C{queued}; a message in another status is left
        alone.  Fires with the status it had and the message as now stored,
        or None when there is no such message.
        """

    def delete_message(message_id: str, now: float) -> Deferred[tuple[str, dict[str, Any]] | None]:
        """
        Mark a queued, scheduled or deferred message C{deleted} (no next
        attempt), and each of its recipients not sent or bounced; a message
        in another status is left alone.  Fires with the status it had and
        the message as now stored, or None when there is no such message.
        """

    def write_state(changes: list[Any]) -> Deferred[list[BaseException | None]]:
        """
        Apply delivery state changes (L{smtpplus.delivery.queue.MarkSending},
        L{smtpplus.delivery.queue.FinishAttempt}) in one transaction, each
        undone alone if it fails; fires with its error or None per change.
        The Deferred fails as a whole when the store cannot be written.
        """

    def count_urgent(user: str, since: float) -> Deferred[int]:
        """
        How many of C{user}'s own messages (not the daemon's, such as its
        bounces) at priority 1 were created from C{since} on: the priority
        budget's count.
        """

    def on_reset(listener: Callable[[], object]) -> None:
        """
        Call C{listener()} on the reactor thread after the store lost its
        rows and starts again empty (the database file was replaced):
        whoever holds the truth elsewhere (the spool) writes it back.
        """


class IContentStore(Interface):
    """
    A queue store that keeps each message's bytes with its rows (the
    PostgreSQL one), so that any node sharing it can deliver any message.
    """

    def insert_with_content(batch: list[tuple[Any, bytes]], dedup_window: float = 0) -> Deferred[list[int | Duplicate]]:
        """
        Like L{IQueueStore.insert}, for (message, bytes) pairs: rows and
        bytes in one transaction, all or none; the durable point of an
        accepted message.  A resent copy's bytes are not kept.
        """

    def load_content(message_id: str) -> Deferred[bytes | None]:
        """The bytes of C{message_id} as accepted, or None when the store holds none."""

    def store_content(message_id: str, content: bytes) -> Deferred[None]:
        """Keep the bytes of a message whose row exists, replacing any held."""


class IRelay(Interface):
    """Hands spooled messages to their next hops."""

    def send(
        mail_from: str, recipients: list[str], path: str, content: bytes | None = None, length: int | None = None
    ) -> Deferred[list[Any]]:
        """
        Offer the message at C{path} (its first C{length} bytes, or
        C{content} when read already); fires with one
        L{smtpplus.delivery.relay.HopOutcome} per next hop tried.
        """

    def close() -> Deferred[None]:
        """Close kept connections at shutdown; fires when they are gone."""


class ISharedQueueStore(Interface):
    """
    A queue store shared by several nodes (PostgreSQL): each unfinished
    message is claimed by the node that attempts it, and a node that falls
    silent loses its claims to a live one.
    """

    node: str | None

    def take_over(silent_since: float, now: float, limit: int = 1000) -> Deferred[list[dict[str, Any]]]:
        """
        Claim for this node at most C{limit} unfinished messages of the
        nodes whose heartbeat is older than C{silent_since}, priority first;
        fires with their scheduling rows (each with C{previous}, the node
        it was taken from).
        """
