"""
The seams between the daemon's parts that have, or will have, more than
one implementation: the stores (SQLite, in memory, PostgreSQL later) and the
recorders and read models other parts call through.

The convention: an interface used by more than one package lives here, in
one leaf module that imports only L{smtpplus.model} (other names below are
for type checkers only).  An interface that stays inside one package lives
in that package (the queue store in C{delivery/}); C{smtp/interfaces.py}
is the wire's seam to its cred avatar, kept apart so that C{smtp/}
imports nothing else of smtpplus.

Every store here has an in-memory implementation next to its SQLite one,
and both pass the same contract tests (C{tests/test_auth_store.py},
C{tests/test_notify_events.py}, C{tests/test_stats_store.py}).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from zope.interface import Interface

from smtpplus.model import Aggregation, EventType, RecipientStatus, Suppression, User

if TYPE_CHECKING:
    from smtpplus.auth.store import LoginRecord, Standing


class IUserStore(Interface):
    """
    Users and their password hashes.  Every method but L{subscribe} and
    L{standing} returns a Deferred; usernames are looked up
    case-insensitively.
    """

    def create(user: User, password_hash: bytes) -> Deferred[User]:
        """
        Add C{user} (validated; its timestamps are set by the store); fire
        with the stored user, or fail with
        L{smtpplus.auth.store.DuplicateUser}.
        """

    def get(username: str) -> Deferred[User | None]:
        """Fire with the user, or None."""

    def list() -> Deferred[list[User]]:
        """Fire with all users, ordered by username."""

    def update(username: str, fields: Mapping[str, Any]) -> Deferred[User | None]:
        """
        Change the given validated fields (a C{username} among them is
        ignored); fire with the user, or None when there is no such user.
        """

    def delete(username: str) -> Deferred[bool]:
        """Remove the user; fire with True, or False when there was none."""

    def set_password_hash(username: str, password_hash: bytes) -> Deferred[bool]:
        """Replace the password hash; fire with True, or False when there is no such user."""

    def login_record(username: str) -> Deferred[LoginRecord | None]:
        """Fire with the user's L{smtpplus.auth.store.LoginRecord}, or None."""

    def subscribe(listener: Callable[[str], None]) -> None:
        """Call C{listener(username)} after every change of a user made through this store."""

    def standing(username: str) -> Standing:
        """
        Synchronously, without I/O: a L{smtpplus.auth.store.Standing} that
        reports once C{username} has been disabled or deleted after this
        call.  Take it before reading the user, so that a change racing the
        read is seen either way.  A password change does not revoke it.
        """


class ISuppressionList(Interface):
    """
    Each user's suppressed recipients (contract section 8): addresses its
    messages may no longer go to.  Addresses are compared lower-cased,
    usernames case-insensitively.  Every method returns a Deferred.
    """

    def find(user: str, address: str) -> Deferred[Suppression | None]:
        """Fire with C{user}'s suppression of C{address}, or None."""

    def add(user: str, address: str, reason: str, created_at: float) -> Deferred[Suppression]:
        """
        Suppress C{address} for C{user}; an address suppressed already
        takes the new reason and date.  Fire with the stored suppression.
        """

    def remove(user: str, address: str) -> Deferred[bool]:
        """Lift a suppression; fire with True, or False when there was none."""

    def list(user: str) -> Deferred[list[Suppression]]:
        """Fire with C{user}'s suppressions, ordered by address."""


class ISuppressionKeys(Interface):
    """
    A suppression list written by this process alone (SQLite), which can
    therefore hand out a filter of all its keys and tell of each key added:
    the SMTP workers answer most RCPT TO lookups from their copy.
    """

    def key_filter() -> Deferred[Any]:
        """Fire with the L{smtpplus.delivery.suppressions.KeyFilter} of every key, once loaded."""

    def on_added(listener: Callable[[str, str], Deferred[object]]) -> None:
        """Call C{listener(user, address key)} for each key added; an add fires after its Deferred."""


class IEventRecorder(Interface):
    """
    Stores notification events and hands them to the notifier.  Auth and
    delivery record through it; they never wait on it for an SMTP reply
    longer than one database write.
    """

    def record(type: EventType, user: str | None, message_id: str | None, detail: str) -> Deferred[dict[str, Any]]:
        """
        Record one event of C{type}; return a Deferred firing with the
        stored event (the contract's C{event} object).  An unknown type is
        a C{ValueError}.
        """


class IEventQuery(Interface):
    """The notification events as the admin API lists them."""

    def list_events(type: str | None, user: str | None, limit: int | None) -> Deferred[list[dict[str, Any]]]:
        """
        Events (the contract's C{event} objects) matching the filters,
        newest first; C{limit} None or below 1 means all.
        """

    def page_events(
        type: str | None, user: str | None, limit: int, cursor: str | None
    ) -> Deferred[tuple[list[dict[str, Any]], str | None]]:
        """
        One page of L{list_events}: at most C{limit} events recorded before
        the one C{cursor} names (None: the newest), and the cursor of the
        next page (None at the end).  A malformed cursor is
        L{smtpplus.paging.InvalidValue}.
        """


