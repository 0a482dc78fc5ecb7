"""EmbeddingModel: encoder + layer weighting + temporal pooling + projection, L2-normalised.

Saved as a folder::

    <dir>/encoder/                 save_pretrained of the encoder
    <dir>/head.pt                  layer weights, pooling and projection parameters
    <dir>/embedding_config.json    sizes and options needed to rebuild the module
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from mess_ray.models.encoder import disable_layerdrop, load_encoder, normalize_waveform

EMBEDDING_CONFIG = "embedding_config.json"
HEAD_WEIGHTS = "head.pt"
ENCODER_DIR = "encoder"


class AttentivePooling(nn.Module):
    """Softmax attention over frames: a learned score per frame, weighted average."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1))

    def forward(self, frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.score(frames).squeeze(-1)  # [B, T]
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1).unsqueeze(-1)
        return (weights * frames).sum(dim=1)


def mean_pool(frames: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    if mask is None:
        return frames.mean(dim=1)
    m = mask.unsqueeze(-1).to(frames.dtype)
    return (frames * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class EmbeddingModel(nn.Module):
    """Waveform [B, T] -> L2-normalised embedding [B, embedding_dim]."""

    def __init__(self, encoder: PreTrainedModel, embedding_dim: int = 128,
                 pooling: Literal["mean", "attentive"] = "attentive",
                 freeze_encoder: bool = False, freeze_layers: int = 0,
                 sample_rate: int = 16000) -> None:
        super().__init__()
        if pooling not in ("mean", "attentive"):
            raise ValueError(f"pooling must be 'mean' or 'attentive', got {pooling!r}")
        self.encoder = disable_layerdrop(encoder)
        hidden = int(encoder.config.hidden_size)
        num_states = int(encoder.config.num_hidden_layers) + 1  # embeddings output + each layer
        self.options: dict[str, Any] = dict(embedding_dim=embedding_dim, pooling=pooling,
                                            freeze_encoder=freeze_encoder, freeze_layers=freeze_layers,
                                            sample_rate=sample_rate)
        # Zeros -> uniform softmax: every layer starts equally weighted.
        self.layer_logits = nn.Parameter(torch.zeros(num_states))
        self.pool = AttentivePooling(hidden) if pooling == "attentive" else None
        self.projection = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, embedding_dim))
        self.set_frozen(freeze_encoder, freeze_layers)

    @property
    def embedding_dim(self) -> int:
        return int(self.options["embedding_dim"])

    def set_frozen(self, freeze_encoder: bool, freeze_layers: int = 0) -> None:
        """Freeze the whole encoder, or its feature extractor and lower ``freeze_layers`` layers."""
        num_layers = int(self.encoder.config.num_hidden_layers)
        if freeze_layers > num_layers:
            raise ValueError(f"freeze_layers={freeze_layers} exceeds the encoder's {num_layers} layers")
        for p in self.encoder.parameters():
            p.requires_grad_(not freeze_encoder)
        if not freeze_encoder and freeze_layers > 0:
            lower: list[nn.Module] = [self.encoder.feature_extractor, self.encoder.feature_projection]
            lower += list(self.encoder.encoder.layers[:freeze_layers])
            for module in lower:
                for p in module.parameters():
                    p.requires_grad_(False)
        self.options.update(freeze_encoder=freeze_encoder, freeze_layers=freeze_layers)

    def layer_weights(self) -> torch.Tensor:
        return self.layer_logits.softmax(dim=0)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() != 2:
            raise ValueError(f"expected waveform of shape [batch, samples], got {tuple(waveform.shape)}")
        out = self.encoder(normalize_waveform(waveform), output_hidden_states=True)
        states = torch.stack(out.hidden_states, dim=0)  # [L+1, B, T, H]
        if states.shape[0] != self.layer_logits.shape[0]:
            raise ValueError(f"encoder returned {states.shape[0]} hidden states, expected {self.layer_logits.shape[0]}")
        weights = self.layer_weights().to(states.dtype).view(-1, 1, 1, 1)
        frames = (weights * states).sum(dim=0)  # [B, T, H]
        pooled = self.pool(frames) if self.pool is not None else mean_pool(frames)
        return F.normalize(self.projection(pooled).float(), dim=-1)

    # -- persistence -----------------------------------------------------------------------
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory / ENCODER_DIR)
        torch.save(self.head_state_dict(), directory / HEAD_WEIGHTS)
        (directory / EMBEDDING_CONFIG).write_text(json.dumps(self.options, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path, trust_remote_code: bool = False) -> "EmbeddingModel":
        directory = Path(directory)
        if not (directory / EMBEDDING_CONFIG).exists():
            raise ValueError(f"{directory} is not an EmbeddingModel folder (no {EMBEDDING_CONFIG})")
        options = json.loads((directory / EMBEDDING_CONFIG).read_text())
        encoder = load_encoder(directory / ENCODER_DIR, trust_remote_code=trust_remote_code)
        model = cls(encoder, **options)
        missing, unexpected = model.load_state_dict(
            torch.load(directory / HEAD_WEIGHTS, map_location="cpu", weights_only=True), strict=False)
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise ValueError(f"{directory}: head weights do not match (missing {missing}, unexpected {unexpected})")
        return model.eval()


def is_embedding_model_dir(directory: str | Path) -> bool:
    return (Path(directory) / EMBEDDING_CONFIG).exists()
