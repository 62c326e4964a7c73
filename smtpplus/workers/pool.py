"""
The coordinator's side of the SMTP workers: it starts them on the ports it
bound, answers their AMP requests with the node's one queue, throttle,
users and connection counts, restarts one that dies, and stops them all on
SIGTERM.

Why workers for sessions and one coordinator for the queue (and not
symmetric processes sharing the database): a session's CPU (TLS, the SMTP
dialogue, bcrypt, the spool write and its fsync) is most of a message's
cost and needs no shared state but the few decisions made here, one AMP
round trip each; the queue order, the concurrency and rate limits and the
notification windows stay in one process exactly as before, with no lock
between processes on the SQLite file.  ARCHITECTURE.md has the figures.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import attrs
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, eventFromJSON, globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure

from smtpplus.auth.login import Throttle
from smtpplus.config import format_port_list
from smtpplus.delivery.batching import Batcher
from smtpplus.delivery.budget import PriorityBudget
from smtpplus.delivery.interfaces import Duplicate
from smtpplus.delivery.queue import NewMessage
from smtpplus.delivery.rules import RecordsRefusals
from smtpplus.delivery.spool import Spool
from smtpplus.interfaces import ISuppressionKeys, ISuppressionList
from smtpplus.log import DaemonLog
from smtpplus.metrics import Metrics
from smtpplus.model import Suppression
from smtpplus.smtp.registry import SHUTTING_DOWN, SessionSettings, limit_refusal
from smtpplus.smtp.tls import TLSMaterial
from smtpplus.workers import commands
from smtpplus.workers.fork import ForkedProcess, can_fork

log = Logger()

# A worker that dies is started again after this long; one that keeps dying
# within CRASH_WINDOW of its start waits CRASH_DELAY, so that a worker that
# cannot start does not spin.  Both within the contract's 2 s.
RESTART_DELAY = 0.2
CRASH_WINDOW = 5.0
CRASH_DELAY = 1.0
# How long an added suppression waits for the workers to note it.
ACK_SECONDS = 2.0
# After SIGTERM the workers get this long to drain; then they are killed.
STOP_SECONDS = 8.0
# Process collector gauges that describe the coordinator, not a sum.
_NOT_SUMMED = {"process_start_time_seconds", "process_max_fds"}


class NodeConnections:
    """
    The node's SMTP connections, counted per worker so that a worker's
    death gives its slots back; the limits are the daemon-wide and per-IP
    ones of C{[smtp]}.
    """

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self.per_worker: dict[int, dict[str, int]] = {}
        self.per_ip: dict[str, int] = {}
        self.total = 0
        self.draining = False

    def admit(self, worker: int, ip: str) -> str | None:
        """Take a slot for C{worker}'s connection from C{ip}, or say why not."""
        if self.draining:
            return SHUTTING_DOWN
        refusal = limit_refusal(self.settings, self.total, self.per_ip.get(ip, 0))
        if refusal is None:
            counts = self.per_worker.setdefault(worker, {})
            counts[ip] = counts.get(ip, 0) + 1
            self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
            self.total += 1
        return refusal

    def release(self, worker: int, ip: str, count: int = 1) -> None:
        """Give back C{count} slots of C{worker} for C{ip}."""
        counts = self.per_worker.get(worker, {})
        count = min(count, counts.get(ip, 0))
        if not count:
            return
        for table in (counts, self.per_ip):
            left = table[ip] - count
            if left:
                table[ip] = left
            else:
                del table[ip]
        self.total -= count

    def worker_gone(self, worker: int) -> None:
        """Every slot of a dead worker is free again."""
        for ip, count in list(self.per_worker.get(worker, {}).items()):
            self.release(worker, ip, count)
        self.per_worker.pop(worker, None)

    def of(self, worker: int) -> int:
        """How many connections C{worker} serves."""
        return sum(self.per_worker.get(worker, {}).values())


@attrs.define
class Node:
    """What the workers ask the coordinator for: the node's shared parts."""

    users: Any
    throttle: Throttle
    record: Callable[[list[tuple[NewMessage, bytes | None]]], Deferred[list[int | Duplicate]]]
    refusals: RecordsRefusals
    spool: Spool
    connections: NodeConnections
    suppressions: ISuppressionList
    budget: PriorityBudget


