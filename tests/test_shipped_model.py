"""The model shipped inside the package: it loads, and embeds its reference clips as recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mess_ray.config import load_config
from mess_ray.models import Embedder, shipped
from mess_ray.storage import Storage


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"storage.root={tmp_path / 'store'}"])


def test_default_shipped_model_is_in_the_package():
    assert shipped.DEFAULT_SHIPPED in shipped.available()
    assert shipped.shipped_dir() == shipped.shipped_dir(shipped.DEFAULT_SHIPPED)


@pytest.mark.parametrize("name", shipped.available())
def test_every_shipped_model_is_small_and_documented(name):
    """Each folder says what it heard, under which licence, from which recipe (a config file of
    this repository that still loads), and which split its figures come from."""
    from pathlib import Path

    folder = shipped.shipped_dir(name)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 2_000_000, size
    manifest = shipped.shipped_manifest(name)
    assert manifest["name"] == name
    assert (shipped.model_dir(name) / "embedding_config.json").exists()
    if manifest.get("weights_of"):  # a derived model: the source's weights, untouched
        source = shipped.shipped_manifest(manifest["weights_of"])
        assert not (folder / "model").exists() and not source.get("weights_of")
        assert manifest["weights_sha256"] == source["weights_sha256"]
        assert manifest["content_timeline"]
    assert manifest["what"] and manifest["training_data_licence"]
    recipe = Path(__file__).resolve().parents[1] / manifest["recipe"]["config_file"]
    assert load_config(str(recipe)).model.size == manifest["recipe"]["config"]["model"]["size"]
    assert manifest["recipe"]["config"]["pretrain"]["deterministic"] is True
    assert manifest["recipe"]["config"]["finetune"]["deterministic"] is True
    benchmark = manifest["benchmark"]
    assert benchmark["command"] and benchmark["split"]
    if "rows" in benchmark:  # the protocol table (validation chose, test reported once)
        mine = [r for r in benchmark["rows"] if r["system"] == benchmark["shipped_as"]]
        assert {r["split"] for r in mine} == {"validation", "test"}
        assert {r["task"] for r in mine} >= {"expressive_agreement", "performer_identity"}
    else:  # the evaluate stage's older tasks, on its held-out (test) pieces
        assert benchmark["split"].startswith("test") and benchmark["held_out_pieces"]
        assert "finetune" in benchmark["tasks"]["style_retrieval"]["metrics"]


@pytest.mark.parametrize("name", shipped.available())
def test_shipped_weights_embed_the_reference_clips_as_recorded(cfg, name):
    ref = "shipped" if name == shipped.DEFAULT_SHIPPED else f"shipped:{name}"
    embedder = Embedder.from_ref(cfg, Storage.from_config(cfg.storage), ref)
    assert embedder.info["shipped"] == name
    assert embedder.info["kind"] == "embedding_model" and embedder.info["facet_layout"]
    # A declared content timeline is part of the model's vectors, recorded as such.
    declared = shipped.shipped_manifest(name).get("content_timeline")
    assert embedder.info["content_timeline"] == declared
    assert ("timeline" in embedder.info["facet_layout"]) == bool(declared)
    reference = np.load(shipped.shipped_dir(name) / shipped.REFERENCE)
    recorded = shipped.shipped_manifest(name)["reference"]
    assert recorded["sample_rate"] == cfg.audio.sample_rate
    clips = np.stack(
        [
            shipped.reference_clip(int(seed), recorded["sample_rate"], recorded["window_s"])
            for seed in reference["seeds"]
        ]
    )
    vectors = embedder.embed(clips)
    np.testing.assert_allclose(vectors, reference["vectors"], rtol=0, atol=1e-5)
    # Rebuilt from the index manifest's info (what Serve does), by name: the same vectors.
    again = Embedder.from_info(
        cfg, Storage.from_config(cfg.storage), json.loads(json.dumps(embedder.info))
    )
    np.testing.assert_allclose(again.embed(clips), vectors, rtol=0, atol=1e-6)


def test_auto_ref_prefers_a_local_finetune_and_falls_back_to_the_shipped_model(cfg, tmp_path):
    storage = Storage.from_config(cfg.storage)
    assert Embedder.from_ref(cfg, storage, "auto").info["shipped"] == shipped.DEFAULT_SHIPPED
    with pytest.raises(FileNotFoundError, match="no shipped model 'nope'"):
        Embedder.from_ref(cfg, storage, "shipped:nope")
    # A finetune artifact published here wins over the shipped model.
    storage.put_dir(str(shipped.model_dir()), "finetune/v1/model")
    storage.publish("finetune", "v1", {"counts": {}})
    info = Embedder.from_ref(cfg, storage, "auto").info
    assert info["stage"] == "finetune" and info["version"] == "v1" and not info.get("shipped")


def test_reference_clip_is_deterministic_and_audible():
    a = shipped.reference_clip(0, 16000, 4.0)
    assert a.shape == (64000,) and a.dtype == np.float32
    np.testing.assert_array_equal(a, shipped.reference_clip(0, 16000, 4.0))
    assert not np.allclose(a, shipped.reference_clip(1, 16000, 4.0))
    assert 0.01 < float(np.sqrt(np.mean(a**2))) < 1.0


def test_every_shipped_file_is_package_data():
    """A wheel (not only an editable install) must carry the model: pyproject's globs cover it."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["mess_ray"]
    package = root / "mess_ray"
    files = [p for p in shipped.SHIPPED_ROOT.rglob("*") if p.is_file()]
    assert files
    for path in files:
        rel = path.relative_to(package).as_posix()
        # setuptools globs: '*' does not cross '/'.
        assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), rel


