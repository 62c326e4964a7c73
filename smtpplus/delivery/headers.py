"""
The header section of a submitted message: splitting it from the body,
reading the fields smtpplus acts on, and rewriting it for relaying.

Only the header section is ever held in memory, and at most
L{MAX_HEADER_SECTION} of it; the body streams to disk.
"""

from __future__ import annotations

import email.errors
import email.header
import email.utils
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import attrs

from smtpplus.smtp.interfaces import SMTPReply

# Every field of the header section must be seen by the sender rules, so it
# is held whole; one larger than this is refused (552 5.3.4) rather than
# buffered.  Real header sections are a few KiB; a long DKIM/ARC chain stays
# well under 100 KiB.
MAX_HEADER_SECTION = 1024 * 1024

# A message that already carries more Received: fields than this (ours not
# counted) is taken to be looping (RFC 5321 section 6.3); Postfix's
# hopcount_limit is 50 too.
MAX_HOPS = 50

# Fields removed before relaying: X-SMTPAPI is instructions for us, and
# X-Priority is replaced by the effective priority.
_STRIPPED = frozenset({"x-smtpapi", "x-priority"})


@attrs.frozen
class HeaderField:
    """One header field as received: its lower-cased name and raw lines."""

    name: str
    raw: bytes

    @property
    def value(self) -> str:
        """The unfolded value, decoded as UTF-8 (8-bit headers exist)."""
        _, _, value = self.raw.partition(b":")
        text = value.decode("utf-8", "replace")
        return re.sub(r"\r?\n[ \t]", " ", text).strip()


def find_header_end(buffer: bytes | bytearray, start: int = 0) -> int | None:
    """
    Return the offset where the body starts (the blank line included), or
    None when the header section has not ended in C{buffer} yet.  The
    search begins at C{start}, so that a caller appending to C{buffer}
    scans each byte about once.
    """
    if buffer.startswith(b"\r\n"):
        return 0
    end = buffer.find(b"\r\n\r\n", start)
    return None if end < 0 else end + 2


def parse_fields(section: bytes) -> list[HeaderField]:
    """Split a CRLF-terminated header section into fields, keeping folding."""
    fields: list[HeaderField] = []
    for line in section.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = HeaderField(last.name, last.raw + line)
            continue
        name, colon, _ = line.partition(b":")
        fields.append(HeaderField(name.strip().lower().decode("ascii", "replace") if colon else "", line))
    return fields


def decode_text(value: str) -> str:
    """Decode RFC 2047 encoded words; undecodable input comes back as is."""
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return value


@attrs.frozen
class SMTPAPI:
    """What the C{X-SMTPAPI} header asks for."""

    priority: int | None = None
    campaign_name: str | None = None
    campaign_code: str | None = None
    schedule: float | None = None


def parse_smtpapi(values: Sequence[str]) -> SMTPAPI:
    """
    Read the X-SMTPAPI header values; anything malformed is refused with
    C{550 5.6.0} and the reason, so that the sender learns at once.
    """
    if not values:
        return SMTPAPI()
    if len(values) > 1:
        raise SMTPReply(550, "5.6.0", "X-SMTPAPI: more than one X-SMTPAPI header")
    try:
        data = json.loads(values[0])
    except ValueError as e:
        raise SMTPReply(550, "5.6.0", f"X-SMTPAPI: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SMTPReply(550, "5.6.0", "X-SMTPAPI: must be a JSON object")
    return SMTPAPI(
        priority=_api_priority(data.get("Priority")),
        campaign_name=_api_text(data, "CampaignName"),
        campaign_code=_api_text(data, "CampaignCode"),
        schedule=_api_schedule(data.get("Schedule")),
    )


def _api_priority(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise SMTPReply(550, "5.6.0", "X-SMTPAPI: Priority must be an integer from 1 to 5")
    return min(max(value, 1), 5)


def _api_text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise SMTPReply(550, "5.6.0", f"X-SMTPAPI: {key} must be a string")
    return str(value)


def _api_schedule(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
    raise SMTPReply(550, "5.6.0", f"X-SMTPAPI: Schedule {value!r} is not an ISO 8601 date-time")


def mt_priority_level(mt_priority: int) -> int:
    """Map RFC 6710 C{MT-PRIORITY} (-9..9) to 1..5: 9 -> 1, 0 -> 3, -9 -> 5."""
    return min(max(3 - round(mt_priority / 3), 1), 5)


def x_priority_level(value: str) -> int | None:
    """Read C{X-Priority: 1 (Highest)} style values; unreadable ones are ignored."""
    match = re.match(r"\s*([0-9]+)", value)
    if match is None:
        return None
    return min(max(int(match.group(1)), 1), 5)


def message_priority(api: SMTPAPI, mt_priority: int | None, x_priority: str | None) -> int:
    """The message's own priority, from the first source present (contract section 3)."""
    if api.priority is not None:
        return api.priority
    if mt_priority is not None:
        return mt_priority_level(mt_priority)
    if x_priority is not None:
        level = x_priority_level(x_priority)
        if level is not None:
            return level
    return 3


def rewrite(
    fields: Sequence[HeaderField],
    received: bytes,
    priority: int,
    added: Sequence[bytes] = (),
) -> bytes:
    """
    The header section as relayed: our C{Received:} first, the client's
    fields without X-SMTPAPI and X-Priority, C{added} fields, then
    C{X-Priority: <effective>}.
    """
    kept = [field.raw for field in fields if field.name not in _STRIPPED]
    if kept and not kept[-1].endswith(b"\n"):
        kept[-1] += b"\r\n"
    return b"".join([received, *kept, *added, b"X-Priority: %d\r\n" % priority])


def format_date(moment: float) -> bytes:
    """An RFC 5322 C{Date:} value."""
    return email.utils.formatdate(moment, localtime=False).encode("ascii")
