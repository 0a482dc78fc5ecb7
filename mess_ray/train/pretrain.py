"""HuBERT/MERT-style self-supervised pretraining on Ray Train.

Targets: one FAISS k-means codebook (``pretrain.num_clusters`` codes) per target feature in
``pretrain.targets``, fitted once on the driver from a random sample of segments, all framed
with hop = the encoder's conv stride so there is one target per encoder frame:

- ``logmel``: standardised log-mel frames (nnAudio ``MelSpectrogram``), HuBERT's first iteration;
- ``mfcc``: the low cepstral coefficients of the log-mel frame, i.e. the smooth spectral envelope
  (timbre, brightness), largely independent of which pitches sound;
- ``dynamics``: per-frame level, level change, spectral flux and centroid (onsets, decays,
  accents: articulation and dynamics);
- ``chroma``: pitch-class energy from a constant-Q transform (MERT's musical target).

``mfcc``, ``dynamics`` and ``chroma`` are computed from the per-clip normalised waveform that the
encoder itself sees (a target that depends on the absolute level cannot be predicted from a
level-normalised input); ``logmel`` keeps the raw waveform (the original recipe).
Workers compute frames, assign each to its nearest centroid, mask spans of encoder frames
(``_compute_mask_indices``: ``mask_prob``, ``mask_length``), and train one linear head per
codebook over the encoder output to predict the masked frames' codes (cross-entropy on masked
frames only, averaged over codebooks, as MERT sums its teachers' losses).
SSL uses no labels, so every ingested segment is training data.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
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
from mess_ray.models.encoder import (
    conv_stride,
    encoder_config,
    encoder_input,
    normalize_waveform,
    num_frames,
)
from mess_ray.models.encoder import save_encoder as save_encoder_folder
from mess_ray.segments import read_segments_ray, segments_dataset, split_pieces, window_samples
from mess_ray.splits import pianist_holdout, read_pretrain_audio, read_track_pianists
from mess_ray.storage import Storage
from mess_ray.train.augment import chain_views
from mess_ray.train.common import (
    TrainTask,
    decode_audio_column,
    finish,
    finished_run,
    fit,
    load_init_encoder,
    resolve_init,
    with_run_name,
)
from mess_ray.train.targets import drop_excluded

log = logging.getLogger(__name__)
CODEBOOK_FILE = (
    "kmeans_codebook.npz"  # the logmel codebook; other targets: kmeans_codebook_<target>.npz
)
TARGET_KINDS = ("logmel", "mfcc", "dynamics", "chroma")
N_MFCC = 13
CHROMA_FMIN_HZ = 32.70  # C1
CHROMA_OCTAVES = 7


# -- targets -------------------------------------------------------------------------------
class LogMelFrames(nn.Module):
    """Waveform [B, T] -> log-mel frames [B, frames, n_mels], one frame per ``hop`` samples."""

    def __init__(self, sample_rate: int, hop: int, n_mels: int) -> None:
        super().__init__()
        n_fft = 1 << max(8, (2 * hop - 1).bit_length())  # power of two covering two hops
        self.mel = MelSpectrogram(
            sr=sample_rate,
            n_fft=n_fft,
            n_mels=n_mels,
            hop_length=hop,
            fmax=sample_rate / 2,
            trainable_mel=False,
            trainable_STFT=False,
            verbose=False,
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.log(self.mel(waveform.float()) + 1e-6).transpose(1, 2)


class MfccFrames(nn.Module):
    """Waveform -> the first ``N_MFCC`` cepstral coefficients of each log-mel frame [B, frames, 13].

    An orthonormal DCT-II of the log-mel bands: the low coefficients describe the spectral
    envelope (timbre, brightness) and mostly ignore which pitches sound.
    """

    def __init__(self, sample_rate: int, hop: int, n_mels: int) -> None:
        super().__init__()
        if n_mels < N_MFCC:
            raise ValueError(f"mfcc targets need n_mels >= {N_MFCC}, got {n_mels}")
        self.logmel = LogMelFrames(sample_rate, hop, n_mels)
        bands = torch.arange(n_mels, dtype=torch.float64)
        basis = torch.cos(
            math.pi
            / n_mels
            * (bands[None, :] + 0.5)
            * torch.arange(N_MFCC, dtype=torch.float64)[:, None]
        )
        basis[0] /= math.sqrt(2.0)
        self.register_buffer(
            "dct", (basis * math.sqrt(2.0 / n_mels)).float().T.contiguous(), persistent=False
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.logmel(waveform) @ self.dct


class DynamicsFrames(nn.Module):
    """Waveform -> [level, level change, spectral flux, spectral centroid, centroid change] per frame.

    Level is the log of the mean mel energy; flux sums the positive log-mel increases (onsets);
    the centroid is the energy-weighted mean mel band (brightness). Changes are differences
    to the previous frame (zero for the first), so note attacks, decays and accents show.
    """

    def __init__(self, sample_rate: int, hop: int, n_mels: int) -> None:
        super().__init__()
        n_fft = 1 << max(8, (2 * hop - 1).bit_length())
        self.mel = MelSpectrogram(
            sr=sample_rate,
            n_fft=n_fft,
            n_mels=n_mels,
            hop_length=hop,
            fmax=sample_rate / 2,
            trainable_mel=False,
            trainable_STFT=False,
            verbose=False,
        )
        self.register_buffer(
            "bands",
            torch.arange(n_mels, dtype=torch.float32) / max(1, n_mels - 1),
            persistent=False,
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        power = self.mel(waveform.float()).transpose(1, 2)  # [B, frames, n_mels]
        logmel = torch.log(power + 1e-6)
        level = torch.log(power.mean(dim=-1) + 1e-6)
        centroid = (power * self.bands).sum(dim=-1) / (power.sum(dim=-1) + 1e-6)
        flux = F.pad(torch.relu(logmel[:, 1:] - logmel[:, :-1]).mean(dim=-1), (1, 0))
        return torch.stack(
            [level, _frame_delta(level), flux, centroid, _frame_delta(centroid)], dim=-1
        )


class ChromaFrames(nn.Module):
    """Waveform -> 12 pitch-class energies per frame from a constant-Q transform (log, L1-normalised)."""

    def __init__(self, sample_rate: int, hop: int) -> None:
        super().__init__()
        from nnAudio.features import CQT1992v2

        octaves = CHROMA_OCTAVES
        while octaves > 1 and CHROMA_FMIN_HZ * 2**octaves > sample_rate / 2:
            octaves -= 1
        self.octaves = octaves
        self.cqt = CQT1992v2(
            sr=sample_rate,
            hop_length=hop,
            fmin=CHROMA_FMIN_HZ,
            n_bins=12 * octaves,
            bins_per_octave=12,
            verbose=False,
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        magnitude = self.cqt(waveform.float())  # [B, 12 * octaves, frames]
        pitch_class = magnitude.reshape(magnitude.shape[0], self.octaves, 12, -1).sum(dim=1)
        chroma = torch.log1p(100.0 * pitch_class).transpose(1, 2)  # [B, frames, 12]
        return chroma / (chroma.sum(dim=-1, keepdim=True) + 1e-6)


def _frame_delta(x: torch.Tensor) -> torch.Tensor:
    """x[t] - x[t-1] along dim 1, zero for the first frame."""
    return F.pad(x[:, 1:] - x[:, :-1], (1, 0))


class TargetFeatures(nn.Module):
    """The frame features of one target kind, on the waveform that kind is defined on."""

    def __init__(self, kind: str, sample_rate: int, hop: int, n_mels: int) -> None:
        super().__init__()
        if kind not in TARGET_KINDS:
            raise ValueError(f"unknown pretraining target {kind!r}; choose from {TARGET_KINDS}")
        self.kind = kind
        if kind == "logmel":
            self.extract = LogMelFrames(sample_rate, hop, n_mels)
        elif kind == "mfcc":
            self.extract = MfccFrames(sample_rate, hop, n_mels)
        elif kind == "dynamics":
            self.extract = DynamicsFrames(sample_rate, hop, n_mels)
        else:
            self.extract = ChromaFrames(sample_rate, hop)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        # logmel keeps the raw waveform (the original recipe); the others see what the encoder sees.
        return self.extract(waveform if self.kind == "logmel" else normalize_waveform(waveform))


def codebook_file(kind: str) -> str:
    return CODEBOOK_FILE if kind == "logmel" else f"kmeans_codebook_{kind}.npz"


def fit_codebook(
    frames: np.ndarray, num_clusters: int, iterations: int = 20, seed: int = 0
) -> dict[str, np.ndarray]:
    """FAISS k-means over standardised frames [N, D]; returns centroids and the standardisation."""
    import faiss

    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 2 or len(frames) < num_clusters:
        raise ValueError(
            f"k-means needs at least num_clusters={num_clusters} frames, got shape {frames.shape}"
        )
    mean, std = frames.mean(axis=0), frames.std(axis=0) + 1e-5
    standard = np.ascontiguousarray((frames - mean) / std, dtype=np.float32)
    kmeans = faiss.Kmeans(
        standard.shape[1], num_clusters, niter=iterations, seed=seed, verbose=False
    )
    kmeans.train(standard)
    return {
        "centroids": kmeans.centroids.astype(np.float32),
        "mean": mean.astype(np.float32),
        "std": std.astype(np.float32),
    }


def assign_targets(
    frames: torch.Tensor, centroids: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Nearest centroid per frame: [B, T, D] -> [B, T] cluster ids."""
    standard = (frames - mean) / std
    flat = standard.reshape(-1, standard.shape[-1])
    return torch.cdist(flat, centroids).argmin(dim=-1).reshape(frames.shape[:-1])


