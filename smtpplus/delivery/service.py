"""
The delivery capability assembled: intake (avatars, spool, group commit),
scheduler, relay and the read model, behind L{build_delivery}.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from smtpplus.auth.store import Standing
from smtpplus.config import DeliveryConfig
from smtpplus.delivery import queue
from smtpplus.delivery.agent import DeliveryAgent
from smtpplus.delivery.budget import PriorityBudget
from smtpplus.delivery.check import PolicyCheck
from smtpplus.delivery.dkim import DKIMKeys, Signer
from smtpplus.delivery.interfaces import Duplicate, IContentStore, IQueueStore, IRelay, ISharedQueueStore, RunInThread
from smtpplus.delivery.query import MessageQuery, QueueControl, iso
from smtpplus.delivery.queue import Committer, NewMessage
from smtpplus.delivery.relay import Relay
from smtpplus.delivery.rules import Refusals
from smtpplus.delivery.scheduler import Job, Scheduler
from smtpplus.delivery.spool import EnvelopeError, Spool, local_failure, new_queue_id
from smtpplus.delivery.submitter import Intake, Submitter
from smtpplus.interfaces import IEventRecorder, IStatsRecorder, ISuppressionList
from smtpplus.model import User
from smtpplus.smtp.interfaces import ISubmitter

log = Logger()

# After SIGTERM, attempts in flight get this long to finish; an attempt cut
# short stays "sending" and is retried after the restart.
STOP_GRACE = 3.0
# Dedup records older than the window are deleted every PRUNE_INTERVAL
# seconds, PRUNE_BATCH rows per transaction, at most PRUNE_ROUNDS of them.
PRUNE_INTERVAL = 600.0
PRUNE_BATCH = 5000
PRUNE_ROUNDS = 20


class Delivery:
    """
    Everything delivery holds, wired together.

    @param config: the C{[delivery]} section.
    @param hostname: this server's name (EHLO towards next hops, DSNs,
        generated Message-IDs).
    @param state_dir: the spool lives in its C{spool} directory.
    @param delay_threshold: seconds queued before a C{delivery_delay} event.
    @param clock: every timer and timestamp of delivery.
    @param run_in_thread: where fsyncs and spool reads run.
    @param connector: opens connections to the next hops.
    @param store: the queue records.
    @param relay: the next hop; None: a L{Relay} for C{config}.
    @param suppressions: the users' suppression lists; None: none kept.
    """

    def __init__(
        self,
        config: DeliveryConfig,
        *,
        hostname: str,
        state_dir: str,
        delay_threshold: float,
        clock: IReactorTime,
        run_in_thread: RunInThread,
        connector: IReactorTCP,
        store: IQueueStore,
        events: IEventRecorder | None,
        stats: IStatsRecorder | None,
        relay: IRelay | None = None,
        suppressions: ISuppressionList | None = None,
    ) -> None:
        self.clock = clock
        self.store = store
        self.stats = stats
        self._in_thread = run_in_thread
        self.spool = Spool(os.path.join(state_dir, "spool"))
        self.config = config
        self._connector = connector
        self._hostname = hostname
        self._own_relay = relay is None
        self.relay = relay if relay is not None else Relay(clock, connector, config, hostname)
        self.committer = Committer(run_in_thread, self.spool, self.record)
        self._pruner = LoopingCall(self.prune_dedup)
        self._pruner.clock = clock
        self.intake = Intake(
            clock,
            run_in_thread,
            self.spool,
            self.committer.commit,
            Refusals(events, stats),
            hostname,
            suppressions=suppressions,
            budget=PriorityBudget(clock, store, events),
        )
        self.agent = DeliveryAgent(
            clock,
            run_in_thread,
            store,
            self.spool,
            self.relay,
            events,
            stats,
            config.retry_schedule,
            config.max_queue_lifetime,
            delay_threshold,
            hostname,
            self.submit_internal,
            suppressions=suppressions,
            suppress_hard_bounces=config.suppress_hard_bounces,
        )
        self.scheduler = Scheduler(clock, self.agent.deliver, config.max_concurrency, config.rate_limit)
        self.agent.slots = self.scheduler
        self.query = MessageQuery(
            store,
            clock,
            QueueControl(self.scheduler, self.agent.forget, lambda message_id: run_in_thread(self.spool.erase, message_id)),
        )
        # Accepted files found without a queue row at start-up, queued
        # again once the daemon runs.
        self._orphans: list[str] = []
        store.on_reset(self._rebuild)

    def reconfigure(self, config: DeliveryConfig, delay_threshold: float) -> None:
        """
        Apply a reloaded C{[delivery]} (its C{mode} excepted) and
        C{delivery_delay_threshold} to the attempts that start from now on.
        A changed next hop gets a new relay; the old one finishes the
        messages it is sending, then closes its connections.
        """
        relay_keys = ("smarthost", "smarthost_username", "smarthost_password", "smarthost_tls", "dns_servers")
        config = attrs.evolve(config, mode=self.config.mode)
        new_relay = None
        if self._own_relay and any(getattr(config, k) != getattr(self.config, k) for k in relay_keys):
            new_relay = Relay(self.clock, self._connector, config, self._hostname)
        self.config = config
        self.agent.reconfigure(config.retry_schedule, config.max_queue_lifetime, delay_threshold, new_relay)
        self.agent.suppress_hard_bounces = config.suppress_hard_bounces
        self.scheduler.reconfigure(config.max_concurrency, config.rate_limit)
        if new_relay is not None:
            old, self.relay = self.relay, new_relay
            maybeDeferred(old.close).addErrback(lambda f: log.failure("closing the previous relay failed", f))

    def avatar(self, user: User, standing: Standing | None = None) -> ISubmitter:
        """The L{ISubmitter} for an authenticated user and the session's L{Standing}."""
        return Submitter(user, self.intake, standing)

    def dry_run_avatar(self, user: User) -> Submitter:
        """The submitter the policy dry-run asks: the sessions' rules, nothing recorded, logged or queued."""
        return Submitter(user, self.intake.dry_run())

    def policy_check(self, max_recipients: int) -> PolicyCheck:
        """The policy dry-run of the admin API, for C{[smtp] max_recipients}."""
        return PolicyCheck(self.dry_run_avatar, max_recipients)

    def sign_with(self, keys: DKIMKeys, run_in_thread: RunInThread) -> None:
        """Sign relayed messages with the enabled keys of C{keys}, on C{run_in_thread}."""
        self.agent.signer = Signer(keys, run_in_thread, self._read_message)

    def _read_message(self, message_id: str, length: int) -> bytes:
        """The first C{length} bytes of a spool file: the message without its envelope record (worker thread)."""
        with open(self.spool.path(message_id), "rb") as f:
            return f.read(length)

    def submit_internal(
        self,
        mail_from: str,
        recipients: Sequence[str],
        data: bytes,
        priority: int = 1,
        user: str | None = None,
    ) -> Deferred[str]:
        """
        Queue a message of the daemon's own (bounces, notification mail):
        C{data} is the complete message with CRLF line endings.  Fires with
        the queue id once it is durable.
        """
        now = self.clock.seconds()
        message_id = new_queue_id(now)
        try:
            temp = self.spool.create(message_id)
        except OSError as e:
            return fail(local_failure(e))
        temp.write(data)
        message = NewMessage(
            id=message_id,
            user=user,
            mail_from=mail_from,
            header_from="",
            subject="",
            priority=priority,
            recipients=tuple(recipients),
            campaign_name=None,
            campaign_code=None,
            schedule_at=None,
            size=len(data),
            internal=True,
            created_at=now,
        )
        return self.committer.commit(temp, message)

    def record(self, batch: list[tuple[NewMessage, bytes | None]]) -> Deferred[list[int | Duplicate]]:
        """
        Insert the rows of durable messages (their files are in C{msg/}) in
        one transaction, then count and schedule each; fires with their
        sequence numbers.  C{batch} pairs each message with its bytes when
        they are still in memory, which spares the first attempt a read.

        A message resent within C{dedup_window} is not inserted: its answer
        is a L{Duplicate} of the first, and its file is removed here, where
        every committed file is accounted for (one process or many).
        """

        def inserted(results: list[int | Duplicate]) -> list[int | Duplicate]:
            copies = []
            for (message, content), result in zip(batch, results, strict=True):
                if isinstance(result, Duplicate):
                    log.info(
                        "message {id} is a resent copy of {first} (same user, Message-ID and recipients):"
                        " not queued again",
                        id=message.id,
                        first=result.first_id,
                    )
                    copies.append(message.id)
                    continue
                try:
                    self._queued(message, result, content)
                except Exception:
                    log.failure("scheduling message {id} failed", id=message.id)
            if copies:
                self._in_thread(self.spool.remove, copies).addErrback(
                    lambda f: log.failure("removing the files of resent messages failed", f)
                )
            return results

        return self._insert(batch).addCallback(inserted)

    def _insert(self, batch: list[tuple[NewMessage, bytes | None]]) -> Deferred[list[int | Duplicate]]:
        """
        Insert the rows of C{batch} in one transaction; a store that keeps
        the messages' bytes (PostgreSQL, for every node) gets them in the
        same transaction, read from the spool where not held in memory.
        """
        if not IContentStore.providedBy(self.store):
            return self.store.insert([message for message, _ in batch], self.config.dedup_window)
        store = IContentStore(self.store)
        missing = [message.id for message, content in batch if content is None]
        if not missing:
            return store.insert_with_content(batch, self.config.dedup_window)

        def read(message_ids: list[str]) -> dict[str, bytes]:
            return {message_id: self.spool.read_message(message_id) for message_id in message_ids}

        d = self._in_thread(read, missing)
        d.addCallback(
            lambda read_now: store.insert_with_content(
                [(message, content if content is not None else read_now[message.id]) for message, content in batch],
                self.config.dedup_window,
            )
        )
        return d

    def _queued(self, message: NewMessage, seq: int, content: bytes | None) -> None:
        if self.stats is not None and not message.internal:
            summary = {
                "id": message.id,
                "user": message.user,
                "mail_from": message.mail_from,
                "header_from": message.header_from,
                "subject": message.subject,
                "campaign_code": message.campaign_code,
                "created_at": iso(message.created_at),
                "recipients": len(message.recipients),
            }
            _call_logged(self.stats.accepted, summary)
        if message.status == "queued":
            self.agent.remember(message, content)
        self.scheduler.add(Job(message.id, message.priority, seq, message.user), message.schedule_at)

    def recover(self) -> None:
        """
        At start-up, before the reactor runs: put interrupted attempts back
        in the queue, clean the spool, load the ready set, and note the
        accepted files that have no active queue row (for L{start}).
        """
        self.spool.secure()
        rows = self.store.recover(self.clock.seconds())
        partial, names = self.spool.recover()
        active = {row["id"] for row in rows}
        self._orphans = [name for name in names if name not in active]
        self._schedule(rows)
        log.info(
            "queue recovered: {n} messages waiting, {orphans} spool files without an active queue entry to check, "
            "{partial} partial spool files removed",
            n=len(rows),
            orphans=len(self._orphans),
            partial=partial,
        )

    def start(self) -> None:
        """
        Start delivering, and queue again the accepted files that
        L{recover} found without a queue row (the database was lost).
        """
        self.scheduler.start()
        self._pruner.start(PRUNE_INTERVAL, now=False)
        orphans, self._orphans = self._orphans, []
        if orphans:
            self._requeue(orphans, set()).addCallbacks(
                self._rebuilt, lambda f: log.failure("queueing spool files again failed", f)
            )

    @inlineCallbacks
    def prune_dedup(self) -> Any:
        """
        Forget the dedup records older than the window, a bounded batch per
        transaction so that a large backlog does not hold the database for
        long; at most L{PRUNE_ROUNDS} batches per run.
        """
        before = self.clock.seconds() - self.config.dedup_window
        try:
            for _ in range(PRUNE_ROUNDS):
                removed = yield self.store.prune_dedup(before, PRUNE_BATCH)
                if removed < PRUNE_BATCH:
                    break
        except Exception:
            log.failure("pruning the dedup records failed")

    def stop_pruning(self) -> None:
        """Stop the dedup pruning timer (shutdown)."""
        if self._pruner.running:
            self._pruner.stop()

    def take_over(self, silent_since: float) -> Deferred[None]:
        """
        With a queue shared by nodes: claim and schedule the unfinished
        messages of the nodes silent since C{silent_since} (their lease ran
        out); a no-op with a store of one node's own.
        """
        if not ISharedQueueStore.providedBy(self.store):
            return succeed(None)

        def taken(rows: list[dict[str, Any]]) -> None:
            if not rows:
                return
            taken_from = Counter(row.pop("previous") or "(none)" for row in rows)
            for previous, count in sorted(taken_from.items()):
                log.warn(
                    "node {node} is silent or left: took over {n} of its unfinished messages", node=previous, n=count
                )
            self._schedule(rows)

        d = ISharedQueueStore(self.store).take_over(silent_since, self.clock.seconds())
        return d.addCallbacks(taken, lambda f: log.failure("taking over the messages of silent nodes failed", f))

    def _schedule(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.scheduler.add(Job(row["id"], row["priority"], row["seq"], row["user"]), row["next_attempt"])

    def _rebuild(self) -> None:
        """After the store lost its rows (a new database file): queue again what only the spool still knows."""
        # Attempts holding their message's row store it into the new file
        # with their result (see queue.finish_attempt): not queued twice.
        # An attempt that asked for its row only after the file was
        # replaced found none and ends without a result: its file is
        # queued again here, and the scheduler keeps the new entry.
        busy = set(self.agent.attempting)
        d = self._in_thread(os.listdir, self.spool.msg_dir)
        # A file listed was renamed into msg/ before the listing: if its
        # row is not written yet, the committer still holds it.
        d.addCallback(lambda names: self._requeue(names, busy | self.committer.committing()))
        d.addCallbacks(self._rebuilt, lambda f: log.failure("rebuilding the queue from the spool failed", f))

    def _rebuilt(self, rows: list[dict[str, Any]]) -> None:
        self._schedule(rows)
        log.info("queue rebuilt from the spool: {n} messages queued again", n=len(rows))
        self.agent.wake_held_results()

    @inlineCallbacks
    def _requeue(self, names: list[str], busy: set[str]) -> Any:
        """
        Of the accepted files C{names}: remove those whose message is
        finished (their removal was cut short), queue again those without a
        queue row from their envelope record, set aside those whose record
        cannot be read.  Fires with the scheduling rows of those queued
        again.
        """
        known = yield self.store.statuses(names)
        messages = yield self._in_thread(self._sort_spool_files, names, known, busy)
        if not messages:
            return []
        seqs = yield self._insert([(message, None) for message in messages])
        return [queue.schedule_row(m, seq) for m, seq in zip(messages, seqs, strict=True)]

    def _sort_spool_files(self, names: list[str], known: dict[str, str], busy: set[str]) -> list[NewMessage]:
        """The file work of L{_requeue} (worker thread): the messages to queue again."""
        self.spool.remove([name for name, status in known.items() if status not in queue.ACTIVE])
        messages = []
        for name in names:
            if name in known or name in busy:
                continue
            try:
                envelope = self.spool.read_envelope(self.spool.path(name))
            except FileNotFoundError:
                continue
            except (OSError, EnvelopeError) as e:
                try:
                    where = self.spool.set_aside(name)
                except OSError as moving:
                    log.error("spool file {id} has no readable envelope ({error}) and cannot be moved aside: {moving}",
                              id=name, error=e, moving=moving)
                else:
                    log.error("spool file {id} has no readable envelope ({error}): moved to {where}", id=name, error=e, where=where)
                continue
            message = queue.NewMessage.from_envelope(name, envelope)
            log.warn(
                "message {id} had no queue entry: queued again from its spool file (user {user}, from <{sender}>, "
                "{n} recipients, priority {priority})",
                id=name,
                user=message.user,
                sender=message.mail_from,
                n=len(message.recipients),
                priority=message.priority,
            )
            messages.append(message)
        return messages


def _call_logged(fn: Callable[..., Any], *args: Any) -> None:
    maybeDeferred(fn, *args).addErrback(lambda f: log.failure("statistics call failed", f))


class DeliveryService(Service):
    """Starts the scheduler with the daemon and stops it first on shutdown."""

    name = "delivery"

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery

    def startService(self) -> None:
        Service.startService(self)
        self.delivery.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        self.delivery.stop_pruning()
        clock = self.delivery.clock
        finished: Deferred[None] = Deferred()
        timer = clock.callLater(STOP_GRACE, lambda: done(None))

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not finished.called:
                self.delivery.agent.report_unrecorded()
                finished.callback(None)

        def close_connections(_: object) -> Deferred[None]:
            return maybeDeferred(self.delivery.relay.close)

        self.delivery.scheduler.stop().addBoth(close_connections).addBoth(done)
        return finished


def build_delivery(
    config: DeliveryConfig,
    *,
    hostname: str,
    state_dir: str,
    delay_threshold: float,
    clock: IReactorTime,
    run_in_thread: RunInThread,
    connector: IReactorTCP,
    store: IQueueStore,
    events: IEventRecorder | None,
    stats: IStatsRecorder | None,
    relay: IRelay | None = None,
    suppressions: ISuppressionList | None = None,
) -> tuple[DeliveryService, Callable[[dict[str, Any]], ISubmitter], MessageQuery, Callable[..., Deferred[str]]]:
    """
    Build delivery for the daemon (the arguments are L{Delivery}'s) and
    recover the queue synchronously (start-up, before the reactor runs;
    C{store} is ready).  Returns the service, the avatar factory for the
    realm, the admin read model and the internal submission function.
    """
    delivery = Delivery(
        config,
        hostname=hostname,
        state_dir=state_dir,
        delay_threshold=delay_threshold,
        clock=clock,
        run_in_thread=run_in_thread,
        connector=connector,
        store=store,
        events=events,
        stats=stats,
        relay=relay,
        suppressions=suppressions,
    )
    delivery.recover()
    return DeliveryService(delivery), delivery.avatar, delivery.query, delivery.submit_internal
