"""Phrase-level context: a segment's vector pooled with its neighbours in the same recording."""

from __future__ import annotations

import numpy as np
import pytest

from mess_ray.segments import pool_neighbours


def test_pool_neighbours_mixes_only_nearby_segments_of_the_same_recording():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6, 8))
    tracks = ["a", "a", "a", "a", "b", "b"]
    starts = [0.0, 2.0, 4.0, 8.0, 0.0, 2.0]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert np.allclose(pool_neighbours(vectors, tracks, starts, 2.0, 0), unit)
    pooled = pool_neighbours(vectors, tracks, starts, 2.0, 1, decay=0.5)
    assert np.allclose(np.linalg.norm(pooled, axis=1), 1.0)
    expected = unit[1] + 0.5 * (unit[0] + unit[2])  # segment at 4 s is 2 steps from 8 s: out
    assert np.allclose(pooled[1], expected / np.linalg.norm(expected))
    assert np.allclose(pooled[3], unit[3])  # no neighbour within one hop
    b = unit[4] + 0.5 * unit[5]
    assert np.allclose(pooled[4], b / np.linalg.norm(b))  # track b never mixes with track a
    wider = pool_neighbours(vectors, tracks, starts, 2.0, 2, decay=0.5)
    e = unit[2] + 0.5 * unit[1] + 0.25 * (unit[0] + unit[3])
    assert np.allclose(wider[2], e / np.linalg.norm(e))
    with pytest.raises(ValueError):
        pool_neighbours(vectors, tracks[:-1], starts, 2.0, 1)
    with pytest.raises(ValueError):
        pool_neighbours(vectors, tracks, starts, 2.0, -1)


def test_timeline_pool_keeps_the_order_that_mean_pooling_throws_away():
    import torch

    from mess_ray.models.embedding import timeline_pool

    torch.manual_seed(0)
    frames = torch.randn(1, 40, 6)
    reversed_in_time = frames.flip(1)  # the same frames, the other way round
    assert torch.allclose(frames.mean(1), reversed_in_time.mean(1), atol=1e-6)
    a, b = timeline_pool(frames, 8), timeline_pool(reversed_in_time, 8)
    assert a.shape == (1, 48) and torch.allclose(a.norm(dim=1), torch.ones(1))
    assert float(a @ b.T) < 0.5
    # a constant offset (a chain's gain or colour on every frame alike) cancels
    assert torch.allclose(timeline_pool(frames + 3.0, 8), a, atol=1e-5)
    with pytest.raises(ValueError):
        timeline_pool(frames, 41)
    with pytest.raises(ValueError):
        timeline_pool(frames[0], 4)


def test_embedding_model_frames_are_what_its_overall_head_pools():
    import torch

    from mess_ray.models import EmbeddingModel, build_encoder
    from mess_ray.models.embedding import mean_pool

    torch.manual_seed(0)
    model = EmbeddingModel(build_encoder("tiny", seed=0), embedding_dim=8, pooling="mean").eval()
    x = torch.randn(2, 16000)
    with torch.no_grad():
        frames = model.frames(x)
        expected = model.projection(mean_pool(frames))
        assert torch.allclose(torch.nn.functional.normalize(expected, dim=-1), model(x), atol=1e-5)
    assert frames.shape[0] == 2 and frames.shape[2] == model.encoder.config.hidden_size
    with pytest.raises(ValueError, match="shape"):
        model.frames(torch.randn(16000))


