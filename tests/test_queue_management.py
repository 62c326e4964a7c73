"""
Queue management and paging (contract section 6): the scheduler's part of
retry and delete, the cursor and time parsing, and the admin API's
C{/messages} and C{/notifications} routes over a real HTTP socket, in front
of real delivery (SQLite queue, spool, a fake smarthost) and real stores.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from smtpplus.admin.api import AdminAPI
from smtpplus.admin.openapi import openapi_document
from smtpplus.admin.service import admin_site
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.delivery.memory import MemoryQueueStore
from smtpplus.delivery.query import MessageQuery, QueueControl
from smtpplus.delivery.queue import NewMessage, SQLiteQueueStore
from smtpplus.delivery.relay import HopOutcome
from smtpplus.delivery.scheduler import IN_FLIGHT_PER_SLOT, Job, Scheduler
from smtpplus.interfaces import QueueConflict
from smtpplus.model import iso_utc
from smtpplus.notify.events import EventStore
from smtpplus.paging import InvalidValue, decode_cursor, encode_cursor, parse_time
from smtpplus.storage.database import Database
from tests.delivery_helpers import Stack, queue_id, simple_message, wait_until, wall_clock
from tests.test_auth_store import make_sqlite_store

TOKEN = "queue-token"


class _Attempts:
    """A deliver callback whose attempts stay in flight until the test ends them."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.pending: dict[str, Deferred[float | None]] = {}

    def __call__(self, message_id: str) -> Deferred[float | None]:
        self.started.append(message_id)
        d: Deferred[float | None] = Deferred()
        self.pending[message_id] = d
        return d


class SchedulerManagementTests(TestCase):
    """Scheduler.hurry and Scheduler.remove, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.attempts = _Attempts()
        self.scheduler = Scheduler(self.clock, self.attempts, 1)
        self.scheduler.start()

    def test_hurry_cuts_a_timer_short(self) -> None:
        """A job waiting for its retry time starts at once when hurried, and its timer is gone."""
        self.scheduler.add(Job("later", 3, 1, "u"), 500.0)
        self.assertEqual(self.attempts.started, [])
        self.scheduler.hurry(Job("later", 3, 1, "u"))
        self.assertEqual(self.attempts.started, ["later"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hurry_adds_unknown_and_leaves_in_flight(self) -> None:
        """A job the scheduler does not hold is added; one whose attempt is in flight is not started twice."""
        self.scheduler.hurry(Job("new", 3, 1, "u"))
        self.assertEqual(self.attempts.started, ["new"])
        self.scheduler.hurry(Job("new", 3, 1, "u"))
        self.attempts.pending["new"].callback(None)
        self.assertEqual(self.attempts.started, ["new"])

    def test_remove_ready_and_waiting(self) -> None:
        """
        remove() takes a ready job out of its turn and a waiting one off its
        timer, returning each with its due time; neither starts afterwards,
        and a job in flight or unknown is not removed.
        """
        # With one slot, IN_FLIGHT_PER_SLOT attempts are in flight.
        busy = [f"busy{n}" for n in range(IN_FLIGHT_PER_SLOT)]
        for n, name in enumerate(busy):
            self.scheduler.add(Job(name, 3, n - 100, "u"))
        self.scheduler.add(Job("ready", 3, 3, "u"))
        self.scheduler.add(Job("other", 3, 4, "v"))
        self.scheduler.add(Job("timer", 3, 5, "u"), 100.0)
        self.assertEqual(self.scheduler.remove("ready"), (Job("ready", 3, 3, "u"), None))
        self.assertEqual(self.scheduler.remove("timer"), (Job("timer", 3, 5, "u"), 100.0))
        for name in busy:
            self.assertIsNone(self.scheduler.remove(name))
        self.assertIsNone(self.scheduler.remove("unknown"))
        self.assertEqual(self.scheduler.ready_count(), 1)
        self.attempts.pending["busy0"].callback(None)
        self.clock.advance(200)
        self.attempts.pending["other"].callback(None)
        self.assertEqual(self.attempts.started, [*busy, "other"])

    def test_removed_job_can_be_added_back(self) -> None:
        """A removed job added back with its due time waits for it again."""
        self.scheduler.add(Job("busy", 3, 1, "u"))
        self.scheduler.add(Job("timer", 3, 2, "u"), 100.0)
        job, due = self.scheduler.remove("timer")
        self.scheduler.add(job, due)
        self.attempts.pending["busy"].callback(None)
        self.clock.advance(99)
        self.assertEqual(self.attempts.started, ["busy"])
        self.clock.advance(1)
        self.assertEqual(self.attempts.started, ["busy", "timer"])


class _HeldDeletes(MemoryQueueStore):
    """The memory store, whose deletions are written only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Deferred[None]] = []

    def delete_message(self, message_id: str, now: float) -> Any:
        written: Deferred[None] = Deferred()
        self.held.append(written)
        return written.addCallback(lambda _: super(_HeldDeletes, self).delete_message(message_id, now))


