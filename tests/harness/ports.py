"""Free ports on the loopback interface, and waiting until ports accept connections."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections.abc import Iterable


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when C{port} can be bound (and listened on) on C{host} right now."""
    s = socket.socket()
    # Like Twisted's listening ports: connections in TIME_WAIT do not count.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        s.listen(1)
    except OSError:
        return False
    finally:
        s.close()
    return True


def free_port_range(count: int, host: str = "127.0.0.1", attempts: int = 50) -> list[int]:
    """
    Find C{count} consecutive free ports in the band 20000-29999, below the
    kernel's ephemeral range, so that no outgoing connection takes one.

    Another process may take one before the caller binds it; the daemon
    then fails to start, and the caller fails clearly.
    """
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(attempts):
        first = rng.randrange(20000, 30000 - count)
        ports = list(range(first, first + count))
        if all(port_is_free(p, host) for p in ports):
            return ports
    raise RuntimeError(f"no {count} consecutive free ports found")


def free_port(host: str = "127.0.0.1") -> int:
    """One free port from the same band as L{free_port_range}."""
    return free_port_range(1, host)[0]


def occupy(port: int, host: str = "127.0.0.1") -> socket.socket:
    """Listen on C{port} so that the daemon cannot bind it; the caller closes it."""
    s = socket.socket()
    s.bind((host, port))
    s.listen(1)
    return s


def wait_for_ports(
    ports: Iterable[int], timeout: float, host: str = "127.0.0.1", proc: subprocess.Popen[bytes] | None = None
) -> bool:
    """
    Poll until every port in C{ports} accepts a TCP connection; False on
    timeout or when C{proc} exits first.
    """
    pending = list(ports)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        still = []
        for port in pending:
            try:
                socket.create_connection((host, port), timeout=1).close()
            except OSError:
                still.append(port)
        pending = still
        if pending:
            time.sleep(0.05)
    return not pending
