"""Does self-supervised pretraining beat a random-initialised encoder? Measured with error bars.

For each training seed ``s`` (``--train-seeds``): pretrain the encoder on every ingested segment
(``run_stage("pretrain")``: Ray Train, HuBERT-style masked prediction, ``model.seed = s`` so the
encoder *starts* from the random encoder with seed ``s``), then embed every labelled segment
with the SSL encoder and with its own random initialisation (the baseline beside it). Style
retrieval (the protocol of :mod:`mess_ray.eval.benchmark`: relevant = same style, other piece;
candidates = other tracks) is scored on the held-out pieces of several piece splits
(``--holdout-seeds``, each ``eval.holdout_fraction`` of the pieces).

Error bars:
- ``diff_over_seeds``: mean +- std over training seeds of mAP(SSL) - mAP(random);
- ``diff_ci95``: a paired, stratified cluster bootstrap: within every (training seed, split),
  resample held-out *tracks* with replacement (the segments of a track are correlated, so the
  track, not the segment, is the unit), average the per-query AP difference; 95 % interval of
  the mean over all (seed, split) strata.

Every hidden layer is scored from one forward pass (mean over time per layer), plus the mean
of the L2-normalised layer vectors (``layer_mean``); the headline is the layer the pipeline's
``Embedder`` pools (``model.ssl_layer``), and the script checks its vectors against
``Embedder.from_ref`` so the figure is the pipeline's own.

SSL sees no labels, so by default it trains on every segment, held-out pieces included (as
``mess-ray pretrain`` does). ``--set pretrain.exclude_eval_holdout=true`` leaves the pieces of the
``eval.seed`` split out of pretraining and then scores that split only: the SSL encoder is
measured on music it never heard.

Usage (the ingest artifact of ``--root`` is used; without one, a corpus is rendered and
ingested there first)::

    nice -n 10 python -m benchmarks.pretrain_vs_random --root /work/data/m21-ssl \
        --steps 400 --train-seeds 0 1 2 --set pretrain.lr=2e-3

Finished runs are reused (their run name hashes the settings), so re-running only evaluates.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time

import numpy as np
import torch

from benchmarks.common import cluster_bootstrap_ci, emit_with_load, moving_average
from mess_ray.config import MessRayConfig, load_config
from mess_ray.eval import metrics
from mess_ray.eval.benchmark import build_protocol
from mess_ray.models.encoder import build_encoder, load_encoder, normalize_waveform
from mess_ray.segments import (
    METADATA_COLUMNS,
    decode_audio,
    fit_length,
    segments_dataset,
    split_pieces,
    window_samples,
)
from mess_ray.storage import Storage


# -- pure pieces ----------------------------------------------------------------------------
def layer_embeddings(encoder, audio: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Mean-over-time vector of every hidden state: float32 [num_layers + 1, N, D].

    Same preprocessing as the pipeline's ``MeanPooledEncoder`` (per-clip normalisation).
    """
    encoder = encoder.eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(audio), batch_size):
            waveform = torch.from_numpy(
                np.ascontiguousarray(audio[start : start + batch_size], dtype=np.float32)
            )
            states = encoder(normalize_waveform(waveform), output_hidden_states=True).hidden_states
            chunks.append(torch.stack([h.mean(dim=1).float() for h in states]).numpy())
    return np.concatenate(chunks, axis=1)


def with_layer_mean(per_layer: np.ndarray) -> dict[str, np.ndarray]:
    """{"layer0": [N, D], ..., "layer_mean": mean of the L2-normalised layer vectors}."""
    unit = per_layer / np.maximum(np.linalg.norm(per_layer, axis=-1, keepdims=True), 1e-12)
    systems = {f"layer{i}": per_layer[i] for i in range(per_layer.shape[0])}
    systems["layer_mean"] = unit.mean(axis=0)
    return systems


def per_query_ap(embeddings: np.ndarray, track_ids, piece_ids, styles) -> tuple[np.ndarray, float]:
    """Style-retrieval AP of every query (NaN: no relevant candidate) and the chance mAP."""
    protocol = build_protocol(track_ids, piece_ids, styles)
    x = np.asarray(embeddings, dtype=np.float64)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    ap = metrics.average_precision(unit @ unit.T, protocol.relevant, protocol.candidates)
    chance = float(np.nanmean(metrics.chance_level(protocol.relevant, protocol.candidates)))
    return ap, chance


