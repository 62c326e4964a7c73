"""
Submission benchmark (issue 14): what idempotent submission and DKIM
signing cost, in one run, against the same real daemon configuration with
them off.

Four daemons one after the other, each relaying to an aiosmtpd smarthost
(in this process): dedup off and no DKIM key (the baseline), dedup on
(every message has its own Message-ID, so each is looked up and recorded),
and dedup off with an RSA-2048 and then an Ed25519 key for the sender
domain (every message signed before relaying).  For each:

  - accepted messages/s: N messages of 5 KiB over S concurrent sessions,
    AUTH PLAIN on plaintext, connections reused;
  - CPU seconds per 1,000 messages of the daemon's process tree, while
    accepting (where dedup works; relaying runs meanwhile) and over
    accepting plus relaying until the smarthost has every message (where
    signing works);
  - the reactor's worst stall meanwhile (a 10 ms probe timer): signing
    runs on a thread, but dkimpy's canonicalization is Python that holds
    the GIL (the RSA operation itself is OpenSSL's).

Run: python -m bench.submission_bench
Environment: BENCH_SUBMISSION_MESSAGES (default 2000), BENCH_SUBMISSION_SESSIONS
(20), BENCH_SUBMISSION_SIZE (5120), BENCH_SUBMISSION_DRAIN_TIMEOUT (seconds, 300).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from typing import Any

from bench.common import HOST, ProbedDaemon, tree_cpu
from tests.harness.clients import SMTPClient, SMTPError
from tests.harness.messages import sized_message
from tests.harness.smarthost import Smarthost

SENDER_DOMAIN = "bench.example"
MESSAGES = int(os.environ.get("BENCH_SUBMISSION_MESSAGES", "2000"))
SESSIONS = int(os.environ.get("BENCH_SUBMISSION_SESSIONS", "20"))
SIZE = int(os.environ.get("BENCH_SUBMISSION_SIZE", "5120"))
DRAIN_TIMEOUT = float(os.environ.get("BENCH_SUBMISSION_DRAIN_TIMEOUT", "300"))

# name: (the [delivery] dedup_window, the DKIM algorithm or None)
SCENARIOS: dict[str, tuple[int, str | None]] = {
    "baseline (dedup off, no DKIM)": (0, None),
    "dedup on": (86400, None),
    "DKIM rsa-sha256 (2048)": (0, "rsa-sha256"),
    "DKIM ed25519-sha256": (0, "ed25519-sha256"),
}


async def submit_all(port: int, username: str, password: str) -> dict[str, Any]:
    """Submit L{MESSAGES} messages over L{SESSIONS} sessions; the accepted count, failures and elapsed time."""
    remaining = iter(range(MESSAGES))
    accepted = 0
    failures: dict[str, int] = {}
    started = time.monotonic()
    mail_from, recipient = f"bench@{SENDER_DOMAIN}", "sink@dest.example"

    async def session() -> None:
        nonlocal accepted
        try:
            client = await SMTPClient.connect(HOST, port)
            await client.ehlo()
            await client.auth_plain(username, password)
        except (TimeoutError, OSError, SMTPError) as e:
            failures[f"session setup: {e}"] = failures.get(f"session setup: {e}", 0) + 1
            return
        try:
            for index in remaining:
                code, text = await client.send(mail_from, recipient, sized_message(index, SIZE, mail_from, recipient))
                if code == 250:
                    accepted += 1
                else:
                    failures[f"{code} {text[:60]}"] = failures.get(f"{code} {text[:60]}", 0) + 1
        except (TimeoutError, OSError, SMTPError) as e:
            failures[f"session: {e}"] = failures.get(f"session: {e}", 0) + 1
        await client.quit()

    await asyncio.gather(*(session() for _ in range(SESSIONS)))
    return {"accepted": accepted, "failures": failures, "elapsed": time.monotonic() - started}


def run_scenario(directory: str, name: str, dedup_window: int, algorithm: str | None) -> dict[str, Any]:
    """One daemon in C{directory} with these settings: accept rate, CPU per 1,000 messages accepting and end to end."""
    sink = Smarthost()
    daemon = None
    try:
        daemon = ProbedDaemon(
            directory,
            "auth_requires_tls = false\n"
            f'[delivery]\nmode = "smarthost"\nsmarthost = "{HOST}:{sink.port}"\nsmarthost_tls = "none"\n'
            f"max_concurrency = {SESSIONS}\ndedup_window = {dedup_window}\n",
        )
        password = daemon.create_user("bench", SENDER_DOMAIN)
        if algorithm is not None:
            daemon.api("POST", f"/api/v1/dkim/{SENDER_DOMAIN}", {"algorithm": algorithm})
        pid = daemon.proc.pid
        wall0 = time.time()
        cpu0 = tree_cpu(pid)
        accepting = asyncio.run(submit_all(daemon.port, "bench", password))
        cpu_accepting = tree_cpu(pid) - cpu0
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while len(sink.received()) < accepting["accepted"] and time.monotonic() < deadline:
            time.sleep(0.1)
        received = sink.received()
        cpu_total = tree_cpu(pid) - cpu0
        signed = sum(1 for m in received if m.data.startswith(b"DKIM-Signature:"))
        thousands = max(accepting["accepted"], 1) / 1000
        return {
            "name": name,
            "accepted": accepting["accepted"],
            "failures": accepting["failures"],
            "rate": accepting["accepted"] / accepting["elapsed"],
            "cpu_accept": cpu_accepting / thousands,
            "cpu_total": cpu_total / thousands,
            "relayed": len(received),
            "signed": signed,
            "stall_ms": daemon.stalls(wall0, time.time()),
        }
    finally:
        if daemon is not None:
            daemon.stop()
        sink.stop()


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def report(results: list[dict[str, Any]]) -> None:
    """The table, with each scenario's difference to the baseline."""
    print(f"{MESSAGES} messages of {SIZE} B over {SESSIONS} sessions per scenario; cores: {os.cpu_count()}")
    print(
        f"{'':32}{'accepted/s':>11}{'CPU-s/1000 accepting':>22}{'CPU-s/1000 end to end':>23}"
        f"{'relayed':>9}{'signed':>8}{'worst stall ms':>16}"
    )
    base = results[0]
    for r in results:
        print(
            f"{r['name']:32}{r['rate']:>11.0f}{r['cpu_accept']:>22.2f}{r['cpu_total']:>23.2f}"
            f"{r['relayed']:>9}{r['signed']:>8}{_ms(r['stall_ms']):>16}"
        )
        if r["failures"]:
            print(f"{'':32}failures: {r['failures']}")
    for r in results[1:]:
        print(
            f"{r['name']} vs baseline: accept rate {100 * (r['rate'] / base['rate'] - 1):+.0f} %, "
            f"CPU accepting {r['cpu_accept'] - base['cpu_accept']:+.2f} s, "
            f"end to end {r['cpu_total'] - base['cpu_total']:+.2f} s per 1,000 messages"
        )


def main() -> None:
    """Run every scenario and print the comparison."""
    work = tempfile.mkdtemp(prefix="smtpplus-bench-submission-")
    try:
        results = []
        for index, (name, (dedup_window, algorithm)) in enumerate(SCENARIOS.items()):
            print(f"running: {name}", flush=True)
            results.append(run_scenario(os.path.join(work, str(index)), name, dedup_window, algorithm))
        report(results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