def align_targets(targets: torch.Tensor, encoder_frames: int) -> torch.Tensor:
    """Crop frame targets to the encoder's frame count (the mel has one extra centred frame)."""
    if targets.shape[1] < encoder_frames:
        raise ValueError(
            f"{targets.shape[1]} target frames for {encoder_frames} encoder frames: "
            "feature hop does not match the encoder stride"
        )
    return targets[:, :encoder_frames]


def span_mask(batch_size: int, frames: int, mask_prob: float, mask_length: int) -> torch.Tensor:
    """Boolean [B, frames] spans to mask (HuBERT's sampler, at least 2 spans per row)."""
    if frames <= mask_length:
        raise ValueError(
            f"mask_length={mask_length} must be shorter than the {frames} encoder frames "
            "of a window: lengthen audio.window_s or shorten pretrain.mask_length"
        )
    mask = _compute_mask_indices(
        (batch_size, frames), mask_prob=mask_prob, mask_length=mask_length, min_masks=2
    )
    return torch.from_numpy(mask)


def masked_prediction_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Cross-entropy on masked frames only; also returns the masked-frame accuracy.

    One codebook: logits [B, T, K], targets [B, T]. Several: logits [H, B, T, K] and targets
    [H, B, T]; the loss and accuracy are averaged over the H codebooks.
    """
    if not mask.any():
        raise ValueError("no frame is masked: mask_prob too small for the window")
    if logits.dim() == 3:
        logits, targets = logits[None], targets[None]
    if logits.shape[:-1] != targets.shape or targets.shape[1:] != mask.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)} and mask "
            f"{tuple(mask.shape)} do not line up"
        )
    chosen_logits, chosen_targets = logits[:, mask], targets[:, mask]  # [H, M, K], [H, M]
    loss = F.cross_entropy(chosen_logits.flatten(0, 1).float(), chosen_targets.flatten())
    accuracy = float((chosen_logits.argmax(dim=-1) == chosen_targets).float().mean())
    return loss, accuracy


class Codebook(nn.Module):
    """One target kind: its frame features and k-means codebook (centroids + standardisation)."""

    def __init__(
        self, kind: str, codebook: dict[str, np.ndarray], sample_rate: int, hop: int, n_mels: int
    ) -> None:
        super().__init__()
        self.features = TargetFeatures(kind, sample_rate, hop, n_mels)
        # Copies: the arrays arrive read-only (unpickled from the object store).
        for name in ("centroids", "mean", "std"):
            self.register_buffer(name, torch.tensor(np.asarray(codebook[name], dtype=np.float32)))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return assign_targets(self.features(waveform), self.centroids, self.mean, self.std)


class HubertPretrainModel(nn.Module):
    """Encoder + one linear head per codebook; computes its own targets and masks from the waveform.

    ``codebooks``: {target kind: codebook} (one codebook dict alone means {"logmel": it}); all
    must have the same number of codes. With one codebook ``forward`` returns logits [B, T, K]
    and targets [B, T]; with H of them [H, B, T, K] and [H, B, T].
    """

    def __init__(
        self,
        encoder: nn.Module,
        codebooks: dict,
        sample_rate: int,
        n_mels: int,
        mask_prob: float,
        mask_length: int,
    ) -> None:
        super().__init__()
        if not hasattr(encoder, "masked_spec_embed"):
            raise ValueError(
                "this encoder has no mask embedding (its config has mask_time_prob=0): "
                "it cannot be pretrained with masked prediction"
            )
        if "centroids" in codebooks:
            codebooks = {"logmel": codebooks}
        if not codebooks:
            raise ValueError("pretraining needs at least one target codebook")
        sizes = {kind: int(np.shape(book["centroids"])[0]) for kind, book in codebooks.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"codebooks must have the same number of codes, got {sizes}")
        check_pretrain_rate(encoder, sample_rate)
        self.encoder = encoder
        self.sample_rate = int(sample_rate)
        hop = conv_stride(encoder)
        self.codebooks = nn.ModuleDict(
            {
                kind: Codebook(kind, book, sample_rate, hop, n_mels)
                for kind, book in codebooks.items()
            }
        )
        num_codes = next(iter(sizes.values()))
        self.heads = nn.ModuleDict(
            {kind: nn.Linear(int(encoder.config.hidden_size), num_codes) for kind in codebooks}
        )
        self.mask_prob, self.mask_length = mask_prob, mask_length

    def forward(
        self, waveform: torch.Tensor, clean: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``clean``: the audio the targets come from when ``waveform`` is an augmented view of
        it (the encoder must predict the clean recording's codes through the chain)."""
        frames = num_frames(self.encoder, waveform.shape[1])
        source = waveform if clean is None else clean
        if source.shape != waveform.shape:
            raise ValueError("clean and augmented audio disagree on their shape")
        # Targets in float32 even under bf16 autocast: they must match the driver's codebook.
        with torch.no_grad(), torch.autocast(device_type=waveform.device.type, enabled=False):
            targets = torch.stack(
                [align_targets(book(source), frames) for book in self.codebooks.values()]
            )
        mask = span_mask(waveform.shape[0], frames, self.mask_prob, self.mask_length).to(
            waveform.device
        )
        encoder_in = encoder_input(self.encoder).prepare(waveform, self.sample_rate)
        hidden = self.encoder(encoder_in, mask_time_indices=mask).last_hidden_state
        logits = torch.stack([head(hidden) for head in self.heads.values()])
        if len(self.heads) == 1:
            return logits[0], targets[0], mask
        return logits, targets, mask


