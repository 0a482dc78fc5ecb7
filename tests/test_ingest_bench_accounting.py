"""The ingest benchmark's CPU accounting counts every process between two snapshots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_cpu_by_role_splits_consumed_cpu_and_unknown_pids_count_as_agents():
    before = {1: 1.0, 2: 2.0, 3: 0.5}
    after = {1: 1.5, 2: 4.0, 3: 0.75, 9: 0.25}
    roles = {1: "driver", 2: "worker", 3: "worker"}
    split = bench.cpu_by_role(before, after, roles)
    assert split == {"agent": 0.25, "driver": 0.5, "worker": 2.25}
    assert sum(split.values()) == bench.consumed_cpu(before, after)


def test_this_process_is_the_driver_and_snapshots_record_roles():
    import psutil

    roles: dict[int, str] = {}
    bench.cpu_by_pid([os.getpid()], roles)
    assert roles[os.getpid()] == "driver"
    assert bench.process_role(psutil.Process(os.getpid())) == "driver"


def test_variants_parse_into_overrides_and_bad_settings_fail_before_any_run():
    assert bench.parse_variant("default") == ("default", [])
    name, overrides = bench.parse_variant("ingest.cpus_per_task=0.5  ingest.read_block_s=10")
    assert name == "ingest.cpus_per_task=0.5 ingest.read_block_s=10"
    cfg = bench.config("/tmp/root", "/tmp/src", 30.0, overrides)
    assert (cfg.ingest.cpus_per_task, cfg.ingest.read_block_s) == (0.5, 10.0)
    with pytest.raises(ValueError):
        bench.parse_variant("ingest.cpus_per_task=2")  # over the schema's bound
    with pytest.raises(ValueError):
        bench.parse_variant("ingest.no_such_setting=1")


def test_profile_lists_the_costliest_functions_of_a_decode_and_write_pass(tmp_path, capsys):
    bench.make_corpus(tmp_path / "corpus", 2, 0.1)
    paths = sorted(str(p) for p in (tmp_path / "corpus").iterdir())
    bench.profile(paths, 30.0, str(tmp_path / "store"), 5)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    assert len(lines) == 5 and all(line["figure"] == "profile" for line in lines)
    assert lines[0]["own_s"] >= lines[-1]["own_s"] and lines[0]["seconds_audio"] == 12.0
    assert len(list((tmp_path / "store" / "segments").iterdir())) == 2  # the shards were written
