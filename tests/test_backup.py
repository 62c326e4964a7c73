"""
README's "Backup and restore" for SQLite, done once for real: a running
daemon's database is backed up online (the sqlite3 CLI's C{.backup}, or
Python's backup API where the CLI is missing), more mail is accepted, the
daemon stops, the backup is put in place and the daemon starts again.  The
users and messages of the backup are there, and the mail accepted after
the backup is queued again from the spool and delivered: nothing accepted
is lost.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess

from twisted.trial import unittest

from tests.harness.clients import logged_in, submit
from tests.harness.daemon import Daemon, spawn_twistd
from tests.harness.messages import message, queue_id
from tests.harness.polling import poll


def _config(daemon: Daemon) -> str:
    return daemon.toml(hostname="relay.example.test", delivery="retry_schedule = [600]")


def online_backup(database: str, target: str) -> None:
    """Back up a database in use, as README says: C{sqlite3 DB ".backup FILE"}, or the backup API."""
    cli = shutil.which("sqlite3")
    if cli is not None:
        subprocess.run([cli, database, f".backup {target}"], check=True, timeout=60, capture_output=True)
        return
    source = sqlite3.connect(database)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
    finally:
        copy.close()
        source.close()


class BackupRestoreTests(unittest.TestCase):
    def test_restore_older_backup_keeps_users_messages_and_later_mail(self) -> None:
        """
        After restoring an online backup of the database, the users and
        messages it holds are back, and a message accepted after the
        backup (only in the spool) is queued again and delivered.
        """
        daemon = Daemon(_config, plain=1, tls=0)
        self.addCleanup(daemon.stop)
        assert daemon.sink is not None
        port = daemon.plain_ports[0]
        database = os.path.join(daemon.state_dir, "smtpplus.db")
        _, password = daemon.create_user(username="shop", authorized_domains="example.com")
        client = logged_in(port, "shop", password)
        before = queue_id(submit(client, "a@example.com", ["x@dest.test"], message("before backup", "a@example.com")))
        daemon.sink.wait_for("before backup")
        self.assertTrue(poll(lambda: daemon.api("GET", f"/api/v1/messages/{before}").json["status"] == "sent", 10))

        backup = os.path.join(daemon.directory, "smtpplus-backup.db")
        online_backup(database, backup)
        check = sqlite3.connect(backup)
        self.assertEqual(check.execute("PRAGMA integrity_check").fetchone(), ("ok",))
        check.close()

        # Mail accepted after the backup, held in the queue: the sink is down.
        daemon.sink.stop()
        after = queue_id(submit(client, "a@example.com", ["y@dest.test"], message("after backup", "a@example.com")))
        client.quit()
        daemon.create_user(username="late", authorized_domains="example.com")

        daemon.process.terminate()
        self.assertIsNotNone(daemon.process.wait(15), daemon.process.output())
        for suffix in ("-wal", "-shm"):
            if os.path.exists(database + suffix):
                os.remove(database + suffix)
        shutil.copyfile(backup, database)
        os.chmod(database, 0o600)

        daemon.sink.start()
        daemon.process = spawn_twistd(["--config", daemon.config_path], daemon.directory)
        daemon.wait_ready()

        self.assertEqual(daemon.api("GET", "/api/v1/users/shop").status, 200)
        self.assertEqual(daemon.api("GET", "/api/v1/users/late").status, 404)
        self.assertEqual(daemon.api("GET", f"/api/v1/messages/{before}").json["status"], "sent")
        received = daemon.sink.wait_for("after backup")
        self.assertEqual(received.rcpt_tos, ["y@dest.test"])
        self.assertEqual(len(daemon.sink.find("before backup")), 1)
        self.assertTrue(
            poll(lambda: daemon.api("GET", f"/api/v1/messages/{after}").json["status"] == "sent", 10),
            daemon.process.output(),
        )
        self.assertIn(f"message {after} had no queue entry: queued again from its spool file", daemon.process.output())
        client = logged_in(port, "shop", password)
        client.quit()
