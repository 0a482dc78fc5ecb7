"""The evaluation report: report.json, report.md and PNG plots under ``eval/<version>/``.

Files are rendered into a local temporary folder and then copied through :class:`Storage`,
so the same code writes to a local root and to s3://.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mess_ray.storage import Storage

# Metrics drawn and tabulated, in this order, with whether higher is better.
REPORT_METRICS: tuple[tuple[str, bool], ...] = (
    ("map", True),
    ("recall@1", True),
    ("recall@10", True),
    ("mrr", True),
    ("ndcg@10", True),
    ("cos_positive", True),
    ("cos_hard_negative", False),
    ("cos_negative", False),
    ("triplet_loss", False),
    ("triplet_accuracy", True),
)


@dataclass
class SystemResult:
    name: str
    info: dict[str, Any]
    metrics: dict[str, float]
    embeddings: np.ndarray
    similarity: np.ndarray


def report_metric_names(system_metrics: dict[str, dict[str, float]]) -> list[str]:
    """Known metrics first (in REPORT_METRICS order), then any other float metric (e.g. recall@5)."""
    present: list[str] = []
    for metrics in system_metrics.values():
        for name, value in metrics.items():
            if name not in present and isinstance(value, float):
                present.append(name)
    known = [m for m, _ in REPORT_METRICS if m in present]
    return known + [m for m in present if m not in known and m != "chance"]


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def best_system(results: list[SystemResult]) -> SystemResult | None:
    """Highest mAP (NaN counts as lowest); ties keep the earlier system."""
    best = None
    for result in results:
        score = result.metrics.get("map", float("nan"))
        if math.isnan(score):
            continue
        if best is None or score > best.metrics["map"]:
            best = result
    return best or (results[0] if results else None)


TASK_TITLES = {
    "style_retrieval": "Task 1: preset style retrieval (same preset, other piece): a renderer "
    "sanity check, not evidence (presets are shared by training and test; the protocol table's "
    "style_parameters task is the non-circular style figure)",
    "passage_retrieval": "Task 2: cross-performance passage retrieval (same beats, other performance)",
    "expressive_agreement": "Task 3: expressive agreement with MIDI descriptors (other pieces)",
}
# The figure each task is summarised by, in the per-task bar chart and the headline.
TASK_MAIN_METRIC = {
    "style_retrieval": "map",
    "passage_retrieval": "map",
    "expressive_agreement": "ndcg@10",
}
BASELINES = ("descriptors", "random")


def plot_label(ref: str) -> str:
    """A short axis label: a model folder ``.../<run>/model`` shows as ``<run>``."""
    parts = [p for p in ref.rstrip("/").split("/") if p]
    if len(parts) <= 1:
        return ref
    return parts[-2] if parts[-1] == "model" else parts[-1]


def _task_main_metric(task: str, ndcg_k: int) -> str:
    return f"ndcg@{ndcg_k}" if task == "expressive_agreement" else TASK_MAIN_METRIC[task]


def _metric_table(system_metrics: dict[str, dict[str, float]], names: list[str]) -> list[str]:
    systems = list(system_metrics)
    lines = ["| " + " | ".join(["metric", *systems]) + " |", "|" + "---|" * (len(systems) + 1)]
    lines += [
        "| " + " | ".join([m, *(_fmt(system_metrics[s].get(m)) for s in systems)]) + " |"
        for m in names
    ]
    return lines


def markdown_report(manifest: dict[str, Any]) -> str:
    """report.md: headline, settings, per-task tables with every system beside the baselines,
    counts, skipped tasks and systems, and every figure with what it compares."""
    settings = manifest["settings"]
    ndcg_k = int(settings.get("ndcg_k", 10))
    lines = ["# mess-ray evaluation", "", f"**{manifest['headline']}**", ""]
    inputs = manifest["inputs"]
    lines += [
        f"- ingest version: `{inputs['ingest']}`",
        "- model versions: " + ", ".join(f"{k}: `{v or '-'}`" for k, v in inputs["models"].items()),
        f"- config digest: `{settings['config_digest']}`",
        f"- seed: {settings.get('seed')}, holdout fraction: {settings.get('holdout_fraction')}, "
        f"window: {settings.get('window_s')} s at {settings.get('sample_rate')} Hz",
        f"- held-out pieces ({len(manifest.get('held_out_pieces', []))}): "
        + ", ".join(f"`{p}`" for p in manifest.get("held_out_pieces", [])),
        f"- baselines in every table: {', '.join(f'`{b}`' for b in BASELINES)} "
        "(hand-crafted audio descriptors; randomly initialised encoder)",
        "",
    ]
    tasks = manifest.get("tasks") or (
        {"style_retrieval": {"metrics": manifest["metrics"], "counts": manifest["counts"]}}
        if manifest.get("metrics")
        else {}
    )
    higher_better = dict(REPORT_METRICS)
    for task, body in tasks.items():
        system_metrics = body["metrics"]
        if not system_metrics:
            continue
        lines += [f"## {TASK_TITLES.get(task, task)}", ""]
        names = report_metric_names(system_metrics)
        lines += _metric_table(system_metrics, names) + [""]
        chance = next(iter(system_metrics.values())).get("chance")
        if chance is not None:
            lines += [
                f"Chance level ({'random ranking' if task != 'style_retrieval' else 'fraction relevant'}): "
                f"{_fmt(chance)}",
                "",
            ]
        lines += ["| count | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in body.get("counts", {}).items()] + [""]
        if task == "style_retrieval":
            for metric in names:
                arrow = {True: " (higher is better)", False: " (lower is better)"}.get(
                    higher_better.get(metric), ""
                )
                lines += (
                    [f"### {metric}{arrow}", ""] + _metric_table(system_metrics, [metric]) + [""]
                )
    lines += ["## counts", "", "| count | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in manifest["counts"].items()]
    if manifest.get("tasks_skipped"):
        lines += ["", "## tasks not run", ""]
        lines += [
            f"- {TASK_TITLES.get(name, name)}: {reason}"
            for name, reason in manifest["tasks_skipped"].items()
        ]
    if manifest.get("skipped"):
        lines += ["", "## skipped systems", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in manifest["skipped"].items()]
    lines += ["", "## plots", ""]
    figures = {
        "tasks.png": "per-task bars: the main figure of each task "
        + ", ".join(
            f"({TASK_MAIN_METRIC[t] if t != 'expressive_agreement' else f'nDCG@{ndcg_k}'})"
            for t in tasks
        )
        + " for every system, baselines included, chance dashed",
        "metrics.png": "task 1: every metric per system, chance dashed on mAP",
        "similarity_hist.png": "task 1: cosine similarity of positives vs hard negatives vs all negatives "
        "(best system)",
        "passage_similarity_hist.png": "task 2: cosine of the same beats in another performance vs other "
        "passages (best system and the descriptor baseline)",
        "pca_styles.png": "task 1: PCA map of the best system's embeddings coloured by style",
    }
    for name, text in figures.items():
        if name in manifest.get("plot_files", figures):
            lines += [f"- `{name}`: {text}", "", f"![{name}]({name})", ""]
    return "\n".join(lines)


def _plot_metrics(path: Path, system_metrics: dict[str, dict[str, float]]) -> None:
    import matplotlib.pyplot as plt

    names = report_metric_names(system_metrics)
    systems = list(system_metrics)
    cols = 4
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    colours = plt.cm.tab10(np.arange(len(systems)) % 10)
    for ax, metric in zip(axes.flat, names):
        values = [system_metrics[s].get(metric, float("nan")) for s in systems]
        ax.bar(range(len(systems)), np.nan_to_num(values), color=colours)
        ax.set_xticks(
            range(len(systems)),
            [plot_label(x) for x in systems],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_title(metric)
        if metric == "map":  # the fraction of relevant candidates is what a random ranking scores
            chance = system_metrics[systems[0]].get("chance")
            if chance is not None and not math.isnan(chance):
                ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
                ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_similarity_hist(path: Path, best: SystemResult, protocol) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(-1, 1, 41)
    for mask, label in (
        (protocol.relevant, "positives (same style, other piece)"),
        (protocol.hard_negatives, "hard negatives (same piece, other style)"),
        (protocol.negatives, "all negatives (other style)"),
    ):
        if mask.any():
            ax.hist(best.similarity[mask], bins=bins, density=True, alpha=0.5, label=label)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(f"similarities: {best.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_pca(
    path: Path, best: SystemResult, styles: np.ndarray, max_points: int, seed: int
) -> None:
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    index = np.arange(len(styles))
    if index.size > max_points:
        index = np.sort(rng.choice(index, size=max_points, replace=False))
    points = best.embeddings[index]
    if points.shape[0] >= 2 and points.shape[1] >= 2:
        xy = PCA(n_components=2, random_state=seed).fit_transform(points)
    else:
        xy = np.zeros((points.shape[0], 2))
    fig, ax = plt.subplots(figsize=(6, 5))
    for style in sorted(set(styles[index])):
        sel = styles[index] == style
        ax.scatter(xy[sel, 0], xy[sel, 1], s=12, label=style, alpha=0.8)
    ax.set_title(f"PCA of {best.name} embeddings by style")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_tasks(path: Path, tasks: dict[str, dict[str, Any]], ndcg_k: int) -> None:
    """One panel per task: its main figure for every system (baselines hatched), chance dashed."""
    import matplotlib.pyplot as plt

    present = [t for t, body in tasks.items() if body["metrics"]]
    fig, axes = plt.subplots(
        1, max(1, len(present)), figsize=(4.5 * max(1, len(present)), 3.6), squeeze=False
    )
    for ax, task in zip(axes.flat, present):
        metric = _task_main_metric(task, ndcg_k)
        system_metrics = tasks[task]["metrics"]
        systems = list(system_metrics)
        values = [system_metrics[s].get(metric, float("nan")) for s in systems]
        colours = [
            "#bbbbbb" if s in BASELINES else plt.cm.tab10(i % 10) for i, s in enumerate(systems)
        ]
        bars = ax.bar(range(len(systems)), np.nan_to_num(values), color=colours)
        for bar, system in zip(bars, systems):
            if system in BASELINES:
                bar.set_hatch("//")
        for i, v in enumerate(values):
            ax.text(i, np.nan_to_num(v), _fmt(v), ha="center", va="bottom", fontsize=7)
        chance = system_metrics[systems[0]].get("chance")
        if chance is not None and not math.isnan(chance):
            ax.axhline(
                chance, color="grey", linestyle="--", linewidth=1, label=f"chance {chance:.2f}"
            )
            ax.legend(fontsize=7)
        ax.set_xticks(
            range(len(systems)),
            [plot_label(x) for x in systems],
            rotation=30,
            ha="right",
            fontsize=8,
        )
        ax.set_title(f"{task.replace('_', ' ')}: {metric}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_passage_hist(
    path: Path, similarities: dict[str, np.ndarray], candidates, relevant, systems: list[str]
) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(systems), figsize=(5 * len(systems), 3.6), squeeze=False)
    bins = np.linspace(-1, 1, 41)
    for ax, name in zip(axes.flat, systems):
        sim = similarities[name]
        ax.hist(
            sim[relevant], bins=bins, density=True, alpha=0.5, label="same beats, other performance"
        )
        ax.hist(
            sim[candidates & ~relevant], bins=bins, density=True, alpha=0.5, label="other passages"
        )
        ax.set_title(f"passage similarities: {plot_label(name)}", fontsize=9)
        ax.set_xlabel("cosine similarity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    storage: Storage,
    version: str,
    manifest: dict[str, Any],
    results: list[SystemResult],
    held_out,
    protocol,
    max_plot_points: int = 2000,
    seed: int = 0,
    task_similarities: dict[str, dict[str, np.ndarray]] | None = None,
    plan=None,
) -> list[str]:
    """Write report.json, report.md and the plots to ``eval/<version>/``; return their names."""
    import matplotlib

    matplotlib.use("Agg")
    task_similarities = task_similarities or {}
    ndcg_k = int(manifest["settings"].get("ndcg_k", 10))
    style_results = [r for r in results if r.metrics]
    best = best_system(style_results)
    with tempfile.TemporaryDirectory(prefix="mess-ray-eval-") as tmp:
        out = Path(tmp)
        plots: list[str] = []
        tasks = manifest.get("tasks") or {}
        if tasks:
            _plot_tasks(out / "tasks.png", tasks, ndcg_k)
            plots.append("tasks.png")
        if style_results and protocol is not None:
            _plot_metrics(out / "metrics.png", manifest["metrics"])
            _plot_similarity_hist(out / "similarity_hist.png", best, protocol)
            _plot_pca(
                out / "pca_styles.png", best, np.asarray(held_out.styles), max_plot_points, seed
            )
            plots += ["metrics.png", "similarity_hist.png", "pca_styles.png"]
        passage_sims = task_similarities.get("passage_retrieval", {})
        if passage_sims and plan is not None and plan.passage_rows is not None:
            passage_metrics = tasks["passage_retrieval"]["metrics"]
            ranked = sorted(
                (n for n in passage_metrics if n not in BASELINES),
                key=lambda n: -np.nan_to_num(passage_metrics[n]["map"], nan=-1),
            )
            shown = (ranked[:1] + [b for b in BASELINES[:1] if b in passage_sims]) or list(
                passage_sims
            )[:1]
            _plot_passage_hist(
                out / "passage_similarity_hist.png",
                passage_sims,
                plan.passage_candidates,
                plan.passage_relevant,
                shown,
            )
            plots.append("passage_similarity_hist.png")
        manifest["plot_files"] = plots
        report = {
            **manifest,
            "best_system": best.name if best else None,
            "systems_info": {r.name: r.info for r in results},
        }
        (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
        (out / "report.md").write_text(markdown_report(manifest))
        names = sorted(p.name for p in out.iterdir())
        storage.put_dir(out, f"eval/{version}")
    return names
