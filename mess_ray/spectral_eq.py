"""Per-recording spectral equalisation: channel compensation for recording chains.

A recording chain's microphone EQ, its room's colouration and its gain act on a recording as one
(nearly) time-invariant filter, which multiplies the recording's *long-term average spectrum*
(LTAS) by the chain's response. Dividing every recording's smoothed LTAS out and multiplying a
common reference in (cepstral mean normalisation's counterpart on the waveform) removes that
filter, whatever it was, while keeping everything that changes *within* a recording: the
player's dynamics, articulation and timing.

Pure NumPy/librosa, shared below the stages. Measured on the yardstick with
``benchmarks/protocol_equalise.py`` (README, "Per-recording spectral equalisation"): it helps
the shipped model across some chains and costs it within one, so the index and query paths do
not apply it.
"""

from __future__ import annotations

import functools

import numpy as np

N_FFT = 1024
HOP = 256


@functools.lru_cache(maxsize=8)
def band_matrix(
    n_fft: int, sample_rate: int, per_octave: float, low_hz: float = 40.0
) -> np.ndarray:
    """[bins, bins] row-stochastic smoothing: each STFT bin averaged (in dB) over the bins
    within +-1/(2 * per_octave) octave of it (below ``low_hz`` over the band at ``low_hz``).
    Built once per setting (read-only: every recording's spectrum shares it)."""
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    centre = np.maximum(freqs, low_hz)
    half = 2.0 ** (0.5 / per_octave)
    lo, hi = centre / half, centre * half
    weights = ((freqs[None, :] >= lo[:, None]) & (freqs[None, :] <= hi[:, None])).astype(np.float64)
    weights[np.diag_indices_from(weights)] = 1.0  # a bin always counts in its own band
    weights /= weights.sum(axis=1, keepdims=True)
    weights.flags.writeable = False
    return weights


def _power(audio: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Mean power per STFT bin over every frame of the segments ``audio`` [N, T]."""
    import librosa

    spec = librosa.stft(np.ascontiguousarray(audio, dtype=np.float32), n_fft=n_fft, hop_length=hop)
    return (np.abs(spec) ** 2).mean(axis=(0, 2))  # spec: [N, bins, frames]


def long_term_db(
    audio: np.ndarray, sample_rate: int, per_octave: float = 3.0, n_fft: int = N_FFT, hop: int = HOP
) -> np.ndarray:
    """The smoothed long-term average spectrum of ``audio`` ([T] or [N, T] segments of one
    recording), in dB per STFT bin."""
    power = _power(np.atleast_2d(audio), n_fft, hop)
    db = 10.0 * np.log10(power + 1e-12)
    return band_matrix(n_fft, sample_rate, per_octave) @ db


def apply_gain_db(audio: np.ndarray, gain_db: np.ndarray, n_fft: int = N_FFT, hop: int = HOP):
    """``audio`` ([T] or [N, T]) through the zero-phase filter ``gain_db`` (dB per STFT bin),
    same shape and dtype."""
    import librosa

    x = np.ascontiguousarray(audio, dtype=np.float32)
    spec = librosa.stft(x, n_fft=n_fft, hop_length=hop)
    gain = (10.0 ** (np.asarray(gain_db) / 20.0)).astype(np.float32)
    out = librosa.istft(spec * gain[:, None], hop_length=hop, n_fft=n_fft, length=x.shape[-1])
    return out.astype(audio.dtype, copy=False)


def gain_to_reference(
    ltas_db: np.ndarray, reference_db: np.ndarray, max_gain_db: float = 24.0
) -> np.ndarray:
    """The filter (dB per STFT bin) taking a recording's long-term spectrum to the reference,
    clipped to +-``max_gain_db``."""
    return np.clip(np.asarray(reference_db) - ltas_db, -max_gain_db, max_gain_db)


def equalise_tracks(
    audio: np.ndarray,
    track_ids,
    sample_rate: int,
    reference_db: np.ndarray | None = None,
    per_octave: float = 3.0,
    max_gain_db: float = 24.0,
    n_fft: int = N_FFT,
) -> tuple[np.ndarray, np.ndarray]:
    """Every recording's segments (rows of ``audio`` [N, T] grouped by ``track_ids``) filtered so
    that its smoothed long-term spectrum matches ``reference_db`` (default: the mean over the
    recordings given, each counted once); gains clipped to +-``max_gain_db``.
    Returns (equalised audio, the reference used)."""
    audio = np.asarray(audio)
    track_ids = np.asarray(track_ids, dtype=object)
    if audio.ndim != 2 or track_ids.shape != (audio.shape[0],):
        raise ValueError("audio must be [N, T] with one track id per row")
    tracks = list(dict.fromkeys(track_ids.tolist()))
    rows = {t: np.flatnonzero(track_ids == t) for t in tracks}
    ltas = {t: long_term_db(audio[r], sample_rate, per_octave, n_fft) for t, r in rows.items()}
    if reference_db is None:
        reference_db = np.mean(np.stack(list(ltas.values())), axis=0)
    out = np.empty_like(audio)
    for t, r in rows.items():
        out[r] = apply_gain_db(
            audio[r], gain_to_reference(ltas[t], reference_db, max_gain_db), n_fft
        )
    return out, np.asarray(reference_db)
