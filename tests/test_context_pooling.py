"""Phrase-level context: a segment's vector pooled with its neighbours in the same recording."""

from __future__ import annotations

import numpy as np
import pytest

from mess_ray.segments import pool_neighbours


def test_pool_neighbours_mixes_only_nearby_segments_of_the_same_recording():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, 8))
    tracks = ["a", "a", "a", "a", "b", "b"]
    starts = [0.0, 2.0, 4.0, 8.0, 0.0, 2.0]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert np.allclose(pool_neighbours(vectors, tracks, starts, 2.0, 0), unit)
    pooled = pool_neighbours(vectors, tracks, starts, 2.0, 1, decay=0.5)
    assert np.allclose(np.linalg.norm(pooled, axis=1), 1.0)
    expected = unit[1] + 0.5 * (unit[0] + unit[2])  # segment at 4 s is 2 steps from 8 s: out
    assert np.allclose(pooled[1], expected / np.linalg.norm(expected))
    assert np.allclose(pooled[3], unit[3])  # no neighbour within one hop
    b = unit[4] + 0.5 * unit[5]
    assert np.allclose(pooled[4], b / np.linalg.norm(b))  # track b never mixes with track a
    wider = pool_neighbours(vectors, tracks, starts, 2.0, 2, decay=0.5)
    e = unit[2] + 0.5 * unit[1] + 0.25 * (unit[0] + unit[3])
    assert np.allclose(wider[2], e / np.linalg.norm(e))
    with pytest.raises(ValueError):
        pool_neighbours(vectors, tracks[:-1], starts, 2.0, 1)
    with pytest.raises(ValueError):
        pool_neighbours(vectors, tracks, starts, 2.0, -1)
