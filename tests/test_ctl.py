"""
C{smtpplusctl}, the installed console script, run as a subprocess against
the real daemon (twistd): every command, where it finds the address and
the token, exit statuses and one-line errors on stderr.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
from typing import Any

from twisted.trial.unittest import TestCase

from tests.contract_helpers import Daemon, Shared, logged_in, message, poll, queue_id, submit
from tests.helpers import free_port_range, port_is_free

CTL = os.path.join(os.path.dirname(sys.executable), "smtpplusctl")
RUN_TIMEOUT = 30


def config(d: Daemon, admin: str = "") -> str:
    return f"""
[server]
hostname = "mx.test.example"
state_dir = "{d.state_dir}"
[smtp]
listen = "127.0.0.1"
ports = "{d.plain_ports[0]}"
auth_requires_tls = false
[delivery]
mode = "smarthost"
smarthost = "127.0.0.1:{d.sink_port}"
smarthost_tls = "none"
retry_schedule = [3600]
[admin]
listen = "127.0.0.1"
port = {d.admin_port}
{admin}
"""


DAEMON = Shared(lambda: Daemon(config, plain=1, tls=0))


def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run smtpplusctl with C{args}; the environment has no SMTPPLUS_ variables but those in C{env}."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SMTPPLUS_")}
    environment.update(env or {})
    return subprocess.run([CTL, *args], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=environment)


class CtlTestCase(TestCase):
    def setUp(self) -> None:
        self.d = DAEMON.get()

    def run_ok(self, *args: str, **kw: Any) -> str:
        """Run a command against the daemon (via its --config) that must succeed; its stdout."""
        result = ctl("--config", self.d.config_path, *args, **kw)
        self.assertEqual((result.returncode, result.stderr), (0, ""), result)
        return result.stdout

    def assertFailed(self, result: subprocess.CompletedProcess[str], text: str) -> None:
        """Exit status 1, nothing on stdout, one line on stderr holding C{text}."""
        self.assertEqual(result.returncode, 1, result)
        self.assertEqual(result.stdout, "")
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith("smtpplusctl: "), lines[0])
        self.assertIn(text, lines[0])

    def user(self, **fields: Any) -> tuple[str, str]:
        return self.d.create_user(authorized_domains=["allowed.test"], **fields)

    def login_works(self, username: str, password: str) -> bool:
        try:
            logged_in(self.d.plain_ports[0], username, password).quit()
        except smtplib.SMTPAuthenticationError:
            return False
        return True


class UserCommandTests(CtlTestCase):
    def test_add_show_list(self) -> None:
        """
        users add prints the user and, alone on the last line, a password
        that logs in; users show and users list show it; adding it again
        fails with one line.
        """
        out = self.run_ok(
            "users", "add", "ctl-ann", "--domains", "allowed.test; other.test", "--senders", "boss@x.test",
            "--priority", "2", "--notes", "billing app",
        )
        *fields, password = out.splitlines()
        self.assertIn("username:           ctl-ann", fields)
        self.assertIn("authorized_domains: allowed.test;other.test", fields)
        self.assertIn("priority:           2", fields)
        self.assertTrue(self.login_works("ctl-ann", password))
        shown = self.run_ok("users", "show", "ctl-ann")
        self.assertIn("notes:              billing app", shown)
        self.assertNotIn(password, shown)
        listed = self.run_ok("users", "list")
        self.assertEqual(listed.splitlines()[0].split(), ["USERNAME", "ENABLED", "PRIORITY", "DOMAINS", "SENDERS"])
        self.assertRegex(listed, r"(?m)^ctl-ann +yes +2 +allowed\.test;other\.test +boss@x\.test$")
        self.assertFailed(ctl("--config", self.d.config_path, "users", "add", "ctl-ann"), "already exists")

    def test_add_generated_name(self) -> None:
        """users add without a name gets a generated username; the password is still the last line."""
        *fields, password = self.run_ok("users", "add", "--domains", "allowed.test").splitlines()
        username = fields[0].split()[-1]
        self.assertRegex(username, r"^smtp-[a-z0-9]{8}$")
        self.assertTrue(self.login_works(username, password))

    def test_set_enable_disable(self) -> None:
        """users set changes fields (key=value, ;-lists, enabled); disable and enable switch logins off and on."""
        name, password = self.user()
        self.run_ok("users", "set", name, "priority=5", "notes=moved to ops", "senders=a@b.test;c@d.test")
        user = self.d.api("GET", f"/api/v1/users/{name}").json
        self.assertEqual(
            (user["priority"], user["notes"], user["authorized_senders"]), (5, "moved to ops", ["a@b.test", "c@d.test"])
        )
        self.assertEqual(self.run_ok("users", "disable", name), f"{name}: disabled\n")
        self.assertFalse(self.d.api("GET", f"/api/v1/users/{name}").json["enabled"])
        self.assertFalse(self.login_works(name, password))
        self.assertEqual(self.run_ok("users", "enable", name), f"{name}: enabled\n")
        self.assertTrue(self.login_works(name, password))
        self.run_ok("users", "set", name, "enabled=no")
        self.assertFalse(self.d.api("GET", f"/api/v1/users/{name}").json["enabled"])
        self.assertFailed(ctl("--config", self.d.config_path, "users", "set", name, "priority=9"), "priority")
        self.assertFailed(ctl("--config", self.d.config_path, "users", "set", name, "enabled=maybe"), "enabled")
        self.assertFailed(ctl("--config", self.d.config_path, "users", "set", name, "priority"), "key=value")

    def test_passwd_and_delete(self) -> None:
        """users passwd prints only the new password, which works while the old one stops; users delete removes the user."""
        name, old = self.user()
        out = self.run_ok("users", "passwd", name)
        self.assertEqual(len(out.splitlines()), 1)
        new = out.strip()
        self.assertTrue(self.login_works(name, new))
        self.assertFalse(self.login_works(name, old))
        self.assertEqual(self.run_ok("users", "delete", name), f"{name}: deleted\n")
        self.assertEqual(self.d.api("GET", f"/api/v1/users/{name}").status, 404)
        self.assertFailed(ctl("--config", self.d.config_path, "users", "show", name), f"no user {name}")
        self.assertFailed(ctl("--config", self.d.config_path, "users", "passwd", name), f"no user {name}")


class QueueCommandTests(CtlTestCase):
    def deferred(self, name: str, password: str, count: int) -> list[str]:
        """C{count} messages the smarthost defers, once all are deferred."""
        client = logged_in(self.d.plain_ports[0], name, password)
        try:
            ids = [
                queue_id(submit(client, "sender@allowed.test", ["defer@dest.test", "x@dest.test"], message(f"q{i}")))
                for i in range(count)
            ]
        finally:
            client.quit()
        for message_id in ids:
            self.wait_for(message_id, lambda m: m["status"] == "deferred")
        return ids

    def wait_for(self, message_id: str, check: Any) -> dict[str, Any]:
        found = poll(lambda: (lambda m: m if check(m) else None)(self.d.api("GET", f"/api/v1/messages/{message_id}").json), 15)
        self.assertTrue(found, self.d.api("GET", f"/api/v1/messages/{message_id}").json)
        return found

    def test_queue_retry_delete(self) -> None:
        """
        queue lists deferred messages like mailq (id, user, size, priority,
        status, first recipient, age); retry ID and retry --all have them
        tried again at once; delete ID drops one, which leaves the queue;
        each error is one line and exit status 1.
        """
        name, password = self.user(priority=2)
        first, second = self.deferred(name, password, 2)
        size = self.d.api("GET", f"/api/v1/messages/{first}").json["size"]
        out = self.run_ok("queue", "--user", name)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["ID", "USER", "SIZE", "PRIORITY", "STATUS", "RECIPIENT", "AGE"])
        self.assertRegex(out, rf"(?m)^{first} +{name} +{size} +2 +deferred +defer@dest\.test \(\+1\) +\d+[smhd]$")
        self.assertIn(second, out)
        self.assertEqual(lines[-1], f"-- {2 * size} bytes in 2 messages")
        self.assertIn(first, self.run_ok("queue"))

        out = self.run_ok("retry", first)
        self.assertTrue(out.startswith(f"{first}: deferred, next attempt "), out)
        self.wait_for(first, lambda m: m["status"] == "deferred" and m["recipients"][0]["attempts"] == 2)
        self.assertEqual(self.d.api("GET", f"/api/v1/messages/{second}").json["recipients"][0]["attempts"], 1)
        self.assertRegex(self.run_ok("retry", "--all"), r"^\d+ deferred messages? to be tried now\n$")
        self.wait_for(first, lambda m: m["status"] == "deferred" and m["recipients"][0]["attempts"] == 3)
        self.wait_for(second, lambda m: m["status"] == "deferred" and m["recipients"][0]["attempts"] == 2)

        self.assertEqual(self.run_ok("delete", second), f"{second}: deleted\n")
        self.assertEqual(self.d.api("GET", f"/api/v1/messages/{second}").json["status"], "deleted")
        self.assertNotIn(second, self.run_ok("queue", "--user", name))
        self.assertFailed(ctl("--config", self.d.config_path, "delete", second), "final")
        self.assertFailed(ctl("--config", self.d.config_path, "retry", second), "deleted")
        self.assertFailed(ctl("--config", self.d.config_path, "retry", "NO-SUCH-ID"), "no message NO-SUCH-ID")
        self.assertFailed(ctl("--config", self.d.config_path, "retry"), "required")

    def test_empty_queue(self) -> None:
        """queue says so when nothing waits."""
        self.assertEqual(self.run_ok("queue", "--user", "nobody-here"), "Mail queue is empty\n")


class ReportCommandTests(CtlTestCase):
    def test_stats_and_notifications(self) -> None:
        """stats shows the groups of a policy; notifications lists events, filtered by type and user."""
        name, password = self.user()
        client = logged_in(self.d.plain_ports[0], name, password)
        try:
            queue_id(submit(client, "sender@allowed.test", ["rcpt@dest.test"], message("counted")))
            self.assertEqual(submit(client, "x@forbidden.test", ["rcpt@dest.test"], message("refused"))[0], 550)
        finally:
            client.quit()
        stats = self.run_ok("stats", "--policy", "user")
        self.assertEqual(stats.splitlines()[0], "policy: user")
        self.assertEqual(
            stats.splitlines()[1].split(), ["KEY", "MESSAGES", "RECIPIENTS", "SENT", "DEFERRED", "BOUNCED", "REJECTED"]
        )
        self.assertRegex(stats, rf"(?m)^{name} +1 +1 +\d +0 +0 +1$")
        events = poll(lambda: name in self.run_ok("notifications", "--user", name), 10)
        self.assertTrue(events)
        out = self.run_ok("notifications", "--user", name, "--type", "sender_domain")
        self.assertEqual(out.splitlines()[0].split(), ["CREATED", "TYPE", "USER", "MESSAGE", "DETAIL"])
        self.assertRegex(out, rf"(?m)^\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ +sender_domain +{name} +- +.*forbidden\.test")
        self.assertNotIn(name, self.run_ok("notifications", "--user", name, "--type", "bounce"))
        self.assertEqual(len(self.run_ok("notifications", "--limit", "1").splitlines()), 2)
        self.assertFailed(ctl("--config", self.d.config_path, "notifications", "--type", "spam"), "type")
        self.assertFailed(ctl("--config", self.d.config_path, "stats", "--policy", "hour"), "policy")


class NodesCommandTests(CtlTestCase):
    def test_nodes(self) -> None:
        """nodes lists this node (SQLite: the only one) with its workers, heartbeat age and queue."""
        out = self.run_ok("nodes")
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["NODE", "WORKERS", "UP", "LAST", "SEEN", "QUEUED", "SENDING"])
        self.assertEqual(len(lines), 2)
        self.assertRegex(lines[1], r"^mx\.test\.example +\d+ +\d+[smhd] +\d+s +\d+ +\d+$")


class SuppressionCommandTests(CtlTestCase):
    def test_add_list_remove(self) -> None:
        """suppressions add, list and remove manage a user's list; removing one not listed fails with one line."""
        username, _ = self.user()
        self.assertEqual(
            self.run_ok("suppressions", "add", username, "Gone@Dest.test", "--reason", "asked to stop"),
            f"gone@dest.test: suppressed for {username}\n",
        )
        listed = self.run_ok("suppressions", "list", username).splitlines()
        self.assertEqual(listed[0].split(), ["ADDRESS", "SINCE", "REASON"])
        self.assertRegex(listed[1], r"^gone@dest\.test +\d{4}-\d\d-\d\dT[\d:]+Z +asked to stop$")
        self.run_ok("suppressions", "remove", username, "gone@dest.test")
        self.assertEqual(self.run_ok("suppressions", "list", username).splitlines()[1:], [])
        self.assertFailed(
            ctl("--config", self.d.config_path, "suppressions", "remove", username, "gone@dest.test"), "not suppressed"
        )


