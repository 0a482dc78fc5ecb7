"""The benchmark's figures as JSON lines: every task's main metrics for every system, each
beside the two baselines and the chance level measured in the same evaluation run.

    python -m benchmarks.eval_tasks --config configs/asap-dev.yaml --run --models finetune pretrain
    python -m benchmarks.eval_tasks --config configs/asap-dev.yaml          # the latest eval report

``--run`` runs ``mess-ray evaluate`` first (every task whose data the corpus holds); without it
the latest published eval artifact of the config's storage root is read.
"""

from __future__ import annotations

import argparse
import json
import sys

from mess_ray.config import load_config
from mess_ray.storage import Storage

FIGURES = {
    "style_retrieval": ("map", "recall@1", "recall@10", "mrr", "ndcg@10", "triplet_loss"),
    "passage_retrieval": (
        "map",
        "recall@1",
        "recall@10",
        "mrr",
        "timestamp_error_s_median",
        "timestamp_error_beats_median",
        "top1_same_piece",
    ),
    "expressive_agreement": ("ndcg@10", "spearman"),
}
BASELINES = ("descriptors", "random")
# Metrics whose random-ranking level the report records as "chance".
CHANCE_OF = {
    "style_retrieval": "map",
    "passage_retrieval": "map",
    "expressive_agreement": "ndcg@10",
}


def figure_lines(manifest: dict) -> list[dict]:
    """One record per (task, system, metric) with the baselines' value and chance beside it."""
    lines = []
    for task, body in manifest.get("tasks", {}).items():
        systems = body["metrics"]
        for metric in FIGURES.get(task, ()):
            for system, values in systems.items():
                if metric not in values:
                    continue
                lines.append(
                    {
                        "task": task,
                        "metric": metric,
                        "system": system,
                        "value": values[metric],
                        **{
                            f"baseline_{b}": systems[b].get(metric)
                            for b in BASELINES
                            if b in systems
                        },
                        "chance": values.get("chance") if metric == CHANCE_OF.get(task) else None,
                        "eval_version": manifest["version"],
                        "held_out_pieces": len(manifest.get("held_out_pieces", [])),
                        "seed": manifest["settings"]["seed"],
                    }
                )
    for task, reason in manifest.get("tasks_skipped", {}).items():
        lines.append({"task": task, "skipped": reason, "eval_version": manifest["version"]})
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--run", action="store_true", help="run the evaluation first")
    parser.add_argument("--models", nargs="*", default=["pretrain", "finetune"])
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [])
    storage = Storage.from_config(cfg.storage)
    if args.run:
        from mess_ray.pipeline import run_stage

        manifest = run_stage("evaluate", cfg, model_refs=args.models)
    else:
        manifest = storage.read_json(f"eval/{storage.require_latest('eval')}/manifest.json")
    for line in figure_lines(manifest):
        print(json.dumps(line, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
