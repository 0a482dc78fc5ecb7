"""Issue 20's targets, checked on protocol rows already computed: which are met, by which figure,
and which baseline stands in the way. Nothing is embedded or scored here; every figure comes from
the rows given (a protocol run's JSON lines, ``benchmarks.protocol_context`` /
``protocol_equalise`` output, or a shipped model's ``manifest.json``, whose ``benchmark.rows``
are its protocol table), so the check is as reproducible as the run that made them.

    python -m benchmarks.issue20_targets --rows mess_ray/models/shipped/tiny-asap-v3/manifest.json \\
        docs/spectral_eq/test_eq1.jsonl --model shipped:tiny-asap-v3 --split test \\
        --eval-chains eval-1 eval-2

The targets (issue 20; the test split of the yardstick, CIs over pieces):

* ``performer_identity``: segment mAP at least 3x chance and above every baseline (the paired
  verdict of the model against it a win), in every chain condition the rows hold;
* ``performer_identity_excerpt``: excerpt-level mAP within 0.05 of the performed-MIDI reference
  (``midi-reference``) of the same rows (at least the reference minus 0.05);
* ``chain_invariance``: recall@1 >= 0.95 between two evaluation-only chains (``--eval-chains``);
* ``cross_chain``: expressive agreement and performer identity across chains (``a->b``) no more
  than 10 % below the query chain's own figure (``a``);
* ``expressive_agreement``: within a chain, above the learned descriptor head (paired win).

Rows of the same task and chains in several files: the first file that holds them wins (give
the complete run first). The model must be the rows' paired reference (their verdicts are its
own against each system). One JSON line per check, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import emit

#: systems that are baselines of the model (the brief's list): hand-crafted statistics, the
#: timelines and alignment, the expression features, the learned descriptor head, random
#: vectors and a random encoder. ``midi-reference`` is a reference, not a contender; other
#: models (and ``+eq`` / ``+work-rel`` variants) are not baselines.
BASELINES = (
    "chroma",
    "mfcc",
    "descriptors",
    "descriptors+rec-rel",
    "descriptor_head",
    "audio-expression",
    "audio-expression+rec-rel",
    "chroma_timeline",
    "onset_timeline",
    "cens_dtw",
    "chance",
    "random",
)
PRIMARY = {
    "performer_identity": "map",
    "performer_identity_excerpt": "map",
    "chain_invariance": "recall@1",
    "expressive_agreement": "ndcg@10",
}


def load_rows(path: str) -> tuple[list[dict[str, Any]], str | None]:
    """Protocol rows of one file and its paired reference (None when the rows do not say)."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        bench = json.loads(text).get("benchmark") or {}
        if "rows" not in bench:
            raise SystemExit(f"{path}: no benchmark.rows (not a shipped model's manifest?)")
        return list(bench["rows"]), bench.get("reference")
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    rows = [r for r in rows if r.get("task") and r.get("system")]
    refs = {r["reference"] for r in rows if r.get("reference")}
    if len(refs) > 1:
        raise SystemExit(f"{path}: rows paired against several references {sorted(refs)}")
    return rows, (refs.pop() if refs else None)


def merged_rows(paths: list[str], model: str, split: str) -> dict[tuple[str, str], list[dict]]:
    """(task, chains) -> the primary-metric rows of ``split``, from the first file holding them."""
    out: dict[tuple[str, str], list[dict]] = {}
    for path in paths:
        rows, reference = load_rows(path)
        if reference is not None and reference != model:
            raise SystemExit(f"{path}: rows are paired against {reference!r}, not {model!r}")
        found: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            if r.get("split") == split and PRIMARY.get(r["task"]) == r.get("metric"):
                found.setdefault((r["task"], r["chains"]), []).append(r)
        for key, group in found.items():
            out.setdefault(key, group)
    return out


def _value(group: list[dict], system: str) -> dict | None:
    return next((r for r in group if r["system"] == system and r.get("value") is not None), None)


