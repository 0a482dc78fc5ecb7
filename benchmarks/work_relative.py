"""Expression relative to the work (issue 20, items 5 and 3), chosen on the protocol's
*validation* pieces: every work-relative setting (mode x aligned x by-chain) for the reference
model, the descriptors, the descriptor head, the audio expression features and the
performed-MIDI reference, performer identity at segment and excerpt level, within and across
chains; plus how close each audio expression feature comes to its performed-MIDI counterpart
(Spearman over the same segments, plain and work-relative). One JSON line per figure.

    python -m benchmarks.work_relative --set storage.root=<a protocol corpus with models> \\
        --cache /tmp/w20-cache                      # validation only (the default)
    python -m benchmarks.work_relative ... --split test   # once, at the end

Runs on the driver (no Ray): the evaluate stage's embedding of the model and every baseline,
cached under ``--cache`` (keyed by the ingest and model versions) so the settings sweep is cheap.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys

import numpy as np

from benchmarks.common import cached_arrays, emit_with_load, protocol_store

PAIRS = (  # audio expression feature -> performed-MIDI descriptor that asks the same question
    ("tempo_bpm", "tempo_bpm"),
    ("onset_rate_hz", "note_rate_hz"),
    ("timing_deviation", "timing_deviation"),
    ("articulation_ratio", "articulation_ratio"),
    ("decay_db_per_s", "pedal_fraction"),
    ("attack_level_db", "velocity_mean"),
    ("attack_range_db", "velocity_range"),
    ("loudness_lufs", "velocity_mean"),
    ("loudness_slope_db_per_s", "velocity_slope_per_s"),
)
TASK_KEYS = ("performer_identity", "performer_identity_excerpt", "chain_invariance")


def cached_systems(cfg, storage, version, data, train, model_refs, cache, expression):
    """The baselines (cached per ingest version and segment set) and each model's vectors
    (cached per model version or folder)."""
    from mess_ray.eval.benchmark import embed_system
    from mess_ray.eval.protocol import baseline_vectors

    segs = hashlib.sha256(data.perf.segment_ids.tobytes()).hexdigest()[:10]
    systems = cached_arrays(
        cache,
        f"baselines-{version}-{segs}",
        lambda: baseline_vectors(
            cfg, storage, version, data, train, cfg.eval.seed, expression=expression
        ),
    )
    for spec in model_refs:
        name, ref = spec.split("=", 1) if "=" in spec else (spec, spec)
        stamp = storage.latest(ref) if ref in ("finetune", "pretrain") else ref
        key = hashlib.sha256(f"{stamp}|{segs}".encode()).hexdigest()[:10]
        vectors = cached_arrays(
            cache,
            f"model-{key}",
            lambda ref=ref: {ref: embed_system(cfg, storage, ref, data.perf)[0]},
        )
        systems[name] = vectors[ref]
    return systems


def expression_raw(data, sr: int, cache: str | None) -> np.ndarray:
    from mess_ray.descriptors import expression_matrix

    key = hashlib.sha256(data.perf.segment_ids.tobytes()).hexdigest()[:12]
    path = os.path.join(cache, f"expression-{key}.npy") if cache else None
    if path and os.path.exists(path):
        return np.load(path)
    x = expression_matrix(list(data.perf.audio), sr)
    if path:
        np.save(path, x)
    return x


def feature_agreement(data, expression: np.ndarray, split: str) -> list[dict]:
    """Spearman between each audio feature and its MIDI counterpart on the split's segments,
    as measured and relative to the work (minus the work's mean)."""
    from scipy.stats import spearmanr

    from mess_ray.descriptors import EXPRESSION_NAMES
    from mess_ray.midi_descriptors import MIDI_DESCRIPTOR_NAMES

    rows = (data.labels.side == split) & data.perf.has_midi
    pieces = data.perf.piece_ids[rows]
    out = []
    for audio_name, midi_name in PAIRS:
        a = expression[rows, EXPRESSION_NAMES.index(audio_name)]
        m = data.perf.midi_descriptors[rows, MIDI_DESCRIPTOR_NAMES.index(midi_name)]
        ok = np.isfinite(a) & np.isfinite(m)
        if ok.sum() < 10:
            continue
        rel_a, rel_m = a.copy(), m.copy()
        for p in set(pieces[ok]):
            sel = ok & (pieces == p)
            rel_a[sel] -= a[sel].mean()
            rel_m[sel] -= m[sel].mean()
        out.append(
            {
                "figure": "audio_vs_midi",
                "split": split,
                "audio": audio_name,
                "midi": midi_name,
                "segments": int(ok.sum()),
                "spearman": round(float(spearmanr(a[ok], m[ok])[0]), 3),
                "spearman_within_work": round(float(spearmanr(rel_a[ok], rel_m[ok])[0]), 3),
            }
        )
    return out


def training_piece_study(cfg, storage, version, cache: str | None) -> list[dict]:
    """Performer identity of the *unlearned* systems (descriptors, audio expression features,
    performed-MIDI reference; plain and work-relative in every setting) on the 40 training
    pieces (dry chain): no model is involved, so these pieces are fair for them, and they hold
    many more pianists who play two pieces than the 10 validation pieces."""
    import json

    import pyarrow.compute as pc

    from mess_ray.descriptors import descriptor_matrix, zscore
    from mess_ray.eval.protocol import (
        EvalData,
        _read_audio,
        expression_vectors,
        labels_from_metadata,
        score_all,
        work_relative_systems,
    )
    from mess_ray.performances import load_performance_set
    from mess_ray.segments import segments_dataset

    ecfg, sr = cfg.eval, cfg.audio.sample_rate
    train = load_performance_set(
        storage,
        version,
        ecfg.holdout_fraction,
        ecfg.seed,
        sr,
        cfg.audio.window_s,
        pieces="train",
        with_audio=False,
    )
    audio = _read_audio(storage, version, train.segment_ids, sr, cfg.audio.window_s)
    train.audio = audio
    meta = segments_dataset(storage, version).to_table(
        columns=["segment_id", "metadata_json"],
        filter=pc.field("segment_id").isin(list(train.segment_ids)),
    )
    meta_of = dict(zip(meta["segment_id"].to_pylist(), meta["metadata_json"].to_pylist()))
    metadata = [json.loads(meta_of[int(sid)] or "{}") for sid in train.segment_ids]
    pieces = sorted(set(train.piece_ids))
    labels = labels_from_metadata(
        metadata, train.track_ids, dict.fromkeys(pieces, "train"), train.piece_ids
    )
    data = EvalData(train, labels, {"train": pieces})
    segs = hashlib.sha256(train.segment_ids.tobytes()).hexdigest()[:10]

    def make():
        desc = descriptor_matrix(list(audio), sr)
        out = {"descriptors": zscore(desc)[0]}
        out.update(expression_vectors(data.perf, desc, sr, expression_raw(data, sr, cache)))
        return out

    systems = cached_arrays(cache, f"train-features-{version}-{segs}", make)
    systems = {k: v for k, v in systems.items() if "rec-rel" not in k}
    out = []
    for mode, aligned in itertools.product(("center", "standardise"), (False, True)):
        c = cfg.model_copy(deep=True)
        c.work_relative.mode, c.work_relative.aligned = mode, aligned
        rel = work_relative_systems(c, data, systems, list(systems))
        scored = {**systems, **rel} if (mode, aligned) == ("center", False) else rel
        for r in score_all(c, data, scored, None, splits=("train",)):
            if r["task"].startswith("performer_identity") and r["metric"] == "map":
                out.append(
                    {
                        "figure": "work_relative_training_pieces",
                        "mode": mode,
                        "aligned": aligned,
                        **{k: r[k] for k in ("task", "chains", "system", "pieces", "queries")},
                        "value": round(r["value"], 4),
                        "ci": [round(r["ci_low"], 4), round(r["ci_high"], 4)],
                        "chance": round(r.get("chance", float("nan")), 4),
                    }
                )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/protocol.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["finetune"],
        help="model refs (or folders); first: reference",
    )
    parser.add_argument("--split", default="validation", choices=["validation", "test"])
    parser.add_argument("--cache", default="", help="folder for embeddings/features (reused)")
    parser.add_argument("--boot", type=int, default=300, help="bootstrap draws (sweep)")
    parser.add_argument(
        "--final",
        default="",
        help="no sweep: score every system (plain and +work-rel with the configured "
        "work_relative settings) on validation and test together, write the markdown table here",
    )
    parser.add_argument(
        "--training-pieces",
        action="store_true",
        help="only the unlearned systems' performer identity on the training pieces",
    )
    args = parser.parse_args(argv)

    from mess_ray.eval import baselines as bl
    from mess_ray.eval.protocol import (
        AUDIO_EXPRESSION,
        MIDI_REFERENCE,
        WORK_REL,
        load_eval_data,
        score_all,
        work_relative_systems,
    )

    cfg, storage, version = protocol_store(args.config, args.set, args.boot)
    cache = args.cache or None
    if args.training_pieces:
        for rec in training_piece_study(cfg, storage, version, cache):
            emit_with_load(rec)
        return 0
    data, train, _ = load_eval_data(cfg, storage, version, cfg.eval.validation_share)
    expression = expression_raw(data, cfg.audio.sample_rate, cache)
    systems = cached_systems(cfg, storage, version, data, train, args.models, cache, expression)
    names = [m.split("=", 1)[0] for m in args.models]
    bases = [*names, bl.DESCRIPTORS, bl.DESCRIPTOR_HEAD, AUDIO_EXPRESSION, MIDI_REFERENCE]
    for rec in feature_agreement(data, expression, args.split):
        emit_with_load(rec)
    if args.final:
        from mess_ray.eval.protocol import figure_fields, headline_rows, markdown_table

        every = {
            **systems,
            **work_relative_systems(cfg, data, systems, bases),
        }
        rows = score_all(cfg, data, every, names[0])
        summary = {
            "split": data.split,
            "reference": names[0],
            "chains": sorted(set(data.labels.chain)),
            "bootstrap": {"samples": cfg.eval.bootstrap_samples},
        }
        with open(args.final, "w") as f:
            f.write(markdown_table(rows, summary))
        for r in headline_rows(rows):
            emit_with_load(
                {
                    "figure": "work_relative_final",
                    **figure_fields(r),
                    "work_relative": cfg.work_relative.model_dump(mode="json"),
                }
            )
        return 0
    plain = {k: v for k, v in systems.items() if WORK_REL not in k}
    for mode, aligned, by_chain in itertools.product(
        ("center", "standardise"), (False, True), (False, True)
    ):
        c = cfg.model_copy(deep=True)
        c.work_relative.mode, c.work_relative.aligned, c.work_relative.by_chain = (
            mode,
            aligned,
            by_chain,
        )
        variant = {**plain, **work_relative_systems(c, data, plain, bases)}
        scored = (
            variant
            if (mode, aligned, by_chain) == ("center", False, False)
            else {k: v for k, v in variant.items() if WORK_REL in k}
        )
        rows = score_all(c, data, scored, None, splits=(args.split,))
        for r in rows:
            if r["task"] in TASK_KEYS and r["metric"] in ("map", "recall@1"):
                if r["task"] != "chain_invariance" and r["metric"] != "map":
                    continue
                emit_with_load(
                    {
                        "figure": "work_relative_sweep",
                        "mode": mode,
                        "aligned": aligned,
                        "by_chain": by_chain,
                        **{k: r[k] for k in ("split", "task", "chains", "metric", "system")},
                        "value": round(r["value"], 4),
                        "ci": [round(r["ci_low"], 4), round(r["ci_high"], 4)],
                        "chance": round(r.get("chance", float("nan")), 4),
                        "pieces": r["pieces"],
                        "queries": r["queries"],
                    }
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
