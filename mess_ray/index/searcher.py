"""Query a published index (pure: FAISS + pyarrow, no Ray).

:class:`SearchIndex` loads ``index.faiss`` and ``metadata.parquet`` of an index artifact
(checksums verified against the manifest) and answers: nearest passages to a query vector,
passages like a stored segment or a track time span (segment vectors averaged through
``reconstruct``), and track listings. Unknown ids raise ``KeyError`` (HTTP 404 upstream);
invalid arguments raise ``ValueError`` (HTTP 422).
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mess_ray.facets import (
    OVERALL,
    Layout,
    compose,
    normalize_weights,
    parse_layout,
    part_similarities,
    weighted_query,
)
from mess_ray.index.embed import table_to_vectors
from mess_ray.index.faiss_index import IndexSpec, configure_for_search, load_index, sha256_bytes
from mess_ray.storage import Storage
from mess_ray.work_relative import WorkNorms

STAGE = "index"


@dataclass
class Hit:
    """One result passage."""

    rank: int
    segment_id: int
    track_id: str
    piece_id: str
    style: str
    start_s: float
    end_s: float
    similarity: float
    source_uri: str
    metadata: dict[str, Any] = field(default_factory=dict)
    # Cosine of each part of a faceted embedding (overall, tempo, ...); empty without a facet layout.
    facet_similarities: dict[str, float] = field(default_factory=dict)
    # Percentage of a fixed corpus sample less similar to the query (SearchIndex.corpus_sample).
    percentile: float | None = None
    # The facet part whose similarity ranks highest against the same sample (None: no facets).
    closest_facet: str | None = None
    facet_percentiles: dict[str, float] = field(default_factory=dict)
    # Work-relative search only: how the query was normed (its work's norm, or why it fell back).
    work_relative: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PERCENTILE_SAMPLE = 2048
PERCENTILE_SEED = 0


def percentile_of(sorted_scores: np.ndarray, value: float) -> float:
    """Percentage of ``sorted_scores`` strictly below ``value`` (ties count half), one decimal."""
    below = np.searchsorted(sorted_scores, value, side="left")
    upto = np.searchsorted(sorted_scores, value, side="right")
    return round(float(100.0 * (below + 0.5 * (upto - below)) / max(1, len(sorted_scores))), 1)


def normalize(vectors: np.ndarray) -> np.ndarray:
    """L2-normalise rows (queries must live on the same sphere as the indexed vectors)."""
    arr = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=-1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(arr)):
        raise ValueError("query vector is zero or not finite")
    return np.ascontiguousarray(arr / norms)


def select_hits(
    candidates: Iterable[tuple[int, float]],
    rows: dict[int, int],
    track_ids: list[str],
    start_s: list[float],
    k: int,
    exclude_track: str | None = None,
    exclude_segments: set[int] | None = None,
    min_gap_s: float = 0.0,
) -> list[tuple[int, float]]:
    """Greedy filtering of (segment_id, similarity) candidates in similarity order.

    Drops ids FAISS pads with (-1), the excluded track and segments, and hits closer than
    ``min_gap_s`` (start to start) to a better hit of the same track.
    """
    exclude_segments = exclude_segments or set()
    kept: list[tuple[int, float]] = []
    kept_starts: dict[str, list[float]] = {}
    for sid, score in candidates:
        if sid < 0 or sid in exclude_segments or sid not in rows:
            continue
        row = rows[sid]
        track = track_ids[row]
        if exclude_track is not None and track == exclude_track:
            continue
        start = start_s[row]
        if min_gap_s > 0 and any(abs(start - s) < min_gap_s for s in kept_starts.get(track, ())):
            continue
        kept.append((sid, score))
        kept_starts.setdefault(track, []).append(start)
        if len(kept) == k:
            break
    return kept


# Columns of the metadata table that filters match exactly; any other field is looked up in
# metadata_json (composer, title, catalog numbers, ...) and matched case-insensitively as a substring.
EXACT_FILTER_COLUMNS = ("track_id", "piece_id", "style")


def mmr_select(
    candidates: list[tuple[int, float]], vectors: dict[int, np.ndarray], k: int, lambda_: float
) -> list[tuple[int, float]]:
    """Maximal marginal relevance: greedily pick the candidate maximising
    ``lambda * relevance - (1 - lambda) * max similarity to the already picked``.

    ``candidates`` are (segment_id, relevance) best first; ``vectors`` their unit vectors.
    lambda 1 keeps the relevance order; lower values trade relevance for variety.
    """
    if not 0 <= lambda_ <= 1:
        raise ValueError(f"mmr lambda must be in [0, 1], got {lambda_}")
    if not candidates:
        return []
    ids = [sid for sid, _ in candidates]
    relevance = np.array([score for _, score in candidates], dtype=np.float64)
    mat = np.stack([vectors[sid] for sid in ids]).astype(np.float64)
    redundancy = np.full(len(ids), -np.inf)
    chosen: list[int] = []
    remaining = np.ones(len(ids), dtype=bool)
    while len(chosen) < min(k, len(ids)):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        score = np.where(remaining, lambda_ * relevance - (1 - lambda_) * penalty, -np.inf)
        best = int(np.argmax(score))
        chosen.append(best)
        remaining[best] = False
        redundancy = np.maximum(redundancy, mat @ mat[best])
    return [candidates[i] for i in chosen]


def with_search_knobs(
    spec: IndexSpec, nprobe: int | None = None, ef_search: int | None = None
) -> IndexSpec:
    """``spec`` with query-time knobs replaced: ``nprobe`` for IVF indexes (capped at the
    index's ``nlist``), ``ef_search`` for HNSW; other index types have none. None keeps the
    built value."""
    if nprobe is not None and spec.type in ("ivf", "ivfpq"):
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        spec = replace(spec, nprobe=min(int(nprobe), spec.nlist) if spec.nlist else int(nprobe))
    if ef_search is not None and spec.type == "hnsw":
        if ef_search < 1:
            raise ValueError(f"ef_search must be >= 1, got {ef_search}")
        spec = replace(spec, ef_search=int(ef_search))
    return spec


class SearchIndex:
    """An index artifact loaded for querying."""

    def __init__(
        self,
        index: faiss.Index,
        metadata: pa.Table,
        spec: IndexSpec,
        manifest: dict[str, Any] | None = None,
        rerank_vectors: dict[int, np.ndarray] | None = None,
        work_norms: WorkNorms | None = None,
    ) -> None:
        if index.ntotal != metadata.num_rows:
            raise ValueError(
                f"index holds {index.ntotal} vectors but metadata has {metadata.num_rows} rows"
            )
        self.index = configure_for_search(index, spec)
        self.spec = spec
        self.manifest = manifest or {}
        self.version: str | None = self.manifest.get("version")
        self.dim = int(index.d)
        metadata = metadata.sort_by([("track_id", "ascending"), ("start_s", "ascending")])
        self._cols = {name: metadata.column(name).to_pylist() for name in metadata.column_names}
        self._rows = {int(sid): i for i, sid in enumerate(self._cols["segment_id"])}
        if len(self._rows) != metadata.num_rows:
            raise ValueError("metadata has duplicate segment ids")
        self._track_rows: dict[str, list[int]] = {}
        for i, track in enumerate(self._cols["track_id"]):
            self._track_rows.setdefault(track, []).append(i)
        self._rerank = rerank_vectors
        self._sample: np.ndarray | None = None
        self.work_norms = work_norms
        if work_norms is not None and work_norms.dim != self.dim:
            raise ValueError(f"work norms have dimension {work_norms.dim}, the index {self.dim}")
        self._relative: np.ndarray | None = None  # work-relative unit vectors, row order
        self._metadata = (
            [_parse_metadata(raw) for raw in self._cols["metadata_json"]]
            if "metadata_json" in self._cols
            else [{} for _ in range(metadata.num_rows)]
        )
        # Faceted embeddings carry their part layout in the manifest (top level, or with the model info).
        raw_layout = self.manifest.get("facet_layout") or self.manifest.get("model", {}).get(
            "facet_layout"
        )
        self.facet_layout: Layout | None = parse_layout(_in_dimension_order(raw_layout))
        if (
            self.facet_layout is not None
            and max(e for _, e in self.facet_layout.values()) != self.dim
        ):
            raise ValueError(
                f"facet layout covers {max(e for _, e in self.facet_layout.values())} dims, "
                f"the index has {self.dim}"
            )
        # The model's own query weights (a shipped model's declaration): used when a search
        # names none; explicit facet weights replace them.
        self.default_facet_weights: dict[str, float] | None = (
            self.manifest.get("model") or {}
        ).get("query_facet_weights") or None
        if self.default_facet_weights is not None:
            if self.facet_layout is None:
                raise ValueError("the index's model declares query_facet_weights but no layout")
            normalize_weights(self.default_facet_weights, self.facet_layout)

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        storage: Storage,
        version: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> SearchIndex:
        """The published index ``version`` (default: LATEST), checksums verified.

        ``nprobe`` / ``ef_search`` (None: as built) replace the query-time knobs recorded in the
        manifest (see :func:`with_search_knobs`): the service passes ``index.nprobe`` /
        ``index.ef_search`` of its own config, so they can be tuned without rebuilding."""
        manifest = storage.manifest(STAGE, version)
        base = posixpath.join(STAGE, manifest["version"])
        files = manifest.get("files", {})
        checksums = manifest.get("checksums") or {}
        index_file = files.get("index", "index.faiss")
        metadata_file = files.get("metadata", "metadata.parquet")
        # Every file is verified: a manifest whose checksums were removed is refused, not trusted.
        ivfdata_file = files.get("ivfdata")
        required = [index_file, metadata_file, *([ivfdata_file] if ivfdata_file else [])]
        missing = [name for name in required if not checksums.get(name)]
        if missing:
            raise ValueError(
                f"index {manifest.get('version')} manifest lacks checksums for {', '.join(missing)}"
            )
        # An on-disk IVF index (index.ivfdata beside it) is memory-mapped; its checksum is verified too.
        index = load_index(
            storage,
            posixpath.join(base, index_file),
            checksums.get(index_file),
            ivfdata_sha256=checksums.get(files.get("ivfdata", "index.ivfdata")),
        )
        blob = storage.read_bytes(posixpath.join(base, metadata_file))
        if metadata_file in checksums and sha256_bytes(blob) != checksums[metadata_file]:
            raise ValueError(
                f"checksum mismatch for {metadata_file} of index {manifest['version']}"
            )
        metadata = pq.read_table(io.BytesIO(blob))
        spec = with_search_knobs(IndexSpec.from_dict(manifest["index"]), nprobe, ef_search)
        rerank = None
        if spec.rerank:
            if manifest.get("vector_checksums") is None:
                raise ValueError(
                    f"index {manifest.get('version')} manifest lacks checksums for its vectors"
                )
            rerank = _load_vectors(
                storage,
                posixpath.join(base, files.get("vectors", "vectors")),
                manifest.get("vector_checksums"),
            )
        from mess_ray.index.work_norms import load_work_norms

        return cls(index, metadata, spec, manifest, rerank, load_work_norms(storage, manifest))

    # -- lookups -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def segment(self, segment_id: int) -> dict[str, Any]:
        row = self._row(segment_id)
        return self._row_dict(row)

    def vector(self, segment_id: int) -> np.ndarray:
        """The stored vector of a segment."""
        self._row(segment_id)
        if self._rerank is not None:
            return self._rerank[int(segment_id)].copy()
        return self.index.reconstruct(int(segment_id))

    def tracks(self) -> list[dict[str, Any]]:
        return [self._track_summary(t) for t in sorted(self._track_rows)]

    def track(self, track_id: str) -> dict[str, Any]:
        """A track's summary plus its segments."""
        summary = self._track_summary(track_id)
        summary["segments"] = [
            {
                "segment_id": int(self._cols["segment_id"][r]),
                "start_s": self._cols["start_s"][r],
                "end_s": self._cols["end_s"][r],
            }
            for r in self._track_rows[track_id]
        ]
        return summary

    def segments_in_span(
        self, track_id: str, start_s: float, end_s: float | None = None
    ) -> list[int]:
        """Segments overlapping [start_s, end_s]; without end_s the one segment best covering start_s."""
        rows = self._rows_of_track(track_id)
        if start_s < 0:
            raise ValueError(f"start_s must be >= 0, got {start_s}")
        if end_s is not None and end_s <= start_s:
            raise ValueError(f"end_s ({end_s}) must be greater than start_s ({start_s})")
        starts, ends = self._cols["start_s"], self._cols["end_s"]
        duration = max(ends[r] for r in rows)
        if start_s >= duration:
            raise ValueError(
                f"start_s {start_s} is past the end of track {track_id!r} ({duration:.2f} s)"
            )
        if end_s is None:
            covering = [r for r in rows if starts[r] <= start_s < ends[r]]
            if not covering:
                raise ValueError(f"no segment of track {track_id!r} covers {start_s} s")
            # With overlapping windows several cover the instant: take the one starting closest to it.
            best = min(covering, key=lambda r: start_s - starts[r])
            return [int(self._cols["segment_id"][best])]
        return [
            int(self._cols["segment_id"][r])
            for r in rows
            if starts[r] < end_s and ends[r] > start_s
        ]

    def span_vector(
        self, track_id: str, start_s: float, end_s: float | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """Mean of the vectors of the segments in the span, re-normalised; and those segments."""
        ids = self.segments_in_span(track_id, start_s, end_s)
        vectors = np.stack([self.vector(sid) for sid in ids])
        return normalize(vectors.mean(axis=0)), ids

    # -- search --------------------------------------------------------------------------
    def filter_fields(self) -> list[str]:
        """Fields usable in metadata filters: the exact columns plus every metadata_json key."""
        keys = {key for meta in self._metadata for key in meta}
        return sorted(set(EXACT_FILTER_COLUMNS) | keys)

    def filter_rows(self, filters: dict[str, str] | None) -> set[int] | None:
        """Segment ids passing all ``filters`` (None: no filter). Unknown fields are errors."""
        filters = {
            k: v for k, v in (filters or {}).items() if v is not None and str(v).strip() != ""
        }
        if not filters:
            return None
        fields = self.filter_fields()
        unknown = sorted(set(filters) - set(fields))
        if unknown:
            raise ValueError(f"unknown filter field(s) {unknown}; this index has {fields}")
        keep = np.ones(len(self._rows), dtype=bool)
        for name, wanted in filters.items():
            wanted_s = str(wanted).strip()
            if name in EXACT_FILTER_COLUMNS:
                column = self._cols[name]
                keep &= np.array([str(v) == wanted_s for v in column], dtype=bool)
            else:
                needle = wanted_s.casefold()
                keep &= np.array(
                    [name in m and needle in str(m[name]).casefold() for m in self._metadata],
                    dtype=bool,
                )
        ids = self._cols["segment_id"]
        return {int(ids[r]) for r in np.flatnonzero(keep)}

    def search(
        self,
        query: np.ndarray,
        k: int = 10,
        exclude_track: str | None = None,
        min_gap_s: float = 0.0,
        exclude_segments: Iterable[int] = (),
        *,
        facet_weights: dict[str, float] | None = None,
        filters: dict[str, str] | None = None,
        mmr_lambda: float | None = None,
        mmr_pool: int = 50,
    ) -> list[Hit]:
        """Nearest passages to one query vector [D], best first; or to the best of a query's
        variants [K, D] (the same passage at several lags, ``Embedder.query_variants``: each
        candidate scores its highest similarity to any of them).

        ``facet_weights`` (needs a faceted index) rank by ``sum_p w_p cos_p`` (None: the
        model's own, :attr:`default_facet_weights`, or equal weights); ``filters`` keep
        only passages whose metadata match; ``mmr_lambda`` < 1 re-ranks a pool of
        ``max(mmr_pool, 4k)`` filtered candidates for diversity (maximal marginal relevance).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if min_gap_s < 0:
            raise ValueError(f"min_gap_s must be >= 0, got {min_gap_s}")
        if mmr_lambda is not None and not 0 <= mmr_lambda <= 1:
            raise ValueError(f"mmr_lambda must be in [0, 1], got {mmr_lambda}")
        q = np.asarray(query, dtype=np.float32)
        if q.ndim not in (1, 2) or q.shape[-1] != self.dim or q.size == 0:
            raise ValueError(
                f"query must be [{self.dim}] or [variants, {self.dim}] (the index's dimension), "
                f"got shape {q.shape}"
            )
        q = normalize(q.reshape(-1, self.dim))
        if facet_weights is None:
            facet_weights = self.default_facet_weights
        if facet_weights and self.facet_layout is None:
            raise ValueError(
                "facet weights need a faceted index: this index's model has no facet heads "
                "(no facet_layout in its manifest); search without facet weights"
            )
        if self.facet_layout is not None:
            # Averaged queries (several windows, a time span) have parts of unequal norms:
            # re-compose so every part is a unit direction and scores are exact mean/weighted cosines.
            q = compose(
                {name: q[:, a:b] for name, (a, b) in self.facet_layout.items()}, self.facet_layout
            )
        plain = q
        if facet_weights:
            q = np.ascontiguousarray(
                weighted_query(q, self.facet_layout, facet_weights), dtype=np.float32
            )
        allowed = self.filter_rows(filters)
        if allowed is not None and not allowed:
            return []
        excluded = {int(s) for s in exclude_segments}
        diverse = mmr_lambda is not None and mmr_lambda < 1
        want = max(mmr_pool, 4 * k) if diverse else k
        total = self.index.ntotal
        fetch = min(
            total, max(4 * want, want + len(excluded)) * (4 if self._rerank is not None else 1)
        )
        if allowed is not None and len(allowed) < total:
            # A selective filter: look deeper at once rather than widening step by step.
            fetch = min(total, max(fetch, want * total // max(1, len(allowed))))
        while True:
            candidates = self._candidates(q, fetch)
            if allowed is not None:
                candidates = [(sid, score) for sid, score in candidates if sid in allowed]
            kept = select_hits(
                candidates,
                self._rows,
                self._cols["track_id"],
                self._cols["start_s"],
                want,
                exclude_track,
                excluded,
                min_gap_s,
            )
            # Filters can eat candidates: widen the search until enough survive or the corpus is exhausted.
            if len(kept) >= want or fetch >= total:
                break
            fetch = min(total, fetch * 4)
        if diverse:
            kept = mmr_select(
                kept, {sid: self.vector(sid) for sid, _ in kept}, k, float(mmr_lambda)
            )
        hits = [self._hit(rank, sid, score) for rank, (sid, score) in enumerate(kept, start=1)]
        if self.facet_layout is not None and hits:
            stored = np.stack([self.vector(h.segment_id) for h in hits])
            best = np.argmax(stored @ q.T, axis=1)  # the variant each hit scored with
            for i, hit in enumerate(hits):
                parts = part_similarities(plain[best[i]], stored[i : i + 1], self.facet_layout)
                hit.facet_similarities = {name: round(float(v[0]), 6) for name, v in parts.items()}
        self._add_percentiles(hits, q, plain)
        return hits

    def work_of(self, segment_id: int) -> str:
        """The work (piece) of a stored segment."""
        return str(self._cols["piece_id"][self._row(segment_id)] or "")

    def _relative_corpus(self) -> np.ndarray:
        """Every stored vector relative to its work's norm, unit length, in row order."""
        if self._relative is None:
            ids = self._cols["segment_id"]
            raw = np.stack([self.vector(int(s)) for s in ids]).astype(np.float64)
            rel = self.work_norms.transform(raw, self._cols["piece_id"]).vectors
            self._relative = normalize(rel.astype(np.float32))
        return self._relative

    def search_work_relative(
        self,
        query: np.ndarray,
        work: str | None,
        k: int = 10,
        exclude_track: str | None = None,
        min_gap_s: float = 0.0,
        exclude_segments: Iterable[int] = (),
        *,
        filters: dict[str, str] | None = None,
    ) -> list[Hit]:
        """Nearest passages once the query and every stored passage are expressed relative to
        their work's norm (mess_ray.work_relative: how they are played *differently from other
        performances of the same music*). ``work``: the query's work (its ``piece_id``, or the
        work the content view identified); unknown, or with one performance in the corpus, the
        query falls back to the corpus-wide norm and every hit says so. Exact search over the
        work-relative vectors (computed once per loaded index)."""
        if self.work_norms is None:
            raise ValueError(
                "this index has no work norms (built before they existed, or with "
                "work_relative.enabled=false): rebuild it to search relative to the work"
            )
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        raw = np.asarray(query, dtype=np.float64)
        # Query variants [K, D] (lags of the content timeline): the work norm is taken of the
        # passage as heard, the unshifted first variant.
        raw = (raw[:1] if raw.ndim == 2 else raw).reshape(1, -1)
        if raw.shape[1] != self.dim:
            raise ValueError(f"query has dimension {raw.shape[1]}, the index {self.dim}")
        rel = self.work_norms.transform(raw, [work or ""])
        q = normalize(rel.vectors.astype(np.float32))[0]
        corpus = self._relative_corpus()
        scores = corpus @ q
        allowed = self.filter_rows(filters)
        ids = self._cols["segment_id"]
        order = np.argsort(-scores, kind="stable")
        candidates = (  # lazy: select_hits stops after k hits
            (int(ids[r]), float(scores[r]))
            for r in order
            if allowed is None or int(ids[r]) in allowed
        )
        kept = select_hits(
            candidates,
            self._rows,
            self._cols["track_id"],
            self._cols["start_s"],
            k,
            exclude_track,
            {int(s) for s in exclude_segments},
            min_gap_s,
        )
        hits = [self._hit(rank, sid, score) for rank, (sid, score) in enumerate(kept, start=1)]
        for hit in hits:
            hit.work_relative = rel.reasons[0]
        return hits

    def corpus_sample(self) -> np.ndarray | None:
        """Vectors of a fixed random sample of indexed passages (``PERCENTILE_SAMPLE``, seed
        ``PERCENTILE_SEED``; all of them in a smaller index), drawn once per loaded index; None
        when the index cannot give its vectors back."""
        if self._sample is None:
            ids = np.asarray(sorted(self._rows), dtype=np.int64)
            if len(ids) > PERCENTILE_SAMPLE:
                rng = np.random.default_rng(PERCENTILE_SEED)
                ids = np.sort(rng.choice(ids, PERCENTILE_SAMPLE, replace=False))
            try:
                self._sample = np.stack([self.vector(int(s)) for s in ids]).astype(np.float32)
            except RuntimeError:  # an index without reconstruct: no percentiles
                self._sample = np.zeros((0, self.dim), dtype=np.float32)
        return self._sample if len(self._sample) else None

    def _add_percentiles(self, hits: list[Hit], query: np.ndarray, plain: np.ndarray) -> None:
        """Each hit's percentile among the query's similarities to the corpus sample, and per
        facet part: which facet made it close (``query`` / ``plain``: [D] or the variants
        [K, D], scored as the search scores them: best variant per sample vector)."""
        sample = self.corpus_sample() if hits else None
        if sample is None:
            return
        query = np.atleast_2d(query)
        plain = np.atleast_2d(plain)
        scores = np.sort((sample @ query.T).max(axis=1))
        part_scores = {}
        if self.facet_layout is not None:
            per_variant = [part_similarities(p, sample, self.facet_layout) for p in plain]
            part_scores = {
                name: np.sort(np.max([v[name] for v in per_variant], axis=0))
                for name in self.facet_layout
            }
        for hit in hits:
            hit.percentile = percentile_of(scores, hit.similarity)
            hit.facet_percentiles = {
                name: percentile_of(part_scores[name], value)
                for name, value in hit.facet_similarities.items()
                if name in part_scores and name != OVERALL
            }
            if hit.facet_percentiles:
                # Ties (several parts above the whole sample): the higher cosine wins.
                hit.closest_facet = max(
                    hit.facet_percentiles,
                    key=lambda n: (hit.facet_percentiles[n], hit.facet_similarities[n]),
                )

    def search_by_segment(
        self,
        segment_id: int,
        k: int = 10,
        exclude_track: str | None = None,
        min_gap_s: float = 0.0,
        **options: Any,
    ) -> list[Hit]:
        """Passages like a stored segment (the segment itself excluded); ``options`` as in
        :meth:`search`; ``work_relative=True``: :meth:`search_work_relative` with the segment's
        own work."""
        if options.pop("work_relative", False):
            return self.search_work_relative(
                self.vector(segment_id),
                self.work_of(segment_id),
                k,
                exclude_track,
                min_gap_s,
                exclude_segments=[segment_id],
                filters=options.pop("filters", None),
            )
        return self.search(
            self.vector(segment_id),
            k,
            exclude_track,
            min_gap_s,
            exclude_segments=[segment_id],
            **options,
        )

    def search_by_track(
        self,
        track_id: str,
        start_s: float,
        end_s: float | None = None,
        k: int = 10,
        exclude_track: str | None = None,
        min_gap_s: float = 0.0,
        **options: Any,
    ) -> tuple[list[int], list[Hit]]:
        """Passages like a time span of a track; the query's own segments are excluded."""
        vector, ids = self.span_vector(track_id, start_s, end_s)
        return ids, self.search(
            vector, k, exclude_track, min_gap_s, exclude_segments=ids, **options
        )

    # -- internals -----------------------------------------------------------------------
    def _candidates(self, q: np.ndarray, fetch: int) -> list[tuple[int, float]]:
        """The ``fetch`` best (segment, score) for queries [K, D], a segment scoring its best
        over the K (exact: a segment in the top ``fetch`` by its best score is in the top
        ``fetch`` of the variant that gives it)."""
        scores, ids = self.index.search(q, fetch)
        best: dict[int, float] = {}
        for row_ids, row_scores in zip(ids, scores):
            for i, score in zip(row_ids, row_scores):
                if i >= 0 and float(score) > best.get(int(i), -np.inf):
                    best[int(i)] = float(score)
        if self._rerank is not None:
            # IVF-PQ scores are approximate: re-score candidates exactly with the raw vectors.
            best = {i: float(np.max(self._rerank[i] @ q.T)) for i in best}
        return sorted(best.items(), key=lambda p: (-p[1], p[0]))[:fetch]

    def _row(self, segment_id: int) -> int:
        try:
            return self._rows[int(segment_id)]
        except (KeyError, ValueError, TypeError):
            raise KeyError(f"unknown segment id {segment_id!r}") from None

    def _rows_of_track(self, track_id: str) -> list[int]:
        rows = self._track_rows.get(track_id)
        if rows is None:
            raise KeyError(f"unknown track {track_id!r}")
        return rows

    def _row_dict(self, row: int) -> dict[str, Any]:
        out = {name: values[row] for name, values in self._cols.items() if name != "metadata_json"}
        out["segment_id"] = int(out["segment_id"])
        out["metadata"] = dict(self._metadata[row])
        return out

    def _track_summary(self, track_id: str) -> dict[str, Any]:
        rows = self._rows_of_track(track_id)
        first = self._row_dict(rows[0])
        return {
            "track_id": track_id,
            "piece_id": first["piece_id"],
            "style": first["style"],
            "source_uri": first["source_uri"],
            "num_segments": len(rows),
            "duration_s": float(max(self._cols["end_s"][r] for r in rows)),
            "metadata": first["metadata"],
        }

    def _hit(self, rank: int, segment_id: int, similarity: float) -> Hit:
        d = self._row_dict(self._rows[segment_id])
        return Hit(
            rank=rank,
            segment_id=segment_id,
            track_id=d["track_id"],
            piece_id=d["piece_id"],
            style=d["style"],
            start_s=float(d["start_s"]),
            end_s=float(d["end_s"]),
            similarity=similarity,
            source_uri=d["source_uri"],
            metadata=d["metadata"],
        )


def _in_dimension_order(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    """A layout as JSON holds it (manifests are written with sorted keys) back in dimension order."""
    if not raw:
        return None
    try:
        return dict(sorted(raw.items(), key=lambda item: int(item[1][0])))
    except (TypeError, ValueError, IndexError, KeyError):
        return dict(raw)  # parse_layout names what is wrong with it


def _parse_metadata(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return {"raw": raw}
    return value if isinstance(value, dict) else {"value": value}


def _load_vectors(
    storage: Storage, rel: str, checksums: dict[str, str] | None = None
) -> dict[int, np.ndarray]:
    names = sorted(n for n in storage.listdir(rel) if n.endswith(".parquet"))
    if checksums is not None and set(names) != set(checksums):
        raise ValueError(
            f"vector files under {storage.url(rel)} differ from those the manifest lists"
        )
    out: dict[int, np.ndarray] = {}
    for name in tqdm(names, desc="load re-ranking vectors", unit="file", disable=len(names) < 8):
        blob = storage.read_bytes(posixpath.join(rel, name))
        if checksums is not None and sha256_bytes(blob) != checksums[name]:
            raise ValueError(f"checksum mismatch for {storage.url(rel, name)}")
        vectors, ids = table_to_vectors(pq.read_table(pa.BufferReader(blob)))
        out.update(zip(ids.tolist(), vectors))
    return out
