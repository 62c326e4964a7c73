"""
SMTP worker processes (contract section 5): the coordinator's parts on
their own (connection counting, metrics merging, the AMP wire), and the
real twistd with two workers against aiosmtpd, smtplib and the admin API.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import smtplib
import threading
import time
from typing import Any

from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import Clock
from twisted.logger import Logger, eventFromJSON
from twisted.protocols import amp
from twisted.test import iosim
from twisted.trial import unittest

from smtpplus.delivery.queue import NewMessage
from smtpplus.delivery.suppressions import KeyFilter
from smtpplus.metrics import Metrics, daemon_metrics
from smtpplus.smtp.listeners import _WorkerSockets
from smtpplus.smtp.registry import SessionSettings
from smtpplus.workers import commands
from smtpplus.workers.pool import NodeConnections, merge_expositions
from smtpplus.workers.worker import LogForwarder, RemoteSuppressions
from tests.harness.clients import logged_in, smtp, submit
from tests.harness.daemon import Daemon
from tests.harness.messages import message, queue_id
from tests.harness.polling import poll
from tests.harness.ports import free_port, occupy, port_is_free
from tests.harness.tls import client_context

SETTINGS = SessionSettings(
    hostname="mx.test",
    max_message_size=1000,
    max_recipients=10,
    max_connections=3,
    max_connections_per_ip=2,
    idle_timeout=60,
    auth_requires_tls=False,
)


class NodeConnectionsTests(unittest.TestCase):
    """The coordinator counts every worker's connections against the node's limits."""

    def test_per_ip_limit_across_workers(self) -> None:
        """Two connections from one address on two workers use up its limit: the third is refused on either."""
        node = NodeConnections(SETTINGS)
        self.assertIsNone(node.admit(1, "10.0.0.1"))
        self.assertIsNone(node.admit(2, "10.0.0.1"))
        self.assertIn("from your address", node.admit(1, "10.0.0.1") or "")
        self.assertIsNone(node.admit(2, "10.0.0.2"))
        self.assertIn("Too many connections", node.admit(1, "10.0.0.3") or "")

    def test_release_and_worker_gone(self) -> None:
        """Released slots and every slot of a dead worker are free again."""
        node = NodeConnections(SETTINGS)
        node.admit(1, "10.0.0.1")
        node.admit(1, "10.0.0.2")
        node.admit(2, "10.0.0.1")
        node.release(2, "10.0.0.1")
        self.assertEqual((node.total, node.of(1), node.of(2)), (2, 2, 0))
        node.worker_gone(1)
        self.assertEqual((node.total, node.per_ip), (0, {}))
        # Releasing what was never taken changes nothing.
        node.release(1, "10.0.0.9")
        self.assertEqual(node.total, 0)

    def test_draining(self) -> None:
        """Once the node stops, every new connection is refused as shutting down."""
        node = NodeConnections(SETTINGS)
        node.draining = True
        self.assertEqual(node.admit(1, "10.0.0.1"), "421 4.3.2 Service shutting down")


class MetricsMergeTests(unittest.TestCase):
    """/metrics of a node adds up its processes."""

    def scrape(self, metrics: Metrics) -> bytes:
        return generate_latest(metrics.registry)

    def test_counters_histograms_and_gauges_add_up(self) -> None:
        """Accepted messages, refusals, the accept histogram and sessions are the sums of the processes'."""
        coordinator, first, second = daemon_metrics(), daemon_metrics(), daemon_metrics()
        first.message_accepted(0.002)
        second.message_accepted(0.02)
        second.message_accepted(0.02)
        second.message_refused("sender")
        first.count_sessions(lambda: 3)
        second.count_sessions(lambda: 4)
        merged = merge_expositions([self.scrape(m) for m in (coordinator, first, second)]).decode()
        lines = dict(line.rsplit(" ", 1) for line in merged.splitlines() if line and not line.startswith("#"))
        self.assertEqual(float(lines["smtpplus_messages_accepted_total"]), 3.0)
        self.assertEqual(float(lines['smtpplus_messages_refused_total{reason="sender"}']), 1.0)
        self.assertEqual(float(lines["smtpplus_accept_seconds_count"]), 3.0)
        self.assertEqual(float(lines['smtpplus_accept_seconds_bucket{le="0.0025"}']), 1.0)
        self.assertEqual(float(lines["smtpplus_smtp_sessions"]), 7.0)

    def test_start_time_is_the_coordinators(self) -> None:
        """The process start time is the first text's, not a sum."""
        texts = [
            b"# HELP process_start_time_seconds Start.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 100.0\n",
            b"# HELP process_start_time_seconds Start.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 200.0\n",
        ]
        self.assertIn(b"process_start_time_seconds 100.0", merge_expositions(texts))


