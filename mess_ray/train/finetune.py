"""Contrastive fine-tuning of an :class:`EmbeddingModel` on Ray Train: the driver.

The pieces live beside it: losses (:mod:`mess_ray.train.losses`), what the model learns from
(:mod:`mess_ray.train.targets`), batch collation (:mod:`mess_ray.train.collate`) and the
loop's frozen settings (:mod:`mess_ray.train.finetune_settings`).

Positives are segments of the same expressive ``style`` (the anchor itself excluded), plus
augmented views of the batch (``finetune.augment``: EQ tilt, noise, reverb; never a
time-stretch). Hard negatives are the same piece played in another style: InfoNCE can up-weight
them (``hard_negative_weight``) and the triplet loss mines them first. Losses: multi-positive
InfoNCE / NT-Xent (supervised-contrastive form; fixed or learnable temperature) or triplet
margin. Facet heads (``model.facet_dim > 0``) are supervised by a soft-neighbour KL loss whose
target distribution comes from each facet's descriptor group
(:data:`mess_ray.descriptors.FACET_DESCRIPTORS`, read at run time) z-scored on training
segments. Pair source (b) with performed MIDI (``finetune.midi_weight``): for every training
segment whose recording has MIDI (renderings keep theirs, ASAP-layout corpora name theirs),
the expressive MIDI descriptors of benchmark task 3 (tempo against the score, rubato, timing,
velocity, articulation, pedal) give soft-neighbour targets for the searched vector over
*other pieces'* passages; such segments take part even without a style (a label of their own).
Performer positives (``finetune.performer_weight``): a further InfoNCE term whose positives are
the same pianist in another training piece, ranked against the batch and a memory of recent
rows (``finetune.performer_memory``; :func:`mess_ray.train.losses.performer_infonce`).
Only *training pieces* are used (``split_pieces`` on ``eval.holdout_fraction``/``eval.seed``),
so evaluation on the holdout pieces measures generalisation to unseen music, and with
``eval.test_pianist_fraction`` none of the test-side pianists' performances
(:func:`mess_ray.splits.pianist_holdout`; the manifest's ``pianists`` block says who was heard);
segments with neither a style, a mined label nor MIDI are skipped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mess_ray.config import MessRayConfig
from mess_ray.models.embedding import EmbeddingModel
from mess_ray.segments import read_segment_table, read_segments_ray, window_samples
from mess_ray.storage import Storage
from mess_ray.train.collate import collate_labelled
from mess_ray.train.common import (
    TrainTask,
    finish,
    finished_run,
    fit,
    load_init_encoder,
    resolve_init,
    with_run_name,
)
from mess_ray.train.finetune_settings import EmbeddingOptions, FinetuneLoop
from mess_ray.train.losses import PerformerMemory, finetune_loss
from mess_ray.train.pairs import performance_items, read_performance_rows
from mess_ray.train.targets import (
    TrainingRows,
    facet_groups,
    filter_training_rows,
    select_training_rows,
    training_descriptor_stats,
)

log = logging.getLogger(__name__)


# -- model ---------------------------------------------------------------------------------
class ContrastiveModel(nn.Module):
    """EmbeddingModel plus the loss's own parameter (a learnable log-temperature)."""

    def __init__(
        self,
        embedding: EmbeddingModel,
        temperature: float,
        learn_temperature: bool,
        performer_memory: int = 0,
    ) -> None:
        super().__init__()
        self.embedding = embedding
        # The performer term's memory of recent rows (finetune.performer_memory; not a parameter)
        self.performer_memory = PerformerMemory(performer_memory) if performer_memory else None
        self.log_temperature = nn.Parameter(
            torch.tensor(math.log(temperature)), requires_grad=learn_temperature
        )

    def forward(
        self, waveform: torch.Tensor, descriptors: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.embedding(waveform, descriptors)

    def temperature(self) -> torch.Tensor:
        # Clamped so a learnable temperature cannot collapse to 0 or blow up.
        return self.log_temperature.exp().clamp(0.01, 1.0)


def build_finetune_model(loop: FinetuneLoop) -> nn.Module:
    embedding = EmbeddingModel(load_init_encoder(loop.init), **asdict(loop.embedding))
    memory = loop.performer_memory if loop.performer_weight > 0 and loop.performers else 0
    return ContrastiveModel(embedding, loop.temperature, loop.learn_temperature, memory)


def save_embedding_model(model: nn.Module, folder: Path, loop: FinetuneLoop) -> None:
    model.embedding.save(folder)


FINETUNE_TASK = TrainTask(
    stage="finetune",
    build_model=build_finetune_model,
    collate=collate_labelled,
    loss=finetune_loss,
    save_model=save_embedding_model,
)


# -- driver --------------------------------------------------------------------------------
def run_finetune(cfg: MessRayConfig, storage: Storage) -> dict[str, Any]:
    """Contrastive fine-tuning on training pieces; publishes ``finetune/<run_name>``."""
    ft = cfg.finetune
    if cfg.model.timeline_bins and ft.timeline_weight > 0:
        if not (ft.cross_chain_views or ft.augment.views):
            raise ValueError(
                "model.timeline_bins: the timeline term's positives are a segment's own views; "
                "set finetune.cross_chain_views: true (a corpus rendered through several chains) "
                "or finetune.augment.views >= 1, or finetune.timeline_weight: 0"
            )
    ingest_version = storage.require_latest("ingest")
    metadata = read_segment_table(
        storage, ingest_version, columns=["segment_id", "piece_id", "style", "track_id"]
    )
    rows = select_training_rows(cfg, storage, ingest_version, metadata)
    init = resolve_init(cfg, storage, ft.init_from)
    inputs = {"ingest": ingest_version, "init": {k: v for k, v in init.items() if k != "storage"}}
    if init["kind"] == "artifact":
        inputs["pretrain"] = init["version"]
    ft = with_run_name(cfg, "finetune", ft, inputs)
    done = finished_run(cfg, storage, "finetune", ft, inputs)
    if done is not None:
        return done
    descriptor_stats = None
    if (cfg.model.facet_dim > 0 and ft.facet_weight > 0) or cfg.model.descriptor_channel:
        descriptor_stats = training_descriptor_stats(
            storage,
            ingest_version,
            rows.train_pieces,
            window_samples(cfg.audio.window_s, cfg.audio.sample_rate),
            cfg.audio.sample_rate,
            ft.descriptor_sample,
            ft.seed,
            left_out_tracks=rows.left_out_tracks,
        )
    loop = finetune_loop(cfg, init, inputs, rows, descriptor_stats)
    pairing = None
    if ft.cross_chain_views:
        import ray.data

        # One performance (all of its chains) per block: each row's partner is at hand.
        items, pairing = performance_items(storage, ingest_version, rows.train_pieces)
        if not items:
            raise ValueError("cross_chain_views: no training performance in the ingest version")
        if pairing["performances_with_several_chains"] == 0:
            log.warning(
                "finetune.cross_chain_views: no training performance has two chains "
                "(render.chains / render.train_piece_chains): no cross-chain positives"
            )
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            read_performance_rows,
            batch_size=1,
            fn_kwargs={
                "storage_cfg": storage.config().model_dump(),
                "train_pieces": rows.train_pieces,
                "mined": rows.mined,
                "with_midi": set(rows.midi_targets),
                "left_out_tracks": rows.left_out_tracks,
                "seed": ft.seed,
            },
            batch_format="numpy",
            num_cpus=0.25,
        )
    else:
        dataset = read_segments_ray(
            storage,
            ingest_version,
            columns=["segment_id", "audio", "style", "piece_id", "track_id"],
        ).map_batches(
            filter_training_rows,
            fn_kwargs={
                "train_pieces": rows.train_pieces,
                "mined": rows.mined,
                "with_midi": set(rows.midi_targets),
                "left_out_tracks": rows.left_out_tracks,
            },
            batch_format="pyarrow",
            num_cpus=0.25,
        )
    # Files (or performances) hold one track or piece each: visit them in random order, and
    # each worker's local shuffle buffer (train.shuffle_buffer) mixes styles within batches.
    dataset = dataset.randomize_block_order(seed=ft.seed)
    result = fit(cfg, storage, FINETUNE_TASK, ft, dataset, loop)
    with_midi = bool(rows.midi_targets)
    return finish(
        cfg,
        storage,
        FINETUNE_TASK,
        ft,
        result,
        loop,
        counts={
            "train_segments": rows.count,
            "train_pieces": len(rows.train_pieces),
            "styles": len(rows.styles),
            "segments": metadata.num_rows,
            "excluded_tracks": len(rows.left_out_tracks),
        },
        extra={
            "train_pieces": rows.train_pieces,
            "styles": rows.styles,
            "loss_type": ft.loss,
            "mining": rows.mining_counts,
            "midi_targets": (
                {"names": rows.midi_names, **rows.midi_counts}
                if with_midi
                else rows.midi_counts or None
            ),
            "descriptor_stats": descriptor_stats,
            "facet_groups": loop.facet_groups,
            # Which pianists fine-tuning heard (the protocol's unseen-pianist rows read it here).
            "pianists": rows.pianists,
            "cross_chain_views": pairing,
            "performers": rows.performer_counts or None,
            "augment": ft.augment.model_dump(mode="json"),
        },
    )


