"""
One delivery attempt of one queued message: offer it to the next hop(s),
store every recipient's result, decide the retry, bounce what failed for
good, and record the events the administrators hear about.

A result that cannot be stored (disk full, database gone) is kept in
memory and written again with a growing delay; the attempt ends only once
it is stored, so the scheduler does not offer the message again meanwhile.
The memory this holds is bounded by the delivery slots it occupies: when
the store stays down, deliveries pause once every slot waits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from smtpplus.delivery import queue
from smtpplus.delivery.batching import Batcher, BatchLoader
from smtpplus.delivery.dsn import build_dsn, read_headers, read_headers_of
from smtpplus.delivery.interfaces import DeliverySlots, IContentStore, IQueueStore, IRelay, RunInThread
from smtpplus.delivery.query import iso
from smtpplus.delivery.relay import HopOutcome
from smtpplus.delivery.spool import Spool
from smtpplus.interfaces import IEventRecorder, IStatsRecorder, ISuppressionList
from smtpplus.metrics import UNCOUNTED, Metrics

log = Logger()

FRESH_LIMIT = 10000
# Bytes of fresh messages' content kept for their first attempt; past it
# they are read back from the spool.
FRESH_BYTES = 16 * 1024 * 1024
# The recipients' last response when a sandbox user's message is finished.
SANDBOXED_RESPONSE = "250 2.0.0 Sandboxed: accepted and never relayed (sandbox user)"
# Delays between writes of a result that could not be stored.
RESULT_RETRY_FIRST = 1.0
RESULT_RETRY_MAX = 60.0


class _Unbounded:
    """Slots without a bound, for an agent no scheduler drives."""

    def acquire(self, message_id: str) -> Deferred[None]:
        return succeed(None)

    def release(self, message_id: str) -> None:
        pass


UNBOUNDED = _Unbounded()


class DeliveryAgent:
    """
    Runs attempts; L{deliver} is the scheduler's callback.

    @param clock: times the attempts (created_at, retries, expiry) and the
        backoff of results that could not be stored.
    @param run_in_thread: reads and removes spool files off the reactor.
    @param events: where events are recorded; None records nothing.
    @param stats: where recipient results are counted; None counts nothing.
    @param submit_internal: queues a message of the daemon's own (the DSNs):
        C{(mail_from, recipients, data, priority, user) -> Deferred[id]}.
    @param results: told each recipient's stored result,
        C{results.message_result(status, message_id, user, recipient, response)}
        (the notifier's message webhooks); None: nobody.
    @param metrics: counts each recipient's stored result, the daemon's own
        mail included.
    @param suppressions: where a recipient the next hop refused for good
        is suppressed for the message's user (while
        C{suppress_hard_bounces}); None suppresses nothing.
    """

    def __init__(
        self,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        store: IQueueStore,
        spool: Spool,
        relay: IRelay,
        events: IEventRecorder | None,
        stats: IStatsRecorder | None,
        retry_schedule: Sequence[int],
        max_queue_lifetime: float,
        delay_threshold: float,
        hostname: str,
        submit_internal: Callable[..., Deferred[str]],
        results: Any = None,
        metrics: Metrics = UNCOUNTED,
        suppressions: ISuppressionList | None = None,
        suppress_hard_bounces: bool = True,
    ) -> None:
        self._clock = clock
        self._in_thread = run_in_thread
        self._queue = store
        self._spool = spool
        self._relay = relay
        self._events = events
        self._stats = stats
        self._retry_schedule = tuple(retry_schedule)
        self._lifetime = max_queue_lifetime
        self._delay_threshold = delay_threshold
        self._hostname = hostname
        self._submit_internal = submit_internal
        self.results = results
        self.metrics = metrics
        # Bounds the transfers to next hops (the scheduler); none by default.
        self.slots: DeliverySlots = UNBOUNDED
        # Adds a DKIM signature before relaying (L{smtpplus.delivery.dkim.Signer}); None: no signing.
        self.signer: Any = None
        self.suppressions = suppressions
        self.suppress_hard_bounces = suppress_hard_bounces
        # Next hops that failed since their last success: one send_problem
        # event per outage.
        self.outages: set[str] = set()
        self.writer = queue.StateWriter(store)
        # Held results waiting out their backoff before the next write.
        self._sleepers: list[tuple[Deferred[None], IDelayedCall]] = []
        # Fresh messages as committed, so that their first attempt need not
        # read them back; bounded, the database is the fallback.
        self._fresh: dict[str, tuple[dict[str, Any], bytes | None]] = {}
        self._fresh_bytes = 0
        self._removals: Batcher[str] = Batcher(self._remove)
        # The rows of messages not fresh (retries, a backlog), several per
        # trip to the store when attempts start together.
        self._loads: BatchLoader[str, dict[str, Any]] = BatchLoader(store.load_for_attempts)
        # Message id -> what its unstored result says, while it waits.
        self.unrecorded: dict[str, str] = {}
        # Messages whose attempt holds their row: whatever happens to the
        # store, the attempt writes that row back with its result.
        self.attempting: set[str] = set()
        self._store_error: str | None = None

    def reconfigure(
        self, retry_schedule: Sequence[int], max_queue_lifetime: float, delay_threshold: float, relay: IRelay | None
    ) -> None:
        """Apply reloaded settings to the attempts that start from now on; C{relay}: a new next hop, or None."""
        self._retry_schedule = tuple(retry_schedule)
        self._lifetime = max_queue_lifetime
        self._delay_threshold = delay_threshold
        if relay is not None:
            self._relay = relay

    def _remove(self, message_ids: list[str]) -> Deferred[list[None]]:
        d = self._in_thread(self._spool.remove, message_ids)
        return d.addCallback(lambda _: [None] * len(message_ids))

    @inlineCallbacks
    def _read(self, message_id: str) -> Any:
        """
        The message's bytes (None when too large to hold) and length: from
        this node's spool, or, for a message another node accepted (shared
        stores), from the store.
        """
        try:
            return (yield self._in_thread(self._spool.read_small, message_id))
        except FileNotFoundError:
            if not IContentStore.providedBy(self._queue):
                raise
        content = yield IContentStore(self._queue).load_content(message_id)
        if content is None:
            raise FileNotFoundError(f"message {message_id} is neither in the spool nor in the store")
        return content, len(content)

    @inlineCallbacks
    def _original_headers(self, message_id: str) -> Any:
        """The header section of a message, never its envelope record."""
        content, length = yield self._read(message_id)
        if content is not None:
            return read_headers_of(content)
        return (yield self._in_thread(read_headers, self._spool.path(message_id), length))

    def retry_interval(self, attempts: int) -> int:
        """Seconds before the next attempt after C{attempts} ones; the last interval repeats."""
        return self._retry_schedule[min(max(attempts, 1), len(self._retry_schedule)) - 1]

    def remember(self, message: queue.NewMessage, content: bytes | None = None) -> None:
        """
        Keep a just-committed message (and its C{content}, when known) for
        its first attempt, up to L{FRESH_LIMIT} messages and L{FRESH_BYTES}.
        """
        if len(self._fresh) >= FRESH_LIMIT:
            return
        if content is not None and self._fresh_bytes + len(content) > FRESH_BYTES:
            content = None
        if content is not None:
            self._fresh_bytes += len(content)
        self._fresh[message.id] = (queue.as_row(message), content)

    def forget(self, message_id: str) -> None:
        """Drop what L{remember} kept of a message that will not be attempted (it was deleted)."""
        _, content = self._fresh.pop(message_id, (None, None))
        if content is not None:
            self._fresh_bytes -= len(content)

    @inlineCallbacks
    def deliver(self, message_id: str) -> Any:
        """One attempt; returns when to try again, or None when the message is finished."""
        message, content = self._fresh.pop(message_id, (None, None))
        if content is not None:
            self._fresh_bytes -= len(content)
        if message is None:
            message = yield self._loads.get(message_id)
        if message is None or message["status"] not in queue.ACTIVE:
            return None
        self.attempting.add(message_id)
        try:
            if message.get("sandbox"):
                return (yield self._finish_sandboxed(message))
            pending = [r for r in message["recipients"] if r["status"] not in queue.FINAL_RECIPIENT]
            addresses = list(dict.fromkeys(r["address"] for r in pending))
            length = None
            try:
                if content is None:
                    content, length = yield self._read(message_id)
                if self.signer is not None:
                    signed = yield self.signer.sign(message, content, length)
                    if signed is not None:
                        content, length = signed, None
                path = self._spool.path(message_id)
                yield self.slots.acquire(message_id)
                # Once it talks to the next hop.  Not waited for: only the
                # admin API sees "sending"; after a crash the message is
                # active either way and is tried again.
                self.writer.write(queue.MarkSending(message_id, self._clock.seconds())).addErrback(
                    lambda f: self._store_failed(f.value)
                )
                try:
                    outcomes = yield self._relay.send(message["mail_from"], addresses, path, content, length)
                finally:
                    if self._store_error is None:
                        # Recording waits for a commit: the next hop may
                        # take another message meanwhile.  While results
                        # cannot be stored, the slot stays taken until this
                        # one is, so that few deliveries go unrecorded.
                        self.slots.release(message_id)
            except Exception:
                log.failure("relaying {id} failed unexpectedly", id=message_id)
                outcomes = []
            results: dict[str, tuple[int, str]] = {}
            problem = "no result from the next hop"
            hops: dict[str, str] = {}
            refused: dict[str, tuple[int, str]] = {}
            for outcome in outcomes:
                results.update(outcome.results)
                if not outcome.local:
                    refused.update((a, r) for a, r in outcome.results.items() if r[0] >= 500)
                hops.update((address, outcome.hop) for address in outcome.results)
                if outcome.problem:
                    problem = outcome.problem
                    hops.update((address, outcome.hop) for address in addresses if address not in hops)
                self._track_hop(outcome, message)
            self._suppress(message, refused)
            return (yield self._conclude(message, pending, results, problem, hops))
        finally:
            self.attempting.discard(message_id)

    @inlineCallbacks
    def _finish_sandboxed(self, message: dict[str, Any]) -> Any:
        """A sandbox user's message: every recipient ends C{sandboxed}, nothing is relayed."""
        now = self._clock.seconds()
        updates = [
            queue.RecipientUpdate(r["idx"], "sandboxed", r["attempts"], SANDBOXED_RESPONSE, None)
            for r in message["recipients"]
            if r["status"] not in queue.FINAL_RECIPIENT
        ]
        yield self._store(message, "sandboxed", None, updates, False, now)
        self._removals.add(message["id"]).addErrback(
            lambda f: log.failure("removing spooled message {id} failed", f, id=message["id"])
        )
        self._log_attempt(message, updates, "sandboxed", None, {})
        return None

    def _suppress(self, message: dict[str, Any], refused: dict[str, tuple[int, str]]) -> None:
        """Suppress, for the message's user, each recipient the next hop refused for good (contract section 8)."""
        if not refused or self.suppressions is None or not self.suppress_hard_bounces:
            return
        if message["internal"] or not message["user"]:
            return
        now = self._clock.seconds()
        for address, (code, text) in refused.items():
            self.suppressions.add(message["user"], address, f"{code} {text}", now).addErrback(
                lambda f, a=address: log.failure("suppressing {address} failed", f, address=a)
            )

    def _track_hop(self, outcome: HopOutcome, message: dict[str, Any]) -> None:
        if outcome.problem is None:
            self.outages.discard(outcome.hop)
            return
        if outcome.hop not in self.outages:
            self.outages.add(outcome.hop)
            self._record("send_problem", None, message["id"], f"next hop {outcome.hop} is unavailable: {outcome.problem}")

    @inlineCallbacks
    def _conclude(
        self,
        message: dict[str, Any],
        pending: list[dict[str, Any]],
        results: dict[str, tuple[int, str]],
        problem: str,
        hops: dict[str, str] | None = None,
    ) -> Any:
        now = self._clock.seconds()
        expired = now >= message["created_at"] + self._lifetime
        updates: list[queue.RecipientUpdate] = []
        bounced: list[tuple[str, int, str]] = []
        attempts_made = 0
        for r in pending:
            code, text = results.get(r["address"], (451, f"4.4.1 {problem}"))
            attempts = r["attempts"] + 1
            if 200 <= code < 300:
                status = "sent"
            elif code >= 500:
                status = "bounced"
            elif expired:
                status = "bounced"
                text = f"4.4.7 Message expired in the queue; last response: {code} {text}"
            else:
                status = "deferred"
                attempts_made = max(attempts_made, attempts)
            if status == "bounced":
                bounced.append((r["address"], code, text))
            updates.append(queue.RecipientUpdate(r["idx"], status, attempts, f"{code} {text}", None))

        next_attempt = None
        if attempts_made:
            deadline = message["created_at"] + self._lifetime
            next_attempt = min(now + self.retry_interval(attempts_made), max(deadline, now))
            updates = [
                queue.RecipientUpdate(u.idx, u.status, u.attempts, u.last_response, next_attempt if u.status == "deferred" else None)
                for u in updates
            ]
        statuses = {u.idx: u.status for u in updates}
        final_statuses = [statuses.get(r["idx"], r["status"]) for r in message["recipients"]]
        status = _message_status(final_statuses)

        notify_delay = (
            status == "deferred"
            and not message["delay_notified"]
            and now - message["created_at"] >= self._delay_threshold
        )
        if bounced and message["mail_from"]:
            yield self._bounce(message, bounced, now)
        yield self._store(message, status, next_attempt, updates, notify_delay, now)
        since_accepted = now - message["created_at"]
        for u in updates:
            self.metrics.recipient_result(u.status, since_accepted)
        if self.results is not None:
            for r, u in zip(_by_idx(message, updates), updates, strict=True):
                self.results.message_result(u.status, message["id"], message["user"], r["address"], u.last_response)
        if not message["internal"]:
            summary = _stats_message(message)
            previous = {r["idx"]: r["status"] for r in pending}
            for u in updates:
                self._count(summary, u.status, previous[u.idx])
            if bounced:
                detail = "; ".join(f"{a}: {c} {t}" for a, c, t in bounced)
                self._record("bounce", message["user"], message["id"], f"{len(bounced)} recipient(s) bounced: {detail}")
            if notify_delay:
                waited = int(now - message["created_at"])
                self._record("delivery_delay", message["user"], message["id"], f"not delivered after {waited} s: {problem}")
        if next_attempt is None:
            # Only now that the final state is committed: a crash before
            # would find an active message without its file.
            self._removals.add(message["id"]).addErrback(
                lambda f: log.failure("removing spooled message {id} failed", f, id=message["id"])
            )
        self._log_attempt(message, updates, status, next_attempt, hops or {})
        return next_attempt

    def _log_attempt(
        self,
        message: dict[str, Any],
        updates: list[queue.RecipientUpdate],
        status: str,
        next_attempt: float | None,
        hops: dict[str, str],
    ) -> None:
        """The attempt's log line: each recipient's next hop, reply and status, the message's status and next retry."""
        recipients = [
            {"address": r["address"], "hop": hops.get(r["address"], "-"), "reply": u.last_response, "status": u.status}
            for r, u in zip(_by_idx(message, updates), updates, strict=True)
        ]
        log.info(
            "delivery attempt id={id} status={status} next_retry={next_retry} {results}",
            id=message["id"],
            status=status,
            next_retry=iso(next_attempt),
            recipients=recipients,
            results="; ".join(
                f"to=<{r['address']}> hop={r['hop']} status={r['status']} reply={r['reply']!r}" for r in recipients
            ),
        )

    @inlineCallbacks
    def _store(
        self,
        message: dict[str, Any],
        status: str,
        next_attempt: float | None,
        updates: list[queue.RecipientUpdate],
        notify_delay: bool,
        now: float,
    ) -> Any:
        """Store an attempt's result, again and again until it is stored: never deliver again instead."""
        delay = RESULT_RETRY_FIRST
        while True:
            try:
                yield self.writer.write(queue.FinishAttempt(message, status, next_attempt, updates, notify_delay, now))
            except Exception as e:
                self._store_failed(e)
                self.unrecorded[message["id"]] = ", ".join(
                    f"{r['address']} {u.status}" for r, u in zip(_by_idx(message, updates), updates, strict=True)
                )
                yield self._sleep(delay)
                delay = min(delay * 2, RESULT_RETRY_MAX)
            else:
                break
        if self.unrecorded.pop(message["id"], None) is not None or self._store_error is not None:
            self._store_recovered()
        # The store works: the other held results need not sleep out their backoff.
        self.wake_held_results()

    def _sleep(self, seconds: float) -> Deferred[None]:
        """Wait C{seconds}, or less if L{wake_held_results} is called meanwhile."""
        woken: Deferred[None] = Deferred()
        call = self._clock.callLater(seconds, woken.callback, None)
        self._sleepers.append((woken, call))
        return woken

    def wake_held_results(self) -> None:
        """Retry every held result now (the store came back, or a new database was opened)."""
        sleepers, self._sleepers = self._sleepers, []
        for woken, call in sleepers:
            if call.active():
                call.cancel()
                woken.callback(None)

    def _store_failed(self, error: BaseException) -> None:
        """Log a store outage once, however many results wait for it."""
        if self._store_error is None:
            self._store_error = str(error) or error.__class__.__name__
            log.error(
                "cannot store delivery results ({error}): they are kept and written again until stored; "
                "the messages are not sent again meanwhile",
                error=self._store_error,
            )

    def _store_recovered(self) -> None:
        if self._store_error is not None and not self.unrecorded:
            log.info("delivery results are stored again (the failure was: {error})", error=self._store_error)
            self._store_error = None

    def report_unrecorded(self) -> None:
        """At shutdown: name each result still waiting to be stored, which is lost with the process."""
        for message_id, result in sorted(self.unrecorded.items()):
            log.error(
                "result of the delivery of {id} was never stored ({result}): after the restart the message "
                "is tried again, and its recipients that got it may get it twice",
                id=message_id,
                result=result,
            )

    @inlineCallbacks
    def _bounce(self, message: dict[str, Any], failed: list[tuple[str, int, str]], now: float) -> Any:
        try:
            headers = yield self._original_headers(message["id"])
            dsn = build_dsn(self._hostname, message["id"], message["mail_from"], failed, headers, message["created_at"], now)
            dsn_id = yield self._submit_internal("", [message["mail_from"]], dsn, message["priority"], message["user"])
            log.info("bounce {dsn} queued for {id}", dsn=dsn_id, id=message["id"])
        except Exception:
            log.failure("cannot queue the bounce for {id}", id=message["id"])

    def _record(self, kind: str, user: str | None, message_id: str, detail: str) -> None:
        if self._events is None:
            return
        maybeDeferred(self._events.record, kind, user, message_id, detail).addErrback(
            lambda f: log.failure("recording a {kind} event failed", f, kind=kind)
        )

    def _count(self, summary: dict[str, Any], status: str, previous: str) -> None:
        if self._stats is None or status not in ("sent", "deferred", "bounced"):
            return
        # Counts are current state: deferred -> sent leaves "deferred".
        maybeDeferred(self._stats.recipient_result, summary, status, previous).addErrback(
            lambda f: log.failure("counting a recipient result failed", f)
        )


def _by_idx(message: dict[str, Any], updates: Sequence[queue.RecipientUpdate]) -> list[dict[str, Any]]:
    """The recipient of each update, in order."""
    recipients = {r["idx"]: r for r in message["recipients"]}
    return [recipients[u.idx] for u in updates]


def _message_status(statuses: Sequence[str]) -> str:
    if all(s == "sent" for s in statuses):
        return "sent"
    if all(s == "bounced" for s in statuses):
        return "bounced"
    if all(s in queue.FINAL_RECIPIENT for s in statuses):
        return "partial"
    return "deferred"


def _stats_message(message: dict[str, Any]) -> dict[str, Any]:
    """The message dict L{smtpplus.interfaces.IStatsRecorder} expects."""
    return {
        "id": message["id"],
        "user": message["user"],
        "mail_from": message["mail_from"],
        "header_from": message["header_from"],
        "subject": message["subject"],
        "campaign_code": message["campaign_code"],
        "created_at": iso(message["created_at"]),
        "recipients": len(message["recipients"]),
    }
