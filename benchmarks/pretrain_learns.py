""" "It learns": pretrain on a small rendered corpus, then compare SSL vs random on the benchmark.

Runs the pipeline stages (``mess_ray.pipeline.run_stage``) with small settings: render
(music21 pieces x expressive styles through FluidSynth) -> ingest -> pretrain (HuBERT-style,
``tiny`` encoder, 2 workers) -> evaluate with ``model_refs=["pretrain"]`` (the style-retrieval
benchmark, which always adds the random-init encoder and descriptor baselines). Prints JSON
lines: the smoothed pretraining loss (first/last/min of a moving average) and each system's
mAP from the eval manifest. About 5-8 minutes on 2 busy cores:

    python -m benchmarks.pretrain_learns [--steps 700] [--root /tmp/learns]

One training run, one split of 3 held-out pieces: the mAP difference here is within noise. For
SSL versus random with error bars (several training seeds and piece splits, a cluster
bootstrap) on a bigger corpus, use ``benchmarks/pretrain_vs_random.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from benchmarks.common import emit_with_load, moving_average
from mess_ray.config import load_config
from mess_ray.pipeline import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=None, help="storage root (default: a temporary folder)")
    parser.add_argument("--pieces", type=int, default=8)
    parser.add_argument("--max-duration-s", type=float, default=12.0)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window (steps)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mess-ray-learns-") as tmp:
        root = args.root or tmp
        cfg = load_config(
            None,
            [
                f"storage.root={root}",
                "audio.window_s=2.0",
                "audio.hop_s=1.0",
                f"render.num_pieces={args.pieces}",
                f"render.max_duration_s={args.max_duration_s}",
                f"model.size={args.size}",
                f"pretrain.steps={args.steps}",
                f"pretrain.batch_size={args.batch_size}",
                f"pretrain.lr={args.lr}",
                "pretrain.warmup_steps=20",
                "pretrain.checkpoint_every=100",
                "pretrain.report_every=25",
                "pretrain.kmeans_sample_frames=20000",
            ],
        )
        timings = {}
        manifests = {}
        for stage in ("render", "ingest", "pretrain"):
            started = time.perf_counter()
            manifests[stage] = run_stage(stage, cfg)
            timings[stage] = round(time.perf_counter() - started, 1)
        history = manifests["pretrain"]["losses"]["history"]
        smooth = moving_average(history, args.smooth)
        emit_with_load(
            {
                "figure": "pretrain_loss",
                "size": args.size,
                "steps": len(history),
                "segments": manifests["pretrain"]["counts"]["segments"],
                "num_clusters": manifests["pretrain"]["counts"]["num_clusters"],
                "chance_loss_ln_k": round(
                    float(np.log(manifests["pretrain"]["counts"]["num_clusters"])), 4
                ),
                "raw_first": round(history[0], 4),
                "smoothed_first": round(float(smooth[args.smooth - 1]), 4),
                "smoothed_last": round(float(smooth[-1]), 4),
                "smoothed_min": round(float(smooth.min()), 4),
                "smooth_window": args.smooth,
                "stage_wall_s": timings,
            }
        )
        started = time.perf_counter()
        evaluation = run_stage("evaluate", cfg, model_refs=["pretrain"])
        metrics = evaluation["metrics"]
        emit_with_load(
            {
                "figure": "eval_map",
                "map": {name: round(m["map"], 4) for name, m in metrics.items()},
                "chance": round(next(iter(metrics.values()))["chance"], 4),
                "ssl_minus_random": round(metrics["pretrain"]["map"] - metrics["random"]["map"], 4)
                if "pretrain" in metrics and "random" in metrics
                else None,
                "held_out_pieces": evaluation["counts"]["held_out_pieces"],
                "queries": evaluation["counts"]["queries"],
                "headline": evaluation["headline"],
                "eval_wall_s": round(time.perf_counter() - started, 1),
            }
        )


if __name__ == "__main__":
    main()
