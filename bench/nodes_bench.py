"""
Nodes benchmark (issue 11): one node on SQLite, one node on PostgreSQL,
and two nodes sharing one PostgreSQL, under the same load, all relaying to
an C{smtp-sink} (Postfix's test server).

Each node is a real twistd with C{[server] workers = 1}, its own state
directory and, on PostgreSQL, its own C{node_name}; the PostgreSQL server
is a private one (L{tests.harness.postgres}: fsync and synchronous_commit
on), each scenario on a fresh database.  The load is the delivery
benchmark's generator: N messages of 5 KiB over S sessions, each session
STARTTLS then AUTH PLAIN, connection reused, MAIL/RCPT/DATA pipelined;
with two nodes each gets half the sessions and half the messages, as a
TCP balancer in front of them would.  For each scenario:

  - accepted messages/s (first connect to the last 250, both nodes);
  - end-to-end messages/s (first connect until the sink has every one);
  - p50/p99 of the time from the final dot to the 250;
  - CPU seconds per 1,000 messages, over the same window, of the
    smtpplus process trees and, separately, of PostgreSQL's (the
    postmaster and its backends);
  - PostgreSQL commits per message (C{pg_stat_database.xact_commit} of the
    scenario's database; heartbeats and start-up count too, a few dozen);
  - exactly once: every Message-ID accepted is in the sink's dump once,
    and on PostgreSQL how many messages each node claimed.

On one machine the second node shares the cores with the first, with
PostgreSQL, the generator and the sink: the report also derives what one
core of each side would do alone (1,000 / its CPU-s per 1,000 messages).

Run: python -m bench.nodes_bench
Environment: BENCH_NODES_MESSAGES (default 3000), BENCH_NODES_SESSIONS (20),
BENCH_NODES_SIZE (5120), BENCH_NODES_DRAIN_TIMEOUT (seconds, 600),
BENCH_NODES_JSON (a path: write the results there as JSON),
BENCH_KEEP=1 (keep the work directory: the nodes' logs, the sink's dump).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

import psycopg
from twisted.trial.unittest import SkipTest

from bench.common import HOST, ProbedDaemon, loadavg, percentile, tree_cpu
from bench.delivery_bench import Sink, generate
from tests.harness.clients import SMTPClient
from tests.harness.postgres import PostgresServer, server
from tests.harness.tls import client_context

SENDER_DOMAIN = "bench.example"
RECIPIENT = "rcpt@sink.example"
MESSAGES = int(os.environ.get("BENCH_NODES_MESSAGES", "3000"))
SESSIONS = int(os.environ.get("BENCH_NODES_SESSIONS", "20"))
SIZE = int(os.environ.get("BENCH_NODES_SIZE", "5120"))
DRAIN_TIMEOUT = float(os.environ.get("BENCH_NODES_DRAIN_TIMEOUT", "600"))

# name: (the [storage] backend, how many nodes)
SCENARIOS: dict[str, tuple[str, int]] = {
    "1 node, SQLite": ("sqlite", 1),
    "1 node, PostgreSQL": ("postgresql", 1),
    "2 nodes, PostgreSQL": ("postgresql", 2),
}
NODE_NAMES = ("A", "B")


def postmaster_pid(srv: PostgresServer) -> int:
    """The postmaster's PID, from the first line of the C{postmaster.pid} it writes into its data directory."""
    with open(os.path.join(srv.data, "postmaster.pid")) as f:
        return int(f.readline())