class _Echo(amp.AMP):
    """Answers L{commands.Enqueue} with how many messages and bytes arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[tuple[NewMessage, bytes | None]]] = []

    @commands.Enqueue.responder
    def enqueue(self, batch: bytes) -> dict[str, Any]:
        self.batches.append(commands.unpack_messages(batch))
        return {"free": ["F1"], "duplicates": [""] * len(self.batches[-1])}


def _message(n: int, recipients: int = 1) -> NewMessage:
    return NewMessage(
        id=f"ID{n}",
        user="shop",
        mail_from="s@allowed.test",
        header_from="A <a@example.com>",
        subject=f"s{n} ✓",
        priority=3,
        recipients=tuple(f"r{i}@dest.test" for i in range(recipients)),
        campaign_name=None,
        campaign_code="c",
        schedule_at=None,
        size=10,
        internal=False,
        created_at=1.5,
    )


class WireTests(unittest.TestCase):
    """The AMP commands carry envelopes and contents of any size."""

    def test_batch_larger_than_one_amp_value(self) -> None:
        """A batch of 200 KiB (AMP's values stop at 64 KiB) arrives whole, envelopes and contents."""
        server = _Echo()
        client = amp.AMP()
        pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client))
        big = b"x" * (150 * 1024)
        batch = [(_message(1, recipients=900), big), (_message(2), None), (_message(3), b"small\r\n")]
        answers: list[Any] = []
        client.callRemote(commands.Enqueue, batch=commands.pack_messages(batch)).addBoth(answers.append)
        pump.flush()
        self.assertEqual(answers, [{"free": ["F1"], "duplicates": ["", "", ""]}])
        self.assertEqual(server.batches, [batch])

    def test_tls_material_round_trip(self) -> None:
        """The certificates the coordinator sends are the ones a worker serves."""
        from smtpplus.config import TLSConfig
        from smtpplus.smtp.tls import tls_material

        material = tls_material(TLSConfig("", ""), "mx.test", self.mktemp())
        again = commands.unpack_tls(commands.pack_tls(material))
        self.assertEqual(again, material)
        self.assertIsNotNone(again.options().getContext())


