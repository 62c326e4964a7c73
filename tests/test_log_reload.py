"""
The log of CONTRACT.md section 6 ([log] format and level, the session,
accepted, refusal and delivery-attempt lines) and SIGHUP (reload of the
configuration file, log file reopened), against the real twistd.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import socket
import ssl
from typing import Any

from twisted.internet.defer import succeed
from twisted.logger import LogLevel, formatEvent
from twisted.trial import unittest

from smtpplus.config import ConfigError, LogConfig, config_from_text
from smtpplus.log import DaemonLog, Destination
from smtpplus.reload import Appliers, Reloader, changed_keys, hold_sighup
from smtpplus.smtp.tls import generate_self_signed
from tests.contract_helpers import (
    Daemon,
    RawSession,
    logged_in,
    message,
    plain_auth,
    poll,
    queue_id,
    submit,
)
from tests.harness.smarthost import DATA_REPLY
from tests.helpers import spawn_twistd

ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)$")
PASSWORD_MARK = "pw-"
BODY_MARK = "body-content-never-logged"


def config(d: Daemon, log: str = "", extra: str = "") -> str:
    return f"""
[server]
hostname = "mx.logs.test"
state_dir = "{d.state_dir}"

[smtp]
listen = "127.0.0.1"
ports = "{d.plain_ports[0]}"
tls_ports = ""

[delivery]
mode = "smarthost"
smarthost = "127.0.0.1:{d.sink_port}"
smarthost_tls = "none"
retry_schedule = [600]

[admin]
listen = "127.0.0.1"
port = {d.admin_port}

