"""
Configuration parsing: port specs, the contract's defaults, and one clear
line for every wrong value — also from the real twistd command line.
"""

from __future__ import annotations

import os
import re

import attrs
from twisted.trial import unittest

from smtpplus.config import (
    AdminConfig,
    Config,
    ConfigError,
    SecurityConfig,
    ServerConfig,
    TLSConfig,
    config_from_text,
    config_warnings,
    format_port_list,
    load_config,
    parse_port_spec,
)
from tests.harness.daemon import daemon_config, spawn_twistd, start_daemon, temp_dir
from tests.harness.ports import free_port_range

ETC_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "smtpplus.toml")


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
            {t: "immediate" for t in ("sender_domain", "send_problem", "bounce", "delivery_delay", "account_block", "priority_budget")},
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


class DeclarationTests(unittest.TestCase):
    """Each key is declared once, as an attrs field: the loader, the defaults and etc/ agree."""

    def test_defaults_in_code(self) -> None:
        """A Config built in code has exactly the defaults an empty file gives; positional construction still works."""
        loaded = config_from_text("")
        self.assertEqual(Config(server=ServerConfig(hostname=loaded.server.hostname)), loaded)
        self.assertEqual(AdminConfig("::1", 9000, "secret-token", True).listen, "::1")
        self.assertEqual(TLSConfig("c.pem", "k.pem").profile, "intermediate")
        self.assertEqual(SecurityConfig(5, 3, 60).auth_lock_seconds, 60)
        self.assertEqual(SecurityConfig(), loaded.security)

    def test_etc_lists_every_key_with_its_default(self) -> None:
        """
        Uncommenting every `# key = value` line of etc/smtpplus.toml gives the
        defaults, and every key of every section is listed there.
        """
        with open(ETC_CONFIG, encoding="utf-8") as f:
            lines = f.read().splitlines()
        listed = re.compile(r"^# ([a-z_]+) = ")
        uncommented = [line[2:] if listed.match(line) and "hostname" not in line else line for line in lines]
        self.assertEqual(config_from_text("\n".join(uncommented)), config_from_text(""))
        keys = {listed.match(line).group(1) for line in lines if listed.match(line)}  # type: ignore[union-attr]
        declared = {
            field.metadata["smtpplus.config"].name or field.name
            for section in attrs.fields(Config)
            for field in attrs.fields(type(getattr(config_from_text(""), section.name)))
            if field.init
        }
        self.assertEqual(keys, declared)