def commits(dsn: str) -> int:
    """Transactions committed in C{dsn}'s database, as the statistics collector last heard of them."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()
    return int(row[0]) if row else 0


def split(total: int, parts: int) -> list[int]:
    """C{total} in C{parts} nearly equal shares, the larger ones first."""
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


async def warm_up(port: int, password: str) -> None:
    """One STARTTLS + AUTH session, so that the node has verified the password (bcrypt) before the clock runs."""
    client = await SMTPClient.connect(HOST, port)
    await client.ehlo()
    await client.starttls(client_context())
    await client.ehlo()
    await client.auth_plain("bench", password)
    await client.quit()


async def load(ports: list[int], password: str, sink: Sink) -> dict[str, Any]:
    """
    The messages and sessions split over C{ports}, each share under its own
    envelope sender, all at once; then wait until the sink has every
    accepted message.
    """
    shares = await asyncio.gather(
        *(
            generate(HOST, port, count, sessions, SIZE, f"bulk-{node}@{SENDER_DOMAIN}", RECIPIENT, ("bench", password), client_context())
            for port, node, count, sessions in zip(ports, NODE_NAMES, split(MESSAGES, len(ports)), split(SESSIONS, len(ports)), strict=False)
        )
    )
    accepted = sum(share["accepted"] for share in shares)
    started = min(share["started"] for share in shares)
    ended = max(share["ended"] for share in shares)
    latencies = [value for share in shares for value in share["latencies"]]
    failures: collections.Counter[str] = collections.Counter()
    for share in shares:
        failures.update(share["failures"])
    print(f"  accepted {accepted} in {ended - started:.1f} s; failures: {dict(failures) or 'none'}", flush=True)
    done = await sink.wait_count(accepted, DRAIN_TIMEOUT, lambda n: print(f"  sink: {n}/{accepted}", flush=True))
    end = done if done is not None else time.monotonic()
    return {
        "accepted": accepted,
        "per_node_accepted": [share["accepted"] for share in shares],
        "failures": dict(failures),
        "accept_rate": accepted / (ended - started) if accepted else 0.0,
        "drained": done is not None,
        "delivered": sink.count,
        "e2e_rate": sink.count / (end - started),
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
        "generator_cpu": sum(share["client_cpu"] for share in shares),
    }


def message_ids(dump: str) -> collections.Counter[bytes]:
    """How often each Message-ID occurs in the sink's dump file."""
    with open(dump, "rb") as f:
        return collections.Counter(re.findall(rb"^Message-ID: (<[^>\r\n]*>)", f.read(), re.MULTILINE))


def run_scenario(directory: str, name: str, backend: str, nodes: int, srv: PostgresServer | None) -> dict[str, Any]:
    """One scenario on fresh state directories, a fresh database and a fresh sink: its figures."""
    os.makedirs(directory)
    sink = Sink(os.path.join(directory, "sink"))
    daemons: list[ProbedDaemon] = []
    dsn = None
    try:
        config = (
            f'\n[delivery]\nmode = "smarthost"\nsmarthost = "{HOST}:{sink.port}"\nsmarthost_tls = "none"\n'
            f"max_concurrency = {SESSIONS}\n"
        )
        if backend == "postgresql":
            assert srv is not None
            database = f"bench_nodes_{os.path.basename(directory)}"
            srv.admin(f"CREATE DATABASE {database} TEMPLATE template0")
            dsn = srv.dsn(database)
            config += f'[storage]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
        # One after the other: the first creates the schema.
        for node in NODE_NAMES[:nodes]:
            daemons.append(
                ProbedDaemon(os.path.join(directory, node), config, workers=1, server_config=f'node_name = "{node}"\n')
            )
        password = daemons[0].create_user("bench", SENDER_DOMAIN)
        for daemon in daemons:
            asyncio.run(warm_up(daemon.port, password))
        if srv is not None:
            # Start each scenario with no dirty pages of the one before.
            srv.admin("CHECKPOINT")
        commits0 = commits(dsn) if dsn else None
        pg0 = tree_cpu(postmaster_pid(srv)) if srv is not None else 0.0
        cpu0 = [daemon.cpu() for daemon in daemons]
        print(f"  submitting {MESSAGES} x {SIZE} B over {SESSIONS} sessions to {nodes} node(s)...", flush=True)
        result = asyncio.run(load([daemon.port for daemon in daemons], password, sink))
        node_cpu = [daemon.cpu() - before for daemon, before in zip(daemons, cpu0, strict=True)]
        pg_cpu = tree_cpu(postmaster_pid(srv)) - pg0 if srv is not None and dsn else None
        for daemon in daemons:
            if not result["drained"] or result["failures"]:
                print(f"  node output (last lines):\n{daemon.tail()}", flush=True)
            daemon.stop()
        daemons.clear()
        claims: dict[str, int] = {}
        if dsn:
            # The nodes have stopped: their backends, exiting, reported their statistics.
            result["pg_commits"] = commits(dsn) - commits0
            with psycopg.connect(dsn) as conn:
                claims = dict(conn.execute("SELECT claimed_by, COUNT(*) FROM queue_messages GROUP BY claimed_by").fetchall())
                result["statuses"] = dict(conn.execute("SELECT status, COUNT(*) FROM queue_messages GROUP BY status").fetchall())
        sink_cpu = sink.cpu()
        sink.stop()
        seen = message_ids(sink.dump)
        thousands = max(result["delivered"], 1) / 1000
        result.update(
            name=name,
            backend=backend,
            nodes=nodes,
            smtpplus_cpu=sum(node_cpu) / thousands,
            node_cpu=[value / thousands for value in node_cpu],
            pg_cpu=None if pg_cpu is None else pg_cpu / thousands,
            sink_cpu=sink_cpu,
            claims=claims,
            distinct=len(seen),
            duplicates=sum(count - 1 for count in seen.values()),
        )
        result["exactly_once"] = result["duplicates"] == 0 and result["distinct"] == result["accepted"]
        return result
    finally:
        for daemon in daemons:
            daemon.stop()
        sink.stop()


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or value != value else f"{value:{spec}}"


