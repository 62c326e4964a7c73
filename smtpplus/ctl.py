"""
C{smtpplusctl}: the command line for administrators, a client of the admin
API (contract section 6).

    smtpplusctl [--config FILE | --url URL] [--token TOKEN] COMMAND ...

The API's address comes from C{--config} (C{[admin] listen}/C{port}, over
HTTPS when C{[admin] tls = true}), C{--url}, or C{SMTPPLUS_URL} (default
C{http://127.0.0.1:8025}); the token from C{--token}, C{SMTPPLUS_TOKEN}, or
the config's C{[admin] token} or C{admin-token} file in its C{state_dir}.
Nothing prompts; errors are one line on stderr and exit status 1.

Only the standard library (and the daemon's config reader) is imported, so
that a command starts fast: no Twisted, no reactor.
"""

from __future__ import annotations

import argparse
import calendar
import http.client
import json
import os
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn
from urllib.parse import quote, urlencode, urlsplit

DEFAULT_URL = "http://127.0.0.1:8025"
TIMEOUT = 30.0
PAGE = 1000
# Statuses of messages still in the queue, as mailq shows them.
QUEUE_STATUSES = ("queued", "scheduled", "sending", "deferred")
# Spellings of "users set" keys beside the API's own field names.
KEY_ALIASES = {"domains": "authorized_domains", "senders": "authorized_senders"}
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class Failed(Exception):
    """What went wrong, as the one line the command prints."""


class Usage(Failed):
    """A command line argparse refused."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line and exit status 1 like every other error."""

    def error(self, message: str) -> NoReturn:
        raise Usage(f"{message} (see {self.prog} --help)")


# --- where the API is -----------------------------------------------------------


class _NamedHTTPS(http.client.HTTPSConnection):
    """HTTPS to one address, verifying the certificate for another name (the daemon's hostname)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, server_name: str) -> None:
        super().__init__(host, port, timeout=TIMEOUT, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)  # type: ignore[attr-defined]


class Endpoint:
    """The admin API's address, how to reach it, and the token."""

    def __init__(self, url: str, token: str | None, connect: Callable[[], http.client.HTTPConnection]) -> None:
        self.url = url
        self.token = token
        self.connect = connect


