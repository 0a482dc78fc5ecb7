"""Unit tests of the config schema, storage artifacts, segment helpers and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from mess_ray import cli
from mess_ray.config import MessRayConfig, dump_config, load_config
from mess_ray.segments import (
    decode_audio,
    encode_audio,
    fit_length,
    mix_to_mono,
    segment_id,
    split_pieces,
)
from mess_ray.storage import Storage, new_version


def test_config_defaults_and_overrides(tmp_path):
    cfg = load_config(
        None, ["pretrain.steps=7", "storage.root=s3://bucket/prefix", "audio.hop_s=1.5"]
    )
    assert cfg.pretrain.steps == 7 and isinstance(cfg.pretrain.steps, int)
    assert cfg.storage.root == "s3://bucket/prefix"
    assert cfg.audio.hop_s == 1.5
    # A dumped config loads back identically (one schema for every job).
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert load_config(path).digest() == cfg.digest()
    assert load_config(None, ["pretrain.steps=8"]).digest() != cfg.digest()


@pytest.mark.parametrize(
    "override",
    [
        "pretrain.stepz=3",
        "audio.sample_rate=10",
        "audio.hop_s=9",
        "model.size=huge",
        "pretrain.steps=abc",
    ],
)
def test_config_rejects_bad_values(override):
    with pytest.raises((ValidationError, ValueError)):
        load_config(None, [override])


def test_config_file_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)


def test_storage_artifacts_publish_latest(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    assert storage.latest("ingest") is None
    with pytest.raises(FileNotFoundError, match="mess-ray ingest"):
        storage.require_latest("ingest")
    v1, v2 = new_version(), new_version()
    assert v1 != v2
    storage.write_json(f"ingest/{v1}/data.json", {"a": 1})
    storage.publish("ingest", v1, {"counts": {"segments": 3}})
    assert storage.latest("ingest") == v1
    assert storage.manifest("ingest")["counts"] == {"segments": 3}
    # A version written but not yet published stays invisible to readers.
    storage.write_json(f"ingest/{v2}/data.json", {"a": 2})
    assert storage.latest("ingest") == v1
    storage.publish("ingest", v2, {"counts": {"segments": 4}})
    assert storage.latest("ingest") == v2
    assert storage.versions("ingest") == sorted([v1, v2])
    with storage.local_dir(f"ingest/{v2}") as folder:
        assert (folder / "data.json").exists()


def test_storage_on_s3(s3_bucket, tmp_path):
    storage = Storage(f"{s3_bucket}/prefix")
    storage.write_json("render/v1/catalog.json", {"x": [1, 2]})
    storage.publish("render", "v1", {"counts": {"tracks": 2}})
    assert storage.latest("render") == "v1"
    assert storage.read_json("render/v1/catalog.json") == {"x": [1, 2]}
    assert storage.url("render").startswith("s3://")
    local = tmp_path / "f.bin"
    local.write_bytes(b"abc")
    storage.put_file(local, "blobs/f.bin")
    assert storage.read_bytes("blobs/f.bin") == b"abc"
    assert storage.listdir("render") == ["LATEST", "v1"]


def test_segment_helpers():
    assert segment_id("track/a", 16000) == segment_id("track/a", 16000)
    assert segment_id("track/a", 16000) != segment_id("track/a", 16001)
    assert segment_id("track/a", 0) != segment_id("track/b", 0)
    assert 0 <= segment_id("x", 1) < 2**63
    audio = np.linspace(-1, 1, 100, dtype=np.float32)
    assert np.array_equal(decode_audio(encode_audio(audio)), audio)
    assert len(fit_length(audio, 150)) == 150 and fit_length(audio, 150)[-1] == 0
    assert np.array_equal(fit_length(audio, 10), audio[:10])


@pytest.mark.parametrize("channels", [1, 2, 3, 6])
def test_mixdown_is_bit_identical_to_the_channel_mean(channels):
    rng = np.random.default_rng(channels)
    block = rng.uniform(-1, 1, size=(4097, channels)).astype(np.float32)
    mono = mix_to_mono(block)
    assert mono.dtype == np.float32 and mono.flags.c_contiguous and mono.shape == (4097,)
    assert np.array_equal(mono, block.mean(axis=1, dtype=np.float32))
    assert not np.shares_memory(mono, block)  # a new array: the caller may reuse its block


def test_split_pieces_is_disjoint_and_stable():
    pieces = [f"piece{i}" for i in range(30)]
    train, holdout = split_pieces(pieces + pieces[:5], 0.3, seed=1)
    assert set(train).isdisjoint(holdout) and set(train) | set(holdout) == set(pieces)
    assert 3 <= len(holdout) <= 18
    # Adding pieces never moves an existing piece across the split.
    train2, holdout2 = split_pieces(pieces + ["new1", "new2"], 0.3, seed=1)
    assert set(holdout) <= set(holdout2)
    assert len(split_pieces(["a", "b"], 0.01)[1]) == 1
    assert [len(side) for side in split_pieces("abcd", 0.01)] == [2, 2]
    assert [len(side) for side in split_pieces("abcd", 0.99)] == [2, 2]


def test_cli_every_verb_has_help(capsys):
    from mess_ray.stages import STAGES

    for verb in STAGES:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([verb, "--help"])
        assert exit_info.value.code == 0
        assert "--config" in capsys.readouterr().out


def test_stage_registry_drives_cli_pipeline_jobs_and_kuberay():
    import argparse
    from pathlib import Path

    from mess_ray import pipeline
    from mess_ray.stages import BATCH_STAGES, STAGES

    repo = Path(__file__).resolve().parent.parent
    verbs = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    assert list(verbs.choices) == list(STAGES)
    for stage in STAGES.values():
        assert callable(stage.load_runner()), stage.runner
        assert (repo / "jobs" / f"{stage.name}.py").is_file(), stage.name
        assert (stage.resources is not None) == stage.batch, stage.name
        if stage.batch:
            assert (repo / "deploy" / "kuberay" / f"rayjob-{stage.name}.yaml").is_file()
    assert BATCH_STAGES == tuple(s.name for s in STAGES.values() if s.batch)
    assert {p.stem for p in (repo / "jobs").glob("[a-z]*.py")} == set(STAGES)
    with pytest.raises(ValueError, match="unknown batch stage 'serve'"):
        pipeline.run_stage("serve", None)
    args = cli.build_parser().parse_args(["index", "--model", "pretrain"])
    assert args.model == "pretrain"


def test_cli_reports_bad_config(capsys):
    assert cli.main(["render", "--set", "audio.sample_rate=5"]) == 2
    assert "bad config" in capsys.readouterr().err


def test_default_config_matches_demo_yaml():
    from pathlib import Path

    demo = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml")
    assert demo == MessRayConfig()


def test_relative_storage_root_is_pinned_to_the_launch_directory(tmp_path, monkeypatch):
    # Ray workers run elsewhere (Ray Train's run folder): a relative root must not follow them.
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["storage.root=./data"])
    assert cfg.storage.root == str(tmp_path / "data")
    assert MessRayConfig().storage.root == str(tmp_path / "mess-ray-data")
    assert load_config(None, ["storage.root=s3://b/p"]).storage.root == "s3://b/p"
    with pytest.raises(ValidationError):
        load_config(None, ["storage.root=' '"])
