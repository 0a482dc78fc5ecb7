"""Encoders, EmbeddingModel and Embedder (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mess_ray.config import load_config
from mess_ray.models import (
    Embedder,
    EmbeddingModel,
    build_encoder,
    count_parameters,
    encoder_config,
    load_encoder,
)
from mess_ray.models.embedder import MeanPooledEncoder, resolve_layer
from mess_ray.models.encoder import conv_stride, normalize_waveform, num_frames
from mess_ray.storage import Storage

SR = 16000


def _cfg(root, *extra):
    return load_config(
        None, [f"storage.root={root}", "audio.window_s=2.0", "audio.hop_s=1.0", *extra]
    )


def test_sizes_build_with_expected_geometry():
    tiny = build_encoder("tiny", seed=0)
    assert (
        tiny.config.layerdrop == 0.0
        and tiny.config.hidden_size == 64
        and tiny.config.num_hidden_layers == 2
    )
    assert (
        conv_stride(tiny) == 320
    )  # one frame per 20 ms at 16 kHz, the hop of the k-means features
    assert num_frames(tiny, 2 * SR) in (99, 100)
    for size in ("tiny", "small", "base"):
        config = encoder_config(size)
        assert config.layerdrop == 0.0 and int(np.prod(config.conv_stride)) == 320
    assert count_parameters("tiny") < 500_000
    assert 1_000_000 < count_parameters("small") < 20_000_000
    assert 90_000_000 < count_parameters("base") < 100_000_000  # MERT-v1-95M / HuBERT-base geometry
    with pytest.raises(ValueError, match="unknown encoder size"):
        encoder_config("huge")


def test_random_encoder_is_seeded():
    a, b, c = (
        build_encoder("tiny", seed=3),
        build_encoder("tiny", seed=3),
        build_encoder("tiny", seed=4),
    )
    pa_, pb, pc_ = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa_, pb) and not torch.equal(pa_, pc_)


def test_encoder_save_load_round_trip(tmp_path):
    encoder = build_encoder("tiny", seed=0).eval()
    encoder.save_pretrained(tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc").eval()
    x = torch.randn(2, SR)
    with torch.no_grad():
        assert torch.allclose(encoder(x).last_hidden_state, loaded(x).last_hidden_state, atol=1e-6)


def test_load_encoder_errors_are_clear(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # Offline like this machine at run time, without waiting on connection retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.json"):
        load_encoder(tmp_path / "empty")
    with pytest.raises(ValueError, match="cannot load encoder"):
        load_encoder("no-such-org/no-such-model-xyz")


def test_embedding_model_shape_norm_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = EmbeddingModel(
        build_encoder("tiny", seed=0), embedding_dim=24, pooling="attentive"
    ).eval()
    x = torch.randn(3, 2 * SR)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 24)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(model.layer_weights().sum(), torch.tensor(1.0))
    model.save(tmp_path / "m")
    loaded = EmbeddingModel.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(loaded(x), out, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2 * SR))


def test_freezing_options():
    model = EmbeddingModel(
        build_encoder("tiny", seed=0), embedding_dim=16, pooling="mean", freeze_encoder=True
    )
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert (
        all(p.requires_grad for p in model.projection.parameters())
        and model.layer_logits.requires_grad
    )
    model.set_frozen(False, freeze_layers=1)
    assert not any(p.requires_grad for p in model.encoder.encoder.layers[0].parameters())
    assert all(p.requires_grad for p in model.encoder.encoder.layers[1].parameters())
    assert not any(p.requires_grad for p in model.encoder.feature_extractor.parameters())
    with pytest.raises(ValueError, match="exceeds"):
        model.set_frozen(False, freeze_layers=5)


def test_resolve_layer():
    assert resolve_layer(12, None) == 6 and resolve_layer(12, -1) == 12 and resolve_layer(2, 0) == 0
    with pytest.raises(ValueError):
        resolve_layer(2, 3)


def test_random_embedder_deterministic_and_normalised(tmp_path):
    cfg, storage = _cfg(tmp_path), Storage(str(tmp_path))
    embedder = Embedder.from_ref(cfg, storage, "random")
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((5, 2 * SR)).astype(np.float32)
    vectors = embedder.embed(batch)
    assert vectors.shape == (5, embedder.dim) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    again = Embedder.from_info(cfg, storage, embedder.info).embed(batch)
    assert np.allclose(vectors, again, atol=1e-6)
    # Inputs of another length are fit to the window (a short clip is zero-padded).
    short = embedder.embed(batch[:, :SR])
    padded = embedder.embed(np.pad(batch[:, :SR], ((0, 0), (0, SR))))
    assert np.allclose(short, padded, atol=1e-6)
    with pytest.raises(ValueError, match="2-D|batch"):
        embedder.embed(batch[0])
    with pytest.raises(ValueError, match="NaN"):
        embedder.embed(np.full((1, 2 * SR), np.nan, dtype=np.float32))
    assert embedder.embed(np.zeros((0, 2 * SR), np.float32)).shape == (0, embedder.dim)


def test_embedder_from_folders_and_stage_refs(tmp_path):
    cfg, storage = _cfg(tmp_path / "store"), Storage(str(tmp_path / "store"))
    with pytest.raises(FileNotFoundError, match="finetune"):
        Embedder.from_ref(cfg, storage, "finetune")
    with pytest.raises(FileNotFoundError):
        Embedder.from_ref(cfg, storage, str(tmp_path / "missing"))
    model = EmbeddingModel(build_encoder("tiny", seed=1), embedding_dim=32, pooling="mean").eval()
    model.save(tmp_path / "store" / "finetune" / "v1" / "model")
    storage.publish("finetune", "v1", {"inputs": {}})
    build_encoder("tiny", seed=2).save_pretrained(tmp_path / "store" / "pretrain" / "p1" / "model")
    storage.publish("pretrain", "p1", {"inputs": {}})

    batch = np.random.default_rng(1).standard_normal((2, 2 * SR)).astype(np.float32)
    finetuned = Embedder.from_ref(cfg, storage, "finetune")
    assert (
        finetuned.dim == 32
        and finetuned.info["version"] == "v1"
        and finetuned.info["kind"] == "embedding_model"
    )
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    assert np.allclose(finetuned.embed(batch), expected, atol=1e-5)
    pretrained = Embedder.from_ref(cfg, storage, "pretrain")
    assert (
        pretrained.dim == 64
        and pretrained.info["kind"] == "encoder"
        and pretrained.info["layer"] == 1
    )
    # The recorded layer is rebuilt even if the config now names another one.
    other_layer = _cfg(tmp_path / "store", "model.ssl_layer=-1")
    assert Embedder.from_ref(other_layer, storage, "pretrain").info["layer"] == 2
    same = Embedder.from_info(other_layer, storage, pretrained.info)
    assert same.info["layer"] == 1 and np.allclose(
        same.embed(batch), pretrained.embed(batch), atol=1e-6
    )
    by_path = Embedder.from_ref(cfg, storage, str(tmp_path / "store" / "finetune" / "v1"))
    assert np.allclose(by_path.embed(batch), expected, atol=1e-5)
    rebuilt = Embedder.from_info(cfg, storage, finetuned.info)
    assert np.allclose(rebuilt.embed(batch), expected, atol=1e-5)
    wrong_rate = _cfg(tmp_path / "store", "audio.sample_rate=24000")
    with pytest.raises(ValueError, match="Hz"):
        Embedder.from_ref(wrong_rate, storage, "finetune")


def test_content_timeline_joins_the_passages_timelines_as_a_last_part_and_rebuilds_from_info(
    tmp_path,
):
    from mess_ray.content import timelines
    from mess_ray.facets import TIMELINE, parse_layout, weighted_query

    cfg, storage = _cfg(tmp_path / "store"), Storage(str(tmp_path / "store"))
    folder = tmp_path / "faceted"
    EmbeddingModel(
        build_encoder("tiny", seed=1), embedding_dim=16, pooling="mean", facet_dim=4
    ).save(folder)
    batch = np.random.default_rng(2).standard_normal((3, 2 * SR)).astype(np.float32)
    plain = Embedder.from_ref(cfg, storage, str(folder))
    on = _cfg(tmp_path / "store", "model.content_timeline=true")
    joined = Embedder.from_ref(on, storage, str(folder))
    assert plain.info["content_timeline"] is None
    assert joined.info["content_timeline"] == {"chroma_rate": 20.0, "onset_rate": 50.0}
    layout = parse_layout(joined.info["facet_layout"])
    assert list(layout)[-1] == TIMELINE and len(layout) == 6
    start, end = layout[TIMELINE]
    vectors, before = joined.embed(batch), plain.embed(batch)
    assert vectors.shape == (3, joined.dim) and joined.dim == end and start == plain.dim
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The model's parts keep their vectors, every part (the timeline too) a sixth of the cosine.
    assert np.allclose(vectors[:, :start], before * np.sqrt(5 / 6), atol=1e-5)
    expected = timelines(batch, SR)
    assert np.allclose(vectors[:, start:] * np.sqrt(6), expected, atol=1e-5)
    only_timeline = weighted_query(vectors, layout, {TIMELINE: 1.0}) @ vectors.T
    assert np.allclose(only_timeline, expected @ expected.T, atol=1e-4)
    # An index is searched as it was built: the record wins over the config, both ways.
    assert np.allclose(
        Embedder.from_info(cfg, storage, joined.info).embed(batch), vectors, atol=1e-5
    )
    assert Embedder.from_info(on, storage, plain.info).dim == plain.dim
    quarter = _cfg(tmp_path / "store", "model.content_timeline=true")
    quarter.model.content_timeline_rates = (5.0, 12.5)
    small = Embedder.from_ref(quarter, storage, str(folder))
    assert small.info["content_timeline"] == {"chroma_rate": 5.0, "onset_rate": 12.5}
    assert small.dim < joined.dim
    with pytest.raises(ValueError, match="greater than 0"):
        _cfg(tmp_path / "store", "model.content_timeline_rates=[0, 12.5]")
    # A plain (unfaceted) encoder counts as one part: the timeline gets half.
    random = Embedder.from_ref(on, storage, "random")
    assert list(random.info["facet_layout"]) == ["overall", TIMELINE]
    learned = tmp_path / "learned"
    EmbeddingModel(
        build_encoder("tiny", seed=1), embedding_dim=8, pooling="mean", timeline_bins=4
    ).save(learned)
    with pytest.raises(ValueError, match="already has a timeline part"):
        Embedder.from_ref(on, storage, str(learned))


def test_embedder_loads_from_s3(s3_bucket, tmp_path):
    root = f"{s3_bucket}/store"
    cfg, storage = _cfg(root), Storage(root)
    model = EmbeddingModel(
        build_encoder("tiny", seed=1), embedding_dim=16, pooling="attentive"
    ).eval()
    model.save(tmp_path / "m")
    storage.put_dir(tmp_path / "m", "finetune/v1/model")
    storage.publish("finetune", "v1", {"inputs": {}})
    batch = np.random.default_rng(2).standard_normal((2, 2 * SR)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    assert np.allclose(
        Embedder.from_ref(cfg, storage, "finetune").embed(batch), expected, atol=1e-5
    )
    assert np.allclose(
        Embedder.from_ref(cfg, storage, storage.url("finetune", "v1", "model")).embed(batch),
        expected,
        atol=1e-5,
    )


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_fast_conv_front_end_computes_the_same_features_as_the_module(size):
    from mess_ray.models.encoder import enable_fast_inference, fast_conv_features

    encoder = build_encoder(size, seed=1).eval()
    audio = torch.from_numpy(
        (0.2 * np.random.default_rng(0).standard_normal((3, 16000))).astype(np.float32)
    )
    audio[1] += 0.3  # a DC offset: the folded GroupNorm must still remove each channel's mean
    with torch.inference_mode():
        expected = encoder.feature_extractor(audio)
        assert enable_fast_inference(encoder)
        fast = encoder.feature_extractor(audio)
        # chunked over time in pieces smaller than the clip: same result
        chunked = fast_conv_features(encoder.feature_extractor, audio, chunk_frames=7)
    assert fast.shape == expected.shape
    scale = expected.abs().max()
    assert torch.allclose(fast, expected, atol=1e-5 * scale)
    assert torch.allclose(chunked, expected, atol=1e-5 * scale)
    # with gradients (training) the module's own code runs
    assert encoder.feature_extractor(audio).requires_grad


def test_mean_pooled_encoder_stops_at_its_layer_with_the_same_vectors():
    audio = torch.from_numpy(
        (0.1 * np.random.default_rng(2).standard_normal((2, 16000))).astype(np.float32)
    )
    for layer in (None, 0, 1, -1):
        model = MeanPooledEncoder(build_encoder("small", seed=0), layer).eval()
        ran = []
        for i, block in enumerate(model.encoder.encoder.layers):
            block.register_forward_hook(lambda *_, i=i, ran=ran: ran.append(i))
        with torch.inference_mode():
            fast = model(audio)
        assert ran == list(range(model.layer))
        full = model.encoder(normalize_waveform(audio), output_hidden_states=True).hidden_states[
            model.layer
        ]
        expected = torch.nn.functional.normalize(full.mean(dim=1), dim=-1)
        assert torch.allclose(fast, expected.detach(), atol=1e-6)


def test_embedder_precisions_agree_with_the_plain_float32_forward():
    from mess_ray.models.embedder import resolve_precision

    audio = (0.1 * np.random.default_rng(3).standard_normal((5, 16000))).astype(np.float32)
    info = {"ref": "random"}
    plain = Embedder(
        MeanPooledEncoder(build_encoder("tiny", seed=0)), 64, info, 16000, 2, "float32", False
    )
    assert not plain.fast
    expected = plain.embed(audio)
    for precision, tolerance in (("float32", 1e-5), ("auto", 1e-3), ("bfloat16", 2e-2)):
        fast = Embedder(
            MeanPooledEncoder(build_encoder("tiny", seed=0)), 64, info, 16000, 2, precision
        )
        assert fast.fast
        got = fast.embed(audio)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() < tolerance, precision
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) == (torch.float32, torch.float32)
    # a narrow front end never trades precision for speed under 'auto'
    assert resolve_precision("auto", cpu, build_encoder("tiny")) == (torch.float32,) * 2
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", cpu)


def test_fast_front_end_keeps_float32_statistics_under_an_outer_bf16_autocast():
    """The Embedder runs the transformer under bf16 autocast; the front end's first layer and
    its folded GroupNorm statistics must not follow it (that cost recall@10 0.967 on base)."""
    from mess_ray.models.encoder import fast_conv_features

    encoder = build_encoder("small", seed=1).eval()
    audio = torch.from_numpy(
        (0.2 * np.random.default_rng(5).standard_normal((2, 16000))).astype(np.float32)
    )
    audio[0] += 0.3  # a DC offset: the worst case for second moment minus squared mean
    with torch.inference_mode():
        expected = fast_conv_features(encoder.feature_extractor, audio)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast_conv_features(encoder.feature_extractor, audio)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5 * expected.abs().max())


def test_auto_precision_uses_bf16_only_for_wide_encoders_on_native_bf16_cpus(monkeypatch):
    from mess_ray.models import embedder as embedder_module
    from mess_ray.models.encoder import encoder_config

    cpu = torch.device("cpu")

    class Config:  # resolve_precision reads only the encoder's config
        def __init__(self, size):
            self.config = encoder_config(size)

    bf16, f32 = (torch.bfloat16,) * 2, (torch.float32,) * 2
    for native, small in ((True, bf16), (False, f32)):
        monkeypatch.setattr(embedder_module, "cpu_has_native_bf16", lambda native=native: native)
        assert embedder_module.resolve_precision("auto", cpu, Config("small")) == small
        assert embedder_module.resolve_precision("auto", cpu, Config("base")) == small
        assert embedder_module.resolve_precision("auto", cpu, Config("tiny")) == f32
        assert embedder_module.resolve_precision("bfloat16", cpu, Config("tiny")) == bf16
        assert embedder_module.resolve_precision("float32", cpu, Config("base")) == f32
    # a GPU keeps float32 until its bf16 figures are measured
    assert embedder_module.resolve_precision("auto", torch.device("cuda"), Config("base")) == f32


def test_bf16_fast_path_on_a_wide_encoder_keeps_the_float32_vectors_and_neighbours(
    tmp_path, monkeypatch
):
    """model.inference_precision reaches the Embedder; 'auto' on a wide encoder (bf16 front end
    and transformer GEMMs) gives the plain float32 forward's vectors within bf16 rounding and
    the same nearest neighbours."""
    from mess_ray.models import embedder as embedder_module

    monkeypatch.setattr(embedder_module, "cpu_has_native_bf16", lambda: True)
    storage = Storage(str(tmp_path))
    base = [f"storage.root={tmp_path}", "model.size=small", "audio.window_s=1.0", "audio.hop_s=0.5"]
    embedders = {
        name: Embedder.from_ref(load_config(None, base + overrides), storage, "random")
        for name, overrides in (
            ("plain", ["model.fast_inference=false", "model.inference_precision=float32"]),
            ("float32", ["model.inference_precision=float32"]),
            ("auto", []),
        )
    }
    assert not embedders["plain"].fast and embedders["plain"].dtype == torch.float32
    assert embedders["float32"].fast and embedders["float32"].dtype == torch.float32
    assert embedders["auto"].fast and embedders["auto"].dtype == torch.bfloat16
    assert embedders["auto"].front_end_dtype == torch.bfloat16
    rng = np.random.default_rng(6)
    window = embedders["plain"].window_samples
    # clips of different loudness and spectra, so that their vectors are not collinear
    audio = np.stack(
        [
            (0.05 + 0.1 * i) * np.sin(2 * np.pi * (110 * 1.5**i) * np.arange(window) / SR)
            + 0.02 * rng.standard_normal(window)
            for i in range(8)
        ]
    ).astype(np.float32)
    vectors = {name: emb.embed(audio) for name, emb in embedders.items()}
    assert np.abs(vectors["float32"] - vectors["plain"]).max() < 1e-4
    cosine = np.sum(vectors["auto"] * vectors["plain"], axis=1)  # unit vectors
    assert cosine.min() > 0.9999
    assert np.abs(vectors["auto"] - vectors["plain"]).max() < 5e-3

    def neighbours(v):
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :3]

    new, old = neighbours(vectors["auto"]), neighbours(vectors["plain"])
    assert (new[:, 0] == old[:, 0]).all()
    assert np.mean([len(set(a) & set(b)) / 3 for a, b in zip(new, old)]) >= 0.9


@pytest.mark.parametrize("pooling", ["attentive", "stats"])
def test_bf16_fast_path_on_a_faceted_embedding_model_keeps_the_float32_vectors(
    pooling, monkeypatch
):
    """A fine-tuned model (facet heads, level channel) on a wide encoder: 'auto' with native
    bf16 gives the float32 vectors within bf16 rounding."""
    from mess_ray.models import embedder as embedder_module

    monkeypatch.setattr(embedder_module, "cpu_has_native_bf16", lambda: True)
    rng = np.random.default_rng(7)
    audio = (0.1 * rng.standard_normal((4, SR)) * rng.uniform(0.1, 2.0, (4, 1))).astype(np.float32)
    vectors = {}
    for precision in ("float32", "auto"):
        torch.manual_seed(0)
        model = EmbeddingModel(
            build_encoder("small", seed=0), 32, pooling, facet_dim=8, level_channel=True
        )
        embedder = Embedder(model, model.embedding_dim, {}, SR, 2, precision)
        assert embedder.dtype == (torch.float32 if precision == "float32" else torch.bfloat16)
        vectors[precision] = embedder.embed(audio)
    got, expected = vectors["auto"], vectors["float32"]
    assert got.dtype == np.float32
    cosine = np.sum(got * expected, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() > 0.9999
    assert np.abs(got - expected).max() < 1e-2


def test_window_relative_level_channel_makes_the_embedding_blind_to_the_chains_gain(tmp_path):
    x = torch.randn(2, 2 * SR) * 0.1
    out = {}
    for reference in ("absolute", "window"):
        torch.manual_seed(0)
        model = EmbeddingModel(
            build_encoder("tiny", seed=0),
            embedding_dim=16,
            pooling="mean",
            level_channel=True,
            level_reference=reference,
        ).eval()
        with torch.no_grad():
            out[reference] = (model(x), model(x * 4.0))  # +12 dB through another chain
        model.save(tmp_path / reference)
        assert EmbeddingModel.load(tmp_path / reference).options["level_reference"] == reference
    assert not torch.allclose(*out["absolute"], atol=1e-3)
    assert torch.allclose(*out["window"], atol=1e-4)
    with pytest.raises(ValueError, match="level_reference"):
        EmbeddingModel(build_encoder("tiny", seed=0), level_reference="lufs")


def test_fast_inference_off_in_the_config_gives_the_plain_forward(tmp_path):
    """model.fast_inference=false (the serve benchmark's 'before' mode) reaches the Embedder."""
    storage = Storage(str(tmp_path))
    fast = Embedder.from_ref(load_config(None, [f"storage.root={tmp_path}"]), storage, "random")
    plain_cfg = load_config(
        None,
        [
            f"storage.root={tmp_path}",
            "model.fast_inference=false",
            "model.inference_precision=float32",
        ],
    )
    plain = Embedder.from_ref(plain_cfg, storage, "random")
    assert fast.fast and not plain.fast
    audio = (0.1 * np.random.default_rng(4).standard_normal((3, fast.window_samples))).astype(
        np.float32
    )
    assert np.abs(fast.embed(audio) - plain.embed(audio)).max() < 1e-3
