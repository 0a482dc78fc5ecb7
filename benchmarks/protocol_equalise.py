"""Per-recording spectral equalisation on the yardstick (issue 20, items 1 and 3): does removing
each recording's long-term spectrum (:func:`mess_ray.spectral_eq.equalise_tracks`: the chain's
EQ, room colouration and gain, as one filter) before embedding make the model and the baselines
chain-invariant, and what does it cost within a chain?

Every system is scored twice on the same views of one split: on the segments as ingested, and on
the same segments equalised per recording to the mean long-term spectrum of the split's
recordings (``<system>+eq``). The learned descriptor head is trained once on the training pieces
as ingested and once on them equalised (each applied to its own kind of audio). Paired verdicts
are against ``--model`` as ingested (or ``--reference``); ``--compare`` scores more models the
same way. A model that declares query lags is searched with them, as the service does (the
lagged timelines computed from the audio of the variant). Validation by default; ``--split
test`` once, at the end.

    python -m benchmarks.protocol_equalise --config configs/shipped-asap.yaml \
        --set storage.root=STORE --model shipped:tiny-asap-v3 [--per-octave 3 6]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

import numpy as np

from benchmarks.common import emit_protocol_rows, emit_with_load
from mess_ray.config import load_config

EQ = "+eq"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/protocol.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--model", default="finetune")
    parser.add_argument("--split", choices=["validation", "test"], default="validation")
    parser.add_argument(
        "--per-octave",
        nargs="+",
        type=float,
        default=[3.0],
        help="smoothing of the long-term spectrum (bands per octave); each one is scored",
    )
    parser.add_argument("--max-gain-db", type=float, default=24.0)
    parser.add_argument("--no-head", action="store_true", help="leave the descriptor head out")
    parser.add_argument(
        "--compare", nargs="*", default=[], help="more models, each also scored raw and equalised"
    )
    parser.add_argument(
        "--reference", default="", help="system the paired verdicts are against (default: --model)"
    )
    args = parser.parse_args(argv)

    from mess_ray.eval import baselines as bl
    from mess_ray.eval.benchmark import embed_system
    from mess_ray.eval.protocol import (
        build_views,
        feature_baselines,
        load_eval_data,
        train_head,
        with_query_variants,
    )
    from mess_ray.spectral_eq import equalise_tracks
    from mess_ray.storage import Storage

    cfg = load_config(args.config, args.set)
    sr = cfg.audio.sample_rate
    storage = Storage.from_config(cfg.storage)
    version = storage.require_latest("ingest")
    started = time.time()
    data, train, _ = load_eval_data(cfg, storage, version, cfg.eval.validation_share)
    side = data.labels.side == args.split
    n = len(data.perf)

    def full(v: np.ndarray) -> np.ndarray:
        out = np.zeros((n, v.shape[1]), dtype=np.float64)
        out[side] = v  # rows of the other split stay zero: no view of this split reads them
        return out

    subset = data.perf.subset(side)
    raw_audio = subset.audio
    views = build_views(
        data,
        splits=(args.split,),
        hop_s=cfg.audio.hop_s,
        max_queries=cfg.eval.max_queries_per_chain,
        seed=cfg.eval.seed,
    )
    all_audio = data.perf.audio
    lagged_audio = all_audio.copy()  # the audio the query lags read: each variant's in turn
    heads = {}
    if not args.no_head:
        heads[""] = train_head(cfg, storage, version, train, cfg.eval.seed)
    systems: dict[str, np.ndarray] = {}
    timings: dict[str, float] = {}
    variants: list[tuple[str, np.ndarray]] = [("", raw_audio)]

    def equalised(audio, track_ids, reference, per_octave):
        return equalise_tracks(
            audio, track_ids, sr, reference, per_octave, max_gain_db=args.max_gain_db
        )[0]

    for per_octave in args.per_octave:
        t0 = time.time()
        eq_audio, reference = equalise_tracks(
            raw_audio, subset.track_ids, sr, per_octave=per_octave, max_gain_db=args.max_gain_db
        )
        suffix = EQ if len(args.per_octave) == 1 else f"{EQ}{per_octave:g}"
        timings[f"equalise{suffix}"] = round(time.time() - t0, 1)
        variants.append((suffix, eq_audio))
        if not args.no_head and train is not None:
            # the head's training segments equalised the same way, to the same reference
            heads[suffix] = train_head(
                cfg,
                storage,
                version,
                train,
                cfg.eval.seed,
                audio_transform=functools.partial(
                    equalised, reference=reference, per_octave=per_octave
                ),
            )
    for suffix, audio in variants:
        t0 = time.time()
        subset.audio = audio
        infos = {}
        for ref in [args.model, *args.compare]:
            vectors, infos[f"{ref}{suffix}"] = embed_system(cfg, storage, ref, subset)
            systems[f"{ref}{suffix}"] = full(vectors)
        # the models' declared query lags, their shifted timelines taken from this variant's audio
        lagged_audio[side] = audio
        data.perf.audio = lagged_audio
        with_query_variants(systems, infos, data, views, sr)
        data.perf.audio = all_audio
        base = feature_baselines(audio, sr, heads.get(suffix), cfg.eval.seed)
        for name in (bl.DESCRIPTORS, bl.CHROMA, bl.MFCC, bl.DESCRIPTOR_HEAD):
            if name in base:
                systems[f"{name}{suffix}"] = full(base[name])
        if not suffix:
            systems[bl.CHANCE] = full(base[bl.CHANCE])
        timings[f"embed{suffix or '+raw'}"] = round(time.time() - t0, 1)
    subset.audio = raw_audio
    reference = args.reference or args.model
    if reference not in systems:
        raise SystemExit(f"--reference {reference!r} is not a scored system: {sorted(systems)}")
    emit_protocol_rows(cfg, views, systems, data, reference, "protocol_equalise")
    emit_with_load(
        figure="protocol_equalise_run",
        split=args.split,
        model=args.model,
        ingest=version,
        segments=int(side.sum()),
        per_octave=args.per_octave,
        max_gain_db=args.max_gain_db,
        timings=timings,
        seconds=round(time.time() - started, 1),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
