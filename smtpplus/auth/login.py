"""
L{ILoginService} for the SMTP sessions: throttling in front of a cred
L{Portal} of the user checker and the submitter realm.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpplus.auth.checker import UnknownUser, UserChecker
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.auth.realm import AvatarFactory, SubmitterRealm
from smtpplus.interfaces import IUserStore
from smtpplus.metrics import UNCOUNTED, Metrics
from smtpplus.smtp.interfaces import ILoginService, ISubmitter, LoginThrottled, LoginUnavailable
from smtpplus.storage.database import StorageUnavailable

log = Logger()


class Throttle(Protocol):
    """What L{LoginService} asks of a throttle: a L{LoginThrottle} or a worker's proxy of one."""

    def refused(self, username: str, ip: str) -> bool | Deferred[bool]: ...

    def failed(self, username: str, ip: str, known_user: bool) -> float | Deferred[float]: ...

    def succeeded(self, username: str, ip: str) -> object: ...


@implementer(ILoginService)
class LoginService:
    """
    Logs SMTP clients in through a cred portal, throttled per IP and
    username; counts every refused login (wrong credentials or locked) in
    C{metrics}.

    C{throttle} answers C{refused} and C{failed} either at once (the
    L{LoginThrottle} of a single process) or with a Deferred (a worker
    process asking the coordinator, which holds the one throttle of the
    node).
    """

    def __init__(
        self, portal: Portal, throttle: Throttle, clock: IReactorTime, metrics: Metrics = UNCOUNTED
    ) -> None:
        self._portal = portal
        self._throttle = throttle
        self._clock = clock
        self._metrics = metrics

    def login(self, username: str, password: str, peer_ip: str) -> Deferred[Any]:
        d = maybeDeferred(self._throttle.refused, username, peer_ip)
        d.addCallback(self._check, username, password, peer_ip)

        def unavailable(failure: Failure) -> Failure:
            # An outage is logged once by the store; here one line, no traceback.
            failure.trap(StorageUnavailable)
            log.info("AUTH for {username!r} from {ip}: the accounts cannot be read now", username=username, ip=peer_ip)
            raise LoginUnavailable(str(failure.value))

        return d.addErrback(unavailable)

    def _check(self, refused: bool, username: str, password: str, peer_ip: str) -> Deferred[Any]:
        if refused:
            log.info("AUTH refused for {username!r} from {ip}: locked", username=username, ip=peer_ip)
            self._metrics.auth_failed()
            return fail(LoginThrottled())
        d = self._portal.login(UsernamePassword(username, password), None, ISubmitter)

        def succeeded(result: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            _, avatar, logout = result
            self._throttle.succeeded(username, peer_ip)
            # The session's own log line names the user; one line per login is enough.
            log.debug("AUTH success for {username!r} from {ip}", username=username, ip=peer_ip)
            return avatar, logout

        def failed(failure: Failure) -> Deferred[Any] | Failure:
            if not failure.check(UnauthorizedLogin):
                return failure
            self._metrics.auth_failed()
            log.info("AUTH failure for {username!r} from {ip}", username=username, ip=peer_ip)
            known = not failure.check(UnknownUser)
            d = maybeDeferred(self._throttle.failed, username, peer_ip, known)
            # Answer the failure late, never holding the reactor.
            return d.addCallback(lambda delay: deferLater(self._clock, delay, lambda: failure))

        return d.addCallbacks(succeeded, failed)


def build_login_service(
    store: IUserStore,
    hasher: PasswordHasher,
    throttle: Throttle,
    avatar_factory: AvatarFactory,
    clock: IReactorTime,
    metrics: Metrics = UNCOUNTED,
) -> tuple[LoginService, UserChecker]:
    """Wire checker, realm and portal; returns the service and its checker."""
    checker = UserChecker(store, hasher, clock)
    portal = Portal(SubmitterRealm(store, avatar_factory), [checker])
    return LoginService(portal, throttle, clock, metrics), checker