[log]
{log}
{extra}
"""


def start(testcase: unittest.TestCase, log: str = "", extra: str = "", **kw: Any) -> Daemon:
    d = Daemon(lambda d: config(d, log, extra), plain=1, tls=0, **kw)
    testcase.addCleanup(d.stop)
    return d


def one_session(d: Daemon) -> tuple[str, str]:
    """
    A session with a refused sender, then a message for one recipient the
    sink takes and one it defers; returns (message id, password).
    """
    username, password = d.create_user(username="shop", authorized_domains=["allowed.test"])
    client = logged_in(d.plain_ports[0], username, password)
    code, _ = client.mail("intruder@elsewhere.test")
    assert code == 550, code
    client.rset()
    reply = submit(
        client, "news@allowed.test", ["ok@dest.test", "defer@dest.test"], message(body=BODY_MARK, from_="news@allowed.test")
    )
    client.quit()
    return queue_id(reply), password


def reload_and_wait(d: Daemon, count: int) -> None:
    """SIGHUP the daemon and wait until it has logged its C{count}th reload result."""
    d.process.proc.send_signal(signal.SIGHUP)
    done = poll(lambda: _reloads(d.process.output()) >= count, 15)
    assert done, d.process.output()


def _reloads(output: str) -> int:
    return output.count("configuration reloaded") + output.count("configuration error") + output.count(
        "configuration reload failed"
    )


def fingerprint(port: int) -> tuple[RawSession, str]:
    """A raw session after STARTTLS; the SHA-256 of the certificate it was served."""
    session = RawSession(port)
    session.reply()
    session.command("EHLO client.test")
    assert session.command("STARTTLS")[0].startswith(b"220")
    session.starttls()
    cert = session.sock.getpeercert(binary_form=True)
    return session, hashlib.sha256(cert).hexdigest()


def write_pair(directory: str, hostname: str) -> tuple[str, str, str]:
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    generate_self_signed(hostname, cert, key)
    with open(cert, "rb") as f:
        der = ssl.PEM_cert_to_DER_cert(f.read().decode())
    return cert, key, hashlib.sha256(der).hexdigest()


class LogLinesTests(unittest.TestCase):
    """The contract's lines at info, in both formats, against the real twistd."""

    def test_text(self) -> None:
        """
        In text, one session leaves a session line (peer, port, TLS, user,
        outcome), an accepted line with the id, a refusal line with reason
        and reply, and a delivery-attempt line per attempt with the id, each
        recipient's hop, reply and status, and the next retry in ISO 8601;
        the password and the content are not in the log.
        """
        d = start(self, 'format = "text"')
        message_id, password = one_session(d)
        self.assertTrue(poll(lambda: f"delivery attempt id={message_id}" in d.process.output(), 20), d.process.output())
        output = d.process.output()
        lines = output.splitlines()
        # The harness's readiness probe leaves a session line of its own.
        session = [line for line in lines if "smtp session" in line and "user=shop" in line]
        self.assertEqual(len(session), 1, output)
        self.assertRegex(session[0], r"peer=127\.\S+ port=\d+ tls=yes user=shop messages=1 outcome=quit")
        accepted = [line for line in lines if "message accepted" in line]
        self.assertEqual(len(accepted), 1, output)
        self.assertIn(
            f"message accepted id={message_id} user=shop mail_from=<news@allowed.test> recipients=2 size=", accepted[0]
        )
        self.assertRegex(accepted[0], r"priority=3")
        refused = [line for line in lines if "message refused" in line]
        self.assertEqual(len(refused), 1, output)
        self.assertRegex(refused[0], r"mail_from=<intruder@elsewhere\.test> .*reason=sender reply=550 5\.7\.1 ")
        attempt = next(line for line in lines if f"delivery attempt id={message_id}" in line)
        match = re.search(r"status=deferred next_retry=(\S+) ", attempt)
        assert match, attempt
        self.assertRegex(match.group(1), ISO_RE)
        self.assertIn("to=<ok@dest.test> hop=127.0.0.1:", attempt)
        self.assertIn(f"status=sent reply='{DATA_REPLY}'", attempt)
        self.assertIn("to=<defer@dest.test>", attempt)
        self.assertIn("reply='451 4.3.0 Try again later'", attempt)
        # Every line starts with an ISO 8601 time.
        for line in lines:
            if line.strip():
                self.assertRegex(line.split(" ", 1)[0], ISO_RE)
        self.assertNotIn(password, output)
        self.assertNotIn(BODY_MARK, output)

    def test_json(self) -> None:
        """
        In JSON, every line is one JSON object (twisted.logger's), and the
        session, accepted, refusal and delivery-attempt records carry the
        contract's fields as keys; times are ISO 8601; no password or content.
        """
        d = start(self, 'format = "json"')
        message_id, password = one_session(d)

        def records() -> list[dict[str, Any]]:
            return [json.loads(line) for line in d.process.output().splitlines() if line.strip()]

        def attempt() -> Any:
            return next(
                (r for r in records() if r.get("log_format", "").startswith("delivery attempt") and r["id"] == message_id),
                None,
            )

        found = poll(attempt, 20)
        self.assertIsNotNone(found, d.process.output())
        self.assertEqual(found["status"], "deferred")
        self.assertRegex(found["next_retry"], ISO_RE)
        by_address = {r["address"]: r for r in found["recipients"]}
        self.assertEqual(by_address["ok@dest.test"]["status"], "sent")
        self.assertEqual(by_address["ok@dest.test"]["reply"], DATA_REPLY)
        self.assertEqual(by_address["defer@dest.test"]["status"], "deferred")
        self.assertEqual(by_address["defer@dest.test"]["hop"], f"127.0.0.1:{d.sink_port}")
        all_records = records()
        for record in all_records:
            self.assertRegex(record["timestamp"], ISO_RE)
            self.assertIn("log_level", record)
        (session,) = [r for r in all_records if r.get("log_format", "").startswith("smtp session") and r["user"] == "shop"]
        self.assertEqual((session["port"], session["tls"], session["user"], session["outcome"]),
                         (d.plain_ports[0], "yes", "shop", "quit"))
        self.assertTrue(session["peer"].startswith("127."))
        (accepted,) = [r for r in all_records if r.get("log_format", "").startswith("message accepted")]
        self.assertEqual(
            {k: accepted[k] for k in ("id", "user", "mail_from", "recipients", "priority")},
            {"id": message_id, "user": "shop", "mail_from": "news@allowed.test", "recipients": 2, "priority": 3},
        )
        self.assertGreater(accepted["size"], len(BODY_MARK))
        (refused,) = [r for r in all_records if r.get("log_format", "").startswith("message refused")]
        self.assertEqual(refused["reason"], "sender")
        self.assertTrue(refused["reply"].startswith("550 5.7.1 Sender address intruder@elsewhere.test"))
        text = d.process.output()
        self.assertNotIn(password, text)
        self.assertNotIn(BODY_MARK, text)

    def test_level_warn(self) -> None:
        """
        C{level = "warn"} hides the info lines, Twisted's own included
        (twistd's start-up lines), and keeps the warnings.
        """
        d = start(self, 'level = "warn"\n[notifications]\nwebhook_secret = "s3cret-for-nothing"')
        client = logged_in(d.plain_ports[0], *d.create_user(username="quiet", authorized_domains=["allowed.test"]))
        client.quit()
        output = d.process.output()
        self.assertIn("webhook_secret: set, but there is no webhook_url", output)
        for info in ("twistd ", "reactor class", "smtp session", "TLS certificate", "listening"):
            self.assertNotIn(info, output)
        self.assertNotIn("#info]", output)


