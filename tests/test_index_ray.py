"""Integration: a tiny ingest artifact -> run_index on Ray (actor pool + sharded build) -> search."""

from __future__ import annotations

import numpy as np
from helpers import publish_tiny_ingest, tiny_config

from mess_ray.index import SearchIndex, run_index
from mess_ray.models import Embedder
from mess_ray.storage import Storage


def test_run_index_reconciles_and_finds_itself(ray_local, tmp_path):
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.index.batch_size = 4
    storage = Storage.from_config(cfg.storage)
    table = publish_tiny_ingest(cfg, storage)

    manifest = run_index(cfg, storage, model_ref="random")

    assert storage.latest("index") == manifest["version"]
    assert (
        manifest["count"]
        == table.num_rows
        == manifest["counts"]["segments"]
        == manifest["counts"]["vectors"]
    )
    assert manifest["inputs"]["ingest"] == storage.latest("ingest")
    assert manifest["model"]["kind"] == "random" and manifest["index"]["type"] == "flat"
    assert set(manifest["checksums"]) == {"index.faiss", "metadata.parquet"}

    index = SearchIndex.load(storage)
    assert len(index) == table.num_rows
    # The embedder rebuilt from the manifest reproduces the stored vectors.
    embedder = Embedder.from_info(cfg, storage, manifest["model"])
    audio = np.frombuffer(table.column("audio")[3].as_py(), dtype="<f4").copy()[None, :]
    query = embedder.embed(audio)[0]
    sid = table.column("segment_id")[3].as_py()
    np.testing.assert_allclose(index.vector(sid), query, atol=1e-4)
    hits = index.search(query, k=3)
    assert hits[0].segment_id == sid and hits[0].similarity > 0.999
