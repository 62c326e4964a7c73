"""
Contract section 8 against the real daemon (twistd, smtplib, an aiosmtpd
smarthost): idempotent submission, DKIM signing verified by dkimpy at the
smarthost, and the policy dry-run answering as real sessions do.
"""

from __future__ import annotations

import secrets
from typing import Any

import dkim
from twisted.trial.unittest import TestCase

from tests.harness.clients import logged_in, submit
from tests.harness.daemon import Daemon, Shared
from tests.harness.messages import queue_id

DAEMON = Shared(lambda: Daemon(lambda d: d.toml(), plain=1, tls=0))


def _message(header_from: str | None, headers: dict[str, str | list[str]], body: str = "Hello.") -> bytes:
    """A message with C{From: header_from} first (unless None), then C{headers} in order."""
    lines = [] if header_from is None else [f"From: {header_from}"]
    for name, value in headers.items():
        lines += [f"{name}: {v}" for v in ([value] if isinstance(value, str) else value)]
    return "\r\n".join([*lines, "", body, ""]).encode()


def _status(reply: str) -> tuple[int, str]:
    """The code and enhanced status of a reply line such as C{550 5.7.1 text}."""
    code, status, _ = reply.split(" ", 2)
    return int(code), status


class IdempotentSubmissionTests(TestCase):
    """[delivery] dedup_window (on by default) against a real daemon."""

    def test_resent_message_is_queued_once(self) -> None:
        """
        The same message sent again on a new connection (same user,
        Message-ID and recipients, these in another order and case) gets the
        first one's id, reaches the smarthost once, and the first message
        counts one duplicate; another Message-ID is a new message.
        """
        d = DAEMON.get()
        user, password = d.create_user(authorized_domains=["dedup.test"])
        message_id = f"<{secrets.token_hex(8)}@dedup.test>"
        data = _message("a@dedup.test", {"To": "x@dest.test", "Subject": "once", "Message-ID": message_id})
        replies = []
        for recipients in (["x@dest.test", "y@dest.test"], ["Y@DEST.test", "x@dest.test"]):
            client = logged_in(d.plain_ports[0], user, password)
            try:
                replies.append(queue_id(submit(client, "a@dedup.test", recipients, data)))
            finally:
                client.quit()
        self.assertEqual(replies[0], replies[1])
        marker = f"<{secrets.token_hex(8)}@dedup.test>"
        client = logged_in(d.plain_ports[0], user, password)
        try:
            other = queue_id(submit(client, "a@dedup.test", ["x@dest.test"], _message("a@dedup.test", {"Message-ID": marker})))
        finally:
            client.quit()
        self.assertNotEqual(other, replies[0])
        assert d.sink is not None
        d.sink.wait_for(marker)
        d.sink.wait_for(message_id)
        self.assertEqual(len(d.sink.find(message_id)), 1)
        listed = d.api("GET", f"/api/v1/messages?user={user}").json["messages"]
        self.assertEqual(sorted(m["id"] for m in listed), sorted([replies[0], other]))
        first = d.api("GET", f"/api/v1/messages/{replies[0]}").json
        self.assertEqual(first["duplicates"], 1)
        self.assertEqual(d.api("GET", f"/api/v1/messages/{other}").json["duplicates"], 0)

    def test_without_message_id_never_deduplicated(self) -> None:
        """A message without a Message-ID header is queued each time it is sent (the daemon adds a new one)."""
        d = DAEMON.get()
        user, password = d.create_user(authorized_domains=["dedup.test"])
        data = _message("a@dedup.test", {"Subject": "no id"})
        client = logged_in(d.plain_ports[0], user, password)
        try:
            ids = {queue_id(submit(client, "a@dedup.test", ["x@dest.test"], data)) for _ in range(2)}
        finally:
            client.quit()
        self.assertEqual(len(ids), 2)


