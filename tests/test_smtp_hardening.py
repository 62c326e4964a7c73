"""
Session hardening seen from outside the real twistd daemon (CONTRACT.md §9):
clients that never read their replies, and envelope addresses in Unicode.
"""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from typing import Any

from twisted.trial import unittest

from tests.harness.clients import logged_in, submit
from tests.harness.daemon import Daemon
from tests.harness.messages import queue_id
from tests.harness.polling import poll
from tests.harness.tls import client_context

# Each flooding client pipelines for this long without reading a reply.
FLOOD_SECONDS = 5.0
# Short, so that the non-reading sessions are closed soon after the flood.
IDLE_TIMEOUT = 6
# At most this much is sent per flooding client, whatever the daemon does.
MAX_FLOOD_BYTES = 256 * 1024 * 1024
# How much the daemon's resident memory may grow while four sessions flood
# it.  Bounded, each session holds one transport write buffer (64 KiB plus
# one reply), one read of input (64 KiB) and, with TLS, OpenSSL's state:
# measured at about 0.1 MB per plain and 0.35 MB per TLS session.  6 MB
# leaves room for allocator noise; before flow control a single session
# grew by 8 (NOOP) to 18 (EHLO) MB a second, over 100 MB in this window.
RSS_GROWTH_LIMIT_KB = 6 * 1024


def rss_kb(pid: int) -> int:
    """The resident set size of process C{pid} in kB (VmRSS)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def read_reply(sock: socket.socket) -> bytes:
    """Read one whole (possibly multi-line) reply byte by byte, so that nothing after it is consumed."""
    data = b""
    while not (data.endswith(b"\r\n") and data.rsplit(b"\r\n", 2)[-2][3:4] == b" "):
        byte = sock.recv(1)
        if not byte:
            raise ConnectionError(f"closed after {data!r}")
        data += byte
    return data


class Flood(threading.Thread):
    """
    Sends C{command} over and over on C{sock} without ever reading, until
    the daemon closes the connection or MAX_FLOOD_BYTES are sent.
    """

    def __init__(self, sock: socket.socket, command: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.chunk = command * (16384 // len(command))
        self.sent = 0
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            while self.sent < MAX_FLOOD_BYTES:
                self.sock.sendall(self.chunk)
                self.sent += len(self.chunk)
        except OSError as e:
            self.error = e

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.join(10)


def flood_config(d: Daemon) -> str:
    return d.toml(hostname="mx.hardening.test", smtp=f"idle_timeout = {IDLE_TIMEOUT}", delivery=None)


class UnreadRepliesTests(unittest.TestCase):
    """A client that never reads its replies cannot grow the daemon's memory, and is closed."""

    def setUp(self) -> None:
        self.d = Daemon(flood_config, plain=1, tls=1, sink=False)
        self.addCleanup(self.d.stop)
        self.plain, self.tls = self.d.plain_ports[0], self.d.tls_ports[0]

    def non_reading_socket(self, port: int) -> socket.socket:
        sock = socket.socket()
        # A small receive window: the daemon's replies back up quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(15)
        sock.connect(("127.0.0.1", port))
        return sock

    def warm_up(self) -> None:
        """One ordinary session per kind, so that what the first one allocates is in the baseline."""
        with smtplib.SMTP("127.0.0.1", self.plain, timeout=15) as client:
            client.ehlo("warm.test")
            client.starttls(context=client_context())
            client.ehlo("warm.test")
        with smtplib.SMTP_SSL("127.0.0.1", self.tls, timeout=15, context=client_context()) as client:
            client.ehlo("warm.test")

    def start_floods(self) -> dict[str, Flood]:
        plain_ehlo = self.non_reading_socket(self.plain)
        plain_noop = self.non_reading_socket(self.plain)
        starttls = self.non_reading_socket(self.plain)
        read_reply(starttls)
        starttls.sendall(b"EHLO flood.test\r\n")
        read_reply(starttls)
        starttls.sendall(b"STARTTLS\r\n")
        self.assertTrue(read_reply(starttls).startswith(b"220 "))
        starttls = client_context().wrap_socket(starttls)
        implicit = client_context().wrap_socket(self.non_reading_socket(self.tls))
        floods = {
            "plain EHLO": Flood(plain_ehlo, b"EHLO flood.test\r\n"),
            "plain NOOP": Flood(plain_noop, b"NOOP\r\n"),
            "EHLO after STARTTLS": Flood(starttls, b"EHLO flood.test\r\n"),
            "EHLO on implicit TLS": Flood(implicit, b"EHLO flood.test\r\n"),
        }
        for flood in floods.values():
            self.addCleanup(flood.stop)
            flood.start()
        return floods

    def test_memory_bounded_and_closed(self) -> None:
        """
        Four sessions (plain, after STARTTLS, implicit TLS) pipeline EHLO or
        NOOP for FLOOD_SECONDS without reading: the daemon's RSS grows by
        less than RSS_GROWTH_LIMIT_KB, and every one of them is closed by
        the daemon (idle timeout, or the junk-command limit for NOOP)
        within idle_timeout plus a margin; the daemon serves on.
        """
        pid = self.d.process.proc.pid
        self.warm_up()
        time.sleep(0.5)
        before = rss_kb(pid)
        started = time.monotonic()
        floods = self.start_floods()
        peak = before
        while time.monotonic() - started < FLOOD_SECONDS:
            peak = max(peak, rss_kb(pid))
            time.sleep(0.05)
        self.assertLess(
            peak - before,
            RSS_GROWTH_LIMIT_KB,
            f"RSS {before} kB -> {peak} kB; sent {[(n, f.sent) for n, f in floods.items()]}",
        )
        deadline = started + IDLE_TIMEOUT + 20
        for name, flood in floods.items():
            flood.join(max(0.0, deadline - time.monotonic()))
            self.assertFalse(flood.is_alive(), f"{name}: still open after {time.monotonic() - started:.1f} s")
            self.assertIsInstance(flood.error, OSError, f"{name}: sent {flood.sent} bytes, never closed")
        with smtplib.SMTP("127.0.0.1", self.plain, timeout=15) as client:
            self.assertEqual(client.noop()[0], 250)


