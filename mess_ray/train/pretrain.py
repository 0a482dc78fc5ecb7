"""HuBERT-style self-supervised pretraining on Ray Train.

Targets: a FAISS k-means codebook (``pretrain.num_clusters``) over standardised log-mel frames
(nnAudio ``MelSpectrogram`` with hop = the encoder's conv stride, so there is one target per
encoder frame), fitted once on the driver from a random sample of segments. Workers compute
frames, assign each to its nearest centroid, mask spans of encoder frames
(``_compute_mask_indices``: ``mask_prob``, ``mask_length``), and train a linear head over the
encoder output to predict the masked frames' clusters (cross-entropy on masked frames only).
SSL uses no labels, so every ingested segment is training data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from nnAudio.features import MelSpectrogram
from torch import nn
from tqdm import tqdm
from transformers.models.hubert.modeling_hubert import _compute_mask_indices

from mess_ray.config import MessRayConfig
from mess_ray.models.encoder import conv_stride, encoder_config, normalize_waveform, num_frames
from mess_ray.segments import read_segments_ray, segments_dataset
from mess_ray.storage import Storage
from mess_ray.train.common import (TrainTask, with_run_name, decode_audio_column, finish, fit, load_init_encoder, resolve_init,
                                   window_samples)

log = logging.getLogger(__name__)
CODEBOOK_FILE = "kmeans_codebook.npz"


# -- targets -------------------------------------------------------------------------------
class LogMelFrames(nn.Module):
    """Waveform [B, T] -> log-mel frames [B, frames, n_mels], one frame per ``hop`` samples."""

    def __init__(self, sample_rate: int, hop: int, n_mels: int) -> None:
        super().__init__()
        n_fft = 1 << max(8, (2 * hop - 1).bit_length())  # power of two covering two hops
        self.mel = MelSpectrogram(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, hop_length=hop,
                                  fmax=sample_rate / 2, trainable_mel=False, trainable_STFT=False,
                                  verbose=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.log(self.mel(waveform.float()) + 1e-6).transpose(1, 2)


def fit_codebook(frames: np.ndarray, num_clusters: int, iterations: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """FAISS k-means over standardised frames [N, D]; returns centroids and the standardisation."""
    import faiss

    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 2 or len(frames) < num_clusters:
        raise ValueError(f"k-means needs at least num_clusters={num_clusters} frames, got shape {frames.shape}")
    mean, std = frames.mean(axis=0), frames.std(axis=0) + 1e-5
    standard = np.ascontiguousarray((frames - mean) / std, dtype=np.float32)
    kmeans = faiss.Kmeans(standard.shape[1], num_clusters, niter=iterations, seed=seed, verbose=False)
    kmeans.train(standard)
    return {"centroids": kmeans.centroids.astype(np.float32), "mean": mean.astype(np.float32),
            "std": std.astype(np.float32)}


def assign_targets(frames: torch.Tensor, centroids: torch.Tensor, mean: torch.Tensor,
                   std: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per frame: [B, T, D] -> [B, T] cluster ids."""
    standard = (frames - mean) / std
    flat = standard.reshape(-1, standard.shape[-1])
    return torch.cdist(flat, centroids).argmin(dim=-1).reshape(frames.shape[:-1])


def align_targets(targets: torch.Tensor, encoder_frames: int) -> torch.Tensor:
    """Crop frame targets to the encoder's frame count (the mel has one extra centred frame)."""
    if targets.shape[1] < encoder_frames:
        raise ValueError(f"{targets.shape[1]} target frames for {encoder_frames} encoder frames: "
                         "feature hop does not match the encoder stride")
    return targets[:, :encoder_frames]


def span_mask(batch_size: int, frames: int, mask_prob: float, mask_length: int) -> torch.Tensor:
    """Boolean [B, frames] spans to mask (HuBERT's sampler, at least 2 spans per row)."""
    if frames <= mask_length:
        raise ValueError(f"mask_length={mask_length} must be shorter than the {frames} encoder frames "
                         "of a window: lengthen audio.window_s or shorten pretrain.mask_length")
    mask = _compute_mask_indices((batch_size, frames), mask_prob=mask_prob, mask_length=mask_length, min_masks=2)
    return torch.from_numpy(mask)


