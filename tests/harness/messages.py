"""Messages to submit, and the queue id in the reply to one.  Nothing here imports smtpplus."""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Iterable

QUEUED_RE = re.compile(r"^2\.0\.0 Ok: queued as (\S+)$")


def message(
    subject: str = "hello",
    from_: str | None = "sender@allowed.test",
    headers: Iterable[str] = (),
    body: str = "Hello.",
) -> bytes:
    """A short message for C{rcpt@dest.test}: From: (unless None), To:, Subject:, C{headers}, C{body}."""
    lines = []
    if from_ is not None:
        lines.append(f"From: {from_}")
    lines += ["To: rcpt@dest.test", f"Subject: {subject}", *headers, "", body, ""]
    return "\r\n".join(lines).encode()


def simple_message(subject: str = "hello", sender: str = "me@example.com", extra: str = "") -> bytes:
    """A message from C{Me <sender>} with C{extra} header lines and a body line that starts with a dot."""
    return (
        f"From: Me <{sender}>\r\nTo: you@dest.test\r\nSubject: {subject}\r\n{extra}\r\nBody line one.\r\n.dotted line\r\n"
    ).encode()


def sized_message(index: int, size: int, mail_from: str, recipient: str, extra_headers: str = "") -> bytes:
    """
    A plain-text message of about C{size} bytes in total, CRLF lines, no
    line starting with a dot (ready for DATA as is), with a unique
    Message-ID.
    """
    head = (
        f"From: Bench <{mail_from}>\r\nTo: <{recipient}>\r\nSubject: bench message {index}\r\n"
        f"Message-ID: <{index}.{secrets.token_hex(6)}@{mail_from.rpartition('@')[2]}>\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n{extra_headers}\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    room = max(size - len(head), len(line))
    body = line * (room // len(line)) + b"y" * (room % len(line) - 2 if room % len(line) >= 2 else 0)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return head + body


def plain_auth(username: str, password: str) -> str:
    """The AUTH PLAIN initial response for C{username}/C{password}."""
    return base64.b64encode(f"\0{username}\0{password}".encode()).decode()


def queue_id(reply: tuple[int, str] | str) -> str:
    """
    The queue id in the reply to the end of DATA, given as (code, text) or
    as its text; fails when the message was not accepted.
    """
    code, text = reply if isinstance(reply, tuple) else (250, reply)
    match = QUEUED_RE.match(text)
    assert code == 250 and match, f"not accepted: {reply}"
    return match.group(1)