def relay_config(d: Daemon) -> str:
    return d.toml(hostname="mx.hardening.test")


class InternationalizedAddressTests(unittest.TestCase):
    """Envelope domains in Unicode are relayed, stored and shown as IDNA A-labels."""

    def setUp(self) -> None:
        self.d = Daemon(relay_config, plain=1, tls=0)
        self.addCleanup(self.d.stop)

    def session(self, username: str, password: str) -> smtplib.SMTP:
        client = logged_in(self.d.plain_ports[0], username, password)
        self.addCleanup(client.close)
        # Sends the addresses as UTF-8, as a client unaware of SMTPUTF8 would.
        client.command_encoding = "utf-8"
        return client

    def message_status(self, message_id: str) -> dict[str, Any]:
        def sent() -> Any:
            message = self.d.api("GET", f"/api/v1/messages/{message_id}").json
            return message if message["status"] == "sent" else None

        message = poll(sent, 20)
        self.assertTrue(message, self.d.api("GET", f"/api/v1/messages/{message_id}").json)
        return message

    def test_unicode_domains_relayed_as_a_labels(self) -> None:
        """
        A user authorized for bücher.example (given to the API in Unicode, stored
        as A-labels) sends from info@bücher.example to x@bücher.example and an ASCII
        recipient: the message is sent, the next hop sees the A-labels in
        MAIL FROM and RCPT TO, and the API shows them; a non-ASCII local part
        gets 553 5.6.7.
        """
        username, password = self.d.create_user(username="idna", authorized_domains=["Bücher.example"])
        client = self.session(username, password)
        code, text = client.mail("jösé@bücher.example")
        self.assertEqual((code, text[:5]), (553, b"5.6.7"))
        data = b"From: Info <info@xn--bcher-kva.example>\r\nTo: x@dest.test\r\nSubject: idna-marker\r\n\r\nHello.\r\n"
        reply = submit(client, "info@bücher.example", ["x@bücher.example", "plain@dest.test"], data)
        message_id = queue_id(reply)
        received = self.d.sink.wait_for("idna-marker")
        self.assertEqual(received.mail_from, "info@xn--bcher-kva.example")
        self.assertEqual(sorted(received.rcpt_tos), ["plain@dest.test", "x@xn--bcher-kva.example"])
        message = self.message_status(message_id)
        self.assertEqual(message["mail_from"], "info@xn--bcher-kva.example")
        self.assertEqual(
            sorted((r["address"], r["status"]) for r in message["recipients"]),
            [("plain@dest.test", "sent"), ("x@xn--bcher-kva.example", "sent")],
        )