def _ship_model():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "ship_model.py"
    spec = importlib.util.spec_from_file_location("ship_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_protocol_benchmark_keeps_headline_rows_of_every_plain_system_on_both_splits():
    ship_model = _ship_model()
    row = {
        "chains": "dry",
        "value": 0.123456789,
        "ci_low": 0.1,
        "ci_high": 0.2,
        "reference_verdict": "wins",
        "not_a_figure": 1,
    }
    rows = [
        {**row, "split": split, "task": task, "metric": metric, "system": system}
        for split in ("validation", "test")
        for task, metric in (("expressive_agreement", "ndcg@10"), ("performer_identity", "map"))
        for system in ("finetune", "chroma", "finetune+work-rel")
    ] + [{**row, "split": "test", "task": "performer_identity", "metric": "mrr", "system": "x"}]
    table = {"summary": {"reference": "finetune", "split": {"test": ["p"]}}, "rows": rows}
    out = ship_model.protocol_benchmark(table, "finetune", "python -m benchmarks.protocol")
    assert out["shipped_as"] == "finetune" and out["command"] == "python -m benchmarks.protocol"
    assert {r["system"] for r in out["rows"]} == {"finetune", "chroma"}  # no variants, no mrr
    assert len(out["rows"]) == 8 and out["rows"][0]["value"] == 0.1235
    # the figure's fields as the protocol's benchmarks print them, verdicts included
    assert out["rows"][0]["reference_verdict"] == "wins" and "not_a_figure" not in out["rows"][0]
    with pytest.raises(SystemExit, match="no system 'nope'"):
        ship_model.protocol_benchmark(table, "nope", "")


def test_attached_rows_are_the_headline_rows_of_both_splits_paired_against_the_model(tmp_path):
    ship_model = _ship_model()

    def row(split, system, metric="map", **extra):
        return {
            "figure": "protocol_context",
            "split": split,
            "task": "performer_identity",
            "chains": "dry",
            "metric": metric,
            "system": system,
            "value": 0.123456,
            **extra,
        }

    lines = [row(s, "m") for s in ("validation", "test")]
    lines += [row("test", "chroma", reference="m", reference_verdict="wins")]
    lines += [row("test", "m", metric="mrr"), {"figure": "protocol_context_run", "seconds": 1.0}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = ship_model.rows_benchmark([path], "m", "cmd")
    assert out["shipped_as"] == out["reference"] == "m" and out["command"] == "cmd"
    assert len(out["rows"]) == 3 and {r["metric"] for r in out["rows"]} == {"map"}
    assert out["rows"][0]["value"] == 0.1235 and "figure" not in out["rows"][0]
    with pytest.raises(SystemExit, match="both splits"):
        ship_model.rows_benchmark([path], "chroma", "")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "reference": "x"}) + "\n" for r in lines[:3]))
    with pytest.raises(SystemExit, match="paired against"):
        ship_model.rows_benchmark([other], "m", "")


