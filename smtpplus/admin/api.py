"""
The REST admin API (contract section 4): Klein routes over the user store
and the read models of delivery and notifications, and the operations
endpoints of section 6 (C{/health}, C{/metrics}).

Every request but C{/health} carries C{Authorization: Bearer <token>},
compared in constant time; every response, errors included, is JSON, but
the Prometheus text of C{/metrics}.
"""

from __future__ import annotations

import functools
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from enum import StrEnum
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import parse_qs
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from smtpplus.address import normalize_domain
from smtpplus.admin.openapi import MAX_DEPTH, MAX_LIMIT, openapi_document
from smtpplus.admin.sessions import Admission, ConsoleSessions
from smtpplus.auth.hashing import PasswordHasher
from smtpplus.auth.store import DuplicateUser
from smtpplus.auth.users import ValidationError, generate_password, generate_username, new_user, validate_fields
from smtpplus.interfaces import (
    DKIMKeyConflict,
    IDKIMKeys,
    IEventQuery,
    IMessageQuery,
    INodeList,
    IPolicyCheck,
    IStatsQuery,
    ISuppressionList,
    IUserStore,
    QueueConflict,
)
from smtpplus.metrics import HealthCheck, Metrics
from smtpplus.model import (
    ADDRESS_PATTERN,
    DKIM_ALGORITHMS,
    DKIM_DEFAULT_ALGORITHM,
    DKIM_DEFAULT_SELECTOR,
    DKIM_SELECTOR_RE,
    Aggregation,
    EventType,
    MessageStatus,
    User,
)
from smtpplus.paging import InvalidValue, decode_cursor, parse_time
from smtpplus.storage.database import StorageUnavailable

log = Logger()

MAX_BODY = 64 * 1024
# A dry-run is one transaction; [smtp] max_recipients is at most this in practice.
MAX_CHECK_RECIPIENTS = 1000
DEFAULT_LIMIT = 100
_USERNAME_ATTEMPTS = 5


class HTTPError(Exception):
    """Answer the request with this status and the contract's JSON error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message


class CappedRequest(Request):
    """
    A request that keeps at most L{MAX_BODY} bytes of its body, so that a
    client cannot make the server buffer an unbounded upload; the API then
    answers 413.
    """

    body_size = 0

    def handleContentChunk(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.body_size <= MAX_BODY:
            Request.handleContentChunk(self, data)


def json_body(request: Any, status: int, document: Any) -> bytes:
    """Set the status and JSON content type; return the encoded C{document}."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(document).encode("utf-8") + b"\n"


def error_body(request: Any, status: int, code: str, message: str) -> bytes:
    return json_body(request, status, {"error": {"code": code, "message": message}})


Handler = Callable[..., Awaitable[bytes]]


def authenticated(handler: Handler) -> Handler:
    """Refuse the request with 401 unless it carries the right bearer token."""

    @functools.wraps(handler)
    async def check(self: AdminAPI, request: Any, *args: Any, **kwargs: Any) -> bytes:
        self._check_token(request)
        return await handler(self, request, *args, **kwargs)

    return check


def _text(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, "validation_error", f"{name}: is not UTF-8") from None


