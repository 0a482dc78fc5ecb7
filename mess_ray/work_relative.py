"""Expression relative to the work: a passage as it deviates from other performances of its piece.

A player's identity lies in how they play a work differently from other players of the same
music; absolute descriptors or embeddings mostly say *what* is played (a slow nocturne is slow
whoever plays it). Where the corpus holds several performances of a work, each passage is
expressed relative to that work's norm:

* :meth:`WorkNorms.fit` - per work (``piece_id``, or the work the content view identified),
  the mean and spread of every dimension over the passages of all its performances, kept only
  for works with at least ``min_performances`` performances; plus the corpus-wide norm;
* :meth:`WorkNorms.transform` - ``(v - work mean) / work scale``; a passage whose work is unknown
  or has too few performances falls back to the corpus-wide norm (the plain standardised
  vector) and says so (:class:`Relative`.reason);
* :func:`aligned_relative` - finer: relative to the *aligned* passages of the other
  performances (those covering the same score span: beats, or the content view's alignment),
  falling back to the whole-work norm where no other performance covers the span;
* :func:`recording_relative` - chain normalisation (issue 20, item 3): chosen columns relative
  to the recording's own median (absolute level is the microphone's as much as the player's).

Pure functions below the stages: the index job stores fitted norms in its artifact
(:meth:`WorkNorms.to_dict`, versioned by :data:`SCHEMA`), the searcher applies them to queries
and candidates, the protocol scores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA = 1  # bump when the stored layout or the meaning of the norms changes
MIN_PERFORMANCES = 2
SCALE_FLOOR = 0.25  # a work's per-dimension spread is floored at this fraction of the corpus's
MODES = ("center", "standardise")

FALLBACK_UNKNOWN = "work not identified: compared by the corpus-wide norm"
FALLBACK_SINGLE = (
    "only one performance of this work in the corpus: compared by the corpus-wide norm"
)
APPLIED = "relative to the norm of {n} performances of this work"


@dataclass
class Norm:
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D], > 0
    performances: int
    segments: int


@dataclass
class Relative:
    """Work-relative vectors with, per row, whether the work's norm was applied and why not."""

    vectors: np.ndarray  # [N, D] float64
    applied: np.ndarray  # bool [N]
    reasons: list[str] = field(default_factory=list)


def _matrix(vectors) -> np.ndarray:
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty [N, D] matrix, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("vectors contain NaN or infinite values")
    return x


def _labels(values, n: int, what: str) -> np.ndarray:
    out = np.asarray(["" if v is None else str(v) for v in values], dtype=object)
    if out.shape != (n,):
        raise ValueError(f"{what} must have one entry per vector ({n}), got {out.shape}")
    return out


