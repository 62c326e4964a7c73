"""
Crash safety of the real daemon: SIGKILL in the middle of a submission
stream, restart on the same state_dir, and check that every message answered
250 is delivered, and that nothing the client never finished is.
"""

from __future__ import annotations

import os
import signal
import smtplib
import threading
import time

from twisted.trial import unittest

from tests.harness.clients import api_request
from tests.harness.daemon import daemon_config, start_daemon
from tests.harness.messages import queue_id
from tests.harness.ports import free_port_range
from tests.harness.smarthost import Smarthost, parse

TOKEN = "crash-test-token"
MESSAGES = 200
SESSIONS = 4
KILL_AFTER = 80  # 250 replies seen before the SIGKILL
DEADLINE = 60.0


class _Stream:
    """
    Submits messages 0..MESSAGES-1 over SESSIONS smtplib sessions in threads
    and records, per sequence number, whether the final dot was sent and the
    queue id of a 250 reply.
    """

    def __init__(self, port: int, password: str) -> None:
        self.port = port
        self.password = password
        self.lock = threading.Lock()
        self.dot_sent: set[int] = set()
        self.queued: dict[int, str] = {}
        self.refused: dict[int, str] = {}
        self.enough = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(SESSIONS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self, k: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                smtp.login("crash", self.password)
                for seq in range(k, MESSAGES, SESSIONS):
                    self._send(smtp, seq)
        except (OSError, smtplib.SMTPException):
            # The daemon was killed: the stream ends here.
            return

    def _send(self, smtp: smtplib.SMTP, seq: int) -> None:
        body = (
            f"From: <sender@example.com>\r\nTo: <r{seq}@dest.test>\r\nSubject: crash {seq}\r\n"
            f"X-Test-Seq: {seq}\r\n\r\n" + "line of body text\r\n" * 50
        ).encode()
        code, resp = smtp.mail("sender@example.com")
        if code != 250:
            raise smtplib.SMTPException(f"MAIL FROM: {code} {resp!r}")
        code, resp = smtp.rcpt(f"r{seq}@dest.test")
        if code != 250:
            raise smtplib.SMTPException(f"RCPT TO: {code} {resp!r}")
        # DATA by hand, so that we know whether the final dot left us.
        smtp.putcmd("data")
        code, resp = smtp.getreply()
        if code != 354:
            raise smtplib.SMTPException(f"DATA: {code} {resp!r}")
        smtp.send(body + b".\r\n")
        with self.lock:
            self.dot_sent.add(seq)
        code, resp = smtp.getreply()
        with self.lock:
            if code == 250:
                self.queued[seq] = queue_id(resp.decode())
                if len(self.queued) >= KILL_AFTER:
                    self.enough.set()
            else:
                self.refused[seq] = f"{code} {resp.decode()}"



class CrashRecoveryTests(unittest.TestCase):
    def test_sigkill_mid_stream(self) -> None:
        """
        After a SIGKILL in the middle of a stream of submissions and a
        restart on the same state_dir, every message answered 250 reaches
        the smarthost (at least once), a message arrives only if the client
        sent its final dot, spool/tmp is empty and the spool drains.
        """
        # A slow smarthost and two delivery slots: a backlog is queued when
        # the daemon dies, so recovery has real work to do.
        sink = Smarthost(delay=0.01)
        self.addCleanup(sink.stop)
        smtp_port, admin_port = free_port_range(2)
        state_dir = os.path.abspath(self.mktemp())
        config = daemon_config(
            state_dir,
            [smtp_port],
            admin_port,
            "auth_requires_tls = false\nmax_connections_per_ip = 50",
        ) + (
            f'token = "{TOKEN}"\n'
            "[delivery]\n"
            'mode = "smarthost"\n'
            f'smarthost = "127.0.0.1:{sink.port}"\n'
            'smarthost_tls = "none"\n'
            "max_concurrency = 2\n"
            "retry_schedule = [1]\n"
        )
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        daemon = start_daemon(self, config, wait_ports=[smtp_port, admin_port], directory=directory)
        user = api_request(admin_port, "POST", "/api/v1/users", {"username": "crash", "authorized_domains": ["example.com"]}, token=TOKEN).json

        stream = _Stream(smtp_port, user["password"])
        stream.start()
        self.assertTrue(stream.enough.wait(30), f"only {len(stream.queued)} messages queued:\n{daemon.output()}")
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        stream.join(15)
        queued = dict(stream.queued)
        self.assertGreaterEqual(len(queued), KILL_AFTER)
        self.assertLess(len(stream.dot_sent), MESSAGES, "the stream ended before the kill")

        restarted = start_daemon(self, config, wait_ports=[smtp_port, admin_port], directory=directory)
        self.assertEqual(partial_files(state_dir), [])

        def arrived() -> dict[int, int]:
            counts: dict[int, int] = {}
            for message in sink.received():
                seq = int(parse(message.data)["X-Test-Seq"])
                counts[seq] = counts.get(seq, 0) + 1
            return counts

        deadline = time.monotonic() + DEADLINE
        while not set(queued) <= set(arrived()) and time.monotonic() < deadline:
            time.sleep(0.1)
        counts = arrived()
        missing = sorted(set(queued) - set(counts))
        self.assertEqual(missing, [], f"250'd but never delivered:\n{restarted.output()[-3000:]}")
        self.assertEqual(sorted(set(counts) - stream.dot_sent), [], "delivered without the client's final dot")
        self.assertEqual(sorted(set(counts) & set(stream.refused)), [], "delivered although refused")

        # Every 250'd id is known to the API and ends sent; the spool drains.
        while time.monotonic() < deadline:
            messages = api_request(admin_port, "GET", "/api/v1/messages?limit=1000", token=TOKEN).json["messages"]
            statuses = {m["id"]: m["status"] for m in messages}
            if all(statuses.get(i) == "sent" for i in queued.values()):
                break
            time.sleep(0.2)
        self.assertEqual({i: statuses.get(i) for i in queued.values() if statuses.get(i) != "sent"}, {})
        msg_dir = os.path.join(state_dir, "spool", "msg")
        while os.listdir(msg_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual(os.listdir(msg_dir), [])
        self.assertEqual(partial_files(state_dir), [])


def partial_files(state_dir: str) -> list[str]:
    """The files under spool/tmp (the SMTP workers keep theirs in tmp/w<N>/)."""
    top = os.path.join(state_dir, "spool", "tmp")
    return [os.path.join(parent, name) for parent, _, names in os.walk(top) for name in names]