class AddressAndTokenTests(CtlTestCase):
    def test_url_and_token_options(self) -> None:
        """--url with --token reaches the API; --url without a token fails naming where a token comes from."""
        url = f"http://127.0.0.1:{self.d.admin_port}"
        result = ctl("--url", url, "--token", self.d.token, "users", "list")
        self.assertEqual((result.returncode, result.stderr), (0, ""), result)
        self.assertFailed(ctl("--url", url, "users", "list"), "no admin token")

    def test_environment(self) -> None:
        """SMTPPLUS_URL and SMTPPLUS_TOKEN stand in for --url and --token; --token wins over the environment."""
        env = {"SMTPPLUS_URL": f"http://127.0.0.1:{self.d.admin_port}/", "SMTPPLUS_TOKEN": self.d.token}
        result = ctl("queue", env=env)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertFailed(ctl("--token", "wrong", "queue", env=env), "missing or wrong bearer token")

    def test_token_from_state_dir(self) -> None:
        """
        With --config the token is read from the admin-token file of its
        state_dir, unless --token or SMTPPLUS_TOKEN give one.
        """
        self.assertTrue(os.path.exists(os.path.join(self.d.state_dir, "admin-token")))
        self.run_ok("users", "list")
        self.assertFailed(ctl("--config", self.d.config_path, "--token", "wrong", "users", "list"), "wrong bearer token")
        self.assertFailed(
            ctl("--config", self.d.config_path, "users", "list", env={"SMTPPLUS_TOKEN": "wrong"}), "wrong bearer token"
        )

    def test_unreachable_and_bad_input(self) -> None:
        """An address nobody listens on, a missing config file and a bad command line are one-line errors."""
        closed = free_port_range(1)[0]
        self.assertFailed(ctl("--url", f"http://127.0.0.1:{closed}", "--token", "t", "queue"), "cannot reach the admin API")
        self.assertFailed(ctl("--url", "ftp://example.test", "--token", "t", "queue"), "not an http")
        self.assertFailed(ctl("--config", "/nonexistent/smtpplus.toml", "queue"), "cannot read config file")
        self.assertFailed(ctl("--config", self.d.config_path, "frobnicate"), "invalid choice")
        self.assertFailed(ctl("--config", self.d.config_path, "--url", "http://127.0.0.1:1", "queue"), "not allowed")

    def test_default_url(self) -> None:
        """Without --config, --url or SMTPPLUS_URL the API is looked for at http://127.0.0.1:8025."""
        if not port_is_free(8025):
            self.skipTest("port 8025 is in use here")
        self.assertFailed(ctl("--token", "t", "queue"), "cannot reach the admin API at http://127.0.0.1:8025")


class AdminTLSTests(TestCase):
    def test_config_implies_https(self) -> None:
        """
        With [admin] tls = true, --config talks HTTPS and trusts the
        certificate the daemon generated (for its hostname); a plain --url
        https:// client without that trust refuses the certificate.
        """
        d = Daemon(lambda d: config(d, "tls = true"), plain=1, tls=0)
        self.addCleanup(d.stop)
        result = ctl("--config", d.config_path, "users", "list")
        self.assertEqual((result.returncode, result.stderr), (0, ""), result)
        self.assertTrue(result.stdout.startswith("USERNAME"))
        refused = ctl("--url", f"https://127.0.0.1:{d.admin_port}", "--token", d.token, "users", "list")
        self.assertEqual(refused.returncode, 1)
        self.assertRegex(refused.stderr, re.compile(r"^smtpplusctl: cannot reach the admin API .*CERTIFICATE_VERIFY_FAILED", re.S))
        self.assertEqual(len(refused.stderr.splitlines()), 1)
