"""What the benchmarks share: JSON-line figures, the machine's load beside them, percentiles,
moving averages, a paired cluster bootstrap, opening a protocol corpus and an array cache."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from mess_ray import console


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers and Ray ports the benchmarks start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float]:
    """1-, 5- and 15-minute load averages: other jobs on the same cores skew CPU figures."""
    return [round(x, 2) for x in os.getloadavg()]


def emit(record: dict[str, Any] | None = None, out: Any = None, **fields: Any) -> dict:
    """Print one figure as a JSON line (``record`` and/or keyword fields). ``out``: a list the
    record is appended to, or an open text file the line is also written to."""
    record = {**(record or {}), **fields}
    line = json.dumps(record)
    console.say(line)  # the terminal, also while a quiet console sends stdout to the log
    if isinstance(out, list):
        out.append(record)
    elif out is not None:
        out.write(line + "\n")
        out.flush()
    return record


def emit_with_load(record: dict[str, Any] | None = None, out: Any = None, **fields: Any) -> dict:
    """:func:`emit` with the load averages added as ``loadavg``."""
    return emit({**(record or {}), **fields, "loadavg": loadavg()}, out)


def percentiles(samples_ms: Any, prefix: str = "") -> dict[str, float]:
    """p50 and p99 (ms, 3 decimals) and the sample count, keys prefixed by ``prefix``."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    return {
        f"{prefix}p50_ms": round(float(np.percentile(arr, 50)), 3),
        f"{prefix}p99_ms": round(float(np.percentile(arr, 99)), 3),
        f"{prefix}n": int(arr.size),
    }


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps (shorter at the start)."""
    x = np.asarray(values, dtype=np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(x)])
    ends = np.arange(1, len(x) + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def cluster_bootstrap_ci(
    strata: list[tuple[np.ndarray, np.ndarray]],
    iterations: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Mean over strata of the mean per-query value, with a bootstrap interval.

    ``strata``: (values [Q], cluster ids [Q]) per stratum; NaN values are dropped. Each
    iteration resamples every stratum's clusters with replacement (all queries of a drawn
    cluster come along), so correlation within a cluster widens the interval as it should.
    """
    if not strata:
        raise ValueError("no strata to bootstrap")
    rng = np.random.default_rng(seed)
    point, draws = [], np.zeros((iterations, len(strata)))
    for column, (values, clusters) in enumerate(strata):
        values, clusters = np.asarray(values, dtype=np.float64), np.asarray(clusters)
        keep = ~np.isnan(values)
        if not keep.any():
            raise ValueError(f"stratum {column} has no finite value")
        _, cluster_index = np.unique(clusters[keep], return_inverse=True)
        sums = np.bincount(cluster_index, weights=values[keep])
        counts = np.bincount(cluster_index).astype(np.float64)
        point.append(sums.sum() / counts.sum())
        picks = rng.integers(0, len(sums), size=(iterations, len(sums)))
        draws[:, column] = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    means = draws.mean(axis=1)
    tail = (1.0 - level) / 2.0
    return (
        float(np.mean(point)),
        float(np.quantile(means, tail)),
        float(np.quantile(means, 1.0 - tail)),
    )


def protocol_store(config: str, sets: list[str], boot: int | None = None):
    """(config, storage, latest ingest version) of a protocol corpus for the benchmarks that
    score on it (``--config``/``--set``; ``boot``: the bootstrap's draws)."""
    from mess_ray.config import load_config
    from mess_ray.pipeline import with_storage_resolved
    from mess_ray.storage import Storage

    extra = [] if boot is None else [f"eval.bootstrap_samples={boot}"]
    cfg = with_storage_resolved(load_config(config, [*sets, *extra]))
    storage = Storage.from_config(cfg.storage)
    return cfg, storage, storage.require_latest("ingest")


def cached_arrays(cache: str | None, name: str, make) -> dict[str, np.ndarray]:
    """``make()`` (a dict of arrays), stored as ``<cache>/<name>.npz`` and read back from there
    on the next call (``cache`` None: always made)."""
    path = os.path.join(cache, f"{name}.npz") if cache else None
    if path and os.path.exists(path):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    out = make()
    if path:
        os.makedirs(cache, exist_ok=True)
        np.savez(path, **out)
    return out


def emit_protocol_rows(cfg, views, systems, data, reference: str, figure: str, **fields) -> None:
    """Score ``systems`` on the protocol ``views`` (paired verdicts against ``reference``) and
    print one JSON line per headline row as ``figure`` (the passage's top-hit error left out)."""
    from mess_ray.eval.protocol import PASSAGE, figure_fields, headline_rows, score_table

    rows = score_table(
        views,
        systems,
        data,
        reference,
        ndcg_k=cfg.eval.ndcg_k,
        n_boot=cfg.eval.bootstrap_samples,
        seed=cfg.eval.seed,
    )
    for row in headline_rows(rows):
        if row["task"] == PASSAGE and row["metric"] == "top_hit_error_s":
            continue
        emit_with_load(figure=figure, **fields, **figure_fields(row))
