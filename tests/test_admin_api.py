"""The REST admin API over a real HTTP socket, with treq as the client."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.trial.unittest import TestCase

from smtpplus.admin.api import MAX_BODY, AdminAPI
from smtpplus.admin.service import admin_site
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.auth.users import USERNAME_RE
from tests.harness.stores import make_sqlite_store
from tests.harness.web import http_client, serve

TOKEN = "test-token-abc"
SETTINGS = {
    "hostname": "relay.test",
    "ports": "2525",
    "listening_ports": [2525],
    "tls_ports": "",
    "listening_tls_ports": [],
    "encryption": "STARTTLS",
    "auth_mechanisms": ["PLAIN", "LOGIN"],
}


class FakeQueries:
    """In-memory message, event and statistics read models that record their calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.message = {"id": "M1", "user": "alice", "status": "sent"}

    def page_messages(self, filters: Any, limit: int, cursor: Any) -> Any:
        self.calls.append(("messages", filters, limit, cursor))
        return succeed(([self.message], "a1"))

    def get_message(self, message_id: str) -> Any:
        return succeed(self.message if message_id == "M1" else None)

    def page_events(self, type: Any, user: Any, limit: int, cursor: Any) -> Any:
        self.calls.append(("events", type, user, limit, cursor))
        return succeed(([{"id": 1, "type": "bounce"}], None))

    def stats(self, user: Any, policy: Any) -> Any:
        self.calls.append(("stats", user, policy))
        return succeed({"policy": policy or "week", "groups": [{"key": "2024-W18"}]})


class AdminServer:
    """Starts an AdminAPI site on 127.0.0.1 port 0 for a test case and talks to it with treq."""

    def start_server(self, case: TestCase, queries: Any = None) -> None:
        self.store = make_sqlite_store(case)
        self.hasher = PasswordHasher(None, rounds=4)
        api = AdminAPI(TOKEN, self.store, self.hasher, lambda: dict(SETTINGS), queries, queries, queries)
        self.base = serve(case, admin_site(api))
        self.http = http_client(case)

    @inlineCallbacks
    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = TOKEN,
        raw: bytes | None = None,
        content_type: str | None = "application/json",
        params: Any = None,
    ) -> Any:
        headers = {}
        if token is not None:
            headers["Authorization"] = [f"Bearer {token}"]
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None and content_type is not None:
            headers["Content-Type"] = [content_type]
        response = yield self.http.request(method, self.base + path, headers=headers, data=data, params=params)
        content = yield response.content()
        self.last_headers = response.headers
        document = json.loads(content) if content else None
        return response.code, document


class APITestCase(AdminServer, TestCase):
    queries: Any = None

    def setUp(self) -> None:
        self.start_server(self, self.queries)

    def assertError(self, result: tuple[int, Any], status: int, field_or_text: str | None = None) -> None:
        code, document = result
        self.assertEqual(code, status, document)
        self.assertEqual(set(document), {"error"})
        self.assertEqual(set(document["error"]), {"code", "message"})
        self.assertIsInstance(document["error"]["code"], str)
        if field_or_text is not None:
            self.assertIn(field_or_text, document["error"]["message"])
        self.assertEqual(self.last_headers.getRawHeaders("Content-Type"), ["application/json"])


class AuthTokenTests(APITestCase):
    @inlineCallbacks
    def test_missing_token(self) -> Any:
        """Without Authorization every endpoint, known or not, answers 401 JSON."""
        for path in ("/api/v1/users", "/api/v1/settings", "/api/v1/openapi.json", "/nowhere"):
            self.assertError((yield self.call("GET", path, token=None)), 401)
        self.assertIn("Bearer", self.last_headers.getRawHeaders("WWW-Authenticate")[0])

    @inlineCallbacks
    def test_wrong_token(self) -> Any:
        """A wrong token, or the right one under another scheme, answers 401."""
        self.assertError((yield self.call("GET", "/api/v1/users", token="nope")), 401)
        self.assertError((yield self.call("GET", "/api/v1/users", token=TOKEN + "x")), 401)
        response = yield self.http.get(self.base + "/api/v1/users", headers={"Authorization": [f"Basic {TOKEN}"]})
        self.assertEqual(response.code, 401)
        yield response.content()

    @inlineCallbacks
    def test_unknown_path_and_method(self) -> Any:
        """With the token, an unknown path is 404 JSON and a wrong method 405 JSON."""
        self.assertError((yield self.call("GET", "/api/v1/nothing")), 404)
        self.assertError((yield self.call("PUT", "/api/v1/users", body={})), 405)

    @inlineCallbacks
    def test_settings(self) -> Any:
        """Settings return the injected settings document."""
        self.assertEqual((yield self.call("GET", "/api/v1/settings")), (200, SETTINGS))
        self.assertEqual(self.last_headers.getRawHeaders("Content-Type"), ["application/json"])


