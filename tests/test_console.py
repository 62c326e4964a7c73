"""
The web console's sessions and HTTP side (contract section 7): the session
table on a Clock, and sign-in, cookies, CSRF and security headers over a
real socket with treq, plain and over TLS.  The browser tests are in
C{test_console_browser}.
"""

from __future__ import annotations

import json
import os
import re
from http.cookies import SimpleCookie
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.ssl import Certificate
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import BrowserLikePolicyForHTTPS

from smtpplus.admin.api import AdminAPI
from smtpplus.admin.console import SECURITY_HEADERS, static_files
from smtpplus.admin.service import admin_service, admin_site
from smtpplus.admin.sessions import ABSOLUTE_SECONDS, COOKIE, IDLE_SECONDS, Admission, ConsoleSessions
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.config import AdminConfig, TLSConfig
from smtpplus.smtp.tls import server_context
from tests.harness.stores import make_sqlite_store
from tests.harness.web import http_client, serve

TOKEN = "console-test-token"


class FakeRequest:
    """What the session table reads of a request: its method, one cookie and one header."""

    def __init__(self, cookie: str | None, method: bytes = b"GET", csrf: str | None = None) -> None:
        self.method = method
        self._cookie = None if cookie is None else cookie.encode("ascii")
        self._csrf = None if csrf is None else csrf.encode("ascii")

    def getCookie(self, name: bytes) -> bytes | None:
        return self._cookie if name == COOKIE else None

    def getHeader(self, name: bytes) -> bytes | None:
        return self._csrf if name.lower() == b"x-csrf-token" else None


