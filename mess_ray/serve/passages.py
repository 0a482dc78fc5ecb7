"""``GET /passages`` and ``POST /passages``: the same passage in every other performance.

Given a query passage (a span of an indexed track, or an uploaded clip), the work is
identified (the catalog's ``piece_id`` when the track has one; otherwise, and for uploads,
by chroma shingles of every indexed track in a FAISS inner-product index), the passage is
aligned by subsequence DTW in each other performance (content features precomputed by the
index job; nothing is decoded), and the aligned versions are ranked by how alike they shape
tempo and loudness with the notes held fixed (:func:`mess_ray.content.curve_distance`).

Error contract (the same JSON ``{"detail": ...}`` as search): unknown track 404; a span
outside the recording, reversed, or shorter/longer than ``content.min_query_s`` /
``max_query_s`` 422; a work with no other indexed performance 404 (:class:`NoOtherPerformance`);
audio that matches no indexed performance 404 (:class:`NoMatch`); an index built without
content features 503.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, File, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from mess_ray.content import (
    Features,
    align_passage,
    curve_distance,
    curves_to_json,
    expression_curves,
    shingles,
    track_features,
)

SPAN_TOLERANCE_S = 0.25  # a query may end this far past the last feature frame (rounding)


class NoOtherPerformance(LookupError):
    """The query's work has no other indexed performance to align to."""


class NoMatch(LookupError):
    """No indexed performance contains the query passage (every alignment cost too high)."""


class ContentUnavailable(RuntimeError):
    """The served index version was built without content features."""


@dataclass
class ContentState:
    """Content features of one index version and the shingle index for work identification."""

    version: str | None
    features: dict[str, Features]
    shingle_index: Any  # faiss.IndexFlatIP over every track's shingles
    shingle_tracks: np.ndarray  # object [S]: the track of each shingle


def build_content_state(version: str | None, features: dict[str, Features]) -> ContentState:
    import faiss

    vectors, owners = [], []
    for tid, feats in sorted(features.items()):
        rows = shingles(feats)
        vectors.append(rows)
        owners.extend([tid] * len(rows))
    dim = 24
    index = faiss.IndexFlatIP(dim)
    if vectors:
        index.add(np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32))
    return ContentState(version, features, index, np.asarray(owners, dtype=object))