class UserTests(APITestCase):
    @inlineCallbacks
    def test_create_generated(self) -> Any:
        """POST with no username generates one and returns the user with a one-time password."""
        code, user = yield self.call("POST", "/api/v1/users", body={"authorized_domains": "Example.COM; b.example"})
        self.assertEqual(code, 201)
        self.assertRegex(user["username"], r"^smtp-[a-z0-9]{8}$")
        self.assertEqual(user["authorized_domains"], ["example.com", "b.example"])
        self.assertEqual(user["priority"], 3)
        self.assertEqual(user["aggregation"], "day")
        self.assertIs(user["enabled"], True)
        self.assertGreaterEqual(len(user["password"]), 22)
        self.assertRegex(user["created_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        code, fetched = yield self.call("GET", f"/api/v1/users/{user['username']}")
        self.assertEqual(code, 200)
        self.assertNotIn("password", fetched)
        self.assertNotIn("password_hash", fetched)
        self.assertEqual(fetched, {k: v for k, v in user.items() if k != "password"})

    @inlineCallbacks
    def test_create_named_and_list(self) -> Any:
        """A named user is created and listed with the others, enabled or not."""
        self.assertEqual(
            (yield self.call("POST", "/api/v1/users", body={"username": "app1", "enabled": False}))[0], 201
        )
        self.assertEqual((yield self.call("POST", "/api/v1/users", body={"username": "app2"}))[0], 201)
        code, document = yield self.call("GET", "/api/v1/users")
        self.assertEqual(code, 200)
        self.assertEqual([(u["username"], u["enabled"]) for u in document["users"]], [("app1", False), ("app2", True)])
        self.assertTrue(all("password" not in u for u in document["users"]))

    @inlineCallbacks
    def test_create_empty_body(self) -> Any:
        """A POST without any body creates a user with all defaults."""
        code, user = yield self.call("POST", "/api/v1/users", content_type=None)
        self.assertEqual(code, 201)
        self.assertTrue(USERNAME_RE.fullmatch(user["username"]))

    @inlineCallbacks
    def test_duplicate(self) -> Any:
        """Creating an existing username, in any case, is 409."""
        yield self.call("POST", "/api/v1/users", body={"username": "app1"})
        self.assertError((yield self.call("POST", "/api/v1/users", body={"username": "APP1"})), 409, "username")

    @inlineCallbacks
    def test_validation_errors(self) -> Any:
        """Each invalid field is a 400 whose message names the field."""
        cases = [
            ({"priority": 0}, "priority"),
            ({"priority": 6}, "priority"),
            ({"priority": "1"}, "priority"),
            ({"priority": True}, "priority"),
            ({"authorized_domains": ["not a domain"]}, "authorized_domains"),
            ({"authorized_domains": "ok.example;bad..example"}, "authorized_domains"),
            ({"authorized_senders": ["nobody"]}, "authorized_senders"),
            ({"username": "-bad"}, "username"),
            ({"username": "x" * 65}, "username"),
            ({"enabled": "yes"}, "enabled"),
            ({"aggregation": "hourly"}, "aggregation"),
            ({"colour": "blue"}, "colour"),
            ({"created_at": "2024-01-01T00:00:00Z"}, "created_at"),
            ({"password": "mine"}, "password"),
        ]
        for body, field in cases:
            self.assertError((yield self.call("POST", "/api/v1/users", body=body)), 400, field)
        self.assertEqual((yield self.call("GET", "/api/v1/users"))[1], {"users": []})

    @inlineCallbacks
    def test_body_errors(self) -> Any:
        """Non-JSON bodies or content types are 415, JSON non-objects 400, oversized bodies 413."""
        self.assertError((yield self.call("POST", "/api/v1/users", raw=b"username=x")), 415)
        self.assertError((yield self.call("POST", "/api/v1/users", raw=b"{bad json")), 415)
        self.assertError((yield self.call("POST", "/api/v1/users", raw=b"\xff\xfe")), 415)
        self.assertError((yield self.call("POST", "/api/v1/users", raw=b"NaN")), 415)
        self.assertError((yield self.call("POST", "/api/v1/users", body={}, content_type="text/plain")), 415)
        self.assertError((yield self.call("POST", "/api/v1/users", body=[1, 2])), 400)
        self.assertError((yield self.call("POST", "/api/v1/users", body="x")), 400)
        big = {"notes": "x" * (MAX_BODY + 10)}
        self.assertError((yield self.call("POST", "/api/v1/users", body=big)), 413)
        code, _ = yield self.call(
            "POST", "/api/v1/users", body={"username": "u1"}, content_type="application/json; charset=utf-8"
        )
        self.assertEqual(code, 201)

    @inlineCallbacks
    def test_patch(self) -> Any:
        """PATCH changes the given fields only and returns the user; errors name the field."""
        yield self.call("POST", "/api/v1/users", body={"username": "app1", "notes": "keep"})
        code, user = yield self.call(
            "PATCH", "/api/v1/users/app1", body={"priority": 1, "enabled": False, "authorized_senders": "a@Example.com"}
        )
        self.assertEqual(code, 200)
        self.assertEqual(
            (user["priority"], user["enabled"], user["notes"], user["authorized_senders"]),
            (1, False, "keep", ["a@example.com"]),
        )
        self.assertError((yield self.call("PATCH", "/api/v1/users/app1", body={"priority": 9})), 400, "priority")
        self.assertError((yield self.call("PATCH", "/api/v1/users/app1", body={"username": "other"})), 400, "username")
        self.assertError((yield self.call("PATCH", "/api/v1/users/app1", body={"updated_at": "x"})), 400, "updated_at")
        self.assertError((yield self.call("PATCH", "/api/v1/users/nobody", body={"priority": 2})), 404)
        self.assertError((yield self.call("PATCH", "/api/v1/users/app1", raw=b"nope")), 415)
        self.assertEqual((yield self.call("GET", "/api/v1/users/app1"))[1]["priority"], 1)

    @inlineCallbacks
    def test_patch_body_required(self) -> Any:
        """PATCH without a body is 400 (the document requires one); an empty object changes nothing."""
        yield self.call("POST", "/api/v1/users", body={"username": "app1", "notes": "keep"})
        self.assertError((yield self.call("PATCH", "/api/v1/users/app1", content_type=None)), 400, "body")
        code, user = yield self.call("PATCH", "/api/v1/users/app1", body={})
        self.assertEqual((code, user["notes"]), (200, "keep"))

    @inlineCallbacks
    def test_patch_never_takes_username(self) -> Any:
        """The path names the user: a username in a PATCH body is refused even when it repeats the current one."""
        yield self.call("POST", "/api/v1/users", body={"username": "app1"})
        for name in ("app1", "APP1"):
            self.assertError(
                (yield self.call("PATCH", "/api/v1/users/app1", body={"username": name, "notes": "x"})), 400, "username"
            )
        self.assertEqual((yield self.call("GET", "/api/v1/users/app1"))[1]["notes"], "")

    @inlineCallbacks
    def test_delete(self) -> Any:
        """DELETE answers 204 with an empty body; the user is then 404."""
        yield self.call("POST", "/api/v1/users", body={"username": "app1"})
        response = yield self.http.delete(
            self.base + "/api/v1/users/app1", headers={"Authorization": [f"Bearer {TOKEN}"]}
        )
        self.assertEqual(response.code, 204)
        self.assertEqual((yield response.content()), b"")
        self.assertError((yield self.call("GET", "/api/v1/users/app1")), 404)
        self.assertError((yield self.call("DELETE", "/api/v1/users/app1")), 404)

    @inlineCallbacks
    def test_regenerate(self) -> Any:
        """Regenerating returns a new password once and replaces the stored hash."""
        _, user = yield self.call("POST", "/api/v1/users", body={"username": "app1"})
        before = yield self.store.login_record("app1")
        code, document = yield self.call("POST", "/api/v1/users/App1/password")
        self.assertEqual(code, 200)
        self.assertEqual(set(document), {"username", "password"})
        self.assertEqual(document["username"], "app1")
        self.assertNotEqual(document["password"], user["password"])
        after = yield self.store.login_record("app1")
        self.assertNotEqual(after.password_hash, before.password_hash)
        self.assertTrue((yield self.hasher.verify(document["password"], after.password_hash)))
        self.assertFalse((yield self.hasher.verify(user["password"], after.password_hash)))
        self.assertError((yield self.call("POST", "/api/v1/users/nobody/password")), 404)

    @inlineCallbacks
    def test_usernames_with_symbols(self) -> Any:
        """Usernames with @ + . work in paths."""
        yield self.call("POST", "/api/v1/users", body={"username": "app+1@example.com"})
        code, user = yield self.call("GET", "/api/v1/users/app%2B1%40example.com")
        self.assertEqual((code, user["username"]), (200, "app+1@example.com"))


class EmptyReadModelTests(APITestCase):
    @inlineCallbacks
    def test_empty(self) -> Any:
        """Without read models the listings are empty, not errors."""
        self.assertEqual((yield self.call("GET", "/api/v1/messages")), (200, {"messages": [], "next_cursor": None}))
        self.assertEqual(
            (yield self.call("GET", "/api/v1/notifications")), (200, {"notifications": [], "next_cursor": None})
        )
        self.assertEqual((yield self.call("GET", "/api/v1/stats")), (200, {"policy": "day", "groups": []}))
        self.assertEqual(
            (yield self.call("GET", "/api/v1/stats?policy=month")), (200, {"policy": "month", "groups": []})
        )
        self.assertError((yield self.call("GET", "/api/v1/messages/XYZ")), 404)

    @inlineCallbacks
    def test_query_validation(self) -> Any:
        """Bad status, type, policy and limit values are 400 naming the parameter."""
        for path, name in [
            ("/api/v1/messages?status=lost", "status"),
            ("/api/v1/messages?limit=0", "limit"),
            ("/api/v1/messages?limit=abc", "limit"),
            ("/api/v1/messages?limit=100000", "limit"),
            ("/api/v1/notifications?type=spam", "type"),
            ("/api/v1/notifications?limit=-1", "limit"),
            ("/api/v1/stats?policy=hour", "policy"),
        ]:
            self.assertError((yield self.call("GET", path)), 400, name)


class ReadModelTests(APITestCase):
    queries = None

    def setUp(self) -> None:
        self.fake = FakeQueries()
        self.start_server(self, self.fake)

    @inlineCallbacks
    def test_pass_through(self) -> Any:
        """Filters reach the read models and their results are served."""
        code, document = yield self.call("GET", "/api/v1/messages?user=alice&status=sent&limit=5")
        self.assertEqual((code, document), (200, {"messages": [self.fake.message], "next_cursor": "a1"}))
        self.assertEqual((yield self.call("GET", "/api/v1/messages/M1")), (200, self.fake.message))
        self.assertError((yield self.call("GET", "/api/v1/messages/M2")), 404)
        code, document = yield self.call("GET", "/api/v1/notifications?type=bounce&user=bob")
        self.assertEqual(document, {"notifications": [{"id": 1, "type": "bounce"}], "next_cursor": None})
        code, document = yield self.call("GET", "/api/v1/stats?user=alice")
        self.assertEqual(document["policy"], "week")
        self.assertEqual(
            self.fake.calls,
            [
                ("messages", {"user": "alice", "status": "sent"}, 5, None),
                ("events", "bounce", "bob", 100, None),
                ("stats", "alice", None),
            ],
        )


class OpenAPITests(APITestCase):
    @inlineCallbacks
    def test_document_covers_routes(self) -> Any:
        """The served OpenAPI document describes every route the app serves, with its methods."""
        code, document = yield self.call("GET", "/api/v1/openapi.json")
        self.assertEqual(code, 200)
        self.assertTrue(document["openapi"].startswith("3."))
        served = set()
        for rule in AdminAPI.app.url_map.iter_rules():
            path = str(rule.rule).replace("<username>", "{username}").replace("<message_id>", "{id}").replace("<address>", "{address}").replace("<domain>", "{domain}")
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                served.add((path, method.lower()))
        documented = {(p, m) for p, ops in document["paths"].items() for m in ops if m != "parameters"}
        self.assertEqual(served, documented)
        for name in ("User", "Message", "Event", "Stats", "Error", "Settings"):
            self.assertIn(name, document["components"]["schemas"])


# Values at the edges of what the user lists admit, each either side of the line.
# (A domain written in Unicode is accepted beyond the document's ASCII
# patterns and stored as its A-labels: see test_unicode_domain_stored_as_a_labels.)
LIST_SAMPLES = {
    "authorized_domains": [
        "example.com", " Example.COM. ", "ab--cd.example", "xn--bcher-kva.example", "a" * 63 + ".test", "localhost",
        "a;b", "-a.example", "a-.example", "a..b", "a" * 64 + ".test", "a_b.example", "[1.2.3.4]",
        "a.example\n", "\u00a0a.example", "",
    ],
    "authorized_senders": [
        "x@example.com", "\t First.Last+tag@Example.COM ", '"a b"@example.com', '"a\\"b"@example.com', "a@b",
        '"a;b"@example.com', "a b@example.com", "a@", "@example.com", "a@[1.2.3.4]", "jörg@example.com",
        "a..b@example.com", ".a@example.com", "a@example.com\n", "",
    ],
}


class SchemaAgreementTests(APITestCase):
    """The served document and the API agree on every sample: admitted values are accepted, the others refused."""

    @inlineCallbacks
    def test_lists_agree(self) -> Any:
        """
        For each list value (alone, in a list, and as the ";"-separated
        string), the document's UserPatch schema, checked by an ECMA-262
        JSON Schema validator, admits it exactly when the API accepts it.
        """
        yield self.call("POST", "/api/v1/users", body={"username": "app1"})
        code, document = yield self.call("GET", "/api/v1/openapi.json")
        validator = jsonschema_rs.Draft4Validator(document["components"]["schemas"]["UserPatch"])
        disagreements = []
        outcomes = set()
        for field, samples in LIST_SAMPLES.items():
            for value in [*([sample] for sample in samples), *samples, ";".join(samples[:3])]:
                body = {field: value}
                admitted = validator.is_valid(body)
                code, answer = yield self.call("PATCH", "/api/v1/users/app1", body=body)
                outcomes.add(code)
                if (code == 200) != admitted or code not in (200, 400):
                    disagreements.append((body, admitted, code, answer))
        self.assertEqual(disagreements, [])
        self.assertEqual(outcomes, {200, 400})

    @inlineCallbacks
    def test_unicode_domain_stored_as_a_labels(self) -> Any:
        """A domain typed in Unicode is accepted and shown as its IDNA A-labels."""
        yield self.call("POST", "/api/v1/users", body={"username": "app1"})
        code, user = yield self.call("PATCH", "/api/v1/users/app1", body={"authorized_domains": ["Bücher.Example"]})
        self.assertEqual((code, user["authorized_domains"]), (200, ["xn--bcher-kva.example"]))


class UnexpectedErrorTests(APITestCase):
    @inlineCallbacks
    def test_internal_error(self) -> Any:
        """An unexpected exception answers 500 with the JSON error and no traceback, and is logged."""

        def broken() -> Any:
            raise RuntimeError("secret internals")

        self.patch(self.store, "list", broken)
        code, document = yield self.call("GET", "/api/v1/users")
        self.assertError((code, document), 500)
        self.assertNotIn("secret internals", json.dumps(document))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
