"""Audio-only expressive descriptors: the hand-crafted baseline the learned models must beat.

Per segment (mono float32 at any sample rate) we measure what a listener hears as
"played alike": how often notes start (onset rate), how steady the timing is (CV of
inter-onset intervals: the audio measure of tempo stability), dynamics (RMS loudness
contour: mean, spread, range, slope), articulation (how long the sound stays near each
onset's peak before the next onset: staccato low, legato/pedal high) and timbre/brightness
(spectral centroid, spectral flux). The baseline embeds a segment as its
descriptor vector z-scored over the evaluated set, so every descriptor weighs the same.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import median_filter
from scipy.signal import find_peaks
from scipy.signal.windows import hann

DESCRIPTOR_NAMES: tuple[str, ...] = (
    "onset_rate_hz",
    "ioi_cv",
    "loudness_mean_db",
    "loudness_std_db",
    "loudness_range_db",
    "loudness_slope_db_per_s",
    "centroid_mean_hz",
    "centroid_std_hz",
    "flux_mean",
    "sustain_ratio",
)

# Which audio descriptors speak for which facet of expression (mess_ray.facets.FACETS):
# facet heads are supervised with these groups, and search explanations compare them.
FACET_DESCRIPTORS: dict[str, tuple[str, ...]] = {
    "tempo": ("onset_rate_hz", "ioi_cv"),
    "dynamics": (
        "loudness_mean_db",
        "loudness_std_db",
        "loudness_range_db",
        "loudness_slope_db_per_s",
    ),
    "articulation": ("sustain_ratio", "flux_mean"),
    "timbre": ("centroid_mean_hz", "centroid_std_hz"),
}

FLOOR_DB = -100.0  # RMS of digital silence is clamped here (avoids -inf)
ACTIVE_BELOW_PEAK_DB = 50  # frames quieter than peak - 50 dB are silence for timbre stats
FRAME_S = 0.032  # analysis window (short: onsets of fast passages stay apart)
HOP_S = 0.010  # analysis hop (100 frames per second)
MIN_ONSET_GAP_S = 0.05  # two onsets closer than this are one note
ONSET_DELTA = 0.1  # peak must exceed the local median flux by this fraction of the max...
ONSET_RATIO = 1.5  # ...and be this many times the local median (steady noise has no onsets)
SUSTAIN_WITHIN_DB = 10.0  # a note "sustains" while the level stays within this of its onset peak
PEAK_SEARCH_S = 0.05  # the onset's peak level is the loudest frame this soon after the onset
MAX_NOTE_SPAN_S = 1.0  # the last onset (no successor) is followed at most this long
MIN_ONSET_FLUX = 0.05  # absolute floor (mean log-magnitude rise per bin): window-phase ripple of
# a steady tone stays below ~0.01, a note attack at amplitude 0.02 reaches ~0.3


def _frames(audio: np.ndarray, sr: int) -> tuple[np.ndarray, int, int]:
    """[frames, n_fft] windowless frames of the signal, padded so short input yields one frame."""
    n_fft = int(2 ** np.ceil(np.log2(FRAME_S * sr)))
    hop = max(1, int(round(HOP_S * sr)))
    if audio.size < n_fft:
        audio = np.pad(audio, (0, n_fft - audio.size))
    frames = np.lib.stride_tricks.sliding_window_view(audio, n_fft)[::hop]
    return frames, n_fft, hop


def _validate(audio: np.ndarray, sr: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float64)
    if audio.ndim != 1:
        raise ValueError(f"descriptors need mono audio (1-D), got shape {audio.shape}")
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    if audio.size == 0:
        raise ValueError("descriptors need at least one sample")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or infinite samples")
    return audio


def onset_times(flux: np.ndarray, frame_rate: float) -> np.ndarray:
    """Onset times (s) by peak picking on spectral flux (adaptive threshold, minimum gap)."""
    peak = float(flux.max()) if flux.size else 0.0
    if peak < MIN_ONSET_FLUX:
        return np.zeros(0)
    # Adaptive threshold around a local median over ~0.5 s: a peak must stand out from its
    # surroundings both absolutely (fraction of the max) and relatively (ratio), so a
    # stationary texture (noise, a held chord) yields no onsets while a soft passage still does.
    local_median = median_filter(flux, size=max(3, int(round(0.5 * frame_rate))), mode="nearest")
    height = np.maximum(
        np.maximum(local_median + ONSET_DELTA * peak, ONSET_RATIO * local_median), MIN_ONSET_FLUX
    )
    distance = max(1, int(round(MIN_ONSET_GAP_S * frame_rate)))
    peaks, _ = find_peaks(flux, height=height, distance=distance)
    return peaks / frame_rate


def sustain_ratio(loudness_db: np.ndarray, onset_frames: np.ndarray, frame_rate: float) -> float:
    """Articulation from the loudness envelope: for each onset, the fraction of the time to the
    next onset during which the level stays within :data:`SUSTAIN_WITHIN_DB` of the onset's peak,
    averaged over onsets. Detached notes (staccato) fall silent early, so the ratio is low;
    legato and pedalled notes keep sounding until the next one, so it is near 1.

    Without onsets the whole segment counts as one note from its loudest frame (a held tone: 1).
    """
    loudness_db = np.asarray(loudness_db, dtype=np.float64)
    n = loudness_db.size
    if n == 0:
        raise ValueError("sustain_ratio needs a non-empty loudness envelope")
    starts = np.unique(np.clip(np.asarray(onset_frames, dtype=np.int64), 0, n - 1))
    if starts.size == 0:
        peak = int(np.argmax(loudness_db))
        spans = [(peak, n)]
    else:
        search = max(1, int(round(PEAK_SEARCH_S * frame_rate)))
        longest = max(1, int(round(MAX_NOTE_SPAN_S * frame_rate)))
        ends = np.append(starts[1:], min(n, starts[-1] + longest))
        spans = []
        for start, end in zip(starts, ends):
            peak = start + int(np.argmax(loudness_db[start : min(start + search, end)]))
            spans.append((peak, end))
    ratios = []
    for peak, end in spans:
        if end - peak < 2:
            continue  # too close to the next onset to say how the note was held
        level = loudness_db[peak:end]
        ratios.append(float(np.mean(level >= loudness_db[peak] - SUSTAIN_WITHIN_DB)))
    return float(np.mean(ratios)) if ratios else 1.0


def describe(audio: np.ndarray, sr: int) -> dict[str, float]:
    """Named expressive descriptors of one segment (see :data:`DESCRIPTOR_NAMES`)."""
    audio = _validate(audio, sr)
    frames, n_fft, hop = _frames(audio, sr)
    frame_rate = sr / hop
    duration_s = audio.size / sr

    rms = np.sqrt(np.mean(frames**2, axis=1))
    loudness_db = np.maximum(20 * np.log10(np.maximum(rms, 1e-12)), FLOOR_DB)
    times = np.arange(loudness_db.size) / frame_rate
    slope = float(np.polyfit(times, loudness_db, 1)[0]) if loudness_db.size >= 2 else 0.0

    magnitude = np.abs(np.fft.rfft(frames * hann(n_fft, sym=False), axis=1))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    # Log-compressed magnitude makes flux respond to note starts at any loudness.
    log_mag = np.log1p(100.0 * magnitude)
    flux = (
        np.concatenate([[0.0], np.maximum(np.diff(log_mag, axis=0), 0.0).sum(axis=1)])
        / magnitude.shape[1]
    )

    onsets = onset_times(flux, frame_rate)
    iois = np.diff(onsets)
    ioi_cv = float(iois.std() / iois.mean()) if iois.size >= 2 and iois.mean() > 0 else 0.0

    active = loudness_db > max(loudness_db.max() - ACTIVE_BELOW_PEAK_DB, FLOOR_DB)
    power = magnitude[active].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = (magnitude[active] * freqs).sum(axis=1) / power
    centroids = centroids[np.isfinite(centroids)]

    return {
        "onset_rate_hz": onsets.size / duration_s,
        "ioi_cv": ioi_cv,
        "loudness_mean_db": float(loudness_db.mean()),
        "loudness_std_db": float(loudness_db.std()),
        "loudness_range_db": float(np.percentile(loudness_db, 95) - np.percentile(loudness_db, 5)),
        "loudness_slope_db_per_s": slope,
        "centroid_mean_hz": float(centroids.mean()) if centroids.size else 0.0,
        "centroid_std_hz": float(centroids.std()) if centroids.size else 0.0,
        "flux_mean": float(flux.mean()),
        "sustain_ratio": sustain_ratio(
            loudness_db, np.round(onsets * frame_rate).astype(np.int64), frame_rate
        ),
    }


def descriptor_vector(audio: np.ndarray, sr: int) -> np.ndarray:
    """Descriptors of one segment as a float64 vector ordered as :data:`DESCRIPTOR_NAMES`."""
    values = describe(audio, sr)
    return np.array([values[name] for name in DESCRIPTOR_NAMES], dtype=np.float64)


def descriptor_matrix(
    segments: list[np.ndarray] | np.ndarray, sr: int, progress: bool = False
) -> np.ndarray:
    """[N, len(DESCRIPTOR_NAMES)] descriptors of many segments."""
    from tqdm.auto import tqdm

    rows = [
        descriptor_vector(seg, sr)
        for seg in tqdm(segments, desc="descriptors", disable=not progress)
    ]
    if not rows:
        return np.zeros((0, len(DESCRIPTOR_NAMES)))
    return np.stack(rows)


def zscore(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-score columns over the rows given; constant columns become 0. Returns (z, mean, std)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise ValueError(f"z-scoring needs a non-empty [N, D] matrix, got shape {matrix.shape}")
    mean = matrix.mean(axis=0)
    std = matrix.std(axis=0)
    safe = np.where(std > 1e-12, std, 1.0)
    return (matrix - mean) / safe, mean, std


def descriptor_embeddings(
    segments: list[np.ndarray] | np.ndarray, sr: int, progress: bool = False
) -> np.ndarray:
    """The descriptor baseline: z-scored descriptors (fitted on these segments), L2-normalised
    so that dot products are cosine similarities like the learned embedders'."""
    z, _, _ = zscore(descriptor_matrix(segments, sr, progress=progress))
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return (z / np.where(norms > 1e-12, norms, 1.0)).astype(np.float32)


