"""
Statistics: messages and recipients counted into groups, for every
aggregation policy at once, so that the admin API can answer any policy for
any user over the same data.

Counting is O(1) per event: each event adds to a fixed number of in-memory
counters (one per stored policy, for the user and for all users); about
once a second the touched counters are added to the C{stats_groups} table
in one transaction.  A query is then an index range scan over one user's
groups of one policy, whatever the number of messages counted.

L{Statistics} keeps the groups in the daemon's SQLite database,
L{MemoryStatistics} in a dict; both pass the same contract tests.

Groups are dated by the day the message was accepted, so the results of its
recipients land in the same C{day} group as the message itself.
C{deferred} counts recipients currently deferred: a deferred recipient that
is later sent or bounced moves out of C{deferred} (the caller says which
status it leaves), so C{sent + deferred + bounced <= recipients}.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime
from email.header import decode_header, make_header
from email.utils import getaddresses
from functools import lru_cache
from operator import itemgetter
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from smtpplus.interfaces import IStatsQuery, IStatsRecorder
from smtpplus.model import Aggregation
from smtpplus.storage.database import Database
from smtpplus.storage.migrations import Migration

log = Logger()

POLICIES = tuple(policy.value for policy in Aggregation)
# week, month and year are answered from the day groups (keys derived in SQL).
STORED_AS = {"week": "day", "month": "day", "year": "day"}
# Messages with a CampaignCode are counted once, under this policy, and
# show up under their code whatever policy is asked for.
CAMPAIGN_POLICY = "campaign"
# The user column of the groups that count every user together.
_ALL_USERS = ""
COLUMNS = ("messages", "recipients", "sent", "deferred", "bounced", "rejected")
_RESULT_COLUMN = {"sent": 2, "deferred": 3, "bounced": 4}

FLUSH_SECONDS = 1.0
# username -> the user's own aggregation policy (None: no such user).
UserPolicy = Callable[[str], Deferred[str | None]]
# Flush early when this many distinct counters are waiting.
FLUSH_COUNTERS = 20000

MIGRATIONS = [
    Migration(
        sqlite="""
    CREATE TABLE stats_groups (
        policy TEXT NOT NULL,
        user TEXT NOT NULL,
        key TEXT NOT NULL,
        messages INTEGER NOT NULL DEFAULT 0,
        recipients INTEGER NOT NULL DEFAULT 0,
        sent INTEGER NOT NULL DEFAULT 0,
        deferred INTEGER NOT NULL DEFAULT 0,
        bounced INTEGER NOT NULL DEFAULT 0,
        rejected INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (policy, user, key)
    ) WITHOUT ROWID;
    """,
        postgresql="""
    CREATE TABLE stats_groups (
        policy text NOT NULL,
        "user" text NOT NULL,
        key text COLLATE "C" NOT NULL,
        messages bigint NOT NULL DEFAULT 0,
        recipients bigint NOT NULL DEFAULT 0,
        sent bigint NOT NULL DEFAULT 0,
        deferred bigint NOT NULL DEFAULT 0,
        bounced bigint NOT NULL DEFAULT 0,
        rejected bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (policy, "user", key)
    );
    """,
    ),
]

# Variable parts of a subject, most specific first: each match becomes its
# placeholder, so "Invoice 2024-0042 for bob@example.com" and "Invoice
# 2024-0043 for eve@example.org" fall into one group.
_VARIABLE_PARTS = [
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "{email}"),
    (re.compile(r"\bhttps?://\S+", re.IGNORECASE), "{url}"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.IGNORECASE), "{uuid}"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)?\b"), "{date}"),
    (re.compile(r"\b\d{1,2}[./]\d{1,2}[./]\d{2,4}\b"), "{date}"),
    (re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?\b"), "{time}"),
    # Hex of 8 or more digits with at least one digit and one letter a-f.
    (re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b", re.IGNORECASE), "{hex}"),
    # Codes mixing letters and digits (AB-1234, INV2024X7), not plain words.
    (re.compile(r"\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9]+(?:[_-][A-Za-z0-9]+)*\b"), "{id}"),
    (re.compile(r"\d+(?:[.,]\d+)*"), "{n}"),
]


@lru_cache(maxsize=16384)
def dynamic_subject(subject: str) -> str:
    """C{"Ticket 4711 solved"} -> C{"Ticket {n} solved"}: the subject with its variable parts replaced."""
    for pattern, placeholder in _VARIABLE_PARTS:
        subject = pattern.sub(placeholder, subject)
    return " ".join(subject.split())


def _decode(text: str) -> str:
    """Decode RFC 2047 encoded words; text that is not encoded comes back as it is."""
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except Exception:
        return text


@lru_cache(maxsize=16384)
def sender_of(mail_from: str, header_from: str) -> tuple[str, str]:
    """C{(address, display name)} of the header C{From:}, or the envelope sender when it has none."""
    name, address = "", ""
    if header_from:
        pairs = getaddresses([header_from])
        if pairs:
            name, address = pairs[0]
    return (address or mail_from).strip().lower(), " ".join(_decode(name).split())


@lru_cache(maxsize=4096)
def day_of(created_at: str) -> str:
    """The UTC day C{YYYY-MM-DD} of an ISO 8601 timestamp (naive means UTC)."""
    moment = datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.date().isoformat()


@lru_cache(maxsize=16384)
def group_keys(
    user: str, day: str, campaign_code: str, mail_from: str, header_from: str, subject: str | None
) -> tuple[tuple[str, str, str], ...]:
    """
    The counters C{(policy, user, key)} one message adds to: per stored
    policy, the user's group and the all-users group.  C{subject} None means
    the message never got to DATA (refused at MAIL FROM).
    """
    if campaign_code:
        pairs = [(CAMPAIGN_POLICY, campaign_code)]
    else:
        email, name = sender_of(mail_from, header_from)
        if subject is None:
            subject_key = dynamic_key = email_subject_key = ""
        else:
            subject_key = " ".join(_decode(subject).split())
            dynamic_key = dynamic_subject(subject_key)
            email_subject_key = f"{email} | {subject_key}"
        pairs = [
            ("day", day),
            ("subject", subject_key),
            ("dynamic_subject", dynamic_key),
            ("sender_email", email),
            ("sender_name", name),
            ("sender_email_subject", email_subject_key),
            ("user", user),
        ]
    return tuple((policy, who, key) for policy, key in pairs for who in (user, _ALL_USERS))


def _upsert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany(
        "INSERT INTO stats_groups (policy, user, key, messages, recipients, sent, deferred, bounced, rejected) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (policy, user, key) DO UPDATE SET "
        + ", ".join(f"{c} = {c} + excluded.{c}" for c in COLUMNS),
        rows,
    )


# The Thursday of a day's ISO week decides the week's year and number.
_THURSDAY = "date(key, '-3 days', 'weekday 4')"
_KEY_EXPRESSIONS = {
    "week": f"strftime('%Y', {_THURSDAY}) || '-W' || "
            f"printf('%02d', (CAST(strftime('%j', {_THURSDAY}) AS INTEGER) - 1) / 7 + 1)",
    "month": "substr(key, 1, 7)",
    "year": "substr(key, 1, 4)",
}


def _select(conn: sqlite3.Connection, policy: str, user: str) -> tuple[str, str]:
    """
    The groups of C{policy} and the campaign groups, each as one JSON array
    of C{[key, messages, ...]} in key order, built by SQLite: thousands of
    groups never become thousands of Python row objects.
    """
    values = ", ".join(COLUMNS)
    expression = _KEY_EXPRESSIONS.get(policy)
    if expression is None:
        inner = f"SELECT key AS k, {values} FROM stats_groups WHERE policy = ? AND user = ? ORDER BY key"
    else:
        sums = ", ".join(f"SUM({c}) AS {c}" for c in COLUMNS)
        inner = f"SELECT {expression} AS k, {sums} FROM stats_groups WHERE policy = ? AND user = ? GROUP BY k ORDER BY k"
    outer = f"SELECT json_group_array(json_array(k, {values})) FROM ({{}})"
    groups = conn.execute(outer.format(inner), (STORED_AS.get(policy, policy), user)).fetchone()[0]
    campaign_inner = f"SELECT key AS k, {values} FROM stats_groups WHERE policy = ? AND user = ? ORDER BY key"
    campaigns = conn.execute(outer.format(campaign_inner), (CAMPAIGN_POLICY, user)).fetchone()[0]
    return groups, campaigns


def merge_groups(groups: list[list[Any]], campaigns: list[list[Any]]) -> list[dict[str, Any]]:
    """Add the campaign groups (a code may equal a policy key), drop empty groups, sorted by key."""
    if campaigns:
        codes = {row[0]: row for row in campaigns}
        for row in groups:
            same = codes.pop(row[0], None)
            if same is not None:
                row[1:] = [a + b for a, b in zip(row[1:], same[1:], strict=True)]
        if codes:
            # Both lists are sorted already: Timsort merges the two runs in linear time.
            groups = sorted(groups + list(codes.values()), key=itemgetter(0))
    return [
        {"key": k, "messages": m, "recipients": r, "sent": s, "deferred": d, "bounced": b, "rejected": x}
        for k, m, r, s, d, b, x in groups
        if m or r or s or d or b or x
    ]


class StatisticsBase(Service):
    """
    What every statistics store shares: counting in memory, flushing every
    L{FLUSH_SECONDS} (keeping the counts while writes fail), answering
    queries; a backend implements C{_write} and C{_read}.

    @param user_policy: C{username -> Deferred[str | None]}, the user's own
        aggregation policy, used when a query names a user but no policy.
    """

    name = "stats"

    def __init__(self, clock: IReactorTime, user_policy: UserPolicy, flush_seconds: float = FLUSH_SECONDS) -> None:
        self._clock = clock
        self._user_policy = user_policy
        self._flush_seconds = flush_seconds
        self._pending: dict[tuple[str, str, str], list[int]] = {}
        self._timer: IDelayedCall | None = None
        self._flushing: set[Deferred[None]] = set()
        self._write_error: str | None = None

    def _write(self, rows: list[tuple[Any, ...]]) -> Deferred[None]:
        """Add C{(policy, user, key, *counts)} rows to the stored groups, all or none."""
        raise NotImplementedError

    def _read(self, policy: str, user: str) -> Deferred[list[dict[str, Any]]]:
        """The stored groups of C{policy} for C{user} (L{_ALL_USERS}: everybody), as the contract shows them."""
        raise NotImplementedError

    # -- counting (IStatsRecorder) ------------------------------------------

    def _add(self, counters: Iterable[tuple[str, str, str]], *changes: tuple[int, int]) -> None:
        """Add C{(column, amount)} changes to each counter."""
        pending = self._pending
        for counter in counters:
            values = pending.get(counter)
            if values is None:
                values = pending[counter] = [0, 0, 0, 0, 0, 0]
            for column, amount in changes:
                values[column] += amount
        if len(pending) >= FLUSH_COUNTERS:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._flush_seconds, self.flush)

    def _message_counters(self, message: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
        return group_keys(
            message["user"],
            day_of(message["created_at"]),
            message.get("campaign_code") or "",
            message.get("mail_from") or "",
            message.get("header_from") or "",
            message.get("subject") or "",
        )

    def accepted(self, message: dict[str, Any]) -> None:
        """A message was queued: counts one message and its recipients."""
        counters = self._message_counters(message)
        recipients = message["recipients"]
        self._add(counters, (0, 1), (1, recipients if isinstance(recipients, int) else len(recipients)))

    def rejected(self, user: str, mail_from: str, header_from: str, subject: str | None) -> None:
        """
        A message was refused by the sender rules, now.  Refused at MAIL FROM
        (C{subject} None, or both C{header_from} and C{subject} empty), it
        counts under key C{""} for the subject policies.
        """
        if subject is None or (not header_from and not subject):
            subject = None
        day = datetime.fromtimestamp(self._clock.seconds(), UTC).date().isoformat()
        self._add(group_keys(user, day, "", mail_from or "", header_from or "", subject), (5, 1))

    def recipient_result(self, message: dict[str, Any], status: str, previous: str | None = None) -> None:
        """
        One recipient of C{message} reached C{status} (C{sent}, C{deferred}
        or C{bounced}), leaving C{previous} (None when it was only queued).
        """
        column = _RESULT_COLUMN[status]
        if previous == status:
            return
        changes = [(column, 1)]
        if previous in _RESULT_COLUMN:
            changes.append((_RESULT_COLUMN[previous], -1))
        self._add(self._message_counters(message), *changes)

    def flush(self) -> Deferred[None]:
        """Write the waiting counters in one transaction; fires when committed."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, {}
        if not batch:
            return DeferredList(list(self._flushing)).addCallback(lambda _: None)
        rows = [(*counter, *values) for counter, values in batch.items()]
        d = self._write(rows)
        self._flushing.add(d)

        def failed(failure: Any) -> None:
            # Keep the counts for the next flush rather than lose them, and
            # say so once per outage (a full disk fails every flush).
            if self._write_error is None:
                self._write_error = failure.getErrorMessage()
                log.error(
                    "writing statistics failed ({error}); the counts are kept and written with a later flush",
                    error=self._write_error,
                )
            for counter, values in batch.items():
                mine = self._pending.setdefault(counter, [0, 0, 0, 0, 0, 0])
                for i, v in enumerate(values):
                    mine[i] += v
            if self._timer is None and self.running:
                self._timer = self._clock.callLater(self._flush_seconds, self.flush)

        def written(_: object) -> None:
            if self._write_error is not None:
                log.info("statistics are written again (the failure was: {error})", error=self._write_error)
                self._write_error = None

        d.addCallbacks(written, failed)
        d.addBoth(lambda _: self._flushing.discard(d))
        return d

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self.flush()

    # -- querying (IStatsQuery) ---------------------------------------------

    @inlineCallbacks
    def stats(self, user: str | None, policy: str | None) -> Any:
        """
        C{{"policy": ..., "groups": [...]}} sorted by key.  C{policy} None
        means C{user}'s own aggregation, or C{day} without a user.
        """
        if policy is None and user:
            policy = yield maybeDeferred(self._user_policy, user)
        policy = policy or "day"
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}")
        # Counters still in memory go first; the one database thread then
        # runs the read after that write.
        self.flush()
        groups = yield self._read(policy, user or _ALL_USERS)
        return {"policy": policy, "groups": groups}


