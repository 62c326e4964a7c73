"""
Delivery of stored notification events: mail to the configured admins
through the daemon's own queue, and a JSON POST per event to a webhook;
with C{message_webhooks}, a POST per recipient result too.

Nothing here makes an SMTP session wait: L{Notifier.dispatch} only files the
event and schedules work on the reactor.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import deque
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid
from io import BytesIO
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from smtpplus.config import NotificationsConfig
from smtpplus.model import iso_utc
from smtpplus.notify.templates import MailTemplate, load_templates

log = Logger()

Submit = Callable[[str, list[str], bytes, int], Deferred[Any]]

NOTIFICATION_PRIORITY = 1
# After the first mail of a (type, user), further events of that pair are
# collected this long into one summary mail; a steady burst thus costs one
# mail per window.
COALESCE_SECONDS = 60.0
# How many events a summary or digest lists one by one; the rest are counted.
MAX_LISTED = 50
PERIODS = {"hourly": 3600, "daily": 86400}


def _event_line(event: dict[str, Any]) -> str:
    line = (
        f"{event['created_at']}  {event['id']}  {event['type']}  user={event['user'] or '-'}  "
        f"message={event['message_id'] or '-'}  {event['detail']}"
    )
    # One event per line, whatever its detail holds.
    return " ".join(line.split())


@attrs.define
class _Batch:
    """Events collected for one summary or digest mail: a count and the first few."""

    count: int = 0
    listed: list[str] = attrs.Factory(list)
    first_at: str = ""
    last_at: str = ""
    call: IDelayedCall | None = None

    def add(self, event: dict[str, Any]) -> None:
        self.count += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append(_event_line(event))
        self.first_at = self.first_at or event["created_at"]
        self.last_at = event["created_at"]

    def text(self) -> str:
        more = self.count - len(self.listed)
        return "\n".join(self.listed) + "\n" + (f"... and {more} more\n" if more > 0 else "")


class MailNotifier:
    """
    Turns events into mails by each type's frequency: C{immediate} (the first
    event of a type and user at once, a burst after it coalesced into one
    summary per window), C{hourly} and C{daily} (one digest at the top of the
    hour / midnight UTC) or C{off}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        submit: Submit,
        hostname: str,
        recipients: Sequence[str],
        frequency: dict[str, str],
        templates: dict[str, MailTemplate],
        coalesce_seconds: float = COALESCE_SECONDS,
    ) -> None:
        self._clock = clock
        self._submit = submit
        self._hostname = hostname
        self._recipients = list(recipients)
        self._frequency = dict(frequency)
        self._templates = templates
        self._coalesce = coalesce_seconds
        self.sender = f"smtpplus@{hostname}"
        self._windows: dict[tuple[str, str | None], _Batch] = {}
        self._digests: dict[str, _Batch] = {}
        self._sending: set[Deferred[Any]] = set()

    def dispatch(self, event: dict[str, Any]) -> None:
        """File one event by its type's frequency."""
        if not self._recipients:
            return
        frequency = self._frequency.get(event["type"], "immediate")
        if frequency == "immediate":
            self._immediate(event)
        elif frequency in PERIODS:
            self._digest(frequency, event)

    def _immediate(self, event: dict[str, Any]) -> None:
        key = (event["type"], event["user"])
        window = self._windows.get(key)
        if window is not None:
            window.add(event)
            return
        self._send(event["type"] + ".mail.txt", self._event_variables(event))
        self._open_window(key)

    def _open_window(self, key: tuple[str, str | None]) -> None:
        window = _Batch()
        window.call = self._clock.callLater(self._coalesce, self._close_window, key)
        self._windows[key] = window

    def _close_window(self, key: tuple[str, str | None]) -> None:
        window = self._windows.pop(key)
        if window.count:
            self._send_summary(key, window)
            # The burst may go on: keep collecting for another window.
            self._open_window(key)

    def _send_summary(self, key: tuple[str, str | None], window: _Batch) -> None:
        type, user = key
        self._send(
            "summary.mail.txt",
            {
                "type": type,
                "user": user or "-",
                "count": str(window.count),
                "first_at": window.first_at,
                "last_at": window.last_at,
                "events": window.text(),
                "hostname": self._hostname,
            },
        )

    def _digest(self, frequency: str, event: dict[str, Any]) -> None:
        digest = self._digests.get(frequency)
        if digest is None:
            period = PERIODS[frequency]
            now = self._clock.seconds()
            boundary = (now // period + 1) * period
            digest = self._digests[frequency] = _Batch()
            digest.call = self._clock.callLater(boundary - now, self._send_digest, frequency, boundary - period)
        digest.add(event)

    def _send_digest(self, frequency: str, since: float) -> None:
        digest = self._digests.pop(frequency)
        self._send(
            "digest.mail.txt",
            {
                "period": frequency.capitalize(),
                "count": str(digest.count),
                "since": iso_utc(since),
                "until": iso_utc(self._clock.seconds()),
                "events": digest.text(),
                "hostname": self._hostname,
            },
        )

    def _event_variables(self, event: dict[str, Any]) -> dict[str, str]:
        return {
            "id": str(event["id"]),
            "type": event["type"],
            "user": event["user"] or "-",
            "message_id": event["message_id"] or "-",
            "detail": event["detail"],
            "created_at": event["created_at"],
            "hostname": self._hostname,
            "count": "1",
        }

    def compose(self, subject: str, body: str) -> bytes:
        """The complete notification mail, From the daemon to the admins."""
        msg = EmailMessage(policy=SMTP)
        msg["From"] = f"smtpplus <{self.sender}>"
        msg["To"] = ", ".join(self._recipients)
        msg["Subject"] = subject
        msg["Date"] = formatdate(self._clock.seconds(), usegmt=True)
        msg["Message-ID"] = make_msgid("smtpplus", domain=self._hostname)
        # RFC 3834: tells autoresponders not to answer.
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(body)
        return msg.as_bytes()

    def _send(self, template: str, variables: dict[str, str]) -> None:
        subject, body = self._templates[template].render(variables)
        d = maybeDeferred(self._submit, self.sender, list(self._recipients), self.compose(subject, body),
                          NOTIFICATION_PRIORITY)
        self._sending.add(d)
        d.addErrback(lambda f: log.failure("queueing notification mail failed", f))
        d.addBoth(lambda _: self._sending.discard(d))

    def flush(self) -> Deferred[Any]:
        """Send what is collected now (at shutdown) and cancel the timers."""
        for key, window in list(self._windows.items()):
            if window.call is not None and window.call.active():
                window.call.cancel()
            if window.count:
                self._send_summary(key, window)
        self._windows.clear()
        for frequency, digest in list(self._digests.items()):
            if digest.call is not None and digest.call.active():
                digest.call.cancel()
            period = PERIODS[frequency]
            self._send_digest(frequency, self._clock.seconds() // period * period)
        return DeferredList(list(self._sending), consumeErrors=True)


def backoff_delays(first: float = 5.0, cap: float = 600.0, total: float = 3600.0) -> tuple[float, ...]:
    """Doubling delays from C{first}, each at most C{cap}, until they add up to C{total}."""
    delays: list[float] = []
    delay = first
    while sum(delays) < total:
        delays.append(delay)
        delay = min(delay * 2, cap)
    return tuple(delays)


class WebhookError(Exception):
    """The endpoint answered with a status other than 2xx."""


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The C{X-Smtpplus-Signature} value: C{sha256=} and the hex HMAC-SHA256 of C{"<timestamp>.<body>"}."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _label(document: dict[str, Any]) -> str:
    """How the log names a POSTed document: an event by its id, a recipient result by message and address."""
    if "id" in document:
        return f"event {document['id']}"
    return f"{document['type']} result of {document['message_id']} for {document['recipient']}"


class WebhookSender:
    """
    POSTs each document (an event or a recipient result) as one JSON
    object, signed when a C{secret} is set.  A failed POST (connection
    error, timeout, non-2xx) is retried after doubling delays for about an
    hour, then dropped with an error in the log; each retry is signed anew
    with its own timestamp, so that receivers may refuse old timestamps.
    At most C{max_in_flight} POSTs run at once; at most C{max_backlog}
    documents wait, the oldest dropped first.
    """

    def __init__(
        self,
        url: str,
        clock: IReactorTime,
        agent: IAgent,
        delays: Sequence[float] = backoff_delays(),
        timeout: float = 30.0,
        max_in_flight: int = 4,
        max_backlog: int = 10000,
        pool: HTTPConnectionPool | None = None,
        secret: str = "",
    ) -> None:
        self._url = url.encode("ascii")
        self._clock = clock
        self._agent = agent
        self._delays = tuple(delays)
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._ready: deque[tuple[dict[str, Any], int]] = deque(maxlen=max_backlog)
        self._in_flight: set[Deferred[Any]] = set()
        self._waiting: set[IDelayedCall] = set()
        self._stopped = False
        self._pool = pool
        self._secret = secret

    def post(self, document: dict[str, Any]) -> None:
        """Queue one document for POSTing."""
        if self._ready.maxlen is not None and len(self._ready) == self._ready.maxlen:
            log.warn("webhook backlog full: dropping {what}", what=_label(self._ready[0][0]))
        self._ready.append((document, 0))
        self._pump()

    def _pump(self) -> None:
        while not self._stopped and self._ready and len(self._in_flight) < self._max_in_flight:
            document, attempt = self._ready.popleft()
            d = self._request(document)
            self._in_flight.add(d)
            d.addErrback(self._failed, document, attempt)
            d.addBoth(self._finished, d)

    def _request(self, document: dict[str, Any]) -> Deferred[None]:
        body = json.dumps(document).encode("utf-8")
        headers = Headers({b"Content-Type": [b"application/json"], b"User-Agent": [b"smtpplus"]})
        if self._secret:
            timestamp = str(int(self._clock.seconds()))
            headers.setRawHeaders(b"X-Smtpplus-Timestamp", [timestamp.encode("ascii")])
            headers.setRawHeaders(b"X-Smtpplus-Signature", [signature(self._secret, timestamp, body).encode("ascii")])
        d = self._agent.request(b"POST", self._url, headers, FileBodyProducer(BytesIO(body)))
        d.addCallback(self._check)
        d.addTimeout(self._timeout, self._clock)
        return d

    def _check(self, response: Any) -> Deferred[None]:
        d = readBody(response)
        # Only the status matters; a body cut short is no reason to resend.
        d.addErrback(lambda _: b"")

        def judge(_: bytes) -> None:
            if not 200 <= response.code < 300:
                raise WebhookError(f"HTTP {response.code}")

        return d.addCallback(judge)

    def _failed(self, failure: Any, document: dict[str, Any], attempt: int) -> None:
        if self._stopped:
            return
        if attempt >= len(self._delays):
            log.error("webhook: giving up on {what} after {n} attempts: {error}",
                      what=_label(document), n=attempt + 1, error=failure.getErrorMessage())
            return
        delay = self._delays[attempt]
        log.info("webhook: POST of {what} failed ({error}); retrying in {delay}s",
                 what=_label(document), error=failure.getErrorMessage(), delay=delay)
        call = self._clock.callLater(delay, self._retry, document, attempt + 1)
        self._waiting.add(call)

    def _retry(self, document: dict[str, Any], attempt: int) -> None:
        self._waiting = {c for c in self._waiting if c.active()}
        self._ready.append((document, attempt))
        self._pump()

    def _finished(self, result: Any, d: Deferred[Any]) -> None:
        self._in_flight.discard(d)
        self._pump()

    def stop(self) -> Deferred[Any] | None:
        """Cancel retries and POSTs in flight; events not yet delivered stay in the events table."""
        self._stopped = True
        for call in self._waiting:
            if call.active():
                call.cancel()
        self._waiting.clear()
        for d in list(self._in_flight):
            d.cancel()
        self._ready.clear()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None


# A recipient's status after an attempt -> the "type" of its message webhook.
RESULT_TYPES = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced"}


class Notifier(Service):
    """
    The event sink of L{smtpplus.notify.events.EventStore}: mails and webhook
    POSTs; with C{message_webhooks}, also the sink of the delivery agent's
    recipient results (a POST each, not stored as events).  Stopping sends
    the collected summaries and digests.

    With C{mail_locally} false (nodes sharing PostgreSQL), the events this
    node records are POSTed but not mailed: the leader mails every node's
    events (L{smtpplus.notify.shared}) through C{mail}.
    """

    name = "notifier"

    def __init__(
        self,
        mail: MailNotifier | None,
        webhook: WebhookSender | None,
        clock: IReactorTime | None = None,
        message_webhooks: bool = False,
        mail_locally: bool = True,
    ) -> None:
        self.mail = mail
        self.mail_locally = mail_locally
        self.webhook = webhook
        # Recipient results need the clock for their created_at.
        self._results: tuple[WebhookSender, IReactorTime] | None = None
        if message_webhooks and webhook is not None and clock is not None:
            self._results = (webhook, clock)

    def message_result(self, status: str, message_id: str, user: str | None, recipient: str, response: str) -> None:
        """
        POST one recipient's result of a delivery attempt when message
        webhooks are on.  C{status} is the recipient's new status (C{sent},
        C{deferred} or C{bounced}; others are no result and are ignored),
        C{response} the next hop's whole reply line.
        """
        kind = RESULT_TYPES.get(status)
        if self._results is None or kind is None:
            return
        webhook, clock = self._results
        webhook.post(
            {
                "type": kind,
                "message_id": message_id,
                "user": user,
                "recipient": recipient,
                "response": response,
                "created_at": iso_utc(clock.seconds()),
            }
        )

    def dispatch(self, event: dict[str, Any]) -> None:
        """Hand one stored event to both channels."""
        if self.webhook is not None:
            self.webhook.post(event)
        if self.mail is not None and self.mail_locally:
            self.mail.dispatch(event)

    def stopService(self) -> Deferred[Any] | None:
        Service.stopService(self)
        return self._close_channels()

    def _close_channels(self) -> Deferred[Any]:
        waits = []
        if self.webhook is not None:
            waits.append(self.webhook.stop())
        if self.mail is not None:
            waits.append(self.mail.flush())
        return DeferredList([d for d in waits if d is not None], consumeErrors=True)

    def take_over(self, new: Notifier) -> Deferred[Any]:
        """
        Send through C{new}'s channels from now on (a reloaded
        C{[notifications]}); the old ones send what they hold (the pending
        summaries and digests, the webhook retries) and stop.
        """
        old = Notifier(self.mail, self.webhook)
        self.mail, self.webhook, self._results = new.mail, new.webhook, new._results
        return old._close_channels()


def build_notifier(
    config: NotificationsConfig,
    hostname: str,
    reactor: Any,
    submit: Submit,
    agent: IAgent | None = None,
    shared: bool = False,
) -> Notifier:
    """
    A L{Notifier} for C{[notifications]}: mail when recipients are set, a
    webhook when a URL is set (POSTed by C{agent}, by default an L{Agent} on
    C{reactor} with a small pool of persistent connections; signed with
    C{webhook_secret} when set), recipient results to it when
    C{message_webhooks} is true.  With C{shared} (nodes sharing PostgreSQL)
    the mail is left to the leader's feed (see L{Notifier}).
    """
    mail = None
    if config.recipients:
        templates = load_templates(config.templates_dir)
        mail = MailNotifier(reactor, submit, hostname, config.recipients, dict(config.frequency), templates)
    webhook = None
    if config.webhook_url:
        pool = None
        if agent is None:
            pool = HTTPConnectionPool(reactor)
            agent = Agent(reactor, connectTimeout=30, pool=pool)
        webhook = WebhookSender(config.webhook_url, reactor, agent, pool=pool, secret=config.webhook_secret)
    return Notifier(mail, webhook, reactor, config.message_webhooks, mail_locally=not shared)
