"""
The benchmarks' own accounting (bench/common.py): the quantiles the latency
rows print, the BENCH_WORKERS knob, and the process-tree sums behind the
"CPU of the whole tree" and "RSS of the whole tree" figures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from twisted.trial import unittest

from bench.common import (
    descendants,
    percentile,
    proc_cpu,
    pss_mib,
    rss_mib,
    tree_cpu,
    tree_pss_mib,
    tree_rss_mib,
    workers_setting,
)

# A child that uses CPU until its own CPU time reaches the given seconds
# (bounded by 60 s of wall time), says so, and waits for its stdin to close.
_BURNER = r"""
import sys, time
target, deadline = float(sys.argv[1]), time.monotonic() + 60
while time.process_time() < target and time.monotonic() < deadline:
    sum(range(10000))
print("burnt", flush=True)
sys.stdin.read()
"""


class PercentileTests(unittest.TestCase):
    def test_quantiles(self) -> None:
        """The median and the 99th percentile of 1..100 interpolate between samples."""
        values = [float(v) for v in range(1, 101)]
        self.assertAlmostEqual(percentile(values, 0.50), 50.5)
        self.assertAlmostEqual(percentile(values, 0.99), 99.01)

    def test_few_samples(self) -> None:
        """One sample is every quantile; none is NaN."""
        self.assertEqual(percentile([3.0], 0.99), 3.0)
        nothing = percentile([], 0.5)
        self.assertNotEqual(nothing, nothing)


class WorkersSettingTests(unittest.TestCase):
    def setUp(self) -> None:
        saved = os.environ.pop("BENCH_WORKERS", None)
        self.addCleanup(lambda: os.environ.update({"BENCH_WORKERS": saved}) if saved is not None else os.environ.pop("BENCH_WORKERS", None))

    def test_default(self) -> None:
        """Without BENCH_WORKERS the single process runs first, then one worker per core."""
        self.assertEqual(workers_setting(), [1, 0])

    def test_list(self) -> None:
        """BENCH_WORKERS is a comma-separated list, run in its order."""
        os.environ["BENCH_WORKERS"] = "0, 4,1"
        self.assertEqual(workers_setting(), [0, 4, 1])

    def test_bad(self) -> None:
        """A value that is not a non-negative integer stops the run with the knob's name."""
        for text in ("one", "-1", ","):
            os.environ["BENCH_WORKERS"] = text
            with self.assertRaises(SystemExit) as caught:
                workers_setting()
            self.assertIn("BENCH_WORKERS", str(caught.exception.code))


class ProcessTreeTests(unittest.TestCase):
    def spawn_burner(self, seconds: float) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            [sys.executable, "-c", _BURNER, str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

        def stop() -> None:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(30)

        self.addCleanup(stop)
        assert child.stdout is not None
        self.assertEqual(child.stdout.readline(), b"burnt\n")
        return child

    def test_live_child_counts(self) -> None:
        """A live child's CPU and memory are in its parent's tree figures."""
        child = self.spawn_burner(0.3)
        self.assertIn(child.pid, descendants(os.getpid()))
        # The parts first: both may still be using CPU when the tree is read.
        childs, own = proc_cpu(child.pid), proc_cpu(os.getpid(), children=True)
        self.assertGreaterEqual(childs, 0.25)
        self.assertGreaterEqual(tree_cpu(os.getpid()), own + childs - 1e-9)
        self.assertGreaterEqual(tree_rss_mib(os.getpid()), rss_mib(os.getpid()) + rss_mib(child.pid) - 0.01)
        self.assertGreater(pss_mib(child.pid), 0)
        self.assertGreater(tree_pss_mib(os.getpid()), pss_mib(os.getpid()))

    def test_reaped_child_counts(self) -> None:
        """A child that ended and was reaped still counts, in its parent's children's time."""
        before = tree_cpu(os.getpid())
        child = self.spawn_burner(0.3)
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)
        self.assertNotIn(child.pid, descendants(os.getpid()))
        self.assertGreaterEqual(tree_cpu(os.getpid()) - before, 0.25)

    def test_gone(self) -> None:
        """A process that no longer exists has no CPU, and NaN memory of either kind."""
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait(30)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{child.pid}") and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(proc_cpu(child.pid), 0.0)
        for gone in (rss_mib(child.pid), pss_mib(child.pid)):
            self.assertNotEqual(gone, gone)
