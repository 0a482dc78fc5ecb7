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

from benchmarks.common import emit_with_load
from mess_ray.config import load_config

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


def _cached(cache: str | None, name: str, make):
    path = os.path.join(cache, f"{name}.npz") if cache else None
    if path and os.path.exists(path):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    out = make()
    if path:
        os.makedirs(cache, exist_ok=True)
        np.savez(path, **out)
    return out


def cached_systems(cfg, storage, version, data, train, model_refs, cache, expression):
    """The baselines (cached per ingest version and segment set) and each model's vectors
    (cached per model version or folder)."""
    from mess_ray.eval.benchmark import embed_system
    from mess_ray.eval.protocol import baseline_vectors

    segs = hashlib.sha256(data.perf.segment_ids.tobytes()).hexdigest()[:10]
    systems = _cached(
        cache,
        f"baselines-{version}-{segs}",
        lambda: baseline_vectors(
            cfg, storage, version, data, train, cfg.eval.seed, expression=expression
        ),
    )
    for ref in model_refs:
        stamp = storage.latest(ref) if ref in ("finetune", "pretrain") else ref
        key = hashlib.sha256(f"{stamp}|{segs}".encode()).hexdigest()[:10]
        systems.update(
            _cached(
                cache,
                f"model-{key}",
                lambda ref=ref: {ref: embed_system(cfg, storage, ref, data.perf)[0]},
            )
        )
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
    from mess_ray.pipeline import with_storage_resolved
    from mess_ray.storage import Storage

    cfg = with_storage_resolved(
        load_config(args.config, [*args.set, f"eval.bootstrap_samples={args.boot}"])
    )
    storage = Storage.from_config(cfg.storage)
    version = storage.require_latest("ingest")
    data, train = load_eval_data(cfg, storage, version, cfg.eval.validation_share)
    cache = args.cache or None
    expression = expression_raw(data, cfg.audio.sample_rate, cache)
    systems = cached_systems(cfg, storage, version, data, train, args.models, cache, expression)
    for rec in feature_agreement(data, expression, args.split):
        emit_with_load(rec)
    bases = [*args.models, bl.DESCRIPTORS, bl.DESCRIPTOR_HEAD, AUDIO_EXPRESSION, MIDI_REFERENCE]
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
