"""Published backbones (Wav2Vec2, HuBERT, Data2Vec-audio, remote-code MERT-style folders):
loaded offline from tiny randomly initialised checkpoints, fed at the rate and normalisation
of their preprocessor_config.json through the same path the index uses, fine-tuned on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    Data2VecAudioConfig,
    Data2VecAudioModel,
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
)

from mess_ray.config import load_config
from mess_ray.index.embed import SegmentEmbedder, table_to_vectors
from mess_ray.models import Embedder, EmbeddingModel, build_encoder, load_encoder
from mess_ray.models.encoder import (
    PREPROCESSOR_CONFIG,
    EncoderInput,
    encoder_input,
    save_encoder,
)
from mess_ray.segments import encode_audio
from mess_ray.storage import Storage

HIDDEN = 32
GEOMETRY = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16, 16),
    conv_stride=(5, 8, 8),
    conv_kernel=(10, 8, 8),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    layerdrop=0.1,  # as published checkpoints ship it: loading must turn it off (DDP)
)

# MERT-v1's layout: custom configuration/modeling modules next to the weights, named by
# config.json's auto_map, loaded only under trust_remote_code.
MERT_CONFIGURATION = """from transformers import HubertConfig


class MERTConfig(HubertConfig):
    model_type = "mert_model"

    def __init__(self, feature_extractor_cqt=False, **kwargs):
        self.feature_extractor_cqt = feature_extractor_cqt
        super().__init__(**kwargs)
"""
MERT_MODELING = """from transformers import HubertModel

from .configuration_mert import MERTConfig


class MERTModel(HubertModel):
    config_class = MERTConfig
