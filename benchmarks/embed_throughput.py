"""Embedding throughput per CPU worker, old vs new path, and model FLOPs per segment.

For each encoder size, prints JSON lines (one per figure):

- ``embed_cpu_baseline``: the previous inference path (plain float32 module forward, the
  HuBERT conv front end as torch convolutions), ``Embedder(fast=False, precision="float32")``.
- ``embed_cpu``: today's ``Embedder.embed`` (what each index actor and the service's upload
  path run per batch): conv front end as GEMMs with the first layer's GroupNorm folded in, and,
  where the CPU has native bf16 and the encoder is wide (``--precision``, default
  ``model.inference_precision: auto``), bf16 GEMMs in the front end after its first layer and
  the transformer under bf16 autocast (LayerNorm, softmax, residuals and the first conv layer
  with its folded norm in float32); ``bfloat16`` does so for any encoder.
  Both on the same piano-like segments (varied notes, loudness and noise), one intra-op thread
  like one Ray CPU worker; each gives segments per CPU-second (process CPU time, robust to other
  load on the machine) and per wall second, and ``speedup_per_cpu_s`` = new / old.
- ``retrieval_agreement``: recall@10 of the new vectors' cosine neighbours against the old
  vectors' (each segment queries the others), and the smallest old-vs-new cosine.
- ``flops``: forward FLOPs per segment (``torch.utils.flop_counter``), and training FLOPs per
  sample (forward + backward of the pretraining model, counted with
  benchmarks/train_throughput.py's ``flops_per_sample``), both at this window and rate.

The scaling study (benchmarks/scaling_study.py) reads these lines. Defaults are the cluster
config's audio (24 kHz, 5 s windows).
``python -m benchmarks.embed_throughput [--sizes tiny base] [--segments tiny=256 base=48]``
``--content-timeline`` adds ``content_timeline`` (the shipped default's appended timelines, one
segment per call against a batch per call) and ``embed_cpu_shipped`` (that embedder against its
source model without the part), and where the default declares query lags ``query_lags_shipped``
(a query's CPU: its vectors at every lag, against embedding it for the index; and the timelines
at the lags read from one computation on their grid against computed lag by lag, with the
smallest and mean cosine between the two).
Every line carries ``os.getloadavg()``: other jobs on the same cores skew wall figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import emit_with_load as emit
from mess_ray.config import load_config
from mess_ray.models import Embedder, MeanPooledEncoder
from mess_ray.models.encoder import build_encoder
from mess_ray.segments import window_samples
from mess_ray.storage import Storage


def forward_flops(model: torch.nn.Module, batch: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # no_grad, not inference_mode: the encoder's weight-normed positional conv recomputes its
    # weight on access, which the FLOP counter cannot trace on inference tensors.
    with counter, torch.no_grad():
        model(batch)
    return counter.get_total_flops() / batch.shape[0]


def train_flops(size: str, cfg, samples: int) -> float:
    """Forward+backward FLOPs per sample of the pretraining model (train_throughput's counter)."""
    from benchmarks.train_throughput import flops_per_sample, make_model, random_codebook

    model = make_model(size, random_codebook(cfg), cfg)
    audio = torch.from_numpy(
        (0.1 * np.random.default_rng(2).standard_normal((samples, window(cfg)))).astype(np.float32)
    )
    return flops_per_sample(model.train(), audio)


def window(cfg) -> int:
    return window_samples(cfg.audio.window_s, cfg.audio.sample_rate)


def piano_like_segments(count: int, length: int, rate: int, seed: int) -> np.ndarray:
    """[count, length] float32 clips of decaying harmonic notes at random pitches, onsets,
    loudness and noise levels: varied enough that nearest neighbours are meaningful."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / rate
    out = np.zeros((count, length), np.float32)
    for i in range(count):
        clip = np.zeros(length)
        onset = 0.0
        spacing, decay = rng.uniform(0.08, 0.7), rng.uniform(1.0, 8.0)
        while onset < t[-1]:
            pitch = 440.0 * 2 ** ((rng.integers(36, 90) - 69) / 12)
            local = np.clip(t - onset, 0.0, None)
            env = (t >= onset) * np.exp(-decay * local) * rng.uniform(0.1, 1.0)
            clip += env * sum(np.sin(2 * np.pi * pitch * h * local) / h**1.5 for h in (1, 2, 3, 4))
            onset += spacing * rng.uniform(0.5, 1.5)
        clip *= rng.uniform(0.02, 0.5) / (np.abs(clip).max() + 1e-9)
        out[i] = clip + rng.uniform(1e-4, 2e-2) * rng.standard_normal(length)
    return out


def embed_all(embedder: Embedder, segments: np.ndarray, batch_size: int, warmup: int):
    """(vectors, CPU seconds, wall seconds) of embedding ``segments`` batch by batch."""
    embedder.embed(segments[:batch_size])  # allocator, oneDNN kernels: untimed
    for _ in range(warmup - 1):
        embedder.embed(segments[:batch_size])
    cpu, wall = time.process_time(), time.perf_counter()
    vectors = np.concatenate(
        [
            embedder.embed(segments[start : start + batch_size])
            for start in range(0, len(segments), batch_size)
        ]
    )
    return vectors, time.process_time() - cpu, time.perf_counter() - wall


def recall_at_k(old: np.ndarray, new: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each segment's k cosine neighbours (itself excluded), new vs old."""

    def neighbours(vectors: np.ndarray) -> np.ndarray:
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        sims = unit @ unit.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    a, b = neighbours(old), neighbours(new)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def bench_size(size: str, args, out: list[dict]) -> None:
    cfg = load_config(
        None,
        [
            f"audio.sample_rate={args.sample_rate}",
            f"audio.window_s={args.window_s}",
            f"audio.hop_s={args.window_s / 2}",
            f"model.size={size}",
            f"model.inference_batch_size={args.batch_size}",
            f"pretrain.num_clusters={args.clusters}",
            f"model.inference_precision={args.precision}",
        ],
    )
    storage = Storage(str(Path(args.workdir) if args.workdir else Path.cwd() / ".bench-unused"))
    info = {"ref": "random", "kind": "random", "size": size, "seed": 0}
    embedder = Embedder.from_info(cfg, storage, info)
    # The previous path on its own copy of the same weights (the fast path patches its model).
    old = Embedder(
        MeanPooledEncoder(build_encoder(size, seed=0), cfg.model.ssl_layer),
        embedder.dim,
        embedder.info,
        embedder.window_samples,
        args.batch_size,
        precision="float32",
        fast=False,
    )
    count = args.segments.get(size, 64)
    segments = piano_like_segments(count, window(cfg), cfg.audio.sample_rate, seed=0)
    common = {
        "size": size,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "window_s": cfg.audio.window_s,
        "sample_rate": cfg.audio.sample_rate,
        "segments": count,
        "parameters": sum(p.numel() for p in embedder.model.parameters()),
    }
    figures = {}
    for name, emb in (("embed_cpu_baseline", old), ("embed_cpu", embedder)):
        vectors, cpu, wall = embed_all(emb, segments, args.batch_size, args.warmup)
        figures[name] = (vectors, cpu)
        emit(
            {
                "figure": name,
                **common,
                "fast_front_end": emb.fast,
                "front_end_dtype": str(emb.front_end_dtype).removeprefix("torch."),
                "autocast_dtype": str(emb.dtype).removeprefix("torch."),
                "cpu_s": round(cpu, 3),
                "wall_s": round(wall, 3),
                "segments_per_cpu_s": round(count / cpu, 3),
                "segments_per_s": round(count / wall, 3),
                "audio_s_per_cpu_s": round(count * cfg.audio.window_s / cpu, 2),
                **(
                    {"speedup_per_cpu_s": round(figures["embed_cpu_baseline"][1] / cpu, 2)}
                    if name == "embed_cpu"
                    else {}
                ),
            },
            out,
        )
    old_vectors, new_vectors = figures["embed_cpu_baseline"][0], figures["embed_cpu"][0]
    cosine = np.sum(old_vectors * new_vectors, axis=1) / (
        np.linalg.norm(old_vectors, axis=1) * np.linalg.norm(new_vectors, axis=1)
    )
    emit(
        {
            "figure": "retrieval_agreement",
            **common,
            "recall_at_10_new_vs_old": round(recall_at_k(old_vectors, new_vectors, 10), 4),
            "min_cosine_new_vs_old": round(float(cosine.min()), 6),
        },
        out,
    )
    per_batch = args.batch_size * figures["embed_cpu"][1] / count

    one = torch.from_numpy(segments[:1])
    fwd = forward_flops(embedder.model, one)
    trn = train_flops(size, cfg, samples=1)
    emit(
        {
            "figure": "flops",
            **common,
            "forward_flops_per_segment": fwd,
            "train_flops_per_sample": trn,
            "train_over_forward": round(trn / fwd, 3),
            "forward_gflops_per_audio_s": round(fwd / cfg.audio.window_s / 1e9, 3),
            "cpu_achieved_gflops_per_cpu_s": round(fwd * args.batch_size / per_batch / 1e9, 3),
        },
        out,
    )


def bench_content_timeline(args, out: list[dict]) -> None:
    """The shipped default's appended content timeline (``--content-timeline``), at the shipped
    models' audio (16 kHz, 4 s): the timelines one segment per librosa call (the previous path:
    the CQT filters built for every segment) against a batch per call (today's), the largest
    difference between the two, and the shipped default embedder against its source model
    (the same weights without the part), each in segments per CPU-second."""
    from mess_ray.content import timeline_variants, timelines
    from mess_ray.models import shipped

    name = shipped.DEFAULT_SHIPPED
    rates = shipped.declared_content_timeline(name)
    source = shipped.shipped_manifest(name).get("weights_of")
    if not rates or not source:
        raise SystemExit(f"--content-timeline: the default {name} declares no content timeline")
    storage = Storage(str(Path(args.workdir) if args.workdir else Path.cwd() / ".bench-unused"))
    cfg = load_config(None, [f"model.inference_batch_size={args.batch_size}"])
    count = args.segments.get("timeline", 128)
    segments = piano_like_segments(count, window(cfg), cfg.audio.sample_rate, seed=0)
    pair = (rates["chroma_rate"], rates["onset_rate"])
    common = {
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "window_s": cfg.audio.window_s,
        "sample_rate": cfg.audio.sample_rate,
        "segments": count,
        "rates": list(pair),
    }
    timelines(segments[:2], cfg.audio.sample_rate, *pair)  # imports, caches: untimed
    cpu = time.process_time()
    alone = np.concatenate([timelines(x[None], cfg.audio.sample_rate, *pair) for x in segments])
    cpu_alone = time.process_time() - cpu
    cpu = time.process_time()
    batched = np.concatenate(
        [
            timelines(segments[i : i + args.batch_size], cfg.audio.sample_rate, *pair)
            for i in range(0, count, args.batch_size)
        ]
    )
    cpu_batched = time.process_time() - cpu
    emit(
        {
            "figure": "content_timeline",
            **common,
            "per_segment_cpu_ms": round(1e3 * cpu_alone / count, 2),
            "batched_cpu_ms": round(1e3 * cpu_batched / count, 2),
            "speedup_per_cpu_s": round(cpu_alone / cpu_batched, 2),
            "max_abs_difference": float(np.abs(alone - batched).max()),
        },
        out,
    )
    figures = {}
    for ref in (source, name):
        embedder = Embedder.from_ref(cfg, storage, f"shipped:{ref}")
        _, cpu, wall = embed_all(embedder, segments, args.batch_size, args.warmup)
        figures[ref] = cpu
        emit(
            {
                "figure": "embed_cpu_shipped",
                **common,
                "model": ref,
                "content_timeline": embedder.info["content_timeline"],
                "cpu_s": round(cpu, 3),
                "wall_s": round(wall, 3),
                "segments_per_cpu_s": round(count / cpu, 3),
                **({"cost_over_source": round(cpu / figures[source], 2)} if ref == name else {}),
            },
            out,
        )
    if len(embedder.query_shifts_ms) > 1:
        # A query's cost at the default's lags: its vectors, then the timeline at every lag.
        cpu = time.process_time()
        variants = np.concatenate(
            [
                embedder.embed_query(segments[i : i + args.batch_size])
                for i in range(0, count, args.batch_size)
            ],
            axis=1,
        )
        cpu_query = time.process_time() - cpu
        # The timeline part alone, read from one computation on the lags' grid (what the query
        # above did) against computing every lag on its own, on the same segments.
        moved = [ms for ms in embedder.query_shifts_ms if ms != 0]
        costs, parts = {}, {}
        for on_grid in (False, True):
            cpu = time.process_time()
            parts[on_grid] = np.concatenate(
                [
                    timeline_variants(
                        segments[i : i + args.batch_size],
                        cfg.audio.sample_rate,
                        moved,
                        *pair,
                        on_grid=on_grid,
                    )
                    for i in range(0, count, args.batch_size)
                ],
                axis=1,
            )
            costs[on_grid] = time.process_time() - cpu
        cos = np.sum(parts[True] * parts[False], -1) / np.maximum(
            np.linalg.norm(parts[True], axis=-1) * np.linalg.norm(parts[False], axis=-1), 1e-12
        )
        emit(
            {
                "figure": "query_lags_shipped",
                **common,
                "model": name,
                "lags": len(embedder.query_shifts_ms),
                "lag_range_ms": [min(embedder.query_shifts_ms), max(embedder.query_shifts_ms)],
                "query_cpu_ms_per_segment": round(1e3 * cpu_query / count, 2),
                "index_cpu_ms_per_segment": round(1e3 * figures[name] / count, 2),
                "query_cost_over_index": round(cpu_query / figures[name], 2),
                "variants_shape": list(variants.shape),
                "timeline_lag_by_lag_cpu_ms_per_segment": round(1e3 * costs[False] / count, 2),
                "timeline_on_grid_cpu_ms_per_segment": round(1e3 * costs[True] / count, 2),
                "on_grid_speedup_per_cpu_s": round(costs[False] / costs[True], 2),
                "on_grid_vs_lag_by_lag_min_cosine": round(float(cos.min()), 5),
                "on_grid_vs_lag_by_lag_mean_cosine": round(float(cos.mean()), 5),
            },
            out,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    parser.add_argument(
        "--batch-size", type=int, default=16, help="model.inference_batch_size's default"
    )
    parser.add_argument(
        "--segments",
        nargs="+",
        default=["tiny=256", "small=64", "base=48"],
        help="SIZE=N segments embedded per size (old and new path, and recall@10 over them)",
    )
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per path")
    parser.add_argument("--window-s", type=float, default=5.0)
    parser.add_argument("--sample-rate", type=int, default=24000)
    parser.add_argument(
        "--clusters", type=int, default=500, help="k-means codebook size (configs/cluster.yaml)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (one Ray CPU worker: 1)"
    )
    parser.add_argument(
        "--workdir", default=None, help="unused storage root for the random embedder"
    )
    parser.add_argument(
        "--content-timeline",
        action="store_true",
        help="also the shipped default's content timeline: batched vs per segment, and the "
        "embedder against its source model (segments: timeline=N, default 128)",
    )
    parser.add_argument("--out", default=None, help="also write the JSON lines to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.segments = {k: int(v) for k, v in (item.split("=") for item in args.segments)}
    out: list[dict] = []
    for size in args.sizes:
        bench_size(size, args, out)
    if args.content_timeline:
        bench_content_timeline(args, out)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in out))


if __name__ == "__main__":
    main()
