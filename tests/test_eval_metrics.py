"""Retrieval metrics: hand-computed cases and agreement with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, ndcg_score

from mess_ray.eval import metrics


def test_average_precision_hand_case():
    # Ranking by similarity: items 0,1,2,3 -> relevance 1,0,1,0 -> AP = (1/1 + 2/3) / 2
    sim = np.array([[0.9, 0.8, 0.7, 0.1]])
    rel = np.array([[1, 0, 1, 0]], dtype=bool)
    assert metrics.average_precision(sim, rel)[0] == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.reciprocal_rank(sim, rel)[0] == pytest.approx(1.0)
    assert metrics.recall_at_k(sim, rel, k=1)[0] == 1.0
    assert metrics.recall_at_k(sim, rel, k=2, mode="fraction")[0] == pytest.approx(0.5)
    # 2 relevant of 4: a random ranking's expected AP, not the fraction 0.5
    assert metrics.chance_level(rel)[0] == pytest.approx(49 / 72)


def test_candidate_mask_excludes_items():
    # The query itself (item 0) is the most similar and relevant; masking it out matters.
    sim = np.array([[1.0, 0.5, 0.4, 0.3]])
    rel = np.array([[1, 0, 1, 0]], dtype=bool)
    mask = np.array([[False, True, True, True]])
    assert metrics.average_precision(sim, rel, mask)[0] == pytest.approx(0.5)
    assert metrics.reciprocal_rank(sim, rel, mask)[0] == pytest.approx(0.5)
    assert metrics.recall_at_k(sim, rel, mask, k=1)[0] == 0.0
    assert metrics.chance_level(rel, mask)[0] == pytest.approx(11 / 18)  # H_3 / 3, one of 3


def test_chance_is_the_mean_ap_over_every_ranking():
    import itertools

    for relevant in ([1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]):
        rel = np.array([relevant], dtype=bool)
        aps = [
            metrics.average_precision(np.array([order], dtype=float), rel)[0]
            for order in itertools.permutations(range(5))
        ]
        assert metrics.chance_level(rel)[0] == pytest.approx(np.mean(aps))
    assert np.isnan(metrics.chance_level(np.zeros((1, 4), bool))[0])


def test_queries_without_relevant_items_are_nan_and_left_out():
    sim = np.array([[0.9, 0.1], [0.2, 0.8]])
    rel = np.array([[0, 1], [0, 0]], dtype=bool)
    ap = metrics.average_precision(sim, rel)
    assert ap[0] == pytest.approx(0.5) and np.isnan(ap[1])
    assert metrics.mean_average_precision(sim, rel) == pytest.approx(0.5)
    assert metrics.retrieval_summary(sim, rel)["evaluated_queries"] == 1


def test_ties_break_by_index_deterministically():
    sim = np.zeros((1, 4))
    rel = np.array([[0, 0, 0, 1]], dtype=bool)
    assert metrics.reciprocal_rank(sim, rel)[0] == pytest.approx(0.25)


def test_average_precision_matches_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(20, 50))
    rel = rng.random((20, 50)) < 0.2
    rel[:, 0] = True  # every query has a relevant item
    ours = metrics.average_precision(sim, rel)
    theirs = [average_precision_score(rel[q], sim[q]) for q in range(20)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    # With a mask, sklearn sees only the candidate columns.
    mask = rng.random((20, 50)) < 0.7
    mask[:, 0] = True
    ours = metrics.average_precision(sim, rel, mask)
    theirs = [average_precision_score(rel[q, mask[q]], sim[q, mask[q]]) for q in range(20)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_ndcg_matches_sklearn_with_graded_relevance():
    rng = np.random.default_rng(1)
    sim = rng.normal(size=(15, 30))
    grades = rng.integers(0, 4, size=(15, 30)).astype(float)
    grades[:, 0] = 3
    for k in (1, 5, 10):
        ours = metrics.ndcg_at_k(sim, grades, k=k)
        theirs = [ndcg_score(grades[q : q + 1], sim[q : q + 1], k=k) for q in range(15)]
        np.testing.assert_allclose(ours, theirs, rtol=1e-10)


def test_ndcg_hand_case():
    sim = np.array([[0.9, 0.8, 0.7]])
    rel = np.array([[0, 1, 1]])
    dcg = 1 / np.log2(3) + 1 / np.log2(4)
    ideal = 1 + 1 / np.log2(3)
    assert metrics.ndcg_at_k(sim, rel, k=3)[0] == pytest.approx(dcg / ideal)
    assert metrics.ndcg_at_k(sim, rel, k=1)[0] == 0.0


def test_pair_similarity_and_triplet_loss_hand_case():
    sim = np.array([[0.0, 0.9, 0.5, 0.8]])
    pos = np.array([[False, True, False, False]])
    neg = np.array([[False, False, True, True]])
    assert metrics.mean_pair_similarity(sim, pos) == pytest.approx(0.9)
    assert metrics.mean_pair_similarity(sim, neg) == pytest.approx(0.65)
    loss, accuracy, count = metrics.triplet_margin_loss(sim, pos, neg, margin=0.2)
    # triplets: (0.9 vs 0.5) -> max(0, 0.5-0.9+0.2)=0 ; (0.9 vs 0.8) -> 0.1
    assert count == 2
    assert loss == pytest.approx(0.05)
    assert accuracy == 1.0
    loss, accuracy, _ = metrics.triplet_margin_loss(sim, neg & (sim > 0.6), pos, margin=0.0)
    assert loss == pytest.approx(0.1) and accuracy == 0.0


def test_bad_input_gives_value_errors():
    with pytest.raises(ValueError, match="shape"):
        metrics.average_precision(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="candidate mask"):
        metrics.average_precision(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="k must be"):
        metrics.recall_at_k(np.zeros((1, 3)), np.ones((1, 3)), k=0)
    with pytest.raises(ValueError, match="both a positive and a negative"):
        metrics.triplet_margin_loss(np.zeros((1, 2)), np.ones((1, 2), bool), np.ones((1, 2), bool))