class _Lines(amp.AMP):
    """The coordinator's end for log traffic: what arrived, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[str] = []
        self.events: list[dict[str, Any]] = []

    @commands.LogLines.responder
    def lines(self, lines: bytes) -> dict[str, Any]:
        self.batches.append(lines.decode("utf-8"))
        return {}

    @commands.Log.responder
    def event(self, event: str) -> dict[str, Any]:
        self.events.append(eventFromJSON(event))
        return {}


class LogForwarderTests(unittest.TestCase):
    """A worker formats its own log lines and sends them once per reactor turn."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.coordinator = _Lines()
        link = amp.AMP()
        self.pump = iosim.connect(
            self.coordinator, iosim.makeFakeServer(self.coordinator), link, iosim.makeFakeClient(link)
        )
        self.forwarder = LogForwarder(self.clock, link, 2)
        self.forwarder.connected = True
        self.log = Logger(namespace="smtpplus.smtp.protocol", observer=self.forwarder)

    def test_events_until_told_the_format(self) -> None:
        """Before the coordinator says how its log is written, each event goes as it is."""
        self.log.info("smtp session peer={peer}", peer="127.0.0.1:1")
        self.pump.flush()
        self.assertEqual([e["peer"] for e in self.coordinator.events], ["127.0.0.1:1"])
        self.assertEqual(self.coordinator.events[0]["smtpplus_worker"], 2)
        self.assertEqual(self.coordinator.batches, [])

    def test_text_lines_batched_per_turn(self) -> None:
        """Lines logged in one turn arrive as one batch of the daemon's text lines, in order, after the turn."""
        self.forwarder.set_format("text", "node-a")
        self.log.info("first {n}", n=1)
        self.log.warn("second {n}", n=2)
        self.pump.flush()
        self.assertEqual(self.coordinator.batches, [])
        self.clock.advance(0)
        self.pump.flush()
        self.assertEqual(len(self.coordinator.batches), 1)
        lines = self.coordinator.batches[0].splitlines()
        self.assertEqual(len(lines), 2)
        self.assertRegex(lines[0], r"^\d{4}-\d\d-\d\dT\S+ \[smtpplus\.smtp\.protocol#info\] first 1$")
        self.assertRegex(lines[1], r"\[smtpplus\.smtp\.protocol#warn\] second 2$")
        self.assertEqual(self.coordinator.events, [])

    def test_json_lines(self) -> None:
        """In JSON each line is one object with the node, the worker, an ISO time and the event's fields."""
        self.forwarder.set_format("json", "node-a")
        self.log.info("accepted id={id}", id="ABC")
        self.clock.advance(0)
        self.pump.flush()
        record = json.loads(self.coordinator.batches[0])
        self.assertEqual((record["node"], record["smtpplus_worker"], record["id"]), ("node-a", 2, "ABC"))
        self.assertRegex(record["timestamp"], r"^\d{4}-\d\d-\d\dT")

    def test_a_full_batch_goes_at_once(self) -> None:
        """A turn that logs BATCH_LINES lines sends them without waiting for its end."""
        self.forwarder.set_format("text", None)
        for n in range(LogForwarder.BATCH_LINES):
            self.log.info("line {n}", n=n)
        self.pump.flush()
        self.assertEqual(len(self.coordinator.batches), 1)
        self.assertEqual(len(self.coordinator.batches[0].splitlines()), LogForwarder.BATCH_LINES)
        self.clock.advance(0)
        self.pump.flush()
        self.assertEqual(len(self.coordinator.batches), 1)


class _Suppressions(amp.AMP):
    """The coordinator's end for suppression lookups: a key filter, and each lookup counted."""

    def __init__(self, keys: KeyFilter | None) -> None:
        super().__init__()
        self.keys = keys
        self.asked: list[str] = []

    @commands.GetSuppressionKeys.responder
    def suppression_keys(self) -> dict[str, Any]:
        return {"bits": b"" if self.keys is None else self.keys.to_bytes()}

    @commands.FindSuppression.responder
    def find(self, user: str, address: str) -> dict[str, Any]:
        self.asked.append(address)
        if address.lower() == "gone@dest.test":
            return {"found": True, "address": address, "reason": "550 5.1.1", "created_at": 1.0}
        return {"found": False}


class RemoteSuppressionsTests(unittest.TestCase):
    """A worker answers the RCPT TO lookups its copy of the key filter rules out, and asks about the rest."""

    def connect(self, keys: KeyFilter | None) -> tuple[_Suppressions, RemoteSuppressions, iosim.IOPump]:
        coordinator = _Suppressions(keys)
        link = amp.AMP()
        pump = iosim.connect(coordinator, iosim.makeFakeServer(coordinator), link, iosim.makeFakeClient(link))
        return coordinator, RemoteSuppressions(link), pump

    def find(self, pump: iosim.IOPump, suppressions: RemoteSuppressions, user: str, address: str) -> Any:
        d = suppressions.find(user, address)
        pump.flush()
        return self.successResultOf(d)

    def test_filter_rules_out_without_asking(self) -> None:
        """Only a key the filter may hold (the suppressed one, one added later) is asked about."""
        keys = KeyFilter()
        keys.add("shop", "gone@dest.test")
        coordinator, suppressions, pump = self.connect(keys)
        # Before the filter arrives every lookup asks.
        self.assertIsNone(self.find(pump, suppressions, "shop", "a@dest.test"))
        suppressions.load()
        pump.flush()
        for n in range(20):
            self.assertIsNone(self.find(pump, suppressions, "shop", f"r{n}@dest.test"))
        self.assertEqual(self.find(pump, suppressions, "SHOP", "Gone@Dest.test").reason, "550 5.1.1")
        suppressions.keys.add("shop", "later@dest.test")
        self.find(pump, suppressions, "shop", "later@dest.test")
        self.assertEqual(coordinator.asked, ["a@dest.test", "Gone@Dest.test", "later@dest.test"])

    def test_no_filter_asks_each_time(self) -> None:
        """A coordinator without a filter (PostgreSQL) is asked about every address."""
        coordinator, suppressions, pump = self.connect(None)
        suppressions.load()
        pump.flush()
        for n in range(3):
            self.find(pump, suppressions, "shop", f"r{n}@dest.test")
        self.assertEqual(len(coordinator.asked), 3)


