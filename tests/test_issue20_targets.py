"""benchmarks.issue20_targets: issue 20's targets checked on protocol rows already computed."""

import json

import pytest

from benchmarks import issue20_targets as it

M = "model"


def row(task, chains, system, value, verdict="n/a", split="test", chance=0.04, metric=None):
    return {
        "split": split,
        "task": task,
        "chains": chains,
        "metric": metric or it.PRIMARY[task],
        "system": system,
        "value": value,
        "chance": chance,
        "reference": M,
        "reference_verdict": verdict,
    }


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def records(capsys):
    return [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]


def test_each_target_is_met_or_missed_by_its_own_rule(tmp_path, capsys):
    rows = [
        # performer identity: 3x chance and a win over every baseline, or not
        row("performer_identity", "dry", M, 0.15),
        row("performer_identity", "dry", "chroma", 0.07, "wins"),
        row("performer_identity", "dry", "pretrain", 0.05, "wins"),
        row("performer_identity", "eval-1", M, 0.15),
        row("performer_identity", "eval-1", "chroma", 0.12, "ties"),
        row("performer_identity", "dry->eval-1", M, 0.10),  # 3x chance missed, and < 0.9 x 0.15
        # excerpt level against the MIDI reference
        row("performer_identity_excerpt", "dry", M, 0.20),
        row("performer_identity_excerpt", "dry", "midi-reference", 0.30),
        # chain invariance: only between the evaluation-only chains
        row("chain_invariance", "eval-1->eval-2", M, 0.96),
        row("chain_invariance", "eval-2->eval-1", M, 0.90),
        row("chain_invariance", "dry->eval-1", M, 0.50),
        # agreement above the learned head, and across chains within 10 %
        row("expressive_agreement", "dry", M, 0.30),
        row("expressive_agreement", "dry", "descriptor_head", 0.20, "wins"),
        row("expressive_agreement", "dry->eval-1", M, 0.28),
        # another metric and another split are not read
        row("expressive_agreement", "dry", M, 0.9, metric="recall@1"),
        row("chain_invariance", "eval-2->eval-1", M, 1.0, split="validation"),
    ]
    assert it.main(["--rows", write(tmp_path / "r.jsonl", rows), "--model", M]) == 0
    out = records(capsys)
    got = {(r["target"], r["chains"]): r for r in out if r["figure"] == "issue20_target"}
    perf = "performer 3x chance, above every baseline"
    assert got[(perf, "dry")]["met"] and got[(perf, "dry")]["beats"] == ["chroma", "pretrain"]
    assert not got[(perf, "eval-1")]["met"] and got[(perf, "eval-1")]["ties"] == ["chroma"]
    assert not got[(perf, "dry->eval-1")]["met"]
    assert not got[("cross-chain >= 0.9 x same chain", "dry->eval-1")]["met"]
    assert not got[("excerpt within 0.05 of the MIDI reference", "dry")]["met"]
    inv = "chain invariance >= 0.95"
    assert got[(inv, "eval-1->eval-2")]["met"] and not got[(inv, "eval-2->eval-1")]["met"]
    assert (inv, "dry->eval-1") not in got
    assert got[("agreement above the descriptor head", "dry")]["met"]
    cross = got[("cross-chain >= 0.9 x same chain", "dry->eval-1")]
    assert cross["bar"] == pytest.approx(0.135)
    agree = [r for r in out if r.get("task") == "expressive_agreement" and r["chains"] != "dry"]
    assert agree[0]["met"] and agree[0]["bar"] == pytest.approx(0.27)
    summary = out[-1]
    assert summary["figure"] == "issue20_targets" and summary["all_met"] is False
    assert summary["met"][inv] == "1 of 2"


def test_the_first_file_holding_a_condition_wins_and_manifests_are_read(tmp_path, capsys):
    first = [row("chain_invariance", "eval-1->eval-2", M, 0.90)]
    manifest = {
        "benchmark": {
            "reference": M,
            "rows": [
                row("chain_invariance", "eval-1->eval-2", M, 0.99),
                row("chain_invariance", "eval-2->eval-1", M, 0.97),
            ],
        }
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    args = ["--rows", write(tmp_path / "a.jsonl", first), str(tmp_path / "manifest.json")]
    assert it.main([*args, "--model", M]) == 0
    got = {r["chains"]: r["value"] for r in records(capsys) if r["figure"] == "issue20_target"}
    assert got == {"eval-1->eval-2": 0.9, "eval-2->eval-1": 0.97}


def test_rows_paired_against_another_model_or_without_the_model_are_refused(tmp_path):
    rows = [row("chain_invariance", "eval-1->eval-2", M, 0.9)]
    path = write(tmp_path / "r.jsonl", rows)
    with pytest.raises(SystemExit, match="paired against"):
        it.main(["--rows", path, "--model", "other"])
    other = [{**r, "reference": None} for r in rows]
    with pytest.raises(SystemExit, match="no test rows"):
        it.main(["--rows", write(tmp_path / "o.jsonl", other), "--model", "other"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="benchmark.rows"):
        it.main(["--rows", str(tmp_path / "bad.json")])
