"""Pretraining on a share of the audio (pretrain.audio_fraction, mess_ray.splits.pretrain_audio)
and the helpers of benchmarks/model_scale.py (tiny vs small, the learning curve)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from benchmarks import model_scale as bench
from mess_ray.config import load_config
from mess_ray.splits import covered_seconds, pretrain_audio


def segment_table(performances: int = 40, chains=("dry", "eval-1"), clips: int = 4) -> pa.Table:
    """Four overlapping 4 s windows at a 2 s hop per track (10 s covered), two chains each."""
    rows = []
    for p in range(performances):
        for chain in chains:
            for i in range(clips):
                rows.append(
                    {
                        "track_id": f"piece{p % 5}__perf{p}__{chain}",
                        "piece_id": f"piece{p % 5}",
                        "start_s": 2.0 * i,
                        "end_s": 2.0 * i + 4.0,
                        "metadata_json": json.dumps({"performance_id": f"piece{p % 5}__perf{p}"}),
                    }
                )
    return pa.Table.from_pylist(rows)


def test_overlapping_segments_count_their_audio_once():
    assert covered_seconds([0.0, 2.0, 4.0], [4.0, 6.0, 8.0]) == 8.0
    assert covered_seconds([10.0, 0.0], [12.0, 4.0]) == 6.0  # a gap is not audio
    assert covered_seconds([0.0, 1.0], [4.0, 3.0]) == 4.0  # a window inside another


def test_a_share_keeps_whole_performances_and_smaller_shares_are_nested():
    table = segment_table()
    full = pretrain_audio(table, 1.0, seed=0)
    assert len(full.kept_tracks) == 80 and not full.left_out_tracks
    assert full.segments == 320 and full.seconds == pytest.approx(80 * 10.0)
    quarter, half = pretrain_audio(table, 0.25, seed=0), pretrain_audio(table, 0.5, seed=0)
    assert set(quarter.kept_tracks) < set(half.kept_tracks) < set(full.kept_tracks)
    assert 0 < len(quarter.kept_tracks) < len(half.kept_tracks) < 80
    for share in (quarter, half):
        # Both chains of a performance go together: positives across chains stay pairs.
        performances = {t.rsplit("__", 1)[0] for t in share.kept_tracks}
        assert len(share.kept_tracks) == 2 * len(performances)
        assert set(share.kept_tracks) | set(share.left_out_tracks) == set(full.kept_tracks)
        assert share.segments == 4 * len(share.kept_tracks)
        assert share.seconds == pytest.approx(10.0 * len(share.kept_tracks))
    assert pretrain_audio(table, 0.5, seed=0) == half  # seeded: the same draw again
    assert pretrain_audio(table, 0.5, seed=1).kept_tracks != half.kept_tracks
    counts = half.counts()
    assert counts["pretrain_audio_hours"] == pytest.approx(counts["pretrain_audio_s"] / 3600, 1e-3)


def test_excluded_pieces_and_tracks_are_neither_kept_nor_left_out():
    table = segment_table()
    dropped_track = "piece1__perf1__dry"
    share = pretrain_audio(
        table, 0.5, seed=0, exclude_pieces=["piece0"], exclude_tracks=[dropped_track]
    )
    listed = set(share.kept_tracks) | set(share.left_out_tracks)
    assert not any(t.startswith("piece0__") for t in listed)
    assert dropped_track not in listed and len(listed) == 80 - 16 - 1


def test_a_share_outside_0_1_or_keeping_nothing_is_refused():
    table = segment_table(performances=1)
    with pytest.raises(ValueError, match="audio_fraction"):
        pretrain_audio(table, 0.0)
    with pytest.raises(ValueError, match="audio_fraction"):
        pretrain_audio(table, 1.5)
    with pytest.raises(ValueError, match="keeps none"):
        pretrain_audio(table, 1e-9)
    with pytest.raises(ValueError, match="audio_fraction"):
        load_config(None, ["pretrain.audio_fraction=0"])
    assert load_config(None, []).pretrain.audio_fraction == 1.0


def test_variants_parse_and_name_their_stores():
    assert bench.parse_variant("tiny") == bench.Variant("tiny", 1.0)
    assert bench.parse_variant("small@0.5").name == "small-0.5"
    assert bench.parse_variant("tiny").name == "tiny-1.0"
    for bad in ("huge", "tiny@0", "tiny@1.5", "tiny@x"):
        with pytest.raises(ValueError):
            bench.parse_variant(bad)


def test_steps_scale_with_the_share_of_segments():
    assert bench.scaled_steps(100, 1650, 1650) == 100
    assert bench.scaled_steps(100, 428, 1650) == 26
    assert bench.scaled_steps(100, 1, 1650) == 1
    with pytest.raises(ValueError):
        bench.scaled_steps(100, 0, 1650)


def test_variant_stores_link_the_corpus_without_writing_into_the_source(tmp_path):
    source = tmp_path / "source"
    for stage in ("render", "ingest"):
        (source / stage).mkdir(parents=True)
        (source / stage / "LATEST").write_text("v1")
    before = sorted(p.name for p in source.rglob("*"))
    target = tmp_path / "runs" / "tiny-0.5"
    bench.link_corpus(source, target)
    bench.link_corpus(source, target)  # again: the links are already there
    assert (target / "ingest" / "LATEST").read_text() == "v1"
    assert (target / "render").resolve() == (source / "render").resolve()
    assert sorted(p.name for p in source.rglob("*")) == before
    other = tmp_path / "other"
    (other / "render").mkdir(parents=True)
    (other / "render" / "LATEST").write_text("v2")
    (other / "ingest").mkdir()
    (other / "ingest" / "LATEST").write_text("v2")
    with pytest.raises(FileExistsError):
        bench.link_corpus(other, target)
    with pytest.raises(FileNotFoundError, match="no published"):
        bench.link_corpus(tmp_path / "empty", tmp_path / "x")


def row(split, task, chains, metric, system, value=0.5):
    return {
        "split": split,
        "task": task,
        "chains": chains,
        "metric": metric,
        "system": system,
        "value": value,
        "ci_low": value - 0.1,
        "ci_high": value + 0.1,
        "pieces": 5,
    }


def test_only_the_reported_validation_rows_are_read_back():
    rows = [
        row("validation", "performer_identity", "dry", "map", "finetune"),
        row("validation", "performer_identity", "dry", "map", "descriptor_head"),
        row("test", "performer_identity", "dry", "map", "finetune"),
        row("validation", "performer_identity", "dry->eval-1", "map", "finetune"),
        row("validation", "chain_invariance", "dry->eval-1", "recall@1", "pretrain"),
        row("validation", "expressive_agreement", "dry", "ndcg@10", "finetune"),
    ]
    got = bench.validation_rows({"protocol": {"rows": rows}})
    assert {(r["task"], r["chains"], r["system"]) for r in got} == {
        ("performer_identity", "dry", "finetune"),
        ("performer_identity", "dry", "descriptor_head"),
        ("chain_invariance", "dry->eval-1", "pretrain"),
        ("expressive_agreement", "dry", "finetune"),
    }
    assert all(r["split"] == "validation" for r in got)
    with pytest.raises(RuntimeError, match="no protocol table"):
        bench.validation_rows({"protocol": {"skipped": "no pieces"}})


def test_the_curve_orders_points_by_hours_of_pretraining_audio(tmp_path):
    def result(size, fraction, hours, value):
        return {
            "size": size,
            "audio_fraction": fraction,
            "pretrain_audio_hours": hours,
            "rows": [
                row("validation", "performer_identity", "dry", "map", "finetune", value),
                row("validation", "performer_identity", "dry", "map", "descriptors", 0.2),
            ],
        }

    results = [result("tiny", 1.0, 0.9, 0.3), result("tiny", 0.25, 0.2, 0.1)]
    results.append(result("small", 1.0, 0.9, 0.9))
    points = bench.curve_points(results)
    assert list(points) == [("performer_identity", "dry", "map", "finetune")]
    assert [p[:2] for p in points[("performer_identity", "dry", "map", "finetune")]] == [
        (0.2, 0.1),
        (0.9, 0.3),
    ]
    bench.plot_curve(results, str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_paired_rows_name_the_variants_and_their_reference():
    first, second = "/runs/tiny-1.0/finetune/v1/model", "/runs/small-1.0/finetune/v2/model"
    compared = {
        **row("validation", "performer_identity", "dry", "map", second, 0.6),
        "reference": first,
        "diff": -0.1,
    }
    rows = [
        row("validation", "performer_identity", "dry", "map", first),
        compared,
        {
            **row("validation", "performer_identity", "dry", "map", "descriptors"),
            "reference": first,
        },
    ]
    got = bench.paired_rows(
        {"protocol": {"rows": rows}}, {first: "tiny-1.0:finetune", second: "small-1.0:finetune"}
    )
    assert [r["system"] for r in got] == ["tiny-1.0:finetune", "small-1.0:finetune"]
    assert got[1]["reference"] == "tiny-1.0:finetune" and got[1]["diff"] == -0.1