# -- corpus, training ------------------------------------------------------------------------
def labelled_segments(cfg: MessRayConfig, storage: Storage) -> dict[str, np.ndarray]:
    """Every segment with a piece and a style, audio fitted to the model window, by segment id."""
    import pyarrow.compute as pc

    version = storage.require_latest("ingest")
    table = segments_dataset(storage, version).to_table(
        columns=[*METADATA_COLUMNS, "audio"],
        filter=(pc.field("piece_id") != "") & (pc.field("style") != ""),
    )
    table = table.sort_by("segment_id")
    if table.num_rows == 0:
        raise ValueError(f"ingest {version} has no segment with both a piece and a style label")
    window = window_samples(cfg.audio.window_s, cfg.audio.sample_rate)
    return {
        "ingest": version,
        "segment_ids": table["segment_id"].to_numpy(),
        "track_ids": np.asarray(table["track_id"].to_pylist(), dtype=object),
        "piece_ids": np.asarray(table["piece_id"].to_pylist(), dtype=object),
        "styles": np.asarray(table["style"].to_pylist(), dtype=object),
        "audio": np.stack(
            [fit_length(decode_audio(b), window) for b in table["audio"].to_pylist()]
        ),
    }


def run_name_for(overrides: list[str], steps: int, seed: int, ingest: str) -> str:
    key = json.dumps({"set": sorted(overrides), "steps": steps, "seed": seed, "ingest": ingest})
    return f"vsrandom-s{seed}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def pretrain_seed(
    base_overrides: list[str], steps: int, seed: int, ingest: str
) -> tuple[MessRayConfig, dict]:
    """Pretrain (or reuse a finished run of the same settings); returns its config and manifest."""
    from mess_ray.pipeline import run_stage

    name = run_name_for(base_overrides, steps, seed, ingest)
    cfg = load_config(
        None,
        [
            *base_overrides,
            f"pretrain.steps={steps}",
            f"pretrain.seed={seed}",
            f"model.seed={seed}",
            f"pretrain.run_name={name}",
        ],
    )
    storage = Storage.from_config(cfg.storage)
    if storage.exists("pretrain", name, "manifest.json"):
        return cfg, storage.read_json(f"pretrain/{name}/manifest.json")
    return cfg, run_stage("pretrain", cfg)


