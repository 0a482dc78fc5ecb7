"""The protocol's ``style_parameters`` task alone (issue 15, task 6), on the latest ingest.

The same rows ``mess-ray evaluate`` writes into ``eval/<v>/protocol/table.*`` (same split, same
learned descriptor head, same systems, same bootstrap), without the other tasks' embeddings: for
a corpus already rendered with ``render.style_grid.eval_renders`` and ingested, e.g.

    python -m benchmarks.protocol --skip evaluate             # render (with the grid) .. finetune
    python -m benchmarks.style_parameters                     # one JSON line per figure

Prints one JSON line per (split, system): Spearman between cosine similarity and minus the
standardised style-parameter distance over the same passage's other renderings, its 95 % CI over
pieces, and the first model's paired verdict; then a summary line with the seconds it took and
the load average. Evaluate embeds on the driver here (no Ray).
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.common import emit, loadavg
from mess_ray.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/protocol.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--models", nargs="+", default=["finetune", "pretrain"])
    args = parser.parse_args(argv)

    import pyarrow.compute as pc

    from mess_ray.eval.benchmark import RANDOM, embed_system
    from mess_ray.eval.protocol import (
        STYLE,
        figure_fields,
        head_training_set,
        style_parameter_rows,
        train_head,
    )
    from mess_ray.pipeline import with_storage_resolved
    from mess_ray.segments import segments_dataset
    from mess_ray.splits import split_by_piece, track_pianists
    from mess_ray.storage import Storage

    started = time.time()
    cfg = with_storage_resolved(load_config(args.config, args.set))
    cfg.eval.ray_data_min_segments = 10**9  # the driver: no Ray
    ecfg = cfg.eval
    storage = Storage.from_config(cfg.storage)
    version = storage.require_latest("ingest")
    meta = segments_dataset(storage, version).to_table(
        columns=["segment_id", "track_id", "piece_id", "metadata_json"]
    )
    pieces = [p for p in pc.unique(meta["piece_id"]).to_pylist() if p]
    split = split_by_piece(pieces, ecfg.holdout_fraction, ecfg.seed, ecfg.validation_share)
    # The same head as evaluate's: test-side pianists left out (eval.test_pianist_fraction).
    train = head_training_set(cfg, storage, version, track_pianists(meta))
    head = train_head(cfg, storage, version, train, ecfg.seed)
    refs = [r for r in args.models if storage.latest(r)] + [RANDOM]
    skipped = {r: "no artifact" for r in args.models if r not in refs}
    rows, summary = style_parameter_rows(
        cfg, storage, version, split.as_dict(), refs, embed_system, head, refs[0], skipped
    )
    if not rows:
        raise RuntimeError(f"no style_parameters rows: {summary.get('skipped')}")
    for row in rows:
        emit({"figure": "protocol", **figure_fields(row)})
    emit(
        {
            "figure": "style_parameters_summary",
            "task": STYLE,
            "ingest": version,
            "split": {k: len(v) for k, v in split.as_dict().items()},
            **summary,
            "skipped": skipped,
            "seconds": round(time.time() - started, 1),
            "loadavg": loadavg(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
