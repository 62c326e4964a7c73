"""
Delivery benchmark (issues 4 and 10): smtpplus against a private Postfix
instance, all relaying to the same kind of C{smtp-sink} (Postfix's test
server).  smtpplus runs once per C{[server] workers} value in
BENCH_WORKERS (default "1,0": the single process, then one SMTP worker
per core plus the coordinator), each with its own fresh state directory
and sink; its CPU and memory are those of the whole process tree.

For each side, in one run:

  - accepted messages/s: N messages of 5 KiB over 50 concurrent sessions
    (connection reuse, MAIL/RCPT/DATA pipelined), from the same asyncio
    load generator; smtpplus with AUTH PLAIN (plaintext, auth_requires_tls
    = false), Postfix without AUTH (relay for 127.0.0.0/8).  Both fsync
    every accepted message before the 250 (Postfix's default, smtpplus
    always);
  - p50/p99 latency: per message, from writing the final dot to reading
    its 250, as the generator sees it;
  - CPU-s per 1,000 messages: the server's process tree (Postfix's master
    and its children; smtpplus's twistd and its workers) over phase A;
  - end-to-end delivered/s: N+1 messages counted at the sink (its C{-c}
    counter) from the first connection to the last arrival;
  - priority: right after the last bulk 250, one more message with
    C{X-SMTPAPI: {"Priority": 1}} (Postfix ignores it): the time from its
    250 until it appears in the sink's dump file (C{-D}; found by a unique
    envelope sender).

The generator's own ceiling is measured first, directly against a sink.

Run: python -m bench.delivery_bench
Environment: BENCH_MESSAGES (default 20000), BENCH_SESSIONS (50),
BENCH_SIZE (5120), BENCH_DRAIN_TIMEOUT (seconds, default 900),
BENCH_WORKERS ("1,0": the [server] workers values to run, in that order),
BENCH_PEER=0 (no Postfix), BENCH_CALIBRATE=0 (no generator ceiling),
BENCH_KEEP=1 (keep the work directory),
BENCH_INSTALL_POSTFIX=1 (as root: apt-get install postfix when missing).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.common import (
    HOST,
    ProbedDaemon,
    loadavg,
    own_cpu,
    percentile,
    proc_cpu,
    stop_process,
    tree_cpu,
    tree_pss_mib,
    tree_rss_mib,
    workers_setting,
)
from smtpplus.config import ServerConfig
from tests.harness.clients import SMTPClient, SMTPError
from tests.harness.messages import sized_message
from tests.harness.ports import free_port, wait_for_ports

SENDER_DOMAIN = "bench.example"
MESSAGES = int(os.environ.get("BENCH_MESSAGES", "20000"))
SESSIONS = int(os.environ.get("BENCH_SESSIONS", "50"))
SIZE = int(os.environ.get("BENCH_SIZE", "5120"))
DRAIN_TIMEOUT = float(os.environ.get("BENCH_DRAIN_TIMEOUT", "900"))
SINK_MARK = b"#BENCHMSG"
POSTFIX_TOOLS = ("/usr/sbin/postfix", "/usr/sbin/smtp-sink", "/usr/sbin/postconf")
TARGET_PRIORITY_S = 1.0
# Issue 10: accept and end-to-end at least this many times Postfix's.
TARGET_RATIO = 1.5

WORKERS = workers_setting()


async def generate(
    host: str,
    port: int,
    count: int,
    sessions: int,
    size: int,
    mail_from: str,
    recipient: str,
    auth: tuple[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """
    Submit C{count} messages over C{sessions} concurrent sessions, each
    reusing its connection (after STARTTLS with C{tls}).  Returns counts,
    failures, the elapsed time from the first connect to the last final
    reply, the time from the final dot to the 250 (each, and its p50 and
    p99), and the client's CPU.
    """
    remaining = iter(range(count))
    accepted: list[float] = []
    latencies: list[float] = []
    failures: dict[str, int] = {}
    cpu0 = own_cpu()
    started = time.monotonic()

    def failed(reason: str) -> None:
        failures[reason] = failures.get(reason, 0) + 1

    async def session() -> None:
        try:
            client = await SMTPClient.connect(host, port)
            await client.ehlo()
            if tls is not None:
                await client.starttls(tls)
                await client.ehlo()
            if auth is not None:
                await client.auth_plain(*auth)
        except (TimeoutError, OSError, SMTPError) as e:
            failed(f"session setup: {e}")
            return
        try:
            for index in remaining:
                code, text = await client.send(mail_from, recipient, sized_message(index, size, mail_from, recipient))
                if code == 250:
                    accepted.append(time.monotonic())
                    if client.dot_to_reply is not None:
                        latencies.append(client.dot_to_reply)
                else:
                    failed(f"{code} {text[:60]}")
        except (TimeoutError, OSError, SMTPError) as e:
            failed(f"session: {e}")
        await client.quit()

    await asyncio.gather(*(session() for _ in range(sessions)))
    ended = accepted[-1] if accepted else time.monotonic()
    return {
        "accepted": len(accepted),
        "failures": failures,
        "elapsed": ended - started,
        "started": started,
        "ended": ended,
        "rate": len(accepted) / (ended - started) if accepted else 0.0,
        "client_cpu": own_cpu() - cpu0,
        "latencies": latencies,
        "p50": percentile(latencies, 0.50),
        "p99": percentile(latencies, 0.99),
    }


class Sink:
    """
    One C{smtp-sink}: counts messages (its C{-c} counter on stdout, read by
    a thread) and appends each one to a dump file (C{-D}), where a given
    message is found by a unique string.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        # smtp-sink drops to "nobody" when run as root and writes the dump then.
        os.chmod(directory, 0o777)
        self.dump = os.path.join(directory, "dump")
        self.port = free_port()
        self.count = 0
        self.changes: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        command = ["/usr/sbin/smtp-sink", "-c", "-D", self.dump, "-S", SINK_MARK.decode() + "\\n"]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]
        command += [f"{HOST}:{self.port}", "1024"]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not wait_for_ports([self.port], 10, proc=self.proc):
            self.stop()
            raise RuntimeError("smtp-sink did not start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            tail = (tail + chunk)[-200:]
            found = re.findall(rb"mesg=(\d+)", tail)
            if found:
                value = int(found[-1])
                with self._lock:
                    if value != self.count:
                        self.count = value
                        self.changes.append((time.monotonic(), value))

    def when_reached(self, target: int) -> float | None:
        """The monotonic time the counter first reached C{target}, if it did."""
        with self._lock:
            for at, value in self.changes:
                if value >= target:
                    return at
        return None

    def dump_size(self) -> int:
        try:
            return os.path.getsize(self.dump)
        except OSError:
            return 0

    async def wait_count(self, target: int, timeout: float, progress: Callable[[int], None] | None = None) -> float | None:
        deadline = time.monotonic() + timeout
        last_report = time.monotonic()
        while time.monotonic() < deadline:
            at = self.when_reached(target)
            if at is not None:
                return at
            if progress is not None and time.monotonic() - last_report > 15:
                progress(self.count)
                last_report = time.monotonic()
            await asyncio.sleep(0.05)
        return None

    async def wait_for_text(self, text: bytes, offset: int, timeout: float) -> float | None:
        """Poll the dump from C{offset} until C{text} appears; its monotonic time."""
        deadline = time.monotonic() + timeout
        keep = b""
        while time.monotonic() < deadline:
            try:
                with open(self.dump, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                chunk = b""
            if chunk:
                seen = time.monotonic()
                if text in keep + chunk:
                    return seen
                offset += len(chunk)
                keep = chunk[-len(text):]
            await asyncio.sleep(0.002)
        return None

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()
        stop_process(self.proc, 5)


# --- Postfix ------------------------------------------------------------------------


def postfix_available() -> bool:
    """Postfix and its test tools are installed; with BENCH_INSTALL_POSTFIX=1 as root, install them."""
    if all(os.access(tool, os.X_OK) for tool in POSTFIX_TOOLS):
        return True
    if os.environ.get("BENCH_INSTALL_POSTFIX") != "1" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    print("installing postfix (BENCH_INSTALL_POSTFIX=1)...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # "No configuration": the package writes no main.cf and starts no system
    # instance on port 25; the bench runs its own instance.
    debconf = "postfix postfix/main_mailer_type select No configuration\n"
    subprocess.run(["debconf-set-selections"], input=debconf.encode(), check=False)
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "postfix"], env=env, check=False, timeout=900)
    return all(os.access(tool, os.X_OK) for tool in POSTFIX_TOOLS)


_MASTER_CF = """\
{port}     inet  n       -       n       -       -       smtpd
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
"""

# Stock settings except what a private relay on loopback needs, and the
# same outbound concurrency as smtpplus (max_concurrency = sessions).
_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.localdomain
mydomain = bench.localdomain
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
local_transport = error:local delivery is disabled
inet_interfaces = {host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
relayhost = [{host}]:{sink}
smtp_tls_security_level = none
smtpd_tls_security_level = none
default_process_limit = {processes}
smtp_destination_concurrency_limit = {concurrency}
maillog_file = {log}
maillog_file_prefixes = {directory}
biff = no
"""


class Postfix:
    """A private Postfix (own config and queue directories), master in the foreground."""

    def __init__(self, directory: str, sink_port: int, concurrency: int) -> None:
        self.directory = directory
        self.config_dir = os.path.join(directory, "etc")
        self.queue = os.path.join(directory, "queue")
        os.makedirs(self.config_dir)
        os.makedirs(self.queue)
        os.chmod(directory, 0o755)
        self.port = free_port()
        self.log = os.path.join(directory, "maillog")
        with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
            f.write(
                _MAIN_CF.format(
                    queue=self.queue,
                    data=os.path.join(directory, "data"),
                    host=HOST,
                    sink=sink_port,
                    processes=max(100, 4 * concurrency),
                    concurrency=concurrency,
                    log=self.log,
                    directory=directory,
                )
            )
        with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
            f.write(_MASTER_CF.format(port=f"{HOST}:{self.port}"))
        output = open(os.path.join(directory, "postfix.out"), "wb")  # noqa: SIM115 - closed in stop()
        self._output = output
        self.proc = subprocess.Popen(
            ["/usr/sbin/postfix", "-c", self.config_dir, "start-fg"],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        if not wait_for_ports([self.port], 30, proc=self.proc):
            self.stop()
            raise RuntimeError(f"postfix did not start; see {directory}/postfix.out and {self.log}: " + self.tail())

    def master_pid(self) -> int:
        """postfix start-fg execs the master in the same process, or forks it."""
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return self.proc.pid

    def cpu(self) -> float:
        """CPU seconds of the master and its children (smtpd, cleanup, qmgr, smtp, ...)."""
        return tree_cpu(self.master_pid())

    def rss(self) -> float:
        """Resident memory of the master and its live children in MiB."""
        return tree_rss_mib(self.master_pid())

    def pss(self) -> float:
        """Proportional memory of the master and its live children in MiB."""
        return tree_pss_mib(self.master_pid())

    def tail(self) -> str:
        text = ""
        for path in (os.path.join(self.directory, "postfix.out"), self.log):
            try:
                with open(path, errors="replace") as f:
                    text += "".join(f.readlines()[-10:])
            except OSError:
                pass
        return text

    def stop(self) -> None:
        master = self.master_pid()
        # Our master (started by us): SIGTERM stops it and its children.
        if master != self.proc.pid and self.proc.poll() is None:
            try:
                os.kill(master, signal.SIGTERM)
            except ProcessLookupError:
                pass
        stop_process(self.proc, 20)
        self._output.close()


# --- the measurement ----------------------------------------------------------------------


async def _login(host: str, port: int, auth: tuple[str, str] | None) -> SMTPClient:
    client = await SMTPClient.connect(host, port)
    await client.ehlo()
    if auth is not None:
        await client.auth_plain(*auth)
    return client


async def _priority_behind_backlog(name: str, sink: Sink, host: str, port: int, auth: tuple[str, str] | None) -> dict[str, Any]:
    """
    Phase B: with the sink paused (SIGSTOP: connections hang before the
    greeting, so nothing leaves), queue C{MESSAGES} bulk messages, then one
    priority-1 message; resume the sink right after its 250 and time its
    arrival.  The drain of the backlog gives the delivery-only rate.
    """
    before = sink.count
    sink.pause()
    try:
        print(f"[{name}] priority: queueing a backlog of {MESSAGES} with the sink paused...", flush=True)
        backlog = await generate(host, port, MESSAGES, SESSIONS, SIZE, f"bulk@{SENDER_DOMAIN}", "rcpt@sink.example", auth)
        token = secrets.token_hex(8)
        sender = f"urgent-{token}@{SENDER_DOMAIN}"
        data = sized_message(0, SIZE, sender, "rcpt@sink.example", 'X-SMTPAPI: {"Priority": 1}\r\n')
        offset = sink.dump_size()
        client = await _login(host, port, auth)
        sent = time.monotonic()
        code, text = await client.send(sender, "rcpt@sink.example", data)
        queued_at = time.monotonic()
        await client.quit()
    finally:
        sink.resume()
    resumed_at = time.monotonic()
    result: dict[str, Any] = {
        "backlog_accepted": backlog["accepted"],
        "backlog_rate": backlog["rate"],
        "backlog_failures": backlog["failures"],
        "data_to_250": queued_at - sent,
    }
    if code != 250:
        result["error"] = f"priority message refused: {code} {text}"
        return result
    arrived = await sink.wait_for_text(f"urgent-{token}@".encode(), offset, DRAIN_TIMEOUT)
    if arrived is not None:
        result["latency"] = arrived - queued_at
        # Messages that reached the sink before it (counter at detection).
        result["overtaken_by"] = max(0, sink.count - before - 1)
    target = before + backlog["accepted"] + 1
    done = await sink.wait_count(target, DRAIN_TIMEOUT, lambda n: print(f"[{name}] sink: {n - before}/{target - before}", flush=True))
    result["drained"] = done is not None
    end = done if done is not None else time.monotonic()
    result["drain_rate"] = (sink.count - before) / (end - resumed_at)
    return result


async def run_side(name: str, sink: Sink, host: str, port: int, cpu: Callable[[], float], auth: tuple[str, str] | None) -> dict[str, Any]:
    """Phase A (throughput, sink running) then phase B (priority behind a backlog)."""
    warmup = None
    if auth is not None:
        # One login first: the steady state has the password verification
        # cached; 50 sessions logging in cold at once are auth_bench's subject.
        started = time.monotonic()
        await (await _login(host, port, auth)).quit()
        warmup = time.monotonic() - started
        # Each SMTP worker caches for itself: all the sessions at once, so
        # that every worker that will serve some has verified the password.
        for client in await asyncio.gather(*(_login(host, port, auth) for _ in range(SESSIONS))):
            await client.quit()
    print(f"[{name}] submitting {MESSAGES} x {SIZE} B over {SESSIONS} sessions...", flush=True)
    cpu0, sink_cpu0 = cpu(), sink.cpu()
    bulk = await generate(host, port, MESSAGES, SESSIONS, SIZE, f"bulk@{SENDER_DOMAIN}", "rcpt@sink.example", auth)
    at_submit_end = sink.count
    print(
        f"[{name}] accepted {bulk['accepted']} in {bulk['elapsed']:.1f} s ({bulk['rate']:.0f}/s); "
        f"{at_submit_end} already at the sink; failures: {bulk['failures'] or 'none'}",
        flush=True,
    )
    target = bulk["accepted"]
    done = await sink.wait_count(target, DRAIN_TIMEOUT, lambda n: print(f"[{name}] sink: {n}/{target}", flush=True))
    end = done if done is not None else time.monotonic()
    delivered = sink.count
    server_cpu, sink_cpu = cpu() - cpu0, sink.cpu() - sink_cpu0
    print(f"[{name}] delivered {delivered} in {end - bulk['started']:.1f} s", flush=True)
    priority = await _priority_behind_backlog(name, sink, host, port, auth) if done is not None else {"error": "phase A did not drain"}
    return {
        "name": name,
        "warmup": warmup,
        "bulk": bulk,
        "priority": priority,
        "delivered": delivered,
        "drained": done is not None,
        "e2e_rate": delivered / (end - bulk["started"]),
        "drain_rate": (delivered - at_submit_end) / (end - bulk["ended"]) if end > bulk["ended"] + 0.1 else float("nan"),
        "at_submit_end": at_submit_end,
        "server_cpu": server_cpu,
        "sink_cpu": sink_cpu,
    }


async def _calibrate(work: str) -> dict[str, Any]:
    """The generator's own ceiling: straight into a sink."""
    sink = Sink(os.path.join(work, "sink-calibration"))
    try:
        count = min(MESSAGES, 20000)
        result = await generate(HOST, sink.port, count, SESSIONS, SIZE, f"bulk@{SENDER_DOMAIN}", "rcpt@sink.example")
        result["sink_cpu"] = sink.cpu()
        return result
    finally:
        sink.stop()


async def _postfix_side(work: str) -> dict[str, Any]:
    sink = Sink(os.path.join(work, "sink-postfix"))
    postfix = None
    try:
        postfix = Postfix(os.path.join(work, "postfix"), sink.port, SESSIONS)
        result = await run_side("postfix", sink, HOST, postfix.port, postfix.cpu, None)
        result["rss_mib"], result["pss_mib"] = postfix.rss(), postfix.pss()
        return result
    finally:
        if postfix is not None:
            postfix.stop()
        sink.stop()


async def _smtpplus_side(work: str, workers: int, run: int) -> dict[str, Any]:
    """smtpplus with C{[server] workers = workers}, on its own state directory and sink."""
    name = f"smtpplus w={workers}"
    sink = Sink(os.path.join(work, f"sink-smtpplus-{run}-w{workers}"))
    daemon = None
    try:
        daemon = ProbedDaemon(
            os.path.join(work, f"smtpplus-{run}-w{workers}"),
            "auth_requires_tls = false\n"
            f'[delivery]\nmode = "smarthost"\nsmarthost = "{HOST}:{sink.port}"\nsmarthost_tls = "none"\n'
            f"max_concurrency = {SESSIONS}\n",
            workers=workers,
        )
        password = daemon.create_user("bench", SENDER_DOMAIN)
        wall0 = time.time()
        result = await run_side(name, sink, HOST, daemon.port, daemon.cpu, ("bench", password))
        result["stall_ms"] = daemon.stalls(wall0, time.time())
        result["rss_mib"], result["pss_mib"] = daemon.rss(), daemon.pss()
        result["worker_processes"] = len(daemon.workers())
        if not result["drained"] or result["bulk"]["failures"]:
            print(f"{name} output (last lines):\n" + daemon.tail(), flush=True)
        return result
    finally:
        if daemon is not None:
            daemon.stop()
        sink.stop()


def _fmt(value: float | None, spec: str = ".0f", unit: str = "") -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:{spec}}{unit}"


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or ours != ours or theirs != theirs or not theirs:
        return None
    return ours / theirs


LABEL = 36
COLUMN = 14


def report(calibration: dict[str, Any] | None, variants: list[dict[str, Any]], peer: dict[str, Any] | None) -> None:
    """One table: Postfix, then each smtpplus variant, then each variant's ratio to Postfix."""
    print()
    print(
        f"delivery bench: {MESSAGES} messages x {SIZE} B, {SESSIONS} sessions, one recipient each; "
        f"cores: {os.cpu_count()}; workers = 0 here means {ServerConfig(workers=0).worker_processes()} SMTP worker "
        f"processes plus the coordinator; fsync on all sides"
    )
    print(f"load average (1, 5, 15 min) before / after: {LOADAVG[0]} / {loadavg()}")
    if calibration is not None:
        print(
            f"generator ceiling (straight into smtp-sink, no AUTH): {calibration['rate']:.0f} msg/s "
            f"({calibration['accepted']} in {calibration['elapsed']:.1f} s, generator CPU {calibration['client_cpu']:.1f} s)"
        )
    sides = ([peer] if peer else []) + variants
    compared = variants if peer else []
    print(
        f"{'':{LABEL}}"
        + "".join(f"{s['name']:>{COLUMN}}" for s in sides)
        + "".join(f"{s['name'].split()[-1] + ' / pf':>{COLUMN}}" for s in compared)
    )

    def row(label: str, get: Callable[[dict[str, Any]], float | None], spec: str = ".0f", ratio: bool = True) -> None:
        line = f"{label:{LABEL}}" + "".join(f"{_fmt(get(s), spec):>{COLUMN}}" for s in sides)
        if ratio:
            line += "".join(f"{_fmt(_ratio(get(s), get(peer)), '.2f'):>{COLUMN}}" for s in compared if peer)
        print(line)

    print("phase A: sink running")
    row("  accepted msg/s", lambda s: s["bulk"]["rate"])
    row("  end-to-end delivered msg/s", lambda s: s["e2e_rate"])
    row("  drain after last 250 msg/s", lambda s: s["drain_rate"])
    row("  final dot -> 250 p50 (ms)", lambda s: 1000 * s["bulk"]["p50"], ".1f")
    row("  final dot -> 250 p99 (ms)", lambda s: 1000 * s["bulk"]["p99"], ".1f")
    row("  at the sink at the last 250", lambda s: s["at_submit_end"], ratio=False)
    row("  server tree CPU-s / 1000 msg", lambda s: 1000 * s["server_cpu"] / max(1, s["delivered"]), ".2f")
    row("  generator CPU s", lambda s: s["bulk"]["client_cpu"], ".1f", ratio=False)
    row("  sink CPU s", lambda s: s["sink_cpu"], ".1f", ratio=False)
    print(f"phase B: {MESSAGES} queued with the sink paused, then one priority-1 message, then the sink resumed")
    row("  accepted msg/s (sink paused)", lambda s: s["priority"].get("backlog_rate"))
    row("  priority msg DATA->250 (s)", lambda s: s["priority"].get("data_to_250"), ".3f", ratio=False)
    row("  priority msg 250->sink (s)", lambda s: s["priority"].get("latency"), ".3f")
    row("  messages arriving before it", lambda s: s["priority"].get("overtaken_by"), ratio=False)
    row("  backlog drain msg/s", lambda s: s["priority"].get("drain_rate"))
    print("the server's process tree at the end")
    row("  SMTP worker processes", lambda s: s.get("worker_processes"), ratio=False)
    row("  RSS of the tree (MiB)", lambda s: s.get("rss_mib"), ratio=False)
    row("  PSS of the tree (MiB)", lambda s: s.get("pss_mib"), ratio=False)
    for ours in variants:
        print(
            f"{ours['name']}: first AUTH (bcrypt, before the run) {_fmt(ours.get('warmup'), '.3f', ' s')}; "
            f"twistd reactor worst stall {_fmt(ours.get('stall_ms'), '.0f', ' ms')}; "
            f"drained A/B: {ours['drained']}/{ours['priority'].get('drained')}"
        )
    if peer:
        print(f"postfix: drained A/B: {peer['drained']}/{peer['priority'].get('drained')}")
    for side in sides:
        problems = [side["bulk"]["failures"], side["priority"].get("backlog_failures"), side["priority"].get("error")]
        if any(problems):
            print(f"{side['name']}: problems {problems}")
    for ours in variants:
        print(f"targets, {ours['name']}: " + "; ".join(_verdicts(ours, peer)))


def _verdicts(ours: dict[str, Any], peer: dict[str, Any] | None) -> list[str]:
    """Issue 10's targets for one smtpplus variant."""

    def ok(good: bool) -> str:
        return "OK" if good else "MISSED"

    verdicts = []
    if peer:
        for label, get in (("accept", lambda s: s["bulk"]["rate"]), ("end-to-end", lambda s: s["e2e_rate"])):
            ratio = _ratio(get(ours), get(peer))
            verdicts.append(f"{label} {_fmt(ratio, '.2f', 'x')} {ok(ratio is not None and ratio >= TARGET_RATIO)} (>= {TARGET_RATIO}x postfix)")
        p99, theirs = ours["bulk"]["p99"], peer["bulk"]["p99"]
        verdicts.append(f"p99 {ok(p99 <= theirs)} (<= postfix's {_fmt(1000 * theirs, '.1f', ' ms')})")
    latency = ours["priority"].get("latency")
    verdicts.append(f"priority {ok(latency is not None and latency < TARGET_PRIORITY_S)} (< {TARGET_PRIORITY_S:.0f} s)")
    return verdicts


LOADAVG: list[str] = []


async def _main(work: str) -> None:
    LOADAVG[:] = [loadavg()]
    print(f"load average (1, 5, 15 min) at the start: {LOADAVG[0]}", flush=True)
    have_postfix = os.environ.get("BENCH_PEER", "1") != "0" and postfix_available()
    if not os.access("/usr/sbin/smtp-sink", os.X_OK):
        print(
            "SKIPPED: smtp-sink (from Postfix) is missing. Install it with "
            "`apt-get install postfix` (choose 'No configuration'), or run as root with BENCH_INSTALL_POSTFIX=1."
        )
        return
    calibration = await _calibrate(work) if os.environ.get("BENCH_CALIBRATE", "1") != "0" else None
    if calibration is not None:
        print(f"generator ceiling: {calibration['rate']:.0f} msg/s", flush=True)
    peer = await _postfix_side(work) if have_postfix else None
    variants = [await _smtpplus_side(work, workers, run) for run, workers in enumerate(WORKERS, 1)]
    report(calibration, variants, peer)


def main() -> None:
    """Run the delivery benchmark and print its report."""
    work = tempfile.mkdtemp(prefix="smtpplus-delivery-bench-")
    # smtp-sink (as "nobody") and Postfix's daemons must reach their directories.
    os.chmod(work, 0o755)
    try:
        asyncio.run(_main(work))
    finally:
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
