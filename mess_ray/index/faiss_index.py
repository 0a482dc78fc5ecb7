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

import contextlib
import hashlib
import math
import os
import posixpath
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import faiss
import numpy as np

from mess_ray.storage import Storage


@dataclass(frozen=True)
class IndexSpec:
    """Everything needed to rebuild an empty index of the same kind (goes into the manifest)."""

    type: str  # flat | ivf | ivfpq | hnsw
    dim: int
    nlist: int = 0  # IVF coarse centroids
    nprobe: int = 0  # IVF lists probed at query time
    pq_m: int = 0  # IVF-PQ sub-quantizers
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_search: int = 64
    ef_construction: int = 40  # HNSW build-time beam (FAISS default)
    rerank: bool = False  # exact re-ranking of candidates with the raw vectors
    mergeable: bool = True  # shards can be built separately and merged
    ondisk: bool = False  # IVF lists memory-mapped from index.ivfdata (merged on disk)
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(**data)


def choose_index_spec(
    count: int,
    dim: int,
    requested: str = "auto",
    *,
    ivf_above: int = 50_000,
    ivfpq_above: int = 1_000_000,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 64,
    memory_budget_mb: float | None = None,
    ef_construction: int = 40,
    ondisk: str = "auto",
) -> IndexSpec:
    """Pick the index type and its parameters for ``count`` vectors of ``dim`` dimensions.

    Defaults are tuned with ``benchmarks/index_search.py`` (2 cores, dim 128): exact search
    stays under 5 ms p99 only up to ~5e4 vectors; IVF-Flat with ~2 sqrt(n) lists and nprobe 16
    keeps recall@10 >= 0.99 at 1e5 and 1e6 at well under 1 ms p50. IVF-PQ (+ exact re-rank)
    takes over above ``ivfpq_above`` vectors or when IVF-Flat would not fit ``memory_budget_mb``.

    ``ondisk`` (IVF only): ``auto`` keeps the inverted lists in a memory-mapped ``.ivfdata`` file
    (shards merged on disk) when even the chosen IVF lists exceed ``memory_budget_mb``;
    ``always`` does so for every IVF index, ``never`` for none.
    """
    if ondisk not in ("auto", "always", "never"):
        raise ValueError(f"unknown ondisk mode {ondisk!r}: expected auto, always or never")
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
        return IndexSpec(
            type="hnsw",
            dim=dim,
            hnsw_m=hnsw_m,
            ef_search=ef_search,
            ef_construction=ef_construction,
            mergeable=False,
        )
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
        spec = IndexSpec(
            type="ivfpq",
            dim=dim,
            nlist=nlist,
            nprobe=probe,
            pq_m=pq_m,
            pq_bits=pq_bits,
            rerank=True,
        )
    else:
        spec = IndexSpec(type="ivf", dim=dim, nlist=nlist, nprobe=probe)
    lists_mb = ivf_lists_mb(spec, count)
    if ondisk == "always" or (
        ondisk == "auto" and memory_budget_mb is not None and lists_mb > memory_budget_mb
    ):
        spec = replace(spec, ondisk=True, params={**spec.params, "lists_mb": round(lists_mb, 1)})
    return spec


def ivf_lists_mb(spec: IndexSpec, count: int) -> float:
    """Size of an IVF index's inverted lists for ``count`` vectors: codes plus 64-bit ids."""
    code_bytes = 4 * spec.dim if spec.type == "ivf" else math.ceil(spec.pq_m * spec.pq_bits / 8)
    return count * (code_bytes + 8) / 2**20


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def training_points_needed(spec: IndexSpec) -> int:
    """How many sample vectors training the coarse quantizer wants (0: no training)."""
    if spec.type == "ivf":
        return 64 * spec.nlist
    if spec.type == "ivfpq":  # the PQ codebooks want ~39 points per code as well
        return max(64 * spec.nlist, 39 * 2**spec.pq_bits)
    return 0


# -- GPU ---------------------------------------------------------------------------------
GPU_SETTINGS = ("auto", True, False)


def decide_gpu(setting: str | bool, num_gpus: int, spec: IndexSpec) -> bool:
    """Whether FAISS work for ``spec`` runs on GPU (pure: ``num_gpus`` is ``faiss.get_num_gpus()``).

    Only IVF types benefit (k-means training of the coarse quantizer, and adding to IVF-Flat);
    exact and HNSW indexes stay on CPU. ``True`` without a GPU is an error, not a silent fallback.
    """
    if setting not in GPU_SETTINGS:
        raise ValueError(f"index.use_gpu must be auto, true or false, got {setting!r}")
    if setting is False:
        return False
    if setting is True and num_gpus < 1:
        raise RuntimeError(
            "index.use_gpu is true but FAISS sees no GPU (faiss.get_num_gpus() == 0): on a CUDA "
            "node install the GPU build (`pip uninstall -y faiss-cpu && pip install -e .[gpu]`), "
            "or set index.use_gpu to auto or false"
        )
    return num_gpus > 0 and spec.type in ("ivf", "ivfpq")


