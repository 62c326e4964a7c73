"""
The real daemon when its storage misbehaves: the database file removed
while it runs, the disk filling up while deliveries are in flight, and the
modes of what it writes.
"""

from __future__ import annotations

import errno
import os
import signal
import smtplib
import stat
import subprocess
import time

from twisted.trial import unittest

from tests.harness.clients import api_request
from tests.harness.daemon import daemon_config, start_daemon
from tests.harness.messages import queue_id
from tests.harness.polling import poll
from tests.harness.ports import free_port, free_port_range
from tests.harness.smarthost import Smarthost, parse

TOKEN = "durability-test-token"
DEADLINE = 60.0



def _config(state_dir: str, smtp_port: int, admin_port: int, sink_port: int, extra: str = "") -> str:
    return daemon_config(state_dir, [smtp_port], admin_port, "auth_requires_tls = false") + (
        f'token = "{TOKEN}"\n'
        "[delivery]\n"
        'mode = "smarthost"\n'
        f'smarthost = "127.0.0.1:{sink_port}"\n'
        'smarthost_tls = "none"\n'
        "retry_schedule = [1]\n"
        f"{extra}"
    )


def _send_all(port: int, password: str, seqs: range) -> dict[int, str]:
    """Submit one message per sequence number over one session; returns seq -> queue id (all must be 250)."""
    ids = {}
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.login("keeper", password)
        for seq in seqs:
            body = f"From: <sender@example.com>\r\nSubject: keep {seq}\r\nX-Test-Seq: {seq}\r\n\r\nbody {seq}\r\n"
            smtp.mail("sender@example.com")
            smtp.rcpt(f"r{seq}@dest.test")
            code, resp = smtp.data(body.encode())
            if code != 250:
                raise AssertionError(f"message {seq}: {code} {resp!r}")
            ids[seq] = queue_id(resp.decode())
    return ids


def _copies(sink: Smarthost) -> dict[int, int]:
    counts: dict[int, int] = {}
    for message in sink.received():
        seq = int(parse(message.data)["X-Test-Seq"])
        counts[seq] = counts.get(seq, 0) + 1
    return counts



class LostDatabaseTests(unittest.TestCase):
    def test_database_removed_while_running(self) -> None:
        """
        Messages accepted while the next hop is down, then the database
        file (and its WAL files) removed under the running daemon: it
        notices, opens a new database by itself, queues every message
        again from the spool (naming each), and once the user is created
        again and the next hop is up, each message arrives exactly once.
        """
        count = 10
        smtp_port, admin_port = free_port_range(2)
        sink_port = free_port()
        state_dir = os.path.abspath(self.mktemp())
        daemon = start_daemon(self, _config(state_dir, smtp_port, admin_port, sink_port), wait_ports=[smtp_port, admin_port])
        user = api_request(admin_port, "POST", "/api/v1/users", {"username": "keeper", "authorized_domains": ["example.com"]}, token=TOKEN).json
        ids = _send_all(smtp_port, user["password"], range(count))

        # The WAL files go first: a new database opened while a stale WAL
        # is still at its path would take the old rows back from it.
        for suffix in ("-wal", "-shm", ""):
            try:
                os.unlink(os.path.join(state_dir, "smtpplus.db" + suffix))
            except FileNotFoundError:
                pass
        # The retries (every second) write to the database and notice.
        self.assertTrue(daemon.wait_for_output("queue rebuilt from the spool", 20), daemon.output()[-3000:])
        self.assertIn("smtpplus.db was removed while the daemon had it open", daemon.output())
        # Each message is named: queued again from its spool file, or (if
        # an attempt was under way) rebuilt from that attempt's result,
        # once it is stored.
        def named() -> bool:
            output = daemon.output()
            return all(f"message {i} had no queue entry: " in output for i in ids.values())

        self.assertTrue(poll(named, DEADLINE), daemon.output()[-3000:])

        # The users went with the database: the administrator creates them again.
        created = api_request(admin_port, "POST", "/api/v1/users", {"username": "keeper", "authorized_domains": ["example.com"]}, token=TOKEN)
        self.assertEqual(created.status, 201, created)
        sink = Smarthost(port=sink_port)
        self.addCleanup(sink.stop)
        self.assertTrue(poll(lambda: len(_copies(sink)) == count, DEADLINE), f"{_copies(sink)}\n{daemon.output()[-3000:]}")
        # Give a second delivery every chance to happen before counting.
        time.sleep(3)
        self.assertEqual(_copies(sink), {seq: 1 for seq in range(count)})
        messages = api_request(admin_port, "GET", "/api/v1/messages?limit=100", token=TOKEN).json["messages"]
        self.assertEqual({m["id"]: m["status"] for m in messages if m["id"] in ids.values()}, {i: "sent" for i in ids.values()})
        self.assertEqual(os.listdir(os.path.join(state_dir, "spool", "msg")), [])