class AdminAPI:
    """
    The admin API.  Serve C{AdminAPI(...).resource()} from a L{Site}
    with C{requestFactory=CappedRequest}.

    @param settings: returns the C{/settings} document (the listening ports
        are known only after start-up).
    @param messages: the message read model, or None before delivery exists.
    @param events: the notification read model, or None.
    @param stats: the statistics read model, or None.
    @param metrics: what C{/metrics} shows, or None (an empty exposition).
    @param health: what C{/health} asks, or None (always healthy).
    @param policy: the policy dry-run of C{/users/{u}/check}, or None (404).
    @param dkim: the DKIM keys of C{/dkim}, or None (404).
    @param nodes: the nodes of C{/nodes}, or None (an empty list).
    @param sessions: the web console's sessions, whose cookie (with the CSRF
        token on a request that changes state) the API accepts instead of
        the bearer token; None: bearer token only.
    """

    app = Klein()

    def __init__(
        self,
        token: str,
        users: IUserStore,
        hasher: PasswordHasher,
        settings: Callable[[], dict[str, Any]],
        messages: IMessageQuery | None = None,
        events: IEventQuery | None = None,
        stats: IStatsQuery | None = None,
        metrics: Metrics | None = None,
        health: HealthCheck | None = None,
        policy: IPolicyCheck | None = None,
        dkim: IDKIMKeys | None = None,
        sessions: ConsoleSessions | None = None,
        suppressions: ISuppressionList | None = None,
        clock: IReactorTime | None = None,
        nodes: INodeList | None = None,
    ) -> None:
        if not token:
            raise ValueError("the admin token must not be empty")
        self._token = token.encode("utf-8")
        self._users = users
        self._hasher = hasher
        self._settings = settings
        self._messages = messages
        self._events = events
        self._stats = stats
        self._metrics = metrics
        self._health = health
        self._policy = policy
        self._dkim = dkim
        self.sessions = sessions
        self._suppressions = suppressions
        self._now = time.time if clock is None else clock.seconds
        self._nodes = nodes

    def resource(self) -> IResource:
        """The API as a web resource that answers every request with JSON."""
        return _UTF8URLs(self, self.app.resource())

    # authentication and errors

    def token_matches(self, presented: bytes) -> bool:
        """Whether C{presented} is the admin token, compared in constant time."""
        return hmac.compare_digest(presented.strip(), self._token)

    def _check_token(self, request: Any) -> None:
        header = request.getHeader(b"Authorization")
        if header is None and self.sessions is not None:
            admission = self.sessions.admit(request)
            if admission is Admission.ADMITTED:
                return
            if admission is Admission.NO_CSRF:
                raise HTTPError(403, "csrf_failed", "missing or wrong X-CSRF-Token header for this console session")
        scheme, _, presented = (header or b"").partition(b" ")
        # Compare even when the scheme is wrong, so timing shows nothing.
        matches = self.token_matches(presented)
        if scheme.lower() != b"bearer" or not matches:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="smtpplus"')
            raise HTTPError(401, "unauthorized", "missing or wrong bearer token")

    @app.handle_errors(HTTPError)
    def _http_error(self, request: Any, failure: Failure) -> bytes:
        error = failure.value
        return error_body(request, error.status, error.code, error.message)

    @app.handle_errors(NotFound, MethodNotAllowed)
    def _routing_error(self, request: Any, failure: Failure) -> bytes:
        # Unknown paths need the token too: they reveal nothing before it.
        try:
            self._check_token(request)
        except HTTPError as e:
            return error_body(request, e.status, e.code, e.message)
        if failure.check(MethodNotAllowed):
            allowed = ", ".join(failure.value.valid_methods or ())
            request.setHeader(b"Allow", allowed.encode("ascii"))
            return error_body(request, 405, "method_not_allowed", f"method {request.method.decode()} not allowed here")
        return error_body(request, 404, "not_found", "no such resource")

    @app.handle_errors(HTTPException)
    def _other_http(self, request: Any, failure: Failure) -> bytes:
        error = failure.value
        return error_body(request, error.code or 400, "bad_request", error.description or "bad request")

    @app.handle_errors(StorageUnavailable)
    def _store_unavailable(self, request: Any, failure: Failure) -> bytes:
        # An outage (PostgreSQL down) is logged once by the database, and
        # the store comes back by itself: a temporary answer, no traceback.
        request.setHeader(b"Retry-After", b"5")
        return error_body(
            request, 503, "store_unavailable", "the store cannot be reached; the daemon reconnects by itself, try again"
        )

    @app.handle_errors(Exception)
    def _unexpected(self, request: Any, failure: Failure) -> bytes:
        log.failure("admin API {method} {path} failed", failure, method=request.method, path=request.path)
        return error_body(request, 500, "internal_error", "internal server error")

    # request parsing

    def _read_json(self, request: Any, required: bool, stored: bool = True) -> Any:
        """
        The decoded JSON body.  No body at all (nor a Content-Type) is C{{}}
        when the body is optional, else a 400, as the document says.  Text
        that cannot be stored is a 400 unless the body is not C{stored}.
        """
        length = request.getHeader(b"Content-Length")
        size = getattr(request, "body_size", 0)
        if size > MAX_BODY or (length is not None and length.strip().isdigit() and int(length) > MAX_BODY):
            raise HTTPError(413, "payload_too_large", f"request body larger than {MAX_BODY} bytes")
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(raw) > MAX_BODY:
            raise HTTPError(413, "payload_too_large", f"request body larger than {MAX_BODY} bytes")
        content_type = (request.getHeader(b"Content-Type") or b"").split(b";")[0].strip().lower()
        if not content_type and not raw.strip():
            if required:
                raise HTTPError(400, "validation_error", "the request body is required: a JSON object")
            # "curl -X POST" with no body: all fields take their defaults.
            return {}
        if content_type != b"application/json":
            raise HTTPError(
                415, "unsupported_media_type", "the request body must be JSON (Content-Type: application/json)"
            )
        if _nesting_depth(raw) > MAX_DEPTH:
            raise HTTPError(400, "too_deep", f"the request body nests deeper than {MAX_DEPTH} levels")
        try:
            document = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise HTTPError(415, "invalid_json", f"the request body is not JSON: {e}") from None
        if stored:
            _check_storable(document, "")
        return document

    def _query(self, request: Any, name: str) -> str | None:
        values = request.args.get(name.encode("ascii"))
        if not values:
            return None
        return _text(values[0], name)

    def _choice(self, request: Any, name: str, choices: type[StrEnum]) -> str | None:
        value = self._query(request, name)
        if value is not None and value not in {choice.value for choice in choices}:
            raise HTTPError(400, "validation_error", f"{name}: must be one of {', '.join(choices)}")
        return value

    def _time(self, request: Any, name: str) -> float | None:
        value = self._query(request, name)
        try:
            return None if value is None else parse_time(value)
        except InvalidValue as e:
            raise HTTPError(400, "validation_error", f"{name}: {e}") from None

    def _cursor(self, request: Any) -> str | None:
        value = self._query(request, "cursor")
        if value is not None:
            try:
                decode_cursor(value)
            except InvalidValue as e:
                raise HTTPError(400, "validation_error", f"cursor: {e}") from None
        return value

    def _limit(self, request: Any) -> int:
        value = self._query(request, "limit")
        if value is None:
            return DEFAULT_LIMIT
        if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_LIMIT:
            raise HTTPError(400, "validation_error", f"limit: must be an integer from 1 to {MAX_LIMIT}")
        return int(value)

    # routes

    @app.route("/health", methods=["GET"])
    async def health(self, request: Any) -> bytes:
        # No token: load balancers and service managers ask.
        problem = None if self._health is None else await self._health.problem()
        if problem is None:
            return json_body(request, 200, {"status": "ok"})
        return json_body(request, 503, {"status": "unavailable", "reason": problem})

    @app.route("/metrics", methods=["GET"])
    @authenticated
    async def metrics(self, request: Any) -> bytes:
        body = b"" if self._metrics is None else await self._metrics.scrape()
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return body

    @app.route("/api/v1/openapi.json", methods=["GET"])
    @authenticated
    async def openapi(self, request: Any) -> bytes:
        return json_body(request, 200, openapi_document())

    @app.route("/api/v1/settings", methods=["GET"])
    @authenticated
    async def settings(self, request: Any) -> bytes:
        return json_body(request, 200, self._settings())

    @app.route("/api/v1/users", methods=["GET"])
    @authenticated
    async def list_users(self, request: Any) -> bytes:
        return json_body(request, 200, {"users": [user.to_json() for user in await self._users.list()]})

    @app.route("/api/v1/users", methods=["POST"])
    @authenticated
    async def create_user(self, request: Any) -> bytes:
        data = self._read_json(request, required=False)
        candidate = _validated(new_user, data)
        named = isinstance(data, dict) and "username" in data
        password = generate_password()
        password_hash = await self._hasher.hash(password)
        user = None
        for _attempt in range(1 if named else _USERNAME_ATTEMPTS):
            try:
                user = await self._users.create(candidate, password_hash)
                break
            except DuplicateUser:
                if named:
                    raise HTTPError(409, "duplicate", f"username: {candidate.username} already exists") from None
                candidate = attrs.evolve(candidate, username=generate_username())
        if user is None:
            raise HTTPError(409, "duplicate", "username: could not generate a free username, try again")
        log.info("admin API created user {username}", username=user.username)
        request.setHeader(b"Location", f"/api/v1/users/{user.username}".encode())
        return json_body(request, 201, {**user.to_json(), "password": password})

    @app.route("/api/v1/users/<username>", methods=["GET"])
    @authenticated
    async def get_user(self, request: Any, username: str) -> bytes:
        return json_body(request, 200, (await self._existing(username)).to_json())

    @app.route("/api/v1/users/<username>", methods=["PATCH"])
    @authenticated
    async def update_user(self, request: Any, username: str) -> bytes:
        data = self._read_json(request, required=True)
        if isinstance(data, dict) and "username" in data:
            raise HTTPError(400, "validation_error", "username: cannot be changed (the path names the user)")
        fields = _validated(validate_fields, data)
        current = await self._existing(username)
        if not fields:
            return json_body(request, 200, current.to_json())
        user = await self._users.update(current.username, fields)
        if user is None:
            raise _no_user(username)
        log.info("admin API changed user {username}: {fields}", username=user.username, fields=sorted(fields))
        return json_body(request, 200, user.to_json())

    @app.route("/api/v1/users/<username>", methods=["DELETE"])
    @authenticated
    async def delete_user(self, request: Any, username: str) -> bytes:
        if not await self._users.delete(username):
            raise _no_user(username)
        log.info("admin API deleted user {username}", username=username)
        request.setResponseCode(204)
        request.setHeader(b"Content-Type", b"application/json")
        return b""

    @app.route("/api/v1/users/<username>/password", methods=["POST"])
    @authenticated
    async def regenerate_password(self, request: Any, username: str) -> bytes:
        current = await self._existing(username)
        password = generate_password()
        password_hash = await self._hasher.hash(password)
        if not await self._users.set_password_hash(current.username, password_hash):
            raise _no_user(username)
        log.info("admin API regenerated the password of {username}", username=current.username)
        return json_body(request, 200, {"username": current.username, "password": password})

    @app.route("/api/v1/messages", methods=["GET"])
    @authenticated
    async def list_messages(self, request: Any) -> bytes:
        filters = {
            "user": self._query(request, "user"),
            "status": self._choice(request, "status", MessageStatus),
            "recipient": self._query(request, "recipient"),
            "campaign_code": self._query(request, "campaign_code"),
            "since": self._time(request, "since"),
            "until": self._time(request, "until"),
        }
        limit = self._limit(request)
        cursor = self._cursor(request)
        messages: list[dict[str, Any]] = []
        next_cursor = None
        if self._messages is not None:
            messages, next_cursor = await self._messages.page_messages(
                {k: v for k, v in filters.items() if v is not None}, limit, cursor
            )
        return json_body(request, 200, {"messages": messages, "next_cursor": next_cursor})

    @app.route("/api/v1/messages/<message_id>", methods=["GET"])
    @authenticated
    async def get_message(self, request: Any, message_id: str) -> bytes:
        message = None if self._messages is None else await self._messages.get_message(message_id)
        if message is None:
            raise _no_message(message_id)
        return json_body(request, 200, message)

    @app.route("/api/v1/messages/<message_id>/retry", methods=["POST"])
    @authenticated
    async def retry_message(self, request: Any, message_id: str) -> bytes:
        return await self._queue_action(request, message_id, "retry_message")

    @app.route("/api/v1/messages/<message_id>", methods=["DELETE"])
    @authenticated
    async def delete_message(self, request: Any, message_id: str) -> bytes:
        return await self._queue_action(request, message_id, "delete_message")

    async def _queue_action(self, request: Any, message_id: str, action: str) -> bytes:
        """Retry or delete: 200 with the message, 404 when unknown, 409 when its status forbids it."""
        if self._messages is None:
            raise _no_message(message_id)
        try:
            message = await getattr(self._messages, action)(message_id)
        except QueueConflict as e:
            raise HTTPError(409, "conflict", str(e)) from None
        if message is None:
            raise _no_message(message_id)
        return json_body(request, 200, message)

    @app.route("/api/v1/notifications", methods=["GET"])
    @authenticated
    async def list_notifications(self, request: Any) -> bytes:
        event_type = self._choice(request, "type", EventType)
        user = self._query(request, "user")
        limit = self._limit(request)
        cursor = self._cursor(request)
        events: list[dict[str, Any]] = []
        next_cursor = None
        if self._events is not None:
            events, next_cursor = await self._events.page_events(event_type, user, limit, cursor)
        return json_body(request, 200, {"notifications": events, "next_cursor": next_cursor})

    @app.route("/api/v1/stats", methods=["GET"])
    @authenticated
    async def stats(self, request: Any) -> bytes:
        user = self._query(request, "user")
        policy = self._choice(request, "policy", Aggregation)
        if self._stats is None:
            result = {"policy": policy or "day", "groups": []}
        else:
            result = await self._stats.stats(user, policy)
        return json_body(request, 200, result)

    @app.route("/api/v1/users/<username>/check", methods=["POST"])
    @authenticated
    async def check_policy(self, request: Any, username: str) -> bytes:
        # Nothing of a dry-run is stored: text a store could not hold gets
        # the answer the session would give, not a 400.
        data = self._read_json(request, required=True, stored=False)
        mail_from, header_from, recipients, headers = _check_request(data)
        user = await self._existing(username)
        if self._policy is None:
            raise HTTPError(404, "not_found", "the policy dry-run is not available")
        answer = await self._policy.check(user, mail_from, header_from, recipients, headers)
        return json_body(request, 200, answer)

    @app.route("/api/v1/dkim", methods=["GET"])
    @authenticated
    async def list_dkim_keys(self, request: Any) -> bytes:
        keys = [] if self._dkim is None else await self._dkim.list()
        return json_body(request, 200, {"keys": keys})

    @app.route("/api/v1/dkim/<domain>", methods=["POST"])
    @authenticated
    async def create_dkim_key(self, request: Any, domain: str) -> bytes:
        data = self._read_json(request, required=False)
        name = _dkim_domain(domain, creating=True)
        selector, algorithm = _dkim_request(data)
        if self._dkim is None:
            raise _no_dkim_key(name)
        try:
            key = await self._dkim.create(name, selector, algorithm)
        except DKIMKeyConflict as e:
            raise HTTPError(409, "duplicate", str(e)) from None
        log.info("admin API created a DKIM key for {domain}", domain=name)
        request.setHeader(b"Location", f"/api/v1/dkim/{name}".encode())
        return json_body(request, 201, key)

    @app.route("/api/v1/dkim/<domain>", methods=["GET"])
    @authenticated
    async def get_dkim_key(self, request: Any, domain: str) -> bytes:
        name = _dkim_domain(domain)
        key = None if self._dkim is None else await self._dkim.get(name)
        if key is None:
            raise _no_dkim_key(name)
        return json_body(request, 200, key)

    @app.route("/api/v1/dkim/<domain>", methods=["PATCH"])
    @authenticated
    async def update_dkim_key(self, request: Any, domain: str) -> bytes:
        data = self._read_json(request, required=True)
        name = _dkim_domain(domain)
        if not isinstance(data, dict) or set(data) != {"enabled"} or not isinstance(data["enabled"], bool):
            raise HTTPError(400, "validation_error", 'the body must be {"enabled": true|false}')
        key = None if self._dkim is None else await self._dkim.set_enabled(name, data["enabled"])
        if key is None:
            raise _no_dkim_key(name)
        log.info("admin API turned the DKIM key of {domain} {state}", domain=name, state="on" if key["enabled"] else "off")
        return json_body(request, 200, key)

    @app.route("/api/v1/dkim/<domain>", methods=["DELETE"])
    @authenticated
    async def delete_dkim_key(self, request: Any, domain: str) -> bytes:
        name = _dkim_domain(domain)
        if self._dkim is None or not await self._dkim.delete(name):
            raise _no_dkim_key(name)
        log.info("admin API deleted the DKIM key of {domain}", domain=name)
        request.setResponseCode(204)
        request.setHeader(b"Content-Type", b"application/json")
        return b""

    @app.route("/api/v1/users/<username>/suppressions", methods=["GET"])
    @authenticated
    async def list_suppressions(self, request: Any, username: str) -> bytes:
        user = await self._existing(username)
        found = [] if self._suppressions is None else await self._suppressions.list(user.username)
        return json_body(request, 200, {"suppressions": [s.to_json() for s in found]})

    @app.route("/api/v1/users/<username>/suppressions", methods=["POST"])
    @authenticated
    async def add_suppression(self, request: Any, username: str) -> bytes:
        address, reason = _suppression_input(self._read_json(request, required=True))
        user = await self._existing(username)
        if self._suppressions is None:
            raise HTTPError(404, "not_found", "no suppression list")
        entry = await self._suppressions.add(user.username, address, reason, self._now())
        log.info("admin API suppressed {address} for {username}", address=entry.address, username=user.username)
        return json_body(request, 201, entry.to_json())

    @app.route("/api/v1/users/<username>/suppressions/<address>", methods=["DELETE"])
    @authenticated
    async def remove_suppression(self, request: Any, username: str, address: str) -> bytes:
        user = await self._existing(username)
        if self._suppressions is None or not await self._suppressions.remove(user.username, _address_key(address)):
            raise HTTPError(404, "not_found", f"{address} is not suppressed for user {user.username}")
        log.info("admin API lifted the suppression of {address} for {username}", address=address, username=user.username)
        request.setResponseCode(204)
        request.setHeader(b"Content-Type", b"application/json")
        return b""

    @app.route("/api/v1/nodes", methods=["GET"])
    @authenticated
    async def list_nodes(self, request: Any) -> bytes:
        nodes = [] if self._nodes is None else await self._nodes.nodes()
        return json_body(request, 200, {"nodes": nodes})

    async def _existing(self, username: str) -> User:
        user = await self._users.get(username)
        if user is None:
            raise _no_user(username)
        return user


