"""
Real parts for the delivery tests: an aiosmtpd smarthost in a thread that
answers per recipient as told, an smtplib client in a thread, the real SMTP
server factory, and a stack that wires delivery to them on 127.0.0.1 (its
timers on the reactor, or on a L{Clock} the test advances).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import smtplib
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from aiosmtpd.controller import Controller
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread

from smtpplus.config import config_from_text
from smtpplus.delivery.queue import SQLiteQueueStore
from smtpplus.delivery.service import build_delivery
from smtpplus.delivery.threads import reactor_runner
from smtpplus.model import User
from smtpplus.smtp.protocol import SessionRegistry, SessionSettings, SMTPServerFactory
from smtpplus.storage.database import Database

USER = User("alice", authorized_domains=["example.com"], authorized_senders=["boss@other.org"])
PASSWORD = "secret-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler:
    def __init__(self, server: FakeSmarthost) -> None:
        self.server = server

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        with self.server.lock:
            script = self.server.replies.get(address.lower())
            reply = script.pop(0) if script and len(script) > 1 else (script[0] if script else "250 2.1.5 OK")
            self.server.rcpt_log.append((address, reply))
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.server.delay:
            await asyncio.sleep(self.server.delay)
        with self.server.lock:
            self.server.messages.append(
                {
                    "mail_from": "" if envelope.mail_from == "<>" else envelope.mail_from,
                    "rcpt_tos": list(envelope.rcpt_tos),
                    "data": envelope.original_content,
                    "tls": session.ssl is not None,
                    # One (address, port) per client connection.
                    "peer": tuple(session.peer),
                }
            )
        return "250 2.0.0 Ok: queued at smarthost"


class FakeSmarthost:
    """
    An aiosmtpd server on 127.0.0.1.  C{replies[address]} is a list of RCPT
    replies used in turn (the last one repeats); default 250.
    """

    def __init__(self, delay: float = 0.0, port: int | None = None, **controller_args: Any) -> None:
        self.lock = threading.Lock()
        self.replies: dict[str, list[str]] = {}
        self.messages: list[dict[str, Any]] = []
        self.rcpt_log: list[tuple[str, str]] = []
        self.delay = delay
        self.port = port or free_port()
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port, **controller_args)
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.messages)

    def connections(self) -> int:
        """How many client connections carried the messages received so far."""
        return len({m["peer"] for m in self.received()})


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


@inlineCallbacks
def wait_until(predicate: Any, timeout: float = 10.0, step: float = 0.02) -> Any:
    """Poll C{predicate} on the reactor until true; fails after C{timeout} seconds."""
    for _ in range(int(timeout / step)):
        value = predicate()
        if isinstance(value, Deferred):
            value = yield value
        if value:
            return value
        yield deferLater(reactor, step, lambda: None)
    raise AssertionError(f"condition not met within {timeout} s")


def smtp_submit(
    port: int,
    mail_from: str,
    recipients: Sequence[str],
    data: bytes,
    mail_options: Sequence[str] = (),
    username: str = "alice",
    password: str = PASSWORD,
) -> Deferred[tuple[int, str]]:
    """Submit one message with smtplib in a thread; fires with the first non-2xx reply or the DATA reply."""

    def run() -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            # Lets a test send an internationalized address as raw UTF-8.
            s.command_encoding = "utf-8"
            s.ehlo("client.test")
            s.login(username, password)
            code, resp = s.mail(mail_from, list(mail_options))
            if code != 250:
                return code, resp.decode()
            for r in recipients:
                code, resp = s.rcpt(r)
                if code != 250:
                    return code, resp.decode()
            try:
                code, resp = s.data(data)
            except smtplib.SMTPResponseException as e:
                return e.smtp_code, e.smtp_error.decode()
            return code, resp.decode()

    return deferToThread(run)


def queue_id(reply: str) -> str:
    return reply.rsplit("queued as ", 1)[1].strip()


class _FakeLogin:
    def __init__(self, avatar_factory: Any, user: User) -> None:
        self.avatar_factory = avatar_factory
        self.user = user

    def login(self, username: str, password: str, peer_ip: str) -> Deferred[Any]:
        from twisted.cred.error import UnauthorizedLogin
        from twisted.internet.defer import fail

        if username != self.user.username or password != PASSWORD:
            return fail(UnauthorizedLogin())
        return succeed((self.avatar_factory(self.user), lambda: None))


class Recorder:
    """Records IEventRecorder and IStatsRecorder calls."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, str | None, str]] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def record(self, type: str, user: str | None, message_id: str | None, detail: str) -> Deferred[dict[str, Any]]:
        self.events.append((type, user, message_id, detail))
        return succeed({"type": type})

    def of(self, kind: str) -> list[tuple[str, str | None, str | None, str]]:
        return [e for e in self.events if e[0] == kind]

    def accepted(self, message: dict[str, Any]) -> None:
        self.calls.append(("accepted", (message,)))

    def rejected(self, user: str, mail_from: str, header_from: str, subject: str) -> None:
        self.calls.append(("rejected", (user, mail_from, header_from, subject)))

    def recipient_result(self, message: dict[str, Any], status: str, previous: str | None = None) -> None:
        self.calls.append(("recipient_result", (message, status, previous)))