def _connector(url: str) -> Callable[[], http.client.HTTPConnection]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Failed(f"{url}: not an http:// or https:// URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Failed(f"{url}: bad port") from None
    host = parts.hostname
    if parts.scheme == "https":
        # The system's trust store (SSL_CERT_FILE names another file).
        context = ssl.create_default_context()
        return lambda: http.client.HTTPSConnection(host, port, timeout=TIMEOUT, context=context)
    return lambda: http.client.HTTPConnection(host, port, timeout=TIMEOUT)


def _from_config(path: str, token: str | None) -> Endpoint:
    # The daemon's own reader: the same defaults and the same error lines.
    from smtpplus.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as e:
        raise Failed(str(e)) from None
    admin = config.admin
    # A wildcard listening address is reached over loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(admin.listen, admin.listen)
    shown = f"[{host}]" if ":" in host else host
    if token is None:
        token = admin.token or _token_file(config.server.state_dir)
    if not admin.tls:
        url = f"http://{shown}:{admin.port}"
        return Endpoint(url, token, lambda: http.client.HTTPConnection(host, admin.port, timeout=TIMEOUT))
    url = f"https://{shown}:{admin.port}"
    context = _trust(config.tls.certificate, config.server.state_dir)
    name = config.server.hostname
    return Endpoint(url, token, lambda: _NamedHTTPS(host, admin.port, context, name))


def _trust(certificate: str, state_dir: str) -> ssl.SSLContext:
    """
    Trust what the daemon serves: the system's CAs and the configured
    certificate, or else the self-signed pair it generated in its state_dir.
    """
    context = ssl.create_default_context()
    files = [certificate] if certificate else [os.path.join(state_dir, "tls", name) for name in ("cert.pem", "rsa-cert.pem")]
    for path in files:
        try:
            context.load_verify_locations(cafile=path)
        except FileNotFoundError:
            continue
        except (OSError, ssl.SSLError) as e:
            raise Failed(f"cannot read the admin API's certificate {path}: {e}") from None
    return context


def _token_file(state_dir: str) -> str | None:
    path = os.path.join(state_dir, "admin-token")
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise Failed(f"cannot read the admin token from {path}: {getattr(e, 'strerror', None) or e}") from None


def endpoint(args: argparse.Namespace) -> Endpoint:
    """Where the API is and the token, from the options and the environment."""
    token = args.token or os.environ.get("SMTPPLUS_TOKEN") or None
    if args.config:
        return _from_config(args.config, token)
    url = (args.url or os.environ.get("SMTPPLUS_URL") or DEFAULT_URL).rstrip("/")
    return Endpoint(url, token, _connector(url))


# --- talking to it --------------------------------------------------------------


class API:
    """JSON over HTTP to the admin API; an error answer becomes L{Failed} with its message."""

    def __init__(self, where: Endpoint) -> None:
        self._where = where

    def call(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        if not self._where.token:
            raise Failed("no admin token: give --token, set SMTPPLUS_TOKEN, or use --config with the daemon's config file")
        params = {k: v for k, v in (query or {}).items() if v is not None}
        target = path + (f"?{urlencode(params)}" if params else "")
        headers = {"Authorization": f"Bearer {self._where.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        connection = self._where.connect()
        try:
            connection.request(method, target, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e) or type(e).__name__
            raise Failed(f"cannot reach the admin API at {self._where.url}: {reason}") from None
        finally:
            connection.close()
        try:
            document = json.loads(raw) if raw else None
        except ValueError:
            document = None
        if response.status >= 400:
            error = document.get("error") if isinstance(document, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            raise Failed(message or f"{method} {path}: HTTP {response.status} {response.reason}")
        return document

    def pages(self, path: str, key: str, query: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Every item of a paged listing, following next_cursor."""
        cursor = None
        while True:
            document = self.call("GET", path, query={**query, "limit": PAGE, "cursor": cursor})
            yield from document[key]
            cursor = document.get("next_cursor")
            if not cursor:
                return


def _user_path(name: str) -> str:
    return f"/api/v1/users/{quote(name, safe='')}"


def _message_path(message_id: str) -> str:
    return f"/api/v1/messages/{quote(message_id, safe='')}"


# --- output ---------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    cells = [[str(c) for c in headers], *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)) + "  " + row[-1] for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _list(values: Sequence[str]) -> str:
    return ";".join(values) if values else "-"


def show_user(user: dict[str, Any]) -> str:
    fields = [
        ("username", user["username"]),
        ("enabled", "yes" if user["enabled"] else "no"),
        ("priority", user["priority"]),
        ("authorized_domains", _list(user["authorized_domains"])),
        ("authorized_senders", _list(user["authorized_senders"])),
        ("aggregation", user["aggregation"]),
        ("notes", user["notes"] or "-"),
        ("created_at", user["created_at"]),
        ("updated_at", user["updated_at"]),
    ]
    return "\n".join(f"{name + ':':<20}{value}" for name, value in fields)


def age(created_at: str, now: float) -> str:
    """How long ago C{created_at} (ISO 8601 UTC) was, as mailq-like short text: 42s, 5m, 3h, 2d."""
    seconds = max(0, int(now - _epoch(created_at)))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _epoch(stamp: str) -> float:
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))


def _first_recipient(message: dict[str, Any]) -> str:
    recipients = message["recipients"]
    if not recipients:
        return "-"
    more = len(recipients) - 1
    return recipients[0]["address"] + (f" (+{more})" if more else "")


# --- commands -------------------------------------------------------------------


def _user_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.name is not None:
        fields["username"] = args.name
    for option, field in (("domains", "authorized_domains"), ("senders", "authorized_senders"), ("notes", "notes")):
        value = getattr(args, option)
        if value is not None:
            fields[field] = value
    if args.priority is not None:
        fields["priority"] = args.priority
    return fields


def _setting(pair: str) -> tuple[str, Any]:
    key, equals, value = pair.partition("=")
    if not equals or not key:
        raise Failed(f"{pair!r}: expected key=value")
    key = KEY_ALIASES.get(key, key)
    if key == "priority" and value.strip().lstrip("-").isdigit():
        return key, int(value)
    if key == "enabled":
        if value.lower() in TRUE:
            return key, True
        if value.lower() in FALSE:
            return key, False
        raise Failed(f"enabled: {value!r} is not true or false")
    return key, value


def run(args: argparse.Namespace, out: Callable[[str], None]) -> None:
    """Carry out the parsed command, printing with C{out}."""
    api = API(endpoint(args))
    command = args.command
    if command == "users":
        users(api, args, out)
    elif command == "suppressions":
        suppressions(api, args, out)
    elif command == "queue":
        queue(api, args, out)
    elif command == "retry":
        retry(api, args, out)
    elif command == "delete":
        message = api.call("DELETE", _message_path(args.id))
        out(f"{message['id']}: deleted")
    elif command == "stats":
        document = api.call("GET", "/api/v1/stats", query={"user": args.user, "policy": args.policy})
        columns = ("messages", "recipients", "sent", "deferred", "bounced", "rejected")
        rows = [[g["key"] or '""', *(g[c] for c in columns)] for g in document["groups"]]
        out(f"policy: {document['policy']}")
        out(table(["KEY", *(c.upper() for c in columns)], rows))
    elif command == "nodes":
        now = time.time()
        nodes = api.call("GET", "/api/v1/nodes")["nodes"]
        rows = [
            [n["name"], n["workers"], age(n["started_at"], now), age(n["last_seen"], now), n["queued"], n["sending"]]
            for n in nodes
        ]
        out(table(["NODE", "WORKERS", "UP", "LAST SEEN", "QUEUED", "SENDING"], rows))
    elif command == "notifications":
        query = {"type": args.type, "user": args.user}
        events = list(_limited(api.pages("/api/v1/notifications", "notifications", query), args.limit))
        rows = [[e["created_at"], e["type"], e["user"], e["message_id"], e["detail"]] for e in events]
        out(table(["CREATED", "TYPE", "USER", "MESSAGE", "DETAIL"], rows))


def _limited(items: Iterator[dict[str, Any]], limit: int) -> Iterator[dict[str, Any]]:
    for count, item in enumerate(items):
        if count >= limit:
            return
        yield item


def users(api: API, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    action = args.action
    if action == "list":
        rows = [
            [u["username"], "yes" if u["enabled"] else "no", u["priority"], _list(u["authorized_domains"]),
             _list(u["authorized_senders"])]
            for u in api.call("GET", "/api/v1/users")["users"]
        ]
        out(table(["USERNAME", "ENABLED", "PRIORITY", "DOMAINS", "SENDERS"], rows))
    elif action == "add":
        user = api.call("POST", "/api/v1/users", body=_user_fields(args))
        out(show_user(user))
        # The password alone on the last line: scripts take it with tail -n 1.
        out(user["password"])
    elif action == "show":
        out(show_user(api.call("GET", _user_path(args.name))))
    elif action == "set":
        fields = dict(_setting(pair) for pair in args.settings)
        out(show_user(api.call("PATCH", _user_path(args.name), body=fields)))
    elif action in ("enable", "disable"):
        user = api.call("PATCH", _user_path(args.name), body={"enabled": action == "enable"})
        out(f"{user['username']}: {action}d")
    elif action == "passwd":
        out(api.call("POST", f"{_user_path(args.name)}/password")["password"])
    elif action == "delete":
        api.call("DELETE", _user_path(args.name))
        out(f"{args.name}: deleted")


def suppressions(api: API, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    path = f"{_user_path(args.name)}/suppressions"
    if args.action == "list":
        entries = api.call("GET", path)["suppressions"]
        out(table(["ADDRESS", "SINCE", "REASON"], [[e["address"], e["created_at"], e["reason"]] for e in entries]))
    elif args.action == "add":
        body = {"address": args.address} if args.reason is None else {"address": args.address, "reason": args.reason}
        entry = api.call("POST", path, body=body)
        out(f"{entry['address']}: suppressed for {args.name}")
    elif args.action == "remove":
        api.call("DELETE", f"{path}/{quote(args.address, safe='')}")
        out(f"{args.address}: no longer suppressed for {args.name}")


def queue(api: API, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    messages = [
        m
        for status in QUEUE_STATUSES
        for m in api.pages("/api/v1/messages", "messages", {"status": status, "user": args.user})
    ]
    if not messages:
        out("Mail queue is empty")
        return
    # Oldest first, the order the queue works through.
    messages.sort(key=lambda m: (m["created_at"], m["id"]))
    now = time.time()
    rows = [
        [m["id"], m["user"], m["size"], m["priority"], m["status"], _first_recipient(m), age(m["created_at"], now)]
        for m in messages
    ]
    out(table(["ID", "USER", "SIZE", "PRIORITY", "STATUS", "RECIPIENT", "AGE"], rows))
    total = sum(m["size"] for m in messages)
    out(f"-- {total} bytes in {len(messages)} message{'s' if len(messages) != 1 else ''}")


def retry(api: API, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    if not args.all:
        message = api.call("POST", f"{_message_path(args.id)}/retry")
        out(f"{message['id']}: {message['status']}, next attempt {message['next_attempt_at'] or 'now'}")
        return
    # The ids first: retried messages change status while the pages are read.
    ids = [m["id"] for m in api.pages("/api/v1/messages", "messages", {"status": "deferred"})]
    retried = 0
    for message_id in ids:
        try:
            api.call("POST", f"{_message_path(message_id)}/retry")
        except Failed:
            # Delivered, bounced or deleted since it was listed: nothing to retry.
            continue
        retried += 1
    out(f"{retried} deferred message{'s' if retried != 1 else ''} to be tried now")


# --- the command line -----------------------------------------------------------


def parser() -> Parser:
    top = Parser(
        prog="smtpplusctl",
        description="Manage a running smtpplus relay through its admin API.",
        epilog="The address: --config, --url, $SMTPPLUS_URL or " + DEFAULT_URL + ". The token: --token, "
        "$SMTPPLUS_TOKEN, or the config's [admin] token or state_dir/admin-token file.",
    )
    where = top.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="FILE", help="the daemon's config file: the admin address, TLS and token")
    where.add_argument("--url", help="the admin API's base URL, e.g. http://127.0.0.1:8025")
    top.add_argument("--token", help="the admin API's bearer token")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)

    users_parser = commands.add_parser("users", help="list, add, show, change and delete users")
    actions = users_parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    actions.add_parser("list", help="every user, enabled and disabled")
    add = actions.add_parser("add", help="create a user; the password is printed on the last line")
    add.add_argument("name", nargs="?", help="the username (generated when left out)")
    add.add_argument("--domains", help="authorized sender domains, separated by ;")
    add.add_argument("--senders", help="authorized sender addresses, separated by ;")
    add.add_argument("--priority", type=int, help="default priority, 1 (very high) to 5 (very low)")
    add.add_argument("--notes", help="free text")
    for action, text in (
        ("show", "one user"),
        ("disable", "refuse the user's logins"),
        ("enable", "accept the user's logins again"),
        ("passwd", "generate a new password, printed alone; the old one stops working"),
        ("delete", "delete the user"),
    ):
        actions.add_parser(action, help=text).add_argument("name")
    setter = actions.add_parser("set", help="change fields: key=value (domains= and senders= take ;-lists)")
    setter.add_argument("name")
    setter.add_argument("settings", nargs="+", metavar="key=value")

    suppress_parser = commands.add_parser("suppressions", help="a user's suppressed recipients: list, add, remove")
    suppress_actions = suppress_parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    suppress_actions.add_parser("list", help="the user's suppressed recipients").add_argument("name")
    suppress_add = suppress_actions.add_parser("add", help="refuse RCPT TO this address for the user")
    suppress_add.add_argument("name")
    suppress_add.add_argument("address")
    suppress_add.add_argument("--reason", help="why (shown in the 550 reply)")
    suppress_remove = suppress_actions.add_parser("remove", help="lift a suppression")
    suppress_remove.add_argument("name")
    suppress_remove.add_argument("address")

    queue_parser = commands.add_parser("queue", help="the messages not yet delivered, like mailq")
    queue_parser.add_argument("--user", help="only this user's")
    retry_parser = commands.add_parser("retry", help="try a deferred or scheduled message now")
    target = retry_parser.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", help="the message id")
    target.add_argument("--all", action="store_true", help="every deferred message")
    commands.add_parser("delete", help="drop a queued, scheduled or deferred message").add_argument("id")
    stats = commands.add_parser("stats", help="statistics, grouped by a policy")
    stats.add_argument("--user")
    stats.add_argument("--policy", help="day, week, month, year, subject, ..., user")
    commands.add_parser("nodes", help="the nodes sharing the store, with their heartbeats and queues")
    notes = commands.add_parser("notifications", help="notification events, newest first")
    notes.add_argument("--type", help="sender_domain, send_problem, bounce, delivery_delay, account_block or priority_budget")
    notes.add_argument("--user")
    notes.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """The console script; returns the exit status."""
    try:
        run(parser().parse_args(argv), print)
    except Failed as e:
        print(f"smtpplusctl: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