def finetune_loop(
    cfg: MessRayConfig,
    init: dict[str, Any],
    inputs: dict[str, Any],
    rows: TrainingRows,
    descriptor_stats: dict[str, Any] | None,
) -> FinetuneLoop:
    """The loop's settings, built once from the config and the training targets."""
    ft = cfg.finetune
    facets_supervised = cfg.model.facet_dim > 0 and ft.facet_weight > 0
    with_midi = bool(rows.midi_targets)
    return FinetuneLoop(
        init=init,
        inputs=inputs,
        styles=tuple(rows.styles),
        window_samples=window_samples(cfg.audio.window_s, cfg.audio.sample_rate),
        sample_rate=cfg.audio.sample_rate,
        seed=ft.seed,
        mined_from=(len(rows.styles) - len(set(rows.mined.values()))) if rows.mined else None,
        loss=ft.loss,
        temperature=ft.temperature,
        learn_temperature=ft.learn_temperature,
        margin=ft.margin,
        hard_negative_weight=ft.hard_negative_weight,
        contrastive_target=ft.contrastive_target,
        embedding=EmbeddingOptions(
            embedding_dim=cfg.model.embedding_dim,
            pooling=cfg.model.pooling,
            freeze_encoder=ft.freeze_encoder,
            freeze_layers=ft.freeze_layers,
            sample_rate=cfg.audio.sample_rate,
            facet_dim=cfg.model.facet_dim,
            level_channel=cfg.model.level_channel,
            level_reference=cfg.model.level_reference,
            timeline_bins=cfg.model.timeline_bins,
            timeline_dim=cfg.model.timeline_dim,
            descriptor_stats=(
                {k: descriptor_stats[k] for k in ("names", "mean", "std")}
                if cfg.model.descriptor_channel
                else None
            ),
        ),
        augment=ft.augment,
        cross_chain_views=ft.cross_chain_views,
        descriptor_stats=descriptor_stats if facets_supervised else None,
        facet_groups=facet_groups() if facets_supervised else None,
        facet_weight=ft.facet_weight if facets_supervised else 0.0,
        facet_temperature=ft.facet_temperature,
        facet_target_temperature=ft.facet_target_temperature,
        midi_targets=rows.midi_targets if with_midi else None,
        midi_target_names=tuple(rows.midi_names) if with_midi else (),
        midi_weight=ft.midi_weight if with_midi else 0.0,
        midi_target_temperature=ft.midi_target_temperature,
        performers=rows.performers or None,
        performer_weight=ft.performer_weight if rows.performers else 0.0,
        performer_memory=ft.performer_memory,
        timeline_weight=ft.timeline_weight if cfg.model.timeline_bins else 0.0,
    )
