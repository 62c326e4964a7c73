"""
The daemon on the default 3,980-port set (23,25,26,587,1025-5000 on
127.0.0.1): time from process start until every bound port accepts a
connection, resident memory after start, CPU while idle, and time to exit
after SIGTERM.  The same numbers for a bare Twisted listener on the same
ports (no SMTP, no TLS, no config) give the peer for the ratio: what
smtpplus costs over the reactor it runs on.

Targets: start < 3 s, RSS < 150 MiB, idle CPU ~0 %.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from bench.common import HOST, proc_cpu, rss_mib
from smtpplus.config import format_port_list, parse_port_spec
from tests.harness.daemon import twistd_command
from tests.harness.ports import free_port, port_is_free

DEFAULT_PORTS = parse_port_spec("23,25,26,587,1025-5000")
READY_TIMEOUT = 30.0
IDLE_SECONDS = 10.0
TARGETS = {"start_s": 3.0, "rss_mib": 150.0, "idle_cpu_pct": 1.0}

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


def _accepts(port: int) -> bool:
    s = socket.socket()
    s.settimeout(1.0)
    # RST on close: thousands of probes must not leave TIME_WAIT behind.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    try:
        s.connect((HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def measure(name: str, command: list[str], ports: list[int], cwd: str, log_path: str) -> dict[str, float | str]:
    """Start C{command}, wait for every port, then measure; always stops the child."""
    with open(log_path, "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    result: dict[str, float | str] = {"name": name}
    try:
        pending = list(ports)
        deadline = started + READY_TIMEOUT
        # Ports are bound in order: poll the last one cheaply, then sweep all.
        while pending and time.monotonic() < deadline and proc.poll() is None:
            if _accepts(pending[-1]):
                pending = [p for p in pending if not _accepts(p)]
            else:
                time.sleep(0.005)
        if pending:
            result["error"] = f"{len(pending)} ports not accepting after {READY_TIMEOUT:.0f} s (exit {proc.poll()})"
            return result
        result["start_s"] = time.monotonic() - started
        time.sleep(1.0)
        result["rss_mib"] = rss_mib(proc.pid)
        before = proc_cpu(proc.pid)
        time.sleep(IDLE_SECONDS)
        result["idle_cpu_pct"] = 100 * (proc_cpu(proc.pid) - before) / IDLE_SECONDS
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(15)
            result["stop_s"] = time.monotonic() - stopping
            result["exit"] = str(status)
        except subprocess.TimeoutExpired:
            result["error"] = "did not exit within 15 s of SIGTERM"
        return result
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _report(results: list[dict[str, float | str]], ports: list[int], busy: list[int]) -> None:
    print(f"port set: {len(DEFAULT_PORTS)} ports (23,25,26,587,1025-5000) on {HOST}; running as uid {os.geteuid()}")
    if busy:
        print(f"already in use by other processes, not measured: {format_port_list(busy)}")
    print(f"measured: {len(ports)} ports; idle CPU over {IDLE_SECONDS:.0f} s; cores: {os.cpu_count()}")
    header = f"{'':28}{'start (s)':>12}{'RSS (MiB)':>12}{'idle CPU %':>12}{'stop (s)':>10}"
    print(header)
    for r in results:
        if "error" in r:
            print(f"{r['name']:28}ERROR: {r['error']}")
            continue
        print(
            f"{r['name']:28}{r['start_s']:>12.2f}{r['rss_mib']:>12.1f}{r['idle_cpu_pct']:>12.2f}"
            f"{r.get('stop_s', float('nan')):>10.2f}"
        )
    ours, peer = results[0], results[-1]
    if len(results) == 2 and "error" not in ours and "error" not in peer:
        print(
            f"{'ratio smtpplus / peer':28}{ours['start_s'] / peer['start_s']:>12.2f}"
            f"{ours['rss_mib'] / peer['rss_mib']:>12.2f}{'':>12}"
        )
    if "error" not in ours:
        verdicts = [
            f"start {'OK' if ours['start_s'] < TARGETS['start_s'] else 'MISSED'} (< {TARGETS['start_s']:.0f} s)",
            f"RSS {'OK' if ours['rss_mib'] < TARGETS['rss_mib'] else 'MISSED'} (< {TARGETS['rss_mib']:.0f} MiB)",
            f"idle CPU {'OK' if ours['idle_cpu_pct'] < TARGETS['idle_cpu_pct'] else 'MISSED'} (~0 %)",
        ]
        print("targets: " + "; ".join(verdicts))


def main() -> None:
    """Measure smtpplus and the bare-Twisted peer; print the report."""
    busy = [p for p in DEFAULT_PORTS if not port_is_free(p, HOST)]
    ports = [p for p in DEFAULT_PORTS if p not in busy]
    work = tempfile.mkdtemp(prefix="smtpplus-bench-")
    try:
        config = os.path.join(work, "bench.toml")
        with open(config, "w") as f:
            f.write(
                f'[server]\nhostname = "bench.localdomain"\nstate_dir = "{work}/state"\n'
                f'[smtp]\nlisten = "{HOST}"\n'
                f'[admin]\nlisten = "{HOST}"\nport = {free_port()}\n'
            )
        ours = measure(
            "smtpplus (twistd plugin)",
            [*twistd_command(), "--nodaemon", "--pidfile=", "smtpplus", "--config", config],
            ports,
            work,
            os.path.join(work, "smtpplus.log"),
        )
        peer = measure(
            "peer: bare Twisted listener",
            [sys.executable, "-c", _PEER, ",".join(map(str, ports)), HOST],
            ports,
            work,
            os.path.join(work, "peer.log"),
        )
        _report([ours, peer], ports, busy)
        if "error" in ours:
            with open(os.path.join(work, "smtpplus.log"), errors="replace") as f:
                print("smtpplus output (last lines):\n" + "".join(f.readlines()[-20:]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
