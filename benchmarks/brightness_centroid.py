"""Does CC74 ("brightness") change what FluidSynth renders? (issue 15, task 6)

The evidence for dropping the styles' former ``brightness`` key: renders the same notes with
CC74 = 0, 64 and 127 at time 0 through every available chain SoundFont and prints one JSON line
per SoundFont with the spectral centroid (librosa, mean over frames) of each, the largest
relative difference and the largest sample difference. FluidSynth has no default CC74
modulator, and none of FluidR3_GM, TimGM6mb, MuseScore_General_Lite brings one: the audio is
bit-identical (max_sample_difference_0_vs_127 = 0), so StyleSpec no longer has the key.

    python -m benchmarks.brightness_centroid
"""

from __future__ import annotations

import json
import os

import numpy as np
import pretty_midi

from mess_ray.config import RenderConfig
from mess_ray.render.chains import EVAL_SOUNDFONTS, TRAIN_SOUNDFONTS, find_soundfont
from mess_ray.render.synth import render_midi

CC_BRIGHTNESS = 74


def notes(cc74: int) -> pretty_midi.PrettyMIDI:
    """24 piano notes with CC74 set to ``cc74`` at time 0."""
    midi = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(0)
    inst.control_changes.append(pretty_midi.ControlChange(CC_BRIGHTNESS, cc74, 0.0))
    for i in range(24):
        pitch = 48 + (i * 7) % 36
        inst.notes.append(pretty_midi.Note(80, pitch, i * 0.25, i * 0.25 + 0.5))
    midi.instruments.append(inst)
    return midi


def main() -> int:
    import librosa

    sr = 22050
    for name in TRAIN_SOUNDFONTS + EVAL_SOUNDFONTS:
        try:
            font = find_soundfont(name)
        except FileNotFoundError:
            continue
        cfg = RenderConfig(sample_rate=sr, soundfont=font)
        centroids, audio = {}, {}
        for value in (0, 64, 127):
            x = render_midi(notes(value), cfg)
            audio[value] = x
            centroids[value] = float(librosa.feature.spectral_centroid(y=x, sr=sr).mean())
        n = min(len(a) for a in audio.values())
        max_sample_diff = float(np.abs(audio[0][:n] - audio[127][:n]).max())
        spread = (max(centroids.values()) - min(centroids.values())) / centroids[64]
        print(
            json.dumps(
                {
                    "figure": "cc74_centroid",
                    "soundfont": os.path.basename(font),
                    "centroid_hz": centroids,
                    "relative_spread": round(spread, 5),
                    "max_sample_difference_0_vs_127": max_sample_diff,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