class QueryParameters:
    """
    The query parameters each operation of the OpenAPI document declares,
    and whether it needs the token: the document is the one list of what a
    request may carry, so that a parameter it does not name is refused
    (400) rather than silently ignored.
    """

    def __init__(self, document: dict[str, Any]) -> None:
        secured = bool(document.get("security"))
        self._paths: list[tuple[re.Pattern[str], dict[bytes, tuple[frozenset[str], bool]]]] = []
        for template, item in document["paths"].items():
            # A {name} segment of the template matches one segment of the path.
            pattern = re.compile(re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(template)))
            shared = item.get("parameters", [])
            operations = {}
            for method, operation in item.items():
                if method == "parameters":
                    continue
                names = {p["name"] for p in (*shared, *operation.get("parameters", [])) if p["in"] == "query"}
                needs_token = bool(operation["security"]) if "security" in operation else secured
                operations[method.upper().encode("ascii")] = (frozenset(names), needs_token)
            self._paths.append((pattern, operations))

    def unknown(self, method: bytes, path: str, names: Iterable[str]) -> tuple[list[str], bool]:
        """
        The names among C{names} that the operation C{method path} does not
        declare (none when the document has no such operation: routing
        answers that), and whether the operation needs the token.
        """
        method = b"GET" if method == b"HEAD" else method
        for pattern, operations in self._paths:
            if pattern.fullmatch(path) and method in operations:
                allowed, needs_token = operations[method]
                return sorted(set(names) - allowed), needs_token
        return [], True


