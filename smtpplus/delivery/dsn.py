"""
Delivery status notifications (RFC 3464): the bounce sent from the null
sender to a message's envelope sender when recipients fail for good.
"""

from __future__ import annotations

import email.utils
import os
import re
from collections.abc import Sequence

# A bounce quotes the original header section, not the whole message.
HEADERS_QUOTED = 64 * 1024

_STATUS_RE = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


def status_of(code: int, response: str) -> str:
    """The RFC 3463 status of a reply: its enhanced code, else from the reply code."""
    match = _STATUS_RE.search(response)
    if match and match.group(1)[0] == str(code)[0]:
        return match.group(1)
    return f"{str(code)[0]}.0.0" if code >= 400 else "5.0.0"


def read_headers(path: str, length: int | None = None) -> bytes:
    """The header section of a spooled message of C{length} bytes (worker thread)."""
    with open(path, "rb") as f:
        head = f.read(HEADERS_QUOTED if length is None else min(length, HEADERS_QUOTED))
    return read_headers_of(head)


def read_headers_of(message: bytes) -> bytes:
    """The header section of C{message}, at most L{HEADERS_QUOTED} bytes of it."""
    head = message[:HEADERS_QUOTED]
    end = head.find(b"\r\n\r\n")
    return head[: end + 2] if end >= 0 else head


def build_dsn(
    hostname: str,
    message_id: str,
    mail_from: str,
    failed: Sequence[tuple[str, int, str]],
    original_headers: bytes,
    arrival: float,
    now: float,
) -> bytes:
    """
    The bounce for C{message_id}: C{failed} holds (recipient, reply code,
    reply text) for each recipient given up on.
    """
    boundary = f"{message_id}.{os.urandom(6).hex()}/{hostname}"
    date = email.utils.formatdate(now)
    human = [
        f"This is the mail system at host {hostname}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        "",
    ]
    per_recipient = []
    for address, code, response in failed:
        human.append(f"<{address}>: {code} {response}")
        per_recipient += [
            "",
            f"Final-Recipient: rfc822; {address}",
            "Action: failed",
            f"Status: {status_of(code, response)}",
            f"Diagnostic-Code: smtp; {code} {response}",
            f"Last-Attempt-Date: {date}",
        ]
    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{mail_from}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{message_id}.dsn.{os.urandom(4).hex()}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    parts = [
        *headers,
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
        *human,
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Queue-ID: {message_id}",
        f"Arrival-Date: {email.utils.formatdate(arrival)}",
        *per_recipient,
        "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    text = "\r\n".join(parts).encode("utf-8") + b"\r\n"
    quoted = original_headers if original_headers.endswith(b"\r\n") else original_headers + b"\r\n"
    return text + quoted + f"\r\n--{boundary}--\r\n".encode()