def _standing(group: list[dict], ssl: str | None) -> dict[str, list[str]]:
    """The model's paired verdicts against every baseline of the rows."""
    out: dict[str, list[str]] = {"beats": [], "ties": [], "loses_to": []}
    names = set(BASELINES) | ({ssl} if ssl else set())
    for r in group:
        if r["system"] in names and r.get("value") is not None:
            key = {"wins": "beats", "loses": "loses_to"}.get(r.get("reference_verdict"), "ties")
            out[key].append(r["system"])
    return {k: sorted(v) for k, v in out.items()}


def check(rows, model: str, eval_chains: list[str], ssl: str | None) -> list[dict[str, Any]]:
    """One record per target and chain condition the rows hold."""
    out = []

    def add(target, task, chains, value, bar, met, **extra):
        out.append(
            {
                "figure": "issue20_target",
                "target": target,
                "task": task,
                "chains": chains,
                "value": None if value is None else round(value, 4),
                "bar": None if bar is None else round(bar, 4),
                "met": bool(met),
                **extra,
            }
        )

    def own(task, chains):
        row = _value(rows.get((task, chains), []), model)
        return None if row is None else float(row["value"])

    for (task, chains), group in sorted(rows.items()):
        mine = _value(group, model)
        if mine is None:
            continue
        v = float(mine["value"])
        if task == "performer_identity":
            chance = mine.get("chance")
            stand = _standing(group, ssl)
            bar = None if chance is None else 3 * float(chance)
            met = bar is not None and v >= bar and not stand["ties"] and not stand["loses_to"]
            add("performer 3x chance, above every baseline", task, chains, v, bar, met, **stand)
        elif task == "performer_identity_excerpt":
            ref = _value(group, "midi-reference")
            if ref is not None:
                bar = float(ref["value"]) - 0.05
                add("excerpt within 0.05 of the MIDI reference", task, chains, v, bar, v >= bar)
        elif task == "chain_invariance":
            a, _, b = chains.partition("->")
            if a in eval_chains and b in eval_chains:
                add("chain invariance >= 0.95", task, chains, v, 0.95, v >= 0.95)
        elif task == "expressive_agreement" and "->" not in chains:
            head = _value(group, "descriptor_head")
            if head is not None:
                won = head.get("reference_verdict") == "wins"
                add(
                    "agreement above the descriptor head",
                    task,
                    chains,
                    v,
                    float(head["value"]),
                    won,
                    verdict=head.get("reference_verdict"),
                )
        if task in ("expressive_agreement", "performer_identity") and "->" in chains:
            query_chain = chains.partition("->")[0]
            same = own(task, query_chain)
            if same is not None:
                add("cross-chain >= 0.9 x same chain", task, chains, v, 0.9 * same, v >= 0.9 * same)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", required=True, help="JSON-lines files or manifests")
    parser.add_argument("--model", default="shipped:tiny-asap-v4")
    parser.add_argument("--split", choices=["validation", "test"], default="test")
    parser.add_argument("--eval-chains", nargs="*", default=["eval-1", "eval-2"])
    parser.add_argument(
        "--ssl", default="pretrain", help="the SSL encoder alone, a baseline where the rows have it"
    )
    args = parser.parse_args(argv)
    rows = merged_rows(args.rows, args.model, args.split)
    records = check(rows, args.model, args.eval_chains, args.ssl)
    if not records:
        raise SystemExit(f"no {args.split} rows of {args.model!r} in {args.rows}")
    for record in records:
        emit(record)
    by_target: dict[str, list[bool]] = {}
    for r in records:
        by_target.setdefault(r["target"], []).append(r["met"])
    emit(
        figure="issue20_targets",
        model=args.model,
        split=args.split,
        met={t: f"{sum(m)} of {len(m)}" for t, m in by_target.items()},
        all_met=all(all(m) for m in by_target.values()),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
