"""The faceted-embedding contract: composition, weighted queries and their exactness."""

import numpy as np
import pytest

from mess_ray.facets import (
    FACETS,
    OVERALL,
    compose,
    layout_dim,
    make_layout,
    normalize_weights,
    parse_layout,
    parse_weight_items,
    part_similarities,
    weighted_query,
)


def _random_faceted(rng, layout, n):
    parts = {name: rng.normal(size=(n, end - start)) for name, (start, end) in layout.items()}
    return compose(parts, layout)


def test_layout_is_contiguous_and_round_trips_through_json_lists():
    layout = make_layout(64, 16)
    assert list(layout) == [OVERALL, *FACETS]
    assert layout_dim(layout) == 128
    assert parse_layout({k: list(v) for k, v in layout.items()}) == layout
    with pytest.raises(ValueError, match="contiguous"):
        parse_layout({"overall": [0, 4], "tempo": [5, 8]})
    with pytest.raises(ValueError, match="start with"):
        parse_layout({"tempo": [0, 4]})


def test_composed_vectors_are_unit_norm_and_dot_is_mean_of_part_cosines():
    rng = np.random.default_rng(0)
    layout = make_layout(8, 4)
    e = _random_faceted(rng, layout, 5)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    parts = part_similarities(e[0], e, layout)
    mean_cos = np.mean([parts[p] for p in layout], axis=0)
    np.testing.assert_allclose(e @ e[0], mean_cos, rtol=1e-5, atol=1e-6)


def test_weighted_query_scores_equal_the_weighted_sum_of_part_cosines():
    rng = np.random.default_rng(1)
    layout = make_layout(8, 4)
    e = _random_faceted(rng, layout, 50)
    weights = {"tempo": 3.0, "timbre": 1.0}
    q = weighted_query(e[0], layout, weights)
    parts = part_similarities(e[0], e, layout)
    expected = 0.75 * parts["tempo"] + 0.25 * parts["timbre"]
    np.testing.assert_allclose(e @ q, expected, rtol=1e-4, atol=1e-5)
    # No weights: the plain embedding, unchanged.
    np.testing.assert_allclose(weighted_query(e[0], layout, None), e[0])


def test_timeline_facet_weight_ranks_as_the_timeline_reweighted_to_its_share():
    """README's opt-in: facet weights 1 for the five other parts and W = 5w / (1 - w) for the
    timeline score exactly as the timeline part re-weighted to share w of the cosine (the
    ``[timeline@w]`` variant of ``benchmarks.protocol_context``)."""
    from mess_ray.facets import TIMELINE, join

    rng = np.random.default_rng(2)
    layout = {**make_layout(8, 4), TIMELINE: (24, 40)}
    e = _random_faceted(rng, layout, 40)
    start, end = layout[TIMELINE]
    for w in (0.35, 0.5):
        reweighted = join([e[:, :start], e[:, start:end]], [1 - w, w])
        weights = {name: 1.0 for name in layout} | {TIMELINE: 5 * w / (1 - w)}
        q = weighted_query(e[0], layout, weights)
        np.testing.assert_allclose(e @ q, reweighted @ reweighted[0], rtol=1e-4, atol=1e-5)


def test_bad_weights_are_named():
    layout = make_layout(8, 4)
    with pytest.raises(ValueError, match="unknown facet"):
        normalize_weights({"loudness": 1.0}, layout)
    with pytest.raises(ValueError, match=">= 0"):
        normalize_weights({"tempo": -1.0}, layout)
    with pytest.raises(ValueError, match="> 0"):
        normalize_weights({"tempo": 0.0}, layout)
    with pytest.raises(ValueError, match="dim"):
        weighted_query(np.zeros(5), layout, None)


def test_weight_strings_parse_to_floats_and_malformed_items_name_the_flag():
    assert parse_weight_items([" tempo=2", "timbre =0.5"]) == {"tempo": 2.0, "timbre": 0.5}
    assert parse_weight_items([]) == {}
    for item in ["tempo", "tempo=fast", "=1", "tempo="]:
        with pytest.raises(ValueError, match=f"--query-facet-weights '{item}' must look like"):
            parse_weight_items([item], "--query-facet-weights")
