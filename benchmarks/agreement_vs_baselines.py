"""Fine-tuned models vs every baseline on expressive agreement with human performances (task 3),
with the spread over fine-tuning seeds and a paired cluster bootstrap against the descriptors.

Task 3 (``mess_ray.eval.tasks.agreement``): each held-out passage with performed MIDI is a query,
candidates are passages of *other* held-out pieces, graded relevance is proximity in expressive
MIDI-descriptor space; the figure is nDCG@k of a system's cosine ranking. Task 2's passage mAP
(same passage in other performances of the piece) is printed beside it, so a gain on task 3
bought by forgetting the music would show.

Runs ``run_finetune`` once per ``--seeds`` value (``finetune.seed``; the run name follows the
settings, so a re-run resumes or reuses finished runs), or takes ``--model`` folders as they
are, then scores on one held-out performance set (the split of ``mess_ray.eval.benchmark``):

* every fine-tuned model, their mean, the hand-crafted descriptor vector, the random encoder and
  every ``--compare NAME=PATH`` model (e.g. the SSL encoder the fine-tuning started from);
* ``--hybrid NAME``: the descriptor vector and model NAME side by side (concatenated, each
  unit-norm), the baseline a model with ``model.descriptor_channel`` has to beat to show it
  learned more than reading its descriptor input;
* ``diff_vs_descriptors``: mean over seeds of the per-query nDCG difference, with a 95 %
  interval from a paired bootstrap that resamples held-out *tracks* within each seed (queries of
  one performance are correlated; the track is the unit).

One JSON line per figure. Rerun (the asap-dev corpus; README's figures come from this)::

    nice python -m benchmarks.agreement_vs_baselines --config configs/asap-dev.yaml \\
        --seeds 0 1 2 --set finetune.init_from=pretrained --set model.pretrained=<SSL model> \\
        --set finetune.steps=600 --set finetune.batch_size=24 --compare ssl=<SSL model> --hybrid ssl
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks.common import cluster_bootstrap_ci, emit_with_load
from mess_ray.config import load_config
from mess_ray.eval import metrics
from mess_ray.eval.benchmark import DESCRIPTORS, RANDOM, embed_system
from mess_ray.eval.tasks.performance import (
    AGREEMENT_TASK,
    PASSAGE_TASK,
    plan_performance_tasks,
    score_performance_tasks,
    unit_rows,
)
from mess_ray.performances import load_performance_set
from mess_ray.storage import Storage


def per_query_agreement(vectors: np.ndarray, plan, k: int) -> np.ndarray:
    """nDCG@k of every task-3 query (NaN where a query has no relevant candidate)."""
    unit = unit_rows(
        vectors[plan.agreement_rows]
    )  # float64, as the pipeline scores them (near-ties matter)
    return metrics.ndcg_at_k(
        unit @ unit.T, plan.agreement_relevance, plan.agreement_candidates, k=k
    )


def train_seeds(config: str, overrides: list[str], seeds: list[int]) -> list[str]:
    from mess_ray.train.finetune import run_finetune

    paths = []
    for seed in seeds:
        cfg = load_config(config, [*overrides, f"finetune.seed={seed}"])
        storage = Storage.from_config(cfg.storage)
        manifest = run_finetune(cfg, storage)
        paths.append(storage.url("finetune", manifest["version"], "model"))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument(
        "--seeds", type=int, nargs="*", default=[0], help="fine-tuning seeds to train"
    )
    parser.add_argument(
        "--model", action="append", default=[], help="fine-tuned model folders (no training)"
    )
    parser.add_argument(
        "--compare", action="append", default=[], help="NAME=PATH: another model to score"
    )
    parser.add_argument(
        "--hybrid",
        action="append",
        default=[],
        help="NAME of a --compare model: also score descriptors (+) that model, concatenated",
    )
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    cfg = load_config(args.config, args.overrides)
    storage = Storage.from_config(cfg.storage)
    models = args.model or train_seeds(args.config, args.overrides, args.seeds)
    ecfg = cfg.eval
    perf = load_performance_set(
        storage,
        storage.require_latest("ingest"),
        ecfg.holdout_fraction,
        ecfg.seed,
        cfg.audio.sample_rate,
        cfg.audio.window_s,
    )
    if perf is None:
        raise SystemExit(
            "no held-out recording has performed MIDI: task 3 cannot run on this corpus"
        )
    plan = plan_performance_tasks(perf, ecfg.ndcg_k, ecfg.seed)
    if plan.agreement_rows is None:
        raise SystemExit(f"task 3 cannot run: {plan.skipped.get(AGREEMENT_TASK)}")

    systems = {f"finetune[{i}]": path for i, path in enumerate(models)}
    systems.update(dict(item.split("=", 1) for item in args.compare))
    systems.update({DESCRIPTORS: DESCRIPTORS, RANDOM: RANDOM})
    k = ecfg.ndcg_k
    per_query, scores, vectors = {}, {}, {}
    for name, ref in systems.items():
        vectors[name], _ = embed_system(cfg, storage, ref, perf)
    for name in args.hybrid:
        # The fine-tuned model reads the descriptors too (model.descriptor_channel): is it more
        # than descriptors and an encoder side by side? Both unit-norm, the encoder's centred.
        other = vectors[name] - vectors[name].mean(axis=0)
        vectors[f"{DESCRIPTORS}+{name}"] = np.concatenate(
            [unit_rows(vectors[DESCRIPTORS]), unit_rows(other)], axis=1
        )
    for name, vecs in vectors.items():
        per_query[name] = per_query_agreement(vecs, plan, k)
        scores[name], _ = score_performance_tasks(vecs, plan, tuple(ecfg.recall_ks), k)
        # The per-query figures are the pipeline's own (same rows, same similarity).
        assert np.isclose(np.nanmean(per_query[name]), scores[name][AGREEMENT_TASK][f"ndcg@{k}"])

    tracks = perf.track_ids[plan.agreement_rows]
    finetuned = [n for n in vectors if n.startswith("finetune[")]
    baselines = [n for n in vectors if n not in finetuned]
    settings = {
        "config": args.config,
        "overrides": args.overrides,
        "models": models,
        "queries": int(plan.agreement_rows.size),
        "held_out_pieces": perf.holdout_pieces,
        "descriptors_used": plan.agreement_features,
    }
    for figure, task, key in (
        (f"agreement_ndcg@{k}", AGREEMENT_TASK, f"ndcg@{k}"),
        ("agreement_spearman", AGREEMENT_TASK, "spearman"),
        ("passage_map", PASSAGE_TASK, "map"),
    ):
        if any(task not in scores[n] for n in vectors):
            continue
        values = {n: round(scores[n][task][key], 4) for n in vectors}
        mean = float(np.mean([values[n] for n in finetuned]))
        line = {
            "figure": figure,
            "finetune_mean": round(mean, 4),
            "finetune_seeds": [values[n] for n in finetuned],
            **{n: values[n] for n in baselines},
            "beats": [n for n in baselines if mean > values[n]],
        }
        if task == AGREEMENT_TASK and key.startswith("ndcg"):
            line["chance"] = round(plan.agreement_chance, 4)
            for base in [DESCRIPTORS, *(f"{DESCRIPTORS}+{h}" for h in args.hybrid)]:
                strata = [(per_query[n] - per_query[base], tracks) for n in finetuned]
                diff, low, high = cluster_bootstrap_ci(
                    strata, iterations=args.bootstrap, seed=ecfg.seed
                )
                line[f"diff_vs_{base}"] = round(diff, 4)
                line[f"diff_vs_{base}_ci95"] = [round(low, 4), round(high, 4)]
        emit_with_load({**line, **settings})
    emit_with_load({"figure": "wall_s", "value": round(time.perf_counter() - started, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
