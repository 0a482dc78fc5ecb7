"""The fine-tuning loop's settings: one frozen, typed object built once on the driver
(:func:`mess_ray.train.finetune.run_finetune`) and shipped to every Ray Train worker, where
the model builder, the collate and the loss read its fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mess_ray.config import AugmentConfig


@dataclass(frozen=True)
class EmbeddingOptions:
    """Keyword arguments of :class:`mess_ray.models.embedding.EmbeddingModel` (besides the
    encoder)."""

    embedding_dim: int = 128
    pooling: Literal["mean", "attentive", "stats"] = "attentive"
    freeze_encoder: bool = False
    freeze_layers: int = 0
    sample_rate: int = 16000
    facet_dim: int = 0
    level_channel: bool = False
    level_reference: Literal["absolute", "window"] = "absolute"
    timeline_bins: int = 0
    timeline_dim: int = 8
    # mean/std/names of the training descriptors, with the model's descriptor channel
    descriptor_stats: dict[str, list] | None = None


@dataclass(frozen=True)
class FinetuneLoop:
    init: dict[str, Any] = field(default_factory=dict)  # train.common.resolve_init
    inputs: dict[str, Any] = field(default_factory=dict)  # recorded; a resume must match them
    styles: tuple[str, ...] = ()  # style labels, then mined labels (index >= mined_from)
    window_samples: int = 16000
    sample_rate: int = 16000
    seed: int = 0
    mined_from: int | None = None
    loss: Literal["infonce", "triplet"] = "infonce"
    temperature: float = 0.1
    learn_temperature: bool = False
    margin: float = 0.2
    hard_negative_weight: float = 1.0
    contrastive_target: Literal["full", "overall"] = "full"
    embedding: EmbeddingOptions = field(default_factory=EmbeddingOptions)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # the same performance at the same time through another chain as a positive view
    cross_chain_views: bool = False
    # facet heads: z-scoring stats of the collate's descriptors (None: no facet targets)
    descriptor_stats: dict[str, Any] | None = None
    facet_groups: dict[str, list[int]] | None = None
    facet_weight: float = 0.0
    facet_temperature: float = 0.1
    facet_target_temperature: float = 0.5
    # pair source (b): segment id -> z-scored performed-MIDI descriptors (None: not used)
    midi_targets: dict[int, list[float]] | None = None
    midi_target_names: tuple[str, ...] = ()
    midi_weight: float = 0.0
    midi_target_temperature: float = 0.5
    # performer positives: segment id -> pianist code (pianists who play two or more training
    # pieces; None: not used), the term's weight and the memory of recent rows it ranks against
    performers: dict[int, int] | None = None
    performer_weight: float = 0.0
    performer_memory: int = 0
    # the timeline part's own term (model.timeline_bins > 0): positives are a row's own views
    timeline_weight: float = 0.0
