"""
The daemon's Prometheus metrics and its health check, which the admin API
serves at C{/metrics} and C{/health} (contract section 6).

A leaf like L{smtpplus.model}: the parts that count (the SMTP sessions, the
delivery agent, the login service) are handed one L{Metrics} by C{tap.py}
and call its methods, each a counter increment or a histogram observation
(about a microsecond).  What is a level rather than an event is read when
scraped: the open sessions from the session registry, the queue from a
count query kept for a few seconds, so that a scrape costs the reactor
nothing and the database thread at most one small query per
L{QUEUE_COUNT_MAX_AGE}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

T = TypeVar("T")

# The values of smtpplus_messages_refused_total's reason label; README
# ("Metrics") says what each one counts.
REFUSAL_REASONS = ("sender", "size", "smtpapi", "loop", "account", "storage", "other")
DELIVERY_RESULTS = ("sent", "deferred", "bounced")
PRIORITIES = (1, 2, 3, 4, 5)

# From the final dot to the 250: a group commit (fsync, one transaction)
# takes milliseconds; seconds mean a disk in trouble.
ACCEPT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# From the 250 to a recipient's final result: a second when the next hop
# answers at once, up to the queue lifetime (days) through retries.
DELIVERY_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 432000.0)

# A scrape more often than this reuses the last queue count.
QUEUE_COUNT_MAX_AGE = 5.0
# /health needs no token: however often it is asked, the store is probed at
# most this often.
HEALTH_MAX_AGE = 1.0
# How long the store has to answer before /health says it does not, and a
# scrape goes on with the last queue count.
STORE_TIMEOUT = 2.0


class Metrics:
    """
    The collectors of one daemon, registered in C{registry}; the parts
    that count call the methods below.

    @ivar registry: what L{scrape} exposes.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.accepted = Counter(
            "smtpplus_messages_accepted", "Messages answered 250 at the end of DATA.", registry=registry
        )
        self.refused = Counter(
            "smtpplus_messages_refused",
            "Mail transactions refused at MAIL, DATA or the end of DATA, by reason.",
            ["reason"],
            registry=registry,
        )
        self.deliveries = Counter(
            "smtpplus_deliveries", "Recipient results of delivery attempts.", ["result"], registry=registry
        )
        self.auth_failures = Counter(
            "smtpplus_auth_failures", "SMTP AUTH refused: wrong credentials, or locked out.", registry=registry
        )
        self.sessions = Gauge("smtpplus_smtp_sessions", "Open inbound SMTP sessions.", registry=registry)
        self.accept_seconds = Histogram(
            "smtpplus_accept_seconds", "Seconds from the end of DATA to the 250.", buckets=ACCEPT_BUCKETS, registry=registry
        )
        self.delivery_seconds = Histogram(
            "smtpplus_delivery_seconds",
            "Seconds from the 250 to a recipient's final result (sent or bounced).",
            buckets=DELIVERY_BUCKETS,
            registry=registry,
        )
        # Children looked up once: labels() takes a lock and builds a key.
        self._refused = {reason: self.refused.labels(reason) for reason in REFUSAL_REASONS}
        self._deliveries = {result: self.deliveries.labels(result) for result in DELIVERY_RESULTS}
        self._queue: QueueGauge | None = None

    def message_accepted(self, seconds: float) -> None:
        """A message was answered 250, C{seconds} after its final dot."""
        self.accepted.inc()
        self.accept_seconds.observe(seconds)

    def message_refused(self, reason: str | None) -> None:
        """A mail transaction was refused for C{reason} (one of L{REFUSAL_REASONS}; None is C{other})."""
        self._refused.get(reason or "other", self._refused["other"]).inc()

    def recipient_result(self, result: str, seconds: float) -> None:
        """
        A delivery attempt ended with C{result} for one recipient,
        C{seconds} after the message was accepted; a final result (not
        C{deferred}) is also observed in C{smtpplus_delivery_seconds}.
        """
        self._deliveries[result].inc()
        if result != "deferred":
            self.delivery_seconds.observe(seconds)

    def auth_failed(self) -> None:
        """An SMTP AUTH was refused."""
        self.auth_failures.inc()

    def node_info(self, node: str, backend: str) -> None:
        """
        Expose C{smtpplus_node_info{node,backend} 1}: which node these
        metrics are of, to join with the others (the coordinator's only,
        so that it appears once when the workers' metrics are added in).
        """
        info = Gauge(
            "smtpplus_node_info", "This node's name and store backend; always 1.", ["node", "backend"], registry=self.registry
        )
        info.labels(node, backend).set(1)

    def count_sessions(self, count: Callable[[], int]) -> None:
        """Read C{smtpplus_smtp_sessions} from C{count()} at each scrape."""
        self.sessions.set_function(count)

    def count_queue(
        self,
        clock: IReactorTime,
        count: Callable[[], Deferred[Mapping[tuple[str, int], int]]],
        statuses: Sequence[str],
    ) -> None:
        """
        Expose C{smtpplus_queue_messages{status,priority}} for C{statuses},
        from C{count()} (the number of messages per status and priority)
        run at most every L{QUEUE_COUNT_MAX_AGE} seconds.
        """
        self._queue = QueueGauge(clock, count, statuses)
        self.registry.register(self._queue)

    async def scrape(self) -> bytes:
        """The metrics in the text format, the queue count brought up to date first."""
        if self._queue is not None:
            await self._queue.refresh()
        return generate_latest(self.registry)


