"""What a similarity means: each hit's percentile against the corpus and the facet that made it close."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from mess_ray.facets import FACETS, compose, make_layout
from mess_ray.index.faiss_index import IndexSpec, build_index
from mess_ray.index.job import INDEX_METADATA_COLUMNS
from mess_ray.index.searcher import PERCENTILE_SAMPLE, SearchIndex, percentile_of
from mess_ray.segments import segment_id
from mess_ray.serve.client import format_hits


def faceted_index(n: int, seed: int = 0):
    layout = make_layout(8, 4)
    rng = np.random.default_rng(seed)
    parts = {name: rng.normal(size=(n, end - start)) for name, (start, end) in layout.items()}
    x = compose(parts, layout).astype(np.float32)
    rows = {c: [] for c in INDEX_METADATA_COLUMNS}
    for i in range(n):
        rows["segment_id"].append(segment_id(f"t{i // 10}", i * 16000))
        rows["track_id"].append(f"t{i // 10}")
        rows["piece_id"].append("p")
        rows["style"].append("")
        rows["start_s"].append(float(i % 10))
        rows["end_s"].append(float(i % 10) + 2)
        rows["sample_rate"].append(16000)
        rows["source_uri"].append(f"/a/t{i // 10}.wav")
        rows["metadata_json"].append(json.dumps({}))
    ids = np.array(rows["segment_id"], dtype=np.int64)
    spec = IndexSpec(type="flat", dim=x.shape[1])
    manifest = {"facet_layout": {k: list(v) for k, v in layout.items()}}
    return SearchIndex(build_index(spec, [(x, ids)]), pa.table(rows), spec, manifest), x, layout


def test_percentile_counts_the_sample_below_with_half_ties():
    scores = np.sort(np.array([0.1, 0.2, 0.2, 0.9]))
    assert percentile_of(scores, 0.95) == 100.0
    assert percentile_of(scores, 0.0) == 0.0
    assert percentile_of(scores, 0.2) == 50.0  # one below, two ties: (1 + 1) / 4


def test_hits_carry_percentile_against_the_corpus_and_closest_facet():
    si, x, layout = faceted_index(300)
    hits = si.search(x[7], k=5)
    # A small index is its own sample: the percentile is exact against every passage.
    assert len(si.corpus_sample()) == 300
    all_scores = np.sort(x @ (x[7] / np.linalg.norm(x[7])))
    for hit in hits:
        assert hit.percentile == percentile_of(all_scores, hit.similarity)
    assert hits[0].percentile >= 99.5 and hits[-1].percentile > 95
    # Percentiles fall as similarities do.
    assert [h.percentile for h in hits] == sorted((h.percentile for h in hits), reverse=True)
    for hit in hits:
        assert set(hit.facet_percentiles) == set(FACETS)
        best = max(FACETS, key=lambda n: (hit.facet_percentiles[n], hit.facet_similarities[n]))
        assert hit.closest_facet == best


def test_closest_facet_names_the_part_that_matches():
    si, x, layout = faceted_index(200, seed=1)
    # A query equal to passage 3 in tempo only, random elsewhere: tempo made passage 3 close.
    rng = np.random.default_rng(5)
    start, end = layout["tempo"]
    parts = {name: rng.normal(size=(1, e - s)) for name, (s, e) in layout.items()}
    parts["tempo"] = x[3:4, start:end]
    query = compose(parts, layout)[0]
    hit = next(h for h in si.search(query, k=200) if h.segment_id == faceted_segment_id(3))
    assert hit.closest_facet == "tempo" and hit.facet_percentiles["tempo"] >= 99.5


def faceted_segment_id(i: int) -> int:
    return segment_id(f"t{i // 10}", i * 16000)


def test_large_index_uses_a_fixed_seeded_sample():
    si, x, _ = faceted_index(PERCENTILE_SAMPLE + 300)
    first = si.corpus_sample()
    assert len(first) == PERCENTILE_SAMPLE
    again, _, _ = faceted_index(PERCENTILE_SAMPLE + 300)
    np.testing.assert_array_equal(again.corpus_sample(), first)
    assert si.search(x[0], k=1)[0].percentile == 100.0


def test_cli_table_shows_percentile_and_facet():
    result = {
        "hits": [
            {
                "rank": 1,
                "track_id": "a",
                "start_s": 0.0,
                "end_s": 4.0,
                "similarity": 0.991,
                "percentile": 99.7,
                "closest_facet": "tempo",
                "style": "",
                "piece_id": "a",
            },
            {
                "rank": 2,
                "track_id": "b",
                "start_s": 2.0,
                "end_s": 6.0,
                "similarity": 0.95,
                "style": "",
                "piece_id": "b",
            },
        ]
    }
    lines = format_hits(result).splitlines()
    assert "percentile" in lines[0] and "closest facet" in lines[0]
    assert "99.7" in lines[2] and "tempo" in lines[2]
    assert lines[3].split()[4] == "-"  # older servers: no percentile, shown as a dash
