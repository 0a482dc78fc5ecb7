"""Recording chains: how a rendered performance is "recorded" (piano, room, microphone, level,
noise, codec), seeded and written into every catalog row.

A chain is named in ``render.chains`` (training renders) and ``render.eval_chains`` (evaluation
only renders):

* ``dry``: today's rendering (FluidSynth with ``render.soundfont``, nothing after it); with
  ``render.chains: [dry]`` (the default) track ids and audio are exactly what they always were;
* ``train-<n>`` / ``eval-<n>``: a chain sampled from seed ``n`` with the training side's or the
  evaluation side's SoundFonts (:data:`TRAIN_SOUNDFONTS`, :data:`EVAL_SOUNDFONTS`). The two sides
  share the ranges of the other parameters but never a piano: a model trained on train-side chains
  meets an unseen instrument at evaluation.

The processing uses the ecosystem: pyroomacoustics simulates the room's impulse response (image
source + ray tracing, RT60 from dry studio to hall) and scipy convolves it; pedalboard's shelf and
peak filters colour the microphone; pyloudnorm sets the integrated loudness (LUFS); seeded noise
(pink-ish: white through pedalboard's low-pass) is mixed at a given SNR; pedalboard's MP3 encoder
is the codec. Order: synth -> room -> microphone EQ -> loudness -> noise -> codec -> peak guard.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

DRY = "dry"
SOUNDFONT_DIRS = ("/usr/share/sounds/sf2", "/usr/share/sounds/sf3")
# Debian packages: fluid-soundfont-gm (FluidR3_GM), timgm6mb-soundfont (TimGM6mb) for training;
# musescore-general-soundfont-small (MuseScore_General_Lite) is kept for evaluation only.
# (fluid-soundfont-gs's FluidR3_GS.sf2 has no GM piano preset: FluidSynth renders it silent.)
TRAIN_SOUNDFONTS = ("FluidR3_GM.sf2", "TimGM6mb.sf2")
EVAL_SOUNDFONTS = ("MuseScore_General_Lite.sf3",)
_SAMPLED = re.compile(r"^(train|eval)-(\d+)$")


class RoomSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rt60_s: float = Field(gt=0, le=4)
    dims_m: tuple[float, float, float]
    source_m: tuple[float, float, float]
    mic_m: tuple[float, float, float]
    wet: float = Field(1.0, ge=0, le=1, description="Share of the reverberant path in the mix.")


class EqSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    low_shelf_hz: float = 200.0
    low_shelf_db: float = 0.0
    peak_hz: float = 1500.0
    peak_db: float = 0.0
    peak_q: float = 1.0
    high_shelf_hz: float = 5000.0
    high_shelf_db: float = 0.0


class ChainSpec(BaseModel):
    """One recording chain; ``None`` parts are left out."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    soundfont: str | None = Field(None, description="SoundFont path; None: render.soundfont.")
    room: RoomSpec | None = None
    eq: EqSpec | None = None
    lufs: float | None = Field(None, ge=-60, le=0)
    noise_snr_db: float | None = None
    noise_seed: int = 0
    mp3_vbr_quality: float | None = Field(None, ge=0, le=9.5)

    @property
    def chain_id(self) -> str:
        """The name plus a short digest of the parameters (two different chains never share it)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return f"{self.name}-{hashlib.sha256(blob).hexdigest()[:6]}"

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def find_soundfont(file_name: str) -> str:
    for folder in SOUNDFONT_DIRS:
        path = os.path.join(folder, file_name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"SoundFont {file_name} not found in {SOUNDFONT_DIRS} (Debian: apt-get install "
        "fluid-soundfont-gm fluid-soundfont-gs musescore-general-soundfont-small timgm6mb-soundfont)"
    )


def sample_chain(side: str, seed: int, with_soundfont: bool = True) -> ChainSpec:
    """A chain drawn from ``seed`` for the ``train`` or ``eval`` side (same seed, same chain).
    ``with_soundfont=False`` leaves the SoundFont unresolved (``None``: effects only, for
    on-the-fly augmentation of audio that is already synthesised)."""
    if side not in ("train", "eval"):
        raise ValueError(f"chain side must be 'train' or 'eval', got {side!r}")
    rng = np.random.default_rng([seed, 0 if side == "train" else 1])
    fonts = TRAIN_SOUNDFONTS if side == "train" else EVAL_SOUNDFONTS
    font = fonts[int(rng.integers(len(fonts)))]
    rt60 = float(rng.uniform(0.15, 1.8))
    scale = 0.5 + rt60  # bigger rooms for longer reverberation
    dims = tuple(round(float(d * scale), 2) for d in rng.uniform([6, 5, 3], [12, 9, 5]))
    source = (round(dims[0] * 0.3, 2), round(dims[1] * 0.4, 2), 1.2)
    distance = float(rng.uniform(0.15, 0.5))  # close (dry) to far (roomy) microphone
    mic = (
        round(min(dims[0] - 0.3, source[0] + dims[0] * distance), 2),
        round(dims[1] * 0.5, 2),
        1.7,
    )
    eq = EqSpec(
        low_shelf_hz=round(float(rng.uniform(80, 300)), 1),
        low_shelf_db=round(float(rng.uniform(-6, 6)), 2),
        peak_hz=round(float(rng.uniform(400, 3000)), 1),
        peak_db=round(float(rng.uniform(-6, 6)), 2),
        peak_q=round(float(rng.uniform(0.5, 2.0)), 2),
        high_shelf_hz=round(float(rng.uniform(3000, 8000)), 1),
        high_shelf_db=round(float(rng.uniform(-9, 4)), 2),
    )
    return ChainSpec(
        name=f"{side}-{seed}",
        soundfont=find_soundfont(font) if with_soundfont else None,
        room=RoomSpec(rt60_s=round(rt60, 3), dims_m=dims, source_m=source, mic_m=mic, wet=1.0),
        eq=eq,
        lufs=round(float(rng.uniform(-30, -16)), 2),
        noise_snr_db=round(float(rng.uniform(20, 50)), 2),
        noise_seed=int(rng.integers(2**31)),
        mp3_vbr_quality=(
            round(float(rng.uniform(2, 7)), 1) if rng.random() < 0.7 else None
        ),  # 30 % uncompressed
    )


def resolve_chain(name: str, default_soundfont: str | None = None) -> ChainSpec:
    """A chain by name: ``dry`` or ``train-<n>`` / ``eval-<n>``."""
    if name == DRY:
        return ChainSpec(name=DRY, soundfont=default_soundfont)
    match = _SAMPLED.match(name or "")
    if not match:
        raise ValueError(f"unknown recording chain {name!r}: use 'dry', 'train-<n>' or 'eval-<n>'")
    return sample_chain(match.group(1), int(match.group(2)))


def chain_side(name: str) -> str:
    """``train`` or ``eval`` (``dry`` renders with the training SoundFont: train side)."""
    match = _SAMPLED.match(name or "")
    return match.group(1) if match else "train"


# -- processing ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)  # as many rooms as the largest chain pool (config: chain_pool)
def room_impulse_response(room: RoomSpec, sample_rate: int) -> np.ndarray:
    """The simulated impulse response (pyroomacoustics: image sources + ray tracing), peak 1.
    Cached per process (the simulation takes seconds; a room's response never changes): the
    returned array is read-only."""
    import pyroomacoustics as pra

    absorption, _ = pra.inverse_sabine(room.rt60_s, list(room.dims_m))
    shoebox = pra.ShoeBox(
        list(room.dims_m),
        fs=sample_rate,
        materials=pra.Material(absorption),
        max_order=3,
        ray_tracing=True,
        air_absorption=True,
    )
    shoebox.set_ray_tracing(receiver_radius=0.5, n_rays=3000, energy_thres=1e-5)
    shoebox.add_source(list(room.source_m))
    shoebox.add_microphone(list(room.mic_m))
    # Ray tracing draws random rays (numpy and libroom's C++ generator): seed both from the
    # room's parameters for a repeatable response.
    seed = zlib_seed(room.model_dump_json())
    pra.random.seed(numpy=seed, libroom=seed)
    shoebox.compute_rir()
    rir = np.asarray(shoebox.rir[0][0], dtype=np.float64)
    rir = rir / max(float(np.abs(rir).max()), 1e-12)
    rir.setflags(write=False)
    return rir


def zlib_seed(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode()) % (2**31)


def apply_chain(audio: np.ndarray, sample_rate: int, chain: ChainSpec) -> np.ndarray:
    """Everything after synthesis, on mono float32 audio; returns mono float32 (peak <= 0.99)."""
    from scipy.signal import fftconvolve

    x = np.asarray(audio, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError("chains process mono audio ([samples])")
    if x.size == 0 or not np.any(x):
        raise ValueError("cannot record silence through a chain")
    n = x.size
    if chain.room is not None:
        wet = fftconvolve(x, room_impulse_response(chain.room, sample_rate))[:n]
        wet *= np.sqrt(np.sum(x**2) / max(np.sum(wet**2), 1e-20))
        x = chain.room.wet * wet + (1.0 - chain.room.wet) * x
    if chain.eq is not None:
        import pedalboard as pb

        e = chain.eq
        board = pb.Pedalboard(
            [
                pb.LowShelfFilter(cutoff_frequency_hz=e.low_shelf_hz, gain_db=e.low_shelf_db),
                pb.PeakFilter(cutoff_frequency_hz=e.peak_hz, gain_db=e.peak_db, q=e.peak_q),
                pb.HighShelfFilter(cutoff_frequency_hz=e.high_shelf_hz, gain_db=e.high_shelf_db),
            ]
        )
        x = board(x.astype(np.float32), sample_rate).astype(np.float64)
    if chain.lufs is not None:
        import pyloudnorm as pyln

        meter = pyln.Meter(sample_rate)
        loudness = meter.integrated_loudness(x)
        if np.isfinite(loudness):
            x = x * 10.0 ** ((chain.lufs - loudness) / 20.0)
    if chain.noise_snr_db is not None:
        import pedalboard as pb

        rng = np.random.default_rng(chain.noise_seed)
        noise = pb.LowpassFilter(cutoff_frequency_hz=2000.0)(
            rng.standard_normal(n).astype(np.float32), sample_rate
        ).astype(np.float64)
        signal_power = float(np.mean(x**2))
        noise *= np.sqrt(signal_power / (max(float(np.mean(noise**2)), 1e-20))) * 10.0 ** (
            -chain.noise_snr_db / 20.0
        )
        x = x + noise
    peak = float(np.abs(x).max())
    if peak > 0.99:  # rather quieter than clipped (before the codec, which would clip)
        x = x * (0.99 / peak)
    if chain.mp3_vbr_quality is not None:
        import pedalboard as pb

        coded = pb.MP3Compressor(vbr_quality=chain.mp3_vbr_quality)(
            x.astype(np.float32), sample_rate
        )
        x = np.asarray(coded, dtype=np.float64).reshape(-1)[:n]
        if x.size < n:
            x = np.pad(x, (0, n - x.size))
        peak = float(np.abs(x).max())
        if peak > 0.99:
            x = x * (0.99 / peak)
    return x.astype(np.float32)


def render_with_chain(midi, cfg, chain: ChainSpec, wav_path: str) -> tuple[float, dict[str, Any]]:
    """Synthesize ``midi`` with the chain's SoundFont, record it through the chain and write a
    16-bit WAV; returns (duration s, the chain's parameters)."""
    import soundfile as sf

    from mess_ray.render.synth import render_midi

    if cfg.channels != 1:
        raise ValueError("recording chains render mono (render.channels: 1)")
    synth_cfg = cfg.model_copy(update={"soundfont": chain.soundfont or cfg.soundfont})
    audio = render_midi(midi, synth_cfg)
    if len(audio) == 0 or not np.any(audio):
        raise RuntimeError("synthesis produced silence (check the SoundFont and the programs)")
    audio = apply_chain(audio, cfg.sample_rate, chain)
    sf.write(str(wav_path), audio, cfg.sample_rate, subtype="PCM_16", format="WAV")
    params = chain.model_dump(mode="json")
    params["soundfont"] = synth_cfg.soundfont
    return len(audio) / cfg.sample_rate, params


# -- on-the-fly augmentation ---------------------------------------------------------------------
AUGMENT_CHAIN_SEED0 = (
    1000  # augmentation chains are train-1000, train-1001, ... (not rendered ones)
)
REFERENCE_LUFS = -23.0  # EBU R128: a chain's loudness target, as a gain relative to this


@functools.lru_cache(maxsize=256)
def augmentation_chain(index: int) -> ChainSpec:
    """The ``index``-th training-side chain of the augmentation pool (effects only)."""
    if index < 0:
        raise ValueError(f"augmentation chain index must be >= 0, got {index}")
    return sample_chain("train", AUGMENT_CHAIN_SEED0 + index, with_soundfont=False)


def record_segment(
    audio: np.ndarray, sample_rate: int, chain: ChainSpec, noise_seed: int
) -> np.ndarray:
    """A segment of synthesised audio "recorded" through ``chain``'s effects after synthesis
    (:func:`apply_chain`: room, microphone EQ, noise, codec), for on-the-fly augmentation.

    Loudness normalisation is a property of a whole recording, so on a segment it becomes a
    fixed gain (the chain's LUFS target relative to :data:`REFERENCE_LUFS`): the level
    differences between segments of one recording (the player's dynamics) are kept. The noise
    is drawn from ``noise_seed``. A silent segment (padding) is returned unchanged."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError("record_segment takes mono audio ([samples])")
    if x.size == 0 or not np.any(x):
        return x.copy()
    gain = 1.0 if chain.lufs is None else 10.0 ** ((chain.lufs - REFERENCE_LUFS) / 20.0)
    effects = chain.model_copy(update={"lufs": None, "noise_seed": int(noise_seed)})
    return apply_chain(x * np.float32(gain), sample_rate, effects)
