"""The model shipped inside the package: it loads, and embeds its reference clips as recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mess_ray.config import load_config
from mess_ray.models import Embedder, shipped
from mess_ray.storage import Storage


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"storage.root={tmp_path / 'store'}"])


def test_default_shipped_model_is_in_the_package_small_and_documented():
    assert shipped.DEFAULT_SHIPPED in shipped.available()
    folder = shipped.shipped_dir()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 2_000_000, size
    manifest = shipped.shipped_manifest()
    assert (folder / "model" / "embedding_config.json").exists()
    assert manifest["recipe"]["config_file"] == "configs/shipped-tiny.yaml"
    assert manifest["recipe"]["config"]["pretrain"]["deterministic"] is True
    # Its benchmark figures say which split they come from.
    assert manifest["benchmark"]["split"].startswith("test")
    assert manifest["benchmark"]["held_out_pieces"]
    assert "finetune" in manifest["benchmark"]["tasks"]["style_retrieval"]["metrics"]


def test_shipped_weights_embed_the_reference_clips_as_recorded(cfg):
    embedder = Embedder.from_ref(cfg, Storage.from_config(cfg.storage), "shipped")
    assert embedder.info["shipped"] == shipped.DEFAULT_SHIPPED
    assert embedder.info["kind"] == "embedding_model" and embedder.info["facet_layout"]
    reference = np.load(shipped.shipped_dir() / shipped.REFERENCE)
    recorded = shipped.shipped_manifest()["reference"]
    assert recorded["sample_rate"] == cfg.audio.sample_rate
    clips = np.stack(
        [
            shipped.reference_clip(int(seed), recorded["sample_rate"], recorded["window_s"])
            for seed in reference["seeds"]
        ]
    )
    vectors = embedder.embed(clips)
    np.testing.assert_allclose(vectors, reference["vectors"], rtol=0, atol=1e-5)
    # Rebuilt from the index manifest's info (what Serve does), by name: the same vectors.
    again = Embedder.from_info(
        cfg, Storage.from_config(cfg.storage), json.loads(json.dumps(embedder.info))
    )
    np.testing.assert_allclose(again.embed(clips), vectors, rtol=0, atol=1e-6)


def test_auto_ref_prefers_a_local_finetune_and_falls_back_to_the_shipped_model(cfg, tmp_path):
    storage = Storage.from_config(cfg.storage)
    assert Embedder.from_ref(cfg, storage, "auto").info["shipped"] == shipped.DEFAULT_SHIPPED
    with pytest.raises(FileNotFoundError, match="no shipped model 'nope'"):
        Embedder.from_ref(cfg, storage, "shipped:nope")
    # A finetune artifact published here wins over the shipped model.
    storage.put_dir(str(shipped.shipped_dir() / "model"), "finetune/v1/model")
    storage.publish("finetune", "v1", {"counts": {}})
    info = Embedder.from_ref(cfg, storage, "auto").info
    assert info["stage"] == "finetune" and info["version"] == "v1" and not info.get("shipped")


def test_reference_clip_is_deterministic_and_audible():
    a = shipped.reference_clip(0, 16000, 4.0)
    assert a.shape == (64000,) and a.dtype == np.float32
    np.testing.assert_array_equal(a, shipped.reference_clip(0, 16000, 4.0))
    assert not np.allclose(a, shipped.reference_clip(1, 16000, 4.0))
    assert 0.01 < float(np.sqrt(np.mean(a**2))) < 1.0


def test_every_shipped_file_is_package_data():
    """A wheel (not only an editable install) must carry the model: pyproject's globs cover it."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["mess_ray"]
    package = root / "mess_ray"
    files = [p for p in shipped.shipped_dir().rglob("*") if p.is_file()]
    assert files
    for path in files:
        rel = path.relative_to(package).as_posix()
        # setuptools globs: '*' does not cross '/'.
        assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), rel