"""

# family -> (model class name after loading, preprocessor sampling_rate, do_normalize)
FAMILIES = {
    "wav2vec2": ("Wav2Vec2Model", 16000, True),
    "hubert": ("HubertModel", 16000, False),
    "data2vec-audio": ("Data2VecAudioModel", 16000, True),
    "mert": ("MERTModel", 24000, True),
}
PIPELINE_SR = 22050  # neither 16 nor 24 kHz: every published family is resampled (down or up)


def save_published_checkpoint(folder: Path, family: str, seed: int = 0) -> Path:
    """A tiny randomly initialised checkpoint laid out as the hub ships it."""
    _, rate, normalize = FAMILIES[family]
    torch.manual_seed(seed)
    if family == "wav2vec2":
        model = Wav2Vec2Model(Wav2Vec2Config(**GEOMETRY))
    elif family == "data2vec-audio":
        # Data2Vec-audio's positional embedding is a stack of small convs.
        geometry = dict(GEOMETRY, num_conv_pos_embeddings=2, conv_pos_kernel_size=5)
        model = Data2VecAudioModel(Data2VecAudioConfig(**geometry))
    else:
        model = HubertModel(HubertConfig(**GEOMETRY))
    model.save_pretrained(folder)
    if family == "mert":
        (folder / "configuration_mert.py").write_text(MERT_CONFIGURATION)
        (folder / "modeling_mert.py").write_text(MERT_MODELING)
        config = json.loads((folder / "config.json").read_text())
        config.update(
            model_type="mert_model",
            architectures=["MERTModel"],
            auto_map={
                "AutoConfig": "configuration_mert.MERTConfig",
                "AutoModel": "modeling_mert.MERTModel",
            },
            feature_extractor_cqt=False,
        )
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / PREPROCESSOR_CONFIG).write_text(
        json.dumps(
            {
                "do_normalize": normalize,
                "feature_extractor_type": "Wav2Vec2FeatureExtractor",
                "feature_size": 1,
                "padding_side": "right",
                "padding_value": 0,
                "return_attention_mask": True,
                "sampling_rate": rate,
            }
        )
    )
    return folder


def _cfg(root, *extra):
    return load_config(
        None,
        [
            f"storage.root={root}",
            f"audio.sample_rate={PIPELINE_SR}",
            "audio.window_s=1.0",
            "audio.hop_s=0.5",
            *extra,
        ],
    )


def _sine(freq: float, rate: int, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _capture_inputs(encoder: torch.nn.Module) -> list[torch.Tensor]:
    """Record what the encoder itself is fed (after resampling and normalisation): the input of
    its conv front end, which every path runs (inference may stop the stack early)."""
    seen: list[torch.Tensor] = []
    encoder.feature_extractor.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    return seen


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1.0 / rate)[int(np.argmax(spectrum))])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_published_family_embeds_through_the_index_path_at_its_own_rate(tmp_path, family):
    class_name, rate, normalize = FAMILIES[family]
    folder = save_published_checkpoint(tmp_path / family, family)
    remote = family == "mert"
    encoder = load_encoder(folder, trust_remote_code=remote)
    assert type(encoder).__name__ == class_name
    assert encoder.config.layerdrop == 0.0
    assert encoder_input(encoder) == EncoderInput(sampling_rate=rate, do_normalize=normalize)

    cfg = _cfg(tmp_path / "store", f"model.trust_remote_code={str(remote).lower()}")
    storage = Storage(str(tmp_path / "store"))
    info = Embedder.from_ref(cfg, storage, str(folder)).info
    assert info["kind"] == "encoder" and info["sample_rate"] == PIPELINE_SR
    # The index's own actor class, fed segment rows as the ingest table stores them.
    actor = SegmentEmbedder(cfg.model_dump(mode="json"), info)
    seen = _capture_inputs(actor.embedder.model.encoder)
    clips = [_sine(1000.0, PIPELINE_SR, 1.0), _sine(1000.0, PIPELINE_SR, 1.0, amplitude=0.05)]
    batch = {
        "segment_id": np.array([11, 12], dtype=np.int64),
        "audio": [encode_audio(c) for c in clips],
        "sample_rate": np.array([PIPELINE_SR, PIPELINE_SR], dtype=np.int32),
    }
    vectors, ids = table_to_vectors(actor(batch))
    assert ids.tolist() == [11, 12] and vectors.shape == (2, HIDDEN)
    assert np.isfinite(vectors).all() and np.allclose(np.linalg.norm(vectors, axis=1), 1.0)

    # The encoder heard one second at *its* rate, the same 1 kHz tone, normalised as it asks.
    heard = torch.cat(seen).numpy()
    assert heard.shape == (2, rate)
    assert abs(_peak_hz(heard[0], rate) - 1000.0) <= 2.0
    if normalize:
        assert np.allclose(heard.std(axis=1), 1.0, atol=1e-2)
    else:
        assert np.allclose(heard.std(axis=1), [0.3 / np.sqrt(2), 0.05 / np.sqrt(2)], rtol=0.02)


def test_own_encoders_keep_hearing_the_pipeline_rate(tmp_path):
    """No preprocessor_config.json (the project's own models): no resampling, normalised."""
    own = build_encoder("tiny", seed=0)
    save_encoder(own, tmp_path / "own")
    assert not (tmp_path / "own" / PREPROCESSOR_CONFIG).exists()
    assert encoder_input(load_encoder(tmp_path / "own")) == EncoderInput()
    embedder = Embedder.from_ref(_cfg(tmp_path / "store"), Storage(str(tmp_path)), "random")
    seen = _capture_inputs(embedder.model.encoder)
    embedder.embed(_sine(440.0, PIPELINE_SR, 1.0)[None, :])
    assert seen[0].shape == (1, PIPELINE_SR) and abs(float(seen[0].std()) - 1.0) < 1e-2


def test_fine_tuned_model_from_remote_code_folder_round_trips_its_rate(tmp_path):
    folder = save_published_checkpoint(tmp_path / "mert", "mert")
    model = EmbeddingModel(
        load_encoder(folder, trust_remote_code=True),
        embedding_dim=16,
        pooling="stats",
        sample_rate=PIPELINE_SR,
        level_channel=True,
    ).eval()
    assert model.hop == round(320 * PIPELINE_SR / 24000)  # the level channel's hop, given audio
    model.save(tmp_path / "model")
    saved = tmp_path / "model" / "encoder"
    assert json.loads((saved / PREPROCESSOR_CONFIG).read_text())["sampling_rate"] == 24000
    assert (saved / "modeling_mert.py").exists()  # the custom code travels with the weights
    with pytest.raises(ValueError, match="trust_remote_code"):
        EmbeddingModel.load(tmp_path / "model")
    loaded = EmbeddingModel.load(tmp_path / "model", trust_remote_code=True)
    assert loaded.encoder_input == EncoderInput(24000, True)
    x = torch.from_numpy(np.stack([_sine(330.0, PIPELINE_SR, 1.0), _sine(660.0, PIPELINE_SR, 1.0)]))
    seen = _capture_inputs(loaded.encoder)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-5)
    assert seen[0].shape == (2, 24000)