class CheckTests(unittest.TestCase):
    """The checks added with the declarative loader: one exact line each."""

    def assert_errors(self, text: str, *expected: str, overrides: dict | None = None) -> None:
        with self.assertRaises(ConfigError, msg=text) as caught:
            config_from_text(text, overrides)
        self.assertEqual(list(caught.exception.errors), list(expected))

    def test_hostname(self) -> None:
        """A configured hostname is an ASCII DNS name; a Unicode one is refused with its xn-- form."""
        for name in ("relay.example.test", "localhost", "xn--bcher-kva.example", "a-b.c1", "a" * 63 + ".example"):
            self.assertEqual(config_from_text(f'[server]\nhostname = "{name}"\n').server.hostname, name)
        syntax = "is not a valid host name (letters, digits and hyphens in dot-separated labels)"
        for name in ("bad_host.example", "-a.example", "a-.example", "a..b", "relay.example.", "a" * 64 + ".example",
                     ".".join(["a" * 63] * 4), "mail example", "a\u2028b", "bad_ü.example", "ü..example"):
            self.assert_errors(f'[server]\nhostname = "{name}"\n', f"[server] hostname: {name!r} {syntax}")
        self.assert_errors(
            '[server]\nhostname = "bücher.example"\n',
            "[server] hostname: 'bücher.example' is not ASCII: write it as 'xn--bcher-kva.example'",
        )
        self.assert_errors('[server]\nhostname = ""\n', "[server] hostname: must not be empty")

    def test_listen(self) -> None:
        """[smtp] and [admin] listen take an IPv4 or IPv6 address or "localhost", nothing else."""
        for address in ("0.0.0.0", "::", "::1", "127.0.0.1", "localhost", "fe80::1%lo"):
            c = config_from_text(f'[smtp]\nlisten = "{address}"\n[admin]\nlisten = "{address}"\n')
            self.assertEqual((c.smtp.listen, c.admin.listen), (address, address))
        self.assert_errors(
            '[smtp]\nlisten = "mail.example.com"\n[admin]\nlisten = "127.0.0.1:8025"\n',
            "[smtp] listen: 'mail.example.com' is not an IPv4 or IPv6 address (or \"localhost\")",
            "[admin] listen: '127.0.0.1:8025' is not an IPv4 or IPv6 address (or \"localhost\")",
        )
        self.assert_errors('[admin]\nlisten = ""\n', "[admin] listen: must not be empty")

    def test_notification_recipients(self) -> None:
        """[notifications] recipients are email addresses."""
        c = config_from_text('[notifications]\nrecipients = ["postmaster@admin.test", "ops@example.org"]\n')
        self.assertEqual(c.notifications.recipients, ("postmaster@admin.test", "ops@example.org"))
        self.assert_errors(
            '[notifications]\nrecipients = ["ops@example.org", "postmaster"]\n',
            "[notifications] recipients: 'postmaster' is not an email address",
        )
        self.assert_errors('[notifications]\nrecipients = ["a@b c"]\n', "[notifications] recipients: 'a@b c' is not an email address")
        self.assert_errors('[notifications]\nrecipients = [1]\n', "[notifications] recipients: must be a list of strings")

    def test_templates_dir(self) -> None:
        """[notifications] templates_dir, when set, is an existing directory."""
        directory = temp_dir(self)
        self.assertEqual(config_from_text(f'[notifications]\ntemplates_dir = "{directory}"\n').notifications.templates_dir, directory)
        missing = os.path.join(directory, "none")
        self.assert_errors(f'[notifications]\ntemplates_dir = "{missing}"\n', f"[notifications] templates_dir: {missing}: no such directory")
        a_file = os.path.join(directory, "file")
        open(a_file, "w").close()
        self.assert_errors(f'[notifications]\ntemplates_dir = "{a_file}"\n', f"[notifications] templates_dir: {a_file}: is not a directory")

    def test_port_in_both_sets(self) -> None:
        """A port listed in both ports and tls_ports (also after --ports) is refused, naming the ports."""
        self.assert_errors(
            '[smtp]\nports = "25,465-470"\ntls_ports = "465,466,1000"\n',
            "[smtp] tls_ports: 465-466 also in [smtp] ports; a port is either STARTTLS or implicit TLS",
        )
        self.assert_errors(
            '[smtp]\ntls_ports = "465,2465"\n',
            "[smtp] tls_ports: 2465 also in [smtp] ports; a port is either STARTTLS or implicit TLS",
        )
        self.assert_errors(
            '[smtp]\nports = "25"\ntls_ports = "465"\n',
            "[smtp] tls_ports: 465 also in [smtp] ports; a port is either STARTTLS or implicit TLS",
            overrides={"smtp": {"ports": "465"}},
        )
        self.assertEqual(config_from_text('[smtp]\ntls_ports = "2465"\n', {"smtp": {"ports": "25"}}).smtp.tls_ports, (2465,))

    def test_overrides_checked(self) -> None:
        """The command-line overrides are checked like the file: --state-dir, --admin-port, --ports."""
        self.assert_errors(
            "",
            "[server] state_dir: must not be empty",
            "[smtp] ports: port 0 is out of range 1-65535",
            "[admin] port: port 0 is out of range 1-65535",
            overrides={"server": {"state_dir": " "}, "smtp": {"ports": "0"}, "admin": {"port": 0}},
        )

    def test_every_error_reported(self) -> None:
        """Several problems in several sections give one line each, in section and key order."""
        text = (
            "tls = 3\n"
            "[bogus]\nx = 1\n"
            '[server]\nhostname = "bad_host"\n'
            '[smtp]\nlistn = "::"\nports = "70000"\nmax_recipients = "10"\n'
            "[delivery]\nretry_schedule = []\n"
            "[security]\nauth_lock_seconds = 0\n"
        )
        with self.assertRaises(ConfigError) as caught:
            config_from_text(text)
        self.assertEqual(
            list(caught.exception.errors),
            [
                "[bogus]: unknown section",
                "[server] hostname: 'bad_host' is not a valid host name (letters, digits and hyphens in dot-separated labels)",
                "[smtp] listn: unknown key",
                "[smtp] ports: port 70000 is out of range 1-65535",
                "[smtp] max_recipients: must be an integer, not '10'",
                "[tls]: must be a table",
                "[delivery] retry_schedule: must list at least one interval",
                "[security] auth_lock_seconds: must be greater than 0",
            ],
        )
        self.assertEqual(str(caught.exception), "\n".join(caught.exception.errors))

    def test_section_checks(self) -> None:
        """An added section check runs once that section's keys are valid, and its error joins the others."""
        seen = []

        def check(tls: TLSConfig) -> None:
            seen.append(tls)
            raise ConfigError("[tls] certificate: unusable")

        with self.assertRaises(ConfigError) as caught:
            config_from_text('[server]\nstate_dir = ""\n[tls]\ncertificate = "c.pem"\n', checks={TLSConfig: check})
        self.assertEqual(
            list(caught.exception.errors), ["[server] state_dir: must not be empty", "[tls] certificate: unusable"]
        )
        self.assertEqual(seen, [TLSConfig("c.pem")])
        with self.assertRaises(ConfigError):
            config_from_text('[tls]\nprofile = "modern"\n', checks={TLSConfig: check})
        self.assertEqual(len(seen), 1)

    def test_short_token_warning(self) -> None:
        """A configured admin token below 16 characters is a warning line, not an error; empty or long is quiet."""
        named = '[server]\nhostname = "relay.example.test"\n'
        short = config_from_text(named + '[admin]\ntoken = "fifteen-chars!!"\n')
        self.assertEqual(
            config_warnings(short),
            ["[admin] token: 15 characters is easy to guess; use at least 16 (or leave it empty to have one generated)"],
        )
        self.assertEqual(config_warnings(config_from_text(named + '[admin]\ntoken = "sixteen-chars!!!"\n')), [])
        self.assertEqual(config_warnings(config_from_text(named)), [])

    def test_hostname_warning(self) -> None:
        """A hostname without a dot, or localhost.localdomain, is one warning line saying how to set it."""
        for name in ("localhost", "mail", "localhost.localdomain"):
            self.assertEqual(
                config_warnings(config_from_text(f'[server]\nhostname = "{name}"\n')),
                [
                    f"[server] hostname: {name!r} is not a fully qualified domain name (it is the EHLO name,"
                    " the banner and the Received: host; when unset, the machine's FQDN);"
                    ' set it in the config file, e.g. [server] hostname = "mail.example.com"'
                ],
            )
        for name in ("relay.example.test", "localhost.example.com", "mx1.xn--bcher-kva.example"):
            self.assertEqual(config_warnings(config_from_text(f'[server]\nhostname = "{name}"\n')), [], name)