class _UTF8URLs(Resource):
    """
    Checks what routing cannot: answers a URL that is not UTF-8 (after
    percent-decoding) with the contract's JSON 400, where Klein itself would
    log a traceback and answer plain text, and a query parameter the
    operation does not take with a 400 naming it.
    """

    isLeaf = True

    def __init__(self, api: AdminAPI, routes: IResource) -> None:
        super().__init__()
        self._api = api
        self._routes = routes
        self._parameters = QueryParameters(openapi_document())

    def render(self, request: IRequest) -> bytes | int:
        # The names in the URL's query string: request.args also holds the
        # fields of a form-encoded body, which is refused later as not JSON.
        query = request.uri.partition(b"?")[2]
        try:
            for part in (*request.postpath, request.getRequestHostname()):
                part.decode("utf-8")
            names = [name.decode("utf-8") for name in parse_qs(query, keep_blank_values=True)]
        except UnicodeDecodeError:
            return self._refuse(request, True, "bad_request", "the URL is not UTF-8")
        path = unquote_to_bytes(request.path).decode("utf-8", "replace")
        unknown, needs_token = self._parameters.unknown(request.method, path, names)
        if unknown:
            what = "parameters" if len(unknown) > 1 else "parameter"
            return self._refuse(request, needs_token, "validation_error", f"{', '.join(unknown)}: unknown query {what}")
        return self._routes.render(request)

    def _refuse(self, request: IRequest, needs_token: bool, code: str, message: str) -> bytes:
        # The token is checked first: without it a request learns nothing.
        if needs_token:
            try:
                self._api._check_token(request)
            except HTTPError as e:
                return error_body(request, e.status, e.code, e.message)
        return error_body(request, 400, code, message)


