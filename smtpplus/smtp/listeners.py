"""
Binding the SMTP port set: thousands of listening ports in one service.

One strports service per port would log a traceback per failed bind and
could not tell the daemon that none was bound, so this service binds them
itself, in C{privilegedStartService} (before twistd drops root), and reports
every failure in one line.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
from collections.abc import Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from smtpplus.config import format_port_list

log = Logger()

# Connections the kernel queues per port before one is accepted; with
# workers they wait there while a worker starts or restarts.
BACKLOG = 128


class _QuietPort(tcp.Port):
    """
    A listening TCP port that does not log a line as it starts and stops:
    with thousands of ports those lines would bury the one that matters.
    """

    def startListening(self) -> None:
        real_log = tcp.log
        tcp.log = _Silent(real_log)  # type: ignore[assignment]
        try:
            super().startListening()
        finally:
            tcp.log = real_log

    def _logConnectionLostMsg(self) -> None:
        pass


class _Silent:
    def __init__(self, real: object) -> None:
        self._real = real

    def msg(self, *args: object, **kwargs: object) -> None:
        pass

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


class BindError(Exception):
    """The daemon cannot serve SMTP: no port (or, if required, not every port) was bound."""


def raise_open_files_limit(wanted: int) -> int:
    """Raise the soft C{RLIMIT_NOFILE} to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < wanted:
        log.warn(
            "open files limit is {soft}, below the {wanted} the port set and sessions need; raise LimitNOFILE",
            soft=soft,
            wanted=wanted,
        )
    return soft


def _reason(error: CannotListenError) -> str:
    socket_error = error.socketError
    code = getattr(socket_error, "errno", None)
    if code == errno.EACCES:
        return "permission denied (privileged port; run as root or lower net.ipv4.ip_unprivileged_port_start)"
    if code == errno.EADDRINUSE:
        return "address already in use"
    if code == errno.EADDRNOTAVAIL:
        return "address not available on this host"
    return getattr(socket_error, "strerror", None) or str(socket_error)


class _WorkerSockets:
    """
    A port bound for SMTP workers: one socket per worker, all bound here
    (before twistd drops root) with C{SO_REUSEPORT}, so that the kernel
    spreads new connections over the workers instead of waking them all
    for each one (the first to call accept() would take most of them).

    The sockets listen from the moment they are bound: a socket that is
    only bound looks free to every other program, which could then bind
    and listen on the port itself and take its connections.  So a
    connection that reaches a worker that is not serving yet (at start, or
    while it restarts) waits in its socket's backlog until it does.

    C{SO_REUSEPORT} alone would also let a second daemon started by
    mistake join the group silently and take a share of the connections;
    a first socket bound without it makes the port fail with "address
    already in use" as a single-process daemon's would.
    """

    def __init__(self, interface: str, port: int, factory: ServerFactory, copies: int) -> None:
        self.factory = factory
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        self.sockets: list[socket.socket] = []
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Without SO_REUSEPORT: refused while anyone listens on the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((interface, port))
            for _ in range(copies):
                bound = socket.socket(family, socket.SOCK_STREAM)
                self.sockets.append(bound)
                bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                bound.setblocking(False)
                bound.bind((interface, port))
                bound.listen(BACKLOG)
        except OSError as e:
            self.stopListening()
            raise CannotListenError(interface, port, e) from None
        finally:
            probe.close()

    def fileno(self, worker: int) -> int:
        """The descriptor of worker C{worker}'s socket (1-based)."""
        return self.sockets[worker - 1].fileno()

    def stopListening(self) -> None:
        for bound in self.sockets:
            bound.close()


def adopt_ports(reactor: Any, family: int, descriptors: Iterable[int], factory: ServerFactory) -> list[IListeningPort]:
    """
    Listen on and serve sockets inherited from the process that bound them
    (an SMTP worker's ports); the inherited descriptors are closed, the
    ports keep their own copies.
    """
    ports = []
    for fd in descriptors:
        port = _QuietPort._fromListeningDescriptor(reactor, fd, family, factory)
        port.startListening()
        os.close(fd)
        ports.append(port)
    return ports