class DaemonLogLinesTests(unittest.TestCase):
    """The coordinator appends a worker's formatted lines to its own log."""

    def test_lines_appended_and_format_told(self) -> None:
        from smtpplus.config import LogConfig
        from smtpplus.log import DaemonLog, Destination

        out = io.StringIO()
        daemon_log = DaemonLog(Destination(stream=out), LogConfig("json", "info"), "node-a")
        self.assertEqual(daemon_log.line_format, "json")
        daemon_log.write_lines('{"a": 1}\n{"b": 2}\n')
        self.assertEqual(out.getvalue(), '{"a": 1}\n{"b": 2}\n')
        syslog = DaemonLog(Destination(syslog_prefix="smtpplus"), LogConfig("text", "info"))
        self.assertEqual(syslog.line_format, "events")


class NodeAdmissionTests(unittest.TestCase):
    """A worker's session greets only once the coordinator gave it a slot."""

    def session(self, answer: Deferred[str | None]) -> tuple[Any, Any, list[str]]:
        from twisted.internet.testing import StringTransport

        from smtpplus.smtp.protocol import SMTPSession
        from smtpplus.smtp.registry import SessionRegistry

        released: list[str] = []

        class Node:
            def admit(self, ip: str) -> Deferred[str | None]:
                return answer

            def release(self, ip: str) -> None:
                released.append(ip)

        registry = SessionRegistry(SETTINGS, Clock(), worker=2, node=Node())
        session = SMTPSession(registry, None, None, False)  # type: ignore[arg-type]
        transport = StringTransport(peerAddress=_Address("10.0.0.7"), hostAddress=_Address("10.0.0.1"))
        session.makeConnection(transport)
        return session, transport, released

    def test_greeting_after_admission(self) -> None:
        """Nothing is written (and the transport is paused) until the slot is given; then the 220."""
        answer: Deferred[str | None] = Deferred()
        session, transport, released = self.session(answer)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")
        answer.callback(None)
        self.assertTrue(transport.value().startswith(b"220 mx.test ESMTP"))
        self.assertEqual(transport.producerState, "producing")
        session.connectionLost(None)
        self.assertEqual(released, ["10.0.0.7"])

    def test_refused(self) -> None:
        """A refusal is written as it came and the connection closed; no slot to give back."""
        session, transport, released = self.session(succeed("421 4.7.0 Too many connections, try again later"))
        self.assertEqual(transport.value(), b"421 4.7.0 Too many connections, try again later\r\n")
        self.assertTrue(transport.disconnecting)
        session.connectionLost(None)
        self.assertEqual(released, [])

    def test_client_left_before_the_answer(self) -> None:
        """A slot given after the client left goes straight back."""
        answer: Deferred[str | None] = Deferred()
        session, transport, released = self.session(answer)
        session.connectionLost(None)
        answer.callback(None)
        self.assertEqual(released, ["10.0.0.7"])
        self.assertEqual(transport.value(), b"")


