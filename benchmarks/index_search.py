"""FAISS index benchmark: build cost vs corpus size and recall@10 vs query latency per index type.

Prints one JSON line per figure; every figure is measured against exact search (``IndexFlatIP``)
in the same run:

- ``build``: build time (train + add) and peak memory (RSS sampled during the build, above the
  pre-build level) for each index type at each corpus size (default 1e5 and 1e6 clustered
  synthetic vectors of dim 128; ``--quick``: 2e4 and 1e5);
- ``build_estimate``: the same figures for 1e8 vectors, EXTRAPOLATED on paper from the
  per-vector costs measured at the largest size (labelled ``"extrapolated": true``);
- ``recall_latency``: recall@10 against exact search and single-query latency (p50, p99) for
  flat, IVF-Flat at several nprobe, IVF-PQ + exact re-rank, HNSW at several efSearch, on the
  clustered vectors and on real embeddings (the segments of a rendered corpus's latest ingest
  embedded here with ``--ingest ROOT [--model REF]``; an index artifact's vectors with
  ``--storage``; without either, synthetic tone clips embedded by the random-init encoder);
- ``target``: whether recall@10 >= 0.95 at p99 < 5 ms was met at the largest size, and by what.

Run: ``python -m benchmarks.index_search [--quick] [--ingest ROOT | --storage ROOT] [--threads 2] [--out FILE]``.
Real embeddings only: ``--real-only --ingest /work/data/m21-bench``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import faiss
import numpy as np
import psutil

from benchmarks.common import emit
from mess_ray.index.faiss_index import (
    IndexSpec,
    add_vectors,
    choose_index_spec,
    configure_for_search,
    create_empty_index,
    training_points_needed,
)

K = 10
TARGET_RECALL, TARGET_P99_MS = 0.95, 5.0
RERANK_CANDIDATES = 4 * K * 4  # what SearchIndex fetches for k=10 before exact re-ranking


# -- data ---------------------------------------------------------------------------------
def clustered_vectors(
    n: int, dim: int, n_queries: int, cluster_size: int = 1000, noise: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around n/cluster_size random centres plus Gaussian noise of norm ~``noise``
    (relative to the unit centre), and queries from the same mixture. Clusters are larger than
    IVF lists, so a query's neighbours spread over several lists: not trivially separable."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(10, n // cluster_size), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), np.float32)
        for start in range(0, count, 200_000):  # chunks keep the temporaries small
            m = min(200_000, count - start)
            x = centres[rng.integers(0, len(centres), m)]
            x += rng.standard_normal((m, dim)).astype(np.float32) * (noise / math.sqrt(dim))
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(n_queries)


def embed_ingest(ingest_root: str, model_ref: str, batch: int = 32) -> tuple[str, np.ndarray]:
    """Every segment of the latest ingest artifact under ``ingest_root`` (e.g. a rendered corpus),
    embedded in this process by ``model_ref`` (``random``: the random-init tiny encoder, or a
    stage/folder under that root). Read-only on the root: nothing is published there."""
    from mess_ray.config import MessRayConfig
    from mess_ray.index.embed import segment_audio_matrix
    from mess_ray.models import Embedder
    from mess_ray.segments import read_segment_table, window_samples
    from mess_ray.storage import Storage

    storage = Storage(ingest_root)
    manifest = storage.manifest("ingest")
    seg = manifest.get("segmentation", {})
    cfg = MessRayConfig.model_validate(
        {
            "storage": {"root": ingest_root},
            "model": {"size": "tiny"},
            "audio": {k: seg[k] for k in ("sample_rate", "window_s", "hop_s") if k in seg},
        }
    )
    embedder = Embedder.from_ref(cfg, storage, model_ref)
    table = read_segment_table(
        storage, manifest["version"], columns=["segment_id", "sample_rate", "audio"]
    )
    length = window_samples(cfg.audio.window_s, cfg.audio.sample_rate)
    parts = []
    for start in range(0, table.num_rows, batch):
        rows = table.slice(start, batch)
        audio = segment_audio_matrix(
            rows.column("audio").to_pylist(),
            rows.column("sample_rate").to_numpy(),
            cfg.audio.sample_rate,
            length,
        )
        parts.append(embedder.embed(audio))
    label = (
        f"{table.num_rows} segments of ingest {manifest['version']} under {ingest_root}, "
        f"embedded by the {model_ref} tiny model"
    )
    return label, np.concatenate(parts)


def real_embeddings(
    storage_root: str | None,
    n_queries: int,
    seed: int = 0,
    ingest_root: str | None = None,
    model_ref: str = "random",
) -> tuple[str, np.ndarray, np.ndarray]:
    """(label, corpus, queries): an index artifact's vectors, a rendered corpus's segments embedded
    here, or tone clips through the random encoder."""
    rng = np.random.default_rng(seed)
    if ingest_root:
        label, vectors = embed_ingest(ingest_root, model_ref)
    elif storage_root:
        import pyarrow.parquet as pq

        from mess_ray.index.embed import table_to_vectors
        from mess_ray.storage import Storage

        storage = Storage(storage_root)
        manifest = storage.manifest("index")
        rel = f"index/{manifest['version']}/{manifest.get('files', {}).get('vectors', 'vectors')}"
        files = sorted(storage.path(rel, f) for f in storage.listdir(rel) if f.endswith(".parquet"))
        vectors = np.concatenate(
            [table_to_vectors(pq.read_table(f, filesystem=storage.pyarrow_fs()))[0] for f in files]
        )
        label = f"index {manifest['version']} ({manifest['model'].get('ref')} model)"
    else:
        from mess_ray.config import MessRayConfig
        from mess_ray.models import Embedder
        from mess_ray.segments import window_samples
        from mess_ray.storage import Storage

        with tempfile.TemporaryDirectory() as tmp:
            cfg = MessRayConfig.model_validate(
                {"storage": {"root": tmp}, "audio": {"window_s": 1.0, "hop_s": 0.5}}
            )
            embedder = Embedder.from_ref(cfg, Storage(tmp), "random")
            rate, length = (
                cfg.audio.sample_rate,
                window_samples(cfg.audio.window_s, cfg.audio.sample_rate),
            )
            t = np.arange(length) / rate
            clips = []
            for _ in range(2000):  # notes with random pitch, vibrato, tremolo, brightness and noise
                f0 = 110 * 2 ** rng.uniform(0, 4)
                phase = 2 * np.pi * f0 * t + rng.uniform(0, 3) * np.sin(
                    2 * np.pi * rng.uniform(2, 7) * t
                )
                harmonics = sum(rng.uniform(0, 1) / h * np.sin(h * phase) for h in range(1, 6))
                envelope = np.exp(-t * rng.uniform(0, 4)) * (
                    1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 4) * t)
                )
                clips.append(0.3 * envelope * harmonics + 0.01 * rng.standard_normal(length))
            vectors = np.concatenate(
                [
                    embedder.embed(np.asarray(clips[i : i + 64], np.float32))
                    for i in range(0, len(clips), 64)
                ]
            )
        label = "random-init encoder on 2000 synthetic tone clips"
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    # Queries: held-out corpus vectors (they are removed from the corpus, so no self-match).
    order = rng.permutation(len(vectors))
    n_q = min(n_queries, len(vectors) // 5)
    return label, vectors[order[n_q:]], vectors[order[:n_q]]


# -- measurement --------------------------------------------------------------------------
class PeakRSS:
    """Samples this process's RSS in a thread; ``peak_mb`` is the peak above the level at entry."""

    def __enter__(self) -> PeakRSS:
        self._proc = psutil.Process()
        self._base = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = (self._peak - self._base) / 2**20


