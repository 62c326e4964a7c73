"""
The web console (contract section 7): a static page and its script, served
on the admin port in front of the REST API, which does all the work —
the page calls the same JSON endpoints that C{smtpplusctl} does, signed in
with a session cookie instead of the bearer token.

  - C{GET /}: the page; C{GET /console/NAME}: its script, style sheet, icon
    (read from the package once, at start);
  - C{GET /console/session}: the CSRF token of the cookie's session (a
    reloaded page asks for it again: it is kept in no page storage);
  - C{POST /console/session} with C{{"token": ...}}: sign in, sets the cookie;
  - C{DELETE /console/session}: sign out (needs the CSRF token).

Every response of the admin port, the API's included, carries the
security headers of L{SECURITY_HEADERS}.
"""

from __future__ import annotations

import json
from importlib.resources import files

from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from smtpplus.admin.api import AdminAPI, error_body, json_body
from smtpplus.admin.sessions import COOKIE, Admission, ConsoleSessions

log = Logger()

SECURITY_HEADERS = {
    b"Content-Security-Policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
    b"Cross-Origin-Opener-Policy": b"same-origin",
}

_TYPES = {
    "html": b"text/html; charset=utf-8",
    "js": b"text/javascript; charset=utf-8",
    "css": b"text/css; charset=utf-8",
    "svg": b"image/svg+xml",
}
_SESSION_PATH = b"/console/session"
_MAX_SIGN_IN = 4096


def static_files() -> dict[bytes, tuple[bytes, bytes]]:
    """The console's files, path to (content type, bytes): C{/} and C{/console/NAME}."""
    folder = files("smtpplus.admin") / "static"
    found = {}
    for entry in folder.iterdir():
        kind = _TYPES.get(entry.name.rpartition(".")[2])
        if kind is not None:
            found[b"/console/" + entry.name.encode("ascii")] = (kind, entry.read_bytes())
    found[b"/"] = found[b"/console/index.html"]
    return found


class ConsoleResource(Resource):
    """
    The admin port's root: the console's own paths, and every other request
    handed to the API's resource.

    @param secure: the port speaks TLS, so the cookie is marked C{Secure}.
    """

    isLeaf = True

    def __init__(self, api: AdminAPI, sessions: ConsoleSessions, secure: bool) -> None:
        super().__init__()
        self._api = api
        self._routes: IResource = api.resource()
        self._sessions = sessions
        self._secure = secure
        self._files = static_files()

    def render(self, request: IRequest) -> bytes | int:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        path = request.path
        if path == _SESSION_PATH:
            return self._session(request)
        page = self._files.get(path)
        if page is None:
            return self._routes.render(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return error_body(request, 405, "method_not_allowed", "the console's files are read-only")
        kind, body = page
        request.setHeader(b"Content-Type", kind)
        return body

    def _session(self, request: IRequest) -> bytes:
        method = request.method
        if method == b"POST":
            return self._sign_in(request)
        if method in (b"GET", b"HEAD"):
            session = self._sessions.of_request(request)
            if session is None:
                return error_body(request, 401, "unauthorized", "not signed in")
            return json_body(request, 200, {"csrf_token": session.csrf})
        if method == b"DELETE":
            admission = self._sessions.admit(request)
            if admission is Admission.NO_CSRF:
                return error_body(request, 403, "csrf_failed", "missing or wrong X-CSRF-Token header")
            session = self._sessions.of_request(request)
            if session is not None:
                self._sessions.close(session.id)
                log.info("Console session signed out")
            self._set_cookie(request, "", 0)
            request.setResponseCode(204)
            return b""
        request.setHeader(b"Allow", b"GET, POST, DELETE")
        return error_body(request, 405, "method_not_allowed", f"method {method.decode()} not allowed here")

    def _sign_in(self, request: IRequest) -> bytes:
        # JSON only: a cross-site form cannot send it without a CORS preflight,
        # so no other site can sign a browser in to its own session.
        content_type = (request.getHeader(b"Content-Type") or b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
            return error_body(request, 415, "unsupported_media_type", "the request body must be JSON")
        raw = request.content.read(_MAX_SIGN_IN + 1) if request.content is not None else b""
        try:
            token = json.loads(raw)["token"]
            presented = token.encode("utf-8")
        except (ValueError, TypeError, KeyError, AttributeError):
            return error_body(request, 400, "validation_error", 'the body must be {"token": "<admin token>"}')
        if len(raw) > _MAX_SIGN_IN or not self._api.token_matches(presented):
            log.warn("Console sign-in refused: wrong admin token from {peer}", peer=request.getClientAddress().host)
            return error_body(request, 401, "unauthorized", "wrong admin token")
        session = self._sessions.open()
        self._set_cookie(request, session.id, int(self._sessions.lifetime))
        log.info("Console session signed in from {peer}", peer=request.getClientAddress().host)
        return json_body(request, 201, {"csrf_token": session.csrf})

    def _set_cookie(self, request: IRequest, value: str, max_age: int) -> None:
        request.addCookie(
            COOKIE,
            value.encode("ascii"),
            max_age=str(max_age).encode("ascii"),
            path=b"/",
            secure=self._secure,
            httpOnly=True,
            sameSite="strict",
        )
