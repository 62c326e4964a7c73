"""
The delivery capability assembled: intake (avatars, spool, group commit),
scheduler, relay and the read model, behind L{build_delivery}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger

from smtpplus.auth.store import Standing
from smtpplus.config import Config
from smtpplus.delivery import queue
from smtpplus.delivery.agent import DeliveryAgent
from smtpplus.delivery.query import MessageQuery, iso
from smtpplus.delivery.queue import Committer, NewMessage
from smtpplus.delivery.relay import Relay
from smtpplus.delivery.rules import Refusals
from smtpplus.delivery.scheduler import Job, Scheduler
from smtpplus.delivery.spool import EnvelopeError, Spool, local_failure, new_queue_id
from smtpplus.delivery.submitter import Intake, Submitter
from smtpplus.smtp.interfaces import ISubmitter

log = Logger()

# After SIGTERM, attempts in flight get this long to finish; an attempt cut
# short stays "sending" and is retried after the restart.
STOP_GRACE = 3.0


class Delivery:
    """Everything delivery holds, wired together."""

    def __init__(self, config: Config, reactor: Any, database: Any, events: Any, stats: Any, relay: Any = None) -> None:
        d = config.delivery
        self.reactor = reactor
        self.database = database
        self.stats = stats
        self.spool = Spool(os.path.join(config.server.state_dir, "spool"))
        self.relay = relay if relay is not None else Relay(reactor, d, config.server.hostname)
        self.committer = Committer(reactor, database, self.spool, self._queued)
        self.intake = Intake(reactor, self.spool, self.committer.commit, Refusals(events, stats), config.server.hostname)
        self.agent = DeliveryAgent(
            reactor,
            database,
            self.spool,
            self.relay,
            events,
            stats,
            d.retry_schedule,
            d.max_queue_lifetime,
            config.notifications.delivery_delay_threshold,
            config.server.hostname,
            self.submit_internal,
        )
        self.scheduler = Scheduler(reactor, self.agent.deliver, d.max_concurrency, d.rate_limit)
        self.query = MessageQuery(database)
        database.on_reopen(self._rebuild)

    def avatar(self, user: dict[str, Any], standing: Standing | None = None) -> ISubmitter:
        """The L{ISubmitter} for an authenticated user (its user dict and the session's L{Standing})."""
        return Submitter(user, self.intake, standing)

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
        now = self.reactor.seconds()
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
        in the queue, clean the spool, queue again every accepted file that
        has no queue row (the database was lost), and load the ready set.
        """
        self.spool.secure()
        rows = self.database.run_sync(queue.recover, self.reactor.seconds())
        partial, names = self.spool.recover()
        active = {row["id"] for row in rows}
        rebuilt = self.database.run_sync(self._requeue, [name for name in names if name not in active], set())
        for row in rows + rebuilt:
            self.scheduler.add(Job(row["id"], row["priority"], row["seq"], row["user"]), row["next_attempt"])
        log.info(
            "queue recovered: {n} messages waiting ({requeued} of them queued again from the spool), "
            "{partial} partial spool files removed",
            n=len(rows) + len(rebuilt),
            requeued=len(rebuilt),
            partial=partial,
        )

    def _rebuild(self) -> None:
        """After the database file was replaced by a new one: queue again what only the spool still knows."""
        # Attempts in flight store their result into the new file
        # themselves (see queue.finish_attempt): not queued twice.
        busy = set(self.scheduler.in_flight)

        def requeue(conn: Any) -> list[dict[str, Any]]:
            return self._requeue(conn, os.listdir(self.spool.msg_dir), busy)

        def schedule(rows: list[dict[str, Any]]) -> None:
            for row in rows:
                self.scheduler.add(Job(row["id"], row["priority"], row["seq"], row["user"]), row["next_attempt"])
            log.info("queue rebuilt from the spool: {n} messages queued again", n=len(rows))
            self.agent.wake_held_results()

        self.database.write(requeue).addCallbacks(
            schedule, lambda f: log.failure("rebuilding the queue from the spool failed", f)
        )

    def _requeue(self, conn: Any, names: list[str], busy: set[str]) -> list[dict[str, Any]]:
        """
        Of the accepted files C{names}: remove those whose message is
        finished (their removal was cut short), queue again those without a
        queue row from their envelope record, set aside those whose record
        cannot be read.  Returns the scheduling data of those queued again
        (database thread, or start-up).
        """
        known = queue.statuses(conn, names)
        finished = [name for name, status in known.items() if status not in queue.ACTIVE]
        self.spool.remove(finished)
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
        return queue.requeue(conn, messages) if messages else []


def _call_logged(fn: Callable[..., Any], *args: Any) -> None:
    maybeDeferred(fn, *args).addErrback(lambda f: log.failure("statistics call failed", f))


class DeliveryService(Service):
    """Starts the scheduler with the daemon and stops it first on shutdown."""

    name = "delivery"

    def __init__(self, delivery: Delivery) -> None:
        self.delivery = delivery

    def startService(self) -> None:
        Service.startService(self)
        self.delivery.scheduler.start()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        clock = self.delivery.reactor
        finished: Deferred[None] = Deferred()
        timer = clock.callLater(STOP_GRACE, lambda: done(None))

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not finished.called:
                self.delivery.agent.report_unrecorded()
                finished.callback(None)

        def close_connections(_: object) -> Deferred[None] | None:
            close = getattr(self.delivery.relay, "close", None)
            return maybeDeferred(close) if close is not None else None

        self.delivery.scheduler.stop().addBoth(close_connections).addBoth(done)
        return finished


def build_delivery(
    config: Config, reactor: Any, database: Any, events: Any, stats: Any, relay: Any = None
) -> tuple[DeliveryService, Callable[[dict[str, Any]], ISubmitter], MessageQuery, Callable[..., Deferred[str]]]:
    """
    Build delivery for the daemon: migrates its tables and recovers the
    queue synchronously (start-up, before the reactor runs).  Returns the
    service, the avatar factory for the realm, the admin read model and the
    internal submission function.
    """
    database.migrate(queue.COMPONENT, queue.MIGRATIONS)
    delivery = Delivery(config, reactor, database, events, stats, relay)
    delivery.recover()
    return DeliveryService(delivery), delivery.avatar, delivery.query, delivery.submit_internal