def masked_prediction_loss(logits: torch.Tensor, targets: torch.Tensor,
                           mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy on masked frames only; also returns the masked-frame accuracy."""
    if not mask.any():
        raise ValueError("no frame is masked: mask_prob too small for the window")
    chosen_logits, chosen_targets = logits[mask], targets[mask]
    loss = F.cross_entropy(chosen_logits.float(), chosen_targets)
    accuracy = float((chosen_logits.argmax(dim=-1) == chosen_targets).float().mean())
    return loss, accuracy


class HubertPretrainModel(nn.Module):
    """Encoder + linear cluster head; computes its own targets and masks from the waveform."""

    def __init__(self, encoder: nn.Module, codebook: dict[str, np.ndarray], sample_rate: int, n_mels: int,
                 mask_prob: float, mask_length: int) -> None:
        super().__init__()
        if not hasattr(encoder, "masked_spec_embed"):
            raise ValueError("this encoder has no mask embedding (its config has mask_time_prob=0): "
                             "it cannot be pretrained with masked prediction")
        self.encoder = encoder
        self.features = LogMelFrames(sample_rate, conv_stride(encoder), n_mels)
        self.register_buffer("centroids", torch.as_tensor(codebook["centroids"]))
        self.register_buffer("mean", torch.as_tensor(codebook["mean"]))
        self.register_buffer("std", torch.as_tensor(codebook["std"]))
        self.head = nn.Linear(int(encoder.config.hidden_size), int(self.centroids.shape[0]))
        self.mask_prob, self.mask_length = mask_prob, mask_length

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frames = num_frames(self.encoder, waveform.shape[1])
        # Targets in float32 even under bf16 autocast: they must match the driver's codebook.
        with torch.no_grad(), torch.autocast(device_type=waveform.device.type, enabled=False):
            codes = assign_targets(self.features(waveform), self.centroids, self.mean, self.std)
        targets = align_targets(codes, frames)
        mask = span_mask(waveform.shape[0], frames, self.mask_prob, self.mask_length).to(waveform.device)
        hidden = self.encoder(normalize_waveform(waveform), mask_time_indices=mask).last_hidden_state
        return self.head(hidden), targets, mask


# -- task ----------------------------------------------------------------------------------
def build_pretrain_model(loop_config: dict) -> nn.Module:
    return HubertPretrainModel(load_init_encoder(loop_config["init"]), loop_config["codebook"],
                               loop_config["sample_rate"], loop_config["n_mels"],
                               loop_config["mask_prob"], loop_config["mask_length"])


def collate_audio(batch: dict, loop_config: dict) -> dict[str, torch.Tensor]:
    return {"audio": decode_audio_column(batch["audio"], loop_config["window_samples"])}


def pretrain_loss(model: nn.Module, batch: dict, loop_config: dict) -> tuple[torch.Tensor, dict[str, float]]:
    logits, targets, mask = model(batch["audio"])
    loss, accuracy = masked_prediction_loss(logits, targets, mask)
    return loss, {"masked_accuracy": accuracy, "masked_fraction": float(mask.float().mean())}


def save_encoder(model: nn.Module, folder: Path, loop_config: dict) -> None:
    model.encoder.save_pretrained(folder)
    # The codebook the targets came from (inspection, or continuing pretraining elsewhere).
    np.savez(folder / CODEBOOK_FILE, centroids=model.centroids.numpy(), mean=model.mean.numpy(),
             std=model.std.numpy())


PRETRAIN_TASK = TrainTask(stage="pretrain", build_model=build_pretrain_model, collate=collate_audio,
                          loss=pretrain_loss, save_model=save_encoder)


# -- driver --------------------------------------------------------------------------------
def sample_frames(cfg: MessRayConfig, storage: Storage, version: str, hop: int) -> np.ndarray:
    """Log-mel frames from randomly chosen segments, about ``kmeans_sample_frames`` of them."""
    dataset = segments_dataset(storage, version)
    total = dataset.count_rows()
    if total == 0:
        raise ValueError(f"ingest artifact {version} has no segments")
    window = window_samples(cfg)
    frames_per_segment = max(1, window // hop)
    wanted = min(total, -(-cfg.pretrain.kmeans_sample_frames // frames_per_segment))
    rng = np.random.default_rng(cfg.pretrain.seed)
    rows = np.sort(rng.choice(total, size=wanted, replace=False))
    audio = dataset.take(rows, columns=["audio"]).column("audio").to_pylist()
    extractor = LogMelFrames(cfg.audio.sample_rate, hop, cfg.pretrain.n_mels)
    chunks = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(audio), 32), desc="k-means features", unit="batch"):
            waveform = decode_audio_column(audio[start:start + 32], window)
            chunks.append(extractor(waveform).reshape(-1, cfg.pretrain.n_mels).numpy())
    frames = np.concatenate(chunks)
    if len(frames) > cfg.pretrain.kmeans_sample_frames:
        frames = frames[rng.choice(len(frames), cfg.pretrain.kmeans_sample_frames, replace=False)]
    return frames


def run_pretrain(cfg: MessRayConfig, storage: Storage) -> dict[str, Any]:
    """Fit the k-means codebook, pretrain on every segment, publish ``pretrain/<run_name>``."""
    ingest_version = storage.require_latest("ingest")
    init = resolve_init(cfg, storage, "pretrained" if cfg.model.pretrained else "random")
    # Targets need one frame per encoder frame: the mel hop is the encoder's conv stride.
    hop = (int(np.prod(encoder_config(init["size"]).conv_stride)) if init["kind"] == "random"
           else conv_stride(load_init_encoder(init)))
    frames = sample_frames(cfg, storage, ingest_version, hop)
    codebook = fit_codebook(frames, cfg.pretrain.num_clusters, cfg.pretrain.kmeans_iterations, cfg.pretrain.seed)
    log.info("k-means codebook: %d clusters over %d log-mel frames", cfg.pretrain.num_clusters, len(frames))
    inputs = {"ingest": ingest_version, "init": {k: v for k, v in init.items() if k != "storage"}}
    loop_config = {"init": init, "inputs": inputs, "codebook": codebook, "sample_rate": cfg.audio.sample_rate,
                   "n_mels": cfg.pretrain.n_mels, "mask_prob": cfg.pretrain.mask_prob,
                   "mask_length": cfg.pretrain.mask_length, "window_samples": window_samples(cfg)}
    dataset = (read_segments_ray(storage, ingest_version, columns=["audio"])
               .randomize_block_order(seed=cfg.pretrain.seed))
    tcfg = with_run_name(cfg, "pretrain", cfg.pretrain, inputs)
    result = fit(cfg, storage, PRETRAIN_TASK, tcfg, dataset, loop_config)
    return finish(cfg, storage, PRETRAIN_TASK, tcfg, result, loop_config,
                  counts={"kmeans_frames": int(len(frames)), "num_clusters": cfg.pretrain.num_clusters,
                          "segments": int(segments_dataset(storage, ingest_version).count_rows())})
