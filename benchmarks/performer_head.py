"""Can anything *learn* who is playing? (issue 20): heads trained with performer positives
(the same pianist in another *training* piece: :func:`mess_ray.train.losses.performer_infonce`)
on top of each input the protocol already scores, then the protocol's own tasks on the
held-out pieces. One JSON line per figure.

    python -m benchmarks.performer_head --set storage.root=<protocol corpus with models> \\
        --models finetune pretrain --cache /tmp/ph-cache          # validation (choose here)
    python -m benchmarks.performer_head ... --split test            # once, at the end

Every head is the protocol's learned descriptor head (:func:`mess_ray.eval.baselines.
train_descriptor_head`: an MLP with fine-tuning's mined-label InfoNCE and performed-MIDI KL)
plus the performer term with weight ``--weight``, trained on a seeded sample of training-piece
segments (every training chain; the test-side pianists' tracks left out as training leaves them
out) and applied to the held-out segments. Inputs: the hand-crafted descriptors, the same with
chain-normalised levels (``+rec-rel``), the performed-MIDI descriptors (a symbolic reference:
it reads the score-aligned MIDI, not the audio), and each model's frozen vectors. The plain
systems (the protocol's baselines and each model as it is) are scored in the same run, on the
same segments, with the same bootstrap; the paired verdicts are against ``--reference``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys

import numpy as np

from benchmarks.common import cached_arrays, emit_with_load, protocol_store

PIANIST = "+pianist"


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else str(p).encode())
    return h.hexdigest()[:12]


def sample_with_audio(cfg, storage, version, perf, rows, tracks, size: int, seed: int):
    """A seeded sample of ``size`` of ``rows`` of a performance set, with its audio read and each
    row's pianist (``tracks``: :func:`mess_ray.splits.track_pianists`)."""
    from mess_ray.eval.protocol import _read_audio

    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(rows, min(size, len(rows)), replace=False))
    mask = np.zeros(len(perf), dtype=bool)
    mask[chosen] = True
    sample = dataclasses.replace(perf, audio=np.zeros((len(perf), 0), np.float32)).subset(mask)
    sample.audio = _read_audio(
        storage, version, sample.segment_ids, cfg.audio.sample_rate, cfg.audio.window_s
    )
    pianists = np.array([tracks.get(t, ("", ""))[1] for t in sample.track_ids], dtype=object)
    return sample, pianists


def concat_sets(a, b):
    """Two :class:`mess_ray.performances.PerformanceSet` objects as one (arrays end to end)."""
    out = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            out[f.name] = np.concatenate([x, y])
        elif isinstance(x, dict):
            out[f.name] = {**x, **y}
        else:
            out[f.name] = list(x) + [v for v in y if v not in x]
    return type(a)(**out)


def extra_training_sample(cfg, root: str, base_tracks, size: int, seed: int):
    """Training segments from another rendered corpus (``--extra-train``): every piece of it that
    the protocol corpus does not hold (so no validation or test piece), never a test-side
    pianist's track (the same hash rule, :func:`mess_ray.splits.split_by_pianist`, over the
    pianists of both corpora); a seeded sample of ``size`` with audio and pianists."""
    from mess_ray.performances import load_performance_set
    from mess_ray.splits import read_track_pianists, split_by_pianist
    from mess_ray.storage import Storage

    storage = Storage(root)
    version = storage.require_latest("ingest")
    tracks = read_track_pianists(storage, version)
    base_pieces = {piece for piece, _ in base_tracks.values()}
    names = {p for _, p in [*tracks.values(), *base_tracks.values()] if p}
    test_side = set()
    if cfg.eval.test_pianist_fraction > 0 and names:
        test_side = set(split_by_pianist(names, cfg.eval.test_pianist_fraction, cfg.eval.seed).test)
    parts = [
        load_performance_set(
            storage,
            version,
            cfg.eval.holdout_fraction,
            cfg.eval.seed,
            cfg.audio.sample_rate,
            cfg.audio.window_s,
            pieces=side,
            with_audio=False,
        )
        for side in ("train", "holdout")
    ]
    perf = parts[0] if parts[1] is None else concat_sets(*parts) if parts[0] else parts[1]
    keep = np.array(
        [
            piece not in base_pieces and tracks.get(t, ("", ""))[1] not in test_side
            for t, piece in zip(perf.track_ids, perf.piece_ids)
        ]
    )
    return sample_with_audio(cfg, storage, version, perf, np.flatnonzero(keep), tracks, size, seed)


