"""
Configuration parsing: port specs, the contract's defaults, and one clear
line for every wrong value — also from the real twistd command line.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from smtpplus.config import ConfigError, config_from_text, format_port_list, load_config, parse_port_spec
from tests.helpers import spawn_twistd, temp_dir


class PortSpecTests(unittest.TestCase):
    def test_ranges_and_dedupe(self) -> None:
        """Items and inclusive ranges are merged, sorted and deduplicated."""
        self.assertEqual(parse_port_spec("26, 23,25-27,25"), (23, 25, 26, 27))
        self.assertEqual(parse_port_spec("1025-1025"), (1025,))
        self.assertEqual(parse_port_spec("  "), ())
        self.assertEqual(len(parse_port_spec("23,25,26,587,1025-5000")), 3980)

    def test_rejected(self) -> None:
        """Out-of-range ports, reversed ranges, empty items and words are refused with a reason."""
        cases = {
            "70000": "port 70000 is out of range 1-65535",
            "0": "out of range",
            "5000-1025": "'5000-1025' ends before it starts",
            "25,,26": "empty item",
            "abc": "'abc' is not a port number or range",
            "25-": "not a port number",
            "-5": "not a port number",
            "1-2-3": "not a port number",
        }
        for spec, reason in cases.items():
            with self.assertRaises(ValueError, msg=spec) as caught:
                parse_port_spec(spec)
            self.assertIn(reason, str(caught.exception), spec)

    def test_format_round_trip(self) -> None:
        """format_port_list renders the compact spec that parses back to the same ports."""
        ports = parse_port_spec("23,25,26,587,1025-5000")
        self.assertEqual(format_port_list(ports), "23,25-26,587,1025-5000")
        self.assertEqual(parse_port_spec(format_port_list(ports)), ports)


class ConfigTests(unittest.TestCase):
    def test_defaults(self) -> None:
        """An empty file gives exactly the defaults of the contract."""
        c = config_from_text("")
        self.assertTrue(c.server.hostname)
        self.assertEqual(c.server.state_dir, "var")
        s = c.smtp
        self.assertEqual(s.listen, "0.0.0.0")
        self.assertEqual(s.ports_spec, "23,25,26,587,1025-5000")
        self.assertEqual(s.ports, parse_port_spec("23,25,26,587,1025-5000"))
        self.assertEqual((s.tls_ports_spec, s.tls_ports), ("", ()))
        self.assertFalse(s.require_all_ports)
        self.assertTrue(s.auth_requires_tls)
        self.assertEqual(
            (s.max_message_size, s.max_recipients, s.max_connections, s.max_connections_per_ip, s.idle_timeout),
            (26214400, 1000, 2000, 100, 300),
        )
        self.assertEqual((c.tls.certificate, c.tls.private_key, c.tls.profile), ("", "", "intermediate"))
        d = c.delivery
        self.assertEqual((d.mode, d.smarthost, d.smarthost_username, d.smarthost_password), ("mx", "", "", ""))
        self.assertEqual(d.smarthost_tls, "opportunistic")
        self.assertEqual(d.dns_servers, ())
        self.assertEqual((d.max_concurrency, d.rate_limit), (20, 0))
        self.assertEqual(d.retry_schedule, (60, 300, 900, 3600, 14400))
        self.assertEqual(d.max_queue_lifetime, 432000)
        self.assertEqual((c.admin.listen, c.admin.port, c.admin.token), ("127.0.0.1", 8025, ""))
        n = c.notifications
        self.assertEqual((n.recipients, n.webhook_url, n.delivery_delay_threshold, n.templates_dir), ((), "", 3600, ""))
        self.assertEqual(
            dict(n.frequency),
            {t: "immediate" for t in ("sender_domain", "send_problem", "bounce", "delivery_delay", "account_block")},
        )
        sec = c.security
        self.assertEqual((sec.auth_failures_per_ip, sec.auth_failures_per_user, sec.auth_lock_seconds), (10, 10, 900))

    def test_values_read(self) -> None:
        """Set values are used, a partial frequency table is merged with the defaults."""
        c = config_from_text(
            '[smtp]\nports = "2525,2600-2601"\ntls_ports = "465"\nauth_requires_tls = false\n'
            '[delivery]\nmode = "smarthost"\nsmarthost = "relay.example:587"\nrate_limit = 2.5\n'
            '[notifications]\nfrequency = { bounce = "daily" }\n'
            '[tls]\nprofile = "compatible"\n'
        )
        self.assertEqual(c.tls.profile, "compatible")
        self.assertEqual(c.smtp.ports, (2525, 2600, 2601))
        self.assertEqual(c.smtp.ports_spec, "2525,2600-2601")
        self.assertEqual(c.smtp.tls_ports, (465,))
        self.assertFalse(c.smtp.auth_requires_tls)
        self.assertEqual(c.delivery.smarthost, "relay.example:587")
        self.assertEqual(c.delivery.rate_limit, 2.5)
        self.assertEqual(c.notifications.frequency["bounce"], "daily")
        self.assertEqual(c.notifications.frequency["sender_domain"], "immediate")

    def test_overrides(self) -> None:
        """Command-line overrides replace file values and are validated like them."""
        c = config_from_text('[smtp]\nports = "25"\n', {"smtp": {"ports": "2525-2526"}, "admin": {"port": 9000}})
        self.assertEqual(c.smtp.ports, (2525, 2526))
        self.assertEqual(c.smtp.ports_spec, "2525-2526")
        self.assertEqual(c.admin.port, 9000)
        with self.assertRaises(ConfigError) as caught:
            config_from_text("", {"smtp": {"ports": "70000"}})
        self.assertEqual(str(caught.exception), "[smtp] ports: port 70000 is out of range 1-65535")

    def test_admin_tls(self) -> None:
        """[admin] tls is false by default, read as a boolean, and anything else is one line naming the key."""
        self.assertFalse(config_from_text("").admin.tls)
        self.assertTrue(config_from_text("[admin]\ntls = true\n").admin.tls)
        for text, message in {
            '[admin]\ntls = "yes"\n': "[admin] tls: must be true or false, not 'yes'",
            "[admin]\ntls = 1\n": "[admin] tls: must be true or false, not 1",
            "[admin]\ntsl = true\n": "[admin] tsl: unknown key",
        }.items():
            with self.assertRaises(ConfigError, msg=text) as caught:
                config_from_text(text)
            self.assertEqual(str(caught.exception), message)

    def test_errors_name_the_key(self) -> None:
        """Each wrong value raises one line naming the section, the key and the problem."""
        cases = {
            "[smtp]\nports = \"5000-1025\"\n": "[smtp] ports: range '5000-1025' ends before it starts",
            "[bogus]\nx = 1\n": "[bogus]: unknown section",
            "[smtp]\nport = 25\n": "[smtp] port: unknown key",
            "[smtp]\nmax_recipients = \"10\"\n": "[smtp] max_recipients: must be an integer, not '10'",
            "[smtp]\nrequire_all_ports = 1\n": "[smtp] require_all_ports: must be true or false, not 1",
            "[smtp]\nmax_connections = true\n": "[smtp] max_connections: must be an integer, not True",
            "[smtp]\nidle_timeout = 0\n": "[smtp] idle_timeout: must be greater than 0",
            "[admin]\nport = 70000\n": "[admin] port: port 70000 is out of range 1-65535",
            "[delivery]\nmode = \"pigeon\"\n": "[delivery] mode: must be one of 'mx', 'smarthost'",
            "[tls]\nprofile = \"modern\"\n": "[tls] profile: must be one of 'intermediate', 'compatible'",
            "[delivery]\nmode = \"smarthost\"\n": '[delivery] smarthost: must be "host:port" when mode = "smarthost"',
            "[delivery]\nretry_schedule = []\n": "[delivery] retry_schedule: must list at least one interval",
            "smtp = 3\n": "[smtp]: must be a table",
            "[notifications]\nfrequency = { bounce = \"weekly\" }\n": "[notifications] frequency: bounce must be one of",
        }
        for text, message in cases.items():
            with self.assertRaises(ConfigError, msg=text) as caught:
                config_from_text(text)
            self.assertIn(message, str(caught.exception), text)
            self.assertNotIn("\n", str(caught.exception))

    def test_bad_toml(self) -> None:
        """Text that is not TOML is one ConfigError line."""
        with self.assertRaises(ConfigError) as caught:
            config_from_text("[smtp\n")
        self.assertTrue(str(caught.exception).startswith("not valid TOML:"))

    def test_missing_file(self) -> None:
        """An unreadable config file is a ConfigError naming the file."""
        missing = os.path.join(temp_dir(self), "nope.toml")
        with self.assertRaises(ConfigError) as caught:
            load_config(missing)
        self.assertIn(missing, str(caught.exception))


class CommandLineTests(unittest.TestCase):
    def run_twistd(self, config_text: str, *args: str) -> tuple[int | None, str]:
        directory = temp_dir(self)
        path = os.path.join(directory, "bad.toml")
        with open(path, "w") as f:
            f.write(config_text)
        daemon = spawn_twistd(["--config", path, *args], directory)
        self.addCleanup(daemon.kill)
        return daemon.wait(60), daemon.output()

    def assert_one_clear_line(self, status: int | None, output: str, expected: str) -> None:
        self.assertIsNotNone(status, "twistd did not exit")
        self.assertNotEqual(status, 0)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if expected in line]
        self.assertEqual(len(lines), 1, output)

    def test_bad_port_spec_on_command_line(self) -> None:
        """`twistd smtpplus --config bad.toml` with a bad port spec prints one line, no traceback, exits non-zero."""
        status, output = self.run_twistd('[smtp]\nports = "70000"\n')
        self.assert_one_clear_line(status, output, "[smtp] ports: port 70000 is out of range 1-65535")

    def test_unknown_key_on_command_line(self) -> None:
        """An unknown key stops twistd with one line naming it."""
        status, output = self.run_twistd("[smtp]\nlisten_port = 25\n")
        self.assert_one_clear_line(status, output, "[smtp] listen_port: unknown key")

    def test_bad_override_on_command_line(self) -> None:
        """A bad --ports override is reported like a bad file value."""
        status, output = self.run_twistd("", "--ports", "5000-1025")
        self.assert_one_clear_line(status, output, "[smtp] ports: range '5000-1025' ends before it starts")

    def test_unreadable_certificate_on_command_line(self) -> None:
        """A certificate path that cannot be read stops start-up with one line naming [tls] certificate."""
        status, output = self.run_twistd('[tls]\ncertificate = "/nonexistent/c.pem"\nprivate_key = "/nonexistent/k.pem"\n')
        self.assert_one_clear_line(status, output, "[tls] certificate: cannot read /nonexistent/c.pem")

    def test_bad_admin_tls_on_command_line(self) -> None:
        """A non-boolean [admin] tls stops twistd with one line naming it."""
        status, output = self.run_twistd('[admin]\ntls = "on"\n')
        self.assert_one_clear_line(status, output, "[admin] tls: must be true or false, not 'on'")
