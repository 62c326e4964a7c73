"""
The nodes benchmark's own bookkeeping (bench/nodes_bench.py): how the load
is split over the nodes, and the Message-ID count behind its "exactly
once" column.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from bench.nodes_bench import message_ids, split
from tests.harness.messages import sized_message


class SplitTests(unittest.TestCase):
    def test_shares(self) -> None:
        """The shares add up to the total and differ by one at most, the larger first."""
        self.assertEqual(split(3000, 2), [1500, 1500])
        self.assertEqual(split(21, 2), [11, 10])
        self.assertEqual(split(7, 1), [7])


class MessageIdTests(unittest.TestCase):
    def dump(self, *messages: bytes) -> str:
        path = os.path.join(self.mktemp() + ".dump")
        with open(path, "wb") as f:
            for data in messages:
                # As smtp-sink -D appends them: the content, then the -S marker.
                f.write(data + b"#BENCHMSG\n")
        return path

    def test_counts(self) -> None:
        """A message dumped twice counts twice under its Message-ID; distinct messages once each."""
        first = sized_message(0, 2048, "bulk-A@bench.example", "rcpt@sink.example")
        second = sized_message(0, 2048, "bulk-B@bench.example", "rcpt@sink.example")
        seen = message_ids(self.dump(first, second, first))
        self.assertEqual(sorted(seen.values()), [1, 2])

    def test_header_lines_only(self) -> None:
        """A body line mentioning a Message-ID after other text is not a message of its own."""
        data = sized_message(1, 1024, "bulk-A@bench.example", "rcpt@sink.example") + b"see Message-ID: <x@y>\r\n"
        self.assertEqual(len(message_ids(self.dump(data))), 1)
