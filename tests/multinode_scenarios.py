"""Multi-node scenarios on one machine with ``ray.cluster_utils.Cluster`` (run by tests/test_multinode.py).

    python tests/multinode_scenarios.py data  <workdir>   # ingest + index spread over nodes, a node removed mid-job
    python tests/multinode_scenarios.py train <workdir>   # Ray Train: the node of the workers removed mid-run

Each scenario starts its own cluster: a head with 0 CPUs (it only hosts the GCS, the driver and
Ray Train's controller, so every task and actor must go to a worker node) and worker nodes with
their own logical CPUs. It prints one JSON line (``RESULT {...}``) with what it measured and
exits non-zero if a check fails. It runs as its own process because the pytest session already
holds an embedded Ray, and a process can be connected to one cluster only.

Where work ran is recorded by thin wrappers around the job's own functions (the ingest decode
UDF, the embedding actor class, the index shard loaders, the training loop), defined here and
shipped by value to the workers; each appends ``{"node": <node id>, ...}`` to a file under
``<workdir>/records/`` (all nodes share this machine's disk). The wrappers also slow each unit
of work down a little, so that removing a node reliably happens while the job is running.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Before ray is imported: loopback only, no auth, no usage stats (as tests/conftest.py).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("RAY_ADDRESS", None)
# A dead node is noticed within a few seconds instead of Ray's production default (~30 s).
os.environ.setdefault("RAY_health_check_period_ms", "1000")
os.environ.setdefault("RAY_health_check_failure_threshold", "3")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray._private.utils  # noqa: E402
import soundfile as sf  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from mess_ray.config import load_config  # noqa: E402
from mess_ray.storage import Storage  # noqa: E402

# Cluster() records its address in /tmp/ray/ray_current_cluster, where every later
# `ray.init()` without an address (other test processes on this machine) would find it and try
# to join this short-lived cluster. It is reached by its explicit address only.
ray._private.utils.write_ray_address = lambda *args, **kwargs: None

RECORD_DIR_ENV = "MESS_RAY_MULTINODE_RECORDS"


# -- recording wrappers (run on worker nodes) ------------------------------------------------
def record(kind: str, **fields) -> None:
    folder = Path(os.environ[RECORD_DIR_ENV])
    entry = {
        "kind": kind,
        "node": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "time": time.time(),
        **fields,
    }
    (folder / f"{kind}-{uuid.uuid4().hex}.json").write_text(json.dumps(entry))


def read_records(folder: Path, kind: str) -> list[dict]:
    out = []
    for path in folder.glob(f"{kind}-*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError:  # being written right now
            continue
    return sorted(out, key=lambda r: r["time"])


def recording_ingest_batch(
    batch, settings, read_block_s, s3_endpoint_url, storage, out_dir, progress=None
):
    """The ingest UDF (mess_ray.ingest.job.ingest_batch), recording each file's node."""
    import pyarrow as pa

    from mess_ray.ingest.job import FILES_SCHEMA, ingest_row

    out = []
    for row in batch.to_pylist():
        time.sleep(0.4)
        out.append(ingest_row(row, settings, read_block_s, s3_endpoint_url, storage, out_dir))
        record("ingest", track_id=row["track_id"])
    return pa.Table.from_pylist(out, schema=FILES_SCHEMA)


def make_recording_embedder():
    from mess_ray.index.embed import SegmentEmbedder

    class RecordingSegmentEmbedder(SegmentEmbedder):
        """The embedding actor, recording the node of every batch it embeds."""

        def __call__(self, batch):
            time.sleep(0.5)
            out = super().__call__(batch)
            record("embed", actor=id(self), rows=int(len(batch["segment_id"])))
            return out

    return RecordingSegmentEmbedder


