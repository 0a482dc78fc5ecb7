"""The ingest benchmark's CPU accounting counts every process between two snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ingest_throughput as bench  # noqa: E402


def test_consumed_cpu_counts_growth_and_processes_born_in_between():
    before = {1: 10.0, 2: 5.0, 3: 7.0}
    after = {1: 12.5, 2: 5.0, 4: 3.0}  # 3 exited (its parent's reaped times carry it), 4 is new
    assert bench.consumed_cpu(before, after) == 2.5 + 0.0 + 3.0
    assert bench.consumed_cpu({}, {}) == 0.0


def test_cpu_snapshot_counts_a_busy_process_under_a_given_root():
    import time

    script = (
        "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ninput()"
    )
    before = bench.cpu_by_pid([os.getpid()])
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and bench.cpu_by_pid([child.pid]).get(child.pid, 0) < 0.3:
            time.sleep(0.05)
        # the child is a root of its own tree, and a descendant in this process's tree
        assert bench.consumed_cpu({}, bench.cpu_by_pid([child.pid])) >= 0.3
        assert bench.consumed_cpu(before, bench.cpu_by_pid([os.getpid()])) >= 0.3
    finally:
        child.communicate(b"\n", timeout=30)
