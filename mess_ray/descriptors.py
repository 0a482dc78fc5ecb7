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
