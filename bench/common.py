"""
What several benchmarks use: the real daemon under a reactor stall probe
(L{ProbedDaemon}), and the CPU and memory of processes from C{/proc}.
Ports, twistd, the admin API and SMTP clients come from L{tests.harness}.
"""

from __future__ import annotations

import os
import resource
import secrets
import signal
import statistics
import subprocess
import sys
from typing import Any

from smtpplus.config import ServerConfig
from tests.harness.clients import api_request
from tests.harness.daemon import spawn_twistd, write_config
from tests.harness.polling import poll
from tests.harness.ports import free_port, free_port_range, wait_for_ports

HOST = "127.0.0.1"


# --- the run -------------------------------------------------------------------


def workers_setting() -> list[int]:
    """The C{[server] workers} values to measure, in order: BENCH_WORKERS (default "1,0")."""
    text = os.environ.get("BENCH_WORKERS", "1,0")
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise SystemExit(f"BENCH_WORKERS: comma-separated [server] workers values (>= 0), not {text!r}")
    return values


def percentile(values: list[float], fraction: float) -> float:
    """The C{fraction} quantile of C{values} (interpolated between samples); NaN when empty."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    cuts = statistics.quantiles(values, n=1000, method="inclusive")
    return cuts[round(fraction * 1000) - 1]


def loadavg() -> str:
    """The machine's load average over 1, 5 and 15 minutes, as C{uptime} shows it."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --- processes ------------------------------------------------------------------


def own_cpu() -> float:
    """CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def proc_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds of C{pid} (and of its reaped children with C{children}); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat; the split drops the first two.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every live process below C{pid}."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu(pid: int) -> float:
    """
    CPU of a process and everything below it: each live process's own time
    plus what its reaped children used (a child counts in its parent's
    once the parent reaped it, and only then), so a worker that died and
    was replaced during a measurement still counts.
    """
    return proc_cpu(pid, children=True) + sum(proc_cpu(child, children=True) for child in descendants(pid))


def rss_mib(pid: int) -> float:
    """Resident memory of C{pid} in MiB; NaN once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def tree_rss_mib(pid: int) -> float:
    """
    Resident memory of C{pid} and its live descendants, summed, in MiB.
    Pages shared after fork count in each process, as C{ps} shows them;
    the workers are fresh interpreters (exec), so they share little.
    """
    return rss_mib(pid) + sum(value for child in descendants(pid) if (value := rss_mib(child)) == value)


def pss_mib(pid: int) -> float:
    """
    Proportional memory of C{pid} in MiB (each shared page divided among
    the processes mapping it), so that a sum over processes is what they
    use together; NaN once it is gone or without C{smaps_rollup}.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def tree_pss_mib(pid: int) -> float:
    """Proportional memory of C{pid} and its live descendants, summed, in MiB."""
    return pss_mib(pid) + sum(value for child in descendants(pid) if (value := pss_mib(child)) == value)


def process_title(pid: int) -> str:
    """A process's command line as C{ps} shows it (the title setproctitle gave it); empty once gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def smtp_workers(pid: int) -> list[int]:
    """The SMTP worker processes below the coordinator C{pid} (titled "smtpplus: smtp worker N")."""
    return [child for child in descendants(pid) if "smtp worker" in process_title(child)]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the child we started, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --- the daemon under the stall probe --------------------------------------------

# Runs twistd in this interpreter after scheduling a 10 ms LoopingCall that
# records the reactor's longest stall (the gap between ticks beyond the
# interval) every 0.5 s into the file named by SMTPPLUS_BENCH_PROBE: the
# daemon itself has no such probe and its code stays untouched.
_PROBED_TWISTD = r"""
import os, sys, time
from twisted.internet import reactor
from twisted.internet.task import LoopingCall
INTERVAL = 0.01
out = open(os.environ["SMTPPLUS_BENCH_PROBE"], "a", buffering=1)
state = {"last": None, "worst": 0.0, "since": time.monotonic()}
def tick():
    now = time.monotonic()
    if state["last"] is not None:
        state["worst"] = max(state["worst"], now - state["last"] - INTERVAL)
    state["last"] = now
    if now - state["since"] >= 0.5:
        out.write(f"{time.time():.3f} {state['worst'] * 1000:.2f}\n")
        state["worst"] = 0.0
        state["since"] = now
LoopingCall(tick).start(INTERVAL, now=False)
from twisted.scripts.twistd import run
sys.argv[0] = "twistd"
run()
"""