# -- audio counterparts of the performed-MIDI features (issue 20, item 5) ----------------------
# The same questions mess_ray.midi_descriptors asks of the performed MIDI, asked of the audio:
# tempo, note rate, timing variability, onset asynchrony within chords, articulation, pedal /
# sustain (how slowly the sound decays between onsets), loudness level and spread (the velocity
# level and range of the notes' attacks). Onsets and tempo come from librosa; the level from
# pyloudnorm (ITU-R BS.1770) and librosa's RMS. Used as expressive vectors in their own right
# and, standardised within the work (mess_ray.work_relative), as the audio side of the
# symbolic reference.
EXPRESSION_NAMES: tuple[str, ...] = (
    "tempo_bpm",
    "onset_rate_hz",
    "timing_deviation",
    "chord_asynchrony_ms",
    "articulation_ratio",
    "decay_db_per_s",
    "loudness_lufs",
    "loudness_spread_db",
    "attack_level_db",
    "attack_range_db",
    "loudness_slope_db_per_s",
)
# Columns that carry the recording chain's absolute level or colour (recording_relative).
CHAIN_LEVEL_EXPRESSION = ("loudness_lufs", "attack_level_db")
CHAIN_LEVEL_DESCRIPTORS = ("loudness_mean_db", "centroid_mean_hz")

