"""Model size and the pretraining learning curve on the yardstick (issue 20 item 4): ``tiny``
against ``small`` at the same recipe, and ``tiny`` pretrained on nested shares of the training
performances' audio, each fine-tuned the same way and evaluated with every baseline on the same
segments (``benchmarks.protocol``'s stages on one rendered + ingested store). Only VALIDATION
figures are reported: settings are chosen there; the test rows stay untouched until the
coordinator picks a setting.

    python -m benchmarks.model_scale --source ./protocol-data --root ./protocol-data-ms \\
        --variants tiny small tiny@0.25 tiny@0.5 --lock /tmp/mess-ray-ray.lock \\
        --set eval.holdout_fraction=0.34 --set eval.test_pianist_fraction=0 \\
        --plot docs/model_scale.png

``--paired`` adds one evaluation of every variant's fine-tuned model (store ``<root>/paired``):
each variant's difference from the first with a paired CI over pieces (``model_scale_paired``);
``--paired --skip-variants`` runs only that, on models already trained. Measured (README,
Pretraining): 2 shared cores, about 94 min of stages for the four variants (summed) plus 28 min for the
paired evaluation at load 4-14.

A variant is ``SIZE`` or ``SIZE@FRACTION`` (``pretrain.audio_fraction``). Each variant gets its
own store ``<root>/<SIZE>-<FRACTION>`` whose ``render`` and ``ingest`` are links to the source
store's (never written to), so pretrain -> finetune -> evaluate of one variant cannot pick up
another's model. Pretraining steps scale with the share of pretraining segments a fraction
keeps (``pretrain.steps`` x kept / all, same batch), so every point sees its data about equally
often; fine-tuning is the same for all. The x axis of the curve is the audio a run actually
used, read from its pretrain manifest (``counts.pretrain_audio_s``: seconds covered by the
segments it kept). ``--reuse``: a variant whose store already holds an evaluation of models
matching its size, fraction and steps is read back instead of rerun (no stage lines then).

JSON lines: ``model_scale_stage`` (seconds, 1-minute load), ``model_scale_variant`` (size,
fraction, steps, batch, parameters, pretraining hours), ``model_scale`` (one validation figure:
task x chains x system with its piece-bootstrap CI and the verdict of the variant's fine-tuned
model against it) and ``model_scale_summary``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import emit, loadavg
from mess_ray import console
from mess_ray.config import load_config

# (task, chains, metric) of the validation figures the study reports.
REPORTED = (
    ("passage_retrieval", "dry", "map"),
    ("performer_identity", "dry", "map"),
    ("expressive_agreement", "dry", "ndcg@10"),
    ("chain_invariance", "dry->eval-1", "recall@1"),
)
SPLIT = "validation"
_VARIANT = re.compile(r"^(tiny|small|base)(?:@([0-9]*\.?[0-9]+))?$")


@dataclass(frozen=True)
class Variant:
    size: str
    fraction: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.size}-{self.fraction}"


def parse_variant(text: str) -> Variant:
    match = _VARIANT.match(text.strip())
    if not match:
        raise ValueError(f"a variant is SIZE or SIZE@FRACTION (tiny, small@0.5), got {text!r}")
    fraction = float(match.group(2)) if match.group(2) else 1.0
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the fraction of {text!r} must be in (0, 1]")
    return Variant(match.group(1), fraction)


def scaled_steps(base_steps: int, kept_segments: int, all_segments: int) -> int:
    """Pretraining steps for a run that keeps ``kept_segments`` of ``all_segments``: the same
    number of passes over its data as ``base_steps`` over all of it (at least one step)."""
    if all_segments <= 0 or not 0 < kept_segments <= all_segments:
        raise ValueError(f"kept {kept_segments} of {all_segments} segments")
    return max(1, round(base_steps * kept_segments / all_segments))


def link_corpus(source: Path, target: Path) -> None:
    """``target``'s render and ingest stages: links to ``source``'s (which stays read-only)."""
    target.mkdir(parents=True, exist_ok=True)
    for stage in ("render", "ingest"):
        origin = (source / stage).resolve()
        if not (origin / "LATEST").exists():
            raise FileNotFoundError(f"{origin} holds no published {stage} artifact")
        link = target / stage
        if link.is_symlink() and link.resolve() == origin:
            continue
        if link.exists() or link.is_symlink():
            raise FileExistsError(f"{link} exists and is not a link to {origin}")
        link.symlink_to(origin, target_is_directory=True)


def validation_rows(manifest: dict) -> list[dict]:
    """The reported validation figures of an evaluation manifest (every system)."""
    from mess_ray.eval.protocol import figure_fields, headline_rows

    protocol = manifest.get("protocol") or {}
    if "rows" not in protocol:
        raise RuntimeError(f"the evaluation wrote no protocol table: {protocol.get('skipped')}")
    wanted = set(REPORTED)
    return [
        figure_fields(r)
        for r in headline_rows(protocol["rows"])
        if r["split"] == SPLIT and (r["task"], r["chains"], r["metric"]) in wanted
    ]


def matches(storage, variant: Variant, steps: int) -> dict | None:
    """The latest evaluation in ``storage`` when it scored this variant's models, else None."""
    if not (storage.latest("eval") and storage.latest("pretrain")):
        return None
    evaluation = storage.manifest("eval")
    pretrain = storage.manifest("pretrain")
    models = (evaluation.get("inputs") or {}).get("models") or {}
    counts = pretrain.get("counts") or {}
    if (
        models.get("pretrain") != pretrain.get("version")
        or (pretrain.get("inputs") or {}).get("init", {}).get("size") != variant.size
        or counts.get("steps") != steps
        or counts.get("audio_fraction", 1.0) != variant.fraction
    ):
        return None
    return evaluation