def ensure_corpus(args, overrides: list[str]) -> None:
    from mess_ray.pipeline import run_stage

    cfg = load_config(
        None,
        [
            *overrides,
            f"render.num_pieces={args.pieces}",
            f"render.max_duration_s={args.max_duration_s}",
        ],
    )
    if Storage.from_config(cfg.storage).latest("ingest") is None:
        for stage in ("render", "ingest"):
            run_stage(stage, cfg)


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", required=True, help="storage root holding (or receiving) an ingest artifact"
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--holdout-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--pieces", type=int, default=16, help="only when --root has no ingest yet")
    parser.add_argument(
        "--max-duration-s", type=float, default=24.0, help="only when --root has no ingest yet"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run (e.g. pretrain.lr=2e-3); repeatable",
    )
    parser.add_argument("--smooth", type=int, default=25, help="loss moving-average window (steps)")
    parser.add_argument(
        "--existing",
        nargs="+",
        default=None,
        metavar="RUN",
        help="evaluate these finished pretrain artifacts of --root instead of training "
        "(each is paired with the random encoder of its own model.seed)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="with two --existing runs: also the paired difference SSL(first) - SSL(second) "
        "(same queries, same bootstrap), to compare two objectives",
    )
    args = parser.parse_args()

    base = [
        f"storage.root={args.root}",
        "pretrain.warmup_steps=20",
        "pretrain.checkpoint_every=100",
        "pretrain.report_every=25",
        *args.overrides,
    ]
    ensure_corpus(args, base)
    cfg0 = load_config(None, base)
    storage = Storage.from_config(cfg0.storage)
    data = labelled_segments(cfg0, storage)
    pieces = sorted(set(data["piece_ids"]))
    if cfg0.pretrain.exclude_eval_holdout:
        # Pretraining left out exactly the eval.seed split: only that split is unseen audio.
        args.holdout_seeds = [cfg0.eval.seed]
    splits = {}
    for h in args.holdout_seeds:
        _, held = split_pieces(pieces, cfg0.eval.holdout_fraction, h)
        splits[h] = np.isin(data["piece_ids"], held)

    # results[(job, holdout seed)][system][layer] -> per-query AP [queries of that split]
    results: dict[tuple[int, int], dict[str, dict[str, np.ndarray]]] = {}
    chance: dict[int, float] = {}
    headline_layer = None
    jobs = (
        [(None, run) for run in args.existing]
        if args.existing
        else [(seed, None) for seed in args.train_seeds]
    )
    train_seeds, runs = [], []
    for job, (seed, run) in enumerate(jobs):
        started = time.perf_counter()
        if run is None:
            cfg, manifest = pretrain_seed(base, args.steps, seed, data["ingest"])
        else:
            manifest = storage.read_json(f"pretrain/{run}/manifest.json")
            seed = int(manifest["config"]["model"]["seed"])
            cfg = load_config(
                None,
                [*base, f"model.seed={seed}", f"model.size={manifest['config']['model']['size']}"],
            )
        train_seeds.append(seed)
        train_s = round(time.perf_counter() - started, 1)
        history = manifest["losses"]["history"]
        smooth = moving_average(history, args.smooth)
        runs.append(manifest["version"])
        emit_with_load(
            {
                "figure": "pretrain_loss",
                "train_seed": seed,
                "run": manifest["version"],
                "steps": len(history),
                "num_clusters": manifest["counts"]["num_clusters"],
                "chance_loss_ln_k": round(float(np.log(manifest["counts"]["num_clusters"])), 4),
                "smoothed_first": round(float(smooth[min(args.smooth, len(smooth)) - 1]), 4),
                "smoothed_last": round(float(smooth[-1]), 4),
                "wall_s": train_s,
                "objective": manifest["config"]["pretrain"].get("targets", "logmel"),
            }
        )
        with storage.local_dir(f"pretrain/{manifest['version']}/model") as folder:
            ssl_encoder = load_encoder(folder)
        encoders = {"ssl": ssl_encoder, "random": build_encoder(cfg.model.size, seed=seed)}
        from mess_ray.models import Embedder
        from mess_ray.models.embedder import resolve_layer

        headline_layer = (
            f"layer{resolve_layer(ssl_encoder.config.num_hidden_layers, cfg.model.ssl_layer)}"
        )
        per_system = {}
        for name, encoder in encoders.items():
            per_system[name] = with_layer_mean(layer_embeddings(encoder, data["audio"]))
        # The headline layer must be the pipeline's own vectors (Embedder, as evaluate/serve use).
        probe = data["audio"][:8]
        pipeline = Embedder.from_ref(
            cfg, storage, f"{args.root}/pretrain/{manifest['version']}/model"
        )
        mine = per_system["ssl"][headline_layer][:8]
        mine = mine / np.linalg.norm(mine, axis=1, keepdims=True)
        if not np.allclose(pipeline.embed(probe), mine, atol=1e-4):
            raise RuntimeError("benchmark embeddings differ from the pipeline Embedder's")
        for h, mask in splits.items():
            labels = (data["track_ids"][mask], data["piece_ids"][mask], data["styles"][mask])
            results[(job, h)] = {}
            for name, systems in per_system.items():
                results[(job, h)][name] = {}
                for layer, vectors in systems.items():
                    ap, chance[h] = per_query_ap(vectors[mask], *labels)
                    results[(job, h)][name][layer] = ap

    layers = list(next(iter(results.values()))["ssl"])
    for layer in layers:
        strata = [
            (
                results[k]["ssl"][layer] - results[k]["random"][layer],
                data["track_ids"][splits[k[1]]],
            )
            for k in results
        ]
        diff, lo, hi = cluster_bootstrap_ci(strata, args.bootstrap)
        by_seed = {
            name: [
                float(
                    np.mean(
                        [np.nanmean(results[(job, h)][name][layer]) for h in args.holdout_seeds]
                    )
                )
                for job in range(len(jobs))
            ]
            for name in ("ssl", "random")
        }
        seed_diffs = np.subtract(by_seed["ssl"], by_seed["random"])
        emit_with_load(
            {
                "figure": "ssl_vs_random_map",
                "layer": layer,
                "headline": layer == headline_layer,
                "map_ssl": round(float(np.mean(by_seed["ssl"])), 4),
                "map_random": round(float(np.mean(by_seed["random"])), 4),
                "map_ssl_by_seed": [round(x, 4) for x in by_seed["ssl"]],
                "map_random_by_seed": [round(x, 4) for x in by_seed["random"]],
                "diff": round(diff, 4),
                "diff_ci95": [round(lo, 4), round(hi, 4)],
                "diff_over_seeds": {
                    "mean": round(float(seed_diffs.mean()), 4),
                    "std": round(float(seed_diffs.std(ddof=1)) if len(seed_diffs) > 1 else 0.0, 4),
                },
                "chance": round(float(np.mean(list(chance.values()))), 4),
                "train_seeds": train_seeds,
                "runs": runs,
                "holdout_seeds": args.holdout_seeds,
                "queries_per_split": [int(splits[h].sum()) for h in args.holdout_seeds],
                "held_out_pieces_per_split": [
                    int(len(set(data["piece_ids"][splits[h]]))) for h in args.holdout_seeds
                ],
                "steps": len(history),
                "overrides": args.overrides,
            }
        )

    if args.paired:
        if len(jobs) != 2:
            raise ValueError("--paired compares exactly two --existing runs")
        for layer in layers:
            strata = [
                (
                    results[(0, h)]["ssl"][layer] - results[(1, h)]["ssl"][layer],
                    data["track_ids"][splits[h]],
                )
                for h in args.holdout_seeds
            ]
            diff, lo, hi = cluster_bootstrap_ci(strata, args.bootstrap)
            emit_with_load(
                {
                    "figure": "ssl_run_vs_run_map",
                    "layer": layer,
                    "headline": layer == headline_layer,
                    "first": runs[0],
                    "second": runs[1],
                    "diff": round(diff, 4),
                    "diff_ci95": [round(lo, 4), round(hi, 4)],
                    "holdout_seeds": args.holdout_seeds,
                }
            )


if __name__ == "__main__":
    main()
