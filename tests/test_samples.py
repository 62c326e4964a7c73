"""
The client samples of README's "Mail client settings" run as printed
against a real daemon: each is taken from the README, given this daemon's
host, port, password and certificate file, run as its own process (Python,
PHP with PHPMailer, Node with nodemailer, swaks), and its message must
reach the smarthost sink.  PHP, Node and swaks samples are skipped, with
the reason, where the interpreter or the library is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from twisted.trial import unittest

from tests.harness.daemon import Daemon, Shared

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
DEBIAN_PHPMAILER = "/usr/share/php/libphp-phpmailer/autoload.php"
PASSWORD_PLACEHOLDER = "k3v9-x2qa-..."
CA_PLACEHOLDER = "/etc/ssl/smtpplus-ca.pem"


def readme_sample(label: str) -> str:
    """The first fenced code block after the bold C{label} line of README.md."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    match = re.search(rf"^\*\*{re.escape(label)}\*\*.*?\n```\w*\n(.*?)^```", text, re.M | re.S)
    assert match, f"no sample {label!r} in README.md"
    return match.group(1)


def _config(daemon: Daemon) -> str:
    # "localhost" so that the generated certificate's name is one the
    # clients can connect to here (the hostname warning is expected).
    return daemon.toml(hostname="localhost")


class _Relay(Daemon):
    """The daemon, a user allowed to send for example.com, and the CA file made as README says."""

    def __init__(self) -> None:
        super().__init__(_config, plain=1, tls=0)
        _, self.password = self.create_user(username="shop", authorized_domains="example.com")
        tls_dir = os.path.join(self.state_dir, "tls")
        self.cafile = os.path.join(self.directory, "smtpplus-ca.pem")
        with open(self.cafile, "wb") as out:
            for name in ("cert.pem", "rsa-cert.pem"):
                with open(os.path.join(tls_dir, name), "rb") as f:
                    out.write(f.read())


_RELAY = Shared(_Relay)


def _relay() -> _Relay:
    relay = _RELAY.get()
    assert isinstance(relay, _Relay)
    return relay


class SampleTests(unittest.TestCase):
    """Each README client sample delivers its message through a real daemon."""

    def adapt(self, sample: str, relay: _Relay) -> str:
        """The sample with this daemon's host, port, password and CA file; each must occur."""
        port = str(relay.plain_ports[0])
        for old, new in (
            ("relay.example.com", "localhost"),
            ("587", port),
            (PASSWORD_PLACEHOLDER, relay.password),
            (CA_PLACEHOLDER, relay.cafile),
        ):
            self.assertIn(old, sample)
            sample = sample.replace(old, new)
        return sample

    def run_sample(self, argv: list[str], directory: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            argv, cwd=directory, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        self.assertEqual(result.returncode, 0, f"{argv[0]} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def assert_arrived(self, relay: _Relay, body: str, mailer: str = "") -> None:
        assert relay.sink is not None
        received = relay.sink.wait_for(body, timeout=20)
        self.assertEqual(received.mail_from, "noreply@example.com")
        self.assertEqual(received.rcpt_tos, ["you@example.org"])
        self.assertEqual(received.message["Subject"], "Hello")
        if mailer:
            self.assertIn(mailer, received.message.get("X-Mailer", ""))

    def workdir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def test_python(self) -> None:
        """The smtplib sample verifies the certificate with the CA file and its message arrives."""
        relay = _relay()
        directory = self.workdir()
        path = os.path.join(directory, "send.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.adapt(readme_sample("Python"), relay))
        self.run_sample([sys.executable, path], directory)
        self.assert_arrived(relay, "Sent from Python through smtpplus")

    def test_php(self) -> None:
        """The PHPMailer sample runs as a PHP script with 'vendor/autoload.php' and its message arrives."""
        php = shutil.which("php")
        autoload = os.environ.get("SMTPPLUS_PHPMAILER_AUTOLOAD", DEBIAN_PHPMAILER)
        if php is None or not os.path.exists(autoload):
            raise unittest.SkipTest(
                "needs php and PHPMailer (apt-get install php-cli libphp-phpmailer,"
                " or SMTPPLUS_PHPMAILER_AUTOLOAD=path/to/vendor/autoload.php)"
            )
        relay = _relay()
        directory = self.workdir()
        os.makedirs(os.path.join(directory, "vendor"))
        # Stands in for composer's vendor/autoload.php, so the sample's own
        # require line is run unchanged.
        with open(os.path.join(directory, "vendor", "autoload.php"), "w", encoding="utf-8") as f:
            f.write(f"<?php\nrequire {autoload!r};\n")
        with open(os.path.join(directory, "send.php"), "w", encoding="utf-8") as f:
            f.write(self.adapt(readme_sample("PHP"), relay))
        self.assertEqual(self.run_sample([php, "send.php"], directory), "sent\n")
        self.assert_arrived(relay, "Sent from PHPMailer through smtpplus", mailer="PHPMailer")

    def test_node(self) -> None:
        """The nodemailer sample runs as a CommonJS script and its message arrives."""
        node = shutil.which("node")
        if node is None or subprocess.run([node, "-e", "require('nodemailer')"], capture_output=True).returncode:
            raise unittest.SkipTest(
                "needs node and nodemailer (npm install nodemailer, then NODE_PATH=.../node_modules)"
            )
        relay = _relay()
        directory = self.workdir()
        with open(os.path.join(directory, "send.js"), "w", encoding="utf-8") as f:
            f.write(self.adapt(readme_sample("Node.js"), relay))
        output = self.run_sample([node, "send.js"], directory)
        self.assertRegex(output, r"^250 2\.0\.0 Ok: queued as \S+\n$")
        self.assert_arrived(relay, "Sent from nodemailer through smtpplus")

    def test_swaks(self) -> None:
        """The swaks sample, with --tls-verify against the CA file, gets 250 and its message arrives."""
        swaks = shutil.which("swaks")
        if swaks is None:
            raise unittest.SkipTest("needs swaks (apt-get install swaks)")
        relay = _relay()
        directory = self.workdir()
        command = self.adapt(readme_sample("swaks"), relay)
        output = self.run_sample(["sh", "-c", command], directory)
        self.assertRegex(output, r"<~  250 2\.0\.0 Ok: queued as \S+")
        self.assert_arrived(relay, "Sent from swaks through smtpplus")

    def test_swaks_refuses_an_untrusted_certificate(self) -> None:
        """Without the CA file, swaks --tls-verify refuses the self-signed certificate: the option is a real check."""
        swaks = shutil.which("swaks")
        if swaks is None:
            raise unittest.SkipTest("needs swaks (apt-get install swaks)")
        relay = _relay()
        command = self.adapt(readme_sample("swaks"), relay).replace(f"--tls-ca-path {relay.cafile}", "")
        result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("certificate verify failed", result.stdout + result.stderr)
