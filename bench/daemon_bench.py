"""
The daemon on the default 3,980-port set (23,25,26,587,1025-5000 on
127.0.0.1), once per C{[server] workers} value of BENCH_WORKERS (default
"1,0": the single process, then one SMTP worker per core plus the
coordinator): time from process start until it serves, resident memory of
the whole process tree after start, CPU of the tree while idle, and time
to exit after SIGTERM (with every worker gone).  The same numbers for a
bare Twisted listener on the same ports (no SMTP, no TLS, no config) give
the peer for the ratio: what smtpplus costs over the reactor it runs on.

Serving means: every port accepts a connection, the first and the last
answer a C{220} banner, and (with workers) the admin API's settings show
every worker serving.  The coordinator binds and listens on the ports
before its workers run (a connection waits in the backlog until one
serves), so a port that accepts is not yet served: the settings say when.

Targets (issue 10): start < 2 s with all workers serving; memory < 150 MiB
(issue 1's RSS target: for the single process its RSS, for a tree its PSS,
since summed RSS counts the pages the forked workers share with the
coordinator once per process); idle CPU ~0 %.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import HOST, descendants, loadavg, tree_cpu, tree_pss_mib, tree_rss_mib, workers_setting
from smtpplus.config import ServerConfig, format_port_list, parse_port_spec
from tests.harness.clients import api_request
from tests.harness.daemon import twistd_command
from tests.harness.ports import free_port, port_is_free

DEFAULT_PORTS = parse_port_spec("23,25,26,587,1025-5000")
READY_TIMEOUT = 30.0
IDLE_SECONDS = 10.0
TARGETS = {"start_s": 2.0, "rss_mib": 150.0, "idle_cpu_pct": 1.0}

# The peer: the same reactor listening on the same ports with a one-line
# protocol, started the same way (a fresh interpreter).
_PEER = r"""
import sys
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

class Banner(Protocol):
    def connectionMade(self):
        self.transport.write(b"220 peer\r\n")
        self.transport.loseConnection()

factory = Factory.forProtocol(Banner)
factory.noisy = False
for port in map(int, sys.argv[1].split(",")):
    try:
        reactor.listenTCP(port, factory, interface=sys.argv[2])
    except Exception:
        pass
reactor.run()
"""


def _connect(port: int) -> socket.socket | None:
    s = socket.socket()
    s.settimeout(1.0)
    # RST on close: thousands of probes must not leave TIME_WAIT behind.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    try:
        s.connect((HOST, port))
        return s
    except OSError:
        s.close()
        return None


def _accepts(port: int) -> bool:
    s = _connect(port)
    if s is None:
        return False
    s.close()
    return True


def _banner(port: int) -> bool:
    """The port answers with a C{220} greeting within 5 s."""
    s = _connect(port)
    if s is None:
        return False
    try:
        s.settimeout(5.0)
        return s.recv(512).startswith(b"220")
    except OSError:
        return False
    finally:
        s.close()


class Daemon:
    """How to start one side and tell when it serves."""

    def __init__(self, name: str, command: list[str], workers: int = 0, admin: tuple[int, str] | None = None) -> None:
        self.name = name
        self.command = command
        # Worker processes expected to serve (0: the process serves itself).
        self.workers = workers
        self.admin = admin

    def all_workers_serving(self) -> bool:
        """Every expected worker serves, as the admin API's settings document shows them."""
        if self.admin is None or self.workers < 2:
            return True
        port, token = self.admin
        try:
            response = api_request(port, "GET", "/api/v1/settings", token=token, timeout=5)
        except OSError:
            return False
        listed = (response.json or {}).get("workers", []) if response.status == 200 else []
        return sum(1 for w in listed if w.get("serving")) >= self.workers