class ProbedDaemon:
    """
    The real daemon under C{twistd} with the stall probe, on free ports,
    with a known admin token; ready once every SMTP worker serves.

    @param workers: C{[server] workers} (None: the default, 0 = one worker
        per core).  With workers the probe watches the coordinator's
        reactor, not the sessions'.
    @param server_config: more lines for C{[server]} (a C{node_name}).
    """

    def __init__(
        self,
        directory: str,
        extra_config: str = "",
        ports: int = 1,
        workers: int | None = None,
        server_config: str = "",
    ) -> None:
        self.directory = directory
        os.makedirs(directory)
        self.ports = free_port_range(ports)
        self.port = self.ports[0]
        self.admin_port = free_port()
        self.token = secrets.token_urlsafe(24)
        self.probe = os.path.join(directory, "stall-probe.txt")
        config = write_config(
            directory,
            f'[server]\nhostname = "smtpplus.bench.localdomain"\nstate_dir = "{directory}/state"\n'
            + (f"workers = {workers}\n" if workers is not None else "")
            + server_config
            + f'[smtp]\nlisten = "{HOST}"\nports = "{",".join(map(str, self.ports))}"\n'
            f"max_connections_per_ip = 1000\n{extra_config}\n"
            f'[admin]\nlisten = "{HOST}"\nport = {self.admin_port}\ntoken = "{self.token}"\n',
        )
        self.process = spawn_twistd(
            ["--config", config],
            directory,
            command=[sys.executable, "-c", _PROBED_TWISTD],
            env={"SMTPPLUS_BENCH_PROBE": self.probe},
        )
        self.proc = self.process.proc
        self.expected_workers = ServerConfig(workers=workers or 0).worker_processes()
        # A port listens once the first worker adopts it; the run starts
        # when every worker serves, as the settings document shows them.
        if not wait_for_ports([*self.ports, self.admin_port], 30, proc=self.proc) or not poll(self._all_serving, 30):
            self.stop()
            raise RuntimeError("smtpplus did not start:\n" + self.tail())

    def _all_serving(self) -> bool:
        serving = [w for w in self.api("GET", "/api/v1/settings").get("workers", []) if w.get("serving")]
        return len(serving) >= self.expected_workers

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One admin API call; its JSON, or an error for any status but 2xx."""
        response = api_request(self.admin_port, method, path, body, token=self.token, timeout=60)
        if not 200 <= response.status < 300:
            raise RuntimeError(f"{method} {path}: {response}")
        return response.json

    def create_user(self, username: str, domain: str) -> str:
        """Create a user allowed to send from C{domain}; returns its password."""
        return self.api("POST", "/api/v1/users", {"username": username, "authorized_domains": [domain]})["password"]

    def cpu(self) -> float:
        """CPU seconds of the whole tree: the twistd process (coordinator) and its SMTP workers."""
        return tree_cpu(self.proc.pid)

    def rss(self) -> float:
        """Resident memory of the whole tree in MiB."""
        return tree_rss_mib(self.proc.pid)

    def pss(self) -> float:
        """Proportional memory of the whole tree in MiB."""
        return tree_pss_mib(self.proc.pid)

    def workers(self) -> list[int]:
        """The PIDs of the SMTP worker processes now (none with C{workers = 1})."""
        return smtp_workers(self.proc.pid)

    def stalls(self, since: float, until: float) -> float | None:
        """The longest reactor stall (ms) the probe saw in the wall-clock window."""
        worst = None
        try:
            with open(self.probe) as f:
                for line in f:
                    stamp, value = line.split()
                    # A probe line covers the 0.5 s before its time stamp.
                    if since <= float(stamp) <= until + 0.5:
                        worst = max(worst or 0.0, float(value))
        except (OSError, ValueError):
            return None
        return worst

    def tail(self, lines: int = 20) -> str:
        return "".join(self.process.output().splitlines(keepends=True)[-lines:])

    def stop(self) -> None:
        self.process.stop(15)