class RecordingShardLoader:
    """An index shard loader (mess_ray.index.job.VectorShardLoader) recording its node."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __call__(self):
        vectors, ids = self.loader()
        record("index_shard", vectors=int(len(ids)))
        return vectors, ids


class SlowCollate:
    def __init__(self, collate, delay_s: float) -> None:
        self.collate, self.delay_s = collate, delay_s

    def __call__(self, batch, loop_config):
        time.sleep(self.delay_s)
        return self.collate(batch, loop_config)


def recording_train_loop(loop_config):
    """Ray Train's per-worker loop (mess_ray.train.common.train_loop), recording rank and node."""
    import dataclasses
    import importlib

    import ray.train

    context = ray.train.get_context()
    record("train", rank=context.get_world_rank())
    task = loop_config["task"]
    loop_config = {
        **loop_config,
        "task": dataclasses.replace(task, collate=SlowCollate(task.collate, 0.6)),
    }
    importlib.import_module("mess_ray.train.common").train_loop(loop_config)


# -- cluster -----------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(temp_dir: str, worker_cpus: list[int]) -> tuple[Cluster, list]:
    """Head with 0 CPUs plus one worker node per entry of ``worker_cpus``; the driver connects."""
    # Ports with fixed defaults are taken by the pytest session's own embedded Ray.
    head = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "temp_dir": temp_dir,
            "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(),
            "metrics_export_port": free_port(),
            "runtime_env_agent_port": free_port(),
            "node_ip_address": "127.0.0.1",
            "object_store_memory": 100 * 2**20,
        },
    )
    workers = [add_worker(head, cpus, temp_dir) for cpus in worker_cpus]
    ray.init(address=head.address, logging_level="WARNING", log_to_driver=False)
    return head, workers


def add_worker(cluster: Cluster, cpus: int, temp_dir: str):
    return cluster.add_node(
        num_cpus=cpus,
        temp_dir=temp_dir,
        node_ip_address="127.0.0.1",
        metrics_export_port=free_port(),
        runtime_env_agent_port=free_port(),
        object_store_memory=100 * 2**20,
    )


def node_ids(nodes) -> list[str]:
    return [n.node_id for n in nodes]