class PassageFinder:
    """Answers passage queries for a :class:`~mess_ray.serve.service.SearchService`'s index."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.cfg = service.cfg.content
        self._lock = threading.Lock()
        self._state: ContentState | None = None

    # -- state -----------------------------------------------------------------------------
    def content(self) -> ContentState:
        """The served index version's features (loaded once per version, checksums verified)."""
        index = self.service.index
        state = self._state
        if state is not None and state.version == index.version:
            return state
        with self._lock:
            if self._state is None or self._state.version != index.version:
                if not index.manifest.get("content") or self.service.storage is None:
                    raise ContentUnavailable(
                        f"index {index.version} has no content features: rebuild it with "
                        "`mess-ray index` (content.features: true)"
                    )
                from mess_ray.index.content_features import load_content

                self._state = build_content_state(
                    index.version, load_content(self.service.storage, index.manifest)
                )
            return self._state

    # -- queries ---------------------------------------------------------------------------
    def by_track(self, track_id: str, start_s: float, end_s: float) -> dict[str, Any]:
        started = time.perf_counter()
        index = self.service.index
        track = index.track(track_id)  # KeyError: unknown track (404)
        state = self.content()
        feats = state.features.get(track_id)
        if feats is None:
            raise ContentUnavailable(f"track {track_id!r} has no content features in this index")
        self._check_span(start_s, end_s, feats.duration_s, f"track {track_id!r}")
        query = feats.slice(start_s, end_s)
        piece = track.get("piece_id") or ""
        if piece:
            candidates = [
                t["track_id"]
                for t in index.tracks()
                if t["piece_id"] == piece and t["track_id"] != track_id
            ]
            candidates = [t for t in candidates if t in state.features]
            if not candidates:
                raise NoOtherPerformance(
                    f"piece {piece!r} has no other indexed performance than {track_id!r}: "
                    "nothing to align the passage to"
                )
            work_from = "catalog"
        else:
            candidates = self._identify(state, query, exclude=track_id)
            work_from = "audio"
        info = {
            "kind": "track",
            "track_id": track_id,
            "piece_id": piece,
            "start_s": start_s,
            "end_s": end_s,
            "work_from": work_from,
        }
        return self._answer(state, query, candidates, info, (track_id, start_s, end_s), started)

    def by_audio(self, samples: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        state = self.content()
        rate = self.service.cfg.audio.sample_rate
        duration = len(samples) / rate
        self._check_span(0.0, duration, duration, "the upload")
        query = track_features(samples, rate, self.cfg.feature_rate)
        candidates = self._identify(state, query, exclude=None)
        return self._answer(
            state,
            query,
            candidates,
            {"kind": "upload", "piece_id": "", "work_from": "audio", **info},
            None,
            started,
        )

    def identify_work(self, samples: np.ndarray) -> str | None:
        """The work (piece_id) an uploaded passage most likely comes from, by chroma-shingle
        votes; None when the index has no content features or nothing matches."""
        try:
            state = self.content()
            query = track_features(
                samples, self.service.cfg.audio.sample_rate, self.cfg.feature_rate
            )
            ranked = self._identify(state, query, exclude=None)
        except (ContentUnavailable, NoMatch, ValueError):
            return None
        return (
            str(self.service.index.track(ranked[0])["piece_id"] or "") or None if ranked else None
        )

    # -- parts -----------------------------------------------------------------------------
    def _check_span(self, start_s: float, end_s: float, duration: float, what: str) -> None:
        if start_s < 0 or end_s <= start_s:
            raise ValueError(f"need 0 <= start_s < end_s, got start_s={start_s}, end_s={end_s}")
        if end_s > duration + SPAN_TOLERANCE_S:
            raise ValueError(
                f"the span {start_s:.2f}-{end_s:.2f} s is outside {what} ({duration:.2f} s long)"
            )
        length = min(end_s, duration) - start_s
        if length < self.cfg.min_query_s:
            raise ValueError(
                f"the passage is {length:.2f} s long; content.min_query_s is {self.cfg.min_query_s} s"
            )
        if length > self.cfg.max_query_s:
            raise ValueError(
                f"the passage is {length:.2f} s long; content.max_query_s is {self.cfg.max_query_s} s"
            )

    def _identify(self, state: ContentState, query: Features, exclude: str | None) -> list[str]:
        """Tracks most likely to hold the passage, by shingle votes (piece unknown)."""
        rows = shingles(query)
        if state.shingle_index.ntotal == 0:
            raise NoMatch("no indexed track has content features")
        k = min(state.shingle_index.ntotal, 64)
        sims, ids = state.shingle_index.search(np.ascontiguousarray(rows, dtype=np.float32), k)
        votes: dict[str, float] = {}
        for sim_row, id_row in zip(sims, ids):
            best: dict[str, float] = {}
            for sim, i in zip(sim_row, id_row):
                if i < 0:
                    continue
                tid = state.shingle_tracks[i]
                best[tid] = max(best.get(tid, -1.0), float(sim))
            for tid, sim in best.items():
                votes[tid] = votes.get(tid, 0.0) + sim
        ranked = [t for t, _ in sorted(votes.items(), key=lambda kv: -kv[1]) if t != exclude]
        top = ranked[: self.cfg.identify_top]
        # The works of the best-voted tracks: every indexed performance of them is a candidate.
        index = self.service.index
        pieces = {index.track(t)["piece_id"] for t in top} - {""}
        same_work = [
            t["track_id"]
            for t in index.tracks()
            if t["piece_id"] in pieces and t["track_id"] != exclude
        ]
        order = {t: i for i, t in enumerate(ranked)}
        merged = set(top) | {t for t in same_work if t in state.features}
        return sorted(merged, key=lambda t: order.get(t, len(order)))

    def _answer(
        self,
        state: ContentState,
        query: Features,
        candidates: list[str],
        info: dict[str, Any],
        query_span: tuple[str, float, float] | None,
        started: float,
    ) -> dict[str, Any]:
        cfg = self.cfg
        index = self.service.index
        own = expression_curves(query, query, None, cfg.curve_points, cfg.smooth_s)
        query_vector = None
        if query_span is not None:
            try:
                query_vector, _ = index.span_vector(*query_span)
            except (KeyError, ValueError):
                query_vector = None
        rows = []
        for tid in candidates[: cfg.max_candidates]:
            cand = state.features[tid]
            try:
                alignment = align_passage(query, cand, **cfg.align_kwargs())
            except ValueError:  # a candidate recording too short for the passage
                continue
            if alignment.cost > cfg.max_cost:
                continue
            curves = expression_curves(query, cand, alignment, cfg.curve_points, cfg.smooth_s)
            distance = curve_distance(own, curves, cfg.tempo_weight, cfg.loudness_weight)
            summary = index.track(tid)
            row = {
                "track_id": tid,
                "piece_id": summary["piece_id"],
                "style": summary["style"],
                "metadata": summary["metadata"],
                "start_s": round(alignment.start_s, 3),
                "end_s": round(alignment.end_s, 3),
                "cost": round(alignment.cost, 4),
                "tempo_ratio": round(float(np.median(curves["tempo"])), 4),
                "distance": {k: round(v, 4) for k, v in distance.items()},
                "embedding_similarity": None,
                "curves": curves_to_json({k: v for k, v in curves.items() if k != "score_s"}),
            }
            if query_vector is not None:
                try:
                    vec, _ = index.span_vector(tid, alignment.start_s, alignment.end_s)
                    row["embedding_similarity"] = round(float(vec @ query_vector), 4)
                except (KeyError, ValueError):
                    pass
            rows.append(row)
        if not rows:
            if info.get("work_from") == "catalog":
                raise NoMatch(
                    f"the passage was not found in any other performance of {info['piece_id']!r} "
                    f"(every alignment cost is above content.max_cost={cfg.max_cost})"
                )
            raise NoMatch(
                "the passage matches no indexed performance "
                f"(every alignment cost is above content.max_cost={cfg.max_cost})"
            )
        rows.sort(key=lambda r: (r["distance"]["combined"], r["cost"]))
        for rank, row in enumerate(rows, 1):
            row["rank"] = rank
        return {
            "query": {
                **info,
                "curves": curves_to_json({k: v for k, v in own.items() if k != "score_s"}),
            },
            "score_s": [round(float(v), 3) for v in own["score_s"]],
            "performances": rows,
            "candidates": {
                "considered": len(candidates),
                "aligned": min(len(candidates), cfg.max_candidates),
                "matched": len(rows),
            },
            "ranked_by": "distance.combined: tempo and loudness shape versus the query (lower: played more alike)",
            "index_version": index.version,
            "took_ms": round(1000 * (time.perf_counter() - started), 2),
        }


# -- HTTP --------------------------------------------------------------------------------
class CurvesModel(BaseModel):
    tempo: list[float] = Field(
        description="Tempo relative to the query (>1: faster), per score point."
    )
    loudness_db: list[float] = Field(description="Level in dB relative to the passage median.")
    onset_density: list[float] = Field(description="Onsets per second around each point.")
    articulation: list[float] = Field(
        description="Fraction of frames within 6 dB of the local peak (1: sustained, legato)."
    )


class DistanceModel(BaseModel):
    tempo: float = Field(description="RMS difference of mean-removed log tempo curves.")
    loudness: float = Field(description="RMS difference of z-scored loudness contours.")
    combined: float = Field(description="Weighted sum used for the ranking (lower: more alike).")


class PerformanceModel(BaseModel):
    rank: int
    track_id: str
    piece_id: str
    style: str
    metadata: dict[str, Any]
    start_s: float = Field(description="Aligned start of the passage in this recording.")
    end_s: float = Field(description="Aligned end of the passage in this recording.")
    cost: float = Field(
        description="Mean chroma cosine distance per alignment step (0: identical)."
    )
    tempo_ratio: float = Field(description="Median tempo relative to the query.")
    distance: DistanceModel
    embedding_similarity: float | None = Field(
        None, description="Cosine of the embeddings restricted to the two spans (track queries)."
    )
    curves: CurvesModel


class PassageQueryModel(BaseModel):
    kind: str
    piece_id: str
    work_from: str = Field(description="catalog (piece_id) or audio (chroma shingles).")
    track_id: str | None = None
    start_s: float | None = None
    end_s: float | None = None
    filename: str | None = None
    duration_s: float | None = None
    curves: CurvesModel


class CandidatesModel(BaseModel):
    considered: int = Field(description="Other performances of the work (or shingle matches).")
    aligned: int = Field(description="Of those, aligned (at most content.max_candidates).")
    matched: int = Field(description="Alignments with cost <= content.max_cost (returned).")


class PassagesResponse(BaseModel):
    query: PassageQueryModel
    score_s: list[float] = Field(description="Score position: seconds into the query passage.")
    performances: list[PerformanceModel]
    candidates: CandidatesModel
    ranked_by: str
    index_version: str | None
    took_ms: float


def add_passage_routes(app: FastAPI, service: Any, errors: dict[int, Any]) -> PassageFinder:
    """Register ``GET /passages`` and ``POST /passages`` (and their error statuses) on ``app``."""
    finder = PassageFinder(service)
    service.identify_work = finder.identify_work

    async def _lookup(_, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=404)

    async def _unavailable(_, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=503)

    app.add_exception_handler(NoOtherPerformance, _lookup)
    app.add_exception_handler(NoMatch, _lookup)
    app.add_exception_handler(ContentUnavailable, _unavailable)
    responses = {**errors, 503: errors[404]}

    @app.get(
        "/passages",
        response_model=PassagesResponse,
        responses=responses,
        summary="The same passage in every other performance of the work",
        description=(
            "Aligns [start_s, end_s) of an indexed track in every other performance of its work "
            "and returns each version's aligned span, cost and expression curves on the query's "
            "time axis, ranked by who plays it most like the query. 404: unknown track, a work "
            "with no other performance, or no match; 422: a span outside the recording or too "
            "short/long; 503: an index built without content features."
        ),
    )
    def passages(
        track_id: str = Query(..., min_length=1),
        start_s: float = Query(..., ge=0, le=1e7),
        end_s: float = Query(..., gt=0, le=1e7),
    ) -> dict:
        return finder.by_track(track_id, start_s, end_s)

    @app.post(
        "/passages",
        response_model=PassagesResponse,
        responses=responses,
        summary="Find an uploaded passage in the indexed performances",
    )
    async def passages_upload(
        file: UploadFile = File(..., description="WAV, FLAC, MP3 or OGG at any sample rate"),
    ) -> dict:
        data = await file.read(service.max_upload_bytes + 1)
        samples, info = await run_in_threadpool(service.prepare_upload, data)
        info = {"filename": file.filename, **info}
        return await run_in_threadpool(finder.by_audio, samples, info)

    return finder