class SMTPListeners(Service):
    """
    Listens on every port of the STARTTLS set and the implicit-TLS set.

    With C{workers} (the coordinator of that many SMTP workers) the ports
    are bound, one socket per worker, but this process never accepts on
    them: its workers do, on the descriptors L{descriptors} lists.

    @ivar bound: the STARTTLS ports actually listening.
    @ivar bound_tls: the implicit-TLS ports actually listening.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        interface: str,
        ports: Iterable[int],
        tls_ports: Iterable[int],
        factory: ServerFactory,
        tls_factory: ServerFactory | None,
        require_all: bool,
        workers: int = 0,
    ) -> None:
        self._reactor = reactor
        self._serve = not workers
        self._copies = workers
        self.interface = interface
        self.ports = tuple(ports)
        self.tls_ports = tuple(tls_ports)
        self.factory = factory
        self.tls_factory = tls_factory
        self.require_all = require_all
        self._listening: list[IListeningPort] = []
        self.bound: list[int] = []
        self.bound_tls: list[int] = []

    def privilegedStartService(self) -> None:
        self._bind()
        Service.privilegedStartService(self)

    def startService(self) -> None:
        if not self._listening:
            self._bind()
        Service.startService(self)

    def _bind(self) -> None:
        failures: dict[str, list[int]] = {}
        self.bound = self._bind_set(self.ports, self.factory, failures)
        if self.tls_ports:
            assert self.tls_factory is not None
            self.bound_tls = self._bind_set(self.tls_ports, self.tls_factory, failures)
        if failures:
            detail = "; ".join(f"{format_port_list(ports)}: {why}" for why, ports in failures.items())
            log.warn("could not bind SMTP ports on {interface}: {detail}", interface=self.interface, detail=detail)
            if self.require_all:
                self._stop_listening()
                raise BindError(f"require_all_ports is set and some ports could not be bound ({detail})")
        if not self.bound and not self.bound_tls:
            raise BindError(f"no SMTP port could be bound on {self.interface}")
        log.info(
            "SMTP listening on {interface}{served}: {count} STARTTLS ports ({ports}), {tls_count} implicit-TLS ports ({tls_ports})",
            interface=self.interface,
            served=f" for {self._copies} smtp workers" if self._copies else "",
            count=len(self.bound),
            ports=format_port_list(self.bound) or "none",
            tls_count=len(self.bound_tls),
            tls_ports=format_port_list(self.bound_tls) or "none",
        )

    def _bind_set(self, ports: tuple[int, ...], factory: ServerFactory, failures: dict[str, list[int]]) -> list[int]:
        bound = []
        for port in ports:
            try:
                if self._serve:
                    listening: Any = _QuietPort(port, factory, BACKLOG, self.interface, self._reactor)
                    listening.startListening()
                else:
                    listening = _WorkerSockets(self.interface, port, factory, self._copies)
            except CannotListenError as e:
                failures.setdefault(_reason(e), []).append(port)
                continue
            self._listening.append(listening)
            bound.append(port)
        return bound

    def descriptors(self, worker: int) -> tuple[list[int], list[int]]:
        """Worker C{worker}'s socket descriptors of the STARTTLS and of the implicit-TLS ports."""
        plain = [p.fileno(worker) for p in self._listening if p.factory is self.factory]
        tls = [p.fileno(worker) for p in self._listening if p.factory is not self.factory]
        return plain, tls

    def _stop_listening(self) -> Deferred[object]:
        listening, self._listening = self._listening, []
        return DeferredList([maybeDeferred(p.stopListening) for p in listening])

    def stopService(self) -> Deferred[object]:
        Service.stopService(self)
        return self._stop_listening()

