"""On-disk vs in-memory merging of IVF shards: peak memory, time, and identical answers.

The index job builds IVF shards in parallel tasks and merges them on the driver. In memory
(``merge_from``) the driver holds every inverted list; on disk (``index.ondisk``,
``faiss.contrib.ondisk.merge_ondisk``) the shards are memory-mapped and their lists appended
to one ``index.ivfdata`` file, which the searcher then memory-maps. This benchmark:

1. builds ``--shards`` IVF-Flat shards of ``--n`` clustered vectors (dim ``--dim``) from one
   trained empty index and writes them to a temporary folder (as the Ray shard tasks do);
2. merges them in a fresh subprocess each way and reports that process's peak memory above
   its post-import baseline: ``peak_anon_mb`` (anonymous memory: what must fit in RAM) and
   ``peak_rss_mb`` (also counts file pages the kernel may drop, i.e. the mapped shards);
3. loads each merged index in a fresh subprocess and checks that both return the same top-10
   ids for the same queries, with recall@10 against exact search and single-query latency.

Prints one JSON line per figure (``merge``, ``load_search``, ``run``); the in-memory merge is
the baseline of the on-disk one in the same run.

Run: ``python -m benchmarks.index_ondisk [--n 1000000] [--dim 128] [--shards 4] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

from benchmarks.common import emit

K = 10


class PeakMemory:
    """Peak anonymous memory and RSS of this process (sampled from /proc), above the level at entry."""

    FIELDS = ("RssAnon", "VmRSS")

    def __enter__(self) -> PeakMemory:
        self._base = self._read()
        self._peak = dict(self._base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in self.FIELDS:
                    values[name] = int(rest.split()[0]) * 1024
        return values

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._update()

    def _update(self) -> None:
        for name, value in self._read().items():
            self._peak[name] = max(self._peak[name], value)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._update()
        self.peak_anon_mb = (self._peak["RssAnon"] - self._base["RssAnon"]) / 2**20
        self.peak_rss_mb = (self._peak["VmRSS"] - self._base["VmRSS"]) / 2**20


# -- subprocess steps (each in a fresh interpreter so peaks are not polluted) -------------------
def step_merge(work: str, mode: str) -> dict[str, Any]:
    import faiss

    from mess_ray.index.faiss_index import (
        IVFDATA_FILE,
        index_to_bytes,
        merge_indexes,
        merge_shards_ondisk,
    )

    faiss.omp_set_num_threads(2)
    shards = sorted(
        os.path.join(work, "shards", f) for f in os.listdir(os.path.join(work, "shards"))
    )
    empty = open(os.path.join(work, "empty.faiss"), "rb").read()
    out_dir = os.path.join(work, mode)
    os.makedirs(out_dir, exist_ok=True)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        if mode == "ondisk":
            index = merge_shards_ondisk(empty, shards, os.path.join(out_dir, IVFDATA_FILE))
        else:
            index = merge_indexes([faiss.read_index(p) for p in shards])
        merge_s = time.perf_counter() - t0
        blob = index_to_bytes(
            index
        )  # what the job writes as index.faiss (a header only when on disk)
        with open(os.path.join(out_dir, "index.faiss"), "wb") as f:
            f.write(blob)
        total_s = time.perf_counter() - t0
    files = {name: os.path.getsize(os.path.join(out_dir, name)) for name in os.listdir(out_dir)}
    return {
        "ntotal": int(index.ntotal),
        "merge_s": round(merge_s, 2),
        "merge_and_write_s": round(total_s, 2),
        "peak_anon_mb": round(mem.peak_anon_mb, 1),
        "peak_rss_mb": round(mem.peak_rss_mb, 1),
        "files_mb": {k: round(v / 2**20, 1) for k, v in sorted(files.items())},
    }


def step_search(work: str, mode: str, nprobe: int) -> dict[str, Any]:
    import faiss

    from mess_ray.index.faiss_index import load_index
    from mess_ray.storage import Storage

    faiss.omp_set_num_threads(2)
    queries = np.load(os.path.join(work, "queries.npy"))
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        index = load_index(Storage(work), f"{mode}/index.faiss")  # as SearchIndex.load does
        load_s = time.perf_counter() - t0
    faiss.extract_index_ivf(index).nprobe = nprobe
    found = np.empty((len(queries), K), np.int64)
    times = np.empty(len(queries))
    for i in range(len(queries)):
        t0 = time.perf_counter()
        found[i] = index.search(queries[i : i + 1], K)[1][0]
        times[i] = (time.perf_counter() - t0) * 1000
    np.save(os.path.join(work, f"found-{mode}.npy"), found)
    return {
        "load_s": round(load_s, 3),
        "load_peak_anon_mb": round(mem.peak_anon_mb, 1),
        "load_peak_rss_mb": round(mem.peak_rss_mb, 1),
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p99_ms": round(float(np.percentile(times, 99)), 3),
    }


def run_step(*args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.index_ondisk", "--step", *args],
        # The repository root, so that `benchmarks` imports wherever this was started from.
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"step {args} failed:\n{result.stderr[-3000:]}")
    # FAISS's C++ code prints progress ("resizing ... ivfdata") to the same stdout, and its
    # buffer and Python's flush in either order: take the step's JSON line, wherever it lands.
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"step {args} printed no JSON line:\n{result.stdout[-3000:]}")
    return json.loads(lines[-1])


# -- driver -----------------------------------------------------------------------------------
def prepare(work: str, n: int, dim: int, shards: int, n_queries: int) -> dict[str, Any]:
    """Train once, write the shards and queries; exact top-10 of the queries as ground truth."""
    import faiss

    from benchmarks.index_search import clustered_vectors
    from mess_ray.index.faiss_index import (
        add_vectors,
        choose_index_spec,
        create_empty_index,
        index_to_bytes,
        training_points_needed,
    )

    x, queries = clustered_vectors(n, dim, n_queries)
    spec = choose_index_spec(n, dim, "ivf", ivfpq_above=10**12)
    t0 = time.perf_counter()
    train = x[
        np.random.default_rng(1).choice(n, min(training_points_needed(spec), n), replace=False)
    ]
    empty = create_empty_index(spec, train)
    train_s = time.perf_counter() - t0
    empty_bytes = index_to_bytes(empty)
    with open(os.path.join(work, "empty.faiss"), "wb") as f:
        f.write(empty_bytes)
    os.makedirs(os.path.join(work, "shards"))
    ids = np.arange(n, dtype=np.int64) * 7 + 2**40  # 64-bit ids, as segment ids are
    t0 = time.perf_counter()
    for s in range(shards):
        shard = faiss.deserialize_index(np.frombuffer(empty_bytes, np.uint8))
        add_vectors(shard, x[s::shards], ids[s::shards])
        faiss.write_index(shard, os.path.join(work, "shards", f"shard-{s:03d}.faiss"))
        del shard
    add_s = time.perf_counter() - t0
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    truth = ids[exact.search(queries, K)[1]]
    np.save(os.path.join(work, "queries.npy"), queries)
    return {
        "spec": spec,
        "truth": truth,
        "train_s": round(train_s, 2),
        "add_s": round(add_s, 2),
        "raw_vectors_mb": round(x.nbytes / 2**20, 1),
    }


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth)])
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=lambda v: int(float(v)), default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument(
        "--workdir", default=None, help="where shards and merged indexes go (default: a temp dir)"
    )
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:  # a subprocess step: print its JSON result
        name, work, mode, *rest = args.step
        result = (
            step_merge(work, mode) if name == "merge" else step_search(work, mode, int(rest[0]))
        )
        print(json.dumps(result))
        return 0

    out = open(args.out, "a") if args.out else None
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mess-ray-ondisk-bench-", dir=args.workdir) as work:
        prep = prepare(work, args.n, args.dim, args.shards, args.queries)
        spec = prep["spec"]
        common = {
            "n": args.n,
            "dim": args.dim,
            "index": "ivf",
            "nlist": spec.nlist,
            "shards": args.shards,
            "raw_vectors_mb": prep["raw_vectors_mb"],
        }
        merges = {mode: run_step("merge", work, mode) for mode in ("in_memory", "ondisk")}
        for mode, result in merges.items():
            emit(
                {
                    "figure": "merge",
                    **common,
                    "mode": mode,
                    **result,
                    "baseline_peak_anon_mb": merges["in_memory"]["peak_anon_mb"],
                },
                out,
            )
        searches = {
            mode: run_step("search", work, mode, str(args.nprobe))
            for mode in ("in_memory", "ondisk")
        }
        found = {mode: np.load(os.path.join(work, f"found-{mode}.npy")) for mode in searches}
        same = bool(np.array_equal(found["in_memory"], found["ondisk"]))
        for mode, result in searches.items():
            emit(
                {
                    "figure": "load_search",
                    **common,
                    "mode": mode,
                    "nprobe": args.nprobe,
                    "queries": args.queries,
                    "recall@10": round(recall(found[mode], prep["truth"]), 4),
                    **result,
                    "same_top10_as_in_memory": same,
                },
                out,
            )
    emit(
        {
            "figure": "run",
            "wall_s": round(time.perf_counter() - t_start, 1),
            "train_s": prep["train_s"],
            "shard_add_s": prep["add_s"],
            "loadavg_1m": round(os.getloadavg()[0], 2),
        },
        out,
    )
    if out is not None:
        out.close()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