class WorkerSocketsTests(unittest.TestCase):
    """The coordinator's one-socket-per-worker ports (C{SO_REUSEPORT}) stay exclusive."""

    def bind(self, port: int) -> _WorkerSockets:
        sockets = _WorkerSockets("127.0.0.1", port, ServerFactory(), 2)
        self.addCleanup(sockets.stopListening)
        return sockets

    def test_port_listens_from_the_start(self) -> None:
        """Bound means listening: no other program can take the port while the workers load."""
        port = free_port()
        self.bind(port)
        self.assertFalse(port_is_free(port))
        with self.assertRaises(CannotListenError):
            reactor.listenTCP(port, ServerFactory(), interface="127.0.0.1")

    def test_second_daemon_refused(self) -> None:
        """A second coordinator cannot join the SO_REUSEPORT group: "address already in use"."""
        port = free_port()
        self.bind(port)
        with self.assertRaises(CannotListenError) as caught:
            _WorkerSockets("127.0.0.1", port, ServerFactory(), 2)
        self.assertEqual(caught.exception.socketError.errno, errno.EADDRINUSE)

    def test_port_of_another_program_refused(self) -> None:
        """A port another program listens on is refused, and nothing of ours stays bound."""
        port = free_port()
        held = occupy(port)
        self.addCleanup(held.close)
        with self.assertRaises(CannotListenError):
            _WorkerSockets("127.0.0.1", port, ServerFactory(), 2)
        held.close()
        self.assertTrue(port_is_free(port))


class _Address:
    def __init__(self, host: str) -> None:
        self.host = host
        self.port = 25


def _workers_config(d: Daemon, smtp_lines: str = "", delivery: str = "", tables: str = "") -> str:
    return d.toml(smtp=smtp_lines + "\nauth_requires_tls = true", delivery=delivery, tables=tables).replace(
        "[server]\n", "[server]\nworkers = 2\n", 1
    )