class ReloadTests(unittest.TestCase):
    """SIGHUP against the real twistd."""

    def test_certificate_reload(self) -> None:
        """
        After the certificate and key files are replaced and SIGHUP sent, a
        new STARTTLS session is served the new certificate, while a session
        opened before goes on (and still sends a message).
        """
        holder: dict[str, Any] = {}

        def cfg(d: Daemon) -> str:
            holder["paths"] = write_pair(d.directory, "mx.logs.test")
            cert, key, _ = holder["paths"]
            return config(d, extra=f'[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\n')

        d = Daemon(cfg, plain=1, tls=0)
        self.addCleanup(d.stop)
        cert, key, old = holder["paths"]
        username, password = d.create_user(username="tls", authorized_domains=["allowed.test"])
        before, seen = fingerprint(d.plain_ports[0])
        self.assertEqual(seen, old)
        _, _, new = write_pair(d.directory, "mx.logs.test")
        self.assertNotEqual(new, old)
        reload_and_wait(d, 1)
        self.assertIn("configuration reloaded", d.process.output())
        after, seen = fingerprint(d.plain_ports[0])
        self.assertEqual(seen, new)
        after.close()
        # The session opened before goes on over its TLS.
        self.assertEqual(hashlib.sha256(before.sock.getpeercert(binary_form=True)).hexdigest(), old)
        self.assertTrue(before.command("EHLO client.test")[0].startswith(b"250"))
        self.assertTrue(before.command(f"AUTH PLAIN {plain_auth(username, password)}")[0].startswith(b"235"))
        self.assertTrue(before.command("MAIL FROM:<a@allowed.test>")[0].startswith(b"250"))
        self.assertTrue(before.command("RCPT TO:<ok@dest.test>")[0].startswith(b"250"))
        self.assertTrue(before.command("DATA")[0].startswith(b"354"))
        reply = before.command("From: a@allowed.test\r\nSubject: old session\r\n\r\nhello\r\n.")
        self.assertTrue(reply[0].startswith(b"250 2.0.0 Ok: queued as"), reply)
        before.close()

    def test_bad_file(self) -> None:
        """
        A broken configuration file on SIGHUP is one error line naming the
        key and the problem; the daemon runs on with the old configuration.
        """
        d = start(self)
        with open(d.config_path, "a", encoding="utf-8") as f:
            f.write('\n[security]\nauth_lock_seconds = -1\n')
        reload_and_wait(d, 1)
        output = d.process.output()
        errors = [line for line in output.splitlines() if "configuration error" in line]
        self.assertEqual(len(errors), 1, output)
        self.assertIn("[security] auth_lock_seconds: must be greater than 0", errors[0])
        self.assertIn("the running configuration stays", errors[0])
        self.assertNotIn("configuration reloaded", output)
        self.assertIsNone(d.process.proc.poll())
        session = RawSession(d.plain_ports[0])
        self.assertTrue(session.reply()[0].startswith(b"220"))
        session.close()

    def test_port_change_needs_restart(self) -> None:
        """
        A changed port set and state_dir are named in a "needs a restart"
        line; the old port is still served, and the reloadable rest applied.
        """
        d = start(self)
        with open(d.config_path, encoding="utf-8") as f:
            text = f.read()
        text = text.replace(f'ports = "{d.plain_ports[0]}"', f'ports = "{d.plain_ports[0]},{d.admin_port + 1000}"')
        text = text.replace("retry_schedule = [600]", "retry_schedule = [300]")
        text = text.replace(f'state_dir = "{d.state_dir}"', f'state_dir = "{d.state_dir}-other"')
        with open(d.config_path, "w", encoding="utf-8") as f:
            f.write(text)
        reload_and_wait(d, 1)
        output = d.process.output()
        restart = [line for line in output.splitlines() if "needs a restart" in line]
        self.assertEqual(len(restart), 1, output)
        self.assertIn("[server] state_dir", restart[0])
        self.assertIn("[smtp] ports", restart[0])
        self.assertRegex(output, r"configuration reloaded: .*applied \[delivery\] retry_schedule")
        self.assertFalse(os.path.exists(f"{d.state_dir}-other"))
        with socket.create_connection(("127.0.0.1", d.plain_ports[0]), timeout=10) as s:
            self.assertTrue(s.recv(100).startswith(b"220"))

    def test_logfile_reopened(self) -> None:
        """
        With C{--logfile}, after the file is renamed (as logrotate does) a
        SIGHUP makes the daemon write its new lines to a new file at the
        original path; the renamed file keeps the lines from before.
        """
        # The harness starts twistd without --logfile: replace its process
        # by one with it, on the same configuration.
        d2 = Daemon(lambda d: config(d, 'format = "json"'), plain=1, tls=0, wait=False)
        self.addCleanup(d2.stop)
        d2.process.kill()
        path = os.path.join(d2.directory, "smtpplus.log")
        d2.process = spawn_twistd(["--config", d2.config_path], d2.directory, ["--logfile", path])
        d2.wait_ready()
        self.assertTrue(poll(lambda: os.path.exists(path) and "Admin API listening" in open(path).read(), 10))
        # The ports accept before the workers serve: SIGHUP once they do.
        self.assertTrue(d2.process.wait_serving(15, path))
        os.rename(path, path + ".1")
        d2.process.proc.send_signal(signal.SIGHUP)
        self.assertTrue(poll(lambda: os.path.exists(path) and "configuration reloaded" in open(path).read(), 15))
        session = RawSession(d2.plain_ports[0])
        session.reply()
        session.command("QUIT")
        session.close()
        # The session after the SIGHUP ends with QUIT; the harness's own
        # readiness probe (outcome "disconnected") may land in either file.
        after = '"outcome": "quit"'
        self.assertTrue(poll(lambda: after in open(path).read(), 10))
        with open(path + ".1", encoding="utf-8") as f:
            rotated = f.read()
        self.assertIn("Admin API listening", rotated)
        self.assertNotIn(after, rotated)
        for line in open(path, encoding="utf-8").read().splitlines():
            json.loads(line)


