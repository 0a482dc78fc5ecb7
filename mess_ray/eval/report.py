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
    ("map", True), ("recall@1", True), ("recall@10", True), ("mrr", True), ("ndcg@10", True),
    ("cos_positive", True), ("cos_hard_negative", False), ("cos_negative", False),
    ("triplet_loss", False), ("triplet_accuracy", True),
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


def markdown_report(manifest: dict[str, Any]) -> str:
    """report.md: headline, one table per metric with systems side by side, counts, skips."""
    system_metrics: dict[str, dict[str, float]] = manifest["metrics"]
    systems = list(system_metrics)
    lines = ["# mess-ray evaluation", "", f"**{manifest['headline']}**", ""]
    inputs = manifest["inputs"]
    lines += [f"- ingest version: `{inputs['ingest']}`",
              "- model versions: " + ", ".join(f"{k}: `{v or '-'}`" for k, v in inputs["models"].items()),
              f"- config digest: `{manifest['settings']['config_digest']}`", ""]
    higher_better = dict(REPORT_METRICS)
    names = report_metric_names(system_metrics)
    lines += ["## summary", "", "| " + " | ".join(["metric", *systems]) + " |", "|" + "---|" * (len(systems) + 1)]
    lines += ["| " + " | ".join([m, *(_fmt(system_metrics[s].get(m)) for s in systems)]) + " |" for m in names]
    lines += [""]
    for metric in names:
        arrow = {True: " (higher is better)", False: " (lower is better)"}.get(higher_better.get(metric), "")
        lines += [f"## {metric}{arrow}", "", "| " + " | ".join(["metric", *systems]) + " |",
                  "|" + "---|" * (len(systems) + 1),
                  "| " + " | ".join([metric, *(_fmt(system_metrics[s].get(metric)) for s in systems)]) + " |", ""]
    lines += ["## counts", "", "| count | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in manifest["counts"].items()]
    if manifest.get("skipped"):
        lines += ["", "## skipped systems", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in manifest["skipped"].items()]
    lines += ["", "## plots", "", "![metrics](metrics.png)", "", "![similarities](similarity_hist.png)", "",
              "![pca](pca_styles.png)", ""]
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
        ax.set_xticks(range(len(systems)), systems, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        if metric == "map":  # the fraction of relevant candidates is what a random ranking scores
            chance = system_metrics[systems[0]].get("chance")
            if chance is not None and not math.isnan(chance):
                ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
                ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_similarity_hist(path: Path, best: SystemResult, protocol) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(-1, 1, 41)
    for mask, label in ((protocol.relevant, "positives (same style, other piece)"),
                        (protocol.hard_negatives, "hard negatives (same piece, other style)"),
                        (protocol.negatives, "all negatives (other style)")):
        if mask.any():
            ax.hist(best.similarity[mask], bins=bins, density=True, alpha=0.5, label=label)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.set_title(f"similarities: {best.name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_pca(path: Path, best: SystemResult, styles: np.ndarray, max_points: int, seed: int) -> None:
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


def write_report(storage: Storage, version: str, manifest: dict[str, Any], results: list[SystemResult],
                 held_out, protocol, max_plot_points: int = 2000, seed: int = 0) -> list[str]:
    """Write report.json, report.md and the plots to ``eval/<version>/``; return their names."""
    import matplotlib

    matplotlib.use("Agg")
    best = best_system(results)
    with tempfile.TemporaryDirectory(prefix="mess-ray-eval-") as tmp:
        out = Path(tmp)
        report = {**manifest, "best_system": best.name if best else None,
                  "systems_info": {r.name: r.info for r in results}}
        (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
        (out / "report.md").write_text(markdown_report(manifest))
        if results:
            _plot_metrics(out / "metrics.png", manifest["metrics"])
            _plot_similarity_hist(out / "similarity_hist.png", best, protocol)
            _plot_pca(out / "pca_styles.png", best, np.asarray(held_out.styles), max_plot_points, seed)
        names = sorted(p.name for p in out.iterdir())
        storage.put_dir(out, f"eval/{version}")
    return names
