"""The index job: embed every ingested segment on a Ray Data actor pool, build a FAISS index
from sharded Ray tasks, and publish it as a versioned, checksummed ``index`` artifact.

Artifact ``index/<version>/``: ``vectors/*.parquet`` (segment_id, embedding), ``index.faiss``,
``metadata.parquet`` (segment metadata without audio) and ``manifest.json``. LATEST moves only
after every file is written and its checksum re-read and verified.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import random
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from mess_ray.config import MessRayConfig
from mess_ray.facets import layout_dim, parse_layout
from mess_ray.index.embed import SegmentEmbedder, table_to_vectors
from mess_ray.index.faiss_index import (
    IVFDATA_FILE,
    IndexSpec,
    build_sharded_index_ray,
    choose_index_spec,
    create_empty_index,
    decide_gpu,
    faiss_num_gpus,
    index_to_bytes,
    ondisk_filename,
    sha256_bytes,
    sha256_file,
    training_points_needed,
)
from mess_ray.segments import read_segment_table, read_segments_ray
from mess_ray.storage import Storage, new_version

log = logging.getLogger(__name__)

STAGE = "index"
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"
VECTORS_DIR = "vectors"
BUILD_DIR = (
    "_build"  # index/_build/<version>/: shard files of an on-disk merge, removed once merged
)
# The segment table without audio, as search results and playback need it.
INDEX_METADATA_COLUMNS = [
    "segment_id",
    "track_id",
    "piece_id",
    "style",
    "start_s",
    "end_s",
    "sample_rate",
    "source_uri",
    "metadata_json",
]


class IndexIntegrityError(RuntimeError):
    """The embedded vectors do not reconcile with the segment table."""


def reconcile_ids(expected_ids: np.ndarray, vector_ids: np.ndarray) -> dict[str, int]:
    """Check that every segment has exactly one vector and no vector lacks a segment."""
    expected = np.asarray(expected_ids, dtype=np.int64)
    got = np.asarray(vector_ids, dtype=np.int64)
    unique_got, counts = np.unique(got, return_counts=True)
    duplicated = unique_got[counts > 1]
    missing = np.setdiff1d(expected, unique_got)
    unexpected = np.setdiff1d(unique_got, expected)
    if len(np.unique(expected)) != len(expected):
        raise IndexIntegrityError("the segment table itself has duplicate segment ids")
    if len(duplicated) or len(missing) or len(unexpected):
        raise IndexIntegrityError(
            f"vectors do not reconcile with the segment table: {len(expected)} segments, {len(got)} vectors, "
            f"{len(missing)} missing (e.g. {missing[:3].tolist()}), {len(duplicated)} duplicated "
            f"(e.g. {duplicated[:3].tolist()}), {len(unexpected)} unknown (e.g. {unexpected[:3].tolist()})"
        )
    return {"segments": int(len(expected)), "vectors": int(len(got))}


@dataclass
class VectorShardLoader:
    """Reads one shard's vectors: its files, optionally only ids with ``id % modulo == residue``."""

    storage_root: str
    s3_endpoint_url: str | None
    files: list[str]
    modulo: int = 1
    residue: int = 0

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        storage = Storage(self.storage_root, self.s3_endpoint_url)
        tables = [pq.read_table(f, filesystem=storage.pyarrow_fs()) for f in self.files]
        if not tables:
            return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        vectors, ids = table_to_vectors(pa.concat_tables(tables))
        if self.modulo > 1:
            keep = ids % self.modulo == self.residue
            vectors, ids = vectors[keep], ids[keep]
        return vectors, ids


def shard_loaders(storage: Storage, files: list[str], shards: int) -> list[VectorShardLoader]:
    """Split the vector files over ``shards`` loaders (by id when there are fewer files than shards)."""
    if shards < 1:
        raise ValueError("index.shards must be at least 1")
    if len(files) >= shards:
        return [
            VectorShardLoader(storage.root, storage.s3_endpoint_url, files[i::shards])
            for i in range(shards)
        ]
    return [
        VectorShardLoader(storage.root, storage.s3_endpoint_url, files, shards, i)
        for i in range(shards)
    ]