class LogConfigTests(unittest.TestCase):
    """C{[log]} keys and the observer, in process."""

    def test_keys(self) -> None:
        """C{format} and C{level} take the contract's values; others are one error line each, naming the key."""
        self.assertEqual(config_from_text('[log]\nformat = "json"\nlevel = "warn"').log, LogConfig("json", "warn"))
        with self.assertRaises(ConfigError) as caught:
            config_from_text('[log]\nformat = "xml"\nlevel = "verbose"')
        self.assertEqual(len(caught.exception.errors), 2)
        self.assertTrue(caught.exception.errors[0].startswith("[log] format: must be one of"))
        self.assertTrue(caught.exception.errors[1].startswith("[log] level: must be one of"))

    def test_level_and_reconfigure(self) -> None:
        """The observer drops events below the level and switches format and level on L{DaemonLog.configure}."""
        out = io.StringIO()
        observer = DaemonLog(Destination(stream=out), LogConfig("text", "warn"))
        observer({"log_format": "hidden {n}", "n": 1, "log_level": LogLevel.info, "log_time": 0.0, "log_namespace": "t"})
        observer({"log_format": "shown {n}", "n": 2, "log_level": LogLevel.warn, "log_time": 0.0, "log_namespace": "t"})
        self.assertNotIn("hidden", out.getvalue())
        self.assertIn("[t#warn] shown 2", out.getvalue())
        observer.configure(LogConfig("json", "debug"))
        observer({"log_format": "now {n}", "n": 3, "log_level": LogLevel.debug, "log_time": 0.0, "log_namespace": "t"})
        record = json.loads(out.getvalue().splitlines()[-1])
        self.assertEqual((record["n"], formatEvent(record)), (3, "now 3"))
        self.assertRegex(record["timestamp"], ISO_RE)

    def test_changed_keys(self) -> None:
        """L{changed_keys} names each changed key as written in the file."""
        old = config_from_text('[smtp]\nports = "25"')
        new = config_from_text('[smtp]\nports = "26"\n[log]\nlevel = "error"')
        self.assertEqual(changed_keys(old, new), [("smtp", "ports"), ("log", "level")])


class _CallsFromThreads:
    """The one reactor method a signal handler may call, recording what it was asked to run."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.append(f)


class ReloaderSignalTests(unittest.TestCase):
    """When the L{Reloader} takes SIGHUP, in process."""

    def test_taken_before_any_service_starts(self) -> None:
        """
        From the start of makeService (hold_sighup) a SIGHUP is held rather
        than met by its default action, which ends the daemon; the reloader
        takes the signal before the services start (listening, forking the
        workers) and makes what was held one reload, run once the reactor
        does.  After stopService the earlier handler is back.
        """
        previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        hold_sighup()
        held = signal.getsignal(signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        reactor = _CallsFromThreads()
        config = config_from_text("")
        appliers = Appliers(*(lambda new: None for _ in range(5)))
        reloader = Reloader(reactor, config, "smtpplus.toml", lambda: config, lambda new: None, appliers, lambda: None, succeed)
        reloader.take_signal()
        self.assertEqual(signal.getsignal(signal.SIGHUP), reloader._signalled)
        self.assertEqual(reactor.calls, [reloader.reload])
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(reactor.calls, [reloader.reload, reloader.reload])
        reloader.startService()
        reloader.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), held)
