"""FAISS index construction: choose a type by corpus size, train once, build shards, merge.

Everything here is pure (numpy + faiss) except :func:`build_sharded_index_ray`, the thin
Ray wrapper that builds shards in parallel tasks. Vectors are L2-normalised, so inner
product is cosine similarity; ids are the 64-bit segment ids from the segment table.

Index types:
- ``flat``: exact ``IndexFlatIP`` wrapped in ``IndexIDMap2`` (ids kept, ``reconstruct`` by id).
- ``ivf``: ``IndexIVFFlat`` (exact distances inside probed lists) up to ``ivfpq_above``
  vectors; above it ``IndexIVFPQ`` whose candidates the searcher re-ranks exactly against
  the stored raw vectors (``rerank`` in the spec).
- ``hnsw``: ``IndexHNSWFlat`` in ``IndexIDMap2``; graphs cannot be merged, so it is built
  in one task.
``auto`` picks ``flat`` below ``ivf_above`` vectors and ``ivf`` above.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import faiss
import numpy as np

from mess_ray.storage import Storage


@dataclass(frozen=True)
class IndexSpec:
    """Everything needed to rebuild an empty index of the same kind (goes into the manifest)."""

    type: str                      # flat | ivf | ivfpq | hnsw
    dim: int
    nlist: int = 0                 # IVF coarse centroids
    nprobe: int = 0                # IVF lists probed at query time
    pq_m: int = 0                  # IVF-PQ sub-quantizers
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_search: int = 64
    ef_construction: int = 40      # HNSW build-time beam (FAISS default)
    rerank: bool = False           # exact re-ranking of candidates with the raw vectors
    mergeable: bool = True         # shards can be built separately and merged
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IndexSpec":
        return cls(**data)


def choose_index_spec(count: int, dim: int, requested: str = "auto", *, ivf_above: int = 50_000,
                      ivfpq_above: int = 1_000_000, nprobe: int = 16, hnsw_m: int = 32,
                      ef_search: int = 64, memory_budget_mb: float | None = None,
                      ef_construction: int = 40) -> IndexSpec:
    """Pick the index type and its parameters for ``count`` vectors of ``dim`` dimensions.

    Defaults are tuned with ``benchmarks/index_search.py`` (2 cores, dim 128): exact search
    stays under 5 ms p99 only up to ~5e4 vectors; IVF-Flat with ~2 sqrt(n) lists and nprobe 16
    keeps recall@10 >= 0.99 at 1e5 and 1e6 at well under 1 ms p50. IVF-PQ (+ exact re-rank)
    takes over above ``ivfpq_above`` vectors or when IVF-Flat would not fit ``memory_budget_mb``.
    """
    if count < 1:
        raise ValueError("cannot build an index over 0 vectors")
    if dim < 1:
        raise ValueError(f"vector dimension must be positive, got {dim}")
    if requested not in ("auto", "flat", "ivf", "hnsw"):
        raise ValueError(f"unknown index type {requested!r}: expected auto, flat, ivf or hnsw")
    kind = requested
    if kind == "auto":
        kind = "flat" if count < ivf_above else "ivf"
    if kind == "flat":
        return IndexSpec(type="flat", dim=dim)
    if kind == "hnsw":
        return IndexSpec(type="hnsw", dim=dim, hnsw_m=hnsw_m, ef_search=ef_search, ef_construction=ef_construction,
                         mergeable=False)
    # IVF: FAISS's rule of thumb is 4..16 sqrt(n) lists; measured at 1e6 x 128 on 2 cores,
    # 2 sqrt(n) lists train 4x faster (k-means cost ~ nlist^2) with the same recall@10 at
    # nprobe 16 and p99 well under 5 ms. At least 39 training points per list, so tiny
    # corpora (tests, forced "ivf") get few lists instead of a degenerate clustering.
    nlist = max(1, min(int(2 * math.sqrt(count)), count // 39 or 1))
    probe = max(1, min(nprobe, nlist))
    flat_codes_mb = count * (4 * dim + 8) / 2**20  # IVF-Flat: the vectors plus their 64-bit ids
    if count > ivfpq_above or (memory_budget_mb is not None and flat_codes_mb > memory_budget_mb):
        pq_m = _largest_divisor_at_most(dim, 32)
        # 8-bit codebooks want 39 * 256 training points; smaller corpora get smaller codebooks.
        pq_bits = 8 if count >= 39 * 256 else max(1, min(8, int(math.log2(max(2, count // 39)))))
        return IndexSpec(type="ivfpq", dim=dim, nlist=nlist, nprobe=probe, pq_m=pq_m, pq_bits=pq_bits, rerank=True)
    return IndexSpec(type="ivf", dim=dim, nlist=nlist, nprobe=probe)


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def training_points_needed(spec: IndexSpec) -> int:
    """How many sample vectors training the coarse quantizer wants (0: no training)."""
    if spec.type == "ivf":
        return 64 * spec.nlist
    if spec.type == "ivfpq":  # the PQ codebooks want ~39 points per code as well
        return max(64 * spec.nlist, 39 * 2 ** spec.pq_bits)
    return 0


def create_empty_index(spec: IndexSpec, train_vectors: np.ndarray | None = None) -> faiss.Index:
    """An empty index of ``spec``'s type, trained on ``train_vectors`` when the type needs it."""
    d = spec.dim
    if spec.type == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if spec.type == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = spec.ef_construction
        return faiss.IndexIDMap2(hnsw)
    if spec.type in ("ivf", "ivfpq"):
        quantizer = faiss.IndexFlatIP(d)
        if spec.type == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, spec.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, spec.nlist, spec.pq_m, spec.pq_bits, faiss.METRIC_INNER_PRODUCT)
        if train_vectors is None or len(train_vectors) < spec.nlist:
            raise ValueError(f"{spec.type} index needs at least {spec.nlist} training vectors")
        index.train(as_vectors(train_vectors, d))
        return index
    raise ValueError(f"unknown index type {spec.type!r}")


