"""What the GPU paths choose and keep: the Embedder's precision on CUDA, the positional conv
outside bf16 autocast, TF32 scoped to a block, and the GPU benchmark's own arithmetic. No GPU is
needed: the choices are functions of the device type, and the benchmark runs its CPU smoke."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from mess_ray.models.embedder import allow_tf32, resolve_precision
from mess_ray.models.encoder import build_encoder, float32_positional_conv


def test_on_cuda_auto_keeps_float32_tensors_and_bfloat16_means_autocast():
    cuda = torch.device("cuda")  # a device object needs no GPU; only its type is read
    assert resolve_precision("auto", cuda, build_encoder("tiny")) == (torch.float32,) * 2
    assert resolve_precision("float32", cuda) == (torch.float32,) * 2
    assert resolve_precision("bfloat16", cuda) == (torch.float32, torch.bfloat16)
    # another accelerator gets no autocast it was never measured with
    assert resolve_precision("bfloat16", torch.device("mps")) == (torch.float32,) * 2


def test_allow_tf32_switches_cuda_tf32_on_inside_the_block_and_restores_it():
    backends = torch.backends
    before = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
    backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = False
    try:
        with allow_tf32(True):
            assert backends.cuda.matmul.allow_tf32 and backends.cudnn.allow_tf32
        assert not backends.cuda.matmul.allow_tf32 and not backends.cudnn.allow_tf32
        with allow_tf32(False):
            assert not backends.cuda.matmul.allow_tf32
        with pytest.raises(RuntimeError), allow_tf32(True):
            raise RuntimeError("boom")
        assert not backends.cuda.matmul.allow_tf32 and not backends.cudnn.allow_tf32
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = before


def test_a_cpu_embedder_uses_no_tf32():
    from mess_ray.models import Embedder, MeanPooledEncoder

    embedder = Embedder(MeanPooledEncoder(build_encoder("tiny", seed=0)), 64, {}, 16000)
    assert embedder.device.type == "cpu" and embedder.tf32 is False


def test_float32_positional_conv_changes_nothing_off_cuda_and_survives_a_deepcopy():
    encoder = build_encoder("small", seed=0).eval()
    audio = torch.from_numpy(
        (0.1 * np.random.default_rng(0).standard_normal((2, 16000))).astype(np.float32)
    )
    with torch.no_grad():
        expected = encoder(audio).last_hidden_state
        assert float32_positional_conv(encoder) == 1
        assert float32_positional_conv(encoder) == 0  # already so
        assert torch.equal(encoder(audio).last_hidden_state, expected)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast: the module's own code
            patched = encoder(audio).last_hidden_state
        float32_positional_conv(encoder, enabled=False)
        assert "forward" not in vars(encoder.encoder.pos_conv_embed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(encoder(audio).last_hidden_state, patched)
    float32_positional_conv(encoder)
    twin = copy.deepcopy(encoder)
    module = twin.encoder.pos_conv_embed
    assert module.forward.__self__ is module  # bound to the copy, not to the original
    assert set(twin.state_dict()) == set(encoder.state_dict())


def test_gpu_benchmark_arithmetic():
    from benchmarks.gpu_throughput import kernel_kind, mfu, utilisation

    assert mfu(1e9, 989.0, 989.0) == pytest.approx(1e-3)
    assert mfu(1e9, 10.0, 0.0) == 0.0
    got = utilisation(2e12, 100.0, {"datasheet": 800.0, "none": 0.0})
    assert got == {"achieved_tflops": 200.0, "mfu_datasheet": 0.25}
    assert kernel_kind("void precomputed_convolve_sgemm<__nv_bfloat16, 128>") == "convolution"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert kernel_kind("flash_fwd_kernel") == "attention"
    assert kernel_kind("fmha_cutlassF_f32_aligned") == "attention"
    assert kernel_kind("void at::native::GeluCUDAKernelImpl") == "elementwise/other"


def test_gpu_benchmark_runs_on_the_cpu_and_reports_every_figure(tmp_path):
    from benchmarks import gpu_throughput

    out = tmp_path / "gpu.jsonl"
    args = ["--device", "cpu", "--sizes", "tiny", "--train-batches", "2", "--embed-batches"]
    args += ["4", "--segments", "12", "--steps", "2", "--warmup", "1", "--repeats", "1"]
    args += ["--pos-conv", "both", "--out", str(out), "--plot", str(tmp_path / "gpu.png")]
    records = gpu_throughput.main(args)
    assert (tmp_path / "gpu.png").stat().st_size > 10_000  # the PNG of those lines
    assert records == [json.loads(line) for line in out.read_text().splitlines()]
    figures = [r["figure"] for r in records]
    assert figures[0] == "gpu_ceiling" and "error" not in json.dumps(records)
    steps = [r for r in records if r["figure"] == "gpu_pretrain_step"]
    # bf16 per batch and positional-conv choice, then the float32 baseline
    assert [(r["precision"], r["pos_conv"]) for r in steps] == [
        ("bf16-autocast", "autocast"),
        ("bf16-autocast", "float32"),
        ("float32", "float32"),
    ]
    assert all(r["samples_per_s"] > 0 and r["train_flops_per_sample"] > 0 for r in steps)
    embeds = [r for r in records if r["figure"] == "gpu_embed"]
    assert {r["precision"] for r in embeds} == {"float32", "tf32", "bf16-autocast"}
    assert embeds[0]["precision"] == "float32" and embeds[0]["recall_at_10_vs_float32"] == 1.0
    # FLOPs of the forward as embedded: in eval mode the encoder stops at its embedding layer
    # (a train-mode count runs every layer and overstated the MFU 1.5x on `base`)
    from benchmarks.embed_throughput import forward_flops
    from mess_ray.models import MeanPooledEncoder

    encoder = MeanPooledEncoder(build_encoder("tiny", seed=0), None, 24000)
    one = torch.zeros(1, 120000) + 0.01
    as_embedded = forward_flops(encoder.eval(), one)
    assert as_embedded < forward_flops(encoder.train(), one)
    assert {r["forward_flops_per_segment"] for r in embeds} == {as_embedded}