def build(spec: IndexSpec, x: np.ndarray) -> tuple[faiss.Index, dict[str, float]]:
    """Build as run_index does (train once on a sample, add under ids); time and memory."""
    ids = np.arange(len(x), dtype=np.int64)
    need = training_points_needed(spec)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        train = (
            x[np.random.default_rng(1).choice(len(x), min(need, len(x)), replace=False)]
            if need
            else None
        )
        index = create_empty_index(spec, train)
        t1 = time.perf_counter()
        add_vectors(index, x, ids)
        t2 = time.perf_counter()
    return index, {
        "train_s": round(t1 - t0, 3),
        "add_s": round(t2 - t1, 3),
        "build_s": round(t2 - t0, 3),
        "peak_mb": round(mem.peak_mb, 1),
        "index_mb": round(index_bytes(index) / 2**20, 1),
    }


def index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).size)


def single_query_latencies(
    search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids and per-query latency (ms), one query at a time as the service sends them."""
    found = np.empty((len(queries), K), np.int64)
    times = np.empty(len(queries))
    for i in range(len(queries)):
        t0 = time.perf_counter()
        found[i] = search(queries[i : i + 1])
        times[i] = (time.perf_counter() - t0) * 1000
    return found, times


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth)])
    )


def faiss_search(index: faiss.Index) -> Callable[[np.ndarray], np.ndarray]:
    return lambda q: index.search(q, K)[1][0]


def reranked_search(index: faiss.Index, x: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """IVF-PQ candidates re-scored exactly against the raw vectors (as SearchIndex does)."""

    def search(q: np.ndarray) -> np.ndarray:
        cand = index.search(q, RERANK_CANDIDATES)[1][0]
        cand = cand[cand >= 0]
        return cand[np.argsort(-(x[cand] @ q[0]))[:K]]

    return search


# -- figures ------------------------------------------------------------------------------
def sweep(
    dataset: str,
    x: np.ndarray,
    queries: np.ndarray,
    args: argparse.Namespace,
    out: Any,
    build_figures: bool,
) -> list[dict[str, Any]]:
    """Build every index type over x and measure recall@10 / latency against exact search."""
    n, dim = x.shape
    rows: list[dict[str, Any]] = []
    flat, flat_cost = build(IndexSpec(type="flat", dim=dim), x)
    t0 = time.perf_counter()
    truth = flat.search(queries, K)[1]
    exact_batch_ms = (time.perf_counter() - t0) * 1000 / len(queries)
    _, exact_times = single_query_latencies(faiss_search(flat), queries[: args.latency_queries])
    exact = {
        "exact_p50_ms": round(float(np.percentile(exact_times, 50)), 3),
        "exact_p99_ms": round(float(np.percentile(exact_times, 99)), 3),
        "exact_batch_ms_per_query": round(exact_batch_ms, 3),
    }

    def record(
        index_type: str,
        params: dict[str, Any],
        found: np.ndarray,
        times: np.ndarray,
        cost: dict[str, float],
    ) -> None:
        # Other processes on the machine inflate p99: the load average is recorded with each figure.
        row = {
            "figure": "recall_latency",
            "dataset": dataset,
            "n": n,
            "dim": dim,
            "threads": args.threads,
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "index": index_type,
            **params,
            "recall@10": round(recall_at_k(found, truth[: len(found)]), 4),
            "p50_ms": round(float(np.percentile(times, 50)), 3),
            "p99_ms": round(float(np.percentile(times, 99)), 3),
            **exact,
            "build_s": cost["build_s"],
            "index_mb": cost["index_mb"],
        }
        row["meets_target"] = row["recall@10"] >= TARGET_RECALL and row["p99_ms"] < TARGET_P99_MS
        rows.append(row)
        emit(row, out)

    lat_q = queries[: args.latency_queries]
    # The flat index IS exact search: its row reuses the exact timings measured above.
    record("flat", {}, truth[: args.latency_queries], exact_times, flat_cost)
    builds = [("flat", {}, flat_cost)]
    del flat

    ivf_spec = choose_index_spec(n, dim, "ivf", ivfpq_above=10**12)
    ivf, cost = build(ivf_spec, x)
    builds.append(("ivf", {"nlist": ivf_spec.nlist}, cost))
    for nprobe in sorted(
        {min(p, ivf_spec.nlist) for p in args.nprobes}
    ):  # small corpora: few lists
        configure_for_search(ivf, IndexSpec(**{**ivf_spec.to_dict(), "nprobe": nprobe}))
        found, times = single_query_latencies(faiss_search(ivf), lat_q)
        record("ivf", {"nlist": ivf_spec.nlist, "nprobe": nprobe}, found, times, cost)
    del ivf

    pq_spec = choose_index_spec(n, dim, "ivf", ivfpq_above=0)
    ivfpq, cost = build(pq_spec, x)
    builds.append(("ivfpq", {"nlist": pq_spec.nlist, "pq_m": pq_spec.pq_m}, cost))
    for nprobe in sorted({min(p, pq_spec.nlist) for p in args.pq_nprobes}):
        configure_for_search(ivfpq, IndexSpec(**{**pq_spec.to_dict(), "nprobe": nprobe}))
        found, times = single_query_latencies(reranked_search(ivfpq, x), lat_q)
        record(
            "ivfpq+rerank",
            {
                "nlist": pq_spec.nlist,
                "pq_m": pq_spec.pq_m,
                "nprobe": nprobe,
                "rerank_candidates": RERANK_CANDIDATES,
            },
            found,
            times,
            cost,
        )
    del ivfpq

    hnsw_spec = choose_index_spec(
        n, dim, "hnsw", hnsw_m=args.hnsw_m, ef_construction=args.hnsw_ef_construction
    )
    hnsw, cost = build(hnsw_spec, x)
    builds.append(
        ("hnsw", {"hnsw_m": hnsw_spec.hnsw_m, "ef_construction": hnsw_spec.ef_construction}, cost)
    )
    for ef in args.ef_searches:
        configure_for_search(hnsw, IndexSpec(**{**hnsw_spec.to_dict(), "ef_search": ef}))
        found, times = single_query_latencies(faiss_search(hnsw), lat_q)
        record(
            "hnsw",
            {
                "hnsw_m": hnsw_spec.hnsw_m,
                "ef_construction": hnsw_spec.ef_construction,
                "ef_search": ef,
            },
            found,
            times,
            cost,
        )
    del hnsw

    if build_figures:
        for index_type, params, cost in builds:
            emit(
                {
                    "figure": "build",
                    "dataset": dataset,
                    "n": n,
                    "dim": dim,
                    "threads": args.threads,
                    "index": index_type,
                    **params,
                    **cost,
                    "exact_build_s": flat_cost["build_s"],
                    "raw_vectors_mb": round(x.nbytes / 2**20, 1),
                },
                out,
            )
            rows.append({"figure": "build", "index": index_type, "n": n, **params, **cost})
    return rows


def extrapolate(builds: list[dict[str, Any]], n_target: int, dim: int, out: Any) -> None:
    """Paper estimate for ``n_target`` vectors from the per-vector costs measured at the largest n.

    Memory scales with n (bytes per vector measured from the serialized index). Add time per
    vector scales with the lists scanned on assignment (nlist ~ 2 sqrt(n)) for IVF, with log n
    for HNSW; IVF training (k-means on 64*nlist points over nlist centroids) scales with nlist^2.
    """
    n_max = max(b["n"] for b in builds)
    for b in (b for b in builds if b["n"] == n_max):
        nlist_target = choose_index_spec(n_target, dim, "ivf").nlist
        factor_add = {"flat": 1.0, "hnsw": math.log(n_target) / math.log(n_max)}.get(
            b["index"], nlist_target / max(1, b.get("nlist", 1))
        )
        factor_train = (nlist_target / b["nlist"]) ** 2 if b.get("nlist") else 0.0
        add_s = b["add_s"] / n_max * n_target * factor_add
        train_s = b["train_s"] * factor_train
        index_gb = b["index_mb"] / n_max * n_target / 1024
        emit(
            {
                "figure": "build_estimate",
                "extrapolated": True,
                "from_n": n_max,
                "n": n_target,
                "dim": dim,
                "index": b["index"],
                "nlist": nlist_target if b.get("nlist") else None,
                "est_train_s": round(train_s),
                "est_add_s": round(add_s),
                "est_build_h_1_node": round((train_s + add_s) / 3600, 2),
                "est_index_gb": round(index_gb, 1),
                "est_rerank_vectors_gb": round(n_target * dim * 4 / 2**30, 1)
                if b["index"] == "ivfpq"
                else 0.0,
                "note": "paper estimate from measured per-vector costs, not a measurement; the add phase "
                "parallelises over shards (Ray tasks) and IVF-PQ keeps raw vectors on disk for re-ranking",
            },
            out,
        )


def summarize(rows: list[dict[str, Any]], n: int, out: Any) -> None:
    """The cheapest configuration per index type that meets the target at the largest size."""
    candidates = [
        r
        for r in rows
        if r.get("figure") == "recall_latency" and r["n"] == n and r["dataset"] == "clustered"
    ]
    best: dict[str, Any] = {}
    for r in candidates:
        if r["meets_target"] and (
            r["index"] not in best or r["p99_ms"] < best[r["index"]]["p99_ms"]
        ):
            best[r["index"]] = r
    emit(
        {
            "figure": "target",
            "n": n,
            "target": f"recall@10 >= {TARGET_RECALL} at p99 < {TARGET_P99_MS} ms",
            "met": bool(best),
            "best_per_index": {
                k: {
                    key: v.get(key)
                    for key in (
                        "nprobe",
                        "ef_search",
                        "recall@10",
                        "p50_ms",
                        "p99_ms",
                        "build_s",
                        "index_mb",
                    )
                    if key in v
                }
                for k, v in best.items()
            },
        },
        out,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(float(v)) for v in s.split(",")],
        default=None,
        help="corpus sizes, e.g. 1e5,1e6 (default; --quick: 2e4,1e5)",
    )
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument(
        "--cluster-size", type=int, default=1000, help="synthetic vectors per cluster centre"
    )
    parser.add_argument(
        "--noise", type=float, default=1.0, help="noise norm relative to the unit centres"
    )
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall")
    parser.add_argument(
        "--latency-queries", type=int, default=None, help="of those, timed one by one"
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="FAISS OpenMP threads (the target says 2 cores)"
    )
    parser.add_argument(
        "--nprobes", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8, 16, 32, 64]
    )
    parser.add_argument(
        "--pq-nprobes", type=lambda s: [int(v) for v in s.split(",")], default=[8, 16, 32]
    )
    parser.add_argument(
        "--ef-searches", type=lambda s: [int(v) for v in s.split(",")], default=[16, 32, 64, 128]
    )
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument(
        "--hnsw-ef-construction",
        type=int,
        default=40,
        help="HNSW build beam (index.hnsw_ef_construction; 128: better recall, ~5x slower build)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="storage root whose latest index's vectors are the real embeddings",
    )
    parser.add_argument(
        "--ingest",
        default=None,
        help="storage root whose latest ingest's segments are embedded "
        "here as the real embeddings (e.g. /work/data/m21-bench, a rendered corpus)",
    )
    parser.add_argument(
        "--model", default="random", help="with --ingest: the model ref that embeds them"
    )
    parser.add_argument("--skip-real", action="store_true", help="clustered synthetic vectors only")
    parser.add_argument(
        "--real-only", action="store_true", help="real embeddings only (no synthetic sizes)"
    )
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([20_000, 100_000] if args.quick else [100_000, 1_000_000])
    if args.quick:
        args.queries = min(args.queries, 300)
    args.latency_queries = min(args.latency_queries or args.queries, args.queries)
    faiss.omp_set_num_threads(args.threads)
    torch_threads(args.threads)

    out = open(args.out, "a") if args.out else None
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for n in [] if args.real_only else args.sizes:
        x, queries = clustered_vectors(n, args.dim, args.queries, args.cluster_size, args.noise)
        rows += sweep("clustered", x, queries, args, out, build_figures=True)
        del x, queries
    if not args.real_only:
        extrapolate([r for r in rows if r.get("figure") == "build"], 100_000_000, args.dim, out)
        summarize(rows, max(args.sizes), out)
    if not args.skip_real:
        label, x, queries = real_embeddings(
            args.storage, args.queries, ingest_root=args.ingest, model_ref=args.model
        )
        sweep(f"real: {label}", x, queries, args, out, build_figures=False)
    emit(
        {
            "figure": "run",
            "wall_s": round(time.perf_counter() - t_start, 1),
            "sizes": args.sizes,
            "threads": args.threads,
            "faiss": faiss.__version__,
        },
        out,
    )
    if out is not None:
        out.close()
    return 0


def torch_threads(n: int) -> None:
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
