"""
The names tests imported from here before L{tests.harness} existed, kept so
that such tests still run; new tests import from L{tests.harness} itself.
"""

from tests.harness.fakes import Recorder
from tests.harness.messages import queue_id, simple_message
from tests.harness.polling import wait_until
from tests.harness.ports import free_port
from tests.harness.smarthost import Smarthost as FakeSmarthost
from tests.harness.smarthost import parse
from tests.harness.stack import PASSWORD, USER, Stack, make_config, smtp_submit, wall_clock
from tests.harness.tls import server_context as tls_context

__all__ = [
    "PASSWORD",
    "USER",
    "FakeSmarthost",
    "Recorder",
    "Stack",
    "free_port",
    "make_config",
    "parse",
    "queue_id",
    "simple_message",
    "smtp_submit",
    "tls_context",
    "wait_until",
    "wall_clock",
]
