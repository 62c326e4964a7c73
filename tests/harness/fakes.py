"""
In-process fakes: the SMTP layer's collaborators (login service,
submitter avatar, message writer) behind the interfaces of
L{smtpplus.smtp.interfaces}, and recorders of events and statistics.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from smtpplus.smtp.interfaces import (
    Envelope,
    ILoginService,
    IMessageWriter,
    ISubmitter,
    LoginThrottled,
    SessionInfo,
)
from smtpplus.smtp.protocol import SessionSettings


def session_settings(**overrides: object) -> SessionSettings:
    """Session limits for a test server: small ones by default, C{overrides} by name."""
    values: dict[str, object] = dict(
        hostname="mx.example.test",
        max_message_size=1000,
        max_recipients=3,
        max_connections=10,
        max_connections_per_ip=5,
        idle_timeout=300,
        auth_requires_tls=True,
    )
    values.update(overrides)
    return SessionSettings(**values)  # type: ignore[arg-type]


@implementer(IMessageWriter)
class FakeWriter:
    """Collects the message; C{result} decides what eomReceived answers."""

    def __init__(self, envelope: Envelope, result: Any = "Q1") -> None:
        self.envelope = envelope
        self.result = result
        self.chunks: list[bytes] = []
        self.eom = False
        self.lost = False

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        assert not self.lost, "write after connectionLost"
        self.chunks.append(data)

    def eomReceived(self) -> Deferred[str]:
        self.eom = True
        if isinstance(self.result, Deferred):
            return self.result
        if isinstance(self.result, BaseException):
            return fail(self.result)
        return succeed(self.result)

    def connectionLost(self) -> None:
        self.lost = True


@implementer(ISubmitter)
class FakeSubmitter:
    """
    An avatar that accepts everything unless told otherwise.  With
    C{asynchronous = True}, validateFrom/validateTo return Deferreds kept in
    C{pending} for the test to fire.
    """

    def __init__(self, username: str = "alice") -> None:
        self.username = username
        self.asynchronous = False
        self.pending: list[Deferred[None]] = []
        self.from_calls: list[tuple[SessionInfo, str, int | None]] = []
        self.to_calls: list[str] = []
        self.refuse_from: Exception | None = None
        self.refuse_to: dict[str, Exception] = {}
        self.writers: list[FakeWriter] = []
        self.eom_result: Any = "Q1"

    def _answer(self, error: Exception | None) -> Any:
        if self.asynchronous:
            d: Deferred[None] = Deferred()
            self.pending.append(d)
            if error is not None:
                d.addCallback(lambda _: (_ for _ in ()).throw(error))
            return d
        if error is not None:
            raise error
        return None

    def validateFrom(self, session: SessionInfo, mail_from: str, mt_priority: int | None) -> Any:
        self.from_calls.append((session, mail_from, mt_priority))
        return self._answer(self.refuse_from)

    def validateTo(self, session: SessionInfo, mail_from: str, recipient: str) -> Any:
        self.to_calls.append(recipient)
        return self._answer(self.refuse_to.get(recipient))

    def openMessage(self, envelope: Envelope) -> FakeWriter:
        writer = FakeWriter(envelope, self.eom_result)
        self.writers.append(writer)
        return writer


@implementer(ILoginService)
class FakeLogin:
    """
    C{alice}/C{secret} logs in; C{locked} is throttled; anything else is
    unauthorized.  With C{deferred} set, login answers only when the test
    fires it.
    """

    def __init__(self) -> None:
        self.submitter = FakeSubmitter()
        self.logouts = 0
        self.attempts: list[tuple[str, str, str]] = []
        self.deferred: Deferred[Any] | None = None

    def _logout(self) -> None:
        self.logouts += 1

    def login(self, username: str, password: str, peer_ip: str) -> Deferred[Any]:
        self.attempts.append((username, password, peer_ip))
        if self.deferred is not None:
            return self.deferred
        if username == "locked":
            return fail(LoginThrottled())
        if (username, password) == ("alice", "secret"):
            return succeed((self.submitter, self._logout))
        return fail(UnauthorizedLogin())


@implementer(ILoginService)
class AvatarLogin:
    """Logs in one user with one password, handing out C{avatar_factory(user)}; no throttling."""

    def __init__(self, avatar_factory: Any, user: Any, password: str) -> None:
        self.avatar_factory = avatar_factory
        self.user = user
        self.password = password

    def login(self, username: str, password: str, peer_ip: str) -> Deferred[Any]:
        if (username, password) != (self.user.username, self.password):
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
        """The events of type C{kind}."""
        return [e for e in self.events if e[0] == kind]

    def rejections(self) -> list[tuple[Any, ...]]:
        """The arguments of each C{rejected} call: (user, mail_from, header_from, subject)."""
        return [args for name, args in self.calls if name == "rejected"]

    def accepted(self, message: dict[str, Any]) -> None:
        self.calls.append(("accepted", (message,)))

    def rejected(self, user: str, mail_from: str, header_from: str, subject: str) -> None:
        self.calls.append(("rejected", (user, mail_from, header_from, subject)))

    def recipient_result(self, message: dict[str, Any], status: str, previous: str | None = None) -> None:
        self.calls.append(("recipient_result", (message, status, previous)))
