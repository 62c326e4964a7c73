"""
Statistics benchmark: record 1,000,000 messages (with their recipients'
results and some refusals) through the real recorder into a fresh database,
then time the stats query, as the admin endpoint runs it plus JSON encoding,
for every policy, over all users and for one user.

Run: python -m bench.stats_bench [--messages N] [--repeat R]
Environment: BENCH_STATS_MESSAGES (default 1000000), the default of --messages.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.task import Clock, react

from smtpplus.notify.stats import POLICIES, Statistics
from smtpplus.storage.database import Database

USERS = 50
SENDERS_PER_USER = 3
VARIANTS = 5  # 400 texts x 5 numbers = 2,000 distinct subjects, 40 per user
CAMPAIGNS = 20
DAYS = 365


def _fixtures(rng: random.Random) -> tuple[list[str], dict[str, list[tuple[str, str]]], dict[str, list[str]], list[str]]:
    """Users with their own sender addresses and their own subjects (each a text with a variable part)."""
    users = [f"smtp-user{i:02d}" for i in range(USERS)]
    senders = {
        user: [(f"sender{j}@{user}.example.com", f"Team {j} of {user}") for j in range(SENDERS_PER_USER)]
        for user in users
    }
    kinds = ["Invoice", "Order", "Ticket", "Reminder", "Welcome", "Newsletter", "Report", "Alert", "Receipt", "Offer"]
    topics = [f"{a} {b}" for a in ("shop", "support", "billing", "shipping", "account", "team", "store", "club")
              for b in ("north", "south", "east", "west", "central")]
    texts = [f"{kind} for {topic}" for kind in kinds for topic in topics]  # 400 texts
    subjects = [f"{text} no. {rng.randint(1000, 99999)}" for text in texts for _ in range(VARIANTS)]
    per_user = len(subjects) // USERS
    owned = {user: subjects[i * per_user:(i + 1) * per_user] for i, user in enumerate(users)}
    campaigns = [f"CAMP-{c:03d}" for c in range(CAMPAIGNS)]
    return users, senders, owned, campaigns


def record(stats: Statistics, count: int, rng: random.Random, fixtures: Any) -> float:
    """Record C{count} messages; returns the seconds spent in the recorder."""
    users, senders, subjects, campaigns = fixtures
    start = datetime(2024, 1, 1, tzinfo=UTC)
    spent = 0.0
    for n in range(count):
        user = rng.choice(users)
        address, name = rng.choice(senders[user])
        created = start + timedelta(seconds=rng.randrange(DAYS * 86400))
        message = {
            "id": f"m{n}",
            "user": user,
            "mail_from": address,
            "header_from": f'"{name}" <{address}>',
            "subject": rng.choice(subjects[user]),
            "campaign_code": rng.choice(campaigns) if rng.random() < 0.1 else None,
            "created_at": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "recipients": rng.choice((1, 1, 1, 2, 3)),
        }
        outcomes = [rng.random() for _ in range(message["recipients"])]
        t0 = time.perf_counter()
        stats.accepted(message)
        for outcome in outcomes:
            if outcome < 0.05:
                stats.recipient_result(message, "deferred")
                stats.recipient_result(message, "sent", previous="deferred")
            elif outcome < 0.08:
                stats.recipient_result(message, "bounced")
            elif outcome < 0.10:
                stats.recipient_result(message, "deferred")
            else:
                stats.recipient_result(message, "sent")
        if n % 100 == 0:
            stats.rejected(user, "spoof@elsewhere.example", "", None)
        spent += time.perf_counter() - t0
    return spent


@inlineCallbacks
def run(reactor: Any, messages: int, repeat: int) -> Any:
    directory = tempfile.mkdtemp(prefix="smtpplus-bench-")
    db = Database(reactor, os.path.join(directory, "smtpplus.db"))
    try:
        # A Clock: flushes happen when enough counters wait, or below.
        stats = Statistics(db, Clock(), lambda user: succeed("dynamic_subject"))
        rng = random.Random(42)
        fixtures = _fixtures(random.Random(7))
        t0 = time.perf_counter()
        spent = 0.0
        chunk = 50_000
        for done in range(0, messages, chunk):
            spent += record(stats, min(chunk, messages - done), rng, fixtures)
            yield stats.flush()
        total = time.perf_counter() - t0
        rows = yield db.run(lambda conn: conn.execute("SELECT COUNT(*) FROM stats_groups").fetchone()[0])
        print(f"recorded {messages:,} messages in {total:.1f} s; "
              f"recorder hot path {spent / messages * 1e6:.1f} us per message (with its recipients); "
              f"{rows:,} group rows, database {os.path.getsize(db.path) / 1e6:.1f} MB")
        print(f"{'policy':<22}{'user':<14}{'groups':>8}{'median ms':>12}{'max ms':>10}")
        worst = 0.0
        for policy in POLICIES:
            for user in (None, "smtp-user07"):
                times = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    result = yield stats.stats(user, policy)
                    json.dumps(result)
                    times.append((time.perf_counter() - t) * 1000)
                worst = max(worst, max(times))
                print(f"{policy:<22}{user or '(all)':<14}{len(result['groups']):>8}"
                      f"{statistics.median(times):>12.2f}{max(times):>10.2f}")
        print(f"slowest query: {worst:.2f} ms ({'under' if worst < 100 else 'OVER'} the 100 ms budget)")
    finally:
        db.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=int(os.environ.get("BENCH_STATS_MESSAGES", "1000000")))
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    react(lambda reactor: run(reactor, args.messages, args.repeat))


if __name__ == "__main__":
    main()