class RetryDuringDeleteTests(TestCase):
    @inlineCallbacks
    def test_retry_while_delete_is_written(self) -> Any:
        """
        A retry answered while a deletion of the same message is being
        written does not hand the message back to the scheduler: once
        deleted it is never attempted; a second delete meanwhile is 409.
        """
        clock = Clock()
        attempts = _Attempts()
        scheduler = Scheduler(clock, attempts, 1)
        scheduler.start()
        store = _HeldDeletes()
        query = MessageQuery(store, clock, QueueControl(scheduler, lambda _: None, lambda _: succeed(None)))
        blockers = [f"BLOCKER{n}" for n in range(IN_FLIGHT_PER_SLOT)]
        seqs = yield store.insert([_new(name, 1.0 + n / 10) for n, name in enumerate(blockers)] + [_new("M", 2.0)])
        # With one slot, IN_FLIGHT_PER_SLOT attempts are in flight: M waits behind them.
        for name, seq in zip(blockers, seqs, strict=False):
            scheduler.add(Job(name, 3, seq, "ann"))
        scheduler.add(Job("M", 3, seqs[-1], "ann"))
        deleting = query.delete_message("M")
        retried = yield query.retry_message("M")
        self.assertEqual(retried["status"], "queued")
        yield self.assertFailure(query.delete_message("M"), QueueConflict)
        store.held[0].callback(None)
        deleted = yield deleting
        self.assertEqual(deleted["status"], "deleted")
        attempts.pending["BLOCKER0"].callback(None)
        self.assertEqual(attempts.started, blockers)
        self.assertEqual(scheduler.ready_count(), 0)


class PagingValueTests(TestCase):
    """Cursors and the ISO 8601 times of since/until."""

    def test_cursor_round_trip(self) -> None:
        """A cursor names its arrival number; anything else is refused."""
        for seq in (1, 255, 2**59):
            self.assertEqual(decode_cursor(encode_cursor(seq)), seq)
        for bad in ("", "xyz", "FF", "-1", "1" * 16, " 1"):
            self.assertRaises(InvalidValue, decode_cursor, bad)

    def test_times_with_zone(self) -> None:
        """Z, lower-case z and offsets are understood; fractions kept; a leap second is the next minute."""
        self.assertEqual(parse_time("2024-05-01T12:00:00Z"), 1714564800)
        self.assertEqual(parse_time("2024-05-01t14:00:00+02:00"), 1714564800)
        self.assertEqual(parse_time("2024-05-01T07:30:00-04:30"), 1714564800)
        self.assertEqual(parse_time("2024-05-01T12:00:00.25z"), 1714564800.25)
        self.assertEqual(parse_time("2016-12-31T23:59:60Z"), parse_time("2017-01-01T00:00:00Z"))
        self.assertEqual(parse_time("1970-01-01T00:00:00Z"), 0)
        self.assertEqual(parse_time("2000-02-29T00:00:00Z"), 951782400)

    def test_bad_times(self) -> None:
        """A time without its zone, or an impossible date or time, is refused."""
        for bad in (
            "2024-05-01T12:00:00",
            "2024-05-01",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:00:00+24:00",
            "2024-05-01 12:00:00Z",
            "yesterday",
        ):
            self.assertRaises(InvalidValue, parse_time, bad)


class HTTPClient:
    """An AdminAPI site on 127.0.0.1 and a treq client for it."""

    def serve(self, case: TestCase, messages: Any, events: Any = None) -> None:
        users = make_sqlite_store(case)
        api = AdminAPI(TOKEN, users, PasswordHasher(None, rounds=4), dict, messages=messages, events=events)
        port = reactor.listenTCP(0, admin_site(api), interface="127.0.0.1")
        case.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        case.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    @inlineCallbacks
    def call(self, method: str, path: str, token: str | None = TOKEN, body: Any = None) -> Any:
        headers = {} if token is None else {"Authorization": [f"Bearer {token}"]}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = ["application/json"]
        response = yield self.http.request(method, self.base + path, headers=headers, data=data)
        content = yield response.content()
        return response.code, json.loads(content) if content else None


class _HeldRelay:
    """A next hop whose answers the test gives: attempts stay 'sending' until then."""

    def __init__(self) -> None:
        self.sends: list[Deferred[list[HopOutcome]]] = []

    def send(self, mail_from: str, recipients: list[str], path: str, content: Any = None, length: Any = None) -> Any:
        d: Deferred[list[HopOutcome]] = Deferred()
        self.recipients = recipients
        self.sends.append(d)
        return d

    def answer(self, code: int, text: str) -> None:
        self.sends.pop(0).callback([HopOutcome("held", {r: (code, text) for r in self.recipients}, None)])

    def close(self) -> Deferred[None]:
        return succeed(None)


class QueueManagementAPITests(HTTPClient, TestCase):
    """POST /messages/{id}/retry and DELETE /messages/{id} in front of real delivery, on a Clock."""

    def setUp(self) -> None:
        self.clock = wall_clock()
        self.stack = Stack(self, delivery="retry_schedule = [600]", clock=self.clock)
        self.serve(self, self.stack.query)

    @inlineCallbacks
    def deferred_message(self) -> Any:
        """A message whose only recipient the smarthost defers, once it is deferred."""
        self.stack.smarthost.replies["later@dest.test"] = ["451 4.3.0 try later"]
        message_id = queue_id((yield self.stack.submit("me@example.com", ["later@dest.test"], simple_message()))[1])
        yield self.stack.wait_status(message_id, "deferred")
        return message_id

    @inlineCallbacks
    def test_retry_deferred(self) -> Any:
        """A deferred message retried is attempted at once, long before its retry time; next_attempt_at says when."""
        message_id = yield self.deferred_message()
        code, message = yield self.call("GET", f"/api/v1/messages/{message_id}")
        self.assertEqual(message["next_attempt_at"], iso_utc(self.clock.seconds() + 600))
        self.stack.smarthost.replies["later@dest.test"] = ["250 2.1.5 ok"]
        code, message = yield self.call("POST", f"/api/v1/messages/{message_id}/retry")
        self.assertEqual((code, message["id"], message["status"]), (200, message_id, "deferred"))
        self.assertEqual(message["next_attempt_at"], iso_utc(self.clock.seconds()))
        done = yield self.stack.wait_status(message_id, "sent")
        self.assertEqual([r["attempts"] for r in done["recipients"]], [2])
        self.assertIsNone(done["next_attempt_at"])
        code, error = yield self.call("POST", f"/api/v1/messages/{message_id}/retry")
        self.assertEqual((code, error["error"]["code"]), (409, "conflict"))
        self.assertIn("sent", error["error"]["message"])

    @inlineCallbacks
    def test_retry_scheduled(self) -> Any:
        """A scheduled message retried loses its hold: queued, then sent now."""
        schedule = iso_utc(self.clock.seconds() + 86400)
        data = simple_message(extra=f'X-SMTPAPI: {{"Schedule": "{schedule}"}}\r\n')
        message_id = queue_id((yield self.stack.submit("me@example.com", ["you@dest.test"], data))[1])
        code, message = yield self.call("GET", f"/api/v1/messages/{message_id}")
        self.assertEqual((message["status"], message["next_attempt_at"]), ("scheduled", schedule))
        code, message = yield self.call("POST", f"/api/v1/messages/{message_id}/retry")
        self.assertEqual((code, message["status"]), (200, "queued"))
        yield self.stack.wait_status(message_id, "sent")
        self.assertEqual(len(self.stack.smarthost.received()), 1)

    @inlineCallbacks
    def test_unknown_message(self) -> Any:
        """Retrying or deleting a message that does not exist is 404."""
        for method, path in (("POST", "/api/v1/messages/NOPE/retry"), ("DELETE", "/api/v1/messages/NOPE")):
            code, error = yield self.call(method, path)
            self.assertEqual((code, error["error"]["code"]), (404, "not_found"))

    @inlineCallbacks
    def test_delete_deferred(self) -> Any:
        """
        A deferred message deleted is final: status deleted for it and its
        recipients, no next attempt, its spool file gone, never tried again;
        deleting it again is 409.
        """
        message_id = yield self.deferred_message()
        spool_file = self.stack.delivery.spool.path(message_id)
        self.assertTrue(os.path.exists(spool_file))
        code, message = yield self.call("DELETE", f"/api/v1/messages/{message_id}")
        self.assertEqual((code, message["status"], message["next_attempt_at"]), (200, "deleted", None))
        self.assertEqual([r["status"] for r in message["recipients"]], ["deleted"])
        self.assertFalse(os.path.exists(spool_file))
        self.assertFalse(os.path.exists(os.path.join(self.stack.delivery.spool.free_dir, message_id)))
        started = self.stack.delivery.scheduler.started
        self.clock.advance(700)
        self.assertEqual(self.stack.delivery.scheduler.started, started)
        code, stored = yield self.call("GET", f"/api/v1/messages/{message_id}")
        self.assertEqual(stored["status"], "deleted")
        code, error = yield self.call("DELETE", f"/api/v1/messages/{message_id}")
        self.assertEqual(code, 409)
        self.assertIn("final", error["error"]["message"])
        code, error = yield self.call("POST", f"/api/v1/messages/{message_id}/retry")
        self.assertEqual(code, 409)

    @inlineCallbacks
    def test_delete_scheduled(self) -> Any:
        """A scheduled message deleted is never sent, even once its time comes."""
        data = simple_message(extra=f'X-SMTPAPI: {{"Schedule": "{iso_utc(self.clock.seconds() + 60)}"}}\r\n')
        message_id = queue_id((yield self.stack.submit("me@example.com", ["you@dest.test"], data))[1])
        code, message = yield self.call("DELETE", f"/api/v1/messages/{message_id}")
        self.assertEqual((code, message["status"]), (200, "deleted"))
        self.clock.advance(120)
        self.assertEqual(self.stack.delivery.scheduler.started, 0)
        self.assertEqual(self.stack.smarthost.received(), [])

    @inlineCallbacks
    def test_delete_sent_is_conflict(self) -> Any:
        """A sent message cannot be deleted (409) and stays sent."""
        message_id = queue_id((yield self.stack.submit("me@example.com", ["you@dest.test"], simple_message()))[1])
        yield self.stack.wait_status(message_id, "sent")
        code, error = yield self.call("DELETE", f"/api/v1/messages/{message_id}")
        self.assertEqual(code, 409)
        code, message = yield self.call("GET", f"/api/v1/messages/{message_id}")
        self.assertEqual(message["status"], "sent")


class SendingConflictTests(HTTPClient, TestCase):
    """A message whose attempt is in flight."""

    @inlineCallbacks
    def test_delete_while_sending(self) -> Any:
        """Deleting a message being sent is 409 and the attempt's result stands; retrying it changes nothing."""
        relay = _HeldRelay()
        stack = Stack(self, relay=relay)
        self.serve(self, stack.query)
        message_id = queue_id((yield stack.submit("me@example.com", ["you@dest.test"], simple_message()))[1])
        yield wait_until(lambda: relay.sends)
        yield stack.wait_status(message_id, "sending")
        code, error = yield self.call("DELETE", f"/api/v1/messages/{message_id}")
        self.assertEqual(code, 409)
        self.assertIn("being sent", error["error"]["message"])
        code, message = yield self.call("POST", f"/api/v1/messages/{message_id}/retry")
        self.assertEqual((code, message["status"], message["next_attempt_at"]), (200, "sending", None))
        relay.answer(250, "2.0.0 ok")
        yield stack.wait_status(message_id, "sent")
        self.assertEqual(len(relay.sends), 0)


def _new(message_id: str, created_at: float, **changes: Any) -> NewMessage:
    fields: dict[str, Any] = {
        "id": message_id,
        "user": "ann",
        "mail_from": "a@example.com",
        "header_from": "a@example.com",
        "subject": "s",
        "priority": 3,
        "recipients": ("x@dest.test",),
        "campaign_name": None,
        "campaign_code": None,
        "schedule_at": None,
        "size": 10,
        "internal": False,
        "created_at": created_at,
    }
    fields.update(changes)
    return NewMessage(**fields)


class ListingTests(HTTPClient, TestCase):
    """Filters, cursors and unknown parameters of the listings, over real SQLite stores."""

    def setUp(self) -> None:
        database = Database(reactor, os.path.abspath(self.mktemp()))
        self.addCleanup(database.stop)
        self.store = SQLiteQueueStore(database)
        self.store.migrate()
        self.clock = Clock()
        scheduler = Scheduler(self.clock, lambda message_id: succeed(None), 1)
        query = MessageQuery(self.store, self.clock, QueueControl(scheduler, lambda _: None, lambda _: succeed(None)))
        self.events = EventStore(database, self.clock)
        self.serve(self, query, self.events)

    @inlineCallbacks
    def ids(self, query: str) -> Any:
        code, document = yield self.call("GET", f"/api/v1/messages?{query}")
        self.assertEqual(code, 200, document)
        return [m["id"] for m in document["messages"]], document["next_cursor"]

    @inlineCallbacks
    def test_pages_are_stable(self) -> Any:
        """
        Paging with next_cursor walks every message once, newest first,
        while new mail arrives between the requests; the last page's
        next_cursor is null.
        """
        yield self.store.insert([_new(f"M{i}", 1000.0 + i) for i in range(1, 6)])
        page, cursor = yield self.ids("limit=2")
        self.assertEqual(page, ["M5", "M4"])
        yield self.store.insert([_new("M6", 1006.0), _new("M7", 1007.0)])
        page, cursor = yield self.ids(f"limit=2&cursor={cursor}")
        self.assertEqual(page, ["M3", "M2"])
        yield self.store.insert([_new("M8", 1008.0)])
        page, cursor = yield self.ids(f"limit=2&cursor={cursor}")
        self.assertEqual((page, cursor), (["M1"], None))
        page, cursor = yield self.ids("limit=8")
        self.assertEqual((page, cursor), ([f"M{i}" for i in range(8, 0, -1)], None))

    @inlineCallbacks
    def test_filters(self) -> Any:
        """recipient, campaign_code, since (inclusive) and until (exclusive, any offset) filter, and page together."""
        start = parse_time("2024-05-01T12:00:00Z")
        yield self.store.insert(
            [
                _new("A", start - 1, recipients=("Bob@Dest.test",)),
                _new("B", start, campaign_code="spring"),
                _new("C", start + 3600, recipients=("x@dest.test", "bob@dest.test"), campaign_code="spring"),
                _new("D", start + 7200, campaign_code="spring"),
            ]
        )
        self.assertEqual((yield self.ids("recipient=bob%40dest.test")), (["C", "A"], None))
        self.assertEqual((yield self.ids("campaign_code=spring")), (["D", "C", "B"], None))
        self.assertEqual((yield self.ids("since=2024-05-01T12:00:00Z")), (["D", "C", "B"], None))
        # 15:00+02:00 is C's creation time exactly: until leaves it out.
        self.assertEqual((yield self.ids("until=2024-05-01T15:00:00%2B02:00")), (["B", "A"], None))
        self.assertEqual((yield self.ids("until=2024-05-01T15:00:01%2B02:00")), (["C", "B", "A"], None))
        page, cursor = yield self.ids("campaign_code=spring&since=2024-05-01T12:00:00Z&until=2024-05-01T14:00:00Z&limit=1")
        self.assertEqual(page, ["C"])
        self.assertEqual((yield self.ids(f"campaign_code=spring&since=2024-05-01T12:00:00Z&limit=1&cursor={cursor}")), (["B"], None))

    @inlineCallbacks
    def test_bad_values(self) -> Any:
        """A time without a zone, an impossible time and a cursor not handed out are 400 naming the parameter."""
        for query, name in (
            ("since=2024-05-01T12:00:00", "since"),
            ("until=2024-02-30T00:00:00Z", "until"),
            ("cursor=zz", "cursor"),
        ):
            code, error = yield self.call("GET", f"/api/v1/messages?{query}")
            self.assertEqual(code, 400, query)
            self.assertIn(name, error["error"]["message"])
        code, error = yield self.call("GET", "/api/v1/notifications?cursor=-1")
        self.assertEqual(code, 400)

    @inlineCallbacks
    def test_notification_pages(self) -> Any:
        """Notifications page with next_cursor too, stable while new events are recorded."""
        for i in range(5):
            yield self.events.record("bounce", "ann", None, f"e{i}")
        code, first = yield self.call("GET", "/api/v1/notifications?limit=3")
        self.assertEqual([e["detail"] for e in first["notifications"]], ["e4", "e3", "e2"])
        yield self.events.record("bounce", "ann", None, "e5")
        code, second = yield self.call("GET", f"/api/v1/notifications?limit=3&cursor={first['next_cursor']}")
        self.assertEqual([e["detail"] for e in second["notifications"]], ["e1", "e0"])
        self.assertIsNone(second["next_cursor"])
        code, typed = yield self.call("GET", "/api/v1/notifications?type=bounce&user=ann&limit=6")
        self.assertEqual((len(typed["notifications"]), typed["next_cursor"]), (6, None))

    @inlineCallbacks
    def test_unknown_parameters_everywhere(self) -> Any:
        """
        Every operation of the document answers 400 naming a query parameter
        it does not take (after 401 without the token, where one is needed);
        known parameters of another operation count as unknown.
        """
        document = openapi_document()
        for template, item in document["paths"].items():
            path = re.sub(r"\{[^}]+\}", "x", template)
            for method, operation in item.items():
                if method == "parameters":
                    continue
                code, error = yield self.call(method.upper(), f"{path}?bogus=1&cursor=1", body={} if method == "patch" else None)
                declared = {p["name"] for p in operation.get("parameters", ())}
                self.assertEqual(code, 400, (method, path, error))
                expected = "bogus" if "cursor" in declared else "bogus, cursor"
                self.assertIn(f"{expected}: unknown query", error["error"]["message"])
                if operation.get("security", document["security"]):
                    code, error = yield self.call(method.upper(), f"{path}?bogus=1", token=None)
                    self.assertEqual(code, 401, (method, path))

    @inlineCallbacks
    def test_non_ascii_parameters(self) -> Any:
        """Query values and names beyond ASCII are read as UTF-8: a known name passes, an unknown one is named."""
        code, document = yield self.call("GET", "/api/v1/messages?user=%C3%88&recipient=%F2%B0%A8%AB~v")
        self.assertEqual((code, document["messages"]), (200, []))
        code, error = yield self.call("GET", "/api/v1/notifications?%C3%A9t%C3%A9=1")
        self.assertEqual(code, 400)
        self.assertIn("\u00e9t\u00e9: unknown query parameter", error["error"]["message"])
        code, error = yield self.call("GET", "/api/v1/stats?user=%FF")
        self.assertEqual((code, error["error"]["code"]), (400, "validation_error"))

    @inlineCallbacks
    def test_form_fields_are_not_query_parameters(self) -> Any:
        """The fields of a form-encoded body are not taken for query parameters: the body is refused as not JSON (415)."""
        response = yield self.http.post(
            self.base + "/api/v1/users",
            data=b"username=abc",
            headers={"Authorization": [f"Bearer {TOKEN}"], "Content-Type": ["application/x-www-form-urlencoded"]},
        )
        self.assertEqual(response.code, 415)
        yield response.content()