def test_remote_code_needs_an_explicit_opt_in(tmp_path):
    folder = save_published_checkpoint(tmp_path / "mert", "mert")
    # Refused up front (transformers would otherwise prompt on stdin in a terminal).
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_encoder(folder)
    with pytest.raises(ValueError, match="trust_remote_code"):
        Embedder.from_ref(_cfg(tmp_path / "store"), Storage(str(tmp_path)), str(folder))


def test_unsupported_preprocessor_configs_are_refused_clearly(tmp_path):
    folder = save_published_checkpoint(tmp_path / "w2v", "wav2vec2")
    path = folder / PREPROCESSOR_CONFIG
    path.write_text(json.dumps({"feature_size": 80, "sampling_rate": 16000}))
    with pytest.raises(ValueError, match="spectrogram"):
        load_encoder(folder)
    path.write_text(json.dumps({"feature_size": 1, "sampling_rate": "16k"}))
    with pytest.raises(ValueError, match="sampling_rate"):
        load_encoder(folder)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_encoder(folder)


def test_pretraining_a_published_encoder_needs_its_rate(tmp_path):
    from mess_ray.train.pretrain import check_pretrain_rate

    encoder = load_encoder(save_published_checkpoint(tmp_path / "m", "mert"), True)
    with pytest.raises(ValueError, match="audio.sample_rate: 24000"):
        check_pretrain_rate(encoder, 16000)
    check_pretrain_rate(encoder, 24000)
    check_pretrain_rate(build_encoder("tiny"), 16000)


@pytest.mark.parametrize("family", ["mert", "wav2vec2"])
def test_finetune_starts_from_named_published_weights_over_a_local_artifact(
    ray_local, tmp_path, family
):
    """model.pretrained wins over an unrelated pretrain artifact (finetune.init_from: auto);
    two DDP workers train a published encoder (layerdrop off) at its own rate."""
    from helpers import SR, STYLES, clip, tiny_config, write_tiny_ingest

    from mess_ray.train import run_finetune

    folder = save_published_checkpoint(tmp_path / family, family)
    storage = Storage(str(tmp_path / "store"))
    write_tiny_ingest(storage, pieces=3, per_style=2)
    build_encoder("tiny", seed=1).save_pretrained(Path(storage.path("pretrain", "p1", "model")))
    storage.publish("pretrain", "p1", {"inputs": {"init": {"kind": "random"}}})
    cfg = tiny_config(
        storage.root,
        finetune={"steps": 2, "batch_size": 3, "num_workers": 2, "checkpoint_every": 2},
    )
    cfg.model.pretrained = str(folder)
    cfg.model.trust_remote_code = family == "mert"
    cfg.model.embedding_dim = 16
    manifest = run_finetune(cfg, storage)
    assert manifest["inputs"]["init"] == {
        "kind": "pretrained",
        "name": str(folder),
        "trust_remote_code": family == "mert",
    }
    assert "pretrain" not in manifest["inputs"]
    assert manifest["counts"]["steps"] == 2 and np.isfinite(manifest["losses"]["history"]).all()

    embedder = Embedder.from_ref(cfg, storage, "finetune")
    encoder = embedder.model.encoder
    assert type(encoder).__name__ == FAMILIES[family][0] and encoder.config.layerdrop == 0.0
    assert embedder.model.encoder_input.sampling_rate == FAMILIES[family][1]
    seen = _capture_inputs(encoder)
    vectors = embedder.embed(np.stack([clip(0, s, 0) for s in STYLES]))
    assert vectors.shape == (3, 16 + 4 * cfg.model.facet_dim) and np.isfinite(vectors).all()
    assert seen[0].shape[1] == 2 * FAMILIES[family][1] and SR == cfg.audio.sample_rate
