"""
The two ways delivery runs blocking work (fsync, file reads): on a thread
pool of the reactor, or, in unit tests, at once on the calling thread.
Both satisfy L{smtpplus.delivery.interfaces.RunInThread}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

from smtpplus.delivery.interfaces import RunInThread


def reactor_runner(reactor: IReactorThreads) -> RunInThread:
    """
    Run work on C{reactor}'s thread pool; results come back to the reactor
    thread.  The pool is looked up per call: the reactor makes it only when
    first asked (after twistd has forked) and again after a restart.
    """

    def run_in_thread(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)

    return run_in_thread


def run_synchronously(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run C{fn(*args)} now, on the calling thread: for tests on a Clock."""
    return maybeDeferred(fn, *args)
