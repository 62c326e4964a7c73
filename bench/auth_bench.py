"""
AUTH benchmark (issue 3): the real daemon (twistd, STARTTLS required for
AUTH, 50 users created through the REST API) under 50 concurrent clients
that each log in again and again, a new connection per login: connect,
EHLO, STARTTLS, EHLO, AUTH PLAIN, QUIT.

Scenarios:
  (a) every client logs in as the same user;
  (b) client i logs in as user i (50 users).
The first login of a user pays bcrypt (the checker caches a verified
password for 5 minutes; 50 clients logging in at once as one cold user
each pay it), so each scenario has a cold phase, until every client has
logged in once (at most 60 s), reported apart from the warm phase that
follows it for BENCH_AUTH_SECONDS (default 10 s).

Meanwhile a separate process (so that the login clients' event loop does
not distort it) keeps 4 other sessions sending NOOP, one every 10 ms each,
and records each reply's latency; the same probe on the idle daemon gives
the baseline.  The daemon runs under a 10 ms LoopingCall stall probe
(see L{bench.common.ProbedDaemon}) that reports the reactor's longest stall.

Target: NOOP p99 < 50 ms during the logins.

Run: python -m bench.auth_bench
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, BinaryIO

from bench.common import HOST, ProbedDaemon, own_cpu
from tests.harness.clients import SMTPClient, SMTPError
from tests.harness.tls import client_context

USERS = 50
CONCURRENCY = 50
SECONDS = float(os.environ.get("BENCH_AUTH_SECONDS", "10"))
# The cold phase (first logins, bcrypt) ends when every user has logged in
# once; it may not take longer than this.
COLD_CAP = 60.0
BASELINE_SECONDS = 5.0
NOOP_SESSIONS = 4
NOOP_PAUSE = 0.01
NOOPS_PER_SESSION = 90
TARGET_P99_MS = 50.0


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- the NOOP probe (a child process) -------------------------------------------


def _read_reply(f: BinaryIO) -> bytes:
    """The last line of one (possibly multi-line) reply."""
    while True:
        line = f.readline()
        if not line:
            raise OSError("connection closed")
        if line[3:4] != b"-":
            return line


def _noop_session(port: int, stop: threading.Event, samples: list[tuple[float, float]], errors: list[str]) -> None:
    # The daemon closes a session after 100 commands without a transaction
    # (its junk-command limit): each connection sends fewer, then the next
    # one takes over.  Only NOOP round trips are sampled.
    while not stop.is_set():
        try:
            with socket.create_connection((HOST, port), timeout=10) as s:
                f = s.makefile("rb")
                _read_reply(f)
                s.sendall(b"EHLO probe.bench.example\r\n")
                _read_reply(f)
                for _ in range(NOOPS_PER_SESSION):
                    if stop.is_set():
                        break
                    sent = time.perf_counter()
                    s.sendall(b"NOOP\r\n")
                    if not _read_reply(f).startswith(b"250"):
                        errors.append("NOOP refused")
                        return
                    samples.append((time.time(), time.perf_counter() - sent))
                    stop.wait(NOOP_PAUSE)
                s.sendall(b"QUIT\r\n")
        except OSError as e:
            errors.append(str(e))
            return


def noop_probe(port: int, cap: float, sessions: int) -> None:
    """
    Child process entry: NOOP until stdin closes (at most C{cap} seconds),
    then the latencies as JSON on stdout.
    """
    stop = threading.Event()
    samples: list[tuple[float, float]] = []
    errors: list[str] = []
    threads = [threading.Thread(target=_noop_session, args=(port, stop, samples, errors)) for _ in range(sessions)]
    for t in threads:
        t.start()
    watcher = threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True)
    watcher.start()
    watcher.join(cap)
    stop.set()
    for t in threads:
        t.join(30)
    json.dump({"samples": list(samples), "errors": errors}, sys.stdout)


class NoopProbe:
    """The NOOP probe child process: L{finish} stops it and returns its samples."""

    def __init__(self, port: int, cap: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.auth_bench", "--noop-probe", str(port), str(cap), str(NOOP_SESSIONS)],
            stdout=subprocess.PIPE,
            stdin=subprocess.PIPE,
        )

    def finish(self) -> dict[str, Any]:
        try:
            out, _ = self.proc.communicate(b"", timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return {"samples": [], "errors": ["probe timed out"]}
        return json.loads(out or b'{"samples": [], "errors": ["no output"]}')


def latency_summary(samples: list[tuple[float, float]], since: float = 0.0, until: float = float("inf")) -> dict[str, float]:
    values = [1000 * latency for at, latency in samples if since <= at <= until]
    return {
        "n": len(values),
        "p50": _percentile(values, 0.50),
        "p99": _percentile(values, 0.99),
        "max": max(values) if values else float("nan"),
    }


# --- the login load -----------------------------------------------------------------


async def _login_once(port: int, context: ssl.SSLContext, username: str, password: str) -> None:
    client = await SMTPClient.connect(HOST, port)
    try:
        await client.ehlo()
        await client.starttls(context)
        await client.ehlo()
        await client.auth_plain(username, password)
        await client.command("QUIT", 221)
    finally:
        client.close()


async def login_load(port: int, credentials: list[tuple[str, str]], seconds: float) -> dict[str, Any]:
    """
    C{CONCURRENCY} clients, client i logging in as C{credentials[i %
    len]}, until every client has logged in once (the cold phase, at most
    L{COLD_CAP} s) and then for C{seconds} more.  Records each success's
    start (wall clock), latency and user.
    """
    context = client_context()
    pending = set(range(CONCURRENCY))
    wall0 = time.time()
    deadline = time.monotonic() + COLD_CAP + seconds
    warm_from = None
    successes: list[tuple[float, float, str]] = []
    failures: dict[str, int] = {}

    async def client(index: int) -> None:
        nonlocal deadline, warm_from
        username, password = credentials[index % len(credentials)]
        while time.monotonic() < deadline:
            started_wall, started = time.time(), time.perf_counter()
            try:
                await _login_once(port, context, username, password)
            except (OSError, TimeoutError, SMTPError, ssl.SSLError) as e:
                reason = str(e)[:80]
                failures[reason] = failures.get(reason, 0) + 1
                await asyncio.sleep(0.05)
                continue
            successes.append((started_wall, time.perf_counter() - started, username))
            pending.discard(index)
            if warm_from is None and not pending:
                warm_from = time.time()
                deadline = time.monotonic() + seconds

    cpu0 = own_cpu()
    await asyncio.gather(*(client(i) for i in range(CONCURRENCY)))
    return {
        "successes": successes,
        "failures": failures,
        "started": wall0,
        "warm_from": warm_from,
        "ended": time.time(),
        "client_cpu": own_cpu() - cpu0,
    }


def scenario(name: str, daemon: ProbedDaemon, credentials: list[tuple[str, str]]) -> dict[str, Any]:
    """One login scenario with the NOOP probe beside it."""
    print(f"[{name}] {CONCURRENCY} clients: cold phase, then {SECONDS:.0f} s warm...", flush=True)
    probe = NoopProbe(daemon.port, COLD_CAP + SECONDS + 30)
    cpu0 = daemon.cpu()
    load = asyncio.run(login_load(daemon.port, credentials, SECONDS))
    daemon_cpu = daemon.cpu() - cpu0
    noop = probe.finish()
    started, ended = load["started"], load["ended"]
    warm_from = load["warm_from"] or ended
    successes = load["successes"]
    # Warm logins: those that started after every client had logged in once.
    warm = [s for s in successes if s[0] >= warm_from]
    cold = [s for s in successes if s[0] < warm_from]
    elapsed = ended - started
    warm_seconds = ended - warm_from
    return {
        "name": name,
        "logins": len(successes),
        "first_s": min(s[0] + s[1] for s in successes) - started if successes else float("nan"),
        "cold_s": warm_from - started,
        "cold_logins": len(cold),
        "cold_latency_max": 1000 * max((s[1] for s in cold), default=float("nan")),
        "warm_rate": len(warm) / warm_seconds if warm_seconds > 0.5 else float("nan"),
        "warm_latency_p50": 1000 * _percentile([s[1] for s in warm], 0.5),
        "warm_latency_p99": 1000 * _percentile([s[1] for s in warm], 0.99),
        "failures": load["failures"],
        "noop": latency_summary(noop["samples"], started, ended),
        "noop_cold": latency_summary(noop["samples"], started, warm_from),
        "noop_warm": latency_summary(noop["samples"], warm_from, ended),
        "noop_errors": noop["errors"],
        "stall_cold": daemon.stalls(started, warm_from),
        "stall_warm": daemon.stalls(warm_from, ended),
        "daemon_cpu_pct": 100 * daemon_cpu / elapsed,
        "client_cpu_pct": 100 * load["client_cpu"] / elapsed,
    }


def _f(value: float, spec: str = ".1f") -> str:
    return "n/a" if value != value else f"{value:{spec}}"


def report(baseline: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print()
    print(
        f"auth bench: {CONCURRENCY} concurrent clients, a new connection per login (EHLO, STARTTLS, EHLO, "
        f"AUTH PLAIN, QUIT); {NOOP_SESSIONS} NOOP sessions (one NOOP per 10 ms each) in a separate process; "
        f"cores: {os.cpu_count()}; load average at start {baseline['loadavg']}"
    )
    base = baseline["noop"]
    print(
        f"idle baseline NOOP latency ms: p50 {_f(base['p50'], '.2f')}, p99 {_f(base['p99'], '.2f')}, "
        f"max {_f(base['max'], '.2f')} (n={base['n']}); reactor worst stall {_f(baseline['stall_ms'] or float('nan'), '.0f')} ms"
    )
    header = f"{'':44}" + "".join(f"{r['name']:>24}" for r in results)
    print(header)

    def cell(value: Any, spec: str) -> str:
        if spec == "noop":
            return f"{_f(value['p50'], '.1f')} / {_f(value['p99'], '.1f')} / {_f(value['max'], '.0f')}"
        return _f(float("nan") if value is None else value, spec)

    def row(label: str, key: Any, spec: str = ".1f") -> None:
        print(f"{label:44}" + "".join(f"{cell(key(r), spec):>24}" for r in results))

    row("cold phase: until every client logged in (s)", lambda r: r["cold_s"], ".2f")
    row("  first 235 after (s)", lambda r: r["first_s"], ".2f")
    row("  logins in the cold phase", lambda r: r["cold_logins"], ".0f")
    row("  slowest cold login (ms)", lambda r: r["cold_latency_max"], ".0f")
    row("  NOOP p50 / p99 / max ms", lambda r: r["noop_cold"], "noop")
    row("  reactor worst stall ms", lambda r: r["stall_cold"], ".0f")
    row(f"warm phase ({SECONDS:.0f} s): successful AUTH/s", lambda r: r["warm_rate"])
    row("  login latency p50 ms", lambda r: r["warm_latency_p50"])
    row("  login latency p99 ms", lambda r: r["warm_latency_p99"])
    row("  NOOP p50 / p99 / max ms", lambda r: r["noop_warm"], "noop")
    row("  NOOP p99 / idle p99", lambda r: r["noop_warm"]["p99"] / base["p99"], ".1f")
    row("  reactor worst stall ms", lambda r: r["stall_warm"], ".0f")
    row("whole run: NOOP p50 / p99 / max ms", lambda r: r["noop"], "noop")
    row("  daemon CPU % (of one core)", lambda r: r["daemon_cpu_pct"], ".0f")
    row("  login clients' CPU % (this process)", lambda r: r["client_cpu_pct"], ".0f")
    for r in results:
        if r["failures"] or r["noop_errors"]:
            print(f"{r['name']}: failures {r['failures']} NOOP errors {r['noop_errors']}")
    verdicts = [
        f"{r['name']}: NOOP p99 {'OK' if r['noop']['p99'] < TARGET_P99_MS else 'MISSED'} ({_f(r['noop']['p99'])} ms)"
        for r in results
    ]
    print(f"targets (NOOP p99 < {TARGET_P99_MS:.0f} ms): " + "; ".join(verdicts))


def _create_users(daemon: ProbedDaemon) -> list[tuple[str, str]]:
    from concurrent.futures import ThreadPoolExecutor

    names = [f"auth-bench-{i:02d}" for i in range(USERS)]
    with ThreadPoolExecutor(4) as pool:
        passwords = list(pool.map(lambda name: daemon.create_user(name, "bench.example"), names))
    return list(zip(names, passwords, strict=True))


def main() -> None:
    """Run the AUTH benchmark and print its report."""
    work = tempfile.mkdtemp(prefix="smtpplus-auth-bench-")
    daemon = None
    try:
        with open("/proc/loadavg") as f:
            loadavg = " ".join(f.read().split()[:3])
        daemon = ProbedDaemon(os.path.join(work, "smtpplus"))
        started = time.monotonic()
        credentials = _create_users(daemon)
        print(f"created {len(credentials)} users in {time.monotonic() - started:.1f} s", flush=True)
        wall0 = time.time()
        baseline_probe = NoopProbe(daemon.port, BASELINE_SECONDS + 30)
        time.sleep(BASELINE_SECONDS)
        baseline = {
            "noop": latency_summary(baseline_probe.finish()["samples"]),
            "stall_ms": daemon.stalls(wall0, time.time()),
            "loadavg": loadavg,
        }
        results = [
            scenario("(a) one user", daemon, credentials[:1]),
            scenario("(b) 50 users", daemon, credentials),
        ]
        report(baseline, results)
    finally:
        if daemon is not None:
            daemon.stop()
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--noop-probe"]:
        noop_probe(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