def _tree(pid: int) -> list[int]:
    """The worker processes of coordinator C{pid}."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue
            if fields.get("PPid", "").strip() == str(pid):
                children.append(int(entry))
    return children


class WorkerDaemonTests(unittest.TestCase):
    """The real twistd with [server] workers = 2, an aiosmtpd smarthost, smtplib clients."""

    def start(self, **kw: Any) -> Daemon:
        d = Daemon(lambda d: _workers_config(d, **kw), plain=1, tls=0)
        self.addCleanup(d.stop)
        self.d = d
        self.port = d.plain_ports[0]
        self.workers = poll(lambda: self._serving(2), 30)
        self.assertTrue(self.workers, d.process.output())
        return d

    def _serving(self, count: int) -> list[dict[str, Any]] | None:
        workers = self.d.api("GET", "/api/v1/settings").json["workers"]
        return workers if sum(1 for w in workers if w["serving"]) == count else None

    def test_sessions_spread_and_logged(self) -> None:
        """
        Connections land on both workers (settings count them per worker),
        each session's log line names its worker, and /metrics adds up the
        messages both accepted.
        """
        d = self.start()
        username, password = d.create_user(authorized_domains="allowed.test")
        clients = [logged_in(self.port, username, password) for _ in range(12)]
        try:
            sessions = {w["index"]: w["sessions"] for w in d.api("GET", "/api/v1/settings").json["workers"]}
            self.assertEqual(sum(sessions.values()), 12)
            self.assertTrue(all(sessions.values()), sessions)
            for n, client in enumerate(clients):
                self.assertEqual(submit(client, "s@allowed.test", [f"r{n}@dest.test"], message(subject=f"spread {n}"))[0], 250)
        finally:
            for client in clients:
                client.quit()
        self.assertTrue(poll(lambda: len(d.sink.find("spread")) == 12, 20))
        served = poll(lambda: {w for w in ("worker=1", "worker=2") if w in d.process.output()} == {"worker=1", "worker=2"}, 10)
        self.assertTrue(served, d.process.output())
        metrics = d.api("GET", "/metrics").body.decode()
        self.assertIn("smtpplus_messages_accepted_total 12.0", metrics)

    def test_priority_one_overtakes_backlog_of_other_workers(self) -> None:
        """
        With one delivery at a time and a slow next hop, a priority-1
        message sent after a bulk backlog (accepted by both workers) leaves
        before all of the bulk still waiting when it was queued: at most
        the one delivery already under way arrives between its 250 and it.
        """
        d = self.start(delivery="max_concurrency = 1")
        d.sink.delay = 0.3
        username, password = d.create_user(authorized_domains="allowed.test")
        clients = [logged_in(self.port, username, password) for _ in range(6)]
        try:
            for n in range(30):
                extra = ['X-SMTPAPI: {"Priority": 5}']
                self.assertEqual(submit(clients[n % 6], "s@allowed.test", ["r@dest.test"], message(subject=f"bulk {n}", headers=extra))[0], 250)
            urgent = message(subject="urgent", headers=['X-SMTPAPI: {"Priority": 1}'])
            self.assertEqual(submit(clients[5], "s@allowed.test", ["r@dest.test"], urgent)[0], 250)
            queued_at = time.time()
        finally:
            for client in clients:
                client.quit()
        output = d.process.output()
        self.assertTrue("worker=1" in output or "worker=2" in output)
        arrived = d.sink.wait_for("urgent", 30)
        bulk = [m for m in d.sink.received() if m.message["subject"].startswith("bulk")]
        self.assertLess(len([m for m in bulk if m.at < queued_at]), 20, "no backlog was left to overtake")
        overtaken_by = [m.message["subject"] for m in bulk if queued_at <= m.at < arrived.at]
        self.assertLessEqual(len(overtaken_by), 1, overtaken_by)

    def test_worker_killed_mid_stream(self) -> None:
        """
        SIGKILL of one worker while 4 sessions stream 200 messages: every
        message answered 250 reaches the smarthost (at most twice), the
        clients of the dead worker reconnect, and the worker is back within
        2 s, logged, as a new interpreter (the first two were forked).
        """
        d = self.start()
        username, password = d.create_user(authorized_domains="allowed.test")
        accepted: dict[str, str] = {}
        lock = threading.Lock()
        total = 200
        counter = iter(range(total))

        def stream() -> None:
            client = None
            n = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if n is None:
                    n = next(counter, None)
                    if n is None:
                        break
                try:
                    if client is None:
                        client = logged_in(self.port, username, password)
                    code, text = submit(client, "s@allowed.test", ["r@dest.test"], message(subject=f"stream {n}"))
                except (smtplib.SMTPException, OSError):
                    # The worker died under this session: a new one goes on.
                    client = None
                    continue
                if code == 250:
                    with lock:
                        accepted[f"stream {n}"] = queue_id(text)
                n = None
            if client is not None:
                client.quit()

        threads = [threading.Thread(target=stream) for _ in range(4)]
        for t in threads:
            t.start()
        self.assertTrue(poll(lambda: len(accepted) >= 50, 60))
        index, victim = self.workers[0]["index"], self.workers[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        def replaced() -> list[dict[str, Any]]:
            described = d.api("GET", "/api/v1/settings").json["workers"]
            return [w for w in described if w["index"] == index and w["pid"] != victim]

        # Started again within 2 s (it then needs its own start-up time to serve).
        self.assertTrue(poll(replaced, 2.0))
        self.assertLess(time.monotonic() - killed_at, 2.5)
        for t in threads:
            t.join(150)
        self.assertEqual(len(accepted), total)
        back = poll(lambda: [w for w in self._serving(2) or [] if w["index"] == index], 15)
        self.assertTrue(back)
        self.assertEqual(back[0]["restarts"], 1)
        self.assertTrue(poll(lambda: {s for s in accepted} <= {m.message["subject"] for m in d.sink.received()}, 60))
        counts: dict[str, int] = {}
        for received in d.sink.received():
            subject = received.message["subject"]
            counts[subject] = counts.get(subject, 0) + 1
        self.assertLessEqual(max(counts.values()), 2)
        output = d.process.output()
        self.assertTrue(f"smtp worker {index} (pid {victim}) ended after" in output, "the death is not logged")
        self.assertTrue("starting it again in" in output, "the restart is not logged")
        # The first workers are forked from the coordinator; one started
        # again, once the coordinator runs threads, is a new interpreter.
        self.assertEqual(output.count("after its start (forked from the coordinator)"), 2, output)
        self.assertIn(f"smtp worker {index} (pid {back[0]['pid']}) serving", output)
        self.assertEqual(output.count("after its start (a new interpreter)"), 1, output)

    def test_throttle_across_workers(self) -> None:
        """
        auth_failures_per_user = 3: three wrong passwords on new connections
        (spread over the workers) lock the username on every worker, so the
        right password from a fourth address is refused too.
        """
        d = self.start(tables="[security]\nauth_failures_per_user = 3\nauth_failures_per_ip = 100\n")
        username, password = d.create_user(authorized_domains="allowed.test")
        for _ in range(3):
            client = smtp(self.port)
            client.ehlo("client.test")
            client.starttls(context=client_context())
            client.ehlo("client.test")
            with self.assertRaises(smtplib.SMTPAuthenticationError):
                client.login(username, "wrong-password")
            client.close()
        refused = None
        for _ in range(4):
            client = smtp(self.port)
            client.ehlo("client.test")
            client.starttls(context=client_context())
            client.ehlo("client.test")
            try:
                client.login(username, password)
            except smtplib.SMTPAuthenticationError as e:
                refused = e.smtp_code
            client.close()
        self.assertIsNotNone(refused)
        output = d.process.output()
        self.assertIn(f"AUTH for username '{username}' locked", output)

    def test_sigterm_stops_the_tree(self) -> None:
        """SIGTERM with a session mid-DATA: coordinator and both workers are gone within 10 s."""
        d = self.start()
        username, password = d.create_user(authorized_domains="allowed.test")
        client = logged_in(self.port, username, password)
        client.mail("s@allowed.test")
        client.rcpt("r@dest.test")
        client.putcmd("data")
        client.getreply()
        client.send(b"Subject: half\r\n\r\nstill typing\r\n")
        coordinator = d.process.proc.pid
        workers = _tree(coordinator)
        self.assertEqual(len(workers), 2)
        started = time.monotonic()
        os.kill(coordinator, signal.SIGTERM)
        self.assertIsNotNone(d.process.wait(10))
        self.assertLess(time.monotonic() - started, 10)
        self.assertTrue(poll(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), 2))
        client.close()
        self.assertNotIn("Traceback", d.process.output())


class PrivilegedWorkersTests(unittest.TestCase):
    """Workers with twistd --uid nobody and port 25 in the set."""

    def test_port_25_as_nobody(self) -> None:
        """
        As root with --uid/--gid nobody and port 25: both workers run as
        nobody, and a message sent to port 25 is delivered.
        """
        import pwd

        from tests.harness.ports import port_is_free

        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root to bind port 25 and switch users")
        if not port_is_free(25):
            raise unittest.SkipTest("port 25 is in use on this machine")
        nobody = pwd.getpwnam("nobody")

        def prepare(d: Daemon) -> None:
            os.makedirs(d.state_dir)
            os.chown(d.state_dir, nobody.pw_uid, nobody.pw_gid)
            # nobody must reach state_dir through the test's directory.
            os.chmod(d.directory, 0o755)

        d = Daemon(
            lambda d: _workers_config(d).replace(f'ports = "{d.plain_ports[0]}"', f'ports = "25,{d.plain_ports[0]}"'),
            plain=1,
            tls=0,
            wait=False,
            prepare=prepare,
            twistd_args=["--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid)],
        )
        self.addCleanup(d.stop)
        d.wait_ready([25, d.admin_port])

        def serving() -> list[int] | None:
            # A worker sets itself up as root, then switches: look once it serves.
            described = d.api("GET", "/api/v1/settings").json["workers"]
            return [w["pid"] for w in described] if all(w["serving"] for w in described) else None

        workers = poll(serving, 20)
        self.assertEqual(sorted(workers), sorted(_tree(d.process.proc.pid)))
        for pid in workers:
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            self.assertEqual(set(uids), {str(nobody.pw_uid)})
        username, password = d.create_user(authorized_domains="allowed.test")
        client = logged_in(25, username, password)
        try:
            self.assertEqual(submit(client, "s@allowed.test", ["r@dest.test"], message(subject="via 25"))[0], 250)
        finally:
            client.quit()
        self.assertTrue(d.sink.wait_for("via 25", 20))