_ADDRESS_RE = re.compile(ADDRESS_PATTERN)
MAX_REASON = 1000


def _suppression_input(data: Any) -> tuple[str, str]:
    """The address (its domain as IDNA A-labels) and reason of a suppression to add; a 400 when invalid."""
    if not isinstance(data, dict):
        raise HTTPError(400, "validation_error", "the request body must be a JSON object")
    unknown = sorted(set(data) - {"address", "reason"})
    if unknown:
        raise HTTPError(400, "validation_error", f"{unknown[0]}: unknown field")
    address = data.get("address")
    if not isinstance(address, str):
        raise HTTPError(400, "validation_error", "address: required, an email address")
    address = _address_key(address)
    if not _ADDRESS_RE.fullmatch(address):
        raise HTTPError(400, "validation_error", "address: not an email address (its local part must be ASCII)")
    reason = data.get("reason", "added by an administrator")
    if not isinstance(reason, str) or len(reason) > MAX_REASON or "\0" in reason:
        raise HTTPError(400, "validation_error", f"reason: must be a string of at most {MAX_REASON} characters")
    return address, reason


def _address_key(address: str) -> str:
    """C{address} lower-cased, a domain written in Unicode as its IDNA A-labels (as the sessions see it)."""
    local, at, domain = address.strip().rpartition("@")
    if at and domain and not domain.isascii():
        try:
            domain = normalize_domain(domain)
        except ValueError:
            pass
    return f"{local}{at}{domain}".lower()


