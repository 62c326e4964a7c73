"""The batcher that groups commits and state changes, and the loader built on it, driven by hand-fired Deferreds."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.trial import unittest

from smtpplus.delivery.batching import Batcher, BatchLoader


class Runs:
    """A C{run} whose batches wait until the test answers them."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.pending: list[tuple[list[str], Deferred[Sequence[BaseException | None]]]] = []

    def __call__(self, items: list[str]) -> Deferred[Sequence[BaseException | None]]:
        self.batches.append(items)
        d: Deferred[Sequence[BaseException | None]] = Deferred()
        self.pending.append((items, d))
        return d

    def answer(self, errors: Sequence[BaseException | None] | None = None) -> None:
        """Answer the oldest running batch: C{errors}, or success for each item."""
        items, d = self.pending.pop(0)
        d.callback(errors if errors is not None else [None] * len(items))


class BatcherTests(unittest.TestCase):
    def test_first_item_runs_at_once(self) -> None:
        """With nothing running, an item's batch starts immediately and alone."""
        run = Runs()
        batcher: Batcher[str] = Batcher(run)
        d = batcher.add("a")
        self.assertEqual(run.batches, [["a"]])
        self.assertNoResult(d)
        run.answer()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(batcher.batches, 1)

    def test_items_arriving_meanwhile_form_the_next_batch(self) -> None:
        """Items added while a batch runs wait, then go together in one batch."""
        run = Runs()
        batcher: Batcher[str] = Batcher(run)
        first = batcher.add("a")
        later = [batcher.add(x) for x in "bcd"]
        self.assertEqual(run.batches, [["a"]])
        run.answer()
        self.successResultOf(first)
        self.assertEqual(run.batches, [["a"], ["b", "c", "d"]])
        for d in later:
            self.assertNoResult(d)
        run.answer()
        for d in later:
            self.successResultOf(d)
        self.assertEqual(batcher.batches, 2)

    def test_max_batch(self) -> None:
        """No batch holds more than max_batch items."""
        run = Runs()
        batcher: Batcher[str] = Batcher(run, max_batch=2)
        batcher.add("a")
        for x in "bcde":
            batcher.add(x)
        for _ in range(3):
            run.answer()
        self.assertEqual(run.batches, [["a"], ["b", "c"], ["d", "e"]])

    def test_per_item_errors(self) -> None:
        """Each item's Deferred fails with its own error; the others in its batch succeed."""
        run = Runs()
        batcher: Batcher[str] = Batcher(run)
        batcher.add("a")
        good, bad = batcher.add("b"), batcher.add("c")
        run.answer()
        run.answer([None, ValueError("c refused")])
        self.successResultOf(good)
        self.assertEqual(str(self.failureResultOf(bad, ValueError).value), "c refused")

    def test_failed_run_fails_its_batch_only(self) -> None:
        """A run that fails as a whole fails every item of its batch; the next batch still runs."""
        run = Runs()
        batcher: Batcher[str] = Batcher(run)
        a = batcher.add("a")
        b = batcher.add("b")
        run.pending.pop(0)[1].errback(OSError("disk"))
        self.failureResultOf(a, OSError)
        self.assertEqual(run.batches, [["a"], ["b"]])
        run.answer()
        self.successResultOf(b)

    def test_synchronous_run(self) -> None:
        """A run that answers at once leaves the batcher idle, so the next item starts its own batch."""
        batches: list[list[str]] = []

        def run(items: list[str]) -> Deferred[Sequence[BaseException | None]]:
            batches.append(items)
            return succeed([None] * len(items))

        batcher: Batcher[str] = Batcher(run)
        self.successResultOf(batcher.add("a"))
        self.successResultOf(batcher.add("b"))
        self.assertEqual(batches, [["a"], ["b"]])


class BatchLoaderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.calls: list[tuple[list[str], Deferred[dict[str, int]]]] = []
        self.loader: BatchLoader[str, int] = BatchLoader(self._load)

    def _load(self, keys: list[str]) -> Deferred[dict[str, int]]:
        d: Deferred[dict[str, int]] = Deferred()
        self.calls.append((keys, d))
        return d

    def test_keys_asked_meanwhile_share_one_load(self) -> None:
        """
        The first key loads at once; keys asked while it loads go in one
        load; each gets its own value, and a key not found gets None.
        """
        first = self.loader.get("a")
        later = {key: self.loader.get(key) for key in "bcd"}
        self.assertEqual([keys for keys, _ in self.calls], [["a"]])
        self.calls[0][1].callback({"a": 1})
        self.assertEqual(self.successResultOf(first), 1)
        self.assertEqual([keys for keys, _ in self.calls], [["a"], ["b", "c", "d"]])
        self.calls[1][1].callback({"b": 2, "d": 4})
        self.assertEqual({key: self.successResultOf(d) for key, d in later.items()}, {"b": 2, "c": None, "d": 4})
        self.assertEqual(self.loader.batches, 2)

    def test_failed_load_fails_its_keys(self) -> None:
        """A load that fails fails the keys of its batch; the next batch loads."""
        a, b = self.loader.get("a"), self.loader.get("b")
        self.calls[0][1].errback(OSError("database is locked"))
        self.failureResultOf(a, OSError)
        self.calls[1][1].callback({"b": 2})
        self.assertEqual(self.successResultOf(b), 2)
