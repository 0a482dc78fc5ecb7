"""Test pianists unseen in training: one rule (mess_ray.splits.pianist_holdout) decides which
performances pretraining and fine-tuning leave out, their manifests say whom they heard, and the
protocol's unseen-pianist rows read it there."""

from __future__ import annotations

import pytest
from helpers import PIANIST_TAGS, EagerDataset, publish_pianist_ingest, tiny_config

from mess_ray.eval.protocol import heard_pianists
from mess_ray.models import shipped
from mess_ray.splits import (
    pianist_from_metadata,
    pianist_holdout,
    pianist_of,
    read_track_pianists,
    split_by_pianist,
)
from mess_ray.storage import Storage, new_version

FRACTION = 0.5


def tracks_of(n_pieces: int = 3) -> dict[str, tuple[str, str]]:
    return {
        f"p{p}__{tag.lower()}__{chain}": (f"p{p}", pianist_of(tag))
        for p in range(n_pieces)
        for tag in PIANIST_TAGS
        for chain in ("dry", "eval-1")
    }


def test_pianist_holdout_is_seeded_and_leaves_out_every_track_of_a_test_pianist():
    tracks = tracks_of()
    holdout = pianist_holdout(tracks, FRACTION, seed=0)
    expected = split_by_pianist({p for _, p in tracks.values()}, FRACTION, 0).test
    assert holdout.pianists == expected and 0 < len(expected) < len(PIANIST_TAGS)
    # every piece and every chain of a test-side pianist, nothing of anyone else
    assert set(holdout.tracks) == {t for t, (_, p) in tracks.items() if p in expected}
    assert holdout == pianist_holdout(dict(reversed(list(tracks.items()))), FRACTION, seed=0)
    assert pianist_holdout(tracks, FRACTION, seed=1) != holdout  # the seed moves pianists
    assert set(pianist_holdout(tracks, FRACTION, seed=0).heard(tracks)).isdisjoint(expected)
    record = holdout.record(tracks, pieces={"p0"})
    assert record["left_out"] == list(expected) and record["left_out_tracks"] == len(holdout.tracks)
    assert set(record["heard"]) == {pianist_of(t) for t in PIANIST_TAGS} - set(expected)
    off = pianist_holdout(tracks, 0.0, seed=0)
    assert off.tracks == () and set(off.heard(tracks)) == {pianist_of(t) for t in PIANIST_TAGS}
    with pytest.raises(ValueError, match="test_pianist_fraction"):
        pianist_holdout(tracks, 1.0)


def test_pianist_comes_from_the_catalog_metadata():
    assert pianist_from_metadata({"style_params_json": '{"performer": "Yarden03"}'}) == "yarden"
    assert pianist_from_metadata({"performer": "ParkJH05"}) == "parkjh"
    assert pianist_from_metadata({"style_params_json": "not json"}) == ""
    assert pianist_from_metadata({}) == ""


def _config(tmp_path, fraction: float = FRACTION):
    cfg = tiny_config(str(tmp_path / "store"))
    cfg.eval.test_pianist_fraction = fraction
    cfg.eval.holdout_fraction = 0.3
    return cfg


class _Stop(Exception):
    pass


def _capture_training(monkeypatch, module) -> dict:
    """Run a training driver up to Ray Train: the rows it would hand over and what its manifest
    would record."""
    from mess_ray.segments import segments_dataset

    seen: dict = {}

    def read(storage, version, columns=None, **_):
        return EagerDataset(segments_dataset(storage, version).to_table(columns=columns))

    def fit(cfg, storage, task, tcfg, dataset, loop):
        seen["rows"], seen["loop"] = dataset.table, loop
        return None

    def finish(cfg, storage, task, tcfg, result, loop, counts, extra=None):
        seen["counts"], seen["extra"], seen["inputs"] = counts, extra or {}, loop.inputs
        return {}

    monkeypatch.setattr(module, "read_segments_ray", read)
    monkeypatch.setattr(module, "fit", fit)
    monkeypatch.setattr(module, "finish", finish)
    return seen


def test_pretraining_never_reads_a_test_side_pianists_row(tmp_path, monkeypatch):
    from mess_ray.train import pretrain

    cfg = _config(tmp_path)
    storage = Storage.from_config(cfg.storage)
    table = publish_pianist_ingest(cfg, storage)
    seen = _capture_training(monkeypatch, pretrain)
    sampled = {}
    original = pretrain.sample_frames

    def sample_frames(cfg, storage, version, hop, exclude=(), exclude_tracks=()):
        sampled["tracks"] = list(exclude_tracks)
        return original(cfg, storage, version, hop, exclude, exclude_tracks)

    monkeypatch.setattr(pretrain, "sample_frames", sample_frames)
    pretrain.run_pretrain(cfg, storage)
    test_side = set(
        pianist_holdout(read_track_pianists(storage, storage.latest("ingest")), FRACTION).pianists
    )
    assert test_side
    trained = seen["rows"].column("track_id").to_pylist()
    pianist = {t: pianist_of(t.split("__")[1]) for t in table.column("track_id").to_pylist()}
    assert trained and not {pianist[t] for t in trained} & test_side
    # the rest is all there: every row by a train-side pianist
    assert len(trained) == sum(
        pianist[t] not in test_side for t in table.column("track_id").to_pylist()
    )
    assert {pianist[t] for t in sampled["tracks"]} == test_side  # k-means frames too
    record = seen["extra"]["pianists"]
    assert set(record["left_out"]) == test_side and not set(record["heard"]) & test_side
    assert seen["counts"]["excluded_tracks"] == len(record["left_out"]) * 4
    assert set(seen["inputs"]["excluded_tracks"]) == {t for t in pianist if pianist[t] in test_side}


