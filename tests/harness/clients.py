"""
Real clients: smtplib sessions, a raw line-level SMTP session, an asyncio
SMTP client for load, the admin API over urllib and an HTTP receiver for
webhooks.  Nothing here imports smtpplus.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import random
import smtplib
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from tests.harness.messages import plain_auth
from tests.harness.tls import client_context

# --- smtplib -------------------------------------------------------------------------


def loopback_source() -> tuple[str, int]:
    """
    A random 127.x.y.z source address: the daemon slows down failed AUTHs
    per client IP, and the suite's many deliberate failures must not add up.
    """
    a, b, c = (random.randrange(1, 255) for _ in range(3))
    return (f"127.{a}.{b}.{c}", 0)


def smtp(port: int) -> smtplib.SMTP:
    """An smtplib session to 127.0.0.1:C{port} from a random loopback address."""
    return smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=loopback_source())


def logged_in(port: int, username: str, password: str, mechanism: str = "PLAIN") -> smtplib.SMTP:
    """An smtplib session after EHLO, STARTTLS, EHLO and AUTH."""
    client = smtp(port)
    client.ehlo("client.test")
    client.starttls(context=client_context())
    client.ehlo("client.test")
    client.user, client.password = username, password
    auth = client.auth_plain if mechanism == "PLAIN" else client.auth_login
    client.auth(mechanism, auth, initial_response_ok=mechanism == "PLAIN")
    return client


def submit(
    client: smtplib.SMTP,
    mail_from: str,
    recipients: Iterable[str],
    data: bytes,
    mail_options: Iterable[str] = (),
) -> tuple[int, str]:
    """
    One transaction on a logged-in session: the (code, text) of the first
    refusal or of the end of DATA; a refused transaction is reset.
    """
    code, reply = client.mail(mail_from, list(mail_options))
    if code != 250:
        client.rset()
        return code, reply.decode()
    for rcpt in recipients:
        code, reply = client.rcpt(rcpt)
        if code not in (250, 251):
            client.rset()
            return code, reply.decode()
    try:
        code, reply = client.data(data)
    except smtplib.SMTPResponseException as e:
        return e.smtp_code, e.smtp_error.decode()
    return code, reply.decode()


def submit_in_thread(
    port: int,
    mail_from: str,
    recipients: Sequence[str],
    data: bytes,
    username: str,
    password: str,
    mail_options: Sequence[str] = (),
) -> Deferred[tuple[int, str]]:
    """
    Log in on plaintext and submit one message with smtplib in a thread
    (the server under test runs on this reactor); fires with the first
    refusal or the DATA reply.  Addresses may be raw UTF-8.
    """
    from twisted.internet.threads import deferToThread

    def run() -> tuple[int, str]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.command_encoding = "utf-8"
            client.ehlo("client.test")
            client.login(username, password)
            return submit(client, mail_from, recipients, data, mail_options)

    return deferToThread(run)


class RawSession:
    """A line-level SMTP client on a plain socket, for exact replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.buffer = b""

    def reply(self) -> list[bytes]:
        """The lines of one (possibly multi-line) reply, CRLF included."""
        lines = []
        for _ in range(200):
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"closed; got {lines} {self.buffer!r}")
                self.buffer += chunk
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            lines.append(line + b"\r\n")
            if line[3:4] != b"-":
                return lines
        raise AssertionError("reply too long")

    def command(self, line: str) -> list[bytes]:
        """Send one command line; its reply."""
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self) -> None:
        """Wrap the socket in TLS (after a 220 to STARTTLS)."""
        self.sock = client_context().wrap_socket(self.sock)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()


# --- asyncio, for load ---------------------------------------------------------------


class SMTPError(Exception):
    """An unexpected reply."""


class SMTPClient:
    """A minimal SMTP client on asyncio streams: enough for load generation."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply_timeout: float = 120.0) -> None:
        self.reader = reader
        self.writer = writer
        self.reply_timeout = reply_timeout
        # Seconds from writing the final dot to reading the reply, of the
        # last transaction that got that far (the benchmarks' latency).
        self.dot_to_reply: float | None = None

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float = 30.0) -> SMTPClient:
        """Connect and read the greeting."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        client = cls(reader, writer)
        await client.expect(220)
        return client

    async def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), self.reply_timeout)
            if not line:
                raise SMTPError("connection closed")
            lines.append(line[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    async def expect(self, code: int) -> str:
        """Read a reply; raise L{SMTPError} unless it has C{code}."""
        got, text = await self.reply()
        if got != code:
            raise SMTPError(f"expected {code}, got {got} {text}")
        return text

    async def command(self, line: str, code: int) -> str:
        """Send C{line}; its reply's text, which must have C{code}."""
        self.writer.write(line.encode("utf-8") + b"\r\n")
        return await self.expect(code)

    async def ehlo(self, name: str = "client.bench.example") -> str:
        return await self.command(f"EHLO {name}", 250)

    async def starttls(self, context: ssl.SSLContext) -> None:
        await self.command("STARTTLS", 220)
        await self.writer.start_tls(context, server_hostname=None)

    async def auth_plain(self, username: str, password: str) -> None:
        await self.command(f"AUTH PLAIN {plain_auth(username, password)}", 235)

    async def send(self, mail_from: str, recipient: str, data: bytes) -> tuple[int, str]:
        """
        One transaction, MAIL/RCPT/DATA pipelined (the server must offer
        PIPELINING); C{data} has CRLF lines, no leading dots, ends in CRLF.
        Returns the final reply.
        """
        self.writer.write(f"MAIL FROM:<{mail_from}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
        replies = [await self.reply() for _ in range(3)]
        for (code, text), want in zip(replies, (250, 250, 354), strict=True):
            if code != want:
                if replies[2][0] == 354:
                    # DATA was accepted although a recipient was not: end it empty.
                    self.writer.write(b".\r\n")
                    await self.reply()
                return code, text
        self.writer.write(data + b".\r\n")
        dot = time.monotonic()
        reply = await self.reply()
        self.dot_to_reply = time.monotonic() - dot
        return reply

    async def quit(self) -> None:
        """QUIT politely, then close, whatever happens."""
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reader.readline(), 5)
        except (TimeoutError, OSError, SMTPError):
            pass
        self.close()

    def close(self) -> None:
        self.writer.close()


# --- the admin API -------------------------------------------------------------------


class Response:
    """An HTTP answer: status, headers, body and (when it parses) the JSON."""

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        try:
            self.json: Any = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:300]!r}>"


def api_request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = None,
    raw: bytes | None = None,
    content_type: str | None = "application/json",
    timeout: float = 15.0,
) -> Response:
    """One HTTP request to the admin API on 127.0.0.1; never raises for HTTP error statuses."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None and content_type is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return Response(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, e.headers, e.read())


# --- webhooks -----------------------------------------------------------------------


class WebhookReceiver:
    """An HTTP server in a thread that keeps every POST body (and, in C{headers}, each one's headers)."""

    def __init__(self, port: int) -> None:
        self.bodies: list[tuple[str, bytes]] = []
        self.headers: list[dict[str, str]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length") or 0)
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                receiver.bodies.append((self.headers.get("Content-Type") or "", self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self) -> list[dict[str, Any]]:
        """The JSON bodies received so far."""
        return [json.loads(body) for _, body in list(self.bodies)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
