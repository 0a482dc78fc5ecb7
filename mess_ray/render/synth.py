"""Synthesis: PrettyMIDI to audio with the FluidSynth command-line renderer.

FluidSynth's fast-render mode (``-F``) writes a WAV as fast as the CPU allows, with the
SoundFont's own samples, reverb and chorus. The rendered file is then trimmed: audio after
the last note-off is kept only while it is audible (reverb/release tail), up to ``tail_s``,
and ends with a short fade so the cut never clicks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pretty_midi
import soundfile as sf

from mess_ray.config import RenderConfig
from mess_ray.render.expressive import last_note_end
from mess_ray.segments import mix_to_mono

FADE_OUT_S = 0.05


def fluidsynth_binary() -> str:
    binary = shutil.which("fluidsynth")
    if binary is None:
        raise FileNotFoundError(
            "the `fluidsynth` command is not installed (apt-get install fluidsynth)"
        )
    return binary


def check_soundfont(path: str) -> str:
    """The SoundFont path, or a clear error when it is missing."""
    if not path or not Path(path).is_file():
        raise FileNotFoundError(
            f"SoundFont {path!r} not found: set render.soundfont to a .sf2 file "
            "(Debian/Ubuntu: apt-get install fluid-soundfont-gm)"
        )
    return path


def trim_tail(
    audio: np.ndarray, sample_rate: int, last_note_end_s: float, tail_s: float, silence_db: float
) -> np.ndarray:
    """Cut the tail after ``last_note_end_s``: at the first point where it stays below
    ``silence_db`` (relative to full scale), and never more than ``tail_s`` after it."""
    if audio.ndim not in (1, 2):
        raise ValueError("audio must be [samples] or [samples, channels]")
    mono_level = np.abs(audio) if audio.ndim == 1 else np.abs(audio).max(axis=1)
    note_end = min(int(round(last_note_end_s * sample_rate)), len(audio))
    hard_end = min(len(audio), note_end + int(round(tail_s * sample_rate)))
    threshold = 10.0 ** (silence_db / 20.0)
    loud = np.nonzero(mono_level[note_end:hard_end] > threshold)[0]
    end = note_end + (int(loud[-1]) + 1 if len(loud) else 0)
    # Trailing silence *before* the last note-off (e.g. a rest at the end) goes too.
    loud_before = np.nonzero(mono_level[:end] > threshold)[0]
    end = int(loud_before[-1]) + 1 if len(loud_before) else end
    out = np.array(audio[:end], dtype=np.float32, copy=True)
    fade = min(len(out), int(FADE_OUT_S * sample_rate))
    if fade > 1:
        ramp = np.linspace(1.0, 0.0, fade, dtype=np.float32)
        out[-fade:] *= ramp if out.ndim == 1 else ramp[:, None]
    return out


def render_midi(midi: pretty_midi.PrettyMIDI, cfg: RenderConfig) -> np.ndarray:
    """Synthesize to float32 audio at ``cfg.sample_rate``: [samples] (mono) or [samples, 2]."""
    soundfont = check_soundfont(cfg.soundfont)
    binary = fluidsynth_binary()
    if not any(inst.notes for inst in midi.instruments):
        raise ValueError("cannot synthesize a MIDI file without notes")
    with tempfile.TemporaryDirectory(prefix="mess-ray-synth-") as tmp:
        mid_path, wav_path = os.path.join(tmp, "in.mid"), os.path.join(tmp, "out.wav")
        midi.write(mid_path)
        cmd = [
            binary,
            "-ni",
            "-q",
            # Decode only the samples the MIDI's presets use (same audio; a compressed .sf3
            # otherwise decodes every instrument on each run: 2-3x the CPU time).
            "-o",
            "synth.dynamic-sample-loading=1",
            "-g",
            str(cfg.gain),
            "-r",
            str(cfg.sample_rate),
            "-T",
            "wav",
            "-F",
            wav_path,
            soundfont,
            mid_path,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.synth_timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"fluidsynth ran longer than {cfg.synth_timeout_s}s") from exc
        if proc.returncode != 0 or not os.path.exists(wav_path):
            raise RuntimeError(
                f"fluidsynth failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        audio, rate = sf.read(wav_path, dtype="float32", always_2d=True)
    if rate != cfg.sample_rate:
        raise RuntimeError(f"fluidsynth wrote {rate} Hz, asked for {cfg.sample_rate} Hz")
    audio = mix_to_mono(audio) if cfg.channels == 1 else audio
    return trim_tail(audio, rate, last_note_end(midi), cfg.tail_s, cfg.silence_db)


def render_to_wav(midi: pretty_midi.PrettyMIDI, cfg: RenderConfig, wav_path: str | Path) -> float:
    """Synthesize to a 16-bit WAV file; returns its duration in seconds."""
    audio = render_midi(midi, cfg)
    if len(audio) == 0 or not np.any(audio):
        raise RuntimeError("synthesis produced silence (check the SoundFont and the programs)")
    peak = float(np.abs(audio).max())
    if peak > 0.99:
        # Rather quieter than clipped: 16-bit PCM would square off the loudest chords.
        audio = audio * (0.99 / peak)
    sf.write(str(wav_path), audio, cfg.sample_rate, subtype="PCM_16", format="WAV")
    return len(audio) / cfg.sample_rate