def faiss_num_gpus() -> int:
    """GPUs this process's FAISS can use (0 with the CPU wheel, or in a Ray task without num_gpus)."""
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def create_empty_index(
    spec: IndexSpec, train_vectors: np.ndarray | None = None, use_gpu: bool = False
) -> faiss.Index:
    """An empty index of ``spec``'s type, trained on ``train_vectors`` when the type needs it.

    ``use_gpu`` (see :func:`decide_gpu`): the coarse quantizer's k-means runs on all visible
    GPUs through FAISS's ``clustering_index``; the trained index itself stays a CPU index.
    """
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
            index = faiss.IndexIVFPQ(
                quantizer, d, spec.nlist, spec.pq_m, spec.pq_bits, faiss.METRIC_INNER_PRODUCT
            )
        if train_vectors is None or len(train_vectors) < spec.nlist:
            raise ValueError(f"{spec.type} index needs at least {spec.nlist} training vectors")
        if use_gpu:
            index.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(d))
        index.train(as_vectors(train_vectors, d))
        index.clustering_index = (
            None  # a GPU index cannot be serialized; the centroids are in the quantizer
        )
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


def load_index(
    storage: Storage,
    rel: str,
    expected_sha256: str | None = None,
    ivfdata_sha256: str | None = None,
) -> faiss.Index:
    """The index at ``rel``; when an ``index.ivfdata`` lies beside it (an on-disk IVF index), its
    lists are memory-mapped from a local copy (the file itself on a local root), never read in."""
    blob = storage.read_bytes(rel)
    if expected_sha256 is not None and sha256_bytes(blob) != expected_sha256:
        raise ValueError(
            f"checksum mismatch for {storage.url(rel)}: the index file is corrupt or was replaced"
        )
    ivfdata_rel = posixpath.join(posixpath.dirname(rel), IVFDATA_FILE)
    if not storage.exists(ivfdata_rel):
        return index_from_bytes(blob)
    if (
        ivfdata_sha256 is not None
        and sha256_file(storage.fs, storage.path(ivfdata_rel)) != ivfdata_sha256
    ):
        raise ValueError(
            f"checksum mismatch for {storage.url(ivfdata_rel)}: the inverted lists are corrupt"
        )
    if storage.protocol == "file":
        header = storage.path(rel)
    else:  # mmap needs local files: kept for the life of the process (the index maps them)
        folder = tempfile.mkdtemp(prefix="mess-ray-index-")
        header = os.path.join(folder, posixpath.basename(rel))
        with open(header, "wb") as f:
            f.write(blob)
        storage.fs.get(storage.path(ivfdata_rel), os.path.join(folder, IVFDATA_FILE))
    # IO_FLAG_ONDISK_SAME_DIR: the lists are in index.ivfdata beside the header, wherever the
    # artifact was built (the header records the build-time path).
    return faiss.read_index(header, faiss.IO_FLAG_ONDISK_SAME_DIR)


def build_shard(
    empty_index_bytes: bytes, vectors: np.ndarray, ids: np.ndarray, use_gpu: bool = False
) -> bytes:
    """One shard: a copy of the trained empty index with this part of the corpus added.

    ``use_gpu``: IVF-Flat shards are filled on the GPU(s) and copied back to CPU for saving
    (IVF-PQ encoding stays on CPU: GPU IVF-PQ supports fewer code sizes).
    """
    index = index_from_bytes(empty_index_bytes)
    if use_gpu and isinstance(index, faiss.IndexIVFFlat) and len(ids):
        gpu_index = faiss.index_cpu_to_all_gpus(index)
        add_vectors(gpu_index, vectors, ids)
        index = faiss.index_gpu_to_cpu(gpu_index)
    else:
        add_vectors(index, vectors, ids)
    return index_to_bytes(index)


def build_index(
    spec: IndexSpec,
    parts: Iterable[tuple[np.ndarray, np.ndarray]],
    train_vectors: np.ndarray | None = None,
) -> faiss.Index:
    """Single-process equivalent of the sharded build: one shard per (vectors, ids) part."""
    empty = index_to_bytes(create_empty_index(spec, train_vectors))
    shards = [index_from_bytes(build_shard(empty, v, i)) for v, i in parts]
    return merge_indexes(shards or [index_from_bytes(empty)])


