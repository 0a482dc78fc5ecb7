"""Contrastive fine-tuning of an :class:`EmbeddingModel` on Ray Train.

Positives are segments of the same expressive ``style`` (the anchor itself excluded).
Losses: multi-positive InfoNCE / NT-Xent (supervised-contrastive form; fixed or learnable
temperature) or triplet margin with batch-hard mining. Only *training pieces* are used
(``split_pieces`` on ``eval.holdout_fraction``/``eval.seed``), so evaluation on the holdout
pieces measures generalisation to unseen music; segments without a style are skipped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from mess_ray.config import MessRayConfig
from mess_ray.models.embedding import EmbeddingModel
from mess_ray.segments import read_segment_table, read_segments_ray, split_pieces
from mess_ray.storage import Storage
from mess_ray.train.common import (TrainTask, with_run_name, decode_audio_column, finish, fit, load_init_encoder, resolve_init,
                                   window_samples)


# -- losses --------------------------------------------------------------------------------
def _positive_mask(labels: torch.Tensor) -> torch.Tensor:
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    return same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)


def multi_positive_infonce(embeddings: torch.Tensor, labels: torch.Tensor,
                           temperature: torch.Tensor | float) -> torch.Tensor:
    """Supervised NT-Xent: each anchor against all others, averaged over its positives.

    ``embeddings`` are L2-normalised [B, D]; anchors without any positive in the batch are
    skipped (a zero loss that keeps the graph when none has one).
    """
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError("embeddings and labels disagree on the batch size")
    logits = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = _positive_mask(labels)
    counts = positives.sum(dim=1)
    has_positive = counts > 0
    if not has_positive.any():
        return embeddings.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(dim=1)) / counts.clamp_min(1)
    return per_anchor[has_positive].mean()


def batch_hard_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Triplet margin loss with the hardest positive and hardest negative of each anchor."""
    distances = torch.cdist(embeddings, embeddings)
    positives = _positive_mask(labels)
    negatives = labels.unsqueeze(0) != labels.unsqueeze(1)
    valid = positives.any(dim=1) & negatives.any(dim=1)
    if not valid.any():
        return embeddings.sum() * 0.0
    hardest_positive = distances.masked_fill(~positives, float("-inf")).max(dim=1).values
    hardest_negative = distances.masked_fill(~negatives, float("inf")).min(dim=1).values
    return F.relu(hardest_positive - hardest_negative + margin)[valid].mean()


# -- model ---------------------------------------------------------------------------------
class ContrastiveModel(nn.Module):
    """EmbeddingModel plus the loss's own parameter (a learnable log-temperature)."""

    def __init__(self, embedding: EmbeddingModel, temperature: float, learn_temperature: bool) -> None:
        super().__init__()
        self.embedding = embedding
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.embedding(waveform)

    def temperature(self) -> torch.Tensor:
        # Clamped so a learnable temperature cannot collapse to 0 or blow up.
        return self.log_temperature.exp().clamp(0.01, 1.0)


def build_finetune_model(loop_config: dict) -> nn.Module:
    options = loop_config["embedding"]
    embedding = EmbeddingModel(load_init_encoder(loop_config["init"]), **options)
    return ContrastiveModel(embedding, loop_config["temperature"], loop_config["learn_temperature"])


def collate_labelled(batch: dict, loop_config: dict) -> dict[str, torch.Tensor]:
    vocabulary = {style: i for i, style in enumerate(loop_config["styles"])}
    labels = [vocabulary[str(s)] for s in batch["style"]]
    return {"audio": decode_audio_column(batch["audio"], loop_config["window_samples"]),
            "labels": torch.tensor(labels, dtype=torch.long)}


def finetune_loss(model: nn.Module, batch: dict, loop_config: dict) -> tuple[torch.Tensor, dict[str, float]]:
    embeddings = model(batch["audio"])
    labels = batch["labels"]
    inner = model.module if hasattr(model, "module") else model
    if loop_config["loss"] == "triplet":
        loss = batch_hard_triplet(embeddings, labels, loop_config["margin"])
    else:
        loss = multi_positive_infonce(embeddings, labels, inner.temperature())
    anchors = float(_positive_mask(labels).any(dim=1).float().mean())
    return loss, {"temperature": float(inner.temperature()), "anchors_with_positive": anchors,
                  "styles_in_batch": float(len(torch.unique(labels)))}