def test_recipe_description_says_what_the_model_heard():
    from pathlib import Path

    ship_model = _ship_model()
    configs = Path(__file__).resolve().parents[1] / "configs"
    asap = ship_model.recipe_description(load_config(str(configs / "shipped-asap.yaml")))
    assert "asap-dev" in asap and "train-1" in asap and "held-out pieces" in asap
    m21 = ship_model.recipe_description(load_config(str(configs / "shipped-tiny.yaml")))
    assert "8 music21 pieces" in m21
    assert "CC BY-NC-SA" in ship_model.TRAINING_DATA_LICENCES["asap"]


def test_a_derived_shipped_model_embeds_as_its_source_plus_the_declared_timeline(cfg):
    """``weights_of`` + ``content_timeline``: the source model's vectors in the source's parts
    (scaled to their share), the passage's timelines as the last part; a config asking for no
    timeline does not take it away, and one asking for it does not add it to the source."""
    from mess_ray.content import query_shifts_ms, timelines

    derived = [n for n in shipped.available() if shipped.shipped_manifest(n).get("weights_of")]
    assert derived
    storage = Storage.from_config(cfg.storage)
    clips = np.stack([shipped.reference_clip(seed, 16000, 4.0) for seed in (5, 6)])
    for name in derived:
        manifest = shipped.shipped_manifest(name)
        source = Embedder.from_ref(cfg, storage, f"shipped:{manifest['weights_of']}")
        assert source.info["content_timeline"] is None
        model = Embedder.from_ref(cfg, storage, f"shipped:{name}")
        v, base = model.embed(clips), source.embed(clips)
        layout = model.info["facet_layout"]
        start, end = layout["timeline"]
        parts = len(layout)
        np.testing.assert_allclose(
            v[:, :start], base * np.sqrt((parts - 1) / parts), rtol=0, atol=1e-5
        )
        rates = manifest["content_timeline"]
        expected = timelines(clips, 16000, rates["chroma_rate"], rates["onset_rate"])
        np.testing.assert_allclose(v[:, start:end], expected * np.sqrt(1 / parts), atol=1e-5)
        lags = rates.get("query_shift_ms")
        expected_lags = query_shifts_ms(lags, rates["query_step_ms"]) if lags else (0.0,)
        assert model.query_shifts_ms == expected_lags
        on = load_config(None, [f"storage.root={cfg.storage.root}", "model.content_timeline=true"])
        again = Embedder.from_ref(on, storage, f"shipped:{name}")
        assert again.info["content_timeline"] == model.info["content_timeline"]
        with_timeline = Embedder.from_ref(on, storage, f"shipped:{manifest['weights_of']}")
        assert with_timeline.info["content_timeline"]  # the config adds it to any model


def test_a_shipped_models_query_weights_travel_with_its_info_and_weigh_the_protocols_queries(
    cfg,
):
    """``query_facet_weights``: the same vectors as the model without them, the declaration in
    the embedder's info (and a rebuilt one's), and the protocol's queries weighted by it."""
    from types import SimpleNamespace

    from mess_ray.eval.protocol import QueryVariants, with_query_variants
    from mess_ray.facets import parse_layout, weighted_query

    declaring = [n for n in shipped.available() if shipped.declared_query_facet_weights(n)]
    assert declaring
    storage = Storage.from_config(cfg.storage)
    clips = np.stack([shipped.reference_clip(seed, 16000, 4.0) for seed in (5, 6, 7)])
    for name in declaring:
        model = Embedder.from_ref(cfg, storage, f"shipped:{name}")
        weights = shipped.shipped_manifest(name)["query_facet_weights"]
        assert model.info["query_facet_weights"] == weights
        assert Embedder.from_info(cfg, storage, model.info).info["query_facet_weights"] == weights
        plain = model.embed(clips)
        info = {**model.info, "content_timeline": None}  # weights alone, no lags
        views = [SimpleNamespace(rows=np.arange(3), queries=np.array([0, 2]))]
        data = SimpleNamespace(perf=SimpleNamespace(audio=clips))
        systems = {name: plain}
        with_query_variants(systems, {name: info}, data, views, 16000)
        assert isinstance(systems[name], QueryVariants)
        np.testing.assert_allclose(systems[name].vectors, plain)
        layout = parse_layout(model.info["facet_layout"])
        np.testing.assert_allclose(
            systems[name].queries[0], weighted_query(plain, layout, weights), atol=1e-6
        )
    assert (
        Embedder.from_ref(cfg, storage, "shipped:tiny-asap-v3").info["query_facet_weights"] is None
    )