def build_sharded_index_ray(
    spec: IndexSpec,
    empty_index: faiss.Index,
    shard_loaders: Sequence[Any],
    num_cpus: float = 0.5,
    use_gpu: str | bool = False,
    ondisk_dir: str | None = None,
    storage: Storage | None = None,
    work_rel: str | None = None,
) -> faiss.Index:
    """Build shards in parallel Ray tasks and merge them on the driver.

    ``shard_loaders`` are picklable zero-argument callables returning ``(vectors, ids)`` for
    one shard, so each task reads its own part of the corpus rather than receiving it
    through the driver. ``use_gpu`` (``index.use_gpu``): with GPUs in the cluster, shard tasks
    ask Ray for one and fill IVF-Flat shards there.

    ``spec.ondisk``: the tasks write their shards under ``work_rel`` in ``storage`` instead of
    returning them, and :func:`merge_shards_ondisk` merges them into ``ondisk_dir/index.ivfdata``
    without ever holding all inverted lists in memory.
    """
    import ray

    # Ray hides GPUs from tasks that do not ask for one: ask only when the cluster has some.
    shard_gpu = (
        decide_gpu(use_gpu, int(ray.cluster_resources().get("GPU", 0)), spec) and spec.type == "ivf"
    )
    remote_opts = {"num_cpus": num_cpus, "num_gpus": 1 if shard_gpu else 0}

    @ray.remote(**remote_opts)
    def _build(empty_ref: bytes, loader) -> bytes:
        vectors, ids = loader()
        return build_shard(empty_ref, vectors, ids, use_gpu=shard_gpu and faiss_num_gpus() > 0)

    @ray.remote(**remote_opts)
    def _build_to_storage(
        empty_ref: bytes, loader, root: str, endpoint: str | None, rel: str
    ) -> int:
        vectors, ids = loader()
        blob = build_shard(empty_ref, vectors, ids, use_gpu=shard_gpu and faiss_num_gpus() > 0)
        Storage(root, endpoint).write_bytes(rel, blob)
        return len(ids)

    empty = index_to_bytes(empty_index)
    if not spec.mergeable:
        shard_loaders = [_ConcatLoaders(list(shard_loaders))]
    empty_ref = ray.put(empty)
    if spec.ondisk:
        if ondisk_dir is None or storage is None or work_rel is None:
            raise ValueError("an on-disk index needs ondisk_dir, storage and work_rel")
        rels = [f"{work_rel}/shard-{i:05d}.faiss" for i in range(len(shard_loaders))]
        ray.get(
            [
                _build_to_storage.remote(
                    empty_ref, loader, storage.root, storage.s3_endpoint_url, rel
                )
                for loader, rel in zip(shard_loaders, rels)
            ]
        )
        with local_files(storage, rels) as paths:
            return merge_shards_ondisk(empty, paths, os.path.join(ondisk_dir, IVFDATA_FILE))
    shard_blobs = ray.get([_build.remote(empty_ref, loader) for loader in shard_loaders])
    return merge_indexes([index_from_bytes(b) for b in shard_blobs] or [index_from_bytes(empty)])


# -- on-disk inverted lists ------------------------------------------------------------------
IVFDATA_FILE = "index.ivfdata"


def merge_shards_ondisk(
    empty_index_bytes: bytes, shard_paths: Sequence[str], ivfdata_path: str
) -> faiss.Index:
    """Merge IVF shard files into one index whose inverted lists live in ``ivfdata_path``.

    The shards are memory-mapped (``IO_FLAG_MMAP``) and their lists appended list by list to an
    ``OnDiskInvertedLists`` file (``faiss.contrib.ondisk.merge_ondisk``), so peak memory stays
    near one list rather than the whole index. Ids are the shards' own 64-bit ids.
    """
    from faiss.contrib.ondisk import merge_ondisk

    index = index_from_bytes(empty_index_bytes)
    if not isinstance(faiss.extract_index_ivf(index), faiss.IndexIVF) or index.ntotal:
        raise ValueError("on-disk merging needs an empty trained IVF index")
    if os.path.exists(ivfdata_path):  # a half-written file of an interrupted build
        os.remove(ivfdata_path)
    merge_ondisk(index, list(shard_paths), ivfdata_path)
    return index


def ondisk_filename(index: faiss.Index) -> str:
    """The ``.ivfdata`` file an on-disk IVF index maps its lists from."""
    try:
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    except RuntimeError:
        lists = None
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        raise ValueError("the index does not keep its inverted lists on disk")
    return str(lists.filename)


@contextlib.contextmanager
def local_files(storage: Storage, rels: Sequence[str]) -> Iterator[list[str]]:
    """Local paths of storage files: the files themselves on a local root, else downloaded copies."""
    if storage.protocol == "file":
        yield [storage.path(rel) for rel in rels]
        return
    with tempfile.TemporaryDirectory(prefix="mess-ray-shards-") as tmp:
        paths = []
        for i, rel in enumerate(rels):
            paths.append(os.path.join(tmp, f"{i:05d}-{posixpath.basename(rel)}"))
            storage.fs.get(storage.path(rel), paths[-1])
        yield paths


def sha256_file(fs: Any, path: str, chunk: int = 16 << 20) -> str:
    """Streaming sha256 of a (possibly multi-GB) file on an fsspec filesystem."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
