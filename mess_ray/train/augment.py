"""Expression-preserving augmentations: extra positive views for contrastive fine-tuning.

Each transform changes the recording, not the performance: a gentle spectral tilt (a
different microphone or room colour), mild noise, a short synthetic reverb. Timing is never
touched (no time-stretch: that would change tempo, which is part of the expression), and
every output is gain-normalised back to the input's RMS, so loudness, which belongs to the
dynamics facet, is kept.

Pure functions on float32 tensors [B, T]; the randomness comes from an explicit generator.
"""

from __future__ import annotations

import torch

from mess_ray.config import AugmentConfig


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-12).sqrt()


def match_rms(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``x`` scaled per row to the RMS of ``reference`` (silent rows stay silent)."""
    ref = reference.pow(2).mean(dim=-1, keepdim=True).sqrt()
    return x * (ref / _rms(x))


def eq_tilt(x: torch.Tensor, sample_rate: int, tilt_db_per_octave: torch.Tensor) -> torch.Tensor:
    """Spectral tilt of ``tilt_db_per_octave[b]`` around 1 kHz per row, gain-normalised."""
    spectrum = torch.fft.rfft(x, dim=-1)
    freqs = torch.fft.rfftfreq(x.shape[-1], 1.0 / sample_rate).to(x.device)
    octaves = torch.log2(freqs.clamp_min(50.0) / 1000.0)  # below 50 Hz: the 50 Hz gain
    gain_db = tilt_db_per_octave.view(-1, 1) * octaves.view(1, -1)
    shaped = torch.fft.irfft(spectrum * torch.pow(10.0, gain_db / 20.0), n=x.shape[-1], dim=-1)
    return match_rms(shaped, x)


def add_noise(x: torch.Tensor, snr_db: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """White noise ``snr_db[b]`` dB below each row's RMS."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    scale = _rms(x) * torch.pow(10.0, -snr_db.view(-1, 1) / 20.0)
    return x + noise * scale


def synthetic_reverb(
    x: torch.Tensor,
    sample_rate: int,
    rt60_s: torch.Tensor,
    generator: torch.Generator,
    wet: float = 0.15,
) -> torch.Tensor:
    """Convolution with exponentially decaying noise (RT60 ``rt60_s[b]``), gain-normalised.

    The direct sound stays at full level and the tail is mixed in at ``wet``, so onsets stay
    where they were (a short room, not a cathedral)."""
    length = max(1, int(round(float(rt60_s.max()) * sample_rate)))
    t = torch.arange(length, dtype=x.dtype) / sample_rate
    # 60 dB of decay over rt60: amplitude exp(-6.9 t / rt60).
    decay = torch.exp(-6.9078 * t.view(1, -1) / rt60_s.clamp_min(1e-3).view(-1, 1))
    tail = torch.randn((x.shape[0], length), generator=generator, dtype=x.dtype) * decay
    tail = tail / tail.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    n = x.shape[-1] + length - 1
    size = 1 << (n - 1).bit_length()
    wet_signal = torch.fft.irfft(torch.fft.rfft(x, size) * torch.fft.rfft(tail, size), size)[
        ..., : x.shape[-1]
    ]
    return match_rms(x + wet * match_rms(wet_signal, x), x)


def chain_views(
    x: torch.Tensor,
    sample_rate: int,
    prob: float,
    pool: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Each row, with chance ``prob``, recorded through one of ``pool`` training-side recording
    chains (:func:`mess_ray.render.chains.record_segment`: the renderer's own simulated room,
    microphone EQ, level, noise and MP3 codec; the SoundFont stays); other rows unchanged.

    The draws (which rows, which chain, the noise seed) come from ``generator``, so a seeded
    generator gives the same views. Cost is bounded: each chain's room is simulated once per
    process (cached), then a row costs a convolution, three filters and an MP3 round trip."""
    from mess_ray.render.chains import augmentation_chain, record_segment

    if x.dim() != 2:
        raise ValueError(f"chain_views expects [batch, samples], got {tuple(x.shape)}")
    if pool < 1:
        raise ValueError(f"the chain pool must hold at least one chain, got {pool}")
    b = x.shape[0]
    chosen = torch.rand(b, generator=generator) < prob
    which = torch.randint(pool, (b,), generator=generator)
    noise_seeds = torch.randint(2**31 - 1, (b,), generator=generator)
    if not chosen.any():
        return x
    out = x.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        recorded = record_segment(
            x[i].detach().cpu().numpy(),
            sample_rate,
            augmentation_chain(int(which[i])),
            int(noise_seeds[i]),
        )
        out[i] = torch.from_numpy(recorded).to(dtype=x.dtype, device=x.device)
    return out


def augment_batch(
    x: torch.Tensor, settings: AugmentConfig, sample_rate: int, generator: torch.Generator
) -> torch.Tensor:
    """One augmented view of every row (``sample_rate`` Hz): EQ tilt, then reverb (some rows),
    then noise; ``settings`` is the ``finetune.augment`` block. With ``chain_prob`` > 0, that
    share of rows is instead recorded through a training-side chain (:func:`chain_views`)."""
    if x.dim() != 2:
        raise ValueError(f"augment_batch expects [batch, samples], got {tuple(x.shape)}")
    b = x.shape[0]
    recorded = None
    if settings.chain_prob > 0:
        recorded = chain_views(x, sample_rate, settings.chain_prob, settings.chain_pool, generator)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator, dtype=x.dtype)

    out = x
    if settings.eq_tilt_db > 0:
        out = eq_tilt(out, sample_rate, uniform(-settings.eq_tilt_db, settings.eq_tilt_db))
    if settings.reverb_prob > 0 and settings.reverb_max_s > 0:
        chosen = torch.rand(b, generator=generator) < settings.reverb_prob
        if chosen.any():
            rt60 = uniform(0.1, settings.reverb_max_s)
            reverbed = synthetic_reverb(out, sample_rate, rt60, generator)
            out = torch.where(chosen.view(-1, 1), reverbed, out)
    if settings.noise_snr_db > 0:
        out = add_noise(
            out, uniform(settings.noise_snr_db, settings.noise_snr_db + 20.0), generator
        )
    if recorded is not None:
        # rows that went through a chain keep that view (a chain has its own room and noise)
        changed = (recorded != x).any(dim=-1, keepdim=True)
        out = torch.where(changed, recorded, out)
    return out
