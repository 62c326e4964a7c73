"""
bcrypt, off the reactor thread.

bcrypt is deliberately slow CPU work; it runs on a small thread pool of its
own (like tahoe-lafs's C{cputhreadpool}) so that it never stalls the reactor
and never queues behind DNS lookups on the reactor's shared pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import bcrypt
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

DEFAULT_ROUNDS = 12
# bcrypt looks at the first 72 bytes only (and bcrypt 5 refuses longer
# input); a longer password cannot be one this server generated.
MAX_PASSWORD_BYTES = 72


class PasswordHasher(Service):
    """
    Hashes and verifies passwords with bcrypt on a bounded thread pool that
    this service starts and stops.  With C{reactor=None} the work runs
    synchronously, for tests and tools.
    """

    name = "bcrypt-pool"

    def __init__(self, reactor: IReactorThreads | None, threads: int = 0, rounds: int = DEFAULT_ROUNDS) -> None:
        # Leave one core to the reactor: a login storm must not stall sessions.
        threads = threads or max(1, (os.cpu_count() or 2) - 1)
        self._reactor = reactor
        self._rounds = rounds
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="smtpplus-bcrypt") if reactor else None

    def startService(self) -> None:
        Service.startService(self)
        if self._pool is not None:
            self._pool.start()

    def stopService(self) -> None:
        Service.stopService(self)
        if self._pool is not None:
            self._pool.stop()

    def _defer(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._pool is None or self._reactor is None:
            return maybeDeferred(fn, *args)
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def hash(self, password: str) -> Deferred[bytes]:
        """Fire with the bcrypt hash of C{password}."""
        return self._defer(_hash, password.encode("utf-8"), self._rounds)

    def verify(self, password: str, password_hash: bytes) -> Deferred[bool]:
        """Fire with whether C{password} matches C{password_hash}."""
        return self._defer(_verify, password.encode("utf-8"), password_hash)


def _hash(password: bytes, rounds: int) -> bytes:
    return bcrypt.hashpw(password, bcrypt.gensalt(rounds))


def _verify(password: bytes, password_hash: bytes) -> bool:
    if len(password) > MAX_PASSWORD_BYTES or b"\0" in password:
        return False
    try:
        return bcrypt.checkpw(password, password_hash)
    except ValueError:
        return False
