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


def batch_labels(styles, vocabulary: dict[str, int], moments=None) -> torch.Tensor:
    """Style labels; a row without a style (kept for its MIDI targets) gets a label of its own,
    below 0: no positive but its own views, and nobody's hard negative. With ``moments`` (the
    cross-chain moment keys), unstyled rows of one moment (the same performance at the same
    time, through another chain) share their label instead."""
    out, own = [], {}
    for i, style in enumerate(styles):
        if str(style):
            out.append(vocabulary[str(style)])
        elif moments is not None:
            out.append(-1 - own.setdefault(int(moments[i]), len(own)))
        else:
            out.append(-1 - i)
    return torch.tensor(out, dtype=torch.long)


def collate_labelled(batch: dict, loop: FinetuneLoop) -> dict[str, torch.Tensor]:
    """Decoded audio, style labels and piece codes; with cross-chain views (a ``partner_audio``
    column, finetune.cross_chain_views), each row's partner (the same performance at the same
    time through another chain) appended as a positive; with augmentation, one augmented view
    of every row appended per ``augment.views`` (same label and piece: a positive); with facet
    heads, each row's z-scored descriptors (of the audio as the model sees it); with MIDI
    targets, each row's z-scored MIDI descriptors and whether it has them; with performer
    positives, each row's pianist code; with a timeline term, which row each view is of."""
    vocabulary = {style: i for i, style in enumerate(loop.styles)}
    moments = batch.get("moment") if loop.cross_chain_views else None
    labels = batch_labels(batch["style"], vocabulary, moments)
    pieces = torch.tensor([piece_code(p) for p in batch["piece_id"]], dtype=torch.long)
    audio = decode_audio_column(batch["audio"], loop.window_samples)
    n = audio.shape[0]
    # origin[k]: the batch row that output row k is a view of
    origin = list(range(n))
    parts = [audio]
    if loop.cross_chain_views and "partner_audio" in batch:
        paired = [i for i, blob in enumerate(batch["partner_audio"]) if len(blob)]
        if paired:
            parts.append(
                decode_audio_column(
                    [batch["partner_audio"][i] for i in paired], loop.window_samples
                )
            )
            origin += paired
    views = loop.augment.views
    if views:
        # Seeded from the batch's content, so a resumed run sees the same views.
        generator = torch.Generator().manual_seed(int(pieces.sum()) + loop.seed)
        for _ in range(views):
            parts.append(augment_batch(audio, loop.augment, loop.sample_rate, generator))
            origin += list(range(n))
    index = torch.tensor(origin, dtype=torch.long)
    audio = torch.cat(parts)
    out = {"audio": audio, "labels": labels[index], "pieces": pieces[index]}
    if loop.timeline_weight > 0:
        out["instances"] = index  # which batch row each output row is a view of
    if loop.midi_targets:
        width = len(loop.midi_target_names)
        rows = [loop.midi_targets.get(int(i)) for i in batch["segment_id"]]
        out["midi"] = torch.tensor(
            [r if r is not None else [0.0] * width for r in rows], dtype=torch.float32
        )[index]
        out["has_midi"] = torch.tensor([r is not None for r in rows], dtype=torch.bool)[index]
    if loop.performers:
        # Each row's pianist (pianists who play two training pieces; others: a code of their own)
        codes = [loop.performers.get(int(s), -1 - i) for i, s in enumerate(batch["segment_id"])]
        out["performers"] = torch.tensor(codes, dtype=torch.long)[index]
    if loop.descriptor_stats:
        raw = np.stack([descriptor_vector(row, loop.sample_rate) for row in audio.numpy()])
        out["raw_descriptors"] = torch.from_numpy(raw).float()
        out["descriptors"] = torch.from_numpy(
            zscore_descriptors(raw, loop.descriptor_stats)
        ).float()
    return out
