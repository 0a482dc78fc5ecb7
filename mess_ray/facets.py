"""Facets of expression and the layout of a faceted embedding (the contract between stages).

A model with facet heads embeds a segment as the concatenation of unit-norm *parts*: an
``overall`` part (trained for expressive similarity as a whole) then one part per facet
(tempo/rubato, dynamics, articulation, timbre), the whole scaled by ``1/sqrt(num_parts)``
so it is itself unit-norm. The inner product of two such vectors is therefore the *mean*
of the per-part cosines, and the index needs nothing special: a weighted search only scales
the query's parts (``weighted_query``), and FAISS inner-product search then ranks by
``sum_p w_p * cos_p`` exactly.

The layout travels as ``{"overall": [0, 64], "tempo": [64, 80], ...}`` (half-open ranges)
in the model's embedding config, the embedder info, and the index manifest. Models
without facet heads have no layout; callers must then refuse facet weights clearly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

OVERALL = "overall"
FACETS: tuple[str, ...] = ("tempo", "dynamics", "articulation", "timbre")
# The timeline part (model.timeline_bins > 0): the passage's frames kept in time order, so the
# same performance through another recording chain lines up moment by moment. It comes last.
TIMELINE = "timeline"
FACET_LABELS: dict[str, str] = {
    "tempo": "tempo and rubato",
    "dynamics": "dynamics",
    "articulation": "articulation",
    "timbre": "timbre",
    TIMELINE: "the same moments (timeline)",
}

Layout = dict[str, tuple[int, int]]


def make_layout(
    overall_dim: int, facet_dim: int, facets: tuple[str, ...] = FACETS, timeline_dim: int = 0
) -> Layout:
    """Contiguous ranges: ``overall`` first, then each facet (none when ``facet_dim`` is 0 and
    there is a timeline), then the ``timeline`` part when ``timeline_dim`` > 0."""
    if overall_dim < 1 or facet_dim < (0 if timeline_dim > 0 else 1) or timeline_dim < 0:
        raise ValueError(
            f"part sizes must be >= 1, got overall_dim={overall_dim}, facet_dim={facet_dim}, "
            f"timeline_dim={timeline_dim}"
        )
    layout: Layout = {OVERALL: (0, overall_dim)}
    start = overall_dim
    for name in facets if facet_dim else ():
        layout[name] = (start, start + facet_dim)
        start += facet_dim
    if timeline_dim:
        layout[TIMELINE] = (start, start + timeline_dim)
    return layout


def parse_layout(raw: Mapping[str, object] | None) -> Layout | None:
    """A layout read from JSON (lists) checked to be contiguous from 0 with ``overall`` first."""
    if raw is None:
        return None
    layout: Layout = {}
    expected_start = 0
    for name, span in raw.items():
        try:
            start, end = (int(x) for x in span)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(
                f"facet layout entry {name!r} must be [start, end], got {span!r}"
            ) from None
        if start != expected_start or end <= start:
            raise ValueError(f"facet layout is not contiguous at {name!r}: {span!r}")
        layout[str(name)] = (start, end)
        expected_start = end
    if next(iter(layout), None) != OVERALL:
        raise ValueError(f"facet layout must start with {OVERALL!r}, got {list(layout)}")
    return layout


def layout_dim(layout: Layout) -> int:
    return max(end for _, end in layout.values())


def compose(parts: Mapping[str, np.ndarray], layout: Layout) -> np.ndarray:
    """[B, D] faceted embedding from per-part vectors [B, d_p] (each L2-normalised here)."""
    blocks = []
    for name, (start, end) in layout.items():
        block = np.asarray(parts[name], dtype=np.float32)
        if block.shape[-1] != end - start:
            raise ValueError(f"part {name!r} has dim {block.shape[-1]}, layout says {end - start}")
        norms = np.linalg.norm(block, axis=-1, keepdims=True)
        blocks.append(block / np.where(norms > 1e-12, norms, 1.0))
    return np.concatenate(blocks, axis=-1) / np.sqrt(len(layout), dtype=np.float32)


def join(parts: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """[B, sum d_p]: each part's unit rows scaled by ``sqrt(w_p)`` side by side, so the inner
    product of two joined rows is ``sum_p w_p * cos_p`` (unit-norm when the weights sum to 1).
    :func:`compose` is this with equal weights and a layout."""
    if len(parts) != len(weights) or not parts:
        raise ValueError(f"join needs one weight per part, got {len(parts)} and {len(weights)}")
    if any(not np.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"join weights must be finite and >= 0, got {weights}")
    blocks = []
    for part, w in zip(parts, weights):
        block = np.asarray(part, dtype=np.float64)
        norms = np.linalg.norm(block, axis=-1, keepdims=True)
        blocks.append(np.sqrt(w) * block / np.maximum(norms, 1e-12))
    return np.concatenate(blocks, axis=-1)


def parse_weight_items(items: Iterable[str], flag: str = "--facet") -> dict[str, float]:
    """``["tempo=2", "timbre=0.5"]`` -> ``{"tempo": 2.0, "timbre": 0.5}``: per-part weights as
    a command line gives them (the CLI's ``--facet``, the benchmarks' and ``ship_model``'s
    ``name=w,...``). A malformed item is an error that names it and ``flag``; whether the
    names and values suit a layout is :func:`normalize_weights`' business."""
    weights: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"{flag} {item!r} must look like tempo=2")
        weights[name.strip()] = weight
    return weights


def normalize_weights(weights: Mapping[str, float] | None, layout: Layout) -> dict[str, float]:
    """Per-part weights summing to 1. Unnamed parts get 0 when any weight is given; no
    weights at all means equal weights (the plain embedding). Unknown names and negative or
    all-zero weights are errors that name the problem."""
    if not weights:
        return {name: 1.0 / len(layout) for name in layout}
    unknown = sorted(set(weights) - set(layout))
    if unknown:
        raise ValueError(f"unknown facet(s) {unknown}; this index has {list(layout)}")
    bad = {k: v for k, v in weights.items() if not np.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"facet weights must be finite and >= 0, got {bad}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError("at least one facet weight must be > 0")
    return {name: float(weights.get(name, 0.0)) / total for name in layout}


def weighted_query(
    query: np.ndarray, layout: Layout, weights: Mapping[str, float] | None
) -> np.ndarray:
    """Scale the query's parts so that ``<q_w, e> = sum_p w_p * cos_p(q, e)`` for any
    faceted embedding ``e`` (inner-product search then ranks by the weighted facet score)."""
    q = np.array(query, dtype=np.float32, copy=True)
    if q.shape[-1] != layout_dim(layout):
        raise ValueError(f"query has dim {q.shape[-1]}, the facet layout {layout_dim(layout)}")
    w = normalize_weights(weights, layout)
    n_parts = len(layout)
    for name, (start, end) in layout.items():
        # e_p = u_p / sqrt(n) and q_p = v_p / sqrt(n): scaling q_p by n * w_p gives w_p * <u_p, v_p>.
        q[..., start:end] *= n_parts * w[name]
    return q


def part_similarities(
    query: np.ndarray, vectors: np.ndarray, layout: Layout
) -> dict[str, np.ndarray]:
    """Cosine per part between one query [D] and vectors [N, D] (parts re-normalised)."""
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    v = np.asarray(vectors, dtype=np.float32).reshape(-1, q.size)
    out = {}
    for name, (start, end) in layout.items():
        qa, va = q[start:end], v[:, start:end]
        qn = np.linalg.norm(qa)
        vn = np.linalg.norm(va, axis=1)
        out[name] = (va @ qa) / np.maximum(vn * qn, 1e-12)
    return out