class CommandLineTests(unittest.TestCase):
    def run_twistd(self, config_text: str, *args: str, directory: str | None = None) -> tuple[int | None, str]:
        directory = directory or temp_dir(self)
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

    def test_every_error_on_command_line(self) -> None:
        """
        Several wrong values (file, --ports and --admin-port, the TLS files)
        print one line each, no traceback, exit 1, and state_dir is not
        created.
        """
        directory = temp_dir(self)
        state_dir = os.path.join(directory, "state")
        status, output = self.run_twistd(
            f'[server]\nhostname = "bad_host"\nstate_dir = "{state_dir}"\n'
            '[smtp]\ntls_ports = "465"\n'
            '[tls]\ncertificate = "/nonexistent/c.pem"\nprivate_key = "/nonexistent/k.pem"\n'
            '[admin]\nlisten = "admin.example"\ntoken = "short"\n'
            f'[notifications]\nrecipients = ["postmaster"]\ntemplates_dir = "{directory}/none"\n',
            "--ports", "25,465",
            "--admin-port", "eighty",
            directory=directory,
        )
        self.assertEqual(status, 1, output)
        self.assertEqual(
            output.splitlines(),
            [
                "smtpplus: configuration error: --admin-port: 'eighty' is not a port number",
                "smtpplus: configuration error: [server] hostname: 'bad_host' is not a valid host name"
                " (letters, digits and hyphens in dot-separated labels)",
                "smtpplus: configuration error: [smtp] tls_ports: 465 also in [smtp] ports;"
                " a port is either STARTTLS or implicit TLS",
                "smtpplus: configuration error: [tls] certificate: cannot read /nonexistent/c.pem: No such file or directory",
                "smtpplus: configuration error: [admin] listen: 'admin.example' is not an IPv4 or IPv6 address"
                ' (or "localhost")',
                "smtpplus: configuration error: [notifications] recipients: 'postmaster' is not an email address",
                f"smtpplus: configuration error: [notifications] templates_dir: {directory}/none: no such directory",
            ],
        )
        self.assertFalse(os.path.exists(state_dir))

    def test_short_token_warned_at_start(self) -> None:
        """A short admin token starts the daemon and names [admin] token in one warning line."""
        smtp_port, admin_port = free_port_range(2)
        state_dir = os.path.join(temp_dir(self), "state")
        config = daemon_config(state_dir, [smtp_port], admin_port, extra="").replace(
            f"port = {admin_port}\n", f'port = {admin_port}\ntoken = "tiny"\n'
        )
        daemon = start_daemon(self, config, wait_ports=[smtp_port, admin_port])
        warning = "configuration warning: [admin] token: 4 characters is easy to guess; use at least 16"
        self.assertTrue(daemon.wait_for_output(warning, 10), daemon.output())
        self.assertEqual(len([line for line in daemon.output().splitlines() if "[admin] token" in line]), 1)
        self.assertNotIn("tiny", daemon.output())
