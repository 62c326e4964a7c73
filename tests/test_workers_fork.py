"""
The first SMTP workers forked from the coordinator without exec()
(L{smtpplus.workers.fork}): when it is allowed, the child's descriptors,
and state a child must not share with its parent.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any, NoReturn

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from smtpplus.delivery.spool import new_queue_id
from smtpplus.workers.fork import ForkedProcess, can_fork


class _Reactor:
    running = False


class CanForkTests(unittest.TestCase):
    """Forking is refused unless the child could leave the coordinator cleanly behind."""

    def setUp(self) -> None:
        self.reactor = _Reactor()
        self.observer = object()
        self.patch(threading, "active_count", lambda: 1)

    def can_fork(self, reactor: Any, observers: list[Any]) -> bool:
        # As if self.reactor were the installed reactor, for this call only.
        installed = sys.modules["twisted.internet.reactor"]
        sys.modules["twisted.internet.reactor"] = self.reactor
        try:
            return can_fork(reactor, observers)
        finally:
            sys.modules["twisted.internet.reactor"] = installed

    def test_allowed(self) -> None:
        """The installed reactor, not running, one thread, known observers."""
        self.assertTrue(self.can_fork(self.reactor, [self.observer]))

    def test_reactor_not_installed(self) -> None:
        """The child replaces the installed reactor: another one could not be left behind."""
        self.assertFalse(self.can_fork(_Reactor(), [self.observer]))

    def test_reactor_running(self) -> None:
        """Once the reactor has run, its state (and threads) may be anywhere."""
        self.reactor.running = True
        self.assertFalse(self.can_fork(self.reactor, [self.observer]))

    def test_other_thread(self) -> None:
        """A lock another thread holds at the fork would stay held in the child."""
        self.patch(threading, "active_count", lambda: 2)
        self.assertFalse(self.can_fork(self.reactor, [self.observer]))

    def test_unknown_observer(self) -> None:
        """An observer the child cannot remove (twistd --logger) would write the coordinator's log."""
        self.assertFalse(self.can_fork(self.reactor, [None]))


class _Report(ForkedProcess):
    """A forked child that writes its own number into each descriptor named in argv, then lists its descriptors."""

    def _execChild(self, *args: Any) -> NoReturn:
        try:
            for fd in map(int, self._argv):
                os.write(fd, str(fd).encode())
            listed = []
            for fd in range(1024):
                try:
                    os.fstat(fd)
                except OSError:
                    continue
                listed.append(fd)
            os.write(1, json.dumps(listed).encode())
        finally:
            os._exit(0)


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.out = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class DescriptorTests(unittest.TestCase):
    """L{ForkedProcess}'s own descriptor mapping (linear, unlike Process's)."""

    def pipe(self) -> tuple[int, int]:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        return read, write

    def test_swapped_kept_and_closed(self) -> None:
        """
        Two descriptors swapped between parent and child arrive swapped, a
        third keeps its number, and nothing else of the parent is open in
        the child, stdin and stderr included.
        """
        (read_a, write_a), (read_b, write_b), (read_c, write_c) = self.pipe(), self.pipe(), self.pipe()
        stray_read, stray_write = self.pipe()
        protocol = _Collect()
        child_fds: dict[int, Any] = {1: "r", write_a: write_b, write_b: write_a, write_c: write_c}
        _Report(reactor, [str(write_a), str(write_b), str(write_c)], protocol, child_fds, [])
        for fd in (write_a, write_b, write_c, stray_write):
            os.close(fd)

        def check(_: None) -> None:
            self.assertEqual(json.loads(protocol.out), sorted([1, write_a, write_b, write_c]))
            # What the child wrote to its descriptor write_a went down pipe b.
            self.assertEqual(os.read(read_b, 100), str(write_a).encode())
            self.assertEqual(os.read(read_a, 100), str(write_b).encode())
            self.assertEqual(os.read(read_c, 100), str(write_c).encode())
            self.assertEqual(os.read(stray_read, 100), b"", "the child held a descriptor it was not given")

        return protocol.ended.addCallback(check)


class ForkedStateTests(unittest.TestCase):
    """What a forked worker must draw anew rather than inherit."""

    def test_queue_ids_random_part(self) -> None:
        """
        Queue ids of the same millisecond differ between a parent and its
        forked child, even though the parent had random bytes buffered at
        the fork (two workers would otherwise give two messages one id).
        """
        now = 1_800_000_000.0
        new_queue_id(now)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(write, new_queue_id(now).encode())
            finally:
                os._exit(0)
        os.close(write)
        self.addCleanup(os.close, read)
        os.waitpid(pid, 0)
        child = os.read(read, 100).decode()
        parent = new_queue_id(now)
        self.assertEqual(len(child), 16)
        self.assertEqual(child[:9], parent[:9], "same millisecond")
        self.assertNotEqual(child, parent)
