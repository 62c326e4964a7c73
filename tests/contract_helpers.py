"""
The names tests imported from here before L{tests.harness} existed, kept so
that such tests still run; new tests import from L{tests.harness} itself.
"""

from tests.harness.clients import (
    RawSession,
    Response,
    WebhookReceiver,
    api_request,
    logged_in,
    loopback_source,
    smtp,
    submit,
)
from tests.harness.daemon import Daemon, Shared, run_configs
from tests.harness.messages import QUEUED_RE, message, plain_auth, queue_id
from tests.harness.polling import poll
from tests.harness.smarthost import Received, Smarthost
from tests.harness.tls import client_context as tls_context


class Sink(Smarthost):
    """The smarthost with its address conventions (C{bounce*}, C{defer*}, C{slow*}) on."""

    def __init__(self, port: int, start: bool = True) -> None:
        super().__init__(port, conventions=True, start=start)


__all__ = [
    "QUEUED_RE",
    "Daemon",
    "RawSession",
    "Received",
    "Response",
    "Shared",
    "Sink",
    "WebhookReceiver",
    "api_request",
    "logged_in",
    "loopback_source",
    "message",
    "plain_auth",
    "poll",
    "queue_id",
    "run_configs",
    "smtp",
    "submit",
    "tls_context",
]