ONSET_HOP_S = 0.002  # fine onset grid: chord asynchrony is tens of milliseconds
ONSET_WAIT_S = 0.008  # two detected onsets at least this far apart
CHORD_GROUP_S = 0.07  # onsets this close to a group's first one belong to one chord
LEVEL_HOP_S = 0.01
LUFS_FLOOR = -70.0  # gated-out (near-silent) audio reads as this level


def _onset_times_librosa(y: np.ndarray, sr: int) -> np.ndarray:
    import librosa

    hop = max(1, int(round(ONSET_HOP_S * sr)))
    envelope = librosa.onset.onset_strength(y=y, sr=sr, hop_length=hop, n_fft=256, n_mels=40)
    if envelope.size == 0 or float(envelope.max()) <= 1e-6:
        return np.zeros(0)
    frames = max(1, int(round(ONSET_WAIT_S * sr / hop)))
    onsets = librosa.onset.onset_detect(
        onset_envelope=envelope,
        sr=sr,
        hop_length=hop,
        units="time",
        pre_max=frames,
        post_max=frames,
        pre_avg=4 * frames,
        post_avg=frames,
        wait=frames,
        delta=0.1,
    )
    return np.asarray(onsets, dtype=np.float64)


def chord_groups(onsets: np.ndarray, window_s: float = CHORD_GROUP_S) -> list[np.ndarray]:
    """Onsets grouped into chords: each group spans at most ``window_s`` from its first onset."""
    groups: list[list[float]] = []
    for t in np.sort(np.asarray(onsets, dtype=np.float64)):
        if groups and t - groups[-1][0] <= window_s:
            groups[-1].append(float(t))
        else:
            groups.append([float(t)])
    return [np.asarray(g) for g in groups]


