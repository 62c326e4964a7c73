"""
Waiting for a condition, bounded in time: L{poll} blocks the calling
thread (for tests that drive the daemon from outside), L{wait_until}
yields to the reactor (for tests whose code under test runs on it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks


def poll(check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Call C{check} until it returns something true, at most C{timeout} seconds; return its last result."""
    deadline = time.monotonic() + timeout
    result = check()
    while not result and time.monotonic() < deadline:
        time.sleep(interval)
        result = check()
    return result


@inlineCallbacks
def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.02) -> Any:
    """
    Call C{predicate} (which may return a Deferred) on the reactor every
    C{step} seconds until its result is true, and fire with that result;
    fail after C{timeout} seconds.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(int(timeout / step)):
        value = predicate()
        if isinstance(value, Deferred):
            value = yield value
        if value:
            return value
        yield deferLater(reactor, step, lambda: None)
    raise AssertionError(f"condition not met within {timeout} s")