def _no_user(username: str) -> HTTPError:
    return HTTPError(404, "not_found", f"no user {username}")


def _no_message(message_id: str) -> HTTPError:
    return HTTPError(404, "not_found", f"no message {message_id}")


def _no_dkim_key(domain: str) -> HTTPError:
    return HTTPError(404, "not_found", f"no DKIM key for {domain}")


def _dkim_domain(domain: str, creating: bool = False) -> str:
    """
    The path's domain as the keys are stored: lower-case IDNA A-labels, as
    the users' domains.  A key is created for a name written in A-labels;
    it is found by either form.  A name that is not a domain is a 400 when
    a key is to be created for it, else a 404: no key can exist for it.
    """
    if creating and not domain.isascii():
        # The document states the A-label form (as for the users' lists);
        # a key's dns_name must be published in it anyway.
        raise HTTPError(400, "validation_error", "domain: write an international domain as its IDNA A-labels (xn--...)")
    try:
        return normalize_domain(domain)
    except ValueError as e:
        if creating:
            raise HTTPError(400, "validation_error", f"domain: {e}") from None
        raise _no_dkim_key(domain) from None


def _dkim_request(data: Any) -> tuple[str, str]:
    """The selector and algorithm of a key creation body (both optional)."""
    if not isinstance(data, dict):
        raise HTTPError(400, "validation_error", "the request body must be a JSON object")
    unknown = sorted(set(data) - {"selector", "algorithm"})
    if unknown:
        raise HTTPError(400, "validation_error", f"{', '.join(unknown)}: unknown field")
    selector = data.get("selector", DKIM_DEFAULT_SELECTOR)
    if not isinstance(selector, str) or not DKIM_SELECTOR_RE.fullmatch(selector) or len(selector) > 253:
        raise HTTPError(400, "validation_error", "selector: must be one or more DNS labels, e.g. s1")
    algorithm = data.get("algorithm", DKIM_DEFAULT_ALGORITHM)
    if algorithm not in DKIM_ALGORITHMS:
        raise HTTPError(400, "validation_error", f"algorithm: must be one of {', '.join(DKIM_ALGORITHMS)}")
    return selector, algorithm


