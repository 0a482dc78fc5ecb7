"""Training on many recording chains: on-the-fly chain augmentation (fine-tuning and pretraining),
cross-chain positives (the same performance at the same time through two chains), their config."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pytest
import torch
from helpers import SR, STYLES, clip, tiny_config, write_chained_ingest

from mess_ray.config import AugmentConfig, load_config
from mess_ray.render.chains import augmentation_chain, record_segment
from mess_ray.segments import encode_audio
from mess_ray.storage import Storage
from mess_ray.train.augment import augment_batch, chain_views
from mess_ray.train.collate import collate_labelled
from mess_ray.train.finetune_settings import FinetuneLoop
from mess_ray.train.pairs import (
    cross_chain_partners,
    moment_key,
    performance_items,
    read_performance_rows,
    recording_of,
)


def _notes(rows: int, seconds: float = 2.0) -> torch.Tensor:
    """Piano-like decaying notes over a quiet bed, one pitch pattern per row."""
    t = np.arange(int(seconds * SR)) / SR
    out = []
    for r in range(rows):
        x = 0.01 * np.sin(2 * np.pi * 110 * t)
        for k, onset in enumerate(np.arange(0.1, seconds, 0.4)):
            f = 220.0 * 2 ** ((3 * r + 2 * k) % 12 / 12)
            env = np.where(t >= onset, np.exp(-(t - onset) * 6), 0.0)
            x = x + 0.3 * env * np.sin(2 * np.pi * f * (t - onset))
        out.append(x)
    return torch.tensor(np.stack(out), dtype=torch.float32)


def _log_spectrum(x: np.ndarray) -> np.ndarray:
    mag = np.abs(np.fft.rfft(x)) + 1e-6
    bands = np.array_split(mag, 64)
    return 20 * np.log10(np.array([b.mean() for b in bands]))


def test_chain_views_are_seeded_and_audibly_change_the_audio():
    x = _notes(4)
    a = chain_views(x, SR, 1.0, 4, torch.Generator().manual_seed(3))
    b = chain_views(x, SR, 1.0, 4, torch.Generator().manual_seed(3))
    c = chain_views(x, SR, 1.0, 4, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b)  # same seed, same views
    assert not torch.equal(a, c)  # another seed draws other chains or other noise
    for before, after in zip(x.numpy(), a.numpy()):
        # a measured, audible change: the band levels move by several dB on average
        distance = np.abs(_log_spectrum(before) - _log_spectrum(after)).mean()
        assert distance > 3.0, distance
        assert np.isfinite(after).all() and np.abs(after).max() <= 1.0
    # prob 0 leaves every row alone; a silent (padding) row stays silent
    assert torch.equal(chain_views(x, SR, 0.0, 4, torch.Generator().manual_seed(3)), x)
    silent = chain_views(torch.zeros(2, SR), SR, 1.0, 4, torch.Generator().manual_seed(0))
    assert not silent.any()
    with pytest.raises(ValueError, match="pool"):
        chain_views(x, SR, 1.0, 0, torch.Generator())


def test_augment_batch_uses_the_chain_for_its_share_of_rows():
    x = _notes(8)
    settings = AugmentConfig(views=1, chain_prob=0.5, chain_pool=3)
    view = augment_batch(x, settings, SR, torch.Generator().manual_seed(0))
    again = augment_batch(x, settings, SR, torch.Generator().manual_seed(0))
    assert torch.equal(view, again)
    # the chain rows are exactly what chain_views draws first from the same generator
    recorded = chain_views(x, SR, 0.5, 3, torch.Generator().manual_seed(0))
    chained = (recorded != x).any(dim=1)
    assert 0 < int(chained.sum()) < 8
    assert torch.equal(view[chained], recorded[chained])


def test_record_segment_keeps_the_level_differences_within_a_recording():
    chain = augmentation_chain(1)
    quiet, loud = _notes(1)[0].numpy() * 0.1, _notes(1)[0].numpy() * 0.4
    a, b = record_segment(quiet, SR, chain, 7), record_segment(loud, SR, chain, 7)

    def db(v):
        return 20 * np.log10(np.sqrt(np.mean(v.astype(np.float64) ** 2)))

    # the chain's loudness target is one gain for the whole recording: 12 dB apart stay ~12 dB
    assert abs((db(b) - db(a)) - 12.04) < 1.5
    assert np.array_equal(record_segment(quiet, SR, chain, 7), a)
    assert not np.array_equal(record_segment(quiet, SR, chain, 8), a)  # noise seed


def test_cross_chain_partners_pair_the_same_performance_at_the_same_time_only():
    performances = ["p1", "p1", "p1", "p1", "p2", "p2", "p1"]
    starts = [0, 0, 16000, 16000, 0, 0, 0]
    chains = ["dry", "train-1", "dry", "train-1", "dry", "dry", "train-2"]
    ids = np.arange(100, 107)
    partners = cross_chain_partners(performances, starts, chains, ids, seed=0)
    for i, j in enumerate(partners):
        if j < 0:
            continue
        assert performances[j] == performances[i] and starts[j] == starts[i]
        assert chains[j] != chains[i]
    # p2's two rows share a chain: no partner; every p1 moment has one in another chain
    assert partners[4] == -1 and partners[5] == -1
    assert partners[2] == 3 and partners[3] == 2
    assert partners[0] in (1, 6) and partners[6] in (0, 1)
    assert np.array_equal(partners, cross_chain_partners(performances, starts, chains, ids, 0))
    with pytest.raises(ValueError, match="length"):
        cross_chain_partners(performances, starts[:-1], chains, ids)
    assert recording_of(
        json.dumps({"performance_id": "p", "chain_json": '{"name": "dry"}'}), "t"
    ) == ("p", "dry")
    assert recording_of("{}", "track") == ("track", "track")


def test_performance_rows_carry_a_partner_from_another_chain(tmp_path):
    storage = Storage(str(tmp_path / "store"))
    version = write_chained_ingest(storage, pieces=2, per_track=3)
    items, counts = performance_items(storage, version, ["piece0"])
    assert counts == {"performances": 2, "performances_with_several_chains": 2, "tracks": 4}
    assert json.loads(items[0]["tracks"]) == ["piece0__legato__dry", "piece0__legato__train-1"]
    batch = {k: np.array([it[k] for it in items[:1]]) for k in ("tracks", "files")}
    table = read_performance_rows(batch, storage.config().model_dump(), ["piece0"], None, None, 0)
    assert table.num_rows == 6  # 3 moments x 2 chains of one performance
    full = storage_rows(storage, version)
    for row in table.to_pylist():
        mine = full[row["segment_id"]]
        partner = [r for r in full.values() if r["audio"] == row["partner_audio"]]
        assert len(partner) == 1
        partner = partner[0]
        assert partner["track_id"] != mine["track_id"]
        assert partner["start_sample"] == mine["start_sample"]
        assert (
            recording_of(partner["metadata_json"], "")[0]
            == recording_of(mine["metadata_json"], "")[0]
        )
        assert row["moment"] == moment_key(
            recording_of(mine["metadata_json"], "")[0], mine["start_sample"]
        )


def storage_rows(storage: Storage, version: str) -> dict[int, dict]:
    from mess_ray.segments import segments_dataset

    return {r["segment_id"]: r for r in segments_dataset(storage, version).to_table().to_pylist()}


def test_collate_adds_cross_chain_partners_as_positives():
    audio = np.stack([clip(0, STYLES[0], i) for i in range(3)])
    partner = np.stack([clip(1, STYLES[1], i) for i in range(3)])
    batch = {
        "segment_id": np.array([1, 2, 3]),
        "audio": np.array([encode_audio(a) for a in audio], dtype=object),
        "partner_audio": np.array(
            [encode_audio(partner[0]), b"", encode_audio(partner[2])], dtype=object
        ),
        "style": np.array(["", "", ""], dtype=object),
        "piece_id": np.array(["p1", "p1", "p2"], dtype=object),
        "moment": np.array([11, 11, 12]),
    }
    loop = FinetuneLoop(
        window_samples=2 * SR,
        sample_rate=SR,
        cross_chain_views=True,
        midi_targets={1: [1.0], 2: [2.0], 3: [3.0]},
        midi_target_names=("x",),
    )
    out = collate_labelled(batch, loop)
    # rows 0 and 2 get their partner appended (row 1 has none); a partner shares its row's
    # label, piece and MIDI target; rows 0 and 1 are one moment (same performance and time)
    assert out["audio"].shape == (5, 2 * SR)
    assert torch.equal(out["audio"][3], torch.from_numpy(partner[0]))
    assert torch.equal(out["audio"][4], torch.from_numpy(partner[2]))
    labels = out["labels"].tolist()
    assert labels[0] == labels[1] == labels[3] and labels[2] == labels[4] != labels[0]
    assert out["midi"][:, 0].tolist() == [1.0, 2.0, 3.0, 1.0, 3.0]
    assert out["pieces"][3] == out["pieces"][0] and out["pieces"][4] == out["pieces"][2]
    # off: no partner rows, unstyled rows labelled apart
    plain = collate_labelled(batch, FinetuneLoop(window_samples=2 * SR, sample_rate=SR))
    assert plain["audio"].shape == (3, 2 * SR) and len(set(plain["labels"].tolist())) == 3


def test_pretrain_collate_augments_the_input_and_keeps_clean_targets():
    from mess_ray.train.pretrain import PretrainLoop, collate_audio

    audio = _notes(3).numpy()
    batch = {"audio": np.array([encode_audio(a) for a in audio], dtype=object)}
    loop = PretrainLoop(
        init={},
        inputs={},
        codebooks={},
        sample_rate=SR,
        n_mels=16,
        mask_prob=0.5,
        mask_length=2,
        window_samples=2 * SR,
        chain_augment_prob=1.0,
        chain_pool=2,
    )
    out = collate_audio(batch, loop)
    assert torch.equal(out["clean"], torch.from_numpy(audio))
    assert not torch.equal(out["audio"], out["clean"])
    assert torch.equal(collate_audio(batch, loop)["audio"], out["audio"])  # seeded by content
    off = collate_audio(batch, PretrainLoop(**{**loop.__dict__, "chain_augment_prob": 0.0}))
    assert set(off) == {"audio"}


def test_chain_training_options_are_validated():
    cfg = load_config(
        None,
        [
            "finetune.cross_chain_views=true",
            "finetune.augment.chain_prob=0.5",
            "pretrain.chain_augment_prob=0.25",
            "render.train_piece_chains=[train-1, train-2]",
        ],
    )
    assert cfg.finetune.cross_chain_views and cfg.finetune.augment.chain_pool == 8
    for bad in (
        "finetune.augment.chain_prob=1.5",
        "finetune.augment.chain_pool=0",
        "pretrain.chain_augment_prob=-0.1",
        "finetune.cross_chain_views=maybe",
        "render.train_piece_chains=[eval-1]",
    ):
        with pytest.raises(ValueError):
            load_config(None, [bad])


def test_tiny_finetune_with_chain_options_on_ray(ray_local, tmp_path):
    from mess_ray.train import run_finetune, run_pretrain

    storage = Storage(str(tmp_path / "store"))
    write_chained_ingest(storage, pieces=4, per_track=3)
    cfg = tiny_config(
        storage.root,
        pretrain={"chain_augment_prob": 0.5, "chain_pool": 2, "steps": 2, "num_workers": 1},
        finetune={"batch_size": 4, "steps": 3, "num_workers": 1, "cross_chain_views": True},
    )
    cfg.finetune.augment = AugmentConfig(views=1, chain_prob=0.5, chain_pool=2)
    run_pretrain(cfg, storage)
    manifest = run_finetune(cfg, storage)
    assert manifest["counts"]["steps"] == 3
    assert np.isfinite(manifest["losses"]["history"]).all()
    pairing = manifest["cross_chain_views"]
    assert pairing["performances"] == 2 * len(manifest["train_pieces"])
    assert pairing["performances_with_several_chains"] == pairing["performances"]
    assert manifest["augment"]["chain_prob"] == 0.5
    assert manifest["config"]["finetune"]["cross_chain_views"] is True
    pre = storage.manifest("pretrain", storage.latest("pretrain"))
    assert pre["config"]["pretrain"]["chain_augment_prob"] == 0.5


def test_performance_rows_come_in_track_order_whatever_the_shards_are_called(tmp_path):
    """A one-pass ingest names each track's shard by a hash of its source URI, which changes
    with the storage root and render version: the rows (and so the trained weights) must not."""
    import pyarrow.parquet as pq

    from mess_ray.segments import segments_dataset

    source = Storage(str(tmp_path / "a"))
    version = write_chained_ingest(source, pieces=2, per_track=3)
    rows = segments_dataset(source, version).to_table()
    orders = []
    for name, shard_name in (
        ("b", lambda i, t: f"part-{i:02d}.parquet"),
        ("c", lambda i, t: f"part-{99 - i:02d}.parquet"),
    ):
        storage = Storage(str(tmp_path / name))
        tracks = sorted(set(rows["track_id"].to_pylist()))
        for i, track in enumerate(tracks):
            one = rows.filter(pa.compute.equal(rows["track_id"], track))
            with storage.open(f"ingest/{version}/segments/{shard_name(i, track)}", "wb") as f:
                pq.write_table(one, f)
        items, _ = performance_items(storage, version, ["piece0", "piece1"])
        files = [[f.rsplit("/", 1)[1] for f in json.loads(it["files"])] for it in items]
        assert all(len(f) == 2 for f in files)  # one file per chain
        if name == "c":  # names run against the track order: listed by track, not by name
            assert all(f == sorted(f, reverse=True) for f in files)
        batch = {k: np.array([it[k] for it in items]) for k in ("tracks", "files")}
        table = read_performance_rows(
            batch, storage.config().model_dump(), ["piece0", "piece1"], None, None, 0
        )
        orders.append(table["segment_id"].to_pylist())
    assert orders[0] == orders[1] and len(orders[0]) == rows.num_rows