def as_vectors(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Validate a [N, dim] float matrix and return it C-contiguous float32."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"expected vectors of shape [N, {dim}], got {list(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("vectors contain NaN or infinite values")
    return np.ascontiguousarray(arr)


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """Add vectors under their 64-bit ids (in place; returns the index)."""
    ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
    if len(ids) == 0:
        return index
    vectors = as_vectors(vectors, index.d)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
    index.add_with_ids(vectors, ids)
    return index


def merge_indexes(indexes: Sequence[faiss.Index]) -> faiss.Index:
    """Merge shards built from the same trained empty index into the first one.

    ``merge_from(other, add_id=0)`` keeps each shard's own 64-bit ids.
    """
    if not indexes:
        raise ValueError("no index shards to merge")
    merged = indexes[0]
    for shard in indexes[1:]:
        if shard.ntotal:
            merged.merge_from(shard, 0)
    return merged


def configure_for_search(index: faiss.Index, spec: IndexSpec) -> faiss.Index:
    """Query-time parameters and an id->vector map so ``reconstruct(segment_id)`` works."""
    if spec.type in ("ivf", "ivfpq"):
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", spec.nprobe)
        ivf = faiss.extract_index_ivf(index)
        if ivf.direct_map.type != faiss.DirectMap.Hashtable:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    elif spec.type == "hnsw":
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", spec.ef_search)
    return index


def index_to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def index_from_bytes(blob: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_index(storage: Storage, rel: str, index: faiss.Index) -> str:
    """Write the serialized index through storage (local or S3); returns its sha256."""
    blob = index_to_bytes(index)
    storage.write_bytes(rel, blob)
    return sha256_bytes(blob)


def load_index(storage: Storage, rel: str, expected_sha256: str | None = None) -> faiss.Index:
    blob = storage.read_bytes(rel)
    if expected_sha256 is not None and sha256_bytes(blob) != expected_sha256:
        raise ValueError(f"checksum mismatch for {storage.url(rel)}: the index file is corrupt or was replaced")
    return index_from_bytes(blob)


def build_shard(empty_index_bytes: bytes, vectors: np.ndarray, ids: np.ndarray) -> bytes:
    """One shard: a copy of the trained empty index with this part of the corpus added."""
    index = index_from_bytes(empty_index_bytes)
    add_vectors(index, vectors, ids)
    return index_to_bytes(index)


def build_index(spec: IndexSpec, parts: Iterable[tuple[np.ndarray, np.ndarray]],
                train_vectors: np.ndarray | None = None) -> faiss.Index:
    """Single-process equivalent of the sharded build: one shard per (vectors, ids) part."""
    empty = index_to_bytes(create_empty_index(spec, train_vectors))
    shards = [index_from_bytes(build_shard(empty, v, i)) for v, i in parts]
    return merge_indexes(shards or [index_from_bytes(empty)])


def build_sharded_index_ray(spec: IndexSpec, empty_index: faiss.Index, shard_loaders: Sequence[Any],
                            num_cpus: float = 0.5) -> faiss.Index:
    """Build shards in parallel Ray tasks and merge them on the driver.

    ``shard_loaders`` are picklable zero-argument callables returning ``(vectors, ids)`` for
    one shard, so each task reads its own part of the corpus rather than receiving it
    through the driver.
    """
    import ray

    @ray.remote(num_cpus=num_cpus)
    def _build(empty_ref: bytes, loader) -> bytes:
        vectors, ids = loader()
        return build_shard(empty_ref, vectors, ids)

    empty = index_to_bytes(empty_index)
    if not spec.mergeable:
        shard_loaders = [_ConcatLoaders(list(shard_loaders))]
    empty_ref = ray.put(empty)
    shard_blobs = ray.get([_build.remote(empty_ref, loader) for loader in shard_loaders])
    return merge_indexes([index_from_bytes(b) for b in shard_blobs] or [index_from_bytes(empty)])


@dataclass
class _ConcatLoaders:
    """All shards' parts in one task (for index types whose shards cannot be merged)."""

    loaders: list[Any]

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        parts = [loader() for loader in self.loaders]
        parts = [p for p in parts if len(p[1])]
        if not parts:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