class DiskFullTests(unittest.TestCase):
    def test_disk_full_while_delivering(self) -> None:
        """
        On a small file system that fills up while deliveries are in
        flight, the results that cannot be stored are kept and stored once
        space is back: every message reaches the next hop exactly once.
        """
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a small tmpfs as state_dir needs root")
        count = 20
        state_dir = os.path.abspath(self.mktemp())
        os.makedirs(state_dir)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", state_dir], capture_output=True)
        if mounted.returncode != 0:
            raise unittest.SkipTest(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", state_dir], check=False)
        # The next hop takes its time: the disk fills while every message is
        # in its hands, before any result is stored.
        sink = Smarthost(delay=3.0)
        self.addCleanup(sink.stop)
        smtp_port, admin_port = free_port_range(2)
        daemon = start_daemon(
            self, _config(state_dir, smtp_port, admin_port, sink.port, f"max_concurrency = {count}\n"), wait_ports=[smtp_port, admin_port]
        )
        user = api_request(admin_port, "POST", "/api/v1/users", {"username": "keeper", "authorized_domains": ["example.com"]}, token=TOKEN).json
        ids = _send_all(smtp_port, user["password"], range(count))

        filler = os.path.join(state_dir, "filler")
        with open(filler, "wb") as f:
            try:
                for _ in range(64):
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError as e:
                self.assertEqual(e.errno, errno.ENOSPC)
        self.assertTrue(
            daemon.wait_for_output("cannot store delivery results", 20), f"{len(sink.received())}\n{daemon.output()[-3000:]}"
        )
        # Several rewrites of the results fail meanwhile (1, 2, 4 s apart).
        time.sleep(5)
        self.assertEqual(_copies(sink), {seq: 1 for seq in range(count)})
        os.unlink(filler)

        def all_sent() -> bool:
            messages = api_request(admin_port, "GET", "/api/v1/messages?limit=100", token=TOKEN).json["messages"]
            return all(m["status"] == "sent" for m in messages if m["id"] in ids.values()) and len(messages) >= count

        self.assertTrue(poll(all_sent, DEADLINE), daemon.output()[-3000:])
        self.assertIn("delivery results are stored again", daemon.output())
        time.sleep(3)
        self.assertEqual(_copies(sink), {seq: 1 for seq in range(count)})
        self.assertEqual(daemon.output().count("cannot store delivery results"), 1)


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class ModeTests(unittest.TestCase):
    def test_modes_whatever_state_dir_had(self) -> None:
        """
        With a state_dir created 0755 beforehand, the daemon makes it 0700,
        the database and its WAL files 0600, the spool directories 0700 and
        spool files 0600, and so again after a restart.
        """
        smtp_port, admin_port = free_port_range(2)
        sink_port = free_port()
        state_dir = os.path.abspath(self.mktemp())
        os.makedirs(state_dir)
        os.chmod(state_dir, 0o755)
        config = _config(state_dir, smtp_port, admin_port, sink_port)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        daemon = start_daemon(self, config, wait_ports=[smtp_port, admin_port], directory=directory)
        user = api_request(admin_port, "POST", "/api/v1/users", {"username": "keeper", "authorized_domains": ["example.com"]}, token=TOKEN).json
        [message_id] = _send_all(smtp_port, user["password"], range(1)).values()

        def check() -> None:
            self.assertEqual(oct(_mode(state_dir)), oct(0o700))
            for name in ("smtpplus.db", "smtpplus.db-wal", "smtpplus.db-shm"):
                self.assertEqual(oct(_mode(os.path.join(state_dir, name))), oct(0o600), name)
            for name in ("spool", "spool/msg", "spool/tmp", "spool/free", "spool/corrupt"):
                self.assertEqual(oct(_mode(os.path.join(state_dir, name))), oct(0o700), name)
            self.assertEqual(oct(_mode(os.path.join(state_dir, "spool", "msg", message_id))), oct(0o600))

        check()
        daemon.proc.send_signal(signal.SIGTERM)
        self.assertIsNotNone(daemon.wait(15))
        start_daemon(self, config, wait_ports=[smtp_port, admin_port], directory=directory)
        check()
