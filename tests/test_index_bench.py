"""The index benchmark runs end to end at a tiny size and prints every figure against exact search."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import index_search  # noqa: E402


def test_benchmark_prints_all_figures(capsys):
    assert index_search.main(["--sizes", "3000", "--queries", "40", "--skip-real", "--nprobes", "2,8",
                              "--pq-nprobes", "8", "--ef-searches", "16"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    figures = {r["figure"] for r in rows}
    assert figures == {"recall_latency", "build", "build_estimate", "target", "run"}
    curves = [r for r in rows if r["figure"] == "recall_latency"]
    assert {r["index"] for r in curves} == {"flat", "ivf", "ivfpq+rerank", "hnsw"}
    flat = next(r for r in curves if r["index"] == "flat")
    assert flat["recall@10"] == 1.0  # exact search is its own ground truth
    assert all(0 <= r["recall@10"] <= 1 and r["p50_ms"] <= r["p99_ms"] and "exact_p99_ms" in r for r in curves)
    ivf = sorted((r for r in curves if r["index"] == "ivf"), key=lambda r: r["nprobe"])
    assert ivf[0]["recall@10"] <= ivf[-1]["recall@10"]  # probing more lists never loses recall
    estimates = [r for r in rows if r["figure"] == "build_estimate"]
    assert estimates and all(r["extrapolated"] and r["n"] == 100_000_000 for r in estimates)