def _alive(pid: int) -> bool:
    """C{pid} runs (a zombie waiting for init to reap it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def measure(daemon: Daemon, ports: list[int], cwd: str, log_path: str) -> dict[str, Any]:
    """Start C{daemon}, wait until it serves, then measure; always stops the tree it started."""
    with open(log_path, "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(
            daemon.command,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    result: dict[str, Any] = {"name": daemon.name}
    tree: list[int] = []
    try:
        deadline = started + READY_TIMEOUT

        def waiting() -> bool:
            return time.monotonic() < deadline and proc.poll() is None

        # Ports are bound in order: poll the last one cheaply.
        while waiting() and not _accepts(ports[-1]):
            time.sleep(0.005)
        # The banners before the sweep: its thousands of connections would
        # hold the per-IP connection slots until the server has seen them close.
        sample = [ports[0], ports[-1]]
        while sample and waiting():
            sample = [p for p in sample if not _banner(p)]
            if sample:
                time.sleep(0.02)
        if sample:
            result["error"] = f"no 220 banner on port {sample} after {READY_TIMEOUT:.0f} s (exit {proc.poll()})"
            return result
        pending = list(ports)
        while pending and waiting():
            pending = [p for p in pending if not _accepts(p)]
        if pending:
            result["error"] = f"{len(pending)} ports not accepting after {READY_TIMEOUT:.0f} s (exit {proc.poll()})"
            return result
        result["ports_s"] = time.monotonic() - started
        while waiting() and not daemon.all_workers_serving():
            time.sleep(0.02)
        if not daemon.all_workers_serving():
            result["error"] = f"not all {daemon.workers} workers serving after {READY_TIMEOUT:.0f} s (exit {proc.poll()})"
            return result
        result["start_s"] = time.monotonic() - started
        time.sleep(1.0)
        tree = [proc.pid, *descendants(proc.pid)]
        result["processes"] = len(tree)
        result["rss_mib"] = tree_rss_mib(proc.pid)
        result["pss_mib"] = tree_pss_mib(proc.pid)
        before = tree_cpu(proc.pid)
        time.sleep(IDLE_SECONDS)
        result["idle_cpu_pct"] = 100 * (tree_cpu(proc.pid) - before) / IDLE_SECONDS
        tree = [proc.pid, *descendants(proc.pid)]
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(15)
            result["stop_s"] = time.monotonic() - stopping
            result["exit"] = str(status)
        except subprocess.TimeoutExpired:
            result["error"] = "did not exit within 15 s of SIGTERM"
        left = [pid for pid in tree[1:] if _alive(pid)]
        if left:
            result["error"] = f"processes {left} still running after the daemon exited"
        return result
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # Workers of ours that outlived their coordinator (reported above).
        for pid in tree[1:]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _report(results: list[dict[str, Any]], ports: list[int], busy: list[int], load: str) -> None:
    print(f"port set: {len(DEFAULT_PORTS)} ports (23,25,26,587,1025-5000) on {HOST}; running as uid {os.geteuid()}")
    if busy:
        print(f"already in use by other processes, not measured: {format_port_list(busy)}")
    print(
        f"measured: {len(ports)} ports; idle CPU over {IDLE_SECONDS:.0f} s; cores: {os.cpu_count()}; "
        f"workers = 0 here means {ServerConfig(workers=0).worker_processes()} SMTP worker processes plus the coordinator"
    )
    print(f"load average (1, 5, 15 min) before / after: {load} / {loadavg()}")
    print(
        "memory and CPU are of the whole process tree (coordinator + workers); RSS counts shared pages "
        "in every process, PSS divides them among the processes sharing them"
    )
    header = (
        f"{'':30}{'start (s)':>11}{'ports (s)':>11}{'processes':>11}{'RSS (MiB)':>11}{'PSS (MiB)':>11}"
        f"{'idle CPU %':>12}{'stop (s)':>10}"
    )
    print(header)
    for r in results:
        if "error" in r:
            print(f"{r['name']:30}ERROR: {r['error']}")
            continue
        print(
            f"{r['name']:30}{r['start_s']:>11.2f}{r['ports_s']:>11.2f}{r['processes']:>11}{r['rss_mib']:>11.1f}"
            f"{r['pss_mib']:>11.1f}{r['idle_cpu_pct']:>12.2f}{r.get('stop_s', float('nan')):>10.2f}"
        )
    for r in results:
        for line in r.get("log", []):
            print(f"  {r['name']}: {line}")
    *ours, peer = results
    for side in ours:
        if "error" not in side and "error" not in peer:
            print(
                f"{'ratio ' + side['name'].split()[-1] + ' / peer':30}{side['start_s'] / peer['start_s']:>11.2f}{'':>22}"
                f"{side['rss_mib'] / peer['rss_mib']:>11.2f}{side['pss_mib'] / peer['pss_mib']:>11.2f}"
            )
    for side in ours:
        if "error" in side:
            print(f"targets, {side['name']}: MISSED (did not serve)")
            continue
        verdicts = [
            f"start {'OK' if side['start_s'] < TARGETS['start_s'] else 'MISSED'} (< {TARGETS['start_s']:.0f} s, all workers serving)",
            _memory_verdict(side),
            f"idle CPU {'OK' if side['idle_cpu_pct'] < TARGETS['idle_cpu_pct'] else 'MISSED'} (~0 %)",
        ]
        print(f"targets, {side['name']}: " + "; ".join(verdicts))


def _memory_verdict(side: dict[str, Any]) -> str:
    """
    Issue 1's memory target (RSS < 150 MiB) judged for one process by its
    RSS and for a tree by its PSS: summed RSS counts every page the forked
    workers share with the coordinator once per process.
    """
    key, label = ("rss_mib", "RSS") if side["processes"] == 1 else ("pss_mib", "tree PSS")
    verdict = "OK" if side[key] < TARGETS["rss_mib"] else "MISSED"
    return f"memory {verdict} ({label} {side[key]:.0f} < {TARGETS['rss_mib']:.0f} MiB)"


def main() -> None:
    """Measure smtpplus for each BENCH_WORKERS value and the bare-Twisted peer; print the report."""
    load = loadavg()
    print(f"load average (1, 5, 15 min) at the start: {load}", flush=True)
    busy = [p for p in DEFAULT_PORTS if not port_is_free(p, HOST)]
    ports = [p for p in DEFAULT_PORTS if p not in busy]
    work = tempfile.mkdtemp(prefix="smtpplus-bench-")
    results = []
    try:
        for run, workers in enumerate(workers_setting(), 1):
            directory = os.path.join(work, f"{run}-w{workers}")
            os.makedirs(directory)
            admin = (free_port(), secrets.token_urlsafe(24))
            config = os.path.join(directory, "bench.toml")
            with open(config, "w") as f:
                f.write(
                    f'[server]\nhostname = "bench.localdomain"\nstate_dir = "{directory}/state"\nworkers = {workers}\n'
                    f'[smtp]\nlisten = "{HOST}"\n'
                    f'[admin]\nlisten = "{HOST}"\nport = {admin[0]}\ntoken = "{admin[1]}"\n'
                )
            daemon = Daemon(
                f"smtpplus w={workers}",
                [*twistd_command(), "--nodaemon", "--pidfile=", "smtpplus", "--config", config],
                ServerConfig(workers=workers).worker_processes(),
                admin,
            )
            log_path = os.path.join(directory, "smtpplus.log")
            print(f"measuring {daemon.name}...", flush=True)
            results.append(measure(daemon, ports, directory, log_path))
            with open(log_path, errors="replace") as f:
                lines = f.readlines()
            if "error" in results[-1]:
                print(f"{daemon.name} output (last lines):\n" + "".join(lines[-20:]))
            # The coordinator's own account of each worker's start.
            results[-1]["log"] = [line.split("] ", 1)[-1].rstrip() for line in lines if " ports, " in line and "serving" in line]
        print("measuring the peer...", flush=True)
        peer = Daemon("peer: bare Twisted listener", [sys.executable, "-c", _PEER, ",".join(map(str, ports)), HOST])
        results.append(measure(peer, ports, work, os.path.join(work, "peer.log")))
        _report(results, ports, busy, load)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