def evaluate(cfg, storage, refs: list[str], lock: str) -> dict:
    """The evaluate stage on ``refs`` (every baseline comes along), as benchmarks.protocol runs
    it: on the driver without Ray when ``eval.ray_data_min_segments`` exceeds the corpus."""
    import ray

    from benchmarks.protocol import DRIVER_ONLY, exclusive
    from mess_ray.pipeline import run_stage

    if cfg.eval.ray_data_min_segments <= DRIVER_ONLY:
        with exclusive(lock):
            manifest = run_stage("evaluate", cfg, model_refs=refs)
            ray.shutdown()
        return manifest
    from mess_ray.eval import run_evaluate
    from mess_ray.pipeline import with_storage_resolved

    return run_evaluate(with_storage_resolved(cfg), storage, refs)


def paired_rows(manifest: dict, names: dict[str, str]) -> list[dict]:
    """The reported validation rows of the models ``names`` ({ref: variant}) from one
    evaluation of them all, refs replaced by variant names (the reference too)."""
    out = []
    for row in validation_rows(manifest):
        if row["system"] not in names:
            continue
        named = {**row, "system": names[row["system"]]}
        if row.get("reference") in names:
            named["reference"] = names[row["reference"]]
        out.append(named)
    return out


def run_paired(args: argparse.Namespace, variants: list[Variant]) -> list[dict]:
    """One evaluation of every variant's fine-tuned model on the same queries (store
    ``<root>/paired``): the protocol's paired bootstrap then gives each variant's difference
    from the first variant with a CI over pieces (the verdict columns)."""
    from benchmarks.protocol import stage_record
    from mess_ray.storage import Storage

    names: dict[str, str] = {}
    for variant in variants:
        store_root = f"storage.root={Path(args.root) / variant.name}"
        store = Storage.from_config(load_config(args.config, [*args.set, store_root]).storage)
        version = store.require_latest("finetune")
        names[store.url("finetune", version, "model")] = f"{variant.name}:finetune"
    root = Path(args.root) / "paired"
    link_corpus(Path(args.source), root)
    cfg = load_config(args.config, [*args.set, f"storage.root={root}"])
    storage = Storage.from_config(cfg.storage)
    refs = list(names)
    evaluation = None
    if args.reuse and storage.latest("eval"):
        latest = storage.manifest("eval")
        if set(refs) <= set((latest.get("inputs") or {}).get("models") or {}):
            evaluation = latest
    if evaluation is None:
        t1 = time.time()
        evaluation = evaluate(cfg, storage, refs, args.lock)
        record = stage_record("evaluate", t1, 0.0, evaluation)
        emit({**record, "figure": "model_scale_stage", "variant": "paired"})
    rows = paired_rows(evaluation, names)
    for row in rows:
        emit({"figure": "model_scale_paired", **row})
    return rows


