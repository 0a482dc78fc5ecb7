"""Fine-tuning batch collation (runs on every Ray Train worker): decoded audio, style labels,
piece codes, augmented views, and each row's descriptor and MIDI targets."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from mess_ray.descriptors import descriptor_vector
from mess_ray.train.augment import augment_batch
from mess_ray.train.common import decode_audio_column
from mess_ray.train.finetune_settings import FinetuneLoop
from mess_ray.train.targets import zscore_descriptors


def piece_code(piece_id: str) -> int:
    """A stable integer for a piece id (the same on every worker: crc32, not Python's hash)."""
    return zlib.crc32(str(piece_id).encode()) & 0x7FFFFFFF


def collate_labelled(batch: dict, loop: FinetuneLoop) -> dict[str, torch.Tensor]:
    """Decoded audio, style labels and piece codes; with augmentation, one augmented view of
    every row appended per ``augment.views`` (same label and piece: a positive); with facet
    heads, each row's z-scored descriptors (of the audio as the model sees it); with MIDI
    targets, each row's z-scored MIDI descriptors and whether it has them.

    A row without a style (kept for its MIDI targets) gets a label of its own, below 0: no
    positive but its own augmented views, and nobody's hard negative."""
    vocabulary = {style: i for i, style in enumerate(loop.styles)}
    labels = torch.tensor(
        [vocabulary[str(s)] if str(s) else -1 - i for i, s in enumerate(batch["style"])],
        dtype=torch.long,
    )
    pieces = torch.tensor([piece_code(p) for p in batch["piece_id"]], dtype=torch.long)
    audio = decode_audio_column(batch["audio"], loop.window_samples)
    views = loop.augment.views
    if views:
        # Seeded from the batch's content, so a resumed run sees the same views.
        generator = torch.Generator().manual_seed(int(pieces.sum()) + loop.seed)
        audio = torch.cat(
            [audio]
            + [
                augment_batch(audio, loop.augment, loop.sample_rate, generator)
                for _ in range(views)
            ]
        )
        labels, pieces = labels.repeat(views + 1), pieces.repeat(views + 1)
    out = {"audio": audio, "labels": labels, "pieces": pieces}
    if loop.midi_targets:
        width = len(loop.midi_target_names)
        rows = [loop.midi_targets.get(int(i)) for i in batch["segment_id"]]
        out["midi"] = torch.tensor(
            [r if r is not None else [0.0] * width for r in rows], dtype=torch.float32
        ).repeat(views + 1, 1)
        out["has_midi"] = torch.tensor([r is not None for r in rows], dtype=torch.bool).repeat(
            views + 1
        )
    if loop.descriptor_stats:
        raw = np.stack([descriptor_vector(row, loop.sample_rate) for row in audio.numpy()])
        out["raw_descriptors"] = torch.from_numpy(raw).float()
        out["descriptors"] = torch.from_numpy(
            zscore_descriptors(raw, loop.descriptor_stats)
        ).float()
    return out