class IStatsRecorder(Interface):
    """
    Counts messages and recipients into the statistics groups.

    C{message} arguments are dicts with at least: C{id}, C{user}, C{mail_from},
    C{header_from} (the raw From: value), C{subject}, C{campaign_code}
    (or None), C{created_at} (ISO 8601 UTC), C{recipients} (a count or a list).
    """

    def accepted(message: Mapping[str, Any]) -> None:
        """A message was queued (counts C{messages} and C{recipients})."""

    def rejected(user: str, mail_from: str, header_from: str, subject: str | None) -> None:
        """
        A message was refused by the sender rules, now (counts
        C{rejected}); C{subject} None means it was refused at MAIL FROM.
        """

    def recipient_result(
        message: Mapping[str, Any], status: RecipientStatus, previous: RecipientStatus | None = None
    ) -> None:
        """
        One recipient reached C{status} (sent, deferred or bounced),
        leaving C{previous} (its status before; None or queued when new).
        Counts are current state: deferred -> sent moves the recipient out
        of C{deferred}.
        """


class IStatsQuery(Interface):
    """The statistics as the admin API shows them."""

    def stats(user: str | None, policy: Aggregation | None) -> Deferred[dict[str, Any]]:
        """
        Fire with C{{"policy": ..., "groups": [...]}}, groups sorted by key;
        C{policy} None means the user's own aggregation (or C{"day"} when
        no user is given).  An unknown policy fails with C{ValueError}.
        """


class QueueConflict(Exception):
    """A queue management request the message's status does not allow (the API's 409)."""


class IMessageQuery(Interface):
    """The queued messages as the admin API lists and manages them."""

    def list_messages(user: str | None, status: str | None, limit: int) -> Deferred[list[dict[str, Any]]]:
        """The contract's C{message} objects, newest first."""

    def page_messages(
        filters: Mapping[str, Any], limit: int, cursor: str | None
    ) -> Deferred[tuple[list[dict[str, Any]], str | None]]:
        """
        One page of messages, newest first: at most C{limit} that arrived
        before the one C{cursor} names (None: the newest), and the cursor of
        the next page (None at the end).  C{filters} may hold C{user},
        C{status}, C{recipient}, C{campaign_code} (strings) and C{since},
        C{until} (seconds since the epoch; C{created_at} from C{since}
        inclusive to C{until} exclusive).  A malformed cursor is
        L{smtpplus.paging.InvalidValue}.
        """

    def get_message(message_id: str) -> Deferred[dict[str, Any] | None]:
        """The contract's C{message} object, or None when there is no such message."""

    def retry_message(message_id: str) -> Deferred[dict[str, Any] | None]:
        """
        Try a message that is not final now (a deferred one's retry and a
        scheduled one's hold are cut short); fire with the message, None
        when there is none, or fail with L{QueueConflict} when it is final.
        """

    def delete_message(message_id: str) -> Deferred[dict[str, Any] | None]:
        """
        Drop a message that is not final from the queue (status
        C{deleted}, its spool file removed); fire with the message, None
        when there is none, or fail with L{QueueConflict} when it is final
        or being sent.
        """


class INodeList(Interface):
    """The nodes sharing the store, as C{GET /api/v1/nodes} lists them (contract section 5)."""

    def nodes() -> Deferred[list[dict[str, Any]]]:
        """
        C{{"name", "workers", "started_at", "last_seen", "queued",
        "sending"}} per node, by name; the times ISO 8601 UTC.
        """


class IPolicyCheck(Interface):
    """The policy dry-run of the admin API (contract section 8), owned by delivery."""

    def check(
        user: User, mail_from: str, header_from: str | None, recipients: list[str], headers: Mapping[str, list[str]]
    ) -> Deferred[dict[str, Any]]:
        """
        What an SMTP session of C{user} would answer for this envelope and
        header section, and why: C{{"accepted", "reply", "reasons",
        "effective_priority"}} (and C{"recipients"} when several), with
        nothing queued, counted or notified.
        """


class DKIMKeyConflict(Exception):
    """A DKIM key exists for this domain already."""


class IDKIMKeys(Interface):
    """
    The DKIM signing keys, one per domain, owned by delivery (which signs
    with them).  Keys are shown as C{{"domain", "selector", "algorithm",
    "dns_name", "dns_txt", "enabled", "created_at"}}, never the private key.
    """

    def create(domain: str, selector: str, algorithm: str) -> Deferred[dict[str, Any]]:
        """Generate and store a key (enabled); fails with L{DKIMKeyConflict} when the domain has one."""

    def list() -> Deferred[list[dict[str, Any]]]:
        """Every key, by domain."""

    def get(domain: str) -> Deferred[dict[str, Any] | None]:
        """The key of C{domain}, or None."""

    def set_enabled(domain: str, enabled: bool) -> Deferred[dict[str, Any] | None]:
        """Turn signing with the key of C{domain} on or off; the key, or None when there is none."""

    def delete(domain: str) -> Deferred[bool]:
        """Remove the key of C{domain}; False when there was none."""
