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
from smtpplus.delivery.spool import Spool, local_failure, new_queue_id
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
        in the queue, clean the spool and load the ready set.
        """
        rows = self.database.run_sync(queue.recover, self.reactor.seconds())
        partial, orphans = self.spool.recover({row["id"] for row in rows})
        for row in rows:
            self.scheduler.add(Job(row["id"], row["priority"], row["seq"], row["user"]), row["next_attempt"])
        log.info(
            "queue recovered: {n} messages waiting, {partial} partial and {orphans} unrecorded spool files removed",
            n=len(rows),
            partial=partial,
            orphans=orphans,
        )


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
        timer = clock.callLater(STOP_GRACE, lambda: finished.called or finished.callback(None))

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not finished.called:
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
