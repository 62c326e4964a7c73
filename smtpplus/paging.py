"""
What the admin API's listings share: the opaque cursor that pages on, and
the ISO 8601 times of the C{since}/C{until} filters.

A cursor names the arrival number of the last item of a page; the next
page holds what arrived before it.  Items that arrive between two requests
get higher numbers, so they neither shift a later page nor repeat an item.
Every string the document's C{CURSOR_PATTERN} admits is a valid cursor, so
that what the document allows the API accepts.
"""

from __future__ import annotations

import re

# Up to 15 hex digits: below 2**60, inside SQLite's 64-bit integers.
CURSOR_PATTERN = r"^[0-9a-f]{1,15}$"
_CURSOR_RE = re.compile(CURSOR_PATTERN)

# RFC 3339's date-time, the ISO 8601 profile JSON Schema's "date-time"
# means: a zone (Z or an offset) is required; a leap second is allowed.
_DATE_TIME_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


class InvalidValue(ValueError):
    """A cursor or a time that cannot be used; the message says why."""


def encode_cursor(seq: int) -> str:
    """The cursor for a page that ends at the item with arrival number C{seq}."""
    return format(seq, "x")


def decode_cursor(cursor: str) -> int:
    """The arrival number C{cursor} names; L{InvalidValue} when it is not a cursor."""
    if not _CURSOR_RE.fullmatch(cursor):
        raise InvalidValue("is not a cursor this API handed out")
    return int(cursor, 16)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm; year 0 included)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def parse_time(text: str) -> float:
    """
    Seconds since the epoch of an RFC 3339 date-time such as
    C{2024-05-01T12:00:00Z} or C{2024-05-01T14:00:00+02:00}; raises
    L{InvalidValue} for anything else (a time without its zone included).
    """
    match = _DATE_TIME_RE.fullmatch(text)
    if match is None:
        raise InvalidValue("must be an ISO 8601 date-time with Z or an offset, e.g. 2024-05-01T12:00:00Z")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days = 29 if month == 2 and leap else _DAYS_IN_MONTH[month - 1] if 1 <= month <= 12 else 0
    offset_hours = int(match.group(10) or 0)
    offset_minutes = int(match.group(11) or 0)
    if not 1 <= day <= days or hour > 23 or minute > 59 or second > 60 or offset_hours > 23 or offset_minutes > 59:
        raise InvalidValue("is not a valid date-time")
    offset = (offset_hours * 60 + offset_minutes) * 60 * (-1 if match.group(9) == "-" else 1)
    fraction = float(match.group(7) or 0)
    # A leap second (:60) counts as the first moment of the next minute.
    return _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second + fraction - offset
