"""
The DATA decoder as a pure function: the end of the message, dot-unstuffing,
CRLF normalisation, incomplete and over-long lines, the size limit.
"""

from __future__ import annotations

from typing import NamedTuple

from twisted.trial import unittest

from smtpplus.smtp.data import DATA_FLUSH_SIZE, decode_data

NO_LIMIT = 10**9


class Step(NamedTuple):
    """decode_data's result with its fields named, for readable assertions."""

    body: bytes | None
    rest: bytes
    line_start: bool
    size: int
    end: bool


def decode(buffer: bytes, line_start: bool, size: int, limit: int = NO_LIMIT) -> Step:
    return Step(*decode_data(buffer, line_start, size, limit))


def decode_all(pieces: list[bytes], limit: int = NO_LIMIT) -> tuple[bytes | None, bytes]:
    """
    Feed C{pieces} one after the other as a session does; return the message
    (None when over C{limit}) and the input left after its end.
    """
    buffer, line_start, size = b"", True, 0
    body: bytes | None = b""
    for index, piece in enumerate(pieces):
        buffer += piece
        while True:
            piece_body, buffer, line_start, size, end = decode_data(buffer, line_start, size, limit)
            body = None if piece_body is None or body is None else body + piece_body
            if end:
                return body, buffer + b"".join(pieces[index + 1 :])
            if len(buffer) <= DATA_FLUSH_SIZE:
                break
    raise AssertionError("no end of data")


class EndOfDataTests(unittest.TestCase):
    def test_whole_message(self) -> None:
        """A message with its final dot is consumed; the commands pipelined behind it are left."""
        step = decode(b"Subject: a\r\n\r\nbody\r\n.\r\nQUIT\r\n", True, 0)
        self.assertEqual(step, Step(b"Subject: a\r\n\r\nbody\r\n", b"QUIT\r\n", True, 20, True))

    def test_empty_message(self) -> None:
        """A lone dot at once is the end of an empty message."""
        self.assertEqual(decode(b".\r\nNOOP\r\n", True, 0), Step(b"", b"NOOP\r\n", True, 0, True))

    def test_dot_continuing_a_line(self) -> None:
        """Input that continues a line passed on in pieces is content, even a dot and CRLF."""
        step = decode(b".\r\n", False, 70000)
        self.assertEqual(step, Step(b".\r\n", b"", True, 70003, False))

    def test_terminator_across_reads(self) -> None:
        """The final line may arrive in pieces; until its CRLF it waits undecided."""
        step = decode(b"abc\r\n.", True, 0)
        self.assertEqual(step, Step(b"abc\r\n", b".", True, 5, False))
        step = decode(step.rest + b"\r\n", step.line_start, step.size)
        self.assertEqual(step, Step(b"", b"", True, 5, True))

    def test_bare_newlines_do_not_end_data(self) -> None:
        """A dot between bare LFs or CRs is not the end of the message (SMTP smuggling)."""
        for fake_end in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"):
            step = decode(b"a" + fake_end + b"b\r\n", True, 0)
            self.assertFalse(step.end, fake_end)


class ContentTests(unittest.TestCase):
    def test_dot_unstuffing(self) -> None:
        """A leading dot is removed from every line that has one, including the first."""
        step = decode(b"..first\r\nx\r\n..\r\n...more\r\n", True, 0)
        self.assertEqual(step.body, b".first\r\nx\r\n.\r\n..more\r\n")

    def test_bare_newlines_become_crlf(self) -> None:
        """Every bare LF and bare CR is stored as CRLF; CRLF stays as it is."""
        step = decode(b"a\nb\rc\r\n\n\r\r\nd\r\n", True, 0)
        self.assertEqual(step.body, b"a\r\nb\r\nc\r\n\r\n\r\n\r\nd\r\n")

    def test_incomplete_line_waits(self) -> None:
        """Input is decoded up to its last CRLF; the rest waits for the next call."""
        self.assertEqual(decode(b"abc\r\ndef", True, 0), Step(b"abc\r\n", b"def", True, 5, False))
        self.assertEqual(decode(b"def", True, 5), Step(b"", b"def", True, 5, False))

    def test_long_line_in_pieces(self) -> None:
        """A line longer than DATA_FLUSH_SIZE is passed on whole, keeping back a CR that may start a CRLF."""
        line = b"x" * (DATA_FLUSH_SIZE + 1)
        step = decode(line + b"\r", True, 0)
        self.assertEqual(step, Step(line, b"\r", False, len(line), False))
        step = decode(step.rest + b"\n.\r\n", step.line_start, step.size)
        self.assertEqual(step, Step(b"\r\n", b"", True, len(line) + 2, True))

    def test_every_split_decodes_alike(self) -> None:
        """However the input is cut into reads, the stored message is the same."""
        data = b"..a\r\nb\nc\r\r\nx.\r\n..\r\nd.\r\n\r\n..e\r\n.\r\nNOOP\r\n"
        whole = decode_all([data])
        self.assertEqual(whole, (b".a\r\nb\r\nc\r\n\r\nx.\r\n.\r\nd.\r\n\r\n.e\r\n", b"NOOP\r\n"))
        for cut in range(1, len(data)):
            self.assertEqual(decode_all([data[:cut], data[cut:]]), whole, cut)
        self.assertEqual(decode_all([bytes([b]) for b in data]), whole)


class SizeLimitTests(unittest.TestCase):
    def test_size_counts_stored_bytes(self) -> None:
        """The size is that of the message as stored: after unstuffing and CRLF normalisation."""
        self.assertEqual(decode(b"..\r\na\n\r\n", True, 0).size, 8)

    def test_limit_is_inclusive(self) -> None:
        """A message of exactly the limit is passed on."""
        self.assertEqual(decode(b"abcd\r\n.\r\n", True, 0, 6).body, b"abcd\r\n")

    def test_over_the_limit(self) -> None:
        """Over the limit nothing more is passed on, up to the end of the message."""
        step = decode(b"abcd\r\nef", True, 0, 5)
        self.assertIsNone(step.body)
        step = decode(step.rest, step.line_start, step.size, 5)
        self.assertIsNone(step.body)
        step = decode(step.rest + b"\r\n.\r\n", step.line_start, step.size, 5)
        self.assertEqual((step.body, step.end), (None, True))
        self.assertEqual(decode_all([b"a" * 3000 + b"\r\n.\r\n"], limit=2000), (None, b""))