def run_variant(args: argparse.Namespace, variant: Variant) -> dict:
    """Pretrain, fine-tune and evaluate one variant in its own store; its JSON lines."""
    import ray

    from benchmarks.protocol import exclusive, stage_record
    from mess_ray.pipeline import run_stage
    from mess_ray.splits import pianist_holdout, read_pretrain_audio, read_track_pianists
    from mess_ray.storage import Storage
    from mess_ray.train.pretrain import excluded_pieces

    root = Path(args.root) / variant.name
    link_corpus(Path(args.source), root)
    overrides = [*args.set, f"storage.root={root}", f"model.size={variant.size}"]
    cfg = load_config(args.config, overrides)
    storage = Storage.from_config(cfg.storage)
    ingest = storage.require_latest("ingest")
    # The same rule as pretraining: evaluation pieces and test-side pianists are never eligible.
    exclude = excluded_pieces(cfg, storage, ingest)
    tracks = pianist_holdout(
        read_track_pianists(storage, ingest), cfg.eval.test_pianist_fraction, cfg.eval.seed
    ).tracks
    full = read_pretrain_audio(storage, ingest, 1.0, cfg.pretrain.seed, exclude, tracks)
    share = read_pretrain_audio(
        storage, ingest, variant.fraction, cfg.pretrain.seed, exclude, tracks
    )
    steps = scaled_steps(cfg.pretrain.steps, share.segments, full.segments)
    cfg = load_config(
        args.config,
        [*overrides, f"pretrain.audio_fraction={variant.fraction}", f"pretrain.steps={steps}"],
    )
    reused = matches(storage, variant, steps) if args.reuse else None
    seconds: dict[str, float] = {}
    if reused is None:
        for stage in ("pretrain", "finetune"):
            t0 = time.time()
            with exclusive(args.lock):
                waited = time.time() - t0
                t1 = time.time()
                manifest = run_stage(stage, cfg)
                ray.shutdown()
            record = stage_record(stage, t1, waited, manifest)
            seconds[stage] = record["seconds"]
            emit({**record, "figure": "model_scale_stage", "variant": variant.name})
        t1 = time.time()
        evaluation = evaluate(cfg, storage, ["finetune", "pretrain"], args.lock)
        record = stage_record("evaluate", t1, 0.0, evaluation)
        seconds["evaluate"] = record["seconds"]
        emit({**record, "figure": "model_scale_stage", "variant": variant.name})
    else:
        evaluation = reused
    pretrain, finetune = storage.manifest("pretrain"), storage.manifest("finetune")
    counts = pretrain.get("counts") or {}
    audio_s = counts.get("pretrain_audio_s")
    source = "pretrain manifest"
    if audio_s is None:  # a manifest from before counts.pretrain_audio_s: same rule, recomputed
        audio_s, source = share.seconds, "recomputed from the ingest (same rule)"
    info = {
        "variant": variant.name,
        "size": variant.size,
        "audio_fraction": variant.fraction,
        "pretrain_steps": counts.get("steps"),
        "pretrain_batch_size": cfg.pretrain.batch_size,
        "finetune_steps": (finetune.get("counts") or {}).get("steps"),
        "finetune_batch_size": cfg.finetune.batch_size,
        "pretrain_parameters": counts.get("parameters"),
        "finetune_parameters": (finetune.get("counts") or {}).get("parameters"),
        "pretrain_segments": counts.get("pretrain_segments", share.segments),
        "pretrain_audio_hours": round(audio_s / 3600.0, 4),
        "pretrain_audio_source": source,
        "stage_seconds": seconds or None,
        "reused": reused is not None,
        "pretrain_version": pretrain.get("version"),
        "finetune_version": finetune.get("version"),
        "eval_version": evaluation.get("version"),
        "loadavg": loadavg(),
    }
    emit({"figure": "model_scale_variant", **info})
    rows = validation_rows(evaluation)
    for row in rows:
        emit({"figure": "model_scale", "variant": variant.name, **row})
    return {**info, "rows": rows}