def check_pretrain_rate(encoder: nn.Module, sample_rate: int) -> None:
    """Masked prediction aligns targets (computed at ``sample_rate``) frame by frame with the
    encoder's frames: a published encoder trained at another rate cannot be pretrained here."""
    rate = encoder_input(encoder).rate(sample_rate)
    if rate != int(sample_rate):
        raise ValueError(
            f"the encoder hears {rate} Hz audio (its preprocessor_config.json) but "
            f"audio.sample_rate is {sample_rate}: set audio.sample_rate: {rate} to continue "
            "pretraining it (fine-tuning resamples on its own)"
        )


# -- task ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainLoop:
    """The pretraining loop's settings, built once on the driver and shipped to every worker."""

    init: dict[str, Any]  # train.common.resolve_init
    inputs: dict[str, Any]  # recorded; a resume must match them
    codebooks: dict[str, Any]  # target kind -> Codebook
    sample_rate: int
    n_mels: int
    mask_prob: float
    mask_length: int
    window_samples: int
    chain_augment_prob: float = 0.0  # pretrain.chain_augment_prob
    chain_pool: int = 8
    seed: int = 0


def build_pretrain_model(loop: PretrainLoop) -> nn.Module:
    return HubertPretrainModel(
        load_init_encoder(loop.init),
        loop.codebooks,
        loop.sample_rate,
        loop.n_mels,
        loop.mask_prob,
        loop.mask_length,
    )


