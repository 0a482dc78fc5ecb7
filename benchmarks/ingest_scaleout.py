"""Ingest scale-out on a simulated multi-node cluster: throughput with 1, 2 and 3 worker nodes.

For each node count, a fresh ``ray.cluster_utils.Cluster`` on this machine: a head with 0 CPUs
(GCS and driver only, so every decode task runs on a worker node) plus N worker nodes of one
logical CPU each, and ``ingest.cpus_per_task=1`` (one task per node at a time). An untimed
warm-up ingest starts each node's worker; then the real ingest (:func:`mess_ray.ingest.run_ingest`,
one pass: decode, segment, write) of the same generated corpus is timed. One JSON line per node
count: audio seconds per wall second, speedup over one node, CPU seconds of every process of
the cluster (driver, GCS, raylets and their workers) and audio seconds per CPU second, with the
1-minute load average. The nodes share this machine's cores: the curve can grow only as far as
idle physical cores allow (``cores`` in the output), so read it with the load average.

    python -m benchmarks.ingest_scaleout [--nodes 1 2 3] [--files 6 --minutes 1.5]
        [--out docs/scaling/ingest_scaleout.jsonl] [--plot docs/scaling/ingest_scaleout.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)

from benchmarks.common import emit, free_port  # noqa: E402
from benchmarks.ingest_throughput import (  # noqa: E402
    consumed_cpu,
    cores,
    cpu_by_pid,
    make_corpus,
)
from mess_ray.config import MessRayConfig  # noqa: E402
from mess_ray.ingest.memory import write_long_wav  # noqa: E402
from mess_ray.storage import Storage  # noqa: E402


def start_cluster(nodes: int, temp_dir: str):
    """Head with 0 CPUs and ``nodes`` one-CPU worker nodes; the driver connects by address."""
    import ray
    import ray._private.utils
    from ray.cluster_utils import Cluster

    # Reached by its explicit address only: other Ray users on this machine must not find it.
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    common = {"temp_dir": temp_dir, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **common,
            "num_cpus": 0,
            "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(),
            "metrics_export_port": free_port(),
            "runtime_env_agent_port": free_port(),
            "object_store_memory": 100 * 2**20,
        },
    )
    for _ in range(nodes):
        cluster.add_node(
            **common,
            num_cpus=1,
            metrics_export_port=free_port(),
            runtime_env_agent_port=free_port(),
            object_store_memory=100 * 2**20,
        )
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    return cluster


def cluster_roots(cluster) -> list[int]:
    """This process and every process of every node (raylets' children are the Ray workers)."""
    roots = [os.getpid()]
    for node in [cluster.head_node, *cluster.worker_nodes]:
        for infos in node.all_processes.values():
            roots += [info.process.pid for info in infos if info.process is not None]
    return sorted(set(roots))


def ingest_config(root: str, source: str, read_block_s: float) -> MessRayConfig:
    return MessRayConfig.model_validate(
        {
            "storage": {"root": root},
            "audio": {"sample_rate": 16000, "window_s": 4.0, "hop_s": 2.0, "min_duration_s": 1.0},
            "ingest": {
                "source": source,
                "read_block_s": read_block_s,
                "incremental": False,
                "cpus_per_task": 1.0,
            },
        }
    )


def run_nodes(nodes: int, corpus: Path, warm: Path, workdir: Path, read_block_s: float) -> dict:
    import ray

    from mess_ray.ingest import run_ingest

    temp_dir = tempfile.mkdtemp(prefix="rsc", dir="/tmp")  # short: Ray's socket paths
    cluster = start_cluster(nodes, temp_dir)
    try:
        run_ingest(
            ingest_config(str(workdir / f"warm{nodes}"), str(warm), read_block_s),
            Storage(str(workdir / f"warm{nodes}")),
        )
        roots = cluster_roots(cluster)
        before, began = cpu_by_pid(roots), time.perf_counter()
        root = str(workdir / f"store{nodes}")
        manifest = run_ingest(ingest_config(root, str(corpus), read_block_s), Storage(root))
        wall = time.perf_counter() - began
        cpu = consumed_cpu(before, cpu_by_pid(cluster_roots(cluster)))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    counts = manifest["counts"]
    return {
        "figure": "ingest_scaleout",
        "worker_nodes": nodes,
        "cpus_per_node": 1,
        "cores": cores(),
        "files": counts["files_segmented"],
        "segments": counts["segments"],
        "seconds_audio": counts["seconds_audio"],
        "wall_s": round(wall, 2),
        "x_realtime": round(counts["seconds_audio"] / wall, 1),
        "cpu_s": round(cpu, 2),
        "x_realtime_per_cpu_s": round(counts["seconds_audio"] / cpu, 1) if cpu > 0 else None,
        "timings_s": manifest.get("timings_s"),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [r["worker_nodes"] for r in records]
    speedup = [r["speedup_vs_1_node"] for r in records]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(nodes, speedup, "o-", label="measured (ingest, one pass)")
    ax.plot(nodes, nodes, "--", color="grey", label="linear")
    for r in records:
        ax.annotate(
            f"load {r['load_avg_1m']:.1f}",
            (r["worker_nodes"], r["speedup_vs_1_node"]),
            textcoords="offset points",
            xytext=(4, -12),
            fontsize=7,
        )
    ax.set_xlabel("one-CPU worker nodes (ray.cluster_utils.Cluster)")
    ax.set_ylabel("audio s per wall s, vs 1 node")
    ax.set_xticks(nodes)
    ax.set_title(f"Ingest scale-out on one {records[0]['cores']}-core machine", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=1.5, help="Length of each corpus file.")
    parser.add_argument("--read-block-s", type=float, default=30.0)
    parser.add_argument("--out", default=None, help="also write the JSON lines to this file")
    parser.add_argument("--plot", default=None, help="write the PNG plot here")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.nodes):
        parser.error("--nodes must be >= 1")
    workdir = Path(tempfile.mkdtemp(prefix="ingest_scaleout_"))
    records: list[dict] = []
    try:
        corpus, warm = workdir / "corpus", workdir / "warm"
        make_corpus(corpus, args.files, args.minutes)
        for i in range(max(args.nodes)):
            write_long_wav(warm / f"w{i}.wav", 3.0, rate=44100, seed=100 + i)
        for nodes in args.nodes:
            records.append(run_nodes(nodes, corpus, warm, workdir, args.read_block_s))
            base = next((r for r in records if r["worker_nodes"] == min(args.nodes)), records[0])
            records[-1]["speedup_vs_1_node"] = round(
                records[-1]["x_realtime"] / base["x_realtime"] * min(args.nodes), 3
            )
            emit(records[-1])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
    if args.plot:
        plot(records, args.plot)


if __name__ == "__main__":
    main()
