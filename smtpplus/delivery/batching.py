"""
Group work that arrives one item at a time into batches: the first item
starts a batch at once; items arriving while it runs form the next one.
Under light load an item waits for nothing; under heavy load one
transaction (or one trip to a thread) carries many items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

log = Logger()

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

# A bound on one batch, so that one transaction stays short.
MAX_BATCH = 500


class Batcher(Generic[T]):
    """
    Runs items through C{run(items)}, a batch at a time.  C{run} returns
    (a Deferred of) one exception or None per item, in order.

    @ivar batches: how many batches ran (observable in tests).
    """

    def __init__(self, run: Callable[[list[T]], Deferred[Sequence[BaseException | None]]], max_batch: int = MAX_BATCH) -> None:
        self._run = run
        self._max = max_batch
        self._waiting: list[tuple[T, Deferred[None]]] = []
        self._busy = False
        self.batches = 0

    def add(self, item: T) -> Deferred[None]:
        """Fires when C{item}'s batch has run; fails with the item's own error."""
        d: Deferred[None] = Deferred()
        self._waiting.append((item, d))
        if not self._busy:
            self._flush()
        return d

    def withdraw(self, unneeded: Callable[[T], bool]) -> None:
        """Drop the items still waiting for a batch for which C{unneeded(item)}; each one's Deferred fires with None."""
        kept = []
        for item, d in self._waiting:
            if unneeded(item):
                d.callback(None)
            else:
                kept.append((item, d))
        self._waiting = kept

    @inlineCallbacks
    def _flush(self) -> Any:
        self._busy = True
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self._max], self._waiting[self._max :]
                try:
                    errors = yield self._run([item for item, _ in batch])
                except Exception as e:
                    errors = [e] * len(batch)
                self.batches += 1
                for (_, d), error in zip(batch, errors, strict=True):
                    if error is None:
                        d.callback(None)
                    else:
                        d.errback(error)
        finally:
            self._busy = False


class BatchLoader(Generic[K, V]):
    """
    Looks keys up through C{load(keys)}, a batch at a time as L{Batcher}
    runs items: C{load} fires with what it found, by key; a key it did not
    find gets None.  One lookup per key at a time (a delivery attempt's
    message, here).
    """

    def __init__(self, load: Callable[[list[K]], Deferred[dict[K, V]]], max_batch: int = MAX_BATCH) -> None:
        self._load = load
        self._found: dict[K, V] = {}
        self._batcher: Batcher[K] = Batcher(self._run, max_batch)

    @property
    def batches(self) -> int:
        """How many batches ran (observable in tests)."""
        return self._batcher.batches

    def _run(self, keys: list[K]) -> Deferred[list[None]]:
        def found(values: dict[K, V]) -> list[None]:
            self._found.update(values)
            return [None] * len(keys)

        return self._load(keys).addCallback(found)

    def get(self, key: K) -> Deferred[V | None]:
        """What C{load} found for C{key} in its batch, or None; fails with the batch's error."""
        return self._batcher.add(key).addCallback(lambda _: self._found.pop(key, None))