def collate_audio(batch: dict, loop: PretrainLoop) -> dict[str, torch.Tensor]:
    """Decoded audio; with chain augmentation, the encoder's input is the audio recorded through
    training-side chains (some rows) and the targets come from the clean audio (``clean``)."""
    audio = decode_audio_column(batch["audio"], loop.window_samples)
    if loop.chain_augment_prob <= 0:
        return {"audio": audio}
    # Seeded from the batch's content, so a resumed run sees the same views.
    digest = zlib.crc32(b"".join(bytes(blob)[:64] for blob in batch["audio"]))
    generator = torch.Generator().manual_seed(digest + loop.seed)
    augmented = chain_views(
        audio, loop.sample_rate, loop.chain_augment_prob, loop.chain_pool, generator
    )
    return {"audio": augmented, "clean": audio}


def pretrain_loss(
    model: nn.Module, batch: dict, loop: PretrainLoop
) -> tuple[torch.Tensor, dict[str, float]]:
    logits, targets, mask = model(batch["audio"], batch.get("clean"))
    loss, accuracy = masked_prediction_loss(logits, targets, mask)
    return loss, {"masked_accuracy": accuracy, "masked_fraction": float(mask.float().mean())}


def save_encoder(model: nn.Module, folder: Path, loop: PretrainLoop) -> None:
    save_encoder_folder(model.encoder, folder)
    # The codebooks the targets came from (inspection, or continuing pretraining elsewhere).
    for kind, book in model.codebooks.items():
        np.savez(
            folder / codebook_file(kind),
            centroids=book.centroids.numpy(),
            mean=book.mean.numpy(),
            std=book.std.numpy(),
        )


