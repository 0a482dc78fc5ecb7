"""The train/validation/test split by piece, the split by pianist, and the piece bootstrap."""

import numpy as np
import pytest

from mess_ray.eval.bootstrap import cluster_bootstrap, paired_difference, verdict
from mess_ray.segments import split_pieces
from mess_ray.splits import pianist_of, split_by_pianist, split_by_piece

PIECES = [f"piece-{i:03d}" for i in range(60)]


def test_piece_split_puts_every_piece_on_exactly_one_side():
    split = split_by_piece(PIECES, 0.34, seed=3)
    sides = [set(split.train), set(split.validation), set(split.test)]
    assert set().union(*sides) == set(PIECES)
    assert sum(len(s) for s in sides) == len(PIECES)
    assert split.validation and split.test and split.train
    assert {split.side(p) for p in PIECES} == {"train", "validation", "test"}


def test_piece_split_holdout_is_what_training_already_excludes():
    split = split_by_piece(PIECES, 0.34, seed=1)
    train, held_out = split_pieces(PIECES, 0.34, seed=1)
    assert list(split.train) == train
    assert list(split.held_out) == held_out


def test_piece_split_is_stable_when_pieces_are_added():
    small = split_by_piece(PIECES, 0.34, seed=0)
    large = split_by_piece(PIECES + [f"new-{i}" for i in range(40)], 0.34, seed=0)
    for piece in PIECES:
        assert small.side(piece) == large.side(piece)


def test_piece_split_depends_on_the_seed_and_rejects_bad_shares():
    assert split_by_piece(PIECES, 0.34, seed=0) != split_by_piece(PIECES, 0.34, seed=1)
    with pytest.raises(ValueError):
        split_by_piece(PIECES, 0.34, validation_share=1.0)


def test_small_corpus_keeps_a_validation_and_a_test_piece():
    split = split_by_piece(["a", "b", "c", "d", "e"], 0.34)
    assert len(split.validation) >= 1 and len(split.test) >= 1


@pytest.mark.parametrize(
    "tag, pianist",
    [
        ("Yarden03", "yarden"),
        ("ParkJH05", "parkjh"),
        ("Shi05M", "shi"),
        ("Bult-ItoS02M", "bult-itos"),
    ],
)
def test_pianist_comes_from_the_performer_tag(tag, pianist):
    assert pianist_of(tag) == pianist


def test_pianist_split_is_disjoint_and_stable():
    names = [f"pianist{i}" for i in range(50)]
    split = split_by_pianist(names, 0.5, seed=0)
    assert not set(split.train) & set(split.test)
    assert set(split.train) | set(split.test) == set(names)
    bigger = split_by_pianist(names + [f"other{i}" for i in range(30)], 0.5, seed=0)
    assert set(split.test) <= set(bigger.test) and set(split.train) <= set(bigger.train)
    with pytest.raises(ValueError):
        pianist_of("")


def _piece_data(piece_sd: float, rng, pieces=12, per_piece=20, offset=0.0):
    effects = rng.normal(0, piece_sd, pieces)
    values = np.concatenate([offset + e + rng.normal(0, 0.05, per_piece) for e in effects])
    clusters = np.repeat([f"p{i}" for i in range(pieces)], per_piece)
    return values, clusters


def test_interval_widens_when_piece_effects_dominate():
    rng = np.random.default_rng(0)
    flat = cluster_bootstrap(*_piece_data(0.0, rng), seed=0)
    clustered = cluster_bootstrap(*_piece_data(0.3, rng), seed=0)
    assert (clustered.high - clustered.low) > 4 * (flat.high - flat.low)
    assert flat.low <= flat.value <= flat.high and flat.clusters == 12 and flat.queries == 240


def test_piece_bootstrap_is_wider_than_a_query_bootstrap_with_piece_effects():
    rng = np.random.default_rng(1)
    values, clusters = _piece_data(0.3, rng)
    by_piece = cluster_bootstrap(values, clusters, seed=0)
    by_query = cluster_bootstrap(values, np.arange(values.size), seed=0)
    assert (by_piece.high - by_piece.low) > 2 * (by_query.high - by_query.low)


def test_paired_difference_finds_a_real_gap_and_not_a_fake_one():
    rng = np.random.default_rng(2)
    base, clusters = _piece_data(0.3, rng)
    better = base + 0.05 + rng.normal(0, 0.02, base.size)
    same = base + rng.normal(0, 0.02, base.size)
    gap = paired_difference(better, base, clusters, seed=0)
    assert gap.excludes_zero() and verdict(gap) == "wins"
    assert verdict(paired_difference(base, better, clusters, seed=0)) == "loses"
    assert verdict(paired_difference(same, base, clusters, seed=0)) == "ties"
    # unpaired intervals of the two systems overlap (piece effects), the paired one does not
    a, b = cluster_bootstrap(better, clusters), cluster_bootstrap(base, clusters)
    assert a.low < b.high


def test_bootstrap_ignores_nan_and_rejects_bad_input():
    values = np.array([1.0, np.nan, 0.0, 1.0])
    out = cluster_bootstrap(values, ["a", "a", "b", "b"])
    assert out.queries == 3 and out.value == pytest.approx(2 / 3)
    assert np.isnan(cluster_bootstrap([np.nan], ["a"]).value)
    with pytest.raises(ValueError):
        cluster_bootstrap([1.0, 2.0], ["a"])