def test_context_benchmark_scores_a_models_timeline_beside_the_timeline_baselines(tmp_path, capsys):
    import json

    import torch
    from helpers import SR, tiny_config, write_asap_ingest

    from benchmarks import protocol_context
    from mess_ray.models import EmbeddingModel, build_encoder
    from mess_ray.storage import Storage

    cfg = tiny_config(str(tmp_path / "store"), audio={"sample_rate": SR})
    storage = Storage.from_config(cfg.storage)
    write_asap_ingest(
        storage, tmp_path / "asap", cfg.audio.window_s, cfg.audio.hop_s, pianists=True, pieces=8
    )
    torch.manual_seed(0)
    folder = str(tmp_path / "model")
    EmbeddingModel(
        build_encoder("tiny", seed=0), embedding_dim=8, pooling="mean", timeline_bins=4
    ).save(folder)
    (tmp_path / "c.yaml").write_text("model:\n  size: tiny\n")
    sets = [f"storage.root={cfg.storage.root}", f"audio.sample_rate={SR}"]
    sets += [f"audio.window_s={cfg.audio.window_s}", f"audio.hop_s={cfg.audio.hop_s}"]
    sets += ["eval.holdout_fraction=0.6", "eval.bootstrap_samples=100"]
    args = ["--config", str(tmp_path / "c.yaml"), "--model", folder, "--neighbours"]
    args += ["--timeline", "4", "--timeline-weight", "0.5", "--baselines"]
    args += ["--fuse", "timelines@0.25", "chroma@0.5", "descriptor_head@0.3"]
    args += ["--timelines-rates", "10", "25"]
    assert protocol_context.main([*args, *sum((["--set", s] for s in sets), [])]) == 0
    rows = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    systems = {r["system"] for r in rows if r["figure"] == "protocol_context"}
    expected = {folder, f"{folder}+timeline4", f"{folder}+timeline4@0.5"}
    expected |= {f"{folder}[no timeline]", f"{folder}[timeline]", f"{folder}[timeline@0.5]"}
    expected |= {f"{folder}+timelines@0.25", f"{folder}+chroma@0.5", "timelines"}
    expected |= {f"{folder}+descriptor_head@0.3", "descriptor_head", "audio-expression+rec-rel"}
    assert expected | {"chroma", "chroma_timeline", "onset_timeline", "descriptors"} <= systems
    assert {r["split"] for r in rows if r["figure"] == "protocol_context"} == {"validation"}
    paired = [r for r in rows if r.get("reference")]
    assert paired and {r["reference"] for r in paired} == {folder}
    assert (
        protocol_context.main(
            [*args, "--reference", "chroma_timeline", *sum((["--set", s] for s in sets), [])]
        )
        == 0
    )
    again = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert {r["reference"] for r in again if r.get("reference")} == {"chroma_timeline"}
    # the chosen setting's one test report scores the test pieces only
    once = ["--config", str(tmp_path / "c.yaml"), "--model", folder, "--neighbours", "--split"]
    once += ["test", "--fuse", "descriptors+rec-rel@0.3"]
    assert protocol_context.main([*once, *sum((["--set", s] for s in sets), [])]) == 0
    test_rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert {r["split"] for r in test_rows if r["figure"] == "protocol_context"} == {"test"}
    assert f"{folder}+descriptors+rec-rel@0.3" in {r.get("system") for r in test_rows}
    # a model with the content timeline, also scored at its best query lag
    lagged = ["--config", str(tmp_path / "c.yaml"), "--model", "shipped:tiny-asap-v2"]
    lagged += [
        "--neighbours",
        "--query-lags",
        "40",
        "--query-step",
        "20",
        "--timeline-weight",
        "0.5",
        "--facet-weights",
        "timeline=1",
    ]
    assert protocol_context.main([*lagged, *sum((["--set", s] for s in sets), [])]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    lag_rows = [r for r in out if r.get("system") == "shipped:tiny-asap-v2@lags40"]
    assert "passage_retrieval" in {r["task"] for r in lag_rows}  # one chain: no invariance row
    lagged_systems = {r.get("system") for r in out}
    assert "shipped:tiny-asap-v2@lags40[timeline@0.5]" in lagged_systems
    assert "shipped:tiny-asap-v2[facets timeline=1]" in lagged_systems
    # and re-weighted without lags, as before
    assert "shipped:tiny-asap-v2[timeline@0.5]" in lagged_systems
    with pytest.raises(SystemExit):
        protocol_context.main([*lagged[:4], "--query-lags", "-5"])
    with pytest.raises(SystemExit):
        protocol_context.main([*args[:4], "--timeline", "1"])
    for bad in ("mfcc@0.5", "timelines@1", "timelines"):
        with pytest.raises(SystemExit):
            protocol_context.main([*args[:4], "--fuse", bad])
    with pytest.raises(SystemExit):
        protocol_context.main(
            [*args, "--reference", "nope", *sum((["--set", s] for s in sets), [])]
        )


def test_a_baseline_fused_to_a_lagged_model_adds_its_cosine_at_every_query_lag():
    from benchmarks.protocol_context import fused
    from mess_ray.eval.protocol import QueryVariants

    rng = np.random.default_rng(1)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    vectors = unit(rng.standard_normal((6, 5)))
    queries = np.stack([vectors, unit(rng.standard_normal((6, 5)))])
    feature = rng.standard_normal((6, 3)) * 4.0
    out = fused(QueryVariants(vectors, queries), feature, 0.25)
    assert isinstance(out, QueryVariants) and out.queries.shape == (2, 6, 8)
    f = unit(feature)
    for k in range(2):
        want = 0.75 * unit(queries[k]) @ vectors.T + 0.25 * f @ f.T
        np.testing.assert_allclose(out.queries[k] @ out.vectors.T, want, atol=1e-9)
    np.testing.assert_allclose(fused(vectors, feature, 0.25), out.vectors)


def test_facet_weights_rank_by_the_weighted_part_cosines_at_every_query_lag():
    from benchmarks.protocol_context import facet_weighted, parse_facet_weights
    from mess_ray.eval.protocol import QueryVariants
    from mess_ray.facets import compose

    rng = np.random.default_rng(2)
    layout = {"overall": (0, 4), "timbre": (4, 7)}
    a, b = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    vectors = compose({"overall": a, "timbre": b}, layout)
    moved = compose({"overall": rng.standard_normal((6, 4)), "timbre": b}, layout)
    system = QueryVariants(vectors, np.stack([vectors, moved]))
    out = facet_weighted(system, layout, parse_facet_weights("overall=1,timbre=0"))
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(out.queries[0] @ out.vectors.T, unit(a) @ unit(a).T, atol=1e-6)
    equal = facet_weighted(vectors, layout, parse_facet_weights("overall=1,timbre=1"))
    np.testing.assert_allclose(equal.queries[0] @ equal.vectors.T, vectors @ vectors.T, atol=1e-6)
    with pytest.raises(ValueError):
        parse_facet_weights("overall=x")
    with pytest.raises(ValueError):
        facet_weighted(vectors, layout, {"tempo": 1.0})


def test_joined_vectors_score_the_weighted_sum_of_their_parts_cosines():
    from mess_ray.facets import join

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 8)), rng.standard_normal((5, 30)) * 7.0
    both = join([a, b], [0.7, 0.3])

    def cos(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return x @ x.T

    assert np.allclose(both @ both.T, 0.7 * cos(a) + 0.3 * cos(b))
    assert np.allclose(np.linalg.norm(both, axis=1), 1.0)
    with pytest.raises(ValueError, match="one weight per part"):
        join([a, b], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        join([a], [-1.0])