class DKIMTests(TestCase):
    """DKIM keys through the API, signatures verified with dkimpy at the smarthost."""

    def _txt_lookup(self, keys: dict[str, dict[str, Any]]) -> Any:
        """A dkimpy DNS function serving each key's dns_txt at its dns_name."""
        records = {key["dns_name"].lower() + ".": key["dns_txt"].encode() for key in keys.values()}

        def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
            return records.get(name.decode().lower())

        return dnsfunc

    def _send(self, d: Daemon, user: str, password: str, sender: str) -> Any:
        marker = f"<{secrets.token_hex(8)}@{sender.partition('@')[2]}>"
        data = _message(
            f"Sender <{sender}>",
            {"To": "rcpt@dest.test", "Subject": "signed?", "Message-ID": marker, "MIME-Version": "1.0"},
            body="Line one.\r\nLine two.",
        )
        client = logged_in(d.plain_ports[0], user, password)
        try:
            queue_id(submit(client, sender, ["rcpt@dest.test"], data))
        finally:
            client.quit()
        assert d.sink is not None
        return d.sink.wait_for(marker)

    def test_signed_messages_verify(self) -> None:
        """
        With an RSA (default) and an Ed25519 key, a message whose From:
        domain has the key arrives signed relaxed/relaxed over From, To,
        Subject, Date, Message-ID and MIME-Version, and dkimpy verifies it
        against the published TXT record; a body changed after signing does
        not verify; another domain's message is not signed.
        """
        d = DAEMON.get()
        created = {
            "rsa": d.api("POST", "/api/v1/dkim/rsa.dkim.test"),
            "ed": d.api("POST", "/api/v1/dkim/ED.dkim.test", {"selector": "s1", "algorithm": "ed25519-sha256"}),
        }
        self.assertEqual({r.status for r in created.values()}, {201}, created)
        keys = {name: r.json for name, r in created.items()}
        self.assertEqual(keys["rsa"]["algorithm"], "rsa-sha256")
        self.assertEqual(keys["rsa"]["dns_name"], "smtpplus._domainkey.rsa.dkim.test")
        self.assertEqual(keys["ed"]["dns_name"], "s1._domainkey.ed.dkim.test")
        self.assertTrue(keys["ed"]["dns_txt"].startswith("v=DKIM1; k=ed25519; p="))
        dnsfunc = self._txt_lookup(keys)
        user, password = d.create_user(authorized_domains=["rsa.dkim.test", "ed.dkim.test", "plain.dkim.test"])
        for domain, algorithm in (("rsa.dkim.test", b"rsa-sha256"), ("ed.dkim.test", b"ed25519-sha256")):
            received = self._send(d, user, password, f"a@{domain}")
            data = received.data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            signature = received.message["DKIM-Signature"]
            self.assertIsNotNone(signature, received.data[:500])
            tags = dict(t.strip().split("=", 1) for t in signature.replace("\r\n", "").split(";") if "=" in t)
            self.assertEqual(tags["a"].encode(), algorithm)
            self.assertEqual(tags["c"], "relaxed/relaxed")
            self.assertEqual(tags["d"], domain)
            signed = {h.strip().lower() for h in tags["h"].split(":")}
            self.assertLessEqual({"from", "to", "subject", "date", "message-id", "mime-version"}, signed)
            self.assertTrue(dkim.verify(data, dnsfunc=dnsfunc), domain)
            self.assertFalse(dkim.verify(data.replace(b"Line two.", b"Line 2."), dnsfunc=dnsfunc), domain)
        unsigned = self._send(d, user, password, "a@plain.dkim.test")
        self.assertIsNone(unsigned.message["DKIM-Signature"])

    def test_key_lifecycle(self) -> None:
        """
        POST twice is a 409; GET lists and shows the key without any private
        key; PATCH enabled=false stops signing; DELETE is 204, then 404;
        bad bodies and names are 400.
        """
        d = DAEMON.get()
        self.assertEqual(d.api("POST", "/api/v1/dkim/life.dkim.test", {"algorithm": "ed25519-sha256"}).status, 201)
        self.assertEqual(d.api("POST", "/api/v1/dkim/life.dkim.test").status, 409)
        listed = d.api("GET", "/api/v1/dkim")
        self.assertIn("life.dkim.test", [k["domain"] for k in listed.json["keys"]])
        self.assertNotIn(b"PRIVATE", listed.body)
        one = d.api("GET", "/api/v1/dkim/Life.Dkim.Test.")
        self.assertEqual(one.status, 200)
        self.assertEqual(
            set(one.json), {"domain", "selector", "algorithm", "dns_name", "dns_txt", "enabled", "created_at"}
        )
        self.assertTrue(one.json["enabled"])
        off = d.api("PATCH", "/api/v1/dkim/life.dkim.test", {"enabled": False})
        self.assertEqual((off.status, off.json["enabled"]), (200, False))
        user, password = d.create_user(authorized_domains=["life.dkim.test"])
        self.assertIsNone(self._send(d, user, password, "a@life.dkim.test").message["DKIM-Signature"])
        self.assertEqual(d.api("DELETE", "/api/v1/dkim/life.dkim.test").status, 204)
        self.assertEqual(d.api("GET", "/api/v1/dkim/life.dkim.test").status, 404)
        self.assertEqual(d.api("DELETE", "/api/v1/dkim/life.dkim.test").status, 404)
        for body in ({"algorithm": "rsa-sha1"}, {"selector": "bad selector"}, {"other": 1}):
            response = d.api("POST", "/api/v1/dkim/bad.dkim.test", body)
            self.assertEqual((response.status, response.json["error"]["code"]), (400, "validation_error"), body)
        self.assertEqual(d.api("POST", "/api/v1/dkim/not..a.domain").status, 400)
        self.assertEqual(d.api("PATCH", "/api/v1/dkim/bad.dkim.test", {"enabled": "yes"}).status, 400)


