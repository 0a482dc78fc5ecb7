"""Why a hit is similar: the query's and the hit's audio descriptors compared per facet (pure).

Each facet of expression (``mess_ray.facets.FACETS``) is spoken for by a group of audio
descriptors (``FACET_DESCRIPTORS``). For every hit we put the two passages' values side by
side in words ("tempo: 4.1 vs 4.3 onsets/s, timing variability 0.12 vs 0.15"), give a
closeness in [0, 1] per facet (``exp(-|difference| / scale)`` averaged over the group, with
scales a listener would call "a clear difference"), and, for faceted embeddings, the cosine
of that facet's part of the embedding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mess_ray.descriptors import FACET_DESCRIPTORS
from mess_ray.facets import FACET_LABELS

# name -> (label, unit, format, scale): scale is a difference one hears clearly, so a
# difference of one scale gives closeness exp(-1) = 0.37.
DESCRIPTOR_TEXT: dict[str, tuple[str, str, str, float]] = {
    "onset_rate_hz": ("onsets", "/s", ".1f", 1.0),
    "ioi_cv": ("timing variability", "", ".2f", 0.15),
    "loudness_mean_db": ("mean loudness", " dB", ".1f", 6.0),
    "loudness_std_db": ("loudness spread", " dB", ".1f", 3.0),
    "loudness_range_db": ("loudness range", " dB", ".1f", 6.0),
    "loudness_slope_db_per_s": ("loudness trend", " dB/s", "+.1f", 2.0),
    "flux_mean": ("attack sharpness (spectral flux)", "", ".3f", 0.02),
    "sustain_ratio": ("sustain (legato)", "", ".2f", 0.15),
    "centroid_mean_hz": ("brightness (spectral centroid)", " Hz", ".0f", 300.0),
    "centroid_std_hz": ("brightness spread", " Hz", ".0f", 150.0),
}


def _text(name: str) -> tuple[str, str, str, float | None]:
    # A descriptor added to FACET_DESCRIPTORS later still gets compared (relative scale).
    return DESCRIPTOR_TEXT.get(name, (name.replace("_", " "), "", ".3g", None))


def closeness(name: str, a: float, b: float) -> float:
    """exp(-|a - b| / scale) of one descriptor: 1 for equal values (relative scale when unknown)."""
    scale = _text(name)[3] or max(abs(a), abs(b), 1e-9)
    return math.exp(-abs(a - b) / scale)


def compare_facet(
    facet: str,
    query: Mapping[str, float],
    hit: Mapping[str, float],
    part_similarity: float | None = None,
) -> dict[str, Any]:
    """One facet's comparison: values side by side, closeness and the sentence shown to users."""
    names = FACET_DESCRIPTORS[facet]
    phrases = []
    for name in names:
        label, unit, fmt, _ = _text(name)
        phrases.append(f"{label} {format(query[name], fmt)} vs {format(hit[name], fmt)}{unit}")
    close = sum(closeness(n, query[n], hit[n]) for n in names) / len(names)
    return {
        "facet": facet,
        "label": FACET_LABELS.get(facet, facet),
        "query": {n: round(float(query[n]), 4) for n in names},
        "hit": {n: round(float(hit[n]), 4) for n in names},
        "closeness": round(close, 3),
        "embedding_similarity": None
        if part_similarity is None
        else round(float(part_similarity), 4),
        "text": f"{FACET_LABELS.get(facet, facet)}: " + ", ".join(phrases),
    }


def explain_hit(
    query: Mapping[str, float],
    hit: Mapping[str, float],
    facet_similarities: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Every facet compared, most alike first (by embedding similarity when known, else closeness)."""
    sims = facet_similarities or {}
    rows = [compare_facet(f, query, hit, sims.get(f)) for f in FACET_DESCRIPTORS]
    key = (
        (lambda r: r["embedding_similarity"])
        if all(r["embedding_similarity"] is not None for r in rows)
        else (lambda r: r["closeness"])
    )
    return sorted(rows, key=key, reverse=True)
