"""
Real clients for the black-box contract suite (L{tests.test_contract}):
the twistd daemon in a subprocess, an aiosmtpd smarthost sink in a thread,
an HTTP receiver for webhooks, the REST API over urllib and SMTP sessions
over smtplib and raw sockets.  Nothing here imports smtpplus.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import email
import email.message
import email.policy
import http.server
import json
import os
import random
import re
import shutil
import smtplib
import socket
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from aiosmtpd.controller import Controller

from tests.helpers import free_port_range, spawn_twistd, wait_for_ports

QUEUED_RE = re.compile(r"^2\.0\.0 Ok: queued as (\S+)$")


def poll(check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    """Call C{check} until it returns something true, at most C{timeout} seconds; return its last result."""
    deadline = time.monotonic() + timeout
    result = check()
    while not result and time.monotonic() < deadline:
        time.sleep(interval)
        result = check()
    return result


# --- the daemon -------------------------------------------------------------------


def run_configs(
    cases: dict[str, tuple[str, Iterable[str]]], timeout: float = 30.0
) -> dict[str, tuple[int | None, str]]:
    """
    Start one daemon per case C{name: (config_text, args)}, all at once,
    expecting each to exit; C{name: (status or None when it kept running, output)}.
    """
    directory = tempfile.mkdtemp(prefix="smtpplus-contract-")
    try:
        processes = {}
        for name, (config_text, args) in cases.items():
            case_dir = os.path.join(directory, name)
            os.makedirs(case_dir)
            path = os.path.join(case_dir, "smtpplus.toml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(config_text)
            processes[name] = spawn_twistd(["--config", path, *args], case_dir)
        deadline = time.monotonic() + timeout
        results = {}
        for name, process in processes.items():
            status = process.wait(max(0.1, deadline - time.monotonic()))
            process.kill()
            results[name] = (status, process.output())
        return results
    finally:
        shutil.rmtree(directory, True)


class Daemon:
    """
    A started daemon: its process, state_dir, ports, admin token and (when
    asked for) an aiosmtpd smarthost sink.
    """

    def __init__(
        self,
        config: Callable[[Daemon], str],
        args: Callable[[Daemon], list[str]] = lambda d: [],
        plain: int = 2,
        tls: int = 1,
        sink: bool = True,
        wait: bool = True,
        prepare: Callable[[Daemon], None] = lambda d: None,
    ) -> None:
        ports = free_port_range(plain + tls + 2)
        self.plain_ports = ports[:plain]
        self.tls_ports = ports[plain : plain + tls]
        self.admin_port = ports[plain + tls]
        self.sink_port = ports[plain + tls + 1]
        self.directory = tempfile.mkdtemp(prefix="smtpplus-contract-")
        self.state_dir = os.path.join(self.directory, "state")
        self.sink = Sink(self.sink_port) if sink else None
        self.config_path = os.path.join(self.directory, "smtpplus.toml")
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(config(self))
        prepare(self)
        self.args = args(self)
        self.process = spawn_twistd(["--config", self.config_path, *self.args], self.directory)
        self._token: str | None = None
        if wait:
            self.wait_ready()

    def wait_ready(self, ports: Iterable[int] | None = None, timeout: float = 30.0) -> None:
        ports = list(self.plain_ports + self.tls_ports + [self.admin_port] if ports is None else ports)
        if not wait_for_ports(ports, timeout, proc=self.process.proc):
            output = self.process.output()
            self.stop()
            raise AssertionError(f"daemon did not accept on {ports} within {timeout}s:\n{output}")

    @property
    def token(self) -> str:
        if self._token is None:
            with open(os.path.join(self.state_dir, "admin-token"), encoding="ascii") as f:
                self._token = f.read().strip()
        return self._token

    def api(self, method: str, path: str, body: Any = None, **kw: Any) -> Response:
        kw.setdefault("token", self.token)
        return api_request(self.admin_port, method, path, body, **kw)

    def create_user(self, **fields: Any) -> tuple[str, str]:
        """Create a user through the API; its (username, password)."""
        response = self.api("POST", "/api/v1/users", fields)
        assert response.status == 201, (response.status, response.json)
        return response.json["username"], response.json["password"]

    def stop(self) -> None:
        self.process.kill()
        if self.sink is not None:
            self.sink.stop()
        shutil.rmtree(self.directory, True)


class Shared:
    """A lazily started daemon shared by the tests of one class, stopped when the test run ends."""

    def __init__(self, factory: Callable[[], Daemon]) -> None:
        self._factory = factory
        self._daemon: Daemon | None = None

    def get(self) -> Daemon:
        if self._daemon is None or self._daemon.process.proc.poll() is not None:
            if self._daemon is not None:
                self._daemon.stop()
            self._daemon = self._factory()
            atexit.register(self._daemon.stop)
        return self._daemon


# --- the smarthost sink ------------------------------------------------------------


class Received:
    """One message the sink accepted."""

    def __init__(self, mail_from: str, rcpt_tos: list[str], content: bytes) -> None:
        self.at = time.time()
        self.mail_from = mail_from
        self.rcpt_tos = rcpt_tos
        self.content = content
        self.message: email.message.EmailMessage = email.message_from_bytes(content, policy=email.policy.default)  # type: ignore[assignment]


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        local = address.partition("@")[0].lower()
        if local.startswith("bounce"):
            return "550 5.1.1 No such user here"
        if local.startswith("defer"):
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if any(r.lower().startswith("slow") for r in envelope.rcpt_tos):
            await asyncio.sleep(3)
        with self.sink.lock:
            self.sink.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 OK sink"


class Sink:
    """
    An aiosmtpd smarthost on 127.0.0.1 in a thread.  Recipients whose
    local part starts with C{bounce} get 550, with C{defer} 451; a message
    for a C{slow} recipient takes 3 s at the end of DATA.
    """

    def __init__(self, port: int, start: bool = True) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.messages: list[Received] = []
        self.controller: Controller | None = None
        if start:
            self.start()

    def start(self) -> None:
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            controller, self.controller = self.controller, None
            try:
                controller.stop()
            except Exception:  # noqa: BLE001 - already stopped
                pass

    def find(self, needle: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if needle.encode() in m.content]

    def wait_for(self, needle: str, timeout: float = 15.0) -> Received:
        found = poll(lambda: self.find(needle), timeout)
        assert found, f"no message with {needle!r} reached the sink within {timeout}s"
        return found[0]


# --- webhooks --------------------------------------------------------------------


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
        return [json.loads(body) for _, body in list(self.bodies)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the REST API ----------------------------------------------------------------


class Response:
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
) -> Response:
    """One HTTP request to the admin API; never raises for HTTP error statuses."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None and content_type is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=15) as r:
            return Response(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Response(e.code, e.headers, e.read())


# --- SMTP --------------------------------------------------------------------------


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def loopback_source() -> tuple[str, int]:
    """
    A random 127.x.y.z source address: the daemon slows down failed AUTHs
    per client IP, and the suite's many deliberate failures must not add up.
    """
    a, b, c = (random.randrange(1, 255) for _ in range(3))
    return (f"127.{a}.{b}.{c}", 0)


def smtp(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=15, source_address=loopback_source())


def logged_in(port: int, username: str, password: str, mechanism: str = "PLAIN") -> smtplib.SMTP:
    """An smtplib session after EHLO, STARTTLS, EHLO and AUTH."""
    client = smtp(port)
    client.ehlo("client.test")
    client.starttls(context=tls_context())
    client.ehlo("client.test")
    client.user, client.password = username, password
    auth = client.auth_plain if mechanism == "PLAIN" else client.auth_login
    client.auth(mechanism, auth, initial_response_ok=mechanism == "PLAIN")
    return client


def message(
    subject: str = "hello",
    from_: str | None = "sender@allowed.test",
    headers: Iterable[str] = (),
    body: str = "Hello.",
) -> bytes:
    lines = []
    if from_ is not None:
        lines.append(f"From: {from_}")
    lines += ["To: rcpt@dest.test", f"Subject: {subject}", *headers, "", body, ""]
    return "\r\n".join(lines).encode()


def submit(
    client: smtplib.SMTP,
    mail_from: str,
    recipients: Iterable[str],
    data: bytes,
    mail_options: Iterable[str] = (),
) -> tuple[int, str]:
    """One transaction on a logged-in session: the (code, text) of the first refusal or of the end of DATA."""
    code, reply = client.mail(mail_from, list(mail_options))
    if code != 250:
        client.rset()
        return code, reply.decode()
    for rcpt in recipients:
        code, reply = client.rcpt(rcpt)
        if code not in (250, 251):
            client.rset()
            return code, reply.decode()
    code, reply = client.data(data)
    return code, reply.decode()


def queue_id(reply: tuple[int, str]) -> str:
    code, text = reply
    match = QUEUED_RE.match(text)
    assert code == 250 and match, f"not accepted: {reply}"
    return match.group(1)


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
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def starttls(self) -> None:
        self.sock = tls_context().wrap_socket(self.sock)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()


def plain_auth(username: str, password: str) -> str:
    return base64.b64encode(f"\0{username}\0{password}".encode()).decode()
