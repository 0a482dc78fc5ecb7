"""On-disk IVF merging (larger-than-memory indices) and the GPU decision.

Pure parts: the on-disk merge answers exactly as the in-memory merge, keeps 64-bit ids, loads
memory-mapped from a moved artifact folder and checks its checksum; when on-disk and GPU are
chosen. One Ray run: ``index.ondisk=always`` through run_index, SearchIndex and reindex."""

from __future__ import annotations

import os
import posixpath
import shutil

import faiss
import helpers
import numpy as np
import pytest
from helpers import tiny_config

from mess_ray.index import SearchIndex, run_index, run_reindex
from mess_ray.index.faiss_index import (
    IVFDATA_FILE,
    IndexSpec,
    build_index,
    choose_index_spec,
    create_empty_index,
    decide_gpu,
    index_to_bytes,
    ivf_lists_mb,
    load_index,
    merge_indexes,
    merge_shards_ondisk,
    ondisk_filename,
    sha256_file,
)
from mess_ray.models import Embedder
from mess_ray.storage import Storage


def clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d)).astype(np.float32)
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ondisk_merge_answers_like_the_in_memory_merge(tmp_path, kind):
    n, d = 6000, 32
    x, ids = clustered(n, d), np.arange(n, dtype=np.int64) * 1_000_003 + 2**40  # 64-bit ids
    spec = choose_index_spec(n, d, "ivf", ivfpq_above=0 if kind == "ivfpq" else 10**9, nprobe=8)
    assert spec.type == kind
    empty = index_to_bytes(create_empty_index(spec, x[:4000]))
    shard_paths = []
    for i in range(3):  # shards as the Ray tasks write them
        shard = faiss.deserialize_index(np.frombuffer(empty, np.uint8))
        shard.add_with_ids(x[i::3], ids[i::3])
        shard_paths.append(str(tmp_path / f"shard-{i}.faiss"))
        faiss.write_index(shard, shard_paths[-1])
    in_memory = merge_indexes([faiss.read_index(p) for p in shard_paths])
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    ondisk = merge_shards_ondisk(empty, shard_paths, str(build_dir / IVFDATA_FILE))
    assert ondisk.ntotal == in_memory.ntotal == n and ondisk_filename(ondisk).endswith(IVFDATA_FILE)
    with pytest.raises(ValueError, match="on disk"):
        ondisk_filename(in_memory)
    (build_dir / "index.faiss").write_bytes(index_to_bytes(ondisk))
    del ondisk

    # The published folder moves (another root, another machine): the lists are found beside the header.
    root = tmp_path / "store"
    shutil.copytree(build_dir, root / "index" / "v1")
    shutil.rmtree(build_dir)
    storage = Storage(str(root))
    loaded = load_index(
        storage,
        "index/v1/index.faiss",
        ivfdata_sha256=sha256_file(storage.fs, storage.path("index/v1", IVFDATA_FILE)),
    )
    for index in (loaded, in_memory):
        faiss.extract_index_ivf(index).nprobe = 8
    queries = x[:200]
    d_mem, i_mem = in_memory.search(queries, 10)
    d_disk, i_disk = loaded.search(queries, 10)
    np.testing.assert_array_equal(i_disk, i_mem)
    np.testing.assert_allclose(d_disk, d_mem, rtol=1e-6)
    assert set(i_disk[:, 0].tolist()) <= set(ids.tolist())
    if kind == "ivf":  # exact codes: each vector finds itself under its own 64-bit id
        assert (i_disk[:, 0] == ids[:200]).mean() > 0.99

    with pytest.raises(ValueError, match="inverted lists are corrupt"):
        load_index(storage, "index/v1/index.faiss", ivfdata_sha256="0" * 64)


def test_ondisk_merge_needs_an_empty_trained_ivf(tmp_path):
    flat = build_index(IndexSpec(type="flat", dim=4), [])
    with pytest.raises((ValueError, RuntimeError)):
        merge_shards_ondisk(index_to_bytes(flat), [], str(tmp_path / IVFDATA_FILE))


