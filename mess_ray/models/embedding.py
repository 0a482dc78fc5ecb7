"""EmbeddingModel: encoder + layer weighting + temporal pooling + projection, L2-normalised,
optionally with facet heads (tempo, dynamics, articulation, timbre; see mess_ray.facets).

Saved as a folder::

    <dir>/encoder/                 save_pretrained of the encoder (plus the preprocessor_config.json
                                   of a published encoder: its sample rate and normalisation)
    <dir>/head.pt                  layer weights, pooling and projection parameters
    <dir>/embedding_config.json    sizes and options needed to rebuild the module, and the
                                   facet layout (``facet_layout``, half-open ranges) if any
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from mess_ray.facets import (
    FACETS,
    OVERALL,
    TIMELINE,
    Layout,
    layout_dim,
    make_layout,
    parse_layout,
)
from mess_ray.models.encoder import disable_layerdrop, encoder_input, load_encoder, save_encoder

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


def stats_pool(frames: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation over time, concatenated: [B, T, H] -> [B, 2H].

    The spread over time is what carries dynamics range, rubato and articulation contrast,
    which a (weighted) mean alone averages away.
    """
    return torch.cat([frames.mean(dim=1), frames.std(dim=1, unbiased=False)], dim=-1)


def weighted_states(layer_logits: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Hidden states [L+1, B, T, H] summed with softmax(``layer_logits``) weights: [B, T, H]."""
    weights = layer_logits.softmax(dim=0).to(states.dtype).view(-1, 1, 1, 1)
    return (weights * states).sum(dim=0)


def timeline_pool(frames: torch.Tensor, bins: int) -> torch.Tensor:
    """Frames [B, T, H] kept in time order: averaged into ``bins`` equal spans, centred over
    the spans (what changes along the passage, not its average) and flattened, unit-norm:
    [B, bins * H]. Two passages are close when the same things happen at the same moments."""
    if frames.dim() != 3 or not 2 <= bins <= frames.shape[1]:
        raise ValueError(
            f"timeline_pool needs frames [B, T, H] and 2 <= bins <= T, got "
            f"{tuple(frames.shape)} and {bins} bins"
        )
    binned = F.adaptive_avg_pool1d(frames.transpose(1, 2), bins).transpose(1, 2)  # [B, K, H]
    binned = binned - binned.mean(dim=1, keepdim=True)
    return F.normalize(binned.reshape(frames.shape[0], -1), dim=-1)


def level_contour(waveform: torch.Tensor, hop: int, num_frames: int) -> torch.Tensor:
    """Log-RMS level of the *raw* waveform per encoder frame, [B, num_frames, 1] in units of 20 dB.

    The encoder sees each example normalised to unit variance (``normalize_waveform``), so
    absolute loudness, the first thing a dynamics facet needs, never reaches it; this side
    channel gives it back.
    """
    usable = (waveform.shape[-1] // hop) * hop
    chunks = waveform[:, :usable].reshape(waveform.shape[0], -1, hop)
    rms = chunks.pow(2).mean(dim=-1).clamp_min(1e-10).sqrt()
    level = torch.log10(rms).clamp_min(-5.0)  # -100 dB floor (digital silence)
    level = F.interpolate(level.unsqueeze(1), size=num_frames, mode="linear", align_corners=False)
    return level.transpose(1, 2)


class _PartHead(nn.Module):
    """One embedding part: its own weighting over hidden states, pooling and projection."""

    def __init__(
        self, num_states: int, in_dim: int, out_dim: int, pooling: str, side_dim: int = 0
    ) -> None:
        super().__init__()
        # Zeros -> uniform softmax: every layer starts equally weighted.
        self.layer_logits = nn.Parameter(torch.zeros(num_states))
        self.pool = AttentivePooling(in_dim) if pooling == "attentive" else None
        self.pooling = pooling
        pooled = (2 * in_dim if pooling == "stats" else in_dim) + side_dim
        self.projection = nn.Sequential(
            nn.Linear(pooled, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim)
        )

    def forward(
        self, states: torch.Tensor, level: torch.Tensor | None, side: torch.Tensor | None = None
    ) -> torch.Tensor:
        frames = weighted_states(self.layer_logits, states)  # [B, T, H]
        if level is not None:
            frames = torch.cat([frames, level.to(frames.dtype)], dim=-1)
        if self.pooling == "attentive":
            pooled = self.pool(frames)
        elif self.pooling == "stats":
            pooled = stats_pool(frames)
        else:
            pooled = mean_pool(frames)
        if side is not None:
            pooled = torch.cat([pooled, side.to(pooled.dtype)], dim=-1)
        return self.projection(pooled)


class _TimelineHead(nn.Module):
    """The timeline part: its own weighting over hidden states, a per-frame projection, then
    :func:`timeline_pool` (time order kept, the passage's average removed: a chain's colour
    and gain, which sit on every frame alike, cancel)."""

    def __init__(self, num_states: int, in_dim: int, out_dim: int, bins: int) -> None:
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(num_states))
        self.projection = nn.Linear(in_dim, out_dim)
        self.bins = bins

    def forward(self, states: torch.Tensor, level: torch.Tensor | None) -> torch.Tensor:
        frames = weighted_states(self.layer_logits, states)
        if level is not None:
            frames = torch.cat([frames, level.to(frames.dtype)], dim=-1)
        return timeline_pool(self.projection(frames), self.bins)


class EmbeddingModel(nn.Module):
    """Waveform [B, T] at ``sample_rate`` -> L2-normalised embedding [B, embedding_dim].

    The encoder hears the waveform as its :class:`~mess_ray.models.encoder.EncoderInput` says
    (a published encoder's own rate and normalisation); the level and descriptor channels
    measure the waveform as given.

    With ``facet_dim > 0`` the model has one head per facet of expression besides the
    ``overall`` head, and the output is the faceted embedding of :mod:`mess_ray.facets`
    (unit-norm parts concatenated, scaled by ``1/sqrt(num_parts)``; ``facet_layout`` says
    where each part lies). Each head weights the encoder's hidden states on its own
    (state 0 is the conv feature projection), since tempo, loudness and timbre live at
    different depths.

    With ``descriptor_stats`` (names, mean and std of the audio descriptors of
    :mod:`mess_ray.descriptors` over training segments) every head also receives the
    passage's z-scored descriptor vector next to its pooled frames: onset timing statistics
    over a whole passage are cheap to measure exactly and slow for a small encoder to learn,
    so the heads learn what to add to them (and how to weigh them) instead of re-deriving them.

    With ``timeline_bins > 0`` the output has a last part, ``timeline``: the frames projected
    to ``timeline_dim`` each and kept in time order over that many bins (``_TimelineHead``),
    the part that tells the same performance through another chain from another performance
    of the same notes. It is part of the layout, so a weighted search can weigh it up or to 0.
    """

    def __init__(
        self,
        encoder: PreTrainedModel,
        embedding_dim: int = 128,
        pooling: Literal["mean", "attentive", "stats"] = "attentive",
        freeze_encoder: bool = False,
        freeze_layers: int = 0,
        sample_rate: int = 16000,
        facet_dim: int = 0,
        level_channel: bool = False,
        descriptor_stats: dict[str, list] | None = None,
        level_reference: Literal["absolute", "window"] = "absolute",
        timeline_bins: int = 0,
        timeline_dim: int = 8,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "attentive", "stats"):
            raise ValueError(f"pooling must be 'mean', 'attentive' or 'stats', got {pooling!r}")
        if level_reference not in ("absolute", "window"):
            raise ValueError(
                f"level_reference must be 'absolute' or 'window', got {level_reference!r}"
            )
        if facet_dim < 0:
            raise ValueError(f"facet_dim must be >= 0 (0 = no facet heads), got {facet_dim}")
        if timeline_bins < 0 or timeline_bins == 1 or timeline_dim < 1:
            raise ValueError(
                f"timeline_bins must be 0 (no timeline) or >= 2 and timeline_dim >= 1, got "
                f"{timeline_bins} and {timeline_dim}"
            )
        self.encoder = disable_layerdrop(encoder)
        hidden = int(encoder.config.hidden_size)
        num_states = int(encoder.config.num_hidden_layers) + 1  # embeddings output + each layer
        self.options: dict[str, Any] = dict(
            embedding_dim=embedding_dim,
            pooling=pooling,
            freeze_encoder=freeze_encoder,
            freeze_layers=freeze_layers,
            sample_rate=sample_rate,
            facet_dim=facet_dim,
            level_channel=level_channel,
            descriptor_stats=descriptor_stats,
            level_reference=level_reference,
        )
        if timeline_bins:  # older folders have no such keys: they load as before
            self.options.update(timeline_bins=timeline_bins, timeline_dim=timeline_dim)
        side_dim = self._init_descriptor_channel(descriptor_stats)
        self.encoder_input = encoder_input(encoder)
        # Samples of the *given* waveform per encoder frame (the level channel's hop).
        self.hop = max(
            1,
            round(
                math.prod(encoder.config.conv_stride)
                * sample_rate
                / self.encoder_input.rate(sample_rate)
            ),
        )
        in_dim = hidden + (1 if level_channel else 0)
        # The overall head keeps the attribute names of models saved before facets existed
        # (layer_logits, pool, projection), so their head.pt files still load.
        self.layer_logits = nn.Parameter(torch.zeros(num_states))
        self.pool = AttentivePooling(in_dim) if pooling == "attentive" else None
        pooled = (2 * in_dim if pooling == "stats" else in_dim) + side_dim
        self.projection = nn.Sequential(
            nn.Linear(pooled, in_dim), nn.GELU(), nn.Linear(in_dim, embedding_dim)
        )
        self.facet_heads = nn.ModuleDict(
            {name: _PartHead(num_states, in_dim, facet_dim, pooling, side_dim) for name in FACETS}
            if facet_dim
            else {}
        )
        self.timeline_head = (
            _TimelineHead(num_states, in_dim, timeline_dim, timeline_bins)
            if timeline_bins
            else None
        )
        timeline_width = timeline_bins * timeline_dim
        self.facet_layout: Layout | None = (
            make_layout(embedding_dim, facet_dim, timeline_dim=timeline_width)
            if facet_dim or timeline_bins
            else None
        )
        self.set_frozen(freeze_encoder, freeze_layers)

    def _init_descriptor_channel(self, stats: dict[str, list] | None) -> int:
        """Buffers for the descriptor side channel's z-scoring; returns its width (0: none)."""
        if stats is None:
            return 0
        from mess_ray.descriptors import DESCRIPTOR_NAMES

        names = tuple(stats.get("names", ()))
        if names != DESCRIPTOR_NAMES:
            raise ValueError(
                f"descriptor channel was fitted on descriptors {list(names)}, but this version "
                f"computes {list(DESCRIPTOR_NAMES)}: retrain the model"
            )
        mean = torch.tensor(stats["mean"], dtype=torch.float32)
        std = torch.tensor(stats["std"], dtype=torch.float32)
        if mean.shape != (len(names),) or std.shape != (len(names),):
            raise ValueError("descriptor_stats mean and std must have one value per descriptor")
        self.register_buffer("descriptor_mean", mean, persistent=False)
        self.register_buffer(
            "descriptor_std", torch.where(std > 1e-12, std, torch.ones_like(std)), persistent=False
        )
        return len(names)

    def descriptor_input(
        self, waveform: torch.Tensor, raw: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Z-scored audio descriptors of each raw waveform [B, D] (None without the channel).
        Measured in numpy (not differentiable, nothing to learn there) unless the caller has
        them already (``raw``, [B, D] unscaled: fine-tuning measures them for facet targets);
        unknowns are 0 (the training mean) and values are clipped to +-5 so one odd passage
        cannot dominate."""
        if self.options.get("descriptor_stats") is None:
            return None
        if raw is None:
            from mess_ray.descriptors import descriptor_vector

            rate = int(self.options["sample_rate"])
            rows = waveform.detach().float().cpu().numpy()
            raw = torch.from_numpy(np.stack([descriptor_vector(row, rate) for row in rows]))
        z = (
            raw.float().to(self.descriptor_mean.device) - self.descriptor_mean
        ) / self.descriptor_std
        return torch.nan_to_num(z, nan=0.0).clamp(-5.0, 5.0)

    @property
    def embedding_dim(self) -> int:
        """Size of the output vector (all parts together when the model has facets)."""
        return (
            layout_dim(self.facet_layout)
            if self.facet_layout
            else int(self.options["embedding_dim"])
        )

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(self.facet_layout) if self.facet_layout else (OVERALL,)

    def set_frozen(self, freeze_encoder: bool, freeze_layers: int = 0) -> None:
        """Freeze the whole encoder, or its feature extractor and lower ``freeze_layers`` layers."""
        num_layers = int(self.encoder.config.num_hidden_layers)
        if freeze_layers > num_layers:
            raise ValueError(
                f"freeze_layers={freeze_layers} exceeds the encoder's {num_layers} layers"
            )
        for p in self.encoder.parameters():
            p.requires_grad_(not freeze_encoder)
        if not freeze_encoder and freeze_layers > 0:
            lower: list[nn.Module] = [
                self.encoder.feature_extractor,
                self.encoder.feature_projection,
            ]
            lower += list(self.encoder.encoder.layers[:freeze_layers])
            for module in lower:
                for p in module.parameters():
                    p.requires_grad_(False)
        self.options.update(freeze_encoder=freeze_encoder, freeze_layers=freeze_layers)

    def layer_weights(self) -> torch.Tensor:
        """The overall head's weights over hidden states (each facet head has its own)."""
        return self.layer_logits.softmax(dim=0)

    def _pool_overall(self, frames: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            return self.pool(frames)
        return stats_pool(frames) if self.options["pooling"] == "stats" else mean_pool(frames)

    def _hidden_states(self, waveform: torch.Tensor) -> torch.Tensor:
        """Every hidden state of the encoder, [L+1, B, T, H] (state 0: the feature projection)."""
        encoder_in = self.encoder_input.prepare(waveform, int(self.options["sample_rate"]))
        out = self.encoder(encoder_in, output_hidden_states=True)
        states = torch.stack(out.hidden_states, dim=0)
        if states.shape[0] != self.layer_logits.shape[0]:
            raise ValueError(
                f"encoder returned {states.shape[0]} hidden states, expected {self.layer_logits.shape[0]}"
            )
        return states

    def frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """The frames the overall head pools, before pooling: the hidden states weighted as it
        weights them, [B, T, H] (the level channel left out)."""
        if waveform.dim() != 2:
            raise ValueError(
                f"expected waveform of shape [batch, samples], got {tuple(waveform.shape)}"
            )
        return weighted_states(self.layer_logits, self._hidden_states(waveform))

    def forward_parts(
        self, waveform: torch.Tensor, descriptors: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Each part's L2-normalised vector: ``{"overall": [B, d], "tempo": [B, f], ...}``
        (``descriptors``: the waveforms' raw audio descriptors, if measured already)."""
        if waveform.dim() != 2:
            raise ValueError(
                f"expected waveform of shape [batch, samples], got {tuple(waveform.shape)}"
            )
        states = self._hidden_states(waveform)
        level = (
            level_contour(waveform.float(), self.hop, states.shape[2])
            if self.options.get("level_channel")
            else None
        )
        if level is not None and self.options.get("level_reference") == "window":
            # relative to the passage's own median level: the chain's gain cancels
            level = level - level.median(dim=1, keepdim=True).values
        frames = weighted_states(self.layer_logits, states)  # [B, T, H]
        if level is not None:
            frames = torch.cat([frames, level.to(frames.dtype)], dim=-1)
        side = self.descriptor_input(waveform, descriptors)
        pooled = self._pool_overall(frames)
        if side is not None:
            pooled = torch.cat([pooled, side.to(pooled.dtype)], dim=-1)
        parts = {OVERALL: F.normalize(self.projection(pooled).float(), dim=-1)}
        for name, head in self.facet_heads.items():
            parts[name] = F.normalize(head(states, level, side).float(), dim=-1)
        if self.timeline_head is not None:
            parts[TIMELINE] = self.timeline_head(states, level).float()
        return parts

    def compose(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The output vector from :meth:`forward_parts` (the facets contract's ``compose``)."""
        if self.facet_layout is None:
            return parts[OVERALL]
        return torch.cat([parts[name] for name in self.facet_layout], dim=-1) / math.sqrt(
            len(self.facet_layout)
        )

    def forward(
        self, waveform: torch.Tensor, descriptors: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.compose(self.forward_parts(waveform, descriptors))

    # -- persistence -----------------------------------------------------------------------
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_encoder(self.encoder, directory / ENCODER_DIR)
        torch.save(self.head_state_dict(), directory / HEAD_WEIGHTS)
        config = dict(sorted(self.options.items()))
        if self.facet_layout is not None:
            # Not sort_keys: the layout's order is part of the contract (overall first, contiguous).
            config["facet_layout"] = {name: list(span) for name, span in self.facet_layout.items()}
        (directory / EMBEDDING_CONFIG).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, trust_remote_code: bool = False) -> EmbeddingModel:
        directory = Path(directory)
        if not (directory / EMBEDDING_CONFIG).exists():
            raise ValueError(f"{directory} is not an EmbeddingModel folder (no {EMBEDDING_CONFIG})")
        options = json.loads((directory / EMBEDDING_CONFIG).read_text())
        saved_layout = parse_layout(options.pop("facet_layout", None))
        encoder = load_encoder(directory / ENCODER_DIR, trust_remote_code=trust_remote_code)
        model = cls(encoder, **options)
        missing, unexpected = model.load_state_dict(
            torch.load(directory / HEAD_WEIGHTS, map_location="cpu", weights_only=True),
            strict=False,
        )
        missing = [k for k in missing if not k.startswith("encoder.")]
        if missing or unexpected:
            raise ValueError(
                f"{directory}: head weights do not match (missing {missing}, unexpected {unexpected})"
            )
        if saved_layout != model.facet_layout:
            raise ValueError(
                f"{directory}: saved facet layout {saved_layout} does not match the rebuilt "
                f"model's {model.facet_layout}"
            )
        return model.eval()


def is_embedding_model_dir(directory: str | Path) -> bool:
    return (Path(directory) / EMBEDDING_CONFIG).exists()
