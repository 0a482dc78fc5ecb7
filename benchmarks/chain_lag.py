"""How late does a recording chain deliver the sound, and what does that do to the timelines?
(issue 20: chain invariance; **validation** pieces only.)

For every validation segment recorded through two chains (the same performance, the same
start), the lag of chain B behind chain A is where the cross-correlation of their onset
envelopes (:func:`mess_ray.content.onset_timeline` at 200 frames per second, unsmoothed) peaks
within +-``--max-lag-ms``.
Then the protocol's chain-invariance R@1 of the content timelines alone
(:func:`mess_ray.content.timelines`): as they are, with chain B's audio moved back by the
median lag (an oracle: a search cannot know a recording's delay), and with the query tried at
every lag up to +-``--query-lags`` ms (:class:`mess_ray.eval.protocol.QueryVariants`, what
``model.content_timeline_query_shift_ms`` does).

    python -m benchmarks.chain_lag --config configs/shipped-asap.yaml --set storage.root=STORE
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks.common import emit_with_load
from mess_ray.config import load_config

ENVELOPE_RATE = 200.0


def best_lag(a: np.ndarray, b: np.ndarray, max_frames: int) -> int:
    """Frames by which ``b`` lags ``a`` (positive: ``b`` later), by cross-correlation."""
    a, b = a - a.mean(), b - b.mean()
    n = len(a)
    scores = [
        float(np.dot(a[max(0, -k) : n - max(0, k)], b[max(0, k) : n - max(0, -k)]))
        for k in range(-max_frames, max_frames + 1)
    ]
    return int(np.argmax(scores)) - max_frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shipped-asap.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--max-lag-ms", type=float, default=200.0)
    parser.add_argument("--query-lags", type=float, default=140.0, help="+-ms, every 20 ms")
    args = parser.parse_args(argv)

    from mess_ray.content import (
        onset_timeline,
        query_shifts_ms,
        shift_segments,
        timeline_variants,
        timelines,
    )
    from mess_ray.eval.protocol import (
        CHAIN_INVARIANCE,
        QueryVariants,
        build_views,
        load_eval_data,
        score_table,
    )
    from mess_ray.splits import VALIDATION
    from mess_ray.storage import Storage

    started = time.time()
    cfg = load_config(args.config, args.set)
    storage = Storage.from_config(cfg.storage)
    data, _, _ = load_eval_data(
        cfg, storage, storage.require_latest("ingest"), cfg.eval.validation_share
    )
    sr = cfg.audio.sample_rate
    rows = np.flatnonzero(data.labels.side == VALIDATION)
    chain = data.labels.chain[rows]
    chains = sorted(set(chain))
    if len(chains) < 2:
        raise SystemExit("the validation segments come through one chain: no lag to measure")
    audio = data.perf.audio[rows]
    env = onset_timeline(audio, sr, rate=ENVELOPE_RATE, smooth_s=0.0)
    key = {
        (p, round(float(s), 3), c): i
        for i, (p, s, c) in enumerate(
            zip(data.labels.performance[rows], data.perf.start_s[rows], chain)
        )
    }
    max_frames = int(round(args.max_lag_ms * ENVELOPE_RATE / 1000))
    median_lag = {}
    for b in chains[1:]:
        lags = [
            best_lag(env[i], env[key[(p, s, b)]], max_frames) * 1000 / ENVELOPE_RATE
            for (p, s, c), i in key.items()
            if c == chains[0] and (p, s, b) in key
        ]
        pct = np.percentile(lags, [5, 25, 50, 75, 95])
        median_lag[b] = float(pct[2])
        emit_with_load(
            figure="chain_lag",
            split=VALIDATION,
            chains=f"{b} behind {chains[0]}",
            pairs=len(lags),
            lag_ms_p5_p25_p50_p75_p95=[round(float(x), 1) for x in pct],
        )
    oracle_audio = audio.copy()
    for b, lag in median_lag.items():
        moved = chain == b
        oracle_audio[moved] = shift_segments(audio[moved], int(round(lag * sr / 1000)))
    n = len(data.perf)

    def full(v: np.ndarray) -> np.ndarray:
        out = np.zeros((n, v.shape[-1]))
        out[rows] = v
        return out

    plain = timelines(audio, sr)
    shifts = query_shifts_ms(args.query_lags, 20.0)
    variants = timeline_variants(audio, sr, shifts)
    systems = {
        "timelines": full(plain),
        "timelines, oracle delay removed": full(timelines(oracle_audio, sr)),
        f"timelines, query lags +-{args.query_lags:g} ms": QueryVariants(
            full(plain), np.stack([full(v) for v in variants])
        ),
    }
    views = [
        v
        for v in build_views(
            data,
            splits=(VALIDATION,),
            hop_s=cfg.audio.hop_s,
            max_queries=cfg.eval.max_queries_per_chain,
            seed=cfg.eval.seed,
        )
        if v.task == CHAIN_INVARIANCE
    ]
    table = score_table(
        views, systems, data, "timelines", n_boot=cfg.eval.bootstrap_samples, seed=cfg.eval.seed
    )
    for r in table:
        if r["metric"] == "recall@1":
            emit_with_load(
                figure="chain_lag_invariance",
                split=VALIDATION,
                chains=r["chains"],
                system=r["system"],
                recall_at_1=round(r["value"], 3),
                ci=[round(r["ci_low"], 3), round(r["ci_high"], 3)],
                verdict_of_plain=r.get("reference_verdict"),
            )
    emit_with_load(figure="chain_lag_run", seconds=round(time.time() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