class SessionTests(TestCase):
    """The session table: lifetimes, CSRF, bounds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sessions = ConsoleSessions(self.clock, limit=3)

    def test_fresh_random_ids(self) -> None:
        """Each sign-in gets its own random session id and CSRF token, found again by its id."""
        first, second = self.sessions.open(), self.sessions.open()
        self.assertEqual(len({first.id, first.csrf, second.id, second.csrf}), 4)
        self.assertGreaterEqual(len(first.id), 40)
        self.assertIs(self.sessions.find(first.id), first)
        self.assertIsNone(self.sessions.find("made-up"))

    def test_idle_expiry(self) -> None:
        """A session unused for the idle time is gone; each use restarts that time."""
        sessions = ConsoleSessions(self.clock, idle=100, absolute=1000)
        session = sessions.open()
        self.clock.advance(99)
        self.assertIsNotNone(sessions.find(session.id))
        self.clock.advance(99)
        self.assertIsNotNone(sessions.find(session.id))
        self.clock.advance(100)
        self.assertIsNone(sessions.find(session.id))

    def test_default_lifetimes(self) -> None:
        """By default a session ends after 8 hours unused or 12 hours after sign-in."""
        self.assertEqual((IDLE_SECONDS, ABSOLUTE_SECONDS), (8 * 3600, 12 * 3600))
        session = self.sessions.open()
        self.clock.advance(IDLE_SECONDS)
        self.assertIsNone(self.sessions.find(session.id))

    def test_absolute_expiry(self) -> None:
        """A session in constant use still ends at the absolute lifetime after sign-in."""
        session = self.sessions.open()
        while self.clock.seconds() < ABSOLUTE_SECONDS - 3600:
            self.clock.advance(3600)
            self.assertIsNotNone(self.sessions.find(session.id))
        self.clock.advance(3600)
        self.assertIsNone(self.sessions.find(session.id))
        self.assertEqual(self.sessions.lifetime, ABSOLUTE_SECONDS)

    def test_close(self) -> None:
        """Sign-out ends the session; closing an unknown one is harmless."""
        session = self.sessions.open()
        self.sessions.close(session.id)
        self.sessions.close(session.id)
        self.assertIsNone(self.sessions.find(session.id))

    def test_bounded(self) -> None:
        """Beyond the limit, a new sign-in ends the least recently used session."""
        a, b, c = (self.sessions.open() for _ in range(3))
        self.sessions.find(a.id)
        d = self.sessions.open()
        self.assertIsNone(self.sessions.find(b.id))
        self.assertEqual([s is not None for s in map(self.sessions.find, (a.id, c.id, d.id))], [True] * 3)

    def test_admission(self) -> None:
        """
        GET and HEAD need the cookie alone; any other method also needs the
        session's CSRF token; no, unknown or expired cookies admit nothing.
        """
        session = self.sessions.open()
        admit = self.sessions.admit
        self.assertIs(admit(FakeRequest(session.id)), Admission.ADMITTED)
        self.assertIs(admit(FakeRequest(session.id, b"HEAD")), Admission.ADMITTED)
        for method in (b"POST", b"PATCH", b"DELETE", b"PUT"):
            self.assertIs(admit(FakeRequest(session.id, method)), Admission.NO_CSRF)
            self.assertIs(admit(FakeRequest(session.id, method, "wrong")), Admission.NO_CSRF)
            self.assertIs(admit(FakeRequest(session.id, method, session.csrf)), Admission.ADMITTED)
        self.assertIs(admit(FakeRequest(None)), Admission.NONE)
        self.assertIs(admit(FakeRequest("unknown", b"POST", session.csrf)), Admission.NONE)
        self.clock.advance(IDLE_SECONDS)
        self.assertIs(admit(FakeRequest(session.id)), Admission.NONE)


class StaticFileTests(TestCase):
    """The console's files as the package ships them."""

    def test_files(self) -> None:
        """The page, its script, style sheet and icon are there, with their content types."""
        found = static_files()
        self.assertEqual(found[b"/"], found[b"/console/index.html"])
        kinds = {path: kind.split(b";")[0] for path, (kind, _) in found.items()}
        self.assertEqual(kinds[b"/console/console.js"], b"text/javascript")
        self.assertEqual(kinds[b"/console/console.css"], b"text/css")
        self.assertEqual(kinds[b"/console/icon.svg"], b"image/svg+xml")

    def test_no_inline_code_or_outside_origin(self) -> None:
        """
        The page has no inline script, style or event handler (the CSP would
        block them) and names no other origin: every asset is in the package.
        """
        page = static_files()[b"/"][1].decode("utf-8")
        scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", page, re.S)
        self.assertEqual(
            [(re.search(r'src="([^"]+)"', attrs)[1], body) for attrs, body in scripts], [("/console/console.js", "")]
        )
        self.assertNotRegex(page, r"<style|\sstyle=|\son[a-z]+=")
        for path, (_, body) in static_files().items():
            self.assertNotRegex(
                body.decode("utf-8"), r"(?<![\w.])(https?:)?//(?!www\.w3\.org/2000/svg)[\w.-]+\.\w", path
            )

    def test_script_writes_no_html(self) -> None:
        """The script builds the page with text nodes only: no innerHTML, outerHTML, insertAdjacentHTML or eval."""
        script = static_files()[b"/console/console.js"][1].decode("utf-8")
        self.assertNotRegex(script, r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function")


class ConsoleHTTP:
    """A console and API on 127.0.0.1 port 0, talked to with treq; cookies handled by hand."""

    def start(self, case: TestCase, clock: Any = reactor) -> None:
        self.sessions = ConsoleSessions(clock)
        api = AdminAPI(
            TOKEN,
            make_sqlite_store(case),
            PasswordHasher(None, rounds=4),
            lambda: {"hostname": "x"},
            sessions=self.sessions,
        )
        self.base = serve(case, admin_site(api))
        self.http = http_client(case)

    @inlineCallbacks
    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        cookie: str | None = None,
        csrf: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """(status, headers, body bytes)."""
        sent = {name: [value] for name, value in (headers or {}).items()}
        if cookie is not None:
            sent["Cookie"] = [f"{COOKIE.decode()}={cookie}"]
        if csrf is not None:
            sent["X-CSRF-Token"] = [csrf]
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", ["application/json"])
        response = yield self.http.request(method, self.base + path, headers=sent, data=data)
        content = yield response.content()
        return response.code, response.headers, content

    @inlineCallbacks
    def sign_in(self) -> Any:
        """Sign in with the right token: (cookie value, CSRF token, the Set-Cookie header)."""
        code, headers, content = yield self.call("POST", "/console/session", {"token": TOKEN})
        assert code == 201, (code, content)
        (set_cookie,) = headers.getRawHeaders("Set-Cookie")
        cookie = SimpleCookie(set_cookie)[COOKIE.decode()].value
        return cookie, json.loads(content)["csrf_token"], set_cookie


class ConsoleHTTPTests(ConsoleHTTP, TestCase):
    """Sign-in, session cookie, CSRF and headers over a real socket."""

    def setUp(self) -> None:
        self.start(self)

    @inlineCallbacks
    def test_page_and_headers(self) -> Any:
        """
        GET / serves the page without a token, and every response of the
        port, the API's and errors included, carries the security headers.
        """
        code, headers, content = yield self.call("GET", "/")
        self.assertEqual(code, 200)
        self.assertIn(b"<title>SMTP+ console</title>", content)
        self.assertEqual(headers.getRawHeaders("Content-Type"), ["text/html; charset=utf-8"])
        responses = [(code, headers)]
        for path in ("/console/console.js", "/api/v1/users", "/nowhere", "/console/session"):
            code, headers, _ = yield self.call("GET", path)
            responses.append((code, headers))
        self.assertEqual([code for code, _ in responses], [200, 200, 401, 401, 401])
        for _, headers in responses:
            for name, value in SECURITY_HEADERS.items():
                self.assertEqual(headers.getRawHeaders(name), [value], name)
        csp = SECURITY_HEADERS[b"Content-Security-Policy"].decode()
        self.assertIn("script-src 'self';", csp)
        self.assertIn("frame-ancestors 'none'", csp)
        self.assertNotIn("unsafe", csp)

    @inlineCallbacks
    def test_files_read_only(self) -> Any:
        """The console's files answer only GET and HEAD; other methods get 405 JSON."""
        code, headers, content = yield self.call("POST", "/console/console.js", {})
        self.assertEqual((code, json.loads(content)["error"]["code"]), (405, "method_not_allowed"))
        self.assertEqual(headers.getRawHeaders("Allow"), ["GET, HEAD"])

    @inlineCallbacks
    def test_sign_in_cookie(self) -> Any:
        """
        The right token sets an HttpOnly, SameSite=Strict cookie for the
        whole port (not Secure over plain HTTP) and answers the CSRF token.
        """
        cookie, csrf, set_cookie = yield self.sign_in()
        self.assertIsNotNone(self.sessions.find(cookie))
        self.assertEqual(self.sessions.find(cookie).csrf, csrf)
        attributes = [part.strip().lower() for part in set_cookie.split(";")[1:]]
        self.assertEqual(
            sorted(attributes), sorted(["path=/", f"max-age={ABSOLUTE_SECONDS}", "httponly", "samesite=strict"])
        )
        self.assertNotIn(TOKEN, set_cookie)
        code, _, content = yield self.call("GET", "/console/session", cookie=cookie)
        self.assertEqual((code, json.loads(content)), (200, {"csrf_token": csrf}))

    @inlineCallbacks
    def test_wrong_sign_in(self) -> Any:
        """A wrong token, a malformed body or a form post signs nobody in, and sets no cookie."""
        cases = [
            ({"token": "nope"}, None, 401),
            ({"token": TOKEN + "x"}, None, 401),
            ({"tok": TOKEN}, None, 400),
            ({"token": 5}, None, 400),
            ([TOKEN], None, 400),
        ]
        for body, headers, status in cases:
            code, response_headers, content = yield self.call("POST", "/console/session", body, headers=headers)
            self.assertEqual(code, status, (body, content))
            self.assertIsNone(response_headers.getRawHeaders("Set-Cookie"))
        response = yield self.http.post(
            self.base + "/console/session",
            data={"token": TOKEN},
            headers={"Content-Type": ["application/x-www-form-urlencoded"]},
        )
        self.assertEqual(response.code, 415)
        self.assertIsNone(response.headers.getRawHeaders("Set-Cookie"))
        yield response.content()

    @inlineCallbacks
    def test_api_with_session(self) -> Any:
        """
        The cookie admits the API's reads; a write needs the CSRF token too
        (403 without or with a wrong one, and nothing changes); bearer-token
        clients go on as before.
        """
        cookie, csrf, _ = yield self.sign_in()
        code, _, content = yield self.call("GET", "/api/v1/users", cookie=cookie)
        self.assertEqual((code, json.loads(content)), (200, {"users": []}))
        for presented in (None, "wrong", ""):
            code, _, content = yield self.call(
                "POST", "/api/v1/users", {"username": "u1"}, cookie=cookie, csrf=presented
            )
            self.assertEqual((code, json.loads(content)["error"]["code"]), (403, "csrf_failed"))
        code, _, content = yield self.call("GET", "/api/v1/users", cookie=cookie)
        self.assertEqual(json.loads(content), {"users": []})
        code, _, content = yield self.call("POST", "/api/v1/users", {"username": "u1"}, cookie=cookie, csrf=csrf)
        self.assertEqual((code, json.loads(content)["username"]), (201, "u1"))
        code, _, _ = yield self.call("GET", "/api/v1/users/u1", headers={"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(code, 200)
        code, _, _ = yield self.call("GET", "/api/v1/users/u1", cookie="forged")
        self.assertEqual(code, 401)

    @inlineCallbacks
    def test_sign_out(self) -> Any:
        """Sign-out needs the CSRF token, ends the session server-side and clears the cookie."""
        cookie, csrf, _ = yield self.sign_in()
        code, _, _ = yield self.call("DELETE", "/console/session", cookie=cookie)
        self.assertEqual(code, 403)
        self.assertIsNotNone(self.sessions.find(cookie))
        code, headers, _ = yield self.call("DELETE", "/console/session", cookie=cookie, csrf=csrf)
        self.assertEqual(code, 204)
        (cleared,) = headers.getRawHeaders("Set-Cookie")
        self.assertIn(f"{COOKIE.decode()}=;", cleared)
        self.assertIn("Max-Age=0", cleared)
        code, _, _ = yield self.call("GET", "/api/v1/users", cookie=cookie)
        self.assertEqual(code, 401)
        code, _, _ = yield self.call("GET", "/console/session", cookie=cookie)
        self.assertEqual(code, 401)


class ExpiryHTTPTests(ConsoleHTTP, TestCase):
    @inlineCallbacks
    def test_expired_session_refused(self) -> Any:
        """After the idle time the cookie admits nothing: the API answers 401."""
        clock = Clock()
        self.start(self, clock)
        cookie, _, _ = yield self.sign_in()
        code, _, _ = yield self.call("GET", "/api/v1/users", cookie=cookie)
        self.assertEqual(code, 200)
        clock.advance(IDLE_SECONDS)
        code, _, _ = yield self.call("GET", "/api/v1/users", cookie=cookie)
        self.assertEqual(code, 401)


class TLSCookieTests(TestCase):
    @inlineCallbacks
    def test_secure_cookie_over_tls(self) -> Any:
        """With [admin] tls = true the session cookie is also marked Secure."""
        state_dir = self.mktemp()
        options = server_context(TLSConfig("", ""), "localhost", state_dir)
        api = AdminAPI(
            TOKEN, make_sqlite_store(self), PasswordHasher(None, rounds=4), dict, sessions=ConsoleSessions(reactor)
        )
        service = admin_service(reactor, AdminConfig("127.0.0.1", 0, TOKEN, True), api, options)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        with open(os.path.join(state_dir, "tls", "cert.pem"), "rb") as f:
            authority = Certificate.loadPEM(f.read())
        client = http_client(self, BrowserLikePolicyForHTTPS(authority))
        response = yield client.post(
            f"https://localhost:{service.port.getHost().port}/console/session",
            data=json.dumps({"token": TOKEN}).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        yield response.content()
        self.assertEqual(response.code, 201)
        (set_cookie,) = response.headers.getRawHeaders("Set-Cookie")
        attributes = {part.strip().lower() for part in set_cookie.split(";")[1:]}
        self.assertTrue({"secure", "httponly", "samesite=strict"} <= attributes, set_cookie)