def test_finetuning_never_reads_a_test_side_pianists_row(tmp_path, monkeypatch):
    from mess_ray.train import finetune

    cfg = _config(tmp_path)
    cfg.finetune.mine_clusters = 2  # mined labels must not come from test-side pianists either
    cfg.finetune.num_workers = 1
    storage = Storage.from_config(cfg.storage)
    table = publish_pianist_ingest(cfg, storage, pieces=6, seconds=5.0)
    seen = _capture_training(monkeypatch, finetune)
    finetune.run_finetune(cfg, storage)
    test_side = set(split_by_pianist([pianist_of(t) for t in PIANIST_TAGS], FRACTION, 0).test)
    pianist = {t: pianist_of(t.split("__")[1]) for t in table.column("track_id").to_pylist()}
    trained = seen["rows"].column("track_id").to_pylist()
    assert trained and not {pianist[t] for t in trained} & test_side
    styles = seen["rows"].column("style").to_pylist()
    assert any(s.startswith("mined:") for s in styles)  # mined rows came, none of a test pianist
    extra = seen["extra"]
    assert not set(extra["pianists"]["heard"]) & test_side
    assert set(extra["pianists"]["heard"]) == {
        pianist[t] for t in trained
    }  # what it heard is what it read
    assert extra["pianists"]["left_out_tracks"] == seen["counts"]["excluded_tracks"] > 0


def test_performer_positives_label_each_heard_pianist_across_training_pieces(tmp_path, monkeypatch):
    from mess_ray.train import finetune

    cfg = _config(tmp_path)
    cfg.finetune.performer_weight = 1.0
    cfg.finetune.num_workers = 1
    storage = Storage.from_config(cfg.storage)
    table = publish_pianist_ingest(cfg, storage, pieces=6, seconds=5.0)
    seen = _capture_training(monkeypatch, finetune)
    finetune.run_finetune(cfg, storage)
    loop = seen["loop"]
    test_side = set(split_by_pianist([pianist_of(t) for t in PIANIST_TAGS], FRACTION, 0).test)
    train_pieces = set(seen["extra"]["train_pieces"])
    pianist_of_segment = {
        sid: pianist_of(t.split("__")[1])
        for sid, t in zip(table["segment_id"].to_pylist(), table["track_id"].to_pylist())
    }
    piece_of_segment = dict(zip(table["segment_id"].to_pylist(), table["piece_id"].to_pylist()))
    expected = {
        sid
        for sid, p in pianist_of_segment.items()
        if p not in test_side and piece_of_segment[sid] in train_pieces
    }
    assert set(loop.performers) == expected  # every heard pianist's training rows, no other
    code_of = {}
    for sid, code in loop.performers.items():
        assert code_of.setdefault(pianist_of_segment[sid], code) == code  # one code per pianist
    assert len(set(code_of.values())) == len(code_of) == seen["extra"]["performers"]["pianists"]
    assert loop.performer_weight == 1.0 and loop.performer_memory == 1024
    # the term off: no labels shipped to the workers
    cfg.finetune.performer_weight = 0.0
    finetune.run_finetune(cfg, storage)
    assert seen["loop"].performers is None and seen["loop"].performer_weight == 0.0


def _publish(storage, stage: str, manifest: dict) -> str:
    version = new_version()
    storage.publish(stage, version, manifest)
    return version


def test_protocol_reads_heard_pianists_from_the_training_manifests(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    tracks = tracks_of()
    # the fine-tuned model's own pretraining is not the latest pretrain artifact
    own = _publish(storage, "pretrain", {"pianists": {"heard": ["alpha"]}})
    _publish(storage, "pretrain", {"pianists": {"heard": ["bravo"]}})
    _publish(
        storage,
        "finetune",
        {
            "pianists": {"heard": ["charlie"]},
            "inputs": {"init": {"kind": "artifact", "stage": "pretrain", "version": own}},
        },
    )
    heard, sources = heard_pianists(storage, ["finetune"], tracks)
    assert heard == {"alpha", "charlie"} and len(sources) == 2
    heard, _ = heard_pianists(storage, ["finetune", "pretrain"], tracks)
    assert heard == {"alpha", "bravo", "charlie"}
    # a manifest from before the record: the pianists of the pieces it says it trained on
    _publish(storage, "finetune", {"train_pieces": ["p1"]})
    heard, sources = heard_pianists(storage, ["finetune"], tracks)
    assert heard == {pianist_of(t) for t in PIANIST_TAGS} and "no pianists record" in next(
        iter(sources.values())
    )
    # a model from elsewhere: unknown, never guessed
    heard, sources = heard_pianists(storage, ["finetune", "/some/model/folder"], tracks)
    assert heard is None and "unknown" in sources["/some/model/folder"]
    # a shipped model: whom its manifest says it heard (none for the music21 one)
    heard, sources = heard_pianists(storage, ["shipped:tiny-m21-v1"], tracks)
    assert heard == set() and "shipped manifest" in sources["shipped:tiny-m21-v1"]
    recorded = set(shipped.shipped_manifest("tiny-asap-v1")["pianists"]["heard"])
    heard, _ = heard_pianists(storage, ["shipped:tiny-asap-v1", "finetune"], tracks)
    assert heard == recorded | {pianist_of(t) for t in PIANIST_TAGS} and len(recorded) > 50
