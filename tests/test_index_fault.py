"""The embedding actor pool survives a killed actor: the job finishes and the published index
holds exactly the segment table's ids (none lost, none duplicated)."""

from __future__ import annotations

import os

import helpers
import pytest
from helpers import tiny_config

import mess_ray.index.job as job_mod
from mess_ray.index import SearchIndex, run_index
from mess_ray.index.embed import SegmentEmbedder
from mess_ray.index.job import embedding_actor_fault_tolerance
from mess_ray.storage import Storage


def crash_once_embedder(marker: str, after_batches: int) -> type:
    """A SegmentEmbedder whose process dies (``os._exit``, as a SIGKILL or OOM kill would leave it)
    while holding its ``after_batches``-th batch, in one actor of the whole job only.

    Defined in a function so cloudpickle ships the class by value to the Ray workers; the
    marker file (created with O_EXCL) is the cross-process "only once"."""

    class CrashOnceEmbedder(SegmentEmbedder):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.batches = 0

        def __call__(self, batch):
            self.batches += 1
            if self.batches == after_batches:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass  # another actor already died once
                else:
                    os.write(fd, ",".join(str(int(s)) for s in batch["segment_id"]).encode())
                    os.close(fd)
                    os._exit(1)  # no cleanup, no exception to Ray: the worker process is gone
            return super().__call__(batch)

    return CrashOnceEmbedder


def poison_batch_embedder(attempts: str, poison_id: int) -> type:
    """A SegmentEmbedder whose process dies on every batch holding ``poison_id`` (a batch that
    OOM-kills any actor it lands on); each attempt appends a line to ``attempts``."""

    class PoisonEmbedder(SegmentEmbedder):
        def __call__(self, batch):
            if poison_id in {int(s) for s in batch["segment_id"]}:
                with open(attempts, "a") as f:
                    f.write("attempt\n")
                os._exit(1)
            return super().__call__(batch)

    return PoisonEmbedder


def test_fault_tolerance_options_follow_config(tiny_cfg):
    # Retries unbounded (Ray counts calls to an actor on a not-yet-dead node as retries);
    # restarts bounded, so a batch that kills every actor ends the job.
    assert embedding_actor_fault_tolerance(tiny_cfg) == {"max_restarts": 16, "max_task_retries": -1}
    tiny_cfg.index.actor_max_restarts = 0
    # Ray rejects task retries on an actor that is never restarted.
    assert embedding_actor_fault_tolerance(tiny_cfg) == {"max_restarts": 0, "max_task_retries": 0}


def test_killed_embedding_actor_loses_and_duplicates_no_segment(ray_local, tmp_path, monkeypatch):
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.index.batch_size = 2
    cfg.index.min_actors = cfg.index.max_actors = 1  # one actor: its death must not stall the job
    storage = Storage.from_config(cfg.storage)
    table = helpers.publish_tiny_ingest(
        cfg, storage, n_tracks=4, seconds=5.0, files=2
    )  # 16 segments, 8 batches
    marker = str(tmp_path / "actor-died")
    monkeypatch.setattr(job_mod, "SegmentEmbedder", crash_once_embedder(marker, after_batches=3))

    manifest = run_index(cfg, storage, model_ref="random")

    assert os.path.exists(marker), "the embedding actor was never killed: the test proves nothing"
    lost_batch = [int(s) for s in open(marker).read().split(",")]
    expected = sorted(table.column("segment_id").to_pylist())
    assert set(lost_batch) <= set(expected) and lost_batch
    assert (
        manifest["counts"]["segments"]
        == manifest["counts"]["vectors"]
        == manifest["count"]
        == len(expected)
    )
    index = SearchIndex.load(storage)
    assert (
        sorted(index._rows) == expected
    )  # every id exactly once (the metadata rejects duplicates)
    ids = job_mod.read_vector_ids(
        storage, job_mod.vector_files(storage, f"index/{manifest['version']}/vectors")
    )
    assert (
        sorted(ids.tolist()) == expected
    )  # the vector shards too: the dead actor's batch was redone once
    for sid in lost_batch:  # and the redone batch's vectors are searchable under their ids
        assert index.search(index.vector(sid), k=1)[0].segment_id == sid


def test_without_restarts_a_killed_actor_fails_the_job(ray_local, tmp_path, monkeypatch):
    """The counter-test: the crash is real, and only the fault-tolerance settings absorb it."""
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.index.batch_size = 2
    cfg.index.min_actors = cfg.index.max_actors = 1
    cfg.index.actor_max_restarts = 0
    storage = Storage.from_config(cfg.storage)
    helpers.publish_tiny_ingest(cfg, storage, n_tracks=2, seconds=5.0, files=1)
    monkeypatch.setattr(
        job_mod, "SegmentEmbedder", crash_once_embedder(str(tmp_path / "died"), after_batches=2)
    )
    with pytest.raises(Exception):  # noqa: B017 - whichever error Ray raises for the dead actor
        run_index(cfg, storage, model_ref="random")
    assert storage.latest("index") is None  # nothing published


def test_a_batch_that_kills_every_actor_fails_the_job_after_the_restart_bound(
    ray_local, tmp_path, monkeypatch
):
    """Unbounded batch retries do not loop forever: the restart bound ends the job."""
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.index.batch_size = 2
    cfg.index.min_actors = cfg.index.max_actors = 1
    cfg.index.actor_max_restarts = 1
    storage = Storage.from_config(cfg.storage)
    table = helpers.publish_tiny_ingest(cfg, storage, n_tracks=2, seconds=5.0, files=1)
    attempts = tmp_path / "attempts"
    poison = int(sorted(table.column("segment_id").to_pylist())[-1])
    monkeypatch.setattr(job_mod, "SegmentEmbedder", poison_batch_embedder(str(attempts), poison))
    with pytest.raises(Exception):  # noqa: B017 - whichever error Ray raises for the dead actor
        run_index(cfg, storage, model_ref="random")
    assert storage.latest("index") is None  # nothing published
    # The first actor and its one restart both took the batch, then the job gave up.
    assert attempts.read_text().count("attempt") >= 2