def sample_training_vectors(
    storage: Storage, files: list[str], count: int, seed: int = 0
) -> np.ndarray:
    """Up to ``count`` vectors from randomly chosen files (the coarse quantizer is trained once)."""
    rng = random.Random(seed)
    order = files[:]
    rng.shuffle(order)
    parts: list[np.ndarray] = []
    total = 0
    for path in order:
        vectors, _ = table_to_vectors(pq.read_table(path, filesystem=storage.pyarrow_fs()))
        parts.append(vectors)
        total += len(vectors)
        if total >= count:
            break
    sample = np.concatenate(parts)
    if len(sample) > count:
        sample = sample[np.random.default_rng(seed).choice(len(sample), count, replace=False)]
    return sample


def vector_files(storage: Storage, rel: str) -> list[str]:
    return sorted(
        storage.path(rel, name) for name in storage.listdir(rel) if name.endswith(".parquet")
    )


def read_vector_ids(storage: Storage, files: list[str]) -> np.ndarray:
    ids = [
        pq.read_table(f, columns=["segment_id"], filesystem=storage.pyarrow_fs())
        .column("segment_id")
        .to_numpy()
        for f in tqdm(files, desc="reconcile vector ids", unit="file", disable=len(files) < 8)
    ]
    return np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)


def keep_segment_ids(batch: dict[str, np.ndarray], wanted: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of a segment batch whose id is in ``wanted`` (a sorted int64 array)."""
    mask = np.isin(np.asarray(batch["segment_id"], dtype=np.int64), wanted, assume_unique=False)
    return {name: np.asarray(column)[mask] for name, column in batch.items()}


def embedding_actor_fault_tolerance(cfg: MessRayConfig) -> dict[str, int]:
    """Ray actor options for the embedding pool (explicit, not Ray Data's defaults, so the
    behaviour is the config's: restart dead actors, retry their batches a bounded number of times)."""
    restarts = cfg.index.actor_max_restarts
    return {
        "max_restarts": restarts,
        "max_task_retries": cfg.index.actor_task_retries if restarts != 0 else 0,
    }


def embed_segments(
    cfg: MessRayConfig,
    storage: Storage,
    ingest_version: str,
    embedder_info: dict[str, Any],
    out_rel: str,
    only_ids: np.ndarray | None = None,
) -> None:
    """Ray Data: segment rows -> actor pool of Embedders -> Parquet vector shards under ``out_rel``.

    ``only_ids``: embed just these segments (reindex), filtered in Ray tasks before the actors.

    Fault tolerance: a dead embedding actor (killed, OOM, its node gone) is restarted up to
    ``index.actor_max_restarts`` times and the batches it held are re-submitted (up to
    ``index.actor_task_retries`` times; unbounded by default, because Ray also counts the
    failed calls to an actor whose node is not yet declared dead). A retried batch replaces the lost attempt's output
    object (Ray Data never emits both), and the Parquet write tasks name their files by
    task, so a retried write overwrites rather than adds: the callers' ``reconcile_ids``
    then proves no segment was lost or duplicated (tests/test_index_fault.py kills an actor).
    """
    dataset = read_segments_ray(
        storage, ingest_version, columns=["segment_id", "sample_rate", "audio"]
    )
    if only_ids is not None:
        wanted = np.unique(np.asarray(only_ids, dtype=np.int64))
        dataset = dataset.map_batches(
            keep_segment_ids, fn_kwargs={"wanted": wanted}, batch_format="numpy", num_cpus=0.5
        )
    with warnings.catch_warnings():
        # Ray 2.60 takes actor options only through the deprecated **ray_remote_args (no named
        # parameter for max_restarts/max_task_retries yet); the settings matter more than the warning.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        vectors = embedding_pool(dataset, cfg, embedder_info)
    vectors.write_parquet(storage.path(out_rel), filesystem=storage.pyarrow_fs())


def embedding_pool(dataset: Any, cfg: MessRayConfig, embedder_info: dict[str, Any]) -> Any:
    """The lazy Ray Data stage: segment batches -> vector-shard tables on an autoscaling actor pool.

    The one way segments are embedded on Ray: indexing, reindexing and evaluation all use it."""
    import ray.data

    if cfg.index.min_actors > cfg.index.max_actors:
        raise ValueError(
            f"index.min_actors ({cfg.index.min_actors}) exceeds index.max_actors ({cfg.index.max_actors})"
        )
    from mess_ray import console

    return dataset.map_batches(
        SegmentEmbedder,
        fn_constructor_kwargs={
            "cfg_json": cfg.model_dump(mode="json"),
            "embedder_info": embedder_info,
            "progress": console.progress_handle(),  # the console's bar (None: not shown)
        },
        compute=ray.data.ActorPoolStrategy(
            min_size=cfg.index.min_actors, max_size=cfg.index.max_actors
        ),
        num_cpus=cfg.index.cpus_per_actor,
        num_gpus=cfg.index.gpus_per_actor,
        batch_size=cfg.index.batch_size,
        batch_format="numpy",
        **embedding_actor_fault_tolerance(cfg),
    )


def write_verified(storage: Storage, rel: str, data: bytes) -> str:
    """Write bytes and re-read them: the checksum in the manifest is of what is actually stored."""
    storage.write_bytes(rel, data)
    digest = sha256_bytes(storage.read_bytes(rel))
    if digest != sha256_bytes(data):
        raise IndexIntegrityError(
            f"{storage.url(rel)} reads back different bytes than were written"
        )
    return digest


def run_index(cfg: MessRayConfig, storage: Storage, model_ref: str = "auto") -> dict[str, Any]:
    """Embed the latest ingest artifact with ``model_ref`` and publish an ``index`` artifact."""
    from mess_ray.models import Embedder
    from mess_ray.raylocal import ensure_ray

    ensure_ray(cfg.ray)
    ingest_version = storage.require_latest("ingest")
    segments = read_segment_table(storage, ingest_version)
    if segments.num_rows == 0:
        raise ValueError(f"ingest artifact {ingest_version} has no segments: nothing to index")
    embedder = Embedder.from_ref(cfg, storage, model_ref)
    version = new_version()
    vectors_rel = posixpath.join(STAGE, version, VECTORS_DIR)
    log.info(
        "embedding %d segments of ingest %s with %s", segments.num_rows, ingest_version, model_ref
    )
    from mess_ray import console

    console.report(console.progress_handle(), total=segments.num_rows)

    embed_segments(cfg, storage, ingest_version, embedder.info, vectors_rel)
    files = vector_files(storage, vectors_rel)
    counts = reconcile_ids(
        segments.column("segment_id").to_numpy(), read_vector_ids(storage, files)
    )

    spec = spec_for(cfg, counts["vectors"], int(embedder.dim))
    index = build_index_from_files(cfg, storage, spec, files, counts["vectors"], version)
    if index.ntotal != counts["vectors"]:
        raise IndexIntegrityError(
            f"merged index holds {index.ntotal} vectors, expected {counts['vectors']}"
        )

    counts.update({"vector_files": len(files), "shards": cfg.index.shards})
    extra = None
    if cfg.content.features:  # the content view's features, stored with this version
        from mess_ray.index.content_features import build_content

        extra = {
            "content": build_content(
                cfg, storage, ingest_version, posixpath.join(STAGE, version), segments
            )
        }
    return write_index_artifact(
        cfg,
        storage,
        version,
        index,
        spec,
        segments,
        embedder.info,
        counts,
        {"ingest": ingest_version, "model_ref": model_ref},
        extra,
    )


def spec_for(cfg: MessRayConfig, count: int, dim: int) -> IndexSpec:
    """The index type and parameters the config asks for at this corpus size."""
    return choose_index_spec(
        count,
        dim,
        cfg.index.type,
        ivf_above=cfg.index.ivf_above,
        ivfpq_above=cfg.index.ivfpq_above,
        nprobe=cfg.index.nprobe,
        hnsw_m=cfg.index.hnsw_m,
        ef_search=cfg.index.ef_search,
        memory_budget_mb=cfg.index.memory_budget_mb,
        ef_construction=cfg.index.hnsw_ef_construction,
        ondisk=cfg.index.ondisk,
    )


def build_index_from_files(
    cfg: MessRayConfig,
    storage: Storage,
    spec: IndexSpec,
    files: list[str],
    count: int,
    version: str,
    empty: Any | None = None,
) -> Any:
    """Train once on a sample (unless ``empty`` is a trained template), build shards in Ray tasks, merge.

    GPU (``index.use_gpu``): k-means runs on the driver's GPUs when its FAISS sees any; shard
    tasks get a GPU when the cluster has them. On-disk specs merge into ``index.ivfdata`` in the
    version folder (local root) or a local work folder (remote root; uploaded on publish); the
    shard files go to ``index/_build/<version>/`` and are removed once merged.
    """
    import ray

    local_gpus = faiss_num_gpus()
    decide_gpu(
        cfg.index.use_gpu, max(local_gpus, int(ray.cluster_resources().get("GPU", 0))), spec
    )  # true: GPU?
    if empty is None:
        train = None
        if training_points_needed(spec):
            train = sample_training_vectors(
                storage, files, min(training_points_needed(spec), count)
            )
        empty = create_empty_index(
            spec, train, use_gpu=local_gpus > 0 and decide_gpu(cfg.index.use_gpu, local_gpus, spec)
        )
    loaders = shard_loaders(storage, files, cfg.index.shards)
    if not spec.ondisk:
        return build_sharded_index_ray(
            spec, empty, loaders, num_cpus=0.5, use_gpu=cfg.index.use_gpu
        )
    if storage.protocol == "file":
        ondisk_dir = storage.path(STAGE, version)
        storage.fs.makedirs(ondisk_dir, exist_ok=True)
    else:
        ondisk_dir = tempfile.mkdtemp(prefix="mess-ray-ondisk-")
    work_rel = posixpath.join(STAGE, BUILD_DIR, version)
    try:
        return build_sharded_index_ray(
            spec,
            empty,
            loaders,
            num_cpus=0.5,
            use_gpu=cfg.index.use_gpu,
            ondisk_dir=ondisk_dir,
            storage=storage,
            work_rel=work_rel,
        )
    finally:
        if storage.exists(work_rel):
            storage.fs.rm(storage.path(work_rel), recursive=True)


def model_provenance(storage: Storage, embedder_info: dict[str, Any]) -> dict[str, Any]:
    """Encoder checkpoint and the config hash that trained it, for the index manifest's model info."""
    if embedder_info.get("kind") == "random":
        return {"checkpoint": None, "trained_config_digest": None}
    out: dict[str, Any] = {"checkpoint": embedder_info.get("path"), "trained_config_digest": None}
    if embedder_info.get("shipped"):  # a model shipped in the package: its recorded recipe
        from mess_ray.models.shipped import shipped_manifest

        shipped = shipped_manifest(embedder_info["shipped"])
        out.update(
            {
                "trained_config_digest": shipped.get("recipe", {}).get("config_digest"),
                "weights_sha256": shipped.get("weights_sha256"),
            }
        )
        return out
    stage, version = embedder_info.get("stage"), embedder_info.get("version")
    if stage and version:
        try:
            trained = storage.manifest(stage, version)
        except FileNotFoundError:  # a model folder without its training manifest: path only
            return out
        out.update(
            {
                "checkpoint": trained.get("checkpoint")
                or trained.get("model_path")
                or embedder_info.get("path"),
                "model_path": trained.get("model_path", embedder_info.get("path")),
                "trained_config_digest": trained.get("config_digest"),
            }
        )
    return out


def manifest_facet_layout(embedder_info: dict[str, Any], dim: int) -> dict[str, list[int]] | None:
    """The embedder's facet layout as the manifest records it (JSON lists), checked against the index."""
    raw = embedder_info.get("facet_layout")
    if (
        raw
    ):  # a layout read back from a manifest has its keys sorted by name (JSON sort_keys): by offset
        try:
            raw = dict(sorted(raw.items(), key=lambda item: int(item[1][0])))
        except (TypeError, ValueError, IndexError, KeyError):
            pass  # parse_layout names what is wrong with it
    layout = parse_layout(raw)
    if layout is None:
        return None
    if layout_dim(layout) != dim:
        raise IndexIntegrityError(
            f"the embedder's facet layout spans {layout_dim(layout)} dimensions "
            f"but its vectors have {dim}"
        )
    return {name: [start, end] for name, (start, end) in layout.items()}


def write_index_artifact(
    cfg: MessRayConfig,
    storage: Storage,
    version: str,
    index: Any,
    spec: IndexSpec,
    segments: pa.Table,
    embedder_info: dict[str, Any],
    counts: dict[str, int],
    inputs: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write index.faiss and metadata.parquet, verify their checksums, then publish the manifest."""
    base = posixpath.join(STAGE, version)
    if index.ntotal != segments.num_rows:
        raise IndexIntegrityError(
            f"index holds {index.ntotal} vectors but the segment table {segments.num_rows} rows"
        )
    facet_layout = manifest_facet_layout(embedder_info, int(index.d))
    checksums = {}
    files = {"index": INDEX_FILE, "metadata": METADATA_FILE, "vectors": VECTORS_DIR}
    if (
        spec.ondisk
    ):  # the lists are in a (large) file beside the header: upload unless built in place
        ivfdata_local = ondisk_filename(index)
        target = storage.path(base, IVFDATA_FILE)
        if storage.protocol != "file" or os.path.abspath(ivfdata_local) != os.path.abspath(target):
            storage.put_file(ivfdata_local, posixpath.join(base, IVFDATA_FILE))
        checksums[IVFDATA_FILE] = sha256_file(storage.fs, target)
        files["ivfdata"] = IVFDATA_FILE
    # The header of an on-disk index records where its lists are; readers look beside it instead.
    index_sha = write_verified(storage, posixpath.join(base, INDEX_FILE), index_to_bytes(index))
    buffer = io.BytesIO()
    pq.write_table(segments.select(INDEX_METADATA_COLUMNS), buffer)
    metadata_sha = write_verified(storage, posixpath.join(base, METADATA_FILE), buffer.getvalue())
    vector_checksums = {
        name: sha256_bytes(storage.read_bytes(posixpath.join(base, VECTORS_DIR, name)))
        for name in storage.listdir(posixpath.join(base, VECTORS_DIR))
        if name.endswith(".parquet")
    }
    work_norms = None
    if cfg.work_relative.enabled:  # per-work norms of these vectors (work-relative search)
        from mess_ray.index.work_norms import fit_from_files, write_work_norms

        files_here = vector_files(storage, posixpath.join(base, VECTORS_DIR))
        if files_here:
            work_norms = write_work_norms(
                storage, base, fit_from_files(storage, files_here, segments, cfg.work_relative)
            )
    manifest = {
        "inputs": inputs,
        # Enough to rebuild the embedder (Embedder.from_info) plus its provenance.
        "model": {
            **embedder_info,
            **model_provenance(storage, embedder_info),
            "index_config_digest": cfg.digest(),
        },
        "dim": int(index.d),
        "count": int(index.ntotal),
        "counts": {**counts, "tracks": len(set(segments.column("track_id").to_pylist()))},
        "index": spec.to_dict(),
        # Which dimensions are which facet (mess_ray/facets.py): weighted queries need it; None: no facets.
        "facet_layout": facet_layout,
        "files": files,
        "checksums": {INDEX_FILE: index_sha, METADATA_FILE: metadata_sha, **checksums},
        # Vector shards (re-ranking, reindex reuse): checked by SearchIndex when it loads them.
        "vector_checksums": vector_checksums,
        "config_digest": cfg.digest(),
        "audio": {
            "sample_rate": cfg.audio.sample_rate,
            "window_s": cfg.audio.window_s,
            "hop_s": cfg.audio.hop_s,
        },
        # Per-work norms (mess_ray.work_relative): None when disabled or no vectors.
        "work_norms": work_norms,
        **(extra or {}),
    }
    return storage.publish(STAGE, version, manifest)