def test_an_embedder_with_query_lags_searches_with_its_timeline_moved_and_the_rest_unchanged(cfg):
    """``model.content_timeline_query_shift_ms``: the query variants are the plain vectors with
    only the timeline part recomputed on the audio moved by each lag (0 first); the record
    travels in the info, so a rebuilt embedder tries the same lags; without it, one variant."""
    from mess_ray.content import shift_segments, timelines
    from mess_ray.models.embedder import query_variants_from_info

    storage = Storage.from_config(cfg.storage)
    clips = np.stack([shipped.reference_clip(seed, 16000, 4.0) for seed in (5, 6)])
    root = f"storage.root={cfg.storage.root}"
    on = load_config(
        None, [root, "model.content_timeline=true", "model.content_timeline_query_shift_ms=40"]
    )
    model = Embedder.from_ref(on, storage, "shipped:tiny-asap-v1")
    assert model.query_shifts_ms == (0.0, -20.0, 20.0, -40.0, 40.0)
    assert model.info["content_timeline"]["query_shift_ms"] == 40.0
    q = model.embed_query(clips)
    plain = model.embed(clips)
    assert q.shape == (5, *plain.shape)
    np.testing.assert_allclose(q[0], plain, atol=1e-6)
    start, end = model.info["facet_layout"]["timeline"]
    parts = len(model.info["facet_layout"])
    np.testing.assert_allclose(
        q[:, :, :start], np.broadcast_to(plain[:, :start], q[..., :start].shape)
    )
    k = model.query_shifts_ms.index(40.0)
    moved = timelines(shift_segments(clips, 640), 16000) * np.sqrt(1 / parts)
    # read from one padded computation: the shifted audio's timelines but for the edges
    cos = np.sum(q[k, :, start:end] * moved, -1) / np.sum(moved * moved, -1)
    assert cos.min() > 0.995, cos
    np.testing.assert_allclose(
        query_variants_from_info(model.info, plain, clips, 16000), q, atol=1e-5
    )
    again = Embedder.from_info(on, storage, model.info)
    assert again.query_shifts_ms == model.query_shifts_ms
    one = Embedder.from_ref(
        load_config(None, [root, "model.content_timeline=true"]), storage, "shipped:tiny-asap-v1"
    )
    assert one.query_shifts_ms == (0.0,) and one.embed_query(clips).shape[0] == 1
    assert query_variants_from_info(one.info, plain, clips, 16000) is None


def test_the_timeline_cost_benchmark_compares_batched_with_per_segment_and_the_source(tmp_path):
    """``benchmarks.embed_throughput --content-timeline``: the batched timelines equal the
    per-segment ones, and the default embedder is timed against its source model."""
    from argparse import Namespace

    from benchmarks.embed_throughput import bench_content_timeline

    out: list[dict] = []
    args = Namespace(batch_size=4, segments={"timeline": 6}, warmup=1, workdir=str(tmp_path))
    bench_content_timeline(args, out)
    timeline = next(r for r in out if r["figure"] == "content_timeline")
    assert timeline["max_abs_difference"] < 1e-5 and timeline["segments"] == 6
    assert timeline["per_segment_cpu_ms"] > 0 and timeline["batched_cpu_ms"] > 0
    models = [r for r in out if r["figure"] == "embed_cpu_shipped"]
    assert [r["content_timeline"] is not None for r in models] == [False, True]
    assert models[1]["model"] == shipped.DEFAULT_SHIPPED and "cost_over_source" in models[1]
    lags = shipped.declared_content_timeline().get("query_shift_ms")
    query = [r for r in out if r["figure"] == "query_lags_shipped"]
    assert len(query) == (1 if lags else 0)
    if lags:  # a query pays for its timeline at every lag, the index does not
        assert query[0]["variants_shape"][:2] == [query[0]["lags"], 6]
        assert query[0]["query_cost_over_index"] > 1
        # the lags' timelines from one computation on their grid: the lag-by-lag ones, cheaper
        assert query[0]["on_grid_vs_lag_by_lag_min_cosine"] > 0.99
        assert query[0]["on_grid_speedup_per_cpu_s"] > 1
