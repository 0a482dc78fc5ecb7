"""HuBERT-style audio encoders built from a named size, or loaded from a checkpoint.

Sizes (all share HuBERT's total conv stride of 320 samples, i.e. 50 frames/s at 16 kHz):

- ``tiny``: hidden 64, 2 layers, 2 heads, a 3-layer conv stack; fast enough for CPU tests.
- ``small``: hidden 256, 4 layers, 4 heads, the standard 7-layer conv stack (narrower).
- ``base``: HuBERT/MERT-v1-95M geometry (12 layers, 768 dims, ~95M parameters). MERT-v1-95M
  was trained on 24 kHz audio (75 frames/s), so set ``audio.sample_rate: 24000`` when
  starting from MERT weights or comparing with it.

``layerdrop`` is always 0: skipping layers at random makes DDP ranks disagree on which
parameters received gradients.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, HubertConfig, HubertModel, PreTrainedModel

ENCODER_SIZES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        conv_dim=(32, 32, 32),
        conv_stride=(5, 8, 8),
        conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        conv_dim=(256,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=64,
        num_conv_pos_embedding_groups=16,
    ),
    "base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        conv_dim=(512,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
    ),
}


def encoder_config(size: str) -> HubertConfig:
    """The HubertConfig of a named size (no weights allocated)."""
    if size not in ENCODER_SIZES:
        raise ValueError(f"unknown encoder size {size!r}; choose one of {sorted(ENCODER_SIZES)}")
    # mask_time_prob > 0 creates the learned mask embedding that pretraining's explicit
    # mask_time_indices use; in fine-tuning it acts as SpecAugment (training mode only).
    return HubertConfig(
        **ENCODER_SIZES[size],
        layerdrop=0.0,
        mask_time_prob=0.05,
        mask_time_length=5,
        mask_feature_prob=0.0,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
    )


def build_encoder(size: str, seed: int | None = None) -> HubertModel:
    """A randomly initialised encoder of a named size (deterministic when seeded)."""
    config = encoder_config(size)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return HubertModel(config)
    return HubertModel(config)


def count_parameters(size: str) -> int:
    """Parameter count of a named size, without allocating memory (meta device)."""
    with torch.device("meta"):
        model = HubertModel(encoder_config(size))
    return sum(p.numel() for p in model.parameters())


def disable_layerdrop(model: PreTrainedModel) -> PreTrainedModel:
    if hasattr(model.config, "layerdrop"):
        model.config.layerdrop = 0.0
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layerdrop"):
        encoder.layerdrop = 0.0
    return model


def load_encoder(name_or_path: str | Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """An encoder saved with ``save_pretrained`` (a folder) or a hub name available offline.

    Checkpoints with custom code (MERT) need ``trust_remote_code=True``: running code from a
    checkpoint is an explicit opt-in, never a default.
    """
    name = str(name_or_path)
    is_local = Path(name).exists()
    if is_local and not (Path(name) / "config.json").exists():
        raise ValueError(
            f"{name} is a folder without config.json: not a save_pretrained checkpoint"
        )
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModel.from_pretrained(name, config=config, trust_remote_code=trust_remote_code)
    except OSError as err:
        where = "local folder" if is_local else "hub name (no network for model downloads here?)"
        raise ValueError(
            f"cannot load encoder {name!r} as a {where}: {err}. Pass a folder written by "
            "save_pretrained, or pre-download the checkpoint into the Hugging Face cache."
        ) from err
    except ValueError as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise ValueError(
                f"{name!r} ships custom model code; set model.trust_remote_code: true "
                "to allow running it"
            ) from err
        raise
    return disable_layerdrop(model)


def conv_stride(model: PreTrainedModel) -> int:
    """Samples per encoder frame (product of the conv strides)."""
    return int(math.prod(model.config.conv_stride))


def num_frames(model: PreTrainedModel, num_samples: int) -> int:
    """Encoder frames for an input of ``num_samples`` samples."""
    lengths = model._get_feat_extract_output_lengths(torch.tensor([num_samples]))
    return int(lengths[0])


def normalize_waveform(waveform: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per example (as HuBERT's feature extractor does).

    Applied identically in training and inference; silence stays silence (eps).
    """
    mean = waveform.mean(dim=-1, keepdim=True)
    std = waveform.std(dim=-1, keepdim=True)
    return (waveform - mean) / (std + eps)