def run_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target():
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised by the caller
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def wait_then_remove(
    cluster: Cluster,
    workers: list,
    records: Path,
    kind: str,
    min_done: int,
    thread: threading.Thread,
    timeout_s: float = 240,
) -> dict:
    """Once ``min_done`` units of ``kind`` are recorded, remove the worker node that did the most."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = read_records(records, kind)
        if len(done) >= min_done:
            break
        if not thread.is_alive():
            raise AssertionError(
                f"{kind}: job ended after {len(done)} units, before a node could be removed"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{kind}: only {len(done)} units after {timeout_s} s")
        time.sleep(0.05)
    by_node = {n.node_id: n for n in workers}
    counts = {nid: sum(r["node"] == nid for r in done) for nid in by_node}
    victim_id = max(counts, key=counts.get)
    cluster.remove_node(by_node[victim_id], allow_graceful=False)
    workers.remove(by_node[victim_id])
    if not thread.is_alive():
        raise AssertionError(
            f"{kind}: the job finished before its node was removed: nothing was tested"
        )
    return {"removed_node": victim_id, "units_done_at_removal": len(done)}


def write_wavs(folder: Path, count: int, seconds: float, rate: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    for i in range(count):
        tone = (
            0.3 * np.sin(2 * np.pi * (220 + 30 * i) * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.7 * t))
        )
        sf.write(folder / f"take{i:02d}.wav", tone.astype(np.float32), rate)


def expected_segment_ids(cfg, storage: Storage) -> list[int]:
    """Segment ids of the corpus computed without Ray (the pure segmentation function)."""
    from mess_ray.ingest.catalog import build_catalog
    from mess_ray.ingest.segment import segment_track

    rows, _ = build_catalog(cfg, storage)
    ids = []
    for row in rows:
        for seg in segment_track(
            row,
            cfg.audio.sample_rate,
            cfg.audio.window_s,
            cfg.audio.hop_s,
            cfg.ingest.read_block_s,
            cfg.audio.min_duration_s,
        ):
            ids.append(int(seg["segment_id"]))
    return ids


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


# -- scenarios -----------------------------------------------------------------------------------
def scenario_data(workdir: Path, temp_dir: str) -> dict:
    """Ingest then index on 3 one-CPU worker nodes; one node is removed in the middle of each."""
    import mess_ray.index.job as index_job
    import mess_ray.ingest.job as ingest_job
    from mess_ray.index.job import read_vector_ids, vector_files
    from mess_ray.pipeline import run_stage
    from mess_ray.segments import read_segment_table

    records = workdir / "records"
    records.mkdir(parents=True)
    os.environ[RECORD_DIR_ENV] = str(records)
    n_files = 12
    write_wavs(workdir / "audio", n_files, seconds=3.0, rate=16000)
    cfg = load_config(
        None,
        [
            f"storage.root={workdir / 'store'}",
            f"ingest.source={workdir / 'audio'}",
            "ingest.catalog=folder",
            "audio.window_s=1.0",
            "audio.hop_s=0.5",
            "index.min_actors=2",
            "index.max_actors=2",
            "index.cpus_per_actor=1",
            "index.batch_size=4",
            "index.shards=3",
        ],
    )
    storage = Storage.from_config(cfg.storage)
    expected = expected_segment_ids(cfg, storage)

    # Worker nodes inherit the environment at start: the record folder must be set first.
    cluster, workers = start_cluster(temp_dir, [1, 1, 1])
    ever_started = set(node_ids(workers))
    result: dict = {
        "worker_nodes": len(workers),
        "files": n_files,
        "expected_segments": len(expected),
    }

    # A few KiB per block instead of Ray Data's 128 MiB: this corpus (a few MB) then spans many
    # blocks, as a real one does, so the actor pool has blocks to share out.
    from ray.data import DataContext

    DataContext.get_current().target_max_block_size = 256 * 2**10

    # ---- ingest: a node removed while files are being decoded
    ingest_job.ingest_batch = recording_ingest_batch
    started = time.perf_counter()
    thread, out = run_in_thread(run_stage, "ingest", cfg, storage)
    result["ingest"] = wait_then_remove(
        cluster, workers, records, "ingest", min_done=4, thread=thread
    )
    thread.join(timeout=300)
    check(not thread.is_alive(), "ingest did not finish within 300 s after the node removal")
    if "error" in out:
        raise out["error"]
    manifest = out["result"]
    table = read_segment_table(storage, manifest["version"], columns=["segment_id", "track_id"])
    ids = table.column("segment_id").to_pylist()
    decoded = read_records(records, "ingest")
    result["ingest"].update(
        {
            "seconds": round(time.perf_counter() - started, 1),
            "segments": len(ids),
            "unique_segments": len(set(ids)),
            "files_segmented": manifest["counts"]["files_segmented"],
            "nodes_used": sorted({r["node"] for r in decoded}),
            # Files decoded more than once: re-executed after the node loss (the output keeps one copy).
            "file_decodes": len(decoded),
        }
    )
    check(
        manifest["counts"]["files_in"] == manifest["counts"]["files_segmented"] == n_files,
        f"ingest counts do not reconcile: {manifest['counts']}",
    )
    check(
        len(ids) == len(set(ids)),
        f"ingest duplicated segments: {len(ids)} rows, {len(set(ids))} ids",
    )
    check(
        sorted(ids) == sorted(expected),
        f"ingest lost or invented segments: {len(ids)} vs {len(expected)}",
    )
    check(
        manifest["counts"]["segments"] == len(expected),
        "manifest segment count differs from the table",
    )
    check(
        len(set(result["ingest"]["nodes_used"])) >= 2,
        f"ingest ran on fewer than 2 nodes: {decoded}",
    )
    check(
        set(result["ingest"]["nodes_used"]) <= ever_started,
        "ingest work ran outside the worker nodes",
    )

    # ---- index: a replacement node joins; a node with an embedding actor is removed mid-job
    workers.append(add_worker(cluster, 1, temp_dir))
    ever_started |= set(node_ids(workers))
    index_job.SegmentEmbedder = make_recording_embedder()
    real_loaders = index_job.shard_loaders
    index_job.shard_loaders = lambda *a, **k: [
        RecordingShardLoader(x) for x in real_loaders(*a, **k)
    ]
    started = time.perf_counter()
    thread, out = run_in_thread(run_stage, "index", cfg, storage, model_ref="random")
    result["index"] = wait_then_remove(
        cluster, workers, records, "embed", min_done=3, thread=thread
    )
    thread.join(timeout=300)
    check(not thread.is_alive(), "index did not finish within 300 s after the node removal")
    if "error" in out:
        raise out["error"]
    manifest = out["result"]
    vector_ids = read_vector_ids(
        storage, vector_files(storage, f"index/{manifest['version']}/vectors")
    ).tolist()
    embedded = read_records(records, "embed")
    shards = read_records(records, "index_shard")
    result["index"].update(
        {
            "seconds": round(time.perf_counter() - started, 1),
            "vectors": len(vector_ids),
            "unique_vectors": len(set(vector_ids)),
            "index_count": manifest["count"],
            "embed_nodes": sorted({r["node"] for r in embedded}),
            "embed_batches": len(embedded),
            "embedded_rows": sum(r["rows"] for r in embedded),
            "shard_nodes": sorted({r["node"] for r in shards}),
            "shards_built": len(shards),
        }
    )
    check(sorted(vector_ids) == sorted(expected), "index vectors lost or duplicated segments")
    check(
        manifest["count"] == len(expected),
        f"index holds {manifest['count']} vectors, expected {len(expected)}",
    )
    check(
        len(result["index"]["embed_nodes"]) >= 2, f"embedding ran on fewer than 2 nodes: {embedded}"
    )
    check(
        result["index"]["removed_node"] in result["index"]["embed_nodes"],
        "the removed node had embedded nothing",
    )
    check(len(shards) >= 3, f"{len(shards)} shard builds recorded, expected 3")
    check(
        set(result["index"]["embed_nodes"]) | set(result["index"]["shard_nodes"]) <= ever_started,
        "index work ran outside the worker nodes",
    )
    ray.shutdown()
    cluster.shutdown()
    return result


def scenario_train(workdir: Path, temp_dir: str) -> dict:
    """Pretrain with 2 Ray Train workers; the node holding them is removed after a checkpoint."""
    import mess_ray.train.common as train_common
    from mess_ray.pipeline import run_stage

    sys.path.insert(0, str(REPO / "tests"))
    from helpers import write_tiny_ingest

    records = workdir / "records"
    records.mkdir(parents=True)
    os.environ[RECORD_DIR_ENV] = str(records)
    storage = Storage(str(workdir / "store"))
    write_tiny_ingest(storage, pieces=3, per_style=2)
    steps, every = 10, 2
    cfg = load_config(
        None,
        [
            f"storage.root={storage.root}",
            "audio.window_s=2.0",
            "audio.hop_s=1.0",
            f"pretrain.steps={steps}",
            f"pretrain.checkpoint_every={every}",
            "pretrain.batch_size=4",
            "pretrain.num_clusters=8",
            "pretrain.kmeans_sample_frames=500",
            "pretrain.num_workers=2",
            "pretrain.cpus_per_worker=0.5",
            "pretrain.max_failures=2",
            "pretrain.keep_checkpoints=2",
            "pretrain.run_name=multinode",
            "pretrain.report_every=100",
        ],
    )
    # Two nodes with 2 CPUs: the 2 x 0.5-CPU training workers fit on either one with room for
    # the Ray Data tasks that feed them.
    cluster, workers = start_cluster(temp_dir, [2, 2])
    train_common.train_loop = recording_train_loop
    started = time.perf_counter()
    thread, out = run_in_thread(run_stage, "pretrain", cfg, storage)
    # A checkpoint counts once Ray Train's controller has registered it (it polls the workers
    # every couple of seconds; a worker lost before that poll loses its report): the
    # controller's snapshot then names it as the latest.
    snapshot = Path(
        storage.path("pretrain", "runs", "multinode", "checkpoint_manager_snapshot.json")
    )
    deadline = time.monotonic() + 480
    while True:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (FileNotFoundError, json.JSONDecodeError):
            latest = {}
        if latest.get("checkpoint_dir_name"):
            break
        check("error" not in out, f"pretrain failed before its first checkpoint: {out}")
        check(thread.is_alive(), "pretrain ended before a checkpoint was registered")
        check(time.monotonic() < deadline, "no checkpoint registered within 480 s")
        time.sleep(0.05)
    first = read_records(records, "train")
    workers_nodes = {r["node"] for r in first}
    by_node = {n.node_id: n for n in workers}
    victim = next(iter(workers_nodes))
    cluster.remove_node(by_node[victim], allow_graceful=False)
    check(thread.is_alive(), "pretraining finished before the node was removed: nothing was tested")
    removed_at = time.perf_counter() - started
    thread.join(timeout=300)
    check(not thread.is_alive(), "pretrain did not finish within 300 s after the node removal")
    if "error" in out:
        raise out["error"]
    manifest = out["result"]
    attempts = read_records(records, "train")
    later = [r for r in attempts if r["time"] > first[-1]["time"]]
    result = {
        "seconds": round(time.perf_counter() - started, 1),
        "removed_node": victim,
        "registered_checkpoint_at_removal": latest["checkpoint_dir_name"],
        "removed_after_s": round(removed_at, 1),
        "first_attempt_nodes": sorted(workers_nodes),
        "restarted_nodes": sorted({r["node"] for r in later}),
        "worker_starts": len(attempts),
        "resumed_from_steps": manifest["resumed_from_steps"],
        "steps": manifest["counts"]["steps"],
        "loss_steps": manifest["losses"]["steps"],
        "checkpoint": manifest["checkpoint"].rsplit("/", 1)[-1],
    }
    check(
        manifest["counts"]["steps"] == steps,
        f"finished at step {manifest['counts']['steps']}, not {steps}",
    )
    check(
        len(manifest["resumed_from_steps"]) >= 1
        and all(every <= s < steps and s % every == 0 for s in manifest["resumed_from_steps"]),
        f"the restarted workers did not resume from a checkpoint: {manifest['resumed_from_steps']}",
    )
    check(
        manifest["losses"]["steps"] == list(range(1, steps + 1)),
        f"step history {manifest['losses']['steps']}",
    )
    check(all(np.isfinite(manifest["losses"]["history"])), "non-finite loss")
    check(
        len(later) >= 2 and victim not in {r["node"] for r in later},
        f"the worker group did not restart on the remaining node: {attempts}",
    )
    ray.shutdown()
    cluster.shutdown()
    return result


SCENARIOS = {"data": scenario_data, "train": scenario_train}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in SCENARIOS:
        print(
            f"usage: python {Path(__file__).name} {{{'|'.join(SCENARIOS)}}} <workdir>",
            file=sys.stderr,
        )
        return 2
    workdir = Path(argv[1])
    workdir.mkdir(parents=True, exist_ok=True)
    # Short: Ray's AF_UNIX socket paths live under it and are capped at 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rmn-", dir="/tmp")
    try:
        result = SCENARIOS[argv[0]](workdir, temp_dir)
    finally:
        # On failure the Cluster's exit hook still stops its processes (shutdown_at_exit).
        shutil.rmtree(temp_dir, ignore_errors=True)
    print("RESULT " + json.dumps({"scenario": argv[0], **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
