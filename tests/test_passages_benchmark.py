"""benchmarks.passages' tuning mode: the grid, and how content.max_cost scores one alignment pass."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from benchmarks import passages


def test_grid_is_the_product_of_content_settings_and_refuses_other_keys():
    grid = {"content.max_cost": [0.3, 0.4], "content.dtw_step_weight": [2, 6, 10]}
    settings = passages.grid_settings(grid)
    assert len(settings) == 6
    assert {"content.dtw_step_weight": 6, "content.max_cost": 0.4} in settings
    with pytest.raises(ValueError, match="content"):
        passages.grid_settings({"eval.seed": [0, 1]})
    with pytest.raises(ValueError, match="non-empty"):
        passages.grid_settings({"content.max_cost": []})


def test_tuning_is_refused_on_the_test_split():
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.passages", "--grid", '{"content.max_cost": [0.4]}'],
        capture_output=True,
        text=True,
    )
    assert run.returncode != 0 and "--split train" in run.stderr


def test_an_alignment_above_max_cost_is_no_match_and_its_error_is_not_counted():
    # Two performances (a, b) of one piece, two 4 s segments each; the query is a's first.
    data = {
        "seg_track": np.asarray(["a", "a", "b", "b"], dtype=object),
        "seg_span": np.asarray([[0.0, 4.0], [2.0, 6.0], [0.0, 4.0], [2.0, 6.0]]),
        # chroma statistics alone rank b's wrong segment (3) above the right one (2)
        "base_sim": np.asarray([[1.0, 0.9, 0.2, 0.5]] * 4),
        "queries": [
            {
                "qi": 0,
                "piece": "x",
                "relevant": np.asarray([False, False, True, False]),
                # aligned at 0.1..3.9 in b (truth 0..4), cost 0.3
                "aligned": [("b", 0.1, 3.9, 0.3, (0.0, 4.0))],
            }
        ],
        "long_errs": ([], []),
        "align_ms": [1.0],
    }
    matched = passages.score_queries(data, max_cost=0.4)
    assert matched["aps"]["alignment"] == [1.0]  # the aligned span's segment ranks first
    assert matched["aps"]["chroma_stats"] == [0.5]
    assert np.allclose(matched["kept"], ([0.1], [0.1]))
    refused = passages.score_queries(data, max_cost=0.2)
    assert refused["aps"]["alignment"] == [0.5]  # back to chroma statistics
    assert refused["kept"] == ([], []) and np.allclose(refused["every"], ([0.1], [0.1]))


def test_per_piece_errors_count_every_piece_once_however_many_pairs_it_has():
    # a big piece aligned well (100 pairs at 0.1 s), two small ones badly (20 pairs at 1 and 2 s)
    starts = [0.1] * 100 + [1.0] * 20 + [2.0] * 20
    pieces = ["big"] * 100 + ["small"] * 20 + ["tiny"] * 20
    macro = passages.per_piece_p90(starts, starts, pieces)
    assert macro["pieces"] == 3 and macro["start_end_p90_by_piece"]["tiny"] == (2.0, 2.0)
    assert macro["end_p90_median_s"] == pytest.approx(1.0)  # the median piece
    assert passages.pct(starts, 90) == pytest.approx(2.0)  # pooled
    assert passages.per_piece_p90(starts, starts, pieces, min_pairs=50)["pieces"] == 1