PRETRAIN_TASK = TrainTask(
    stage="pretrain",
    build_model=build_pretrain_model,
    collate=collate_audio,
    loss=pretrain_loss,
    save_model=save_encoder,
)


# -- driver --------------------------------------------------------------------------------
def excluded_pieces(cfg: MessRayConfig, storage: Storage, version: str) -> list[str]:
    """Pieces pretraining must not see: the evaluation hold-out when ``exclude_eval_holdout``."""
    if not cfg.pretrain.exclude_eval_holdout:
        return []
    pieces = [
        p
        for p in segments_dataset(storage, version)
        .to_table(columns=["piece_id"])
        .column("piece_id")
        .unique()
        .to_pylist()
        if p
    ]
    _, held_out = split_pieces(pieces, cfg.eval.holdout_fraction, cfg.eval.seed)
    return held_out


def sample_frames(
    cfg: MessRayConfig,
    storage: Storage,
    version: str,
    hop: int,
    exclude: list[str] = (),
    exclude_tracks: list[str] = (),
) -> dict[str, np.ndarray]:
    """{target kind: frames [N, D]} from randomly chosen segments (none of the ``exclude``
    pieces or ``exclude_tracks``), about ``kmeans_sample_frames`` each."""
    dataset = segments_dataset(storage, version)
    ids = dataset.to_table(columns=["piece_id", "track_id"])
    piece_ids = np.asarray(ids.column("piece_id").to_pylist(), dtype=object)
    track_ids = np.asarray(ids.column("track_id").to_pylist(), dtype=object)
    keep = np.ones(len(piece_ids), dtype=bool)
    if len(exclude):
        keep &= ~np.isin(piece_ids, list(exclude))
    if len(exclude_tracks):
        keep &= ~np.isin(track_ids, list(exclude_tracks))
    eligible = np.flatnonzero(keep)
    if len(eligible) == 0:
        raise ValueError(
            f"ingest artifact {version} has no segments to pretrain on"
            + (f" outside the excluded pieces {list(exclude)}" if len(exclude) else "")
            + (" and the test-side pianists' tracks" if len(exclude_tracks) else "")
        )
    window = window_samples(cfg.audio.window_s, cfg.audio.sample_rate)
    frames_per_segment = max(1, window // hop)
    wanted = min(len(eligible), -(-cfg.pretrain.kmeans_sample_frames // frames_per_segment))
    rng = np.random.default_rng(cfg.pretrain.seed)
    rows = np.sort(rng.choice(eligible, size=wanted, replace=False))
    audio = dataset.take(rows, columns=["audio"]).column("audio").to_pylist()
    extractors = {
        kind: TargetFeatures(kind, cfg.audio.sample_rate, hop, cfg.pretrain.n_mels)
        for kind in cfg.pretrain.targets
    }
    chunks: dict[str, list[np.ndarray]] = {kind: [] for kind in extractors}
    with torch.inference_mode():
        for start in tqdm(range(0, len(audio), 32), desc="k-means features", unit="batch"):
            waveform = decode_audio_column(audio[start : start + 32], window)
            for kind, extractor in extractors.items():
                features = extractor(waveform)
                chunks[kind].append(features.reshape(-1, features.shape[-1]).numpy())
    sampled = {}
    for kind, parts in chunks.items():
        frames = np.concatenate(parts)
        if len(frames) > cfg.pretrain.kmeans_sample_frames:
            # Same rows for every kind: the codebooks describe the same moments of audio.
            keep = np.random.default_rng(cfg.pretrain.seed).choice(
                len(frames), cfg.pretrain.kmeans_sample_frames, replace=False
            )
            frames = frames[keep]
        sampled[kind] = frames
    return sampled


def run_pretrain(cfg: MessRayConfig, storage: Storage) -> dict[str, Any]:
    """Fit the k-means codebooks, pretrain on every segment (but those of excluded pieces),
    publish ``pretrain/<run_name>``."""
    ingest_version = storage.require_latest("ingest")
    init = resolve_init(cfg, storage, "pretrained" if cfg.model.pretrained else "random")
    # Targets need one frame per encoder frame: the feature hop is the encoder's conv stride.
    if init["kind"] == "random":
        hop = int(np.prod(encoder_config(init["size"]).conv_stride))
    else:
        encoder = load_init_encoder(init)
        check_pretrain_rate(encoder, cfg.audio.sample_rate)  # fail before fitting codebooks
        hop = conv_stride(encoder)
    exclude = excluded_pieces(cfg, storage, ingest_version)
    tracks = read_track_pianists(storage, ingest_version)
    holdout = pianist_holdout(tracks, cfg.eval.test_pianist_fraction, cfg.eval.seed)
    audio = read_pretrain_audio(
        storage,
        ingest_version,
        cfg.pretrain.audio_fraction,
        cfg.pretrain.seed,
        exclude,
        holdout.tracks,
    )
    left_out = [*holdout.tracks, *audio.left_out_tracks]
    unheard = set(audio.left_out_tracks)
    inputs = {"ingest": ingest_version, "init": {k: v for k, v in init.items() if k != "storage"}}
    if exclude:
        inputs["excluded_pieces"] = exclude
    if holdout.tracks:
        inputs["excluded_tracks"] = list(holdout.tracks)
    if audio.left_out_tracks:
        inputs["audio_fraction"] = {
            "fraction": audio.fraction,
            "seed": cfg.pretrain.seed,
            "left_out_tracks": list(audio.left_out_tracks),
        }
    tcfg = with_run_name(cfg, "pretrain", cfg.pretrain, inputs)
    done = finished_run(cfg, storage, "pretrain", tcfg, inputs)
    if done is not None:
        return done
    frames = sample_frames(cfg, storage, ingest_version, hop, exclude, left_out)
    codebooks = {
        kind: fit_codebook(
            x, cfg.pretrain.num_clusters, cfg.pretrain.kmeans_iterations, cfg.pretrain.seed
        )
        for kind, x in frames.items()
    }
    log.info(
        "k-means codebooks: %s, %d clusters each over %d frames",
        list(codebooks),
        cfg.pretrain.num_clusters,
        len(next(iter(frames.values()))),
    )
    loop = PretrainLoop(
        init=init,
        inputs=inputs,
        codebooks=codebooks,
        sample_rate=cfg.audio.sample_rate,
        n_mels=cfg.pretrain.n_mels,
        mask_prob=cfg.pretrain.mask_prob,
        mask_length=cfg.pretrain.mask_length,
        window_samples=window_samples(cfg.audio.window_s, cfg.audio.sample_rate),
        chain_augment_prob=cfg.pretrain.chain_augment_prob,
        chain_pool=cfg.pretrain.chain_pool,
        seed=cfg.pretrain.seed,
    )
    if exclude or left_out:
        dataset = read_segments_ray(
            storage, ingest_version, columns=["audio", "piece_id", "track_id"]
        ).map_batches(
            drop_excluded,
            fn_kwargs={"pieces": exclude, "tracks": left_out},
            batch_format="pyarrow",
            num_cpus=0.25,
        )
    else:
        dataset = read_segments_ray(storage, ingest_version, columns=["audio"])
    dataset = dataset.randomize_block_order(seed=cfg.pretrain.seed)
    result = fit(cfg, storage, PRETRAIN_TASK, tcfg, dataset, loop)
    return finish(
        cfg,
        storage,
        PRETRAIN_TASK,
        tcfg,
        result,
        loop,
        counts={
            "kmeans_frames": int(len(next(iter(frames.values())))),
            "num_clusters": cfg.pretrain.num_clusters,
            "targets": list(codebooks),
            "segments": int(segments_dataset(storage, ingest_version).count_rows()),
            "excluded_pieces": len(exclude),
            "excluded_tracks": len(holdout.tracks),
            # The audio this run actually heard (learning curves read it here).
            **audio.counts(),
        },
        # Which pianists this encoder heard (the protocol's unseen-pianist rows read it here).
        extra={
            "pianists": holdout.record(
                {t: v for t, v in tracks.items() if t not in unheard},
                {piece for piece, _ in tracks.values()} - set(exclude),
            )
        },
    )