class WorkerLink(commands.QuietAMP):
    """The coordinator's end of one worker's AMP connection."""

    def __init__(self, pool: WorkerPool, worker: WorkerProcess) -> None:
        super().__init__()
        self._pool = pool
        self._node = pool.node
        self._worker = worker

    @commands.Configure.responder
    def configure(self) -> dict[str, Any]:
        text, overrides = self._pool.worker_config
        return {
            "config": text,
            "overrides": json.dumps(overrides),
            "tls": commands.pack_tls(self._pool.tls),
            "log_level": self._pool.log_level,
            "log_format": self._pool.log_format(),
        }

    @commands.Ready.responder
    def ready(self, ports: int) -> dict[str, Any]:
        self._worker.ready = True
        self._pool.worker_ready(self._worker, ports)
        return {}

    @commands.Admit.responder
    def admit(self, ip: str) -> dict[str, Any]:
        refusal = self._node.connections.admit(self._worker.index, ip)
        return {} if refusal is None else {"refusal": refusal}

    @commands.Release.responder
    def release(self, ip: str) -> dict[str, Any]:
        self._node.connections.release(self._worker.index, ip)
        return {}

    @commands.GetLoginRecord.responder
    def login_record(self, username: str) -> Deferred[dict[str, Any]]:
        def answer(record: Any) -> dict[str, Any]:
            if record is None:
                return {"found": False}
            return {
                "found": True,
                "username": record.username,
                "enabled": record.enabled,
                "password_hash": record.password_hash,
                "generation": record.generation,
            }

        return self._node.users.login_record(username).addCallbacks(answer, _store_failed)

    @commands.GetUser.responder
    def get_user(self, username: str) -> Deferred[dict[str, Any]]:
        def answer(user: Any) -> dict[str, Any]:
            return {} if user is None else {"user": commands.user_to_json(user)}

        return self._node.users.get(username).addCallbacks(answer, _store_failed)

    # The throttle answers at once (memory) or with a Deferred (PostgreSQL).
    @commands.LoginRefused.responder
    def login_refused(self, username: str, ip: str) -> Deferred[dict[str, Any]]:
        d = maybeDeferred(self._node.throttle.refused, username, ip)
        return d.addCallbacks(lambda refused: {"refused": refused}, _store_failed)

    @commands.LoginFailed.responder
    def login_failed(self, username: str, ip: str, known_user: bool) -> Deferred[dict[str, Any]]:
        d = maybeDeferred(self._node.throttle.failed, username, ip, known_user)
        return d.addCallbacks(lambda delay: {"delay": delay}, _store_failed)

    @commands.LoginSucceeded.responder
    def login_succeeded(self, username: str, ip: str) -> dict[str, Any]:
        # Not waited for, as in one process: the login is already answered.
        self._node.throttle.succeeded(username, ip)
        return {}

    @commands.Enqueue.responder
    def enqueue(self, batch: bytes) -> Deferred[dict[str, Any]]:
        messages = commands.unpack_messages(batch)

        def recorded(duplicates: list[str]) -> dict[str, Any]:
            # The worker writes its next messages over these files.
            return {"free": self._node.spool.give_free(len(messages)), "duplicates": duplicates}

        def failed(failure: Failure) -> Failure:
            raise commands.StoreUnavailable(str(failure.value))

        return self._pool.enqueue(messages).addCallbacks(recorded, failed)

    @commands.FindSuppression.responder
    def find_suppression(self, user: str, address: str) -> Deferred[dict[str, Any]]:
        def answer(found: Suppression | None) -> dict[str, Any]:
            if found is None:
                return {"found": False}
            return {"found": True, "address": found.address, "reason": found.reason, "created_at": found.created_at}

        return self._node.suppressions.find(user, address).addCallbacks(answer, _store_failed)

    @commands.GetSuppressionKeys.responder
    def suppression_keys(self) -> Deferred[dict[str, Any]] | dict[str, Any]:
        if not ISuppressionKeys.providedBy(self._node.suppressions):
            return {"bits": b""}

        def unavailable(failure: Failure) -> dict[str, Any]:
            log.warn("smtp worker {i} asks for each suppression: {error}", i=self._worker.index, error=failure.value)
            return {"bits": b""}

        keys = ISuppressionKeys(self._node.suppressions).key_filter()
        return keys.addCallbacks(lambda found: {"bits": found.to_bytes()}, unavailable)

    @commands.EffectivePriority.responder
    def effective_priority(self, user: str, budget: int, notify: bool) -> Deferred[dict[str, Any]]:
        d = maybeDeferred(self._node.budget.effective_priority, user, budget, notify)
        return d.addCallbacks(lambda priority: {"priority": priority}, _store_failed)

    @commands.Refused.responder
    def refused(self, user: str, mail_from: str, header_from: str, subject: str, detail: str) -> dict[str, Any]:
        self._node.refusals.record(user, mail_from, header_from, subject, detail)
        return {}

    @commands.RefusedRecipient.responder
    def refused_recipient(self, user: str, mail_from: str) -> dict[str, Any]:
        self._node.refusals.recipient(user, mail_from)
        return {}

    @commands.Log.responder
    def log_event(self, event: str) -> dict[str, Any]:
        globalLogPublisher(eventFromJSON(event))
        return {}

    @commands.LogLines.responder
    def log_lines(self, lines: bytes) -> dict[str, Any]:
        self._pool.write_log(lines.decode("utf-8"))
        return {}

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._worker.link = None


