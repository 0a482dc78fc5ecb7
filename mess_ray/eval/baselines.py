"""Baselines every model meets on every task of the protocol (:mod:`mess_ray.eval.protocol`).

* ``chroma``: CQT chroma (librosa) per frame, summarised by mean and standard deviation per
  pitch class: *what* is played (content), blind to how;
* ``mfcc``: MFCC (librosa, on a log-mel spectrogram) mean and standard deviation: timbre and
  level, the recording chain's fingerprint;
* ``descriptors``: the hand-crafted expressive descriptors (:mod:`mess_ray.descriptors`);
* ``descriptor_head``: a small MLP on those descriptors trained on the training pieces with the
  fine-tuning losses (:func:`train_descriptor_head`), so a learned model's win over the
  descriptors is not just "learning a metric";
* ``chance``: i.i.d. Gaussian vectors (a random ranking: the chance level of every metric).

Feature baselines are z-scored over the evaluated set (every dimension weighs the same).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

CHROMA, MFCC, DESCRIPTORS, DESCRIPTOR_HEAD, CHANCE = (
    "chroma",
    "mfcc",
    "descriptors",
    "descriptor_head",
    "chance",
)
N_MFCC = 20


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    return ((x - x.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)).astype(np.float32)


def _check_audio(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 2 or audio.shape[0] == 0:
        raise ValueError(f"audio must be [segments, samples] with segments > 0, got {audio.shape}")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or infinite samples")
    return audio


def chroma_statistics(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """[N, 24]: mean and std of each CQT-chroma pitch class over a segment's frames."""
    import librosa

    audio = _check_audio(audio)
    rows = []
    for x in audio:
        chroma = librosa.feature.chroma_cqt(y=x, sr=sample_rate, hop_length=2048)
        rows.append(np.concatenate([chroma.mean(axis=1), chroma.std(axis=1)]))
    return np.asarray(rows, dtype=np.float64)


def mfcc_statistics(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """[N, 2 * N_MFCC]: mean and std of MFCCs (64-band log-mel) over a segment's frames."""
    import librosa

    audio = _check_audio(audio)
    rows = []
    for x in audio:
        mfcc = librosa.feature.mfcc(
            y=x, sr=sample_rate, n_mfcc=N_MFCC, n_mels=64, n_fft=1024, hop_length=512
        )
        rows.append(np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)]))
    return np.asarray(rows, dtype=np.float64)


def feature_embeddings(name: str, audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """A content/timbre baseline's vectors, z-scored over the given segments."""
    if name == CHROMA:
        return _zscore(chroma_statistics(audio, sample_rate))
    if name == MFCC:
        return _zscore(mfcc_statistics(audio, sample_rate))
    raise ValueError(f"unknown feature baseline {name!r}")


def chance_embeddings(n: int, seed: int, dim: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


# -- the learned descriptor head ----------------------------------------------------------------
def train_descriptor_head(
    descriptors_z: np.ndarray,
    piece_ids: np.ndarray,
    midi_targets: np.ndarray | None,
    *,
    steps: int = 300,
    batch_size: int = 64,
    hidden: int = 64,
    dim: int = 32,
    lr: float = 3e-3,
    temperature: float = 0.1,
    mine_clusters: int = 8,
    midi_weight: float = 1.0,
    facet_temperature: float = 0.1,
    midi_target_temperature: float = 0.5,
    seed: int = 0,
):
    """An MLP (descriptors -> ``dim``) trained on training-piece segments with fine-tuning's own
    losses (imported from :mod:`mess_ray.train.finetune`): multi-positive InfoNCE on labels mined
    by descriptor k-means (positives only across pieces) plus, where performed-MIDI descriptors
    exist, the soft-neighbour KL toward them over other pieces (pair source b). Returns a function
    mapping z-scored descriptors [N, D] to vectors [N, dim]."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from mess_ray.train.losses import multi_positive_infonce, soft_neighbour_kl
    from mess_ray.train.targets import mine_descriptor_labels

    x = np.asarray(descriptors_z, dtype=np.float32)
    pieces = np.asarray(piece_ids, dtype=object)
    if x.ndim != 2 or x.shape[0] != pieces.size:
        raise ValueError("descriptors and piece ids disagree on the number of segments")
    if len(set(pieces)) < 2:
        raise ValueError("the descriptor head trains across pieces: it needs two or more")
    clusters = max(2, min(mine_clusters, x.shape[0] // 4))
    mined = mine_descriptor_labels(np.arange(x.shape[0]), pieces, x, clusters, seed=seed)
    label_names = sorted(set(mined.values()))
    labels = np.array(
        [label_names.index(mined[i]) if i in mined else -1 - i for i in range(x.shape[0])]
    )
    piece_codes = np.unique(pieces.astype(str), return_inverse=True)[1]
    midi = None
    if midi_targets is not None:
        midi = np.asarray(midi_targets, dtype=np.float64)
        known = ~np.isnan(midi).all(axis=1)
        col_mean = np.nanmean(np.where(known[:, None], midi, np.nan), axis=0)
        col_std = np.nanstd(np.where(known[:, None], midi, np.nan), axis=0)
        usable = np.isfinite(col_mean) & (col_std > 1e-12)
        midi = np.where(np.isnan(midi), col_mean, midi)[:, usable]
        midi = ((midi - col_mean[usable]) / col_std[usable]).astype(np.float32)
        has_midi = known
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, dim))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    xt = torch.from_numpy(x)
    for _ in range(steps):
        idx = rng.choice(x.shape[0], size=min(batch_size, x.shape[0]), replace=False)
        emb = F.normalize(model(xt[idx]), dim=-1)
        pieces_t = torch.from_numpy(piece_codes[idx])
        loss = multi_positive_infonce(
            emb, torch.from_numpy(labels[idx]), temperature, pieces_t, 1.0, mined_from=0
        )
        if midi is not None and midi.shape[1] and has_midi[idx].sum() >= 3:
            has = torch.from_numpy(has_midi[idx])
            same_piece = pieces_t[has].unsqueeze(0) == pieces_t[has].unsqueeze(1)
            loss = loss + midi_weight * soft_neighbour_kl(
                emb[has],
                torch.from_numpy(midi[idx])[has],
                facet_temperature,
                midi_target_temperature,
                exclude=same_piece,
            )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()

    def embed(descriptors: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(np.asarray(descriptors, dtype=np.float32)))
        return F.normalize(out, dim=-1).numpy()

    return embed