def test_choose_ondisk_by_memory_budget():
    n, d = 2_000_000, 128
    # IVF-Flat lists at 2e6 x 128: ~992 MiB; IVF-PQ lists (32 B codes + 8 B ids): ~76 MiB.
    assert round(ivf_lists_mb(choose_index_spec(n, d, "ivf", ivfpq_above=10**9), n)) == 992
    assert not choose_index_spec(n, d, "ivf", memory_budget_mb=8192, ivfpq_above=10**9).ondisk
    pq = choose_index_spec(n, d, "ivf", memory_budget_mb=500)  # flat lists too big: PQ, which fits
    assert pq.type == "ivfpq" and not pq.ondisk
    tiny_budget = choose_index_spec(
        n, d, "ivf", memory_budget_mb=50
    )  # even PQ lists too big: on disk
    assert (
        tiny_budget.type == "ivfpq" and tiny_budget.ondisk and tiny_budget.params["lists_mb"] > 50
    )
    assert choose_index_spec(1000, 8, "ivf", ondisk="always").ondisk
    assert not choose_index_spec(n, d, "ivf", memory_budget_mb=50, ondisk="never").ondisk
    assert not choose_index_spec(
        1000, 8, "flat", ondisk="always"
    ).ondisk  # only IVF lists go to disk
    with pytest.raises(ValueError, match="ondisk"):
        choose_index_spec(1000, 8, "ivf", ondisk="sometimes")
    old = IndexSpec.from_dict({k: v for k, v in tiny_budget.to_dict().items() if k != "ondisk"})
    assert old.ondisk is False  # manifests written before the field load as in-memory


def test_decide_gpu():
    ivf, pq, flat, hnsw = (
        choose_index_spec(10**6, 64, "ivf", ivfpq_above=10**9),
        choose_index_spec(10**6, 64, "ivf", ivfpq_above=0),
        choose_index_spec(10, 64, "flat"),
        choose_index_spec(10, 64, "hnsw"),
    )
    assert decide_gpu("auto", 1, ivf) and decide_gpu("auto", 2, pq) and decide_gpu(True, 1, ivf)
    assert not decide_gpu("auto", 0, ivf)  # the CPU wheel (or a Ray task without a GPU)
    assert not decide_gpu(False, 4, ivf)
    assert not decide_gpu("auto", 1, flat) and not decide_gpu(
        True, 1, hnsw
    )  # nothing to gain on GPU
    with pytest.raises(RuntimeError, match=r"pip install -e \.\[gpu\]"):
        decide_gpu(True, 0, ivf)
    with pytest.raises(ValueError, match="use_gpu"):
        decide_gpu("yes", 1, ivf)
    # This machine: the CPU wheel, so auto stays on CPU and an index trains without touching GPU code.
    assert faiss.get_num_gpus() == 0 and not decide_gpu("auto", faiss.get_num_gpus(), ivf)


def test_ondisk_index_through_run_index_search_and_reindex(ray_local, tmp_path):
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.index.batch_size = 8
    cfg.index.type, cfg.index.ondisk, cfg.index.shards = "ivf", "always", 3
    storage = Storage.from_config(cfg.storage)
    table = helpers.publish_ingest(cfg, storage, [0, 1, 2])

    manifest = run_index(cfg, storage, model_ref="random")
    base = posixpath.join("index", manifest["version"])
    assert manifest["index"]["ondisk"] and manifest["files"]["ivfdata"] == IVFDATA_FILE
    assert manifest["checksums"][IVFDATA_FILE] == sha256_file(
        storage.fs, storage.path(base, IVFDATA_FILE)
    )
    assert not storage.exists(
        "index/_build", manifest["version"]
    )  # shard files removed once merged
    index = SearchIndex.load(storage)
    assert ondisk_filename(index.index) == os.path.join(storage.path(base), IVFDATA_FILE)
    assert sorted(index._rows) == sorted(table.column("segment_id").to_pylist())
    embedder = Embedder.from_info(cfg, storage, manifest["model"])
    audio = np.frombuffer(table.column("audio")[2].as_py(), dtype="<f4").copy()[None, :]
    sid = table.column("segment_id")[2].as_py()
    assert index.search(embedder.embed(audio)[0], k=1)[0].segment_id == sid
    np.testing.assert_allclose(
        index.vector(sid), embedder.embed(audio)[0], atol=1e-4
    )  # reconstruct from disk

    # reindex cannot edit memory-mapped lists: it rebuilds, on disk again
    table = helpers.publish_ingest(cfg, storage, [0, 1, 2, 3])
    updated = run_reindex(cfg, storage)
    assert updated["reindex"]["build"] == "rebuild" and updated["index"]["ondisk"]
    assert len(SearchIndex.load(storage)) == table.num_rows