def report(results: list[dict[str, Any]], load_before: str) -> None:
    """The table, then what one core of each side would do alone."""
    print()
    print(
        f"nodes bench: {MESSAGES} messages x {SIZE} B over {SESSIONS} sessions (STARTTLS + AUTH PLAIN, connections "
        f"reused; with 2 nodes half each) per scenario; [server] workers = 1 per node; cores: {os.cpu_count()}, "
        f"shared by every node, PostgreSQL, the generator and the sink; fsync on everywhere"
    )
    print(f"load average (1, 5, 15 min) before / after: {load_before} / {loadavg()}")
    print(
        f"{'':22}{'accepted/s':>11}{'e2e/s':>8}{'p50 ms':>8}{'p99 ms':>8}{'smtpplus CPU-s/1000':>21}"
        f"{'PG CPU-s/1000':>15}{'PG commits/msg':>16}{'delivered':>11}{'exactly once':>14}"
    )
    for r in results:
        commits_per = r["pg_commits"] / max(r["accepted"], 1) if "pg_commits" in r else None
        print(
            f"{r['name']:22}{r['accept_rate']:>11.0f}{r['e2e_rate']:>8.0f}{_fmt(1000 * r['p50'], '.1f'):>8}"
            f"{_fmt(1000 * r['p99'], '.1f'):>8}{r['smtpplus_cpu']:>21.2f}{_fmt(r['pg_cpu'], '.2f'):>15}"
            f"{_fmt(commits_per, '.1f'):>16}{r['delivered']:>11}"
            f"{('yes' if r['exactly_once'] else 'NO'):>14}"
        )
        details = []
        if r["failures"]:
            details.append(f"failures {r['failures']}")
        if r["duplicates"] or r["distinct"] != r["accepted"]:
            details.append(f"{r['distinct']} distinct Message-IDs at the sink, {r['duplicates']} duplicates, {r['accepted']} accepted")
        if r["nodes"] > 1:
            details.append(
                "accepted per node " + ", ".join(f"{n} {c}" for n, c in zip(NODE_NAMES, r["per_node_accepted"], strict=False))
                + "; claimed per node " + ", ".join(f"{n} {c}" for n, c in sorted(r["claims"].items()))
                + "; CPU-s/1000 per node " + ", ".join(f"{n} {c:.2f}" for n, c in zip(NODE_NAMES, r["node_cpu"], strict=False))
            )
        if r.get("statuses") and set(r["statuses"]) != {"sent"}:
            details.append(f"queue statuses {r['statuses']}")
        for line in details:
            print(f"{'':22}{line}")
    print("one core alone (1,000 / CPU-s per 1,000 messages; what separate machines would allow before disks and network):")
    for r in results:
        node = r["smtpplus_cpu"] / r["nodes"]
        line = f"  {r['name']}: one smtpplus node {_fmt(1000 / node if node else None, '.0f')} msg/s"
        if r["pg_cpu"]:
            line += f"; PostgreSQL {1000 / r['pg_cpu']:.0f} msg/s"
        print(line)


def main() -> None:
    """Run the three scenarios and print the comparison."""
    load_before = loadavg()
    print(f"load average (1, 5, 15 min) at the start: {load_before}", flush=True)
    if not os.access("/usr/sbin/smtp-sink", os.X_OK):
        print("SKIPPED: smtp-sink (from Postfix) is missing; see delivery_bench.")
        return
    try:
        srv = server()
    except SkipTest as e:
        print(f"SKIPPED: {e}")
        return
    work = tempfile.mkdtemp(prefix="smtpplus-nodes-bench-")
    # smtp-sink runs as "nobody" and writes its dump below.
    os.chmod(work, 0o755)
    try:
        results = []
        for index, (name, (backend, nodes)) in enumerate(SCENARIOS.items()):
            print(f"running: {name}", flush=True)
            results.append(run_scenario(os.path.join(work, str(index)), name, backend, nodes, srv if backend == "postgresql" else None))
        report(results, load_before)
        if os.environ.get("BENCH_NODES_JSON"):
            with open(os.environ["BENCH_NODES_JSON"], "w") as f:
                json.dump({"messages": MESSAGES, "size": SIZE, "sessions": SESSIONS, "results": results}, f, indent=2)
            print(f"results written to {os.environ['BENCH_NODES_JSON']}")
    finally:
        srv.destroy()
        if os.environ.get("BENCH_KEEP") == "1":
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
