"""The performed-MIDI performer-identity ceiling (benchmarks/midi_performer_ceiling.py) on a tiny
ASAP-layout folder whose two pianists play every piece, each in their own manner."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import make_score

from benchmarks import midi_performer_ceiling


def _asap_folder(root):
    rows = []
    for p, work in enumerate(("Prelude", "Etude", "Sonata")):
        for tag, velocity, held in (("Soft01", 40, 0.4), ("Loud02", 110, 1.0)):
            midi = make_score(bars=4, seed=p)
            for inst in midi.instruments:
                for note in inst.notes:
                    note.velocity = velocity
                    note.end = note.start + held * (note.end - note.start)
            folder = root / "Bach" / work
            folder.mkdir(parents=True, exist_ok=True)
            midi.write(str(folder / f"{tag}.mid"))
            rows.append(
                {
                    "composer": "Bach",
                    "title": work,
                    "folder": f"Bach/{work}",
                    "midi_score": "",
                    "midi_performance": f"Bach/{work}/{tag}.mid",
                    "performance_annotations": f"Bach/{work}/{tag}_annotations.txt",
                    "midi_score_annotations": f"Bach/{work}/missing.txt",  # unreadable: no beats
                }
            )
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _ceiling_rows(tmp_path, capsys, *args: str) -> list[dict]:
    """The benchmark's JSON lines on the tiny folder, run with ``args``."""
    source = _asap_folder(tmp_path / "asap")
    assert midi_performer_ceiling.main(["--source", str(source), *args]) == 0
    return [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]


def test_pianists_with_their_own_dynamics_and_touch_are_found_in_every_other_piece(
    tmp_path, capsys
):
    rows = _ceiling_rows(tmp_path, capsys, "--seconds", "4", "0", "--boot", "100")
    by = {(r["seconds"], r["system"]): r for r in rows}
    assert {r["seconds"] for r in rows} == {4, "whole performance"}
    for seconds in (4, "whole performance"):
        corpus = by[(seconds, "midi z-scored over the corpus")]
        assert corpus["map"] == pytest.approx(1.0) and corpus["queries"] == 6
        assert corpus["pianists"] == 2 and corpus["piece_count"] == 3
        # two relevant of four candidates: a random ranking's expected AP
        assert corpus["chance"] == pytest.approx(49 / 72, abs=1e-3)


def test_ablation_leaves_out_each_descriptor_once_and_a_redundant_cue_still_finds_the_pianist(
    tmp_path, capsys
):
    """The two pianists differ in velocity and articulation only: without either the other
    still finds them; the ablation rows name every expressive descriptor once per system."""
    rows = _ceiling_rows(tmp_path, capsys, "--seconds", "0", "--boot", "50", "--ablate")
    names = {r["system"] for r in rows}
    for system in ("midi z-scored over the corpus", "midi z-scored within each piece"):
        for column in midi_performer_ceiling.EXPRESSIVE_MIDI_DESCRIPTORS:
            assert f"{system} without {column}" in names
    by = {r["system"]: r for r in rows}
    corpus = "midi z-scored over the corpus"
    assert by[f"{corpus} without velocity_mean"]["map"] == pytest.approx(1.0)
    assert by[f"{corpus} without articulation_ratio"]["map"] == pytest.approx(1.0)
    assert not any(n.startswith("random vectors without") for n in names)