class PolicyDryRunTests(TestCase):
    """POST /api/v1/users/{u}/check answers as a real session does, and changes nothing."""

    # name: (mail_from, header_from, headers)
    CASES: dict[str, tuple[str, str | None, dict[str, str | list[str]]]] = {
        "authorized": ("a@ok.test", "A <a@ok.test>", {"Subject": "hi", "X-SMTPAPI": '{"Priority": 2}'}),
        "unauthorized envelope": ("a@other.test", "A <a@ok.test>", {"Subject": "hi"}),
        "unauthorized header From": ("a@ok.test", "B <b@other.test>", {"Subject": "hi"}),
        "two From headers": ("a@ok.test", None, {"From": ["a@ok.test", "b@ok.test"], "Subject": "hi"}),
        "bad X-SMTPAPI": ("a@ok.test", "a@ok.test", {"X-SMTPAPI": "{not json"}),
        "no From header": ("a@ok.test", None, {"Subject": "hi"}),
    }

    def test_dry_run_agrees_with_sessions(self) -> None:
        """
        For each case the dry-run's reply code and enhanced status are the
        real session's; dry-runs queue, count and notify nothing.
        """
        d = DAEMON.get()
        user, password = d.create_user(authorized_domains=["ok.test"], priority=3)
        answers = {}
        for name, (mail_from, header_from, headers) in self.CASES.items():
            body = {"mail_from": mail_from, "recipients": ["r@dest.test"], "headers": headers}
            if header_from is not None:
                body["header_from"] = header_from
            response = d.api("POST", f"/api/v1/users/{user}/check", body)
            self.assertEqual(response.status, 200, (name, response.json))
            answers[name] = response.json
        self.assertEqual(d.api("GET", f"/api/v1/messages?user={user}").json["messages"], [])
        self.assertEqual(d.api("GET", f"/api/v1/notifications?user={user}").json["notifications"], [])
        groups = d.api("GET", f"/api/v1/stats?user={user}").json["groups"]
        self.assertEqual(sum(g["rejected"] + g["messages"] for g in groups), 0)
        self.assertEqual(answers["authorized"]["effective_priority"], 2)
        self.assertTrue(answers["authorized"]["accepted"])
        self.assertTrue(answers["authorized"]["reasons"])
        for name, (mail_from, header_from, headers) in self.CASES.items():
            client = logged_in(d.plain_ports[0], user, password)
            try:
                code, text = submit(client, mail_from, ["r@dest.test"], _message(header_from, headers))
            finally:
                client.quit()
            session = (code, text.split(" ", 1)[0])
            answer = answers[name]
            self.assertEqual(_status(answer["reply"]), session, (name, answer, text))
            self.assertEqual(answer["accepted"], code == 250, name)
            if code != 250:
                self.assertIsNone(answer["effective_priority"], name)

    def test_suppressed_recipient(self) -> None:
        """A recipient on the user's suppression list gets the session's 550 5.1.1 in the dry-run too."""
        d = DAEMON.get()
        user, password = d.create_user(authorized_domains=["ok.test"])
        added = d.api("POST", f"/api/v1/users/{user}/suppressions", {"address": "gone@dest.test", "reason": "550 no such user"})
        self.assertEqual(added.status, 201, added.json)
        body = {"mail_from": "a@ok.test", "recipients": ["gone@dest.test"]}
        answer = d.api("POST", f"/api/v1/users/{user}/check", body).json
        client = logged_in(d.plain_ports[0], user, password)
        try:
            code, text = submit(client, "a@ok.test", ["gone@dest.test"], _message("a@ok.test", {"Subject": "s"}))
        finally:
            client.quit()
        self.assertEqual((code, text.split(" ", 1)[0]), (550, "5.1.1"))
        self.assertEqual(_status(answer["reply"]), (code, "5.1.1"))
        self.assertFalse(answer["accepted"])

    def test_several_recipients(self) -> None:
        """
        With several recipients each gets its RCPT reply; the message is
        accepted when one recipient is.
        """
        d = DAEMON.get()
        user, _ = d.create_user(authorized_domains=["ok.test"])
        body = {"mail_from": "a@ok.test", "recipients": ["r@dest.test", "bad address", "ü@dest.test"]}
        answer = d.api("POST", f"/api/v1/users/{user}/check", body).json
        self.assertTrue(answer["accepted"])
        self.assertEqual(answer["reply"], "250 2.0.0 Ok: would be queued")
        self.assertEqual(
            [(r["address"], r["accepted"], _status(r["reply"])) for r in answer["recipients"]],
            [("r@dest.test", True, (250, "2.1.5")), ("bad address", False, (501, "5.1.3")), ("ü@dest.test", False, (553, "5.6.7"))],
        )

    def test_text_no_store_could_hold(self) -> None:
        """
        A recipient holding NUL or a lone surrogate is refused as the
        session refuses a bad address, not with a 400: a dry-run stores
        nothing.
        """
        d = DAEMON.get()
        user, _ = d.create_user(authorized_domains=["ok.test"])
        body = {"mail_from": "a@ok.test", "recipients": ["r@dest.test", "a\0b@dest.test", "\ud800@dest.test"]}
        response = d.api("POST", f"/api/v1/users/{user}/check", body)
        self.assertEqual(response.status, 200, response.json)
        refused = [r for r in response.json["recipients"] if not r["accepted"]]
        self.assertEqual(len(refused), 2, response.json)
        self.assertTrue(all(r["reply"].startswith("5") for r in refused), refused)

    def test_errors(self) -> None:
        """An unknown user is a 404; a body without recipients or with a header value holding a line break is a 400."""
        d = DAEMON.get()
        user, _ = d.create_user(authorized_domains=["ok.test"])
        unknown = d.api("POST", "/api/v1/users/nobody-here/check", {"mail_from": "a@ok.test", "recipients": ["r@x.test"]})
        self.assertEqual(unknown.status, 404)
        for body in (
            {"mail_from": "a@ok.test"},
            {"mail_from": "a@ok.test", "recipients": []},
            {"mail_from": "a@ok.test", "recipients": ["r@x.test"], "headers": {"Subject": "a\r\nBcc: x"}},
            {"mail_from": 1, "recipients": ["r@x.test"]},
            ["not", "an", "object"],
        ):
            response = d.api("POST", f"/api/v1/users/{user}/check", body)
            self.assertEqual((response.status, response.json["error"]["code"]), (400, "validation_error"), body)

