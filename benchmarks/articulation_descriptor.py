"""Does the audio articulation descriptor track articulation? On a rendered corpus whose styles
set a known note-length ratio (``render.styles[*].articulation``), the Spearman correlation of
``sustain_ratio`` with that ratio, beside the same figure for ``flux_mean`` (the articulation
descriptor before it) measured on the same segments.

    python -m benchmarks.articulation_descriptor --config /work/data/m21-bench.yaml [--per-style 40]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from scipy.stats import spearmanr

from mess_ray.config import load_config
from mess_ray.descriptors import describe
from mess_ray.segments import decode_audio, segments_dataset
from mess_ray.storage import Storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument(
        "--per-style", type=int, default=40, help="segments sampled per style (seeded)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [])
    ratios = {s.name: s.articulation for s in cfg.render.styles}
    table = (
        segments_dataset(Storage.from_config(cfg.storage))
        .to_table(columns=["style", "audio", "sample_rate"])
        .to_pylist()
    )
    by_style: dict[str, list[dict]] = {}
    for row in table:
        if row["style"] in ratios:
            by_style.setdefault(row["style"], []).append(row)
    if len(by_style) < 2:
        raise SystemExit(
            f"need segments of two or more configured styles, found {sorted(by_style)}"
        )
    rng = np.random.default_rng(args.seed)
    truth, values = [], {"sustain_ratio": [], "flux_mean": []}
    for style in sorted(by_style):
        rows = by_style[style]
        for i in rng.choice(len(rows), min(args.per_style, len(rows)), replace=False):
            d = describe(decode_audio(rows[i]["audio"]), rows[i]["sample_rate"])
            truth.append(ratios[style])
            for name in values:
                values[name].append(d[name])
    for name, vals in values.items():
        print(
            json.dumps(
                {
                    "figure": "spearman_vs_style_articulation",
                    "descriptor": name,
                    "value": round(float(spearmanr(truth, vals).statistic), 4),
                    "baseline": "flux_mean" if name != "flux_mean" else None,
                    "segments": len(truth),
                    "styles": len(by_style),
                    "seed": args.seed,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
