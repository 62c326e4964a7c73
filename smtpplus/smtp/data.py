"""
The DATA decoder: from the bytes a client sends after C{354} to the bytes of
the message (RFC 5321 4.1.1.4 and 4.5.2).

L{decode_data} is a pure function, so that every corner of the encoding can
be tested without a session.  It is also the hot path of every message: it
works on whole chunks with C{bytes} methods, never line by line in Python.
"""

from __future__ import annotations

import re

# Without a CRLF in this much DATA input the line is passed on in pieces so
# that no single line can make the session buffer grow without bound.
DATA_FLUSH_SIZE = 65536

# Bare CR or LF inside DATA; RFC 5321 2.3.8 allows line breaks only as CRLF.
_BARE_NEWLINE_RE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


# What one call of decode_data made of the input, as a plain tuple (a
# NamedTuple costs 0.3 microseconds more to build, on every read of DATA):
#   body: message bytes, dot-unstuffed and with CRLF line breaks only
#       (possibly empty); None once the message is larger than the limit,
#       from then on until its end;
#   rest: the input not consumed: the start of a line still incomplete, or,
#       after the end of the message, the commands pipelined behind it;
#   line_start: whether rest starts at the beginning of a line;
#   size: the size of the message so far, body included;
#   end: the line with the lone dot has been consumed.
DataStep = tuple[bytes | None, bytes, bool, int, bool]


def decode_data(buffer: bytes, line_start: bool, size: int, limit: int) -> DataStep:
    """
    Decode the DATA input in C{buffer}, as far as it is complete; return
    C{(body, rest, line_start, size, end)}, see L{DataStep}.

    Input is consumed up to the end of the message, else up to the last
    CRLF; a line longer than L{DATA_FLUSH_SIZE} is passed on in pieces, and
    a piece never ends between the CR and the LF of a CRLF.  Call again with
    C{rest} and more input (or at once, when C{rest} is longer than
    L{DATA_FLUSH_SIZE}).

    @param line_start: whether C{buffer} starts at the beginning of a line
        (true for the first call of a message).
    @param size: the size of the message before C{buffer}.
    @param limit: the largest message size allowed.
    """
    if line_start and buffer.startswith(b".\r\n"):
        chunk, rest, next_line_start, end = b"", buffer[3:], True, True
    else:
        found = buffer.find(b"\r\n.\r\n")
        if found >= 0:
            chunk, rest, next_line_start, end = buffer[: found + 2], buffer[found + 5 :], True, True
        else:
            end = False
            cut = buffer.rfind(b"\r\n")
            if cut >= 0:
                # The incomplete last line (perhaps the final dot) waits for more.
                chunk, rest, next_line_start = buffer[: cut + 2], buffer[cut + 2 :], True
            elif len(buffer) > DATA_FLUSH_SIZE:
                piece_end = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
                chunk, rest, next_line_start = buffer[:piece_end], buffer[piece_end:], False
            else:
                return (None if size > limit else b""), buffer, line_start, size, False
    if chunk:
        chunk = _unstuff(chunk, line_start)
        size += len(chunk)
    return (None if size > limit else chunk), rest, next_line_start, size, end


def _unstuff(chunk: bytes, line_start: bool) -> bytes:
    """
    Remove the dot that RFC 5321 4.5.2 puts before a line starting with one,
    and turn every bare CR or LF into CRLF.  C{chunk} does not split a CRLF.
    """
    if line_start and chunk.startswith(b"."):
        chunk = chunk[1:]
    chunk = chunk.replace(b"\r\n.", b"\r\n")
    # Store CRLF only, so that a bare LF or CR cannot turn into a line break
    # (or an end of data) at a less careful next hop: SMTP smuggling.
    crlf = chunk.count(b"\r\n")
    if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
        chunk = _BARE_NEWLINE_RE.sub(b"\r\n", chunk)
    return chunk
