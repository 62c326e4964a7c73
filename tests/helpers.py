"""
The names tests imported from here before L{tests.harness} existed, kept so
that such tests still run; new tests import from L{tests.harness} itself.
"""

from smtpplus.smtp.interfaces import SMTPReply
from tests.harness.daemon import TwistdProcess as Daemon
from tests.harness.daemon import daemon_config, spawn_twistd, start_daemon, temp_dir, twistd_command, write_config
from tests.harness.fakes import FakeLogin, FakeSubmitter, FakeWriter
from tests.harness.polling import wait_until
from tests.harness.ports import free_port, free_port_range, occupy, port_is_free, wait_for_ports
from tests.harness.smarthost import Smarthost as FakeSmarthost

__all__ = [
    "Daemon",
    "FakeLogin",
    "FakeSmarthost",
    "FakeSubmitter",
    "FakeWriter",
    "SMTPReply",
    "daemon_config",
    "free_port",
    "free_port_range",
    "occupy",
    "port_is_free",
    "spawn_twistd",
    "start_daemon",
    "temp_dir",
    "twistd_command",
    "wait_for_ports",
    "wait_until",
    "write_config",
]
