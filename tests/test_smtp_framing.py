"""
PipelinedLineReceiver on its own, under a minimal subclass: line framing,
pipelined commands held behind a pending one, over-long lines, flow control
towards the transport and the session state.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from smtpplus.smtp.framing import AUTH_LINE_MAX, PipelinedLineReceiver, SessionState
from smtpplus.smtp.registry import SessionRegistry
from tests.harness.fakes import session_settings


class Recorder(PipelinedLineReceiver):
    """Records lines; a line C{wait} answers with a Deferred the test fires."""

    def __init__(self) -> None:
        self.clock = Clock()
        super().__init__(SessionRegistry(session_settings(idle_timeout=30), self.clock))
        self.callLater = self.clock.callLater
        self.lines: list[bytes] = []
        self.pending: list[Deferred[None]] = []
        self.too_long = 0
        self.shutdowns = 0

    def _line_received(self, line: bytes) -> Deferred[Any] | None:
        self.lines.append(line)
        if line == b"wait":
            self.pending.append(Deferred())
            return self.pending[-1]
        return None

    def _data_step(self) -> bool:
        raise AssertionError("no DATA in these tests")

    def _line_too_long(self) -> None:
        self.too_long += 1

    def shutdown(self) -> None:
        self.shutdowns += 1


def connected() -> tuple[Recorder, StringTransport]:
    receiver = Recorder()
    transport = StringTransport()
    receiver.makeConnection(transport)
    return receiver, transport


class FramingTests(unittest.TestCase):
    def test_lines(self) -> None:
        """Input is cut at each LF, a CR before it dropped; an incomplete line waits for its end."""
        receiver, _ = connected()
        receiver.dataReceived(b"one\r\ntwo\nthr")
        self.assertEqual(receiver.lines, [b"one", b"two"])
        receiver.dataReceived(b"ee\r\n")
        self.assertEqual(receiver.lines, [b"one", b"two", b"three"])

    def test_over_long_line(self) -> None:
        """A line over AUTH_LINE_MAX is answered once and skipped to its end; the next line is read."""
        receiver, _ = connected()
        receiver.dataReceived(b"x" * (AUTH_LINE_MAX + 1))
        self.assertEqual((receiver.too_long, receiver.state), (1, SessionState.DISCARDING))
        receiver.dataReceived(b"x" * AUTH_LINE_MAX)
        receiver.dataReceived(b"x\r\nnext\r\n")
        self.assertEqual((receiver.too_long, receiver.lines, receiver.state), (1, [b"next"], SessionState.COMMAND))

    def test_line_deadline(self) -> None:
        """The idle time runs from the last complete line, not from the last byte."""
        receiver, transport = connected()
        receiver.clock.advance(20)
        receiver.dataReceived(b"line\r\n")
        receiver.clock.advance(20)
        receiver.dataReceived(b"partial")
        receiver.clock.advance(9)
        self.assertFalse(transport.disconnecting)
        receiver.clock.advance(2)
        self.assertTrue(transport.disconnecting)


class PipeliningTests(unittest.TestCase):
    def test_pending_command_holds_the_rest(self) -> None:
        """While a command's Deferred is pending, later lines stay buffered and reading stops."""
        receiver, transport = connected()
        receiver.dataReceived(b"wait\r\nafter\r\n")
        self.assertEqual((receiver.lines, receiver.state), ([b"wait"], SessionState.WAITING))
        self.assertEqual(transport.producerState, "paused")
        receiver.pending[0].callback(None)
        self.assertEqual((receiver.lines, receiver.state), ([b"wait", b"after"], SessionState.COMMAND))
        self.assertEqual(transport.producerState, "producing")

    def test_pending_command_without_input_keeps_reading(self) -> None:
        """With nothing buffered behind a pending command, reading goes on."""
        receiver, transport = connected()
        receiver.dataReceived(b"wait\r\n")
        self.assertEqual((receiver.state, transport.producerState), (SessionState.WAITING, "producing"))

    def test_answered_at_once(self) -> None:
        """A Deferred that has already fired holds nothing."""
        receiver, _ = connected()
        answered: list[bytes] = []

        def answer(line: bytes) -> Deferred[None]:
            answered.append(line)
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d

        receiver._line_received = answer  # type: ignore[method-assign]
        receiver.dataReceived(b"a\r\nb\r\n")
        self.assertEqual((answered, receiver.state), ([b"a", b"b"], SessionState.COMMAND))

    def test_draining_starts_no_command(self) -> None:
        """While the daemon drains, buffered commands are not started and the subclass is told to shut down."""
        receiver, _ = connected()
        receiver.registry.draining = True
        receiver.dataReceived(b"NOOP\r\n")
        self.assertEqual((receiver.lines, receiver.shutdowns), ([], 1))


class FlowControlTests(unittest.TestCase):
    def test_registered_streaming(self) -> None:
        """The receiver is the streaming producer of its transport."""
        receiver, transport = connected()
        self.assertIs(transport.producer, receiver)
        self.assertTrue(transport.streaming)

    def test_write_blocked(self) -> None:
        """While the transport's buffer is full, input waits and reading stops; then both go on."""
        receiver, transport = connected()
        receiver.pauseProducing()
        receiver.dataReceived(b"one\r\n")
        self.assertEqual((receiver.lines, transport.producerState), ([], "paused"))
        receiver.resumeProducing()
        self.assertEqual((receiver.lines, transport.producerState), ([b"one"], "producing"))


class CloseTests(unittest.TestCase):
    def test_close(self) -> None:
        """Closing unregisters the producer, loses the connection and ignores further input."""
        receiver, transport = connected()
        receiver._close()
        self.assertEqual(receiver.state, SessionState.CLOSING)
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)
        receiver.dataReceived(b"late\r\n")
        self.assertEqual(receiver.lines, [])

    def test_answer_after_connection_lost(self) -> None:
        """A command answered after the connection is gone starts nothing more."""
        receiver, _ = connected()
        receiver.dataReceived(b"wait\r\nafter\r\n")
        receiver.connectionLost(None)
        self.assertEqual(receiver.state, SessionState.CLOSED)
        receiver.pending[0].callback(None)
        self.assertEqual((receiver.lines, receiver.state), ([b"wait"], SessionState.CLOSED))

    def test_close_after_connection_lost(self) -> None:
        """Closing a connection already gone (a late reply's hang-up) neither touches the transport nor sets a timer."""
        receiver, transport = connected()
        receiver.connectionLost(None)
        receiver._close()
        self.assertEqual(receiver.state, SessionState.CLOSED)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(receiver.clock.getDelayedCalls(), [])
