"""Multi-node behaviour on one machine: ray.cluster_utils.Cluster with a 0-CPU head and worker nodes.

Each scenario (tests/multinode_scenarios.py) runs in its own process with its own cluster,
because this pytest session already holds an embedded Ray. They check that ingest, embedding
and index builds spread over worker nodes, that removing a node mid-job still publishes every
segment exactly once, and that Ray Train restarts its workers on the remaining node from the
last registered checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Each scenario starts its own multi-node Ray cluster in a subprocess.
pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "multinode_scenarios.py"


def run_scenario(name: str, workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), name, str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_ingest_and_index_spread_over_nodes_and_survive_a_removed_node(tmp_path):
    result = run_scenario("data", tmp_path)
    ingest, index = result["ingest"], result["index"]
    expected = result["expected_segments"]
    # Nothing lost, nothing duplicated, although a node died with work in flight.
    assert ingest["segments"] == ingest["unique_segments"] == expected
    assert ingest["files_segmented"] == result["files"]
    assert index["vectors"] == index["unique_vectors"] == index["index_count"] == expected
    # The work ran on several worker nodes, the removed one among them.
    assert len(ingest["nodes_used"]) >= 2 and ingest["removed_node"] in ingest["nodes_used"]
    assert len(index["embed_nodes"]) >= 2 and index["removed_node"] in index["embed_nodes"]
    assert index["shards_built"] >= 3


def test_ray_train_resumes_from_its_checkpoint_when_its_node_is_removed(tmp_path):
    result = run_scenario("train", tmp_path)
    assert result["steps"] == 10 and result["loss_steps"] == list(range(1, 11))
    assert result["resumed_from_steps"] and all(2 <= s < 10 for s in result["resumed_from_steps"])
    assert result["removed_node"] in result["first_attempt_nodes"]
    assert result["restarted_nodes"] and result["removed_node"] not in result["restarted_nodes"]
