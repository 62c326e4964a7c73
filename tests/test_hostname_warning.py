"""
At start-up the real twistd names a hostname that other servers would not
accept (C{localhost}, no dot) in one warning line saying how to set it.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from tests.harness.daemon import daemon_config, start_daemon, temp_dir
from tests.harness.ports import free_port_range

HINT = 'set it in the config file, e.g. [server] hostname = "mail.example.com"'


class HostnameWarningTests(unittest.TestCase):
    def start(self, hostname: str) -> str:
        """Start a daemon with C{hostname}; its output once its ports accept (warnings come before)."""
        smtp_port, admin_port = free_port_range(2)
        state_dir = os.path.join(temp_dir(self), "state")
        config = daemon_config(state_dir, [smtp_port], admin_port).replace(
            'hostname = "mx.test.example"', f'hostname = "{hostname}"'
        )
        daemon = start_daemon(self, config, wait_ports=[smtp_port, admin_port])
        return daemon.output()

    def test_bare_names_warned(self) -> None:
        """'localhost' and 'mail' each give exactly one warning line naming the name and [server] hostname."""
        for hostname in ("localhost", "mail"):
            lines = [line for line in self.start(hostname).splitlines() if "[server] hostname" in line]
            self.assertEqual(len(lines), 1, lines)
            self.assertIn(f"configuration warning: [server] hostname: '{hostname}' is not a fully qualified", lines[0])
            self.assertIn(HINT, lines[0])

    def test_qualified_name_quiet(self) -> None:
        """A fully qualified hostname gives no hostname warning."""
        output = self.start("relay.example.test")
        self.assertIn("SMTP listening", output)
        self.assertNotIn("[server] hostname", output)
