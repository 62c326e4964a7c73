"""
Delivery inside the test process: a real database, spool and SMTP
listener on 127.0.0.1, delivering to an aiosmtpd smarthost, its timers on
the reactor or on a L{Clock} the test advances.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock

from smtpplus.config import Config, config_from_text
from smtpplus.delivery.queue import SQLiteQueueStore
from smtpplus.delivery.service import build_delivery
from smtpplus.delivery.threads import reactor_runner
from smtpplus.model import User
from smtpplus.smtp.protocol import SessionRegistry, SMTPServerFactory
from smtpplus.storage.database import Database
from tests.harness.clients import submit_in_thread
from tests.harness.fakes import AvatarLogin, Recorder, session_settings
from tests.harness.messages import queue_id, simple_message
from tests.harness.polling import wait_until
from tests.harness.smarthost import Smarthost

USER = User("alice", authorized_domains=["example.com"], authorized_senders=["boss@other.org"])
PASSWORD = "secret-pw"


def wall_clock() -> Clock:
    """
    A L{Clock} set to the current second (queue ids and dates look real,
    and a time written to the second is exact); it moves only when advanced.
    """
    clock = Clock()
    clock.advance(int(time.time()))
    return clock


def make_config(state_dir: str, delivery: str) -> Config:
    """A config for a relay.test server with C{delivery} as its [delivery] table."""
    return config_from_text(
        f'[server]\nhostname = "relay.test"\nstate_dir = "{state_dir}"\n'
        "[notifications]\ndelivery_delay_threshold = 3600\n"
        f"[delivery]\n{delivery}\n"
    )


def smtp_submit(
    port: int,
    mail_from: str,
    recipients: Sequence[str],
    data: bytes,
    mail_options: Sequence[str] = (),
    username: str = "alice",
    password: str = PASSWORD,
) -> Deferred[tuple[int, str]]:
    """Submit one message as the stack's user with smtplib in a thread; the first refusal or the DATA reply."""
    return submit_in_thread(port, mail_from, recipients, data, username, password, mail_options)


class Stack:
    """
    Delivery wired to a real database, a real SMTP listener and (by default)
    a smarthost; everything is torn down by the test's cleanups.

    @param clock: delivery's timers and timestamps (retries, expiry,
        delivery delay, idle connections); by default the reactor.  With a
        L{Clock} the test moves time itself, while sockets, threads and the
        database still run on the reactor.
    """

    def __init__(
        self,
        testcase: Any,
        delivery: str = "",
        user: User | None = None,
        start: bool = True,
        smarthost: Smarthost | None = None,
        state_dir: str | None = None,
        relay: Any = None,
        notifications_threshold: int | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.testcase = testcase
        if smarthost is None:
            smarthost = Smarthost()
            testcase.addCleanup(smarthost.stop)
        self.smarthost = smarthost
        self.state_dir = state_dir or os.path.abspath(testcase.mktemp())
        os.makedirs(self.state_dir, exist_ok=True)
        if "mode" not in delivery:
            delivery = f'mode = "smarthost"\nsmarthost = "127.0.0.1:{smarthost.port}"\n' + delivery
        config = make_config(self.state_dir, delivery)
        self.config = config
        self.clock = clock if clock is not None else reactor
        self.recorder = Recorder()
        self.database = Database(reactor, os.path.join(self.state_dir, "smtpplus.db"))
        testcase.addCleanup(self.database.stop)
        self.store = SQLiteQueueStore(self.database)
        self.store.migrate()
        self.service, self.avatar_factory, self.query, self.submit_internal = build_delivery(
            config.delivery,
            hostname=config.server.hostname,
            state_dir=self.state_dir,
            delay_threshold=(
                notifications_threshold
                if notifications_threshold is not None
                else config.notifications.delivery_delay_threshold
            ),
            clock=self.clock,
            run_in_thread=reactor_runner(reactor),
            connector=reactor,
            store=self.store,
            events=self.recorder,
            stats=self.recorder,
            relay=relay,
        )
        self.delivery = self.service.delivery
        self.started = False
        if start:
            self.start()
        settings = session_settings(
            hostname="relay.test", max_message_size=10_000_000, max_recipients=100, max_connections=100,
            max_connections_per_ip=100, idle_timeout=60, auth_requires_tls=False,
        )
        self.registry = SessionRegistry(settings, reactor)
        factory = SMTPServerFactory(self.registry, AvatarLogin(self.avatar_factory, user or USER, PASSWORD), None)
        self.listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self.listener.getHost().port
        testcase.addCleanup(self._stop_listener)

    def start(self) -> None:
        """Start delivery (once); it stops with the test."""
        if not self.started:
            self.started = True
            self.service.startService()
            self.testcase.addCleanup(self.service.stopService)

    @inlineCallbacks
    def _stop_listener(self) -> Any:
        yield self.listener.stopListening()
        yield self.registry.drain(1.0)

    def submit(self, mail_from: str, recipients: Sequence[str], data: bytes, mail_options: Sequence[str] = ()) -> Deferred[tuple[int, str]]:
        """Submit over SMTP as the stack's user."""
        return smtp_submit(self.port, mail_from, recipients, data, mail_options)

    def message(self, message_id: str) -> Deferred[dict[str, Any] | None]:
        """The message as the admin API shows it."""
        return self.query.get_message(message_id)

    @inlineCallbacks
    def attempted(self, recipients: Sequence[str], status: str, data: bytes | None = None) -> Any:
        """
        Submit C{data} (a simple message by default) from C{me@example.com},
        which must be accepted; fire with its queue id once it has C{status}
        and its attempt has ended.
        """
        code, text = yield self.submit("me@example.com", recipients, data if data is not None else simple_message())
        assert code == 250, (code, text)
        message_id = queue_id(text)
        yield self.wait_status(message_id, status)
        yield self.settled()
        return message_id

    def settled(self) -> Deferred[Any]:
        """Fires once no attempt is in flight (its result is stored)."""
        return wait_until(lambda: not self.delivery.scheduler.in_flight)

    @inlineCallbacks
    def next_attempt(self, seconds: float) -> Any:
        """Move the stack's L{Clock} by C{seconds}, which must start one attempt, and wait for its end."""
        started = self.delivery.scheduler.started
        self.clock.advance(seconds)  # type: ignore[attr-defined]
        assert self.delivery.scheduler.started == started + 1, (started, self.delivery.scheduler.started)
        yield self.settled()

    def wait_status(self, message_id: str, *statuses: str, timeout: float = 10.0) -> Deferred[dict[str, Any]]:
        """Fires with the message once its status is one of C{statuses}."""

        def check() -> Deferred[Any]:
            return self.message(message_id).addCallback(lambda m: m if m and m["status"] in statuses else None)

        return wait_until(check, timeout)
