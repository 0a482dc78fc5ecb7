"""The index benchmark runs end to end at a tiny size and prints every figure against exact search."""

from __future__ import annotations

import json

import pytest

from benchmarks import index_search


@pytest.mark.slow
def test_benchmark_prints_all_figures(capsys):
    assert (
        index_search.main(
            [
                "--sizes",
                "3000",
                "--queries",
                "40",
                "--skip-real",
                "--nprobes",
                "2,8",
                "--pq-nprobes",
                "8",
                "--ef-searches",
                "16",
            ]
        )
        == 0
    )
    rows = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    figures = {r["figure"] for r in rows}
    assert figures == {"recall_latency", "build", "build_estimate", "target", "run"}
    curves = [r for r in rows if r["figure"] == "recall_latency"]
    assert {r["index"] for r in curves} == {"flat", "ivf", "ivfpq+rerank", "hnsw"}
    flat = next(r for r in curves if r["index"] == "flat")
    assert flat["recall@10"] == 1.0  # exact search is its own ground truth
    assert all(
        0 <= r["recall@10"] <= 1 and r["p50_ms"] <= r["p99_ms"] and "exact_p99_ms" in r
        for r in curves
    )
    ivf = sorted((r for r in curves if r["index"] == "ivf"), key=lambda r: r["nprobe"])
    assert ivf[0]["recall@10"] <= ivf[-1]["recall@10"]  # probing more lists never loses recall
    estimates = [r for r in rows if r["figure"] == "build_estimate"]
    assert estimates and all(r["extrapolated"] and r["n"] == 100_000_000 for r in estimates)


def test_benchmark_embeds_an_ingest_corpus_as_real_embeddings(tmp_path, capsys):
    import helpers
    from helpers import tiny_config

    from mess_ray.storage import Storage

    cfg = tiny_config(str(tmp_path / "store"))
    table = helpers.publish_tiny_ingest(
        cfg, Storage(cfg.storage.root), n_tracks=6, seconds=8.0, files=1
    )
    assert (
        index_search.main(
            [
                "--real-only",
                "--ingest",
                cfg.storage.root,
                "--queries",
                "10",
                "--nprobes",
                "2",
                "--pq-nprobes",
                "2",
                "--ef-searches",
                "16",
            ]
        )
        == 0
    )
    rows = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    curves = [r for r in rows if r["figure"] == "recall_latency"]
    assert curves and all(
        r["dataset"].startswith(f"real: {table.num_rows} segments of ingest") for r in curves
    )
    # queries are held out of the corpus (at most a fifth of it)
    assert {r["n"] for r in curves} == {table.num_rows - min(10, table.num_rows // 5)}
    assert next(r for r in curves if r["index"] == "flat")["recall@10"] == 1.0


def test_ondisk_benchmark_reports_both_merges_and_identical_answers(tmp_path, capsys):
    from benchmarks import index_ondisk

    assert (
        index_ondisk.main(
            [
                "--n",
                "4000",
                "--dim",
                "16",
                "--shards",
                "3",
                "--queries",
                "20",
                "--workdir",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    merges = {r["mode"]: r for r in rows if r["figure"] == "merge"}
    assert set(merges) == {"in_memory", "ondisk"} and all(
        r["ntotal"] == 4000 for r in merges.values()
    )
    assert (
        "index.ivfdata" in merges["ondisk"]["files_mb"]
        and "index.ivfdata" not in merges["in_memory"]["files_mb"]
    )
    searches = [r for r in rows if r["figure"] == "load_search"]
    assert len(searches) == 2 and all(
        r["same_top10_as_in_memory"] and 0 < r["recall@10"] <= 1 for r in searches
    )