def save_embedding_model(model: nn.Module, folder: Path, loop_config: dict) -> None:
    model.embedding.save(folder)


FINETUNE_TASK = TrainTask(stage="finetune", build_model=build_finetune_model, collate=collate_labelled,
                          loss=finetune_loss, save_model=save_embedding_model)


# -- data ----------------------------------------------------------------------------------
def training_selection(metadata: pa.Table, holdout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train pieces, styles) for fine-tuning; the holdout pieces are left for evaluation."""
    pieces = [p for p in metadata.column("piece_id").to_pylist() if p]
    if not pieces:
        raise ValueError("no segment has a piece_id: fine-tuning needs pieces to split train/holdout")
    train_pieces, _ = split_pieces(pieces, holdout_fraction, seed)
    keep = _keep_mask(metadata, train_pieces)
    styles = sorted(set(metadata.filter(keep).column("style").to_pylist()))
    if len(styles) < 2:
        raise ValueError(f"fine-tuning needs at least 2 styles among training pieces, found {styles}")
    return train_pieces, styles


def _keep_mask(table: pa.Table, train_pieces: list[str]) -> pa.Array:
    in_train = pc.is_in(table.column("piece_id"), value_set=pa.array(train_pieces, pa.string()))
    has_style = pc.not_equal(pc.fill_null(table.column("style"), ""), "")
    return pc.and_(pc.fill_null(in_train, False), has_style)


def _filter_training_rows(batch: pa.Table, train_pieces: list[str]) -> pa.Table:
    return batch.filter(_keep_mask(batch, train_pieces))


# -- driver --------------------------------------------------------------------------------
def run_finetune(cfg: MessRayConfig, storage: Storage) -> dict[str, Any]:
    """Contrastive fine-tuning on training pieces; publishes ``finetune/<run_name>``."""
    ft = cfg.finetune
    ingest_version = storage.require_latest("ingest")
    metadata = read_segment_table(storage, ingest_version, columns=["segment_id", "piece_id", "style"])
    train_pieces, styles = training_selection(metadata, cfg.eval.holdout_fraction, cfg.eval.seed)
    train_rows = int(pc.sum(_keep_mask(metadata, train_pieces).cast(pa.int64())).as_py() or 0)
    if train_rows < ft.batch_size * ft.num_workers:
        raise ValueError(f"{train_rows} labelled training segments cannot fill batch_size={ft.batch_size} "
                         f"on {ft.num_workers} workers")
    init = resolve_init(cfg, storage, ft.init_from)
    inputs = {"ingest": ingest_version, "init": {k: v for k, v in init.items() if k != "storage"}}
    if init["kind"] == "artifact":
        inputs["pretrain"] = init["version"]
    loop_config = {
        "init": init, "inputs": inputs, "styles": styles, "window_samples": window_samples(cfg),
        "loss": ft.loss, "temperature": ft.temperature, "learn_temperature": ft.learn_temperature,
        "margin": ft.margin,
        "embedding": {"embedding_dim": cfg.model.embedding_dim, "pooling": cfg.model.pooling,
                      "freeze_encoder": ft.freeze_encoder, "freeze_layers": ft.freeze_layers,
                      "sample_rate": cfg.audio.sample_rate},
    }
    dataset = (read_segments_ray(storage, ingest_version, columns=["audio", "style", "piece_id"])
               .map_batches(_filter_training_rows, fn_kwargs={"train_pieces": train_pieces},
                            batch_format="pyarrow", num_cpus=0.25)
               # Files hold one track or piece each: visit them in random order, and each
               # worker's local shuffle buffer (train.shuffle_buffer) mixes styles within batches.
               .randomize_block_order(seed=ft.seed))
    ft = with_run_name(cfg, "finetune", ft, inputs)
    result = fit(cfg, storage, FINETUNE_TASK, ft, dataset, loop_config)
    return finish(cfg, storage, FINETUNE_TASK, ft, result, loop_config,
                  counts={"train_segments": train_rows, "train_pieces": len(train_pieces), "styles": len(styles),
                          "segments": metadata.num_rows},
                  extra={"train_pieces": train_pieces, "styles": styles, "loss_type": ft.loss})