def wall_clock() -> Clock:
    """
    A L{Clock} set to the current second (queue ids and dates look real,
    and a time written to the second is exact); it moves only when advanced.
    """
    clock = Clock()
    clock.advance(int(time.time()))
    return clock


def make_config(state_dir: str, delivery: str) -> Any:
    return config_from_text(
        f'[server]\nhostname = "relay.test"\nstate_dir = "{state_dir}"\n'
        "[notifications]\ndelivery_delay_threshold = 3600\n"
        f"[delivery]\n{delivery}\n"
    )


class Stack:
    """
    Delivery wired to a real database, a real SMTP listener and (by default)
    a fake smarthost; everything is torn down by the test's cleanups.

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
        smarthost: FakeSmarthost | None = None,
        state_dir: str | None = None,
        relay: Any = None,
        notifications_threshold: int | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.testcase = testcase
        if smarthost is None:
            smarthost = FakeSmarthost()
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
        settings = SessionSettings(
            hostname="relay.test",
            max_message_size=10_000_000,
            max_recipients=100,
            max_connections=100,
            max_connections_per_ip=100,
            idle_timeout=60,
            auth_requires_tls=False,
        )
        self.registry = SessionRegistry(settings, reactor)
        factory = SMTPServerFactory(self.registry, _FakeLogin(self.avatar_factory, user or USER), None)
        self.listener = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port = self.listener.getHost().port
        testcase.addCleanup(self._stop_listener)

    def start(self) -> None:
        if not self.started:
            self.started = True
            self.service.startService()
            self.testcase.addCleanup(self.service.stopService)

    @inlineCallbacks
    def _stop_listener(self) -> Any:
        yield self.listener.stopListening()
        yield self.registry.drain(1.0)

    def submit(self, mail_from: str, recipients: Sequence[str], data: bytes, mail_options: Sequence[str] = ()) -> Deferred[tuple[int, str]]:
        return smtp_submit(self.port, mail_from, recipients, data, mail_options)

    def message(self, message_id: str) -> Deferred[dict[str, Any] | None]:
        return self.query.get_message(message_id)

    def wait_status(self, message_id: str, *statuses: str, timeout: float = 10.0) -> Deferred[dict[str, Any]]:
        def check() -> Deferred[Any]:
            return self.message(message_id).addCallback(lambda m: m if m and m["status"] in statuses else None)

        return wait_until(check, timeout)


def simple_message(subject: str = "hello", sender: str = "me@example.com", extra: str = "") -> bytes:
    return (
        f"From: Me <{sender}>\r\nTo: you@dest.test\r\nSubject: {subject}\r\n{extra}\r\nBody line one.\r\n.dotted line\r\n"
    ).encode()


def tls_context(directory: str) -> Any:
    """A server-side ssl.SSLContext with a fresh self-signed certificate for aiosmtpd."""
    import ssl

    from smtpplus.smtp.tls import generate_self_signed

    os.makedirs(directory, exist_ok=True)
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    generate_self_signed("smarthost.test", cert_path, key_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context
