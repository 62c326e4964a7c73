"""
Starting the daemon's first SMTP workers by fork() alone, without exec().

A new interpreter spends about 0.7 s importing Python, Twisted and the SMTP
side before it serves; a child forked from the coordinator has imported
all of that already and serves a few hundredths of a second after the
fork.  So the workers started with the daemon are forked (the 3,980-port
default must serve within 2 s), and a worker started again after one died
is a new interpreter (L{smtpplus.workers.worker.main}): by then the
coordinator runs threads, and a lock one of them held at the fork would
stay held in the child for ever.

Twisted supports fork() only as the first half of fork-and-exec, so this
departs from it where it must, and only while that is safe: before the
coordinator's reactor has run, while this process has no other thread, and
while the only log observer is the daemon's own, which the child removes.
Otherwise the first workers are new interpreters as well.

In the child nothing of the coordinator is used again: every descriptor but
the worker's own is closed (L{process.Process} does that before its exec),
the coordinator's objects are frozen out of the garbage collector (a
finalizer would close a descriptor number the child has reused), signal
handlers are reset, and a new reactor of the same kind replaces the
coordinator's.  The child ends with C{os._exit}: it never returns into the
coordinator's code.

A forked worker must not open the SQLite database either: SQLite keeps a
per-process table of the files it has open, with their lock state, and the
child inherits the coordinator's (whose descriptors are closed here), so a
connection opened in the child believes it holds locks it does not.  A
trial with the workers inserting their own queue rows reported "database
disk image is malformed" within seconds.  A worker that must write the
database has to be a new interpreter, or forked after the coordinator has
closed its connection (tried too: 40,001 messages, integrity_check clean).
"""

from __future__ import annotations

import fcntl
import gc
import os
import resource
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from twisted.internet import process
from twisted.internet.main import installReactor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, globalLogPublisher

# What the child inherited and must keep alive: the coordinator's reactor,
# whose epoll and waker descriptors are closed and whose numbers the child
# may reuse.
_INHERITED: list[Any] = []


def can_fork(reactor: Any, observers: Sequence[ILogObserver | None]) -> bool:
    """
    Whether workers may be forked from this process now: C{reactor} is the
    installed one and has not run, no other thread exists, and every log
    observer the child must remove is known (C{observers} holds no None).
    """
    return (
        hasattr(os, "fork")
        and reactor is sys.modules.get("twisted.internet.reactor")
        and not reactor.running
        and threading.active_count() == 1
        and None not in observers
    )


class ForkedProcess(process.Process):
    """
    A worker forked from this process: a L{process.Process} (descriptor
    mapping, pipes, reaping) whose child runs the worker instead of exec().

    @param argv: the worker's arguments (L{smtpplus.workers.worker.run}).
    @param observers: the log observers of this process, removed in the child.
    """

    def __init__(
        self,
        reactor: Any,
        argv: list[str],
        proto: ProcessProtocol,
        child_fds: dict[int, Any],
        observers: Sequence[ILogObserver],
    ) -> None:
        self._argv = argv
        self._observers = observers
        args = [sys.executable, "-m", "smtpplus.workers.worker", *argv]
        super().__init__(reactor, sys.executable, args, None, None, proto, childFDs=child_fds)

    def _trySpawnInsteadOfFork(self, *args: Any) -> bool:
        # posix_spawn() always execs.
        return False

    def _setupChild(self, fdmap: dict[int, int]) -> None:
        # Process's own mapping compares every descriptor with every other
        # (0.6 s for a worker's 3,979 sockets); this one is linear.  A
        # descriptor that keeps its number needs nothing (without exec(),
        # close-on-exec does not matter); the others are first moved above
        # every number in the map, so that no move overwrites another.
        floor = max([2, *fdmap, *fdmap.values()]) + 1
        moved = {child: fcntl.fcntl(parent, fcntl.F_DUPFD, floor) for child, parent in fdmap.items() if child != parent}
        kept = sorted({child for child, parent in fdmap.items() if child == parent} | set(moved.values()))
        low = 0
        for fd in kept:
            os.closerange(low, fd)
            low = fd + 1
        os.closerange(low, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        for child, fd in moved.items():
            os.dup2(fd, child)
            os.close(fd)

    def _execChild(self, path: Any, uid: Any, gid: Any, executable: Any, args: Any, environment: Any) -> NoReturn:
        run_child(self._argv, self._observers)


def run_child(argv: list[str], observers: Sequence[ILogObserver]) -> NoReturn:
    """In the forked child: leave the coordinator behind, run the worker, exit."""
    status = 1
    try:
        gc.freeze()
        # process.Process disables the collector around fork().
        gc.enable()
        _default_signals()
        # twistd made them log events; the worker's stdout and stderr are
        # the pipes to the coordinator, as in a new interpreter.
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        for observer in observers:
            globalLogPublisher.removeObserver(observer)
        # The coordinator's children are not this process's.
        process.reapProcessHandlers.clear()
        from smtpplus.workers.worker import run

        status = run(_new_reactor(), argv, observe=globalLogPublisher.addObserver)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def _default_signals() -> None:
    """The coordinator's Python signal handlers are not the worker's."""
    for signum in signal.valid_signals():
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(signum, signal.SIG_DFL)


def _new_reactor() -> Any:
    """Install a new reactor of the coordinator's kind in its place."""
    import twisted.internet

    inherited = sys.modules.pop("twisted.internet.reactor")
    _INHERITED.append(inherited)
    del twisted.internet.reactor
    reactor = type(inherited)()
    installReactor(reactor)
    return reactor