def daemon_metrics() -> Metrics:
    """The metrics of a daemon: ours and the process's own (memory, CPU, open files)."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return Metrics(registry)


# Counts nobody reads: the default of the parts that count, so that tests
# and tools need not build a registry.
UNCOUNTED = Metrics(CollectorRegistry())


class Recent(Generic[T]):
    """
    The value of an asynchronous C{fetch()}, fetched again once it is
    C{max_age} seconds old; callers arriving while a fetch runs share it.
    C{fetch} must not fail.
    """

    def __init__(self, clock: IReactorTime, fetch: Callable[[], Deferred[T]], max_age: float) -> None:
        self._clock = clock
        self._fetch = fetch
        self._max_age = max_age
        self._fetched_at: float | None = None
        self._value: T | None = None
        self._waiting: list[Deferred[T]] | None = None

    def get(self) -> Deferred[T]:
        """The value, fetched again if it is too old."""
        if self._fetched_at is not None and self._clock.seconds() - self._fetched_at < self._max_age:
            return succeed(self._value)  # type: ignore[arg-type]
        waiter: Deferred[T] = Deferred()
        if self._waiting is not None:
            self._waiting.append(waiter)
            return waiter
        self._waiting = [waiter]
        maybeDeferred(self._fetch).addCallback(self._fetched)
        return waiter

    def _fetched(self, value: T) -> None:
        self._value = value
        self._fetched_at = self._clock.seconds()
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.callback(value)


class QueueGauge:
    """
    A collector of C{smtpplus_queue_messages{status,priority}} from the last
    count; every status and priority is present, 0 when none.  A count that
    fails or takes longer than L{STORE_TIMEOUT} leaves the previous one.
    """

    def __init__(
        self,
        clock: IReactorTime,
        count: Callable[[], Deferred[Mapping[tuple[str, int], int]]],
        statuses: Sequence[str],
    ) -> None:
        self._clock = clock
        self._count = count
        self._statuses = tuple(statuses)
        self._counts: Mapping[tuple[str, int], int] = {}
        self._recent = Recent(clock, self._fetch, QUEUE_COUNT_MAX_AGE)

    def refresh(self) -> Deferred[Mapping[tuple[str, int], int]]:
        """Count again, unless the last count is recent."""
        return self._recent.get()

    def _fetch(self) -> Deferred[Mapping[tuple[str, int], int]]:
        def counted(counts: Mapping[tuple[str, int], int]) -> Mapping[tuple[str, int], int]:
            self._counts = counts
            return counts

        def failed(failure: Failure) -> Mapping[tuple[str, int], int]:
            log.warn("counting the queue for /metrics failed: {error}; showing the last count", error=failure.value)
            return self._counts

        d = maybeDeferred(self._count).addTimeout(STORE_TIMEOUT, self._clock)
        return d.addCallbacks(counted, failed)

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "smtpplus_queue_messages",
            "Messages in the queue (not yet final), by status and priority.",
            labels=["status", "priority"],
        )

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for status in self._statuses:
            for priority in PRIORITIES:
                family.add_metric([status, str(priority)], self._counts.get((status, priority), 0))
        yield family


class HealthCheck:
    """
    What C{/health} answers: a problem, or None when the store answers and
    at least one SMTP port is listening.

    @param probe_store: a trivial query through the database; its failure
        says why the store cannot serve.
    @param listening_ports: how many SMTP ports are listening.
    """

    def __init__(
        self,
        clock: IReactorTime,
        probe_store: Callable[[], Deferred[object]],
        listening_ports: Callable[[], int],
    ) -> None:
        self._clock = clock
        self._probe_store = probe_store
        self._listening_ports = listening_ports
        self._store = Recent(clock, self._check_store, HEALTH_MAX_AGE)

    async def problem(self) -> str | None:
        """Why the daemon cannot take mail now, or None."""
        if not self._listening_ports():
            return "smtp: no SMTP port is listening"
        return await self._store.get()

    def _check_store(self) -> Deferred[str | None]:
        def failed(failure: Failure) -> str:
            if failure.check(defer.TimeoutError):
                return f"database: no answer within {STORE_TIMEOUT:g} s"
            return f"database: {failure.value}"

        d = maybeDeferred(self._probe_store).addTimeout(STORE_TIMEOUT, self._clock)
        return d.addCallbacks(lambda _: None, failed)