def curve_points(results: list[dict], size: str = "tiny") -> dict[tuple, list[tuple]]:
    """{(task, chains, metric, system): [(hours, value, ci_low, ci_high)] by hours} for the
    fine-tuned and SSL-only models of ``size``."""
    points: dict[tuple, list[tuple]] = {}
    for result in results:
        if result["size"] != size:
            continue
        for row in result["rows"]:
            if row["system"] not in ("finetune", "pretrain") or row.get("value") is None:
                continue
            key = (row["task"], row["chains"], row["metric"], row["system"])
            points.setdefault(key, []).append(
                (result["pretrain_audio_hours"], row["value"], row["ci_low"], row["ci_high"])
            )
    return {k: sorted(v) for k, v in points.items()}


def plot_curve(results: list[dict], path: str, size: str = "tiny") -> None:
    """One panel per reported figure: value (95 % CI over pieces) against hours of pretraining
    audio, fine-tuned and SSL-only, with the baselines of the full-data run as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve_points(results, size)
    full = max((r for r in results if r["size"] == size), key=lambda r: r["audio_fraction"])
    fig, axes = plt.subplots(1, len(REPORTED), figsize=(4.2 * len(REPORTED), 3.6))
    for ax, (task, chains, metric) in zip(axes, REPORTED):
        for system, style in (("finetune", "o-"), ("pretrain", "s--")):
            pts = points.get((task, chains, metric, system), [])
            if not pts:
                continue
            hours, value, low, high = (list(x) for x in zip(*pts))
            ax.errorbar(
                hours,
                value,
                yerr=[
                    [v - lo for v, lo in zip(value, low)],
                    [hi - v for v, hi in zip(value, high)],
                ],
                fmt=style,
                capsize=3,
                label=f"{size} {system}",
            )
        for row in full["rows"]:
            if (row["task"], row["chains"], row["metric"]) != (task, chains, metric):
                continue
            if row["system"] in ("descriptor_head", "descriptors", "chance"):
                ax.axhline(row["value"], lw=0.8, ls=":", color="grey")
                ax.annotate(row["system"], (0, row["value"]), fontsize=7, color="grey")
        ax.set_title(f"{task}\n{chains} {metric} ({SPLIT})", fontsize=9)
        ax.set_xlabel("hours of pretraining audio")
        ax.set_xlim(left=0)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/protocol.yaml")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument(
        "--source", default="./protocol-data", help="store with the render and ingest to reuse"
    )
    parser.add_argument(
        "--root", default="./protocol-data-ms", help="folder of the variants' own stores"
    )
    parser.add_argument("--variants", nargs="+", default=["tiny", "small", "tiny@0.25", "tiny@0.5"])
    parser.add_argument("--lock", default="", help="flock file held while Ray stages run")
    parser.add_argument(
        "--reuse", action="store_true", help="read back variants already evaluated in their store"
    )
    parser.add_argument("--plot", default="", help="PNG of the tiny learning curve")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="also evaluate every variant's fine-tuned model in one run (<root>/paired): paired "
        "differences from the first variant with CIs over pieces",
    )
    parser.add_argument(
        "--skip-variants",
        action="store_true",
        help="with --paired: only the paired evaluation (the variants' models must exist)",
    )
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = time.time()
    with console.quiet_console(args.root, verbose=False):
        results = [] if args.skip_variants else [run_variant(args, v) for v in variants]
        if args.paired:
            run_paired(args, variants)
        if args.plot and sum(r["size"] == "tiny" for r in results) > 1:
            plot_curve(results, args.plot)
        emit(
            {
                "figure": "model_scale_summary",
                "split": SPLIT,
                "variants": [r["variant"] for r in results],
                "hours": {r["variant"]: r["pretrain_audio_hours"] for r in results},
                "plot": args.plot or None,
                "total_seconds": round(time.time() - started, 1),
                "loadavg": loadavg(),
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
