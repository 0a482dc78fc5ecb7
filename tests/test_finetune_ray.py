"""Fine-tuning with facet heads and augmented views on Ray Train (tiny generated corpus)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import SR, STYLES, clip, tiny_config, write_tiny_ingest

from mess_ray.descriptors import DESCRIPTOR_NAMES
from mess_ray.facets import FACETS, OVERALL, parse_layout, part_similarities
from mess_ray.models import Embedder
from mess_ray.segments import SEGMENT_SCHEMA, encode_audio, segment_id
from mess_ray.storage import Storage


def _add_unlabelled_performances(
    storage: Storage, version: str, pieces: int = 4, per_piece: int = 4
) -> int:
    """Segments with a piece but no style (like human performances) in the same ingest version."""
    rows = []
    for piece in range(pieces):
        track = f"piece{piece}-human"
        for i in range(per_piece):
            audio = clip(piece, STYLES[i % len(STYLES)], 100 + i) * (0.3 + 0.2 * i)
            rows.append(
                {
                    "segment_id": segment_id(track, i * SR),
                    "track_id": track,
                    "piece_id": f"piece{piece}",
                    "style": "",
                    "start_s": float(i),
                    "end_s": i + 2.0,
                    "start_sample": i * SR,
                    "num_samples": len(audio),
                    "sample_rate": SR,
                    "source_uri": f"mem://{track}.wav",
                    "metadata_json": "{}",
                    "audio": encode_audio(audio),
                }
            )
    with storage.open(f"ingest/{version}/segments/part-human.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA), f)
    return len(rows)


def test_faceted_finetune_publishes_layout_and_descriptor_stats(ray_local, tmp_path):
    from mess_ray.train import run_finetune

    storage = Storage(str(tmp_path / "store"))
    write_tiny_ingest(storage, pieces=4, per_style=3)
    _add_unlabelled_performances(storage, "ing1")
    cfg = tiny_config(
        storage.root,
        finetune={
            "steps": 3,
            "batch_size": 6,
            "num_workers": 1,
            "checkpoint_every": 3,
            "augment": {"views": 1},
            "hard_negative_weight": 2.0,
            "descriptor_sample": 16,
            "mine_clusters": 2,
        },
    )
    cfg.model.facet_dim = 8
    cfg.model.embedding_dim = 16
    cfg.model.pooling = "stats"
    cfg.model.level_channel = True
    manifest = run_finetune(cfg, storage)
    assert manifest["counts"]["steps"] == 3 and all(np.isfinite(manifest["losses"]["history"]))
    stats = manifest["descriptor_stats"]
    assert stats["names"] == list(DESCRIPTOR_NAMES) and stats["segments"] == 16
    assert len(stats["mean"]) == len(stats["std"]) == len(DESCRIPTOR_NAMES)
    assert set(manifest["facet_groups"]) >= {"tempo", "dynamics", "timbre"}
    # Source (b): the unlabelled segments of training pieces were mined into clusters.
    mining = manifest["mining"]
    assert mining["unlabelled_segments"] == mining["described_segments"] > 0
    assert 0 < mining["mined_segments"] <= mining["unlabelled_segments"]
    mined_styles = [s for s in manifest["styles"] if s.startswith("mined:")]
    assert len(mined_styles) == mining["mined_clusters"] >= 1
    assert (
        manifest["counts"]["train_segments"]
        == 3 * 3 * len(manifest["train_pieces"]) + mining["mined_segments"]
    )

    embedder = Embedder.from_ref(cfg, storage, "finetune")
    layout = parse_layout(embedder.info["facet_layout"])
    assert list(layout) == [OVERALL, *FACETS] and embedder.dim == 16 + 4 * 8
    vectors = embedder.embed(np.stack([clip(0, s, 0) for s in STYLES]))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    parts = part_similarities(vectors[0], vectors, layout)
    assert set(parts) == set(layout) and all(
        np.isclose(p[0], 1.0, atol=1e-5) for p in parts.values()
    )


def _write_performances_with_midi(
    storage: Storage, version: str, pieces: int = 4, per_piece: int = 3
) -> int:
    """Unstyled performances (like ASAP's) whose catalog metadata names their performed MIDI."""
    import json

    import pretty_midi

    rows = []
    for piece in range(pieces):
        for perf in range(per_piece):
            track = f"piece{piece}-perf{perf}"
            midi = pretty_midi.PrettyMIDI()
            piano = pretty_midi.Instrument(program=0)
            gap, velocity = 0.15 + 0.1 * perf, 40 + 30 * perf  # each performer plays faster/louder
            piano.notes = [
                pretty_midi.Note(
                    velocity=velocity, pitch=60 + piece, start=k * gap, end=k * gap + gap / 2
                )
                for k in range(int(6 / gap))
            ]
            midi.instruments.append(piano)
            uri = storage.url("sources", f"{track}.mid")
            with storage.open(f"sources/{track}.mid", "wb") as f:
                midi.write(f)
            for i in range(4):
                audio = clip(piece, STYLES[perf % len(STYLES)], i) * (velocity / 127)
                rows.append(
                    {
                        "segment_id": segment_id(track, i * SR),
                        "track_id": track,
                        "piece_id": f"piece{piece}",
                        "style": "",
                        "start_s": float(i),
                        "end_s": i + 2.0,
                        "start_sample": i * SR,
                        "num_samples": len(audio),
                        "sample_rate": SR,
                        "source_uri": f"mem://{track}.wav",
                        "metadata_json": json.dumps({"midi_uri": uri}),
                        "audio": encode_audio(audio),
                    }
                )
    with storage.open(f"ingest/{version}/segments/part-perf.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA), f)
    storage.publish("ingest", version, {"counts": {"segments": len(rows)}})
    return len(rows)


def test_finetune_on_unstyled_performances_with_midi_targets_and_descriptor_channel(
    ray_local, tmp_path
):
    """Pair source (b) from performed MIDI: no style anywhere, the MIDI descriptors alone supervise."""
    from mess_ray.train import run_finetune

    storage = Storage(str(tmp_path / "store"))
    _write_performances_with_midi(storage, "perf1")
    cfg = tiny_config(
        storage.root,
        finetune={
            "steps": 3,
            "batch_size": 8,
            "num_workers": 1,
            "checkpoint_every": 3,
            "descriptor_sample": 16,
            "midi_weight": 1.0,
        },
    )
    cfg.model.facet_dim, cfg.model.embedding_dim, cfg.model.descriptor_channel = 4, 16, True
    manifest = run_finetune(cfg, storage)
    targets = manifest["midi_targets"]
    train_pieces = manifest["train_pieces"]
    assert (
        targets["segments_with_midi"]
        == manifest["counts"]["train_segments"]
        == 12 * len(train_pieces)
    )
    assert targets["pieces"] == len(train_pieces) < 4 and targets["tracks_with_problems"] == 0
    assert (
        "velocity_mean" in targets["names"] and "tempo_ratio_to_score" not in targets["names"]
    )  # no beats
    history = manifest["losses"]["history"]
    assert len(history) == 3 and all(np.isfinite(history))
    embedder = Embedder.from_ref(cfg, storage, "finetune")
    assert embedder.model.options["descriptor_stats"]["names"] == list(DESCRIPTOR_NAMES)
    vectors = embedder.embed(np.stack([clip(0, s, 0) for s in STYLES]))
    assert vectors.shape == (3, 16 + 4 * 4) and np.allclose(
        np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5
    )

    # Segments left out (styled renderings, by default) get no target and do not shape the z-scoring.
    from mess_ray.train.targets import training_midi_targets

    every, names, _ = training_midi_targets(
        storage, "perf1", cfg.eval.holdout_fraction, cfg.eval.seed, SR, 2.0
    )
    assert len(every) == targets["segments_with_midi"] and names == targets["names"]
    left_out = set(sorted(every)[: len(every) // 2])
    some, _, counts = training_midi_targets(
        storage, "perf1", cfg.eval.holdout_fraction, cfg.eval.seed, SR, 2.0, exclude=left_out
    )
    assert set(some) == set(every) - left_out and counts["segments_with_midi"] == len(some)
    column = np.array([some[i][names.index("velocity_mean")] for i in some])
    assert abs(column.mean()) < 1e-3  # z-scored over the segments that keep targets
    with pytest.raises(ValueError, match="has a style"):
        training_midi_targets(
            storage, "perf1", cfg.eval.holdout_fraction, cfg.eval.seed, SR, 2.0, exclude=set(every)
        )

    # Without MIDI and without styles there is nothing to learn from: a clear error.
    bare = Storage(str(tmp_path / "bare"))
    _add_unlabelled_performances(bare, "ing1")
    bare.publish("ingest", "ing1", {"counts": {}})
    cfg_bare = tiny_config(
        bare.root, finetune={"steps": 1, "batch_size": 4, "num_workers": 1, "midi_weight": 1.0}
    )
    with pytest.raises(ValueError, match="at least 2 styles"):
        run_finetune(cfg_bare, bare)