@dataclass
class WorkNorms:
    """Fitted per-work norms plus the corpus-wide fallback norm."""

    works: dict[str, Norm]
    corpus: Norm
    mode: str = "standardise"
    min_performances: int = MIN_PERFORMANCES

    @property
    def dim(self) -> int:
        return int(self.corpus.mean.size)

    @classmethod
    def fit(
        cls,
        vectors,
        works,
        performances,
        *,
        min_performances: int = MIN_PERFORMANCES,
        mode: str = "standardise",
        scale_floor: float = SCALE_FLOOR,
    ) -> WorkNorms:
        """Norms of every work with ``min_performances`` distinct performances or more (``""``:
        unknown work, never normed). ``mode``: ``center`` subtracts the work's mean only
        and divides by the corpus's spread, ``standardise`` divides by the work's own spread
        (floored at ``scale_floor`` x the corpus's)."""
        acc = NormAccumulator()
        acc.add(vectors, works, performances)
        return acc.finish(min_performances=min_performances, mode=mode, scale_floor=scale_floor)

    def norm_of(self, work: str | None) -> tuple[Norm | None, str]:
        """The work's norm (None: fall back) and the explanation either way."""
        if not work:
            return None, FALLBACK_UNKNOWN
        norm = self.works.get(str(work))
        if norm is None:
            return None, FALLBACK_SINGLE
        return norm, APPLIED.format(n=norm.performances)

    def transform(self, vectors, works) -> Relative:
        """Each row relative to its work's norm, or to the corpus norm where the work has none."""
        x = _matrix(vectors)
        if x.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {x.shape[1]}, the norms {self.dim}")
        works = _labels(works, len(x), "works")
        out = np.empty_like(x)
        applied = np.zeros(len(x), bool)
        reasons = []
        for i, work in enumerate(works):
            norm, reason = self.norm_of(work)
            applied[i] = norm is not None
            norm = norm or self.corpus
            out[i] = (x[i] - norm.mean) / norm.scale
            reasons.append(reason)
        return Relative(out, applied, reasons)

    # -- storage -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def enc(n: Norm) -> dict[str, Any]:
            return {
                "mean": [float(v) for v in n.mean],
                "scale": [float(v) for v in n.scale],
                "performances": n.performances,
                "segments": n.segments,
            }

        return {
            "schema": SCHEMA,
            "mode": self.mode,
            "min_performances": self.min_performances,
            "dim": self.dim,
            "corpus": enc(self.corpus),
            "works": {w: enc(n) for w, n in sorted(self.works.items())},
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WorkNorms:
        if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
            got = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(
                f"work norms have schema {got!r}, this code reads schema {SCHEMA}: rebuild the index"
            )

        def dec(n: dict[str, Any]) -> Norm:
            mean = np.asarray(n["mean"], dtype=np.float64)
            scale = np.asarray(n["scale"], dtype=np.float64)
            if mean.shape != (raw["dim"],) or scale.shape != mean.shape or np.any(scale <= 0):
                raise ValueError("work norm has the wrong dimension or a non-positive scale")
            return Norm(mean, scale, int(n["performances"]), int(n["segments"]))

        return cls(
            {w: dec(n) for w, n in raw["works"].items()},
            dec(raw["corpus"]),
            raw["mode"],
            int(raw["min_performances"]),
        )


class NormAccumulator:
    """Per-work sums for :meth:`WorkNorms.fit`, fed batch by batch (the index job streams its
    vector shards through it instead of holding every vector at once)."""

    def __init__(self) -> None:
        self._sums: dict[str, list] = {}  # work -> [count, sum, sum of squares, performances]
        self._total: list | None = None

    def add(self, vectors, works, performances) -> None:
        x = _matrix(vectors)
        works = _labels(works, len(x), "works")
        perfs = _labels(performances, len(x), "performances")
        if self._total is None:
            self._total = [0, np.zeros(x.shape[1]), np.zeros(x.shape[1]), set()]
        elif x.shape[1] != self._total[1].size:
            raise ValueError(
                f"vectors have dimension {x.shape[1]}, earlier ones {self._total[1].size}"
            )
        for key, rows in [("", np.ones(len(x), bool))] + [
            (w, works == w) for w in set(works) - {""}
        ]:
            acc = (
                self._total
                if key == ""
                else self._sums.setdefault(
                    key, [0, np.zeros(x.shape[1]), np.zeros(x.shape[1]), set()]
                )
            )
            sub = x[rows]
            acc[0] += len(sub)
            acc[1] += sub.sum(axis=0)
            acc[2] += (sub**2).sum(axis=0)
            acc[3].update(perfs[rows])

    @staticmethod
    def _moments(acc) -> tuple[np.ndarray, np.ndarray]:
        mean = acc[1] / acc[0]
        return mean, np.sqrt(np.maximum(acc[2] / acc[0] - mean**2, 0.0))

    def finish(
        self,
        *,
        min_performances: int = MIN_PERFORMANCES,
        mode: str = "standardise",
        scale_floor: float = SCALE_FLOOR,
    ) -> WorkNorms:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if min_performances < 2:
            raise ValueError(
                "a work norm needs min_performances >= 2 (one performance has no norm)"
            )
        if self._total is None:
            raise ValueError("no vectors to fit work norms on")
        mean, std = self._moments(self._total)
        corpus = Norm(mean, np.where(std > 1e-12, std, 1.0), len(self._total[3]), self._total[0])
        floor = np.maximum(scale_floor * std, 1e-9)
        norms: dict[str, Norm] = {}
        for work in sorted(self._sums):
            acc = self._sums[work]
            if len(acc[3]) < min_performances:
                continue
            w_mean, w_std = self._moments(acc)
            scale = np.maximum(w_std, floor) if mode == "standardise" else corpus.scale
            norms[work] = Norm(w_mean, scale, len(acc[3]), acc[0])
        return WorkNorms(norms, corpus, mode, min_performances)


def aligned_relative(
    vectors,
    works,
    performances,
    spans,
    *,
    min_performances: int = MIN_PERFORMANCES,
    mode: str = "standardise",
    scale_floor: float = SCALE_FLOOR,
) -> Relative:
    """Each passage relative to the passages of the *other* performances of its work that cover
    the same span of the work (``spans`` [N, 2] on a common axis: score beats, or where the
    content view's alignment puts the passage; NaN: unknown). Where fewer than
    ``min_performances - 1`` other performances cover it, the whole-work norm is used, and where
    that is missing too, the corpus norm (:meth:`WorkNorms.transform`)."""
    x = _matrix(vectors)
    spans = np.asarray(spans, dtype=np.float64)
    if spans.shape != (len(x), 2):
        raise ValueError(f"spans must be [N, 2] ({len(x)} rows), got {spans.shape}")
    works_l = _labels(works, len(x), "works")
    perfs = _labels(performances, len(x), "performances")
    whole = WorkNorms.fit(
        x, works_l, perfs, min_performances=min_performances, mode=mode, scale_floor=scale_floor
    )
    rel = whole.transform(x, works_l)
    floor = np.maximum(scale_floor * x.std(axis=0), 1e-9)
    known = ~np.isnan(spans).any(axis=1)
    for i in np.flatnonzero(known & rel.applied):
        peers = (
            (works_l == works_l[i])
            & (perfs != perfs[i])
            & known
            & (spans[:, 0] < spans[i, 1])
            & (spans[i, 0] < spans[:, 1])
        )
        if len(set(perfs[peers])) < min_performances - 1:
            continue
        # the passage itself joins its aligned peers, so the norm is that of every performance
        group = x[peers | (np.arange(len(x)) == i)]
        scale = (
            np.maximum(group.std(axis=0), floor) if mode == "standardise" else whole.corpus.scale
        )
        rel.vectors[i] = (x[i] - group.mean(axis=0)) / scale
        n = len(set(perfs[peers])) + 1
        rel.reasons[i] = f"relative to the aligned passages of {n} performances of this work"
    return rel


def recording_relative(matrix, recordings, columns: list[int] | None = None) -> np.ndarray:
    """``matrix`` with the chosen columns (all: None) minus their median over each recording's
    rows: the passage's level relative to the recording's own, not the microphone's gain."""
    x = _matrix(matrix).copy()
    rec = _labels(recordings, len(x), "recordings")
    cols = list(range(x.shape[1])) if columns is None else list(columns)
    for r in set(rec):
        rows = rec == r
        x[np.ix_(rows, cols)] -= np.median(x[np.ix_(rows, cols)], axis=0)
    return x
