"""Longer context on the yardstick's **validation** pieces (issue 20, item 2): does a phrase-level
view, each segment's vector pooled with its neighbours in the same recording
(:func:`mess_ray.segments.pool_neighbours`), help the protocol's tasks?

One trained model is embedded once on the validation segments; every pooling width is scored on
the same views against the unpooled vectors (paired difference over pieces, 95 % CI, verdict of
the unpooled model against each width). Test pieces are never embedded.

    python -m benchmarks.protocol_context --set storage.root=./protocol-data
    python -m benchmarks.protocol_context --model finetune --neighbours 1 2 4 --decay 0.7
    python -m benchmarks.protocol_context --model finetune --compare <model folder> --neighbours
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks.common import emit_with_load
from mess_ray.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/protocol.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--model", default="finetune")
    parser.add_argument(
        "--compare",
        nargs="*",
        default=[],
        help="further model refs (folders) scored on the same views, paired against --model",
    )
    parser.add_argument("--neighbours", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--decay", type=float, default=0.7)
    args = parser.parse_args(argv)

    from mess_ray.eval.benchmark import embed_system
    from mess_ray.eval.protocol import (
        PASSAGE,
        build_views,
        figure_fields,
        headline_rows,
        load_eval_data,
        score_table,
    )
    from mess_ray.segments import pool_neighbours
    from mess_ray.splits import VALIDATION
    from mess_ray.storage import Storage

    cfg = load_config(args.config, args.set)
    storage = Storage.from_config(cfg.storage)
    version = storage.require_latest("ingest")
    started = time.time()
    data, _, _ = load_eval_data(cfg, storage, version, cfg.eval.validation_share)
    validation = data.labels.side == VALIDATION
    vectors, info = embed_system(cfg, storage, args.model, data.perf.subset(validation))
    full = np.zeros((len(data.perf), vectors.shape[1]), dtype=np.float64)
    full[validation] = vectors  # test rows stay zero: no view below reads them
    embedded_s = time.time() - started
    systems = {args.model: full}
    for ref in args.compare:
        other, _ = embed_system(cfg, storage, ref, data.perf.subset(validation))
        systems[ref] = np.zeros((len(data.perf), other.shape[1]), dtype=np.float64)
        systems[ref][validation] = other
    for k in args.neighbours:
        pooled = np.zeros_like(full)
        pooled[validation] = pool_neighbours(
            vectors,
            data.perf.track_ids[validation],
            data.perf.start_s[validation],
            cfg.audio.hop_s,
            k,
            args.decay,
        )
        systems[f"{args.model}+context{k}"] = pooled
    views = build_views(
        data,
        splits=(VALIDATION,),
        hop_s=cfg.audio.hop_s,
        max_queries=cfg.eval.max_queries_per_chain,
        seed=cfg.eval.seed,
    )
    rows = score_table(
        views,
        systems,
        data,
        args.model,
        ndcg_k=cfg.eval.ndcg_k,
        n_boot=cfg.eval.bootstrap_samples,
        seed=cfg.eval.seed,
    )
    for row in headline_rows(rows):
        if row["task"] == PASSAGE and row["metric"] == "top_hit_error_s":
            continue
        emit_with_load(
            figure="protocol_context",
            decay=args.decay,
            **figure_fields(row),
        )
    emit_with_load(
        figure="protocol_context_run",
        model=info.get("version"),
        ingest=version,
        validation_segments=int(validation.sum()),
        embed_seconds=round(embedded_s, 1),
        seconds=round(time.time() - started, 1),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
