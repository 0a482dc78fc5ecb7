"""Fine-tuned model vs every baseline on style retrieval (held-out pieces), plus facet tracking.

Runs (unless ``--skip-train``) ``run_finetune`` with the config and overrides given, then
embeds the held-out segments (the split of ``mess_ray.eval.benchmark``) with the fine-tuned
model, the SSL encoder (``pretrain``), a random-initialised encoder and the hand-crafted
descriptor vector, and prints one JSON line per figure with every baseline beside it:

    {"figure": "map", "finetune": 0.71, "descriptors": 0.62, "pretrain": 0.4, "random": 0.2,
     "chance": 0.18, "beats": ["descriptors", "pretrain", "random"], ...settings}

``cos_positive`` vs ``cos_hard_negative`` (different piece same style vs same piece other
style) is printed too. For a model with facet heads, one line per facet gives the Spearman
correlation over held-out pairs between the facet's cosine and its descriptor group's
similarity, beside the same correlation for the overall part and for a random model's parts.

Rerun (the m21-bench dev corpus; the figures in README were measured with this):

    python -m benchmarks.finetune_vs_baselines --config /work/data/m21-bench.yaml \\
        --set finetune.steps=300 ...

``--model PATH`` evaluates an existing fine-tuned model folder instead of the latest one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from mess_ray.config import load_config
from mess_ray.descriptors import descriptor_matrix, zscore
from mess_ray.eval.benchmark import (
    DESCRIPTORS,
    RANDOM,
    build_protocol,
    embed_system,
    load_held_out,
    score_system,
)
from mess_ray.facets import parse_layout
from mess_ray.storage import Storage

FIGURES = (
    "map",
    "mrr",
    "recall@1",
    "recall@10",
    "ndcg@10",
    "cos_positive",
    "cos_hard_negative",
    "triplet_accuracy",
)
HIGHER_IS_BETTER = {"cos_hard_negative": False}


def main(argv: list[str] | None = None) -> int:
    from mess_ray.train.finetune import run_finetune
    from mess_ray.train.targets import facet_agreement, facet_groups

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument(
        "--skip-train", action="store_true", help="evaluate the latest finetune artifact as is"
    )
    parser.add_argument(
        "--model", help="a fine-tuned model folder to evaluate (implies --skip-train)"
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="only the fine-tuned model (faster sweeps)"
    )
    args = parser.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    storage = Storage.from_config(cfg.storage)
    started = time.perf_counter()
    ref = args.model
    train_info: dict = {}
    if ref is None:
        if not args.skip_train:
            manifest = run_finetune(cfg, storage)
            train_info = {
                "train_s": round(time.perf_counter() - started, 1),
                "loss_first": manifest["losses"]["first"],
                "loss_last": manifest["losses"]["last"],
            }
        version = storage.require_latest("finetune")
        ref = storage.url("finetune", version)
        train_info["finetune_version"] = version
    settings = {
        "overrides": args.overrides,
        "model": cfg.model.model_dump(mode="json"),
        "finetune": {
            k: v
            for k, v in cfg.finetune.model_dump(mode="json").items()
            if k not in ("run_name", "test_fail_at_step")
        },
        **train_info,
    }

    held_out = load_held_out(cfg, storage, storage.require_latest("ingest"))
    protocol = build_protocol(held_out.track_ids, held_out.piece_ids, held_out.styles)
    systems = (
        {"finetune": ref}
        if args.no_baselines
        else {"finetune": ref, "pretrain": "pretrain", DESCRIPTORS: DESCRIPTORS, RANDOM: RANDOM}
    )
    scores, vectors, infos = {}, {}, {}
    for name, system_ref in systems.items():
        try:
            vectors[name], infos[name] = embed_system(cfg, storage, system_ref, held_out)
        except FileNotFoundError as err:
            print(json.dumps({"skipped": name, "reason": str(err)}), file=sys.stderr)
            continue
        scores[name], _ = score_system(
            vectors[name],
            protocol,
            recall_ks=tuple(cfg.eval.recall_ks),
            ndcg_k=cfg.eval.ndcg_k,
            margin=cfg.eval.triplet_margin,
        )

    common = {"segments": len(held_out), "held_out_pieces": held_out.holdout_pieces}
    for figure in FIGURES:
        if figure not in scores["finetune"]:
            continue
        line = {
            "figure": figure,
            **{name: round(float(s[figure]), 4) for name, s in scores.items()},
        }
        higher = HIGHER_IS_BETTER.get(figure, True)
        ours = scores["finetune"][figure]
        line["beats"] = [
            name
            for name, s in scores.items()
            if name != "finetune" and (ours > s[figure] if higher else ours < s[figure])
        ]
        if figure == "map":
            line["chance"] = round(float(scores["finetune"]["chance"]), 4)
        print(json.dumps({**line, **common}))
    ft = scores["finetune"]
    print(
        json.dumps(
            {
                "figure": "hard_negative_below_positive",
                "finetune": ft["cos_hard_negative"] < ft["cos_positive"],
                "cos_positive": round(ft["cos_positive"], 4),
                "cos_hard_negative": round(ft["cos_hard_negative"], 4),
                **{
                    f"{name}_gap": round(s["cos_positive"] - s["cos_hard_negative"], 4)
                    for name, s in scores.items()
                },
            }
        )
    )

    layout = parse_layout(infos["finetune"].get("facet_layout"))
    if layout is not None:
        z, _, _ = zscore(descriptor_matrix(list(held_out.audio), cfg.audio.sample_rate))
        groups = facet_groups()
        ours_rho = facet_agreement(vectors["finetune"], layout, z, groups)
        random_rho = None
        if RANDOM in vectors:
            # The random encoder has no facet heads: slice its vector with the same layout
            # (same dims only when sizes agree, else its whole vector stands for every part).
            rv = vectors[RANDOM]
            random_layout = (
                layout
                if rv.shape[1] >= max(e for _, e in layout.values())
                else {name: (0, rv.shape[1]) for name in layout}
            )
            random_rho = facet_agreement(rv, random_layout, z, groups)
        for facet, by_part in ours_rho.items():
            line = {
                "figure": f"facet_spearman_{facet}",
                "finetune_facet": round(by_part.get(facet, float("nan")), 4),
                "finetune_overall": round(by_part["overall"], 4),
            }
            if random_rho is not None:
                line["random_same_dims"] = round(random_rho[facet].get(facet, float("nan")), 4)
            line["descriptors"] = list(np.asarray(list(groups[facet])).tolist())
            print(json.dumps(line))
    print(
        json.dumps(
            {"figure": "settings", **settings, "wall_s": round(time.perf_counter() - started, 1)}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