def _store_failed(failure: Failure) -> NoReturn:
    # An error AMP does not know would close the link (and end the
    # worker's sessions): a store that cannot answer is a declared error.
    raise commands.StoreUnavailable(str(failure.value))


class WorkerProcess(ProcessProtocol):
    """One worker: its process, its AMP link, its stderr lines in our log."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.link: WorkerLink | None = None
        self.pid: int | None = None
        self.started_at = 0.0
        self.ready = False
        self.restarts = 0
        # Forked from the coordinator (see smtpplus.workers.fork), or a new interpreter.
        self.forked = False
        self._stderr = b""
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._lines(data)

    def errReceived(self, data: bytes) -> None:
        self._lines(data)

    def _lines(self, data: bytes) -> None:
        # Before its AMP link is up (or when the interpreter itself fails),
        # a worker can only write to stderr.
        *lines, self._stderr = (self._stderr + data).split(b"\n")
        for line in lines:
            if line.strip():
                log.warn("smtp worker {index}: {line}", index=self.index, line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self._lines(b"\n")
        ended, self.ended = self.ended, Deferred()
        self.pool.worker_ended(self, reason)
        ended.callback(None)


class WorkerPool(Service):
    """
    Runs C{count} SMTP workers on the listening descriptors of
    C{listeners}, restarting each that dies, stopping them on shutdown.

    @param worker_config: the configuration the workers run with: the
        file's text and the command line's overrides.
    @param daemon_log: the log the workers' lines go to (None: a
        C{--logger} of twistd's, which gets their events).
    @ivar tls: the certificates the workers serve (L{reload} replaces them).
    @ivar log_level: the level of the log lines the workers send.
    """

    name = "smtp-workers"

    def __init__(
        self,
        reactor: Any,
        count: int,
        listeners: Any,
        node: Node,
        worker_config: tuple[str, dict[str, Any]],
        tls: TLSMaterial,
        log_level: str,
        metrics: Metrics,
        drop_to: tuple[int | None, int | None] = (None, None),
        daemon_log: DaemonLog | None = None,
    ) -> None:
        self._reactor = reactor
        self.count = count
        self._listeners = listeners
        self.node = node
        self.worker_config = worker_config
        self.tls = tls
        self.log_level = log_level
        self._metrics = metrics
        self._drop_to = drop_to
        self._daemon_log = daemon_log
        self.workers: dict[int, WorkerProcess] = {}
        self._stopping = False
        self._enqueue = Batcher(self._record)
        if ISuppressionKeys.providedBy(node.suppressions):
            ISuppressionKeys(node.suppressions).on_added(self._suppression_added)
        # Resent copies found by the batch just recorded: copy id -> first id.
        self._duplicates: dict[str, str] = {}

    # Starting and restarting.

    def privilegedStartService(self) -> None:
        # Started before twistd drops root (the listeners have bound): a
        # worker execs its interpreter as root, which an unprivileged user
        # may not be able to, and drops to twistd's --uid/--gid itself
        # once it is set up.  Workers started again later run as this
        # process does.
        Service.privilegedStartService(self)
        # Forked, they serve about 0.7 s sooner than new interpreters would.
        fork = can_fork(self._reactor, [self._daemon_log])
        for index in range(1, self.count + 1):
            self._spawn(index, drop=os.getuid() == 0, fork=fork)

    def _spawn(self, index: int, restarts: int = 0, drop: bool = False, fork: bool = False) -> None:
        plain, tls = self._listeners.descriptors(index)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = max([2, *plain, *tls]) + 1
        args = [
            "--index", str(index),
            "--channel", str(channel),
            # Descriptors in the port list syntax: a few ranges, not thousands of numbers.
            "--fds", format_port_list(plain),
            "--tls-fds", format_port_list(tls),
        ]
        uid, gid = self._drop_to
        if drop and uid is not None:
            args += ["--uid", str(uid)]
        if drop and gid is not None:
            args += ["--gid", str(gid)]
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", channel: child_end.fileno()}
        child_fds.update((fd, fd) for fd in (*plain, *tls))
        worker = WorkerProcess(self, index)
        worker.restarts = restarts
        worker.forked = fork
        worker.started_at = self._reactor.seconds()
        if fork:
            assert self._daemon_log is not None
            ForkedProcess(self._reactor, args, worker, child_fds, [self._daemon_log])
        else:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
            command = [sys.executable, "-m", "smtpplus.workers.worker", *args]
            self._reactor.spawnProcess(worker, sys.executable, command, env=env, childFDs=child_fds)
        child_end.close()
        worker.link = WorkerLink(self, worker)
        self._reactor.adoptStreamConnection(parent_end.fileno(), socket.AF_UNIX, _OneProtocol(worker.link))
        parent_end.close()
        self.workers[index] = worker

    def worker_ready(self, worker: WorkerProcess, ports: int) -> None:
        """A worker serves its ports."""
        log.info(
            "smtp worker {index} (pid {pid}) serving {ports} ports, {seconds} s after its start ({how})",
            index=worker.index,
            pid=worker.pid,
            ports=ports,
            seconds=round(self._reactor.seconds() - worker.started_at, 2),
            how="forked from the coordinator" if worker.forked else "a new interpreter",
        )
        if self.serving() == self.count:
            log.info("all {count} smtp workers serving", count=self.count)

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        """A worker's process is gone: free what it held, start another unless stopping."""
        self.node.connections.worker_gone(worker.index)
        # Off the reactor thread (a directory walk and unlinks), and before
        # a new worker of the same index writes there.
        partial = os.path.join(self.node.spool.tmp_dir, f"w{worker.index}")
        cleared = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self.node.spool.clear_partial, partial)
        cleared.addErrback(lambda f: log.failure("removing the partial files of smtp worker {i} failed", f, i=worker.index))
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping:
            if not reason.check(ProcessDone):
                log.info("smtp worker {index} (pid {pid}) stopped: {why}", index=worker.index, pid=worker.pid, why=reason.value)
            return
        lived = self._reactor.seconds() - worker.started_at
        delay = RESTART_DELAY if lived > CRASH_WINDOW else CRASH_DELAY
        log.error(
            "smtp worker {index} (pid {pid}) ended after {lived} s: {why}; starting it again in {delay} s",
            index=worker.index,
            pid=worker.pid,
            lived=round(lived, 1),
            why=reason.value,
            delay=delay,
        )
        cleared.addCallback(lambda _: self._reactor.callLater(delay, self._respawn, worker.index, worker.restarts + 1))

    def _respawn(self, index: int, restarts: int) -> None:
        if not self._stopping and index not in self.workers:
            self._spawn(index, restarts)

    # What the coordinator does for the workers.

    def enqueue(self, messages: list[tuple[NewMessage, bytes | None]]) -> Deferred[list[str]]:
        """
        Record one worker's batch; batches of several workers arriving
        together share a transaction.  Fires with, per message, the id of
        the message it is a resent copy of, or "".
        """

        def firsts(_: object) -> list[str]:
            return [self._duplicates.pop(message.id, "") for message, _ in messages]

        return self._enqueue.add(messages).addCallback(firsts)

    def _record(self, batches: list[list[tuple[NewMessage, bytes | None]]]) -> Deferred[Sequence[BaseException | None]]:
        entries = [entry for batch in batches for entry in batch]

        def recorded(results: list[Any]) -> list[None]:
            for (message, _), result in zip(entries, results, strict=True):
                if isinstance(result, Duplicate):
                    self._duplicates[message.id] = result.first_id
            return [None] * len(batches)

        return self.node.record(entries).addCallback(recorded)

    def _suppression_added(self, user: str, address: str) -> Deferred[None]:
        """
        Every worker's filter holds the key: the add (and the API's answer)
        waits for this, so that no worker lets the address pass afterwards;
        for at most ACK_SECONDS, should a worker not answer.
        """
        done: Deferred[None] = Deferred()

        def finish(_: object = None) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        def late() -> None:
            log.warn("a suppression of {user} reached not every smtp worker within {s} s", user=user, s=ACK_SECONDS)
            finish()

        timer = self._reactor.callLater(ACK_SECONDS, late)
        gatherResults(self.broadcast(commands.SuppressionAdded, user=user, address=address)).addBoth(finish)
        return done

    def broadcast(self, command: type[amp.Command], **arguments: Any) -> list[Deferred[Any]]:
        """Send C{command} to every connected worker; returns the answers of those that answer."""
        answers = []
        for worker in list(self.workers.values()):
            if worker.link is None:
                continue
            d = worker.link.callRemote(command, **arguments)
            if d is not None:
                answers.append(d.addErrback(lambda f, i=worker.index: log.warn("smtp worker {i}: {error}", i=i, error=f.value)))
        return answers

    def log_format(self) -> str:
        """How the workers send their log: lines formatted for L{write_log}, or C{events}."""
        return "events" if self._daemon_log is None else self._daemon_log.line_format

    def write_log(self, lines: str) -> None:
        """Lines a worker formatted as L{log_format} says."""
        if self._daemon_log is not None:
            self._daemon_log.write_lines(lines)

    def reload(self, tls: TLSMaterial, log_level: str) -> None:
        """A reloaded configuration: the workers' certificates and log level and format."""
        self.tls = tls
        self.log_level = log_level
        self.broadcast(commands.Reload, tls=commands.pack_tls(tls), log_level=log_level, log_format=self.log_format())

    def user_changed(self, username: str, revoked: str | None = None) -> None:
        """Tell every worker that C{username} changed (and was disabled or deleted when C{revoked})."""
        arguments: dict[str, Any] = {"username": username}
        if revoked:
            arguments["revoked"] = revoked
        self.broadcast(commands.UserChanged, **arguments)

    def serving(self) -> int:
        """How many workers serve their ports now."""
        return sum(1 for w in self.workers.values() if w.ready and w.link is not None)

    def describe(self) -> list[dict[str, Any]]:
        """Each worker as the settings show it."""
        return [
            {
                "index": w.index,
                "pid": w.pid,
                "serving": w.ready and w.link is not None,
                "sessions": self.node.connections.of(w.index),
                "restarts": w.restarts,
            }
            for _, w in sorted(self.workers.items())
        ]

    async def scrape(self) -> bytes:
        """The node's metrics: the coordinator's and every worker's, summed."""
        own = await self._metrics.scrape()
        answers = await gatherResults(self.broadcast(commands.Scrape))
        return merge_expositions([own] + [a["text"] for a in answers if isinstance(a, dict)])

    # Stopping.

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        # Close this process's copies of the listening sockets now (the
        # listeners stop after the pool): once the workers close theirs,
        # new connections are refused instead of waiting in a backlog.
        self._listeners.stopService()
        self._stopping = True
        self.node.connections.draining = True
        running = [w for w in self.workers.values() if w.pid is not None]
        for worker in running:
            _signal(worker, "TERM")
        timer = self._reactor.callLater(STOP_SECONDS, lambda: [_signal(w, "KILL") for w in running])
        d = gatherResults([w.ended for w in running])
        d.addBoth(lambda _: timer.cancel() if timer.active() else None)
        return d if running else succeed(None)


def _signal(worker: WorkerProcess, name: str) -> None:
    try:
        worker.transport.signalProcess(name)
    except Exception:
        # Already gone.
        pass


class _OneProtocol(Factory):
    """Hands out the one protocol of an adopted connection."""

    def __init__(self, protocol: amp.AMP) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> amp.AMP:
        return self._protocol


def merge_expositions(texts: Sequence[bytes]) -> bytes:
    """
    Several processes' Prometheus texts as one: samples with the same name
    and labels are added (counters, histograms, the session gauge, the
    processes' CPU and memory), but for creation times, the process's start
    time and its descriptor limit, which are the first text's.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for n, text in enumerate(texts):
        for family in text_string_to_metric_families(text.decode("utf-8")):
            samples = values.setdefault(family.name, {})
            families.setdefault(family.name, family)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif n and family.name not in _NOT_SUMMED and not sample.name.endswith("_created"):
                    samples[key] += sample.value
    merged = []
    for name, family in families.items():
        metric = Metric(name, family.documentation, family.type, family.unit)
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
        merged.append(metric)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(merged))
    return generate_latest(registry)


class _Fixed:
    """A collector of metrics already computed."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics
