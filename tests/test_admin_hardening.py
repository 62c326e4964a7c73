"""
The admin API refuses request bodies it cannot parse safely or store with a
400, never a 500 and never a logged traceback (contract section 9).
"""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher

from smtpplus.admin.api import MAX_DEPTH
from tests.test_admin_api import TOKEN, APITestCase

# JSON text escapes that decode to strings UTF-8 and SQLite cannot hold.
LONE_SURROGATE = "\\ud800"
NUL = "\\u0000"


class QuietAPITestCase(APITestCase):
    """An API test case that keeps every log event above info the API emits."""

    def setUp(self) -> None:
        super().setUp()
        self.logged: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical):
                self.logged.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    @inlineCallbacks
    def post_raw(self, method: str, path: str, text: str) -> Any:
        """Send C{text} (JSON, possibly hostile) as the body and return (code, document)."""
        return (yield self.call(method, path, raw=text.encode("utf-8")))

    def assertNothingLogged(self) -> None:
        self.assertEqual(self.logged, [])


class DepthTests(QuietAPITestCase):
    @inlineCallbacks
    def test_deeply_nested_body(self) -> Any:
        """100,000 nested arrays or objects answer 400 on POST and PATCH, and log no traceback."""
        yield self.call("POST", "/api/v1/users", body={"username": "app1"})
        bodies = ["[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000]
        for body in bodies:
            for method, path in (("POST", "/api/v1/users"), ("PATCH", "/api/v1/users/app1")):
                result = yield self.post_raw(method, path, body[:60_000])
                self.assertError(result, 400, "deeper")
        self.assertNothingLogged()
        self.assertEqual([u["username"] for u in (yield self.call("GET", "/api/v1/users"))[1]["users"]], ["app1"])

    @inlineCallbacks
    def test_depth_limit_exactly(self) -> Any:
        """A body nesting exactly MAX_DEPTH levels is parsed (and refused as a non-object); one more is too deep."""
        at_limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
        self.assertError((yield self.post_raw("POST", "/api/v1/users", at_limit)), 400, "JSON object")
        beyond = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
        self.assertError((yield self.post_raw("POST", "/api/v1/users", beyond)), 400, "deeper")

    @inlineCallbacks
    def test_brackets_inside_strings_do_not_count(self) -> Any:
        """Brackets, quotes and backslashes inside a JSON string are text, not nesting."""
        notes = '[[[{{{ \\" ' * 500 + "\\\\"
        code, user = yield self.call("POST", "/api/v1/users", body={"username": "app2", "notes": notes})
        self.assertEqual(code, 201, user)
        self.assertEqual(user["notes"], notes)


class UnstorableStringTests(QuietAPITestCase):
    @inlineCallbacks
    def test_lone_surrogate_in_any_field(self) -> Any:
        """A lone surrogate in notes, username, domains, senders or a field name answers 400, on POST and PATCH."""
        yield self.call("POST", "/api/v1/users", body={"username": "app1", "notes": "keep"})
        for bad in (LONE_SURROGATE, "\\udfff", "a\\udc80b"):
            bodies = [
                (f'{{"notes": "x{bad}"}}', "notes"),
                (f'{{"username": "u{bad}"}}', "username"),
                (f'{{"authorized_domains": ["ok.example", "{bad}.example"]}}', "authorized_domains"),
                (f'{{"authorized_domains": "{bad}.example"}}', "authorized_domains"),
                (f'{{"authorized_senders": ["a{bad}@example.com"]}}', "authorized_senders"),
                (f'{{"aggregation": "{bad}"}}', "aggregation"),
                (f'{{"{bad}": 1}}', "field name"),
                (f'"{bad}"', "request body"),
            ]
            for body, named in bodies:
                self.assertError((yield self.post_raw("POST", "/api/v1/users", body)), 400, named)
                self.assertError((yield self.post_raw("PATCH", "/api/v1/users/app1", body)), 400, named)
        self.assertNothingLogged()
        code, user = yield self.call("GET", "/api/v1/users/app1")
        self.assertEqual((code, user["notes"]), (200, "keep"))
        self.assertEqual(len((yield self.call("GET", "/api/v1/users"))[1]["users"]), 1)

    @inlineCallbacks
    def test_nul(self) -> Any:
        """A NUL character in a string answers 400 instead of being stored."""
        for body, named in ((f'{{"notes": "a{NUL}b"}}', "notes"), (f'{{"username": "a{NUL}"}}', "username")):
            self.assertError((yield self.post_raw("POST", "/api/v1/users", body)), 400, named)
        self.assertNothingLogged()
        self.assertEqual((yield self.call("GET", "/api/v1/users"))[1], {"users": []})

    @inlineCallbacks
    def test_surrogate_pair_is_text(self) -> Any:
        """An escaped surrogate pair is one valid character (U+1F600) and is stored and returned as such."""
        code, user = yield self.post_raw("POST", "/api/v1/users", '{"username": "app3", "notes": "hi \\ud83d\\ude00"}')
        self.assertEqual((code, user["notes"]), (201, "hi \N{GRINNING FACE}"))
        code, user = yield self.call("GET", "/api/v1/users/app3")
        self.assertEqual(user["notes"], "hi \N{GRINNING FACE}")

    @inlineCallbacks
    def test_odd_paths(self) -> Any:
        """
        A username in the path holding NUL is simply not found (404); a path
        that is not UTF-8 answers the JSON 400 (401 without the token), and
        nothing is logged.
        """
        for method in ("GET", "PATCH", "DELETE"):
            self.assertError((yield self.call(method, "/api/v1/users/a%00", body={})), 404)
        for path in ("/api/v1/users/%ED%A0%80", "/api/v1/users/a%FF", "/api/v1/users/a%FF/password", "/%C0"):
            for method in ("GET", "PATCH", "POST", "DELETE"):
                self.assertError((yield self.call(method, path, body={})), 400, "UTF-8")
            self.assertError((yield self.call("GET", path, token=None)), 401)
        self.assertNothingLogged()

    @inlineCallbacks
    def test_host_header_not_utf8(self) -> Any:
        """A Host header that is not UTF-8 answers the JSON 400 and logs nothing."""
        address = urlsplit(self.base)

        def request() -> tuple[int, Any]:
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
            try:
                connection.putrequest("GET", "/api/v1/settings", skip_host=True)
                connection.putheader("Host", b"\xff\xfe")
                connection.putheader("Authorization", f"Bearer {TOKEN}")
                connection.endheaders()
                response = connection.getresponse()
                return response.status, json.loads(response.read())
            finally:
                connection.close()

        status, document = yield deferToThread(request)
        self.assertEqual((status, document["error"]["code"]), (400, "bad_request"))
        self.assertNothingLogged()
