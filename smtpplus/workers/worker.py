"""
An SMTP worker process: C{python -m smtpplus.workers.worker}, started by
the coordinator (L{smtpplus.workers.pool}) with the listening sockets and
one end of a UNIX socket pair as inherited descriptors.

It serves sessions exactly as the single daemon process does (the same
L{smtpplus.smtp.server}, submitter and spool), and asks the coordinator,
over AMP, for what the node decides as a whole: connection slots, the login
throttle, the users, and the queue rows behind every 250.  It keeps no
state of its own that a restart could lose: a message is answered 250 only
after the coordinator committed its row, and a killed worker's partial
files are removed by the coordinator.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.protocol import Factory
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.python.util import switchUID

from smtpplus.auth.hashing import PasswordHasher
from smtpplus.auth.login import build_login_service
from smtpplus.auth.store import LoginRecord, Revocations, Standing
from smtpplus.config import Config, config_from_text, parse_port_spec
from smtpplus.delivery.interfaces import Duplicate
from smtpplus.delivery.queue import Committer, NewMessage
from smtpplus.delivery.spool import Spool
from smtpplus.delivery.submitter import Intake, Submitter
from smtpplus.delivery.suppressions import KeyFilter, address_key
from smtpplus.delivery.threads import reactor_runner
from smtpplus.log import LEVELS, line_formatter
from smtpplus.metrics import Metrics, daemon_metrics
from smtpplus.model import Suppression, User
from smtpplus.reload import ReloadableTLS
from smtpplus.smtp.listeners import adopt_ports
from smtpplus.smtp.registry import SessionRegistry
from smtpplus.smtp.server import build_smtp_server
from smtpplus.smtp.tls import TLSMaterial
from smtpplus.workers import commands

log = Logger()

# After SIGTERM, sessions receiving or storing a message get this long; the
# coordinator kills a worker still running after its own deadline.
DRAIN_SECONDS = 6.0
PR_SET_PDEATHSIG = 1


class CoordinatorLink(commands.QuietAMP):
    """This worker's end of the AMP connection; the coordinator's requests are answered here."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self._worker = worker

    @commands.UserChanged.responder
    def user_changed(self, username: str, revoked: str | None = None) -> dict[str, Any]:
        self._worker.users.changed(username, revoked)
        return {}

    @commands.SuppressionAdded.responder
    def suppression_added(self, user: str, address: str) -> dict[str, Any]:
        self._worker.suppressions.keys.add(user, address)
        return {}

    @commands.Reload.responder
    def reload(self, tls: bytes, log_level: str, log_format: str) -> dict[str, Any]:
        self._worker.reload(commands.unpack_tls(tls), log_level, log_format)
        return {}

    @commands.Scrape.responder
    async def scrape(self) -> dict[str, Any]:
        return {"text": await self._worker.metrics.scrape()}

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._worker.coordinator_lost()