def fit_zscore(train_x: np.ndarray, held_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both matrices z-scored by the training sample's statistics (NaN: the column mean)."""
    from mess_ray.descriptors import impute_columns, zscore

    train_z, mean, std = zscore(impute_columns(train_x))
    held = np.asarray(held_x, dtype=np.float64)
    held = (np.where(np.isnan(held), mean, held) - mean) / np.where(std > 1e-12, std, 1.0)
    return train_z.astype(np.float32), held.astype(np.float32)


def fit_map(vectors: np.ndarray, pianists: np.ndarray, pieces: np.ndarray) -> float:
    """Performer identity mAP *on the training sample itself* (same pianist, other piece; other
    pieces' rows are the candidates): whether a head learnt its training pianists at all, as
    against carrying them over to unseen pieces."""
    from mess_ray.eval.metrics import mean_average_precision

    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    known = np.asarray([bool(p) for p in pianists])
    other = pieces[:, None] != pieces[None, :]
    relevant = other & (pianists[:, None] == pianists[None, :]) & known[:, None] & known[None, :]
    queries = relevant.any(axis=1)
    if not queries.any():
        return float("nan")
    return mean_average_precision(
        (v @ v.T)[queries], relevant[queries].astype(float), other[queries]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/protocol.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--models", nargs="*", default=["finetune"], help="model refs or folders")
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--cache", default="", help="folder for features and vectors (reused)")
    parser.add_argument("--boot", type=int, default=300, help="bootstrap draws")
    parser.add_argument("--weight", type=float, nargs="+", default=[1.0], help="performer term")
    parser.add_argument("--steps", type=int, default=600, help="head training steps")
    parser.add_argument("--train-segments", type=int, default=3000)
    parser.add_argument(
        "--extra-train",
        default="",
        help="storage root of another rendered corpus: its pieces that the protocol corpus "
        "does not hold add training segments (--extra-segments of them; no test-side pianist)",
    )
    parser.add_argument("--extra-segments", type=int, default=6000)
    parser.add_argument(
        "--reference", default="", help="system the paired verdicts are against (default: none)"
    )
    parser.add_argument("--table", default="", help="also write the markdown table here")
    args = parser.parse_args(argv)

    from mess_ray.descriptors import CHAIN_LEVEL_DESCRIPTORS, DESCRIPTOR_NAMES, descriptor_matrix
    from mess_ray.eval import baselines as bl
    from mess_ray.eval.benchmark import embed_system
    from mess_ray.eval.protocol import (
        HEADLINE,
        STYLE,
        EvalData,
        baseline_vectors,
        load_eval_data,
        score_all,
    )
    from mess_ray.work_relative import recording_relative

    cfg, storage, version = protocol_store(args.config, args.set, args.boot)
    cache = args.cache or None
    sr, seed = cfg.audio.sample_rate, cfg.eval.seed
    data, train, tracks = load_eval_data(cfg, storage, version, cfg.eval.validation_share)
    if train is None:
        raise SystemExit("no training-piece segments: nothing to train a head on")
    held_key = _key(data.perf.segment_ids)
    systems = cached_arrays(
        cache,
        # the protocol's descriptor head follows finetune.performer_weight: part of the key
        f"baselines-{version}-{held_key}-{_key(cfg.finetune.model_dump_json(), cfg.eval.head_steps)}",
        lambda: baseline_vectors(cfg, storage, version, data, train, seed),
    )
    sample, pianists = sample_with_audio(
        cfg, storage, version, train, np.arange(len(train)), tracks, args.train_segments, seed
    )
    heard = {tracks[t][1] for t in set(train.track_ids) if tracks.get(t, ("", ""))[1]}
    if args.extra_train:
        extra, extra_pianists = extra_training_sample(
            cfg, args.extra_train, tracks, args.extra_segments, seed
        )
        sample = concat_sets(sample, extra)
        pianists = np.concatenate([pianists, extra_pianists])
        heard |= {p for p in extra_pianists if p}
    train_key = _key(sample.segment_ids, args.extra_train)
    level_cols = [DESCRIPTOR_NAMES.index(n) for n in CHAIN_LEVEL_DESCRIPTORS]
    feats = cached_arrays(
        cache,
        f"descriptors-{version}-{held_key}-{train_key}",
        lambda: {
            "train": descriptor_matrix(list(sample.audio), sr),
            "held": descriptor_matrix(list(data.perf.audio), sr),
        },
    )
    inputs = {
        bl.DESCRIPTORS: fit_zscore(feats["train"], feats["held"]),
        bl.DESCRIPTORS + "+rec-rel": fit_zscore(
            recording_relative(feats["train"], sample.track_ids, level_cols),
            recording_relative(feats["held"], data.perf.track_ids, level_cols),
        ),
    }
    if sample.has_midi.any() and data.perf.has_midi.any():
        inputs["midi"] = fit_zscore(sample.midi_descriptors, data.perf.midi_descriptors)
    for spec in args.models:
        name, ref = spec.split("=", 1) if "=" in spec else (spec, spec)
        stamp = storage.latest(ref) if ref in ("finetune", "pretrain") else ref
        vectors = cached_arrays(
            cache,
            f"model-{_key(stamp, held_key, train_key)}",
            lambda ref=ref: {
                "train": embed_system(cfg, storage, ref, sample)[0],
                "held": embed_system(cfg, storage, ref, data.perf)[0],
            },
        )
        systems[name] = vectors["held"]
        inputs[name] = fit_zscore(vectors["train"], vectors["held"])
    midi_targets = np.where(sample.has_midi[:, None], sample.midi_descriptors, np.nan)
    fits: list[tuple[str, float]] = []
    for name, (x_train, x_held) in inputs.items():
        for weight in args.weight:
            head = bl.train_descriptor_head(
                x_train,
                sample.piece_ids,
                midi_targets,
                steps=args.steps,
                mine_clusters=cfg.finetune.mine_clusters or 8,
                midi_weight=max(cfg.finetune.midi_weight, 0.0),
                temperature=cfg.finetune.temperature,
                facet_temperature=cfg.finetune.facet_temperature,
                midi_target_temperature=cfg.finetune.midi_target_temperature,
                performers=pianists,
                performer_weight=weight,
                seed=seed,
            )
            label = f"{name}{PIANIST}" + (f"@{weight:g}" if len(args.weight) > 1 else "")
            systems[label] = head(x_held)
            fits.append((label, fit_map(head(x_train), pianists, sample.piece_ids)))
        fits.append((name, fit_map(x_train, pianists, sample.piece_ids)))
    # Who was heard: every pianist of the training pieces' kept tracks (the heads' sample and
    # the models' training leave out the same test-side pianists), and of --extra-train's.
    data = EvalData(data.perf, data.labels, data.split, heard)
    rows = score_all(cfg, data, systems, args.reference or None, splits=(args.split,))
    pieces_of: dict[str, set[str]] = {}
    for piece, pianist in zip(sample.piece_ids, pianists):
        if pianist:
            pieces_of.setdefault(pianist, set()).add(piece)
    emit_with_load(
        {
            "figure": "performer_head_setup",
            "split": args.split,
            "train_segments": len(sample),
            "train_pianists": len(pieces_of),
            "train_pieces": len(set(sample.piece_ids)),
            "train_pianists_in_two_pieces": sum(len(ps) >= 2 for ps in pieces_of.values()),
            "extra_train": args.extra_train or None,
            "held_segments": len(data.perf),
            "weights": args.weight,
            "steps": args.steps,
        }
    )
    noise = np.random.default_rng(seed).normal(size=(len(sample), 32))
    fits.append(("chance (random vectors)", fit_map(noise, pianists, sample.piece_ids)))
    for system, value in fits:
        emit_with_load(
            {
                "figure": "performer_head_fit",
                "split": "train (in sample)",
                "system": system,
                "map": round(value, 4),
            }
        )
    for r in rows:
        if r["task"] == STYLE or HEADLINE.get(r["task"]) != r["metric"]:
            continue
        rec = {
            "figure": "performer_head",
            **{k: r[k] for k in ("split", "task", "chains", "metric", "system")},
            "value": round(r["value"], 4),
            "ci": [round(r["ci_low"], 4), round(r["ci_high"], 4)],
            "chance": round(r.get("chance", float("nan")), 4),
            "pieces": r["pieces"],
            "queries": r["queries"],
        }
        if "reference_verdict" in r and r.get("diff") is not None:
            rec["reference_verdict"] = r["reference_verdict"]
            rec["diff"] = [round(r[k], 4) for k in ("diff", "diff_low", "diff_high")]
        emit_with_load(rec)
    if args.table:
        from mess_ray.eval.protocol import markdown_table

        summary = {
            "split": data.split,
            "reference": args.reference or None,
            "chains": sorted(set(data.labels.chain)),
            "bootstrap": {"samples": cfg.eval.bootstrap_samples},
        }
        with open(args.table, "w") as f:
            f.write(markdown_table(rows, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