@implementer(IStatsRecorder, IStatsQuery)
class Statistics(StatisticsBase):
    """The statistics store in the C{stats_groups} table (migration component C{"stats"})."""

    def __init__(
        self, db: Database, clock: IReactorTime, user_policy: UserPolicy, flush_seconds: float = FLUSH_SECONDS
    ) -> None:
        super().__init__(clock, user_policy, flush_seconds)
        self._db = db
        db.migrate("stats", MIGRATIONS)

    def _write(self, rows: list[tuple[Any, ...]]) -> Deferred[None]:
        return self._db.transaction(_upsert, rows)

    def _read(self, policy: str, user: str) -> Deferred[list[dict[str, Any]]]:
        d = self._db.run(_select, policy, user)
        return d.addCallback(lambda arrays: merge_groups(json.loads(arrays[0]), json.loads(arrays[1])))


def _derived_key(policy: str, day: str) -> str:
    """The week, month or year key of a day key, as L{_KEY_EXPRESSIONS} computes it in SQL."""
    if policy == "week":
        year, week, _ = date.fromisoformat(day).isocalendar()
        return f"{year}-W{week:02d}"
    return day[:7] if policy == "month" else day[:4]


@implementer(IStatsRecorder, IStatsQuery)
class MemoryStatistics(StatisticsBase):
    """The statistics groups in a dict: for tests, and the template for another backend."""

    def __init__(self, clock: IReactorTime, user_policy: UserPolicy, flush_seconds: float = FLUSH_SECONDS) -> None:
        super().__init__(clock, user_policy, flush_seconds)
        self._groups: dict[tuple[str, str, str], list[int]] = {}

    def _write(self, rows: list[tuple[Any, ...]]) -> Deferred[None]:
        for policy, user, key, *values in rows:
            counts = self._groups.setdefault((policy, user, key), [0] * len(COLUMNS))
            for i, value in enumerate(values):
                counts[i] += value
        return succeed(None)

    def _rows(self, policy: str, user: str) -> list[list[Any]]:
        return sorted(
            [key, *counts] for (stored, who, key), counts in self._groups.items() if stored == policy and who == user
        )

    def _read(self, policy: str, user: str) -> Deferred[list[dict[str, Any]]]:
        rows = self._rows(STORED_AS.get(policy, policy), user)
        if policy in STORED_AS:
            summed: dict[str, list[int]] = {}
            for day, *counts in rows:
                total = summed.setdefault(_derived_key(policy, day), [0] * len(COLUMNS))
                for i, value in enumerate(counts):
                    total[i] += value
            rows = sorted([key, *counts] for key, counts in summed.items())
        return succeed(merge_groups(rows, self._rows(CAMPAIGN_POLICY, user)))