class RemoteUsers:
    """
    The user store as the login checker and the realm use it, answered by
    the coordinator.  Revocations are kept here, fed by the coordinator's
    L{commands.UserChanged}, so that the check a session makes at every
    command stays in memory.
    """

    def __init__(self, link: amp.AMP) -> None:
        self._link = link
        self._revocations = Revocations()
        self._listeners: list[Callable[[str], None]] = []

    def login_record(self, username: str) -> Deferred[LoginRecord | None]:
        def found(answer: dict[str, Any]) -> LoginRecord | None:
            if not answer["found"]:
                return None
            return LoginRecord(answer["username"], answer["enabled"], answer["password_hash"], answer["generation"])

        return self._link.callRemote(commands.GetLoginRecord, username=username).addCallback(found)

    def get(self, username: str) -> Deferred[User | None]:
        def found(answer: dict[str, Any]) -> User | None:
            text = answer.get("user")
            return None if text is None else commands.user_from_json(text)

        return self._link.callRemote(commands.GetUser, username=username).addCallback(found)

    def standing(self, username: str) -> Standing:
        return self._revocations.standing(username)

    def subscribe(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def changed(self, username: str, revoked: str | None) -> None:
        """The coordinator says C{username} changed (and was disabled or deleted when C{revoked})."""
        if revoked:
            self._revocations.revoke(username, revoked)
        for listener in self._listeners:
            listener(username)


class RemoteThrottle:
    """The node's login throttle, held by the coordinator."""

    def __init__(self, link: amp.AMP) -> None:
        self._link = link

    def refused(self, username: str, ip: str) -> Deferred[bool]:
        d = self._link.callRemote(commands.LoginRefused, username=username, ip=ip)
        return d.addCallback(lambda answer: answer["refused"])

    def failed(self, username: str, ip: str, known_user: bool) -> Deferred[float]:
        d = self._link.callRemote(commands.LoginFailed, username=username, ip=ip, known_user=known_user)
        return d.addCallback(lambda answer: answer["delay"])

    def succeeded(self, username: str, ip: str) -> None:
        self._link.callRemote(commands.LoginSucceeded, username=username, ip=ip)


class RemoteNodeLimits:
    """The node's connection limits, counted by the coordinator for every worker."""

    def __init__(self, link: amp.AMP) -> None:
        self._link = link

    def admit(self, ip: str) -> Deferred[str | None]:
        return self._link.callRemote(commands.Admit, ip=ip).addCallback(lambda answer: answer.get("refusal"))

    def release(self, ip: str) -> None:
        self._link.callRemote(commands.Release, ip=ip)


class RemoteSuppressions:
    """
    The suppression list as the RCPT rule asks it, in the coordinator's
    store; a lookup that this process's copy of the node's key filter
    rules out is answered here (SQLite: the coordinator's filter is
    copied at start and each added key is sent to every worker).
    """

    def __init__(self, link: amp.AMP) -> None:
        self._link = link
        self.keys = KeyFilter()
        self.filtering = False

    def load(self) -> Deferred[None]:
        """Take the coordinator's filter (keys added meanwhile were noted already)."""

        def loaded(answer: dict[str, Any]) -> None:
            if answer["bits"]:
                self.keys.merge(answer["bits"])
                self.filtering = True

        return self._link.callRemote(commands.GetSuppressionKeys).addCallback(loaded)

    def find(self, user: str, address: str) -> Deferred[Suppression | None]:
        if self.filtering and not self.keys.may_hold(user, address_key(address)):
            return succeed(None)

        def found(answer: dict[str, Any]) -> Suppression | None:
            if not answer["found"]:
                return None
            return Suppression(answer["address"], answer["reason"], answer["created_at"])

        return self._link.callRemote(commands.FindSuppression, user=user, address=address).addCallback(found)


class RemoteBudget:
    """The priority budget, counted over the node's one queue by the coordinator."""

    def __init__(self, link: amp.AMP) -> None:
        self._link = link

    def effective_priority(self, user: str, budget: int, notify: bool = True) -> Deferred[int]:
        d = self._link.callRemote(commands.EffectivePriority, user=user, budget=budget, notify=notify)
        return d.addCallback(lambda answer: answer["priority"])


class RemoteRecorders:
    """The event and statistics recorders of refusals, in the coordinator."""

    def __init__(self, link: amp.AMP) -> None:
        self._link = link

    def record(self, user: str, mail_from: str, header_from: str, subject: str, detail: str) -> None:
        self._link.callRemote(
            commands.Refused, user=user, mail_from=mail_from, header_from=header_from, subject=subject, detail=detail
        )

    def recipient(self, user: str, mail_from: str) -> None:
        self._link.callRemote(commands.RefusedRecipient, user=user, mail_from=mail_from)


class RemoteQueue:
    """
    Records a committed batch in the coordinator's queue (one transaction
    there); the files the coordinator hands back in C{free} are this
    worker's to write over.
    """

    def __init__(self, link: amp.AMP, spool: Spool) -> None:
        self._link = link
        self._spool = spool

    def record(self, batch: list[tuple[NewMessage, bytes | None]]) -> Deferred[list[int | Duplicate]]:
        d = self._link.callRemote(commands.Enqueue, batch=commands.pack_messages(batch))

        def recorded(answer: dict[str, Any]) -> list[int | Duplicate]:
            self._spool.take_free(answer["free"])
            return [Duplicate(first) if first else 0 for first in answer["duplicates"]]

        return d.addCallback(recorded)


class LogForwarder:
    """
    Sends this process's log events to the coordinator, which writes the
    daemon's one log: as lines formatted here (C{text}, C{json}), sent
    together once per reactor turn, or one event at a time (C{events}) for
    a log the coordinator formats itself (syslog), and before the
    coordinator has said which.
    """

    # A turn that logs more than this many lines sends them at once.
    BATCH_LINES = 200

    def __init__(self, reactor: Any, link: amp.AMP, index: int) -> None:
        self._reactor = reactor
        self._link = link
        self._index = index
        self.connected = False
        self._format: Callable[[dict[str, Any]], str | None] | None = None
        self._lines: list[str] = []
        self._flushing: Any = None

    def set_format(self, format: str, node: str | None) -> None:
        """Format lines as the coordinator's C{[log] format} (or send C{events}) from now on."""
        self.flush()
        self._format = None if format == "events" else line_formatter(format, node)

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.connected:
            return
        event = dict(event, smtpplus_worker=self._index)
        try:
            if self._format is None:
                self._link.callRemote(commands.Log, event=eventAsJSON(event))
                return
            line = self._format(event)
        except Exception:
            # Never log from the log observer.
            return
        if not line:
            return
        self._lines.append(line)
        if len(self._lines) >= self.BATCH_LINES:
            self.flush()
        elif self._flushing is None:
            self._flushing = self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """Send the lines held so far."""
        if self._flushing is not None and self._flushing.active():
            self._flushing.cancel()
        self._flushing = None
        lines, self._lines = self._lines, []
        if lines and self.connected:
            try:
                self._link.callRemote(commands.LogLines, lines="".join(lines).encode("utf-8"))
            except Exception:
                pass


class Worker:
    """
    One worker process: its service tree (the bcrypt pool, the sessions'
    drain, the adopted ports) and its collaborators in the coordinator.
    The configuration comes from the coordinator (L{configure}), which read
    the files before dropping privileges.
    """

    def __init__(self, reactor: Any, index: int) -> None:
        self.reactor = reactor
        self.index = index
        self.link = CoordinatorLink(self)
        self.users = RemoteUsers(self.link)
        self.suppressions = RemoteSuppressions(self.link)
        self.metrics: Metrics = daemon_metrics()
        self.log_filter = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
        self.forwarder = LogForwarder(reactor, self.link, index)
        self.tls = ReloadableTLS(None)
        self.services = MultiService()
        self.registry: SessionRegistry | None = None
        self.node: str | None = None
        self._ports: list[Any] = []
        self._stopped: Deferred[object] | None = None

    def configure(self) -> Deferred[Config]:
        """Ask the coordinator for the configuration, the certificates and the log level."""

        def configured(answer: dict[str, Any]) -> Config:
            config = config_from_text(answer["config"], json.loads(answer["overrides"]))
            self.tls.options = commands.unpack_tls(answer["tls"]).options()
            self.log_filter.setLogLevelForNamespace("", LEVELS[answer["log_level"]])
            self.node = config.server.node()
            self.forwarder.set_format(answer["log_format"], self.node)
            return config

        return self.link.callRemote(commands.Configure).addCallback(configured)

    def build(self, config: Config) -> None:
        """Assemble the SMTP side, as the single process does, with the coordinator's collaborators."""
        reactor = self.reactor
        run_in_thread = reactor_runner(reactor)
        spool = self.spool = Spool(os.path.join(config.server.state_dir, "spool"), worker=self.index)
        committer = Committer(run_in_thread, spool, RemoteQueue(self.link, spool).record)
        refusals = RemoteRecorders(self.link)
        intake = Intake(
            reactor,
            run_in_thread,
            spool,
            committer.commit,
            refusals,
            config.server.hostname,
            suppressions=self.suppressions,  # type: ignore[arg-type]
            budget=RemoteBudget(self.link),  # type: ignore[arg-type]
        )

        def avatar(user: User, standing: Standing | None = None) -> Submitter:
            return Submitter(user, intake, standing)

        hasher = PasswordHasher(reactor)
        hasher.setServiceParent(self.services)
        login_service, _ = build_login_service(
            self.users,  # type: ignore[arg-type]
            hasher,
            RemoteThrottle(self.link),
            avatar,
            reactor,
            self.metrics,
        )
        self.server = build_smtp_server(
            config.smtp,
            config.server.hostname,
            reactor,
            login_service,
            self.tls,
            self.metrics,
            worker=self.index,
            node=RemoteNodeLimits(self.link),
        )
        self.registry = self.server.registry

    def serve(self, interface: str, plain: list[int], tls: list[int]) -> int:
        """Serve the inherited listening descriptors; returns how many."""
        family = socket.AF_INET6 if ":" in interface else socket.AF_INET
        self._ports = adopt_ports(self.reactor, family, plain, self.server.factory)
        if tls:
            assert self.server.tls_factory is not None
            self._ports += adopt_ports(self.reactor, family, tls, self.server.tls_factory)
        return len(self._ports)

    def reload(self, tls: TLSMaterial, log_level: str, log_format: str) -> None:
        """A reload's certificates (for new sessions), log level and format."""
        self.tls.options = tls.options()
        self.log_filter.setLogLevelForNamespace("", LEVELS[log_level])
        self.forwarder.set_format(log_format, self.node)

    def stop(self, grace: float = DRAIN_SECONDS) -> Deferred[object]:
        """Stop taking connections, let the sessions drain for C{grace} seconds, stop the bcrypt pool."""
        if self._stopped is not None:
            return self._stopped
        ports, self._ports = self._ports, []
        closing = gatherResults([maybeDeferred(p.stopListening) for p in ports])
        drained = self.registry.drain(grace) if self.registry is not None else succeed(None)
        d = gatherResults([closing, drained])
        # The bcrypt pool's threads would keep the process alive.
        d.addBoth(lambda _: self.services.stopService())
        # The last lines go out while the reactor still runs.
        d.addBoth(lambda result: (self.forwarder.flush(), result)[1])
        self._stopped = d
        return d

    def coordinator_lost(self) -> None:
        """
        The coordinator is gone (it stopped or died): a worker alone can
        queue nothing, so it closes its ports at once (a coordinator
        starting again must be able to bind them), ends its sessions and
        exits.
        """
        self.forwarder.connected = False
        stopped = self.stop(0)
        if self.reactor.running:
            stopped.addBoth(lambda _: self.reactor.stop())


def _options(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="smtpplus-worker", description="An smtpplus SMTP worker (started by twistd).")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--channel", type=int, required=True, help="descriptor of the AMP socket")
    parser.add_argument("--fds", default="", help="STARTTLS listening descriptors (in the port list syntax)")
    parser.add_argument("--tls-fds", default="", help="implicit-TLS listening descriptors")
    parser.add_argument("--uid", type=int, default=None, help="user to switch to once set up (started as root)")
    parser.add_argument("--gid", type=int, default=None)
    return parser.parse_args(argv)


def _descriptors(spec: str) -> list[int]:
    return list(parse_port_spec(spec)) if spec else []


def main(argv: list[str] | None = None) -> None:
    """Run one worker (a new interpreter) until SIGTERM or until the coordinator goes away."""
    from twisted.internet import reactor

    sys.exit(run(reactor, sys.argv[1:] if argv is None else argv))


def run(reactor: Any, argv: list[str], observe: Callable[[Any], None] | None = None) -> int:
    """
    Run one worker on C{reactor}, which is not running yet, until it
    stops; returns the exit status.  Both ways of starting a worker end
    here: a new interpreter (L{main}) and a fork of the coordinator
    (L{smtpplus.workers.fork}), whose logging has begun already and which
    passes how to add the worker's observer (C{observe}).
    """
    options = _options(argv)
    _set_title(f"smtpplus: smtp worker {options.index}")
    worker = Worker(reactor, options.index)
    # Without the link (before it is up, after it is gone) only warnings
    # and errors go to stderr, which the coordinator logs.
    stderr = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [worker.log_filter, LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]
    )
    forward = FilteringLogObserver(worker.forwarder, [worker.log_filter])

    def observer(event: dict[str, Any]) -> None:
        (forward if worker.forwarder.connected else stderr)(event)

    if observe is None:
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    else:
        observe(observer)
    reactor.adoptStreamConnection(options.channel, socket.AF_UNIX, _OneProtocol(worker.link))
    os.close(options.channel)
    worker.forwarder.connected = True

    def start(config: Config) -> None:
        worker.build(config)
        if options.uid is not None or options.gid is not None:
            # As twistd does for the coordinator: set up as root, then
            # switch; the one directory this process creates becomes the
            # user's.
            os.chown(worker.spool.tmp_dir, -1 if options.uid is None else options.uid, -1 if options.gid is None else options.gid)
            switchUID(options.uid, options.gid)
        # Should the coordinator die without closing the link (it always
        # closes with the process), the kernel still tells this one; set
        # after the switch, which clears it.
        _die_with_parent()
        worker.services.startService()
        count = worker.serve(config.smtp.listen, _descriptors(options.fds), _descriptors(options.tls_fds))
        worker.link.callRemote(commands.Ready, ports=count)
        # After serving starts: until it is here, each lookup asks the coordinator.
        worker.suppressions.load().addErrback(
            lambda f: log.warn("suppression lookups ask the coordinator each time: {error}", error=f.value)
        )

    def failed(failure: Failure) -> None:
        # To stderr, not through the link: the process ends right after.
        sys.stderr.write(f"cannot start: {failure.getTraceback()}")
        exit_status.append(1)
        reactor.stop()

    exit_status: list[int] = []

    reactor.callWhenRunning(lambda: worker.configure().addCallback(start).addErrback(failed))
    reactor.addSystemEventTrigger("before", "shutdown", worker.stop)
    reactor.run()
    return exit_status[0] if exit_status else 0


class _OneProtocol(Factory):
    """Hands out the one AMP protocol of the adopted connection."""

    def __init__(self, protocol: amp.AMP) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> amp.AMP:
        return self._protocol


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the coordinator dies (prctl PR_SET_PDEATHSIG); elsewhere the link's end does it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _set_title(title: str) -> None:
    """Name this process in C{ps} (setproctitle), so that an operator tells the workers apart."""
    from setproctitle import setproctitle

    setproctitle(title)


if __name__ == "__main__":
    main()
