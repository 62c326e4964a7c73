"""
The next hop: an aiosmtpd server on 127.0.0.1 in a thread that keeps every
message it accepts.  Nothing here imports smtpplus.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import threading
import time
from typing import Any

import attrs
from aiosmtpd.controller import Controller

from tests.harness.polling import poll
from tests.harness.ports import free_port

# What the smarthost answers at the end of DATA.
DATA_REPLY = "250 2.0.0 Ok: queued at smarthost"
# How long a message for a C{slow} recipient takes at the end of DATA.
SLOW_SECONDS = 3.0


@attrs.define
class Received:
    """
    One message the smarthost accepted: the envelope (the null sender as
    C{""}), the bytes, whether the session used TLS, the client's
    (address, port) — one per connection — and the wall-clock time.
    """

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool = False
    peer: tuple[Any, ...] = ()
    at: float = attrs.field(factory=time.time)

    @property
    def content(self) -> bytes:
        """The message bytes (the name the black-box tests use)."""
        return self.data

    @property
    def message(self) -> email.message.EmailMessage:
        """The message parsed with the default policy."""
        return parse(self.data)

    def __getitem__(self, key: str) -> Any:
        # Tests written for the old FakeSmarthost read its messages as
        # dicts (m["data"]); kept until no test does.
        if key not in ("mail_from", "rcpt_tos", "data", "tls", "peer"):
            raise KeyError(key)
        return getattr(self, key)


def parse(data: bytes) -> email.message.EmailMessage:
    """Parse message bytes with the modern policy."""
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


class _Handler:
    def __init__(self, server: Smarthost) -> None:
        self.server = server

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        reply = self.server.rcpt_reply(address)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        delay = self.server.delay
        if self.server.conventions and any(r.lower().startswith("slow") for r in envelope.rcpt_tos):
            delay = max(delay, SLOW_SECONDS)
        if delay:
            await asyncio.sleep(delay)
        received = Received(
            mail_from="" if envelope.mail_from == "<>" else envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content,
            tls=session.ssl is not None,
            peer=tuple(session.peer),
        )
        with self.server.lock:
            self.server.messages.append(received)
        return DATA_REPLY


class Smarthost:
    """
    An aiosmtpd smarthost on 127.0.0.1 (on C{port}, else a free one).

    C{replies[address]} is a list of RCPT replies used in turn (the last
    one repeats); 250 by default.  With C{conventions}, a recipient whose
    local part starts with C{bounce} gets 550, with C{defer} 451, and a
    message for a C{slow} recipient takes L{SLOW_SECONDS} at the end of
    DATA (the black-box tests steer delivery with addresses alone).
    C{delay} holds every message that long at the end of DATA.  Other
    keyword arguments go to aiosmtpd's C{Controller} (C{tls_context},
    C{authenticator}, ...).
    """

    def __init__(
        self,
        port: int | None = None,
        delay: float = 0.0,
        conventions: bool = False,
        start: bool = True,
        **controller_args: Any,
    ) -> None:
        self.lock = threading.Lock()
        self.replies: dict[str, list[str]] = {}
        self.messages: list[Received] = []
        self.rcpt_log: list[tuple[str, str]] = []
        self.delay = delay
        self.conventions = conventions
        self.port = port or free_port()
        self._controller_args = controller_args
        self.controller: Controller | None = None
        if start:
            self.start()

    def start(self) -> None:
        """Start listening (again, after L{stop})."""
        self.controller = Controller(_Handler(self), hostname="127.0.0.1", port=self.port, **self._controller_args)
        self.controller.start()

    def stop(self) -> None:
        """Stop listening; nothing when stopped already."""
        controller, self.controller = self.controller, None
        if controller is not None:
            try:
                controller.stop()
            except Exception:  # noqa: BLE001 - its loop has gone already
                pass

    def rcpt_reply(self, address: str) -> str:
        """The reply to C{RCPT TO:<address>}, logged in C{rcpt_log}."""
        with self.lock:
            script = self.replies.get(address.lower())
            if script:
                reply = script.pop(0) if len(script) > 1 else script[0]
            else:
                reply = self._conventional(address)
            self.rcpt_log.append((address, reply))
        return reply

    def _conventional(self, address: str) -> str:
        local = address.partition("@")[0].lower()
        if self.conventions and local.startswith("bounce"):
            return "550 5.1.1 No such user here"
        if self.conventions and local.startswith("defer"):
            return "451 4.3.0 Try again later"
        return "250 2.1.5 OK"

    def received(self) -> list[Received]:
        """Every message accepted so far, in order."""
        with self.lock:
            return list(self.messages)

    def connections(self) -> int:
        """How many client connections carried the messages received so far."""
        return len({m.peer for m in self.received()})

    def find(self, needle: str) -> list[Received]:
        """The messages whose bytes contain C{needle}."""
        return [m for m in self.received() if needle.encode() in m.data]

    def wait_for(self, needle: str, timeout: float = 15.0) -> Received:
        """Block until a message containing C{needle} arrives; fails after C{timeout} seconds."""
        found = poll(lambda: self.find(needle), timeout)
        assert found, f"no message with {needle!r} reached the smarthost within {timeout}s"
        return found[0]
