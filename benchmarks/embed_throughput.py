"""Embedding throughput per CPU worker, and model FLOPs per segment (for GPU projections).

For each encoder size, prints JSON lines (one per figure):

- ``embed_cpu``: ``Embedder.embed`` (what each index actor runs per batch: encoder, pooling,
  projection) on random audio, one intra-op thread like one Ray CPU worker: segments/s and
  seconds of audio per second.
- ``baseline_encoder_only``: the bare transformers encoder forward on the same batches and
  thread count, no pooling or projection: the gap is the embedder's own cost.
- ``flops``: forward FLOPs per segment (``torch.utils.flop_counter``), and training FLOPs per
  sample (forward + backward of the pretraining model, counted with
  benchmarks/train_throughput.py's ``flops_per_sample``), both at this window and rate.

The scaling study (benchmarks/scaling_study.py) reads these lines. Defaults are the cluster
config's audio (24 kHz, 5 s windows). ``python -m benchmarks.embed_throughput [--sizes tiny base]``
Every line carries ``os.getloadavg()``: other jobs on the same cores skew CPU figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import emit_with_load
from mess_ray.config import load_config
from mess_ray.models import Embedder
from mess_ray.models.encoder import build_encoder
from mess_ray.segments import window_samples
from mess_ray.storage import Storage


def timed(fn, batches: list[np.ndarray], warmup: int) -> list[float]:
    """Seconds per batch, after ``warmup`` untimed calls."""
    for batch in batches[:warmup]:
        fn(batch)
    times = []
    for batch in batches[warmup:]:
        started = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - started)
    return times


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
    from benchmarks.train_throughput import flops_per_sample
    from mess_ray.train.pretrain import HubertPretrainModel

    n_mels, k = cfg.pretrain.n_mels, cfg.pretrain.num_clusters
    # FLOPs do not depend on the codebook's values, only on its shape.
    codebook = {
        "centroids": np.random.default_rng(0).standard_normal((k, n_mels)).astype(np.float32),
        "mean": np.zeros(n_mels, np.float32),
        "std": np.ones(n_mels, np.float32),
    }
    model = HubertPretrainModel(
        build_encoder(size, seed=0),
        codebook,
        cfg.audio.sample_rate,
        n_mels,
        cfg.pretrain.mask_prob,
        cfg.pretrain.mask_length,
    )
    audio = torch.from_numpy(
        (0.1 * np.random.default_rng(2).standard_normal((samples, window(cfg)))).astype(np.float32)
    )
    return flops_per_sample(model.train(), audio)


def window(cfg) -> int:
    return window_samples(cfg.audio.window_s, cfg.audio.sample_rate)


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
        ],
    )
    storage = Storage(str(Path(args.workdir) if args.workdir else Path.cwd() / ".bench-unused"))
    embedder = Embedder.from_info(
        cfg, storage, {"ref": "random", "kind": "random", "size": size, "seed": 0}
    )
    rng = np.random.default_rng(0)
    batches = [
        (0.1 * rng.standard_normal((args.batch_size, window(cfg)))).astype(np.float32)
        for _ in range(args.warmup + args.batches)
    ]
    common = {
        "size": size,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "window_s": cfg.audio.window_s,
        "sample_rate": cfg.audio.sample_rate,
        "parameters": sum(p.numel() for p in embedder.model.parameters()),
    }

    times = timed(embedder.embed, batches, args.warmup)
    per_batch = statistics.median(times)
    emit_with_load(
        {
            "figure": "embed_cpu",
            **common,
            "batches_timed": len(times),
            "batch_s_median": round(per_batch, 4),
            "segments_per_s": round(args.batch_size / per_batch, 3),
            "audio_s_per_s": round(args.batch_size * cfg.audio.window_s / per_batch, 2),
        },
        out,
    )

    encoder = build_encoder(size, seed=0).eval()

    def encoder_only(batch: np.ndarray) -> None:
        with torch.inference_mode():
            encoder(torch.from_numpy(batch))

    base = statistics.median(timed(encoder_only, batches, args.warmup))
    emit_with_load(
        {
            "figure": "baseline_encoder_only",
            **common,
            "batch_s_median": round(base, 4),
            "segments_per_s": round(args.batch_size / base, 3),
            "embedder_over_encoder_ratio": round(per_batch / base, 3),
        },
        out,
    )

    one = torch.from_numpy(batches[0][:1])
    fwd = forward_flops(embedder.model, one)
    trn = train_flops(size, cfg, samples=1)
    emit_with_load(
        {
            "figure": "flops",
            **common,
            "forward_flops_per_segment": fwd,
            "train_flops_per_sample": trn,
            "train_over_forward": round(trn / fwd, 3),
            "forward_gflops_per_audio_s": round(fwd / cfg.audio.window_s / 1e9, 3),
            "cpu_achieved_gflops_per_thread": round(fwd * args.batch_size / per_batch / 1e9, 3),
        },
        out,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=3, help="timed batches")
    parser.add_argument("--warmup", type=int, default=1)
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
    parser.add_argument("--out", default=None, help="also write the JSON lines to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: list[dict] = []
    for size in args.sizes:
        bench_size(size, args, out)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in out))


if __name__ == "__main__":
    main()
