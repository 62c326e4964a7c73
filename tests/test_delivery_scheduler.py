"""The scheduler: priority, arrival, fair turns, concurrency, rate and retry timers."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial import unittest

from smtpplus.delivery.scheduler import IN_FLIGHT_PER_SLOT, IN_FLIGHT_PER_SLOT_URGENT, Job, Scheduler
from tests.harness.messages import queue_id, simple_message
from tests.harness.polling import wait_until
from tests.harness.smarthost import Smarthost, parse
from tests.harness.stack import Stack


class _Deliveries:
    """
    A deliver callback that asks for a slot at once, as the agent does once
    its message is read; the test ends each attempt's transfer and the
    attempt by hand.
    """

    def __init__(self) -> None:
        self.scheduler: Scheduler | None = None
        self.started: list[str] = []
        self.sending: list[str] = []
        self.pending: dict[str, Deferred[float | None]] = {}

    def __call__(self, message_id: str) -> Deferred[float | None]:
        assert self.scheduler is not None
        self.started.append(message_id)
        d: Deferred[float | None] = Deferred()
        self.pending[message_id] = d
        self.scheduler.acquire(message_id).addCallback(lambda _: self.sending.append(message_id))
        return d

    def transferred(self, message_id: str) -> None:
        """The next hop has answered: the attempt only records its result now."""
        assert self.scheduler is not None
        self.scheduler.release(message_id)

    def finish(self, message_id: str, retry_at: float | None = None) -> None:
        self.pending.pop(message_id).callback(retry_at)


class SchedulerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.deliveries = _Deliveries()

    def _scheduler(self, concurrency: int = 1, rate: float = 0) -> Scheduler:
        scheduler = Scheduler(self.clock, self.deliveries, concurrency, rate)
        self.deliveries.scheduler = scheduler
        scheduler.start()
        return scheduler

    def _block(self, scheduler: Scheduler) -> list[str]:
        """Fill the attempts in flight with priority-1 blockers (one sending), so that what follows waits."""
        blockers = [f"blocker{n}" for n in range(IN_FLIGHT_PER_SLOT * scheduler.max_concurrency)]
        for n, name in enumerate(blockers):
            scheduler.add(Job(name, 1, -1000 + n, "x"))
        self.assertEqual(self.deliveries.started, blockers)
        return blockers

    def test_priority_before_arrival(self) -> None:
        """
        A priority-1 message queued behind many priority-5 ones starts at
        once, past the bound on attempts in flight, and takes the next slot
        before the priority-5 attempt that was waiting for it.
        """
        scheduler = self._scheduler()
        for seq in range(1000):
            scheduler.add(Job(f"low{seq}", 5, seq, "u"))
        lows = [f"low{seq}" for seq in range(IN_FLIGHT_PER_SLOT)]
        self.assertEqual((self.deliveries.started, self.deliveries.sending), (lows, ["low0"]))
        scheduler.add(Job("urgent", 1, 1000, "u"))
        self.assertEqual(self.deliveries.started, [*lows, "urgent"])
        self.deliveries.transferred("low0")
        self.assertEqual(self.deliveries.sending, ["low0", "urgent"])
        self.deliveries.finish("low0")
        self.deliveries.transferred("urgent")
        self.assertEqual(self.deliveries.sending, ["low0", "urgent", "low1"])
        # Back at the bound: the next one starts only when another attempt ends.
        self.assertEqual(self.deliveries.started[-1], "urgent")
        self.deliveries.finish("urgent")
        self.assertEqual(self.deliveries.started[-1], f"low{IN_FLIGHT_PER_SLOT}")

    def test_overtaking_is_bounded(self) -> None:
        """
        Past IN_FLIGHT_PER_SLOT x max_concurrency attempts, only a higher
        priority than every waiting attempt's starts, and never past
        IN_FLIGHT_PER_SLOT_URGENT x max_concurrency: a flood of priority-1
        mail while results cannot be stored holds a bounded number of them.
        """
        scheduler = self._scheduler(concurrency=2)
        for seq in range(10):
            scheduler.add(Job(f"low{seq}", 5, seq, "u"))
        self.assertEqual(len(self.deliveries.started), IN_FLIGHT_PER_SLOT * 2)
        scheduler.add(Job("same", 5, 10, "v"))
        self.assertNotIn("same", self.deliveries.started)
        for seq in range(20):
            scheduler.add(Job(f"urgent{seq}", 1, 100 + seq, "u"))
        self.assertEqual(len(self.deliveries.started), IN_FLIGHT_PER_SLOT * 2 + 1)
        # Each transfer that ends lets the urgent attempt waiting have the
        # slot; its result is never stored, and another urgent one starts,
        # up to the hard bound.
        for _ in range(10):
            for message_id in list(scheduler.holding):
                self.deliveries.transferred(message_id)
        self.assertEqual(len(scheduler.in_flight), IN_FLIGHT_PER_SLOT_URGENT * 2)
        self.assertNotIn("same", self.deliveries.started)

    def test_arrival_order_within_priority(self) -> None:
        """Within one priority and user, messages take the slot in arrival order even when added out of order."""
        scheduler = self._scheduler()
        blockers = self._block(scheduler)
        for seq in (5, 3, 4):
            scheduler.add(Job(f"m{seq}", 3, seq, "u"))
        for name in (*blockers, "m3", "m4"):
            self.deliveries.finish(name)
        self.assertEqual(self.deliveries.sending, [*blockers, "m3", "m4", "m5"])

    def test_fair_turns_between_users(self) -> None:
        """Within a priority users take turns: one user's flood does not starve another's mail."""
        scheduler = self._scheduler()
        blockers = self._block(scheduler)
        for seq in range(1, 101):
            scheduler.add(Job(f"flood{seq}", 3, seq, "flooder"))
        scheduler.add(Job("other", 3, 101, "quiet"))
        for name in (*blockers, "flood1"):
            self.deliveries.finish(name)
        self.assertEqual(self.deliveries.sending, [*blockers, "flood1", "other"])

    def test_max_concurrency(self) -> None:
        """
        No more than max_concurrency attempts talk to next hops; as many
        again are in flight, waiting for a slot; a slot given back before
        its attempt ends goes to the next one at once.
        """
        scheduler = self._scheduler(concurrency=3)
        for seq in range(40):
            scheduler.add(Job(f"m{seq}", 3, seq, "u"))
        self.assertEqual(len(self.deliveries.pending), 3 * IN_FLIGHT_PER_SLOT)
        self.assertEqual(self.deliveries.sending, ["m0", "m1", "m2"])
        self.deliveries.transferred("m0")
        self.assertEqual(self.deliveries.sending, ["m0", "m1", "m2", "m3"])
        self.assertEqual(len(self.deliveries.started), 3 * IN_FLIGHT_PER_SLOT)
        self.deliveries.finish("m0")
        self.assertEqual(len(self.deliveries.started), 3 * IN_FLIGHT_PER_SLOT + 1)
        self.assertEqual(scheduler.holding, {"m1", "m2", "m3"})
        # An attempt that ends while holding its slot gives it back.
        self.deliveries.finish("m1")
        self.assertEqual(self.deliveries.sending[-1], "m4")
        self.assertEqual(scheduler.holding, {"m2", "m3", "m4"})
        # More slots by a reload: the waiting attempts have them at once.
        scheduler.reconfigure(5, 0)
        self.assertEqual(scheduler.holding, {"m2", "m3", "m4", "m5", "m6"})

    def test_rate_limit(self) -> None:
        """With rate_limit = 2, starts are spaced half a second apart on the clock."""
        scheduler = self._scheduler(concurrency=10, rate=2)
        for seq in range(4):
            scheduler.add(Job(f"m{seq}", 3, seq, "u"))
        self.assertEqual(len(self.deliveries.started), 1)
        self.clock.advance(0.5)
        self.assertEqual(len(self.deliveries.started), 2)
        self.clock.advance(0.25)
        self.assertEqual(len(self.deliveries.started), 2)
        self.clock.advance(0.25)
        self.clock.advance(0.5)
        self.assertEqual(len(self.deliveries.started), 4)

    def test_retry_timer(self) -> None:
        """An attempt returning a retry time is started again at that time, not before."""
        scheduler = self._scheduler()
        scheduler.add(Job("m", 3, 0, "u"))
        self.deliveries.finish("m", retry_at=60.0)
        self.clock.advance(59)
        self.assertEqual(self.deliveries.started, ["m"])
        self.clock.advance(1)
        self.assertEqual(self.deliveries.started, ["m", "m"])

    def test_added_again_during_its_attempt(self) -> None:
        """
        A job added again while its attempt is in flight (the queue was
        rebuilt) starts again when that attempt ends without a retry time,
        and only once when it ends with one.
        """
        scheduler = self._scheduler()
        scheduler.add(Job("m", 3, 0, "u"))
        scheduler.add(Job("m", 3, 0, "u"))
        self.deliveries.finish("m")
        self.assertEqual(self.deliveries.started, ["m", "m"])
        scheduler.add(Job("m", 3, 0, "u"), not_before=30.0)
        self.deliveries.finish("m", retry_at=60.0)
        self.clock.advance(60)
        self.assertEqual(self.deliveries.started, ["m", "m", "m"])
        self.deliveries.finish("m")
        self.clock.advance(60)
        self.assertEqual(self.deliveries.started, ["m", "m", "m"])

    def test_stop_cancels_timers(self) -> None:
        """stop() starts nothing more, cancels timers and fires when attempts in flight end."""
        scheduler = self._scheduler()
        scheduler.add(Job("m", 3, 0, "u"))
        scheduler.add(Job("later", 3, 1, "u"), not_before=30.0)
        stopped = scheduler.stop()
        self.assertNoResult(stopped)
        self.deliveries.finish("m")
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PriorityEndToEndTests(unittest.TestCase):
    @inlineCallbacks
    def test_priority_one_overtakes_backlog(self) -> Any:
        """
        With a backlog of 200 priority-5 messages towards a slow smarthost and
        max_concurrency = 2, a priority-1 message submitted last is delivered
        before every backlog message not already started.
        """
        smarthost = Smarthost(delay=0.02)
        self.addCleanup(smarthost.stop)
        stack = Stack(self, smarthost=smarthost, delivery="max_concurrency = 2")
        yield gatherResults(
            [
                stack.submit_internal("me@example.com", ["r@dest.test"], f"Subject: low {n}\r\n\r\nx\r\n".encode(), 5, "bulk")
                for n in range(200)
            ]
        )
        started_before = stack.delivery.scheduler.started
        data = simple_message(subject="urgent", extra='X-SMTPAPI: {"Priority": 1}\r\n')
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual(code, 250)
        started_at_queue = stack.delivery.scheduler.started
        yield stack.wait_status(queue_id(text), "sent", timeout=15)
        subjects = [parse(m.data)["Subject"] for m in smarthost.received()]
        position = subjects.index("urgent")
        self.assertLess(position, 190)
        self.assertLessEqual(position, started_at_queue + 2)
        self.assertGreaterEqual(started_at_queue, started_before)
        # The rest of the backlog drains afterwards (bounded wait).
        yield wait_until(lambda: len(smarthost.received()) == 201, timeout=30)


class PriorityAtScaleTests(unittest.TestCase):
    @inlineCallbacks
    def test_priority_one_overtakes_2000_backlog(self) -> Any:
        """
        With 2,000 priority-5 messages queued towards a slow smarthost and
        max_concurrency = 2, a priority-1 message submitted last over SMTP
        is the very next delivery started, and reaches the smarthost before
        every backlog message except those in flight beside it.
        """
        smarthost = Smarthost(delay=0.02)
        self.addCleanup(smarthost.stop)
        stack = Stack(self, smarthost=smarthost, delivery="max_concurrency = 2", start=False)
        scheduler = stack.delivery.scheduler
        started: list[str] = []
        deliver = scheduler._deliver

        def recording(message_id: str) -> Any:
            started.append(message_id)
            return deliver(message_id)

        scheduler._deliver = recording
        queued_at: dict[str, int] = {}
        on_queued = stack.delivery._queued

        def noting(message: Any, seq: int, content: bytes | None) -> None:
            queued_at[message.id] = len(started)
            on_queued(message, seq, content)

        stack.delivery._queued = noting  # type: ignore[method-assign]
        stack.start()
        backlog = yield gatherResults(
            [
                stack.submit_internal("me@example.com", ["r@dest.test"], f"Subject: low {n}\r\n\r\nx\r\n".encode(), 5, "bulk")
                for n in range(2000)
            ]
        )
        subject_of = {f"low {n}": message_id for n, message_id in enumerate(backlog)}
        data = simple_message(subject="urgent", extra='X-SMTPAPI: {"Priority": 1}\r\n')
        code, text = yield stack.submit("me@example.com", ["r@dest.test"], data)
        self.assertEqual(code, 250)
        urgent = queue_id(text)
        subject_of["urgent"] = urgent
        yield stack.wait_status(urgent, "sent", timeout=15)
        before = queued_at[urgent]
        self.assertLess(before, 1000, "the backlog had mostly drained already; the test proves nothing")
        self.assertEqual(started[before], urgent)
        arrived = [subject_of[parse(m.data)["Subject"]] for m in smarthost.received()]
        ahead = arrived[: arrived.index(urgent)]
        # Deliveries running beside the urgent one (at most max_concurrency
        # at a time) may finish first; nothing else may.
        overtaking = set(ahead) - set(started[:before])
        self.assertLessEqual(len(overtaking), 2, overtaking)