def _check_request(data: Any) -> tuple[str, str | None, list[str], dict[str, list[str]]]:
    """The fields of a dry-run body: C{mail_from}, C{header_from}, C{recipients}, C{headers}."""
    if not isinstance(data, dict):
        raise HTTPError(400, "validation_error", "the request body must be a JSON object")
    unknown = sorted(set(data) - {"mail_from", "header_from", "recipients", "headers"})
    if unknown:
        raise HTTPError(400, "validation_error", f"{', '.join(unknown)}: unknown field")
    mail_from = data.get("mail_from")
    if not isinstance(mail_from, str):
        raise HTTPError(400, "validation_error", "mail_from: required, a string (empty for the null sender)")
    header_from = data.get("header_from")
    if header_from is not None and (not isinstance(header_from, str) or not _field_value(header_from)):
        raise HTTPError(400, "validation_error", "header_from: must be a string without line breaks")
    recipients = data.get("recipients")
    if (
        not isinstance(recipients, list)
        or not recipients
        or not all(isinstance(r, str) and r for r in recipients)
        or len(recipients) > MAX_CHECK_RECIPIENTS
    ):
        raise HTTPError(
            400, "validation_error", f"recipients: required, a list of 1 to {MAX_CHECK_RECIPIENTS} addresses"
        )
    headers: dict[str, list[str]] = {}
    given = data.get("headers", {})
    if not isinstance(given, dict):
        raise HTTPError(400, "validation_error", "headers: must be an object of header names to strings or lists")
    for name, value in given.items():
        # A name is used as written, as a session takes whatever precedes
        # the colon: what would not read as a field does not here either.
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) and _field_value(v) for v in values):
            raise HTTPError(400, "validation_error", f"headers: {name}: must be a string or a list of strings without line breaks")
        headers[name] = values
    return mail_from, header_from, recipients, headers


def _field_value(value: str) -> bool:
    return not any(c in value for c in "\r\n\0")


def _validated(validate: Callable[[Any], dict[str, Any]], data: Any) -> dict[str, Any]:
    try:
        return validate(data)
    except ValidationError as e:
        raise HTTPError(400, "validation_error", str(e)) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A JSON string (escapes and all) and the brackets outside strings.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[][{}]")


def _nesting_depth(raw: bytes) -> int:
    """How deep the arrays and objects of the JSON text C{raw} nest, found without parsing it."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub(b"", raw)):
        if bracket in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _check_storable(value: Any, where: str) -> None:
    """
    Refuse with 400 any string of the decoded body, object keys included,
    that UTF-8 and SQLite cannot hold: JSON escapes can spell lone
    surrogates (C{"\\ud800"}) and NUL, which would otherwise fail deep in the
    store as a 500.  Depth was bounded before decoding.
    """
    if isinstance(value, str):
        if "\0" in value or not _encodable(value):
            name = where or "the request body"
            raise HTTPError(400, "validation_error", f"{name}: holds a NUL or a lone surrogate, which cannot be stored")
    elif isinstance(value, list):
        for item in value:
            _check_storable(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_storable(key, where or "a field name")
            _check_storable(item, key)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