def expression_features(audio: np.ndarray, sr: int) -> dict[str, float]:
    """Named audio expression features of one passage (:data:`EXPRESSION_NAMES`); NaN where the
    passage has too few onsets to say (never a made-up 0)."""
    import librosa
    import pyloudnorm

    y = _validate(audio, sr).astype(np.float32)
    duration = y.size / sr
    out = dict.fromkeys(EXPRESSION_NAMES, math.nan)
    hop = max(1, int(round(LEVEL_HOP_S * sr)))
    rms = librosa.feature.rms(y=y, frame_length=4 * hop, hop_length=hop, center=True)[0]
    level = np.maximum(20 * np.log10(np.maximum(rms, 1e-12)), FLOOR_DB)
    frame_rate = sr / hop
    active = level > max(level.max() - ACTIVE_BELOW_PEAK_DB, FLOOR_DB)
    out["loudness_spread_db"] = float(level[active].std()) if active.any() else math.nan
    times = np.arange(level.size) / frame_rate
    out["loudness_slope_db_per_s"] = (
        float(np.polyfit(times, level, 1)[0]) if level.size >= 2 else math.nan
    )
    if duration >= 0.4:  # BS.1770 needs one 400 ms block
        lufs = pyloudnorm.Meter(sr).integrated_loudness(y.astype(np.float64))
        out["loudness_lufs"] = float(lufs) if np.isfinite(lufs) else LUFS_FLOOR
    onsets = _onset_times_librosa(y, sr)
    out["onset_rate_hz"] = onsets.size / duration
    groups = chord_groups(onsets)
    firsts = np.array([g[0] for g in groups]) if groups else np.zeros(0)
    if groups:
        out["chord_asynchrony_ms"] = 1000.0 * float(np.mean([g[-1] - g[0] for g in groups]))
        search = max(1, int(round(PEAK_SEARCH_S * frame_rate)))
        starts = np.clip(np.round(firsts * frame_rate).astype(int), 0, level.size - 1)
        peaks = np.array([level[s : s + search].max() for s in starts])
        out["attack_level_db"] = float(np.mean(peaks))
        if peaks.size >= 2:
            out["attack_range_db"] = float(np.percentile(peaks, 95) - np.percentile(peaks, 5))
        out["articulation_ratio"] = sustain_ratio(level, starts, frame_rate)
        decays = []
        for s, e in zip(starts, np.append(starts[1:], level.size)):
            peak = s + int(np.argmax(level[s : min(s + search, e)]))
            if e - peak >= max(3, int(0.1 * frame_rate)):
                seg = level[peak:e]
                decays.append(-np.polyfit(np.arange(seg.size) / frame_rate, seg, 1)[0])
        if decays:
            out["decay_db_per_s"] = float(np.median(decays))
    iois = np.diff(firsts)
    if iois.size >= 2 and iois.mean() > 0:
        out["timing_deviation"] = float(iois.std() / iois.mean())
    if firsts.size >= 4:
        envelope = librosa.onset.onset_strength(y=y, sr=sr, hop_length=512)
        tempo = librosa.feature.tempo(onset_envelope=envelope, sr=sr, hop_length=512)
        out["tempo_bpm"] = float(np.atleast_1d(tempo)[0])
    return out


def expression_vector(audio: np.ndarray, sr: int) -> np.ndarray:
    values = expression_features(audio, sr)
    return np.array([values[n] for n in EXPRESSION_NAMES], dtype=np.float64)


def expression_matrix(segments, sr: int, progress: bool = False) -> np.ndarray:
    """[N, len(EXPRESSION_NAMES)] audio expression features of many passages (NaN: unknown)."""
    from tqdm.auto import tqdm

    rows = [
        expression_vector(s, sr) for s in tqdm(segments, desc="expression", disable=not progress)
    ]
    return np.stack(rows) if rows else np.zeros((0, len(EXPRESSION_NAMES)))


def impute_columns(matrix: np.ndarray) -> np.ndarray:
    """NaN replaced by the column's mean over known rows (0 where nothing is known)."""
    x = np.asarray(matrix, dtype=np.float64).copy()
    for j in range(x.shape[1]):
        col = x[:, j]
        known = ~np.isnan(col)
        col[~known] = col[known].mean() if known.any() else 0.0
    return x
