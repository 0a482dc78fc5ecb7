"""HuBERT-style audio encoders built from a named size, or loaded from a checkpoint.

Sizes (all share HuBERT's total conv stride of 320 samples, i.e. 50 frames/s at 16 kHz):

- ``tiny``: hidden 64, 2 layers, 2 heads, a 3-layer conv stack; fast enough for CPU tests.
- ``small``: hidden 256, 4 layers, 4 heads, the standard 7-layer conv stack (narrower).
- ``base``: HuBERT/MERT-v1-95M geometry (12 layers, 768 dims, ~95M parameters). MERT-v1-95M
  was trained on 24 kHz audio (75 frames/s), so set ``audio.sample_rate: 24000`` when
  starting from MERT weights or comparing with it.

``layerdrop`` is always 0: skipping layers at random makes DDP ranks disagree on which
parameters received gradients.

Published raw-waveform encoders load from a ``save_pretrained`` folder too: Wav2Vec2, HuBERT,
Data2Vec-audio, and remote-code checkpoints such as MERT (``trust_remote_code``). Such a folder's
``preprocessor_config.json`` says what the encoder was trained to hear (``sampling_rate``,
``do_normalize``); :class:`EncoderInput` carries that with the loaded model and turns pipeline
audio (at ``audio.sample_rate``) into the encoder's input in one place, resampling with soxr.
The project's own encoders (no ``preprocessor_config.json``) take the pipeline's audio as it is,
normalised per example, as before. Every supported encoder takes raw waveform (its conv stack is
its front end); frame-level (spectrogram) encoders are refused with a clear error.
"""

from __future__ import annotations

import json
import math
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch
from transformers import AutoConfig, AutoModel, HubertConfig, HubertModel, PreTrainedModel

ENCODER_SIZES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        conv_dim=(32, 32, 32),
        conv_stride=(5, 8, 8),
        conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        conv_dim=(256,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=64,
        num_conv_pos_embedding_groups=16,
    ),
    "base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        conv_dim=(512,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
    ),
}


def encoder_config(size: str) -> HubertConfig:
    """The HubertConfig of a named size (no weights allocated)."""
    if size not in ENCODER_SIZES:
        raise ValueError(f"unknown encoder size {size!r}; choose one of {sorted(ENCODER_SIZES)}")
    # mask_time_prob > 0 creates the learned mask embedding that pretraining's explicit
    # mask_time_indices use; in fine-tuning it acts as SpecAugment (training mode only).
    return HubertConfig(
        **ENCODER_SIZES[size],
        layerdrop=0.0,
        mask_time_prob=0.05,
        mask_time_length=5,
        mask_feature_prob=0.0,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
    )


def build_encoder(size: str, seed: int | None = None) -> HubertModel:
    """A randomly initialised encoder of a named size (deterministic when seeded)."""
    config = encoder_config(size)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return HubertModel(config)
    return HubertModel(config)


def count_parameters(size: str) -> int:
    """Parameter count of a named size, without allocating memory (meta device)."""
    with torch.device("meta"):
        model = HubertModel(encoder_config(size))
    return sum(p.numel() for p in model.parameters())


def disable_layerdrop(model: PreTrainedModel) -> PreTrainedModel:
    if hasattr(model.config, "layerdrop"):
        model.config.layerdrop = 0.0
    encoder = getattr(model, "encoder", None)
    if encoder is not None and hasattr(encoder, "layerdrop"):
        encoder.layerdrop = 0.0
    return model


PREPROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass(frozen=True)
class EncoderInput:
    """What an encoder is fed: raw waveform at ``sampling_rate`` (None: the pipeline's own
    rate, as for the project's encoders), zero-mean unit-variance per example if ``do_normalize``.

    Read from a checkpoint folder's ``preprocessor_config.json`` (:meth:`from_pretrained`),
    written back next to the weights when the encoder is saved (:func:`save_encoder`).
    """

    sampling_rate: int | None = None
    do_normalize: bool = True

    @classmethod
    def from_preprocessor_config(
        cls, data: dict, where: str = "preprocessor config"
    ) -> EncoderInput:
        feature_size = data.get("feature_size", 1)
        if feature_size != 1:
            raise ValueError(
                f"{where}: feature_size={feature_size} means the encoder takes frames of "
                f"{feature_size} features (a spectrogram front end); only raw-waveform encoders "
                "(feature_size 1: Wav2Vec2, HuBERT, Data2Vec-audio, MERT) are supported"
            )
        rate = data.get("sampling_rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0):
            raise ValueError(f"{where}: sampling_rate must be a positive integer, got {rate!r}")
        do_normalize = data.get("do_normalize", True)
        if not isinstance(do_normalize, bool):
            raise ValueError(f"{where}: do_normalize must be true or false, got {do_normalize!r}")
        return cls(sampling_rate=rate, do_normalize=do_normalize)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> EncoderInput:
        """The input spec of a checkpoint folder (or a hub name in the local cache); the
        default (pipeline rate, normalised) when it has no ``preprocessor_config.json``."""
        path = Path(name_or_path) / PREPROCESSOR_CONFIG
        if not Path(name_or_path).exists():
            from transformers.utils import cached_file

            cached = cached_file(
                str(name_or_path),
                PREPROCESSOR_CONFIG,
                local_files_only=True,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
            path = Path(cached) if cached else path
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_preprocessor_config(data, str(path))

    def preprocessor_config(self) -> dict:
        """A ``preprocessor_config.json`` that transformers' Wav2Vec2FeatureExtractor reads too."""
        return {
            "feature_extractor_type": "Wav2Vec2FeatureExtractor",
            "feature_size": 1,
            "sampling_rate": self.sampling_rate,
            "do_normalize": self.do_normalize,
            "padding_side": "right",
            "padding_value": 0.0,
            "return_attention_mask": False,
        }

    def rate(self, sample_rate: int) -> int:
        """The rate the encoder hears audio given at ``sample_rate``."""
        return int(self.sampling_rate or sample_rate)

    def prepare(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Pipeline audio [B, T] at ``sample_rate`` -> the encoder's input [B, T']: resampled
        to the encoder's rate (soxr) when the two differ, then normalised if the encoder wants."""
        target = self.rate(sample_rate)
        if target != int(sample_rate):
            waveform = resample_batch(waveform, int(sample_rate), target)
        return normalize_waveform(waveform) if self.do_normalize else waveform


def resample_batch(waveform: torch.Tensor, rate_in: int, rate_out: int) -> torch.Tensor:
    """Resample every row of [B, T] with soxr (HQ), keeping dtype and device (not differentiable:
    it is applied to input audio only)."""
    if waveform.dim() != 2:
        raise ValueError(f"expected a batch [B, T], got shape {tuple(waveform.shape)}")
    rows = waveform.detach().float().cpu().numpy()
    # soxr resamples [frames, channels] at once: the batch rows are its channels.
    out = soxr.resample(np.ascontiguousarray(rows.T), rate_in, rate_out, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(out.T)).to(
        device=waveform.device, dtype=waveform.dtype
    )


def encoder_input(model: PreTrainedModel) -> EncoderInput:
    """The input spec :func:`load_encoder` attached (the default for built encoders)."""
    return getattr(model, "mess_encoder_input", None) or EncoderInput()


def save_encoder(model: PreTrainedModel, folder: str | Path) -> Path:
    """``save_pretrained`` plus the ``preprocessor_config.json`` of a published encoder, so a
    model fine-tuned from MERT still hears 24 kHz audio after a round trip."""
    folder = Path(folder)
    model.save_pretrained(folder)
    spec = encoder_input(model)
    if spec != EncoderInput():
        (folder / PREPROCESSOR_CONFIG).write_text(json.dumps(spec.preprocessor_config(), indent=2))
    return folder


def _check_waveform_encoder(model: PreTrainedModel, name: str) -> None:
    config = model.config
    missing = [
        what
        for what, ok in (
            ("config.conv_stride", hasattr(config, "conv_stride")),
            ("config.hidden_size", hasattr(config, "hidden_size")),
            ("a conv feature_extractor", hasattr(model, "feature_extractor")),
            (
                "_get_feat_extract_output_lengths",
                hasattr(model, "_get_feat_extract_output_lengths"),
            ),
        )
        if not ok
    ]
    if missing:
        raise ValueError(
            f"{name!r} loads as {type(model).__name__}, which lacks {', '.join(missing)}: "
            "only raw-waveform encoders of the wav2vec 2.0 family (Wav2Vec2, HuBERT, "
            "Data2Vec-audio, MERT) are supported"
        )


def load_encoder(name_or_path: str | Path, trust_remote_code: bool = False) -> PreTrainedModel:
    """An encoder saved with ``save_pretrained`` (a folder) or a hub name available offline,
    with its :class:`EncoderInput` (from ``preprocessor_config.json``) attached.

    Checkpoints with custom code (MERT) need ``trust_remote_code=True``: running code from a
    checkpoint is an explicit opt-in, never a default.
    """
    name = str(name_or_path)
    is_local = Path(name).exists()
    if is_local and not (Path(name) / "config.json").exists():
        raise ValueError(
            f"{name} is a folder without config.json: not a save_pretrained checkpoint"
        )
    if is_local and not trust_remote_code and _has_custom_code(Path(name)):
        # Checked here: transformers would otherwise ask on stdin in an interactive session.
        raise ValueError(
            f"{name!r} ships custom model code (config.json auto_map); set "
            "model.trust_remote_code: true to allow running it"
        )
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModel.from_pretrained(name, config=config, trust_remote_code=trust_remote_code)
    except OSError as err:
        where = "local folder" if is_local else "hub name (no network for model downloads here?)"
        raise ValueError(
            f"cannot load encoder {name!r} as a {where}: {err}. Pass a folder written by "
            "save_pretrained, or pre-download the checkpoint into the Hugging Face cache."
        ) from err
    except ValueError as err:
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise ValueError(
                f"{name!r} ships custom model code; set model.trust_remote_code: true "
                "to allow running it"
            ) from err
        raise
    _check_waveform_encoder(model, name)
    model.mess_encoder_input = EncoderInput.from_pretrained(name)
    return disable_layerdrop(model)


def _has_custom_code(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder}/config.json cannot be read: {err}") from err
    return isinstance(config, dict) and bool(config.get("auto_map"))


def conv_stride(model: PreTrainedModel) -> int:
    """Samples per encoder frame (product of the conv strides)."""
    return int(math.prod(model.config.conv_stride))


def num_frames(model: PreTrainedModel, num_samples: int) -> int:
    """Encoder frames for an input of ``num_samples`` samples."""
    lengths = model._get_feat_extract_output_lengths(torch.tensor([num_samples]))
    return int(lengths[0])


def normalize_waveform(waveform: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance per example (as HuBERT's feature extractor does).

    Applied identically in training and inference; silence stays silence (eps).
    """
    mean = waveform.mean(dim=-1, keepdim=True)
    std = waveform.std(dim=-1, keepdim=True)
    return (waveform - mean) / (std + eps)


# -- fast inference path of the convolutional feature encoder ---------------------------------
# HuBERT's feature encoder is a stack of strided 1-D convolutions over the raw waveform; on CPU
# it is about half of a `base` forward pass and nearly all of a `tiny` one. Inference computes
# the same function time-major ([B, T, C], which is the layout the encoder wants next anyway):
# each strided convolution is a window view of its input times the reshaped kernel (one GEMM;
# a free reshape when kernel == stride), and the first layer's per-channel GroupNorm is folded
# into one scale-and-shift. In bf16 the GEMMs run on the CPU's matrix units (AMX).


def _conv_as_matmul(hidden: torch.Tensor, conv: torch.nn.Conv1d) -> torch.Tensor:
    """``conv`` applied to time-major ``hidden`` [B, T, C] -> [B, T_out, C_out]."""
    (kernel,), (stride,) = conv.kernel_size, conv.stride
    batch, length, channels = hidden.shape
    steps = (length - kernel) // stride + 1
    hidden = hidden.contiguous()
    windows = hidden.as_strided(
        (batch, steps, kernel, channels), (length * channels, stride * channels, channels, 1)
    ).reshape(batch, steps, kernel * channels)
    weight = conv.weight.permute(0, 2, 1).reshape(conv.out_channels, kernel * channels)
    out = windows @ weight.t().to(windows.dtype)
    return out if conv.bias is None else out + conv.bias.to(out.dtype)


def _fast_path_supported(feature_encoder: torch.nn.Module) -> bool:
    layers = getattr(feature_encoder, "conv_layers", None)
    if not layers:
        return False
    for layer in layers:
        conv = getattr(layer, "conv", None)
        if not isinstance(conv, torch.nn.Conv1d) or not hasattr(layer, "activation"):
            return False
        if conv.padding != (0,) or conv.dilation != (1,) or conv.groups != 1:
            return False
        norm = getattr(layer, "layer_norm", None)
        if norm is None:
            continue
        per_channel_group = (
            isinstance(norm, torch.nn.GroupNorm)
            and norm.num_groups == norm.num_channels == conv.out_channels
        )
        if not (per_channel_group or isinstance(norm, torch.nn.LayerNorm)):
            return False
    return layers[0].conv.in_channels == 1


def _first_conv_group_norm_stats(
    windows: torch.Tensor, conv: torch.nn.Conv1d, norm: torch.nn.GroupNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example kernel [B, k, C] and shift [B, C] of the first layer (1 input channel) with
    its per-channel GroupNorm folded in: with windows X [T, k] and kernel W [k, C], h = X W has
    per-channel mean m W and second moment diag(W^T (X^T X / T) W), from the k x k Gram matrix,
    so normalising h is a rescaling of W plus a shift and conv + norm cost one matmul."""
    kernel = conv.kernel_size[0]
    steps = windows.shape[1]
    weight = conv.weight.float().reshape(conv.out_channels, kernel).t()  # [k, C]
    gram = torch.bmm(windows.transpose(1, 2), windows) / steps  # [B, k, k]
    mean_h = windows.mean(dim=1) @ weight  # [B, C]
    second = torch.einsum("bij,ic,jc->bc", gram, weight, weight)
    var = (second - mean_h.square()).clamp_min(0.0)
    scale = norm.weight.float() * torch.rsqrt(var + norm.eps)  # [B, C]
    shift = norm.bias.float() - mean_h * scale
    # A conv bias shifts each channel's mean only, which the norm removes: it cancels out.
    return weight[None] * scale[:, None, :], shift


def _first_two_layers(
    feature_encoder: torch.nn.Module, waveform: torch.Tensor, chunk_frames: int, dtype: torch.dtype
) -> torch.Tensor:
    """Layers 0 (conv + folded GroupNorm + activation) and 1 (conv + norm-free activation)
    chunk by chunk over time, so that layer 0's full-rate output (the largest tensor of the
    encoder: C x T/5 per clip) never leaves the cache. Returns layer 1's output [B, T1, C1]."""
    first, second = feature_encoder.conv_layers[0], feature_encoder.conv_layers[1]
    (k0,), (s0,) = first.conv.kernel_size, first.conv.stride
    (k1,), (s1,) = second.conv.kernel_size, second.conv.stride
    windows = waveform.float().unfold(-1, k0, s0)  # [B, T0, k0] view
    kernels, shifts = _first_conv_group_norm_stats(windows, first.conv, first.layer_norm)
    channels = first.conv.out_channels
    w1 = second.conv.weight.permute(0, 2, 1).reshape(second.conv.out_channels, k1 * channels)
    w1 = w1.t().to(dtype)
    steps0 = windows.shape[1]
    steps1 = (steps0 - k1) // s1 + 1
    step = max(1, chunk_frames // s1)
    outputs = []
    for b in range(waveform.shape[0]):
        rows = []
        for t1 in range(0, steps1, step):
            n1 = min(step, steps1 - t1)
            a0, n0 = t1 * s1, (n1 - 1) * s1 + k1
            h0 = torch.addmm(shifts[b], windows[b, a0 : a0 + n0], kernels[b])  # [n0, C]
            h0 = first.activation(h0).to(dtype)
            cols = h0.as_strided((n1, k1 * channels), (s1 * channels, 1))
            rows.append(cols @ w1)
        outputs.append(torch.cat(rows))
    hidden = torch.stack(outputs)
    if second.conv.bias is not None:
        hidden = hidden + second.conv.bias
    return hidden


def fast_conv_features(
    feature_encoder: torch.nn.Module,
    waveform: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    chunk_frames: int = 2048,
) -> torch.Tensor:
    """The feature encoder's output [B, C, T] (a transposed view), computed time-major.

    ``dtype`` is the arithmetic of the convolutions after the first (bf16 runs them on the
    CPU's matrix units); the first layer, its norm statistics and the output stay float32,
    also under an outer autocast (the Embedder runs the transformer under bf16 autocast): the
    first layer's folded GroupNorm statistics (a Gram matrix; second moment minus squared
    mean) lose their precision in bf16, which cost recall@10 0.967 instead of 0.996 against
    float32 vectors on `base` in benchmarks/embed_throughput.py."""
    with torch.autocast(waveform.device.type, enabled=False):
        return _fast_conv_features(feature_encoder, waveform, dtype, chunk_frames)


def _fast_conv_features(
    feature_encoder: torch.nn.Module, waveform: torch.Tensor, dtype: torch.dtype, chunk_frames: int
) -> torch.Tensor:
    layers = feature_encoder.conv_layers
    fused = (
        len(layers) > 1
        and isinstance(getattr(layers[0], "layer_norm", None), torch.nn.GroupNorm)
        and getattr(layers[1], "layer_norm", None) is None
    )
    if fused:
        hidden = layers[1].activation(
            _first_two_layers(feature_encoder, waveform, chunk_frames, dtype)
        )
        rest = layers[2:]
    else:
        hidden, rest = waveform[:, :, None], layers  # [B, T, 1]
    for i, layer in enumerate(rest):
        if fused or i > 0:
            hidden = hidden.to(dtype)
        hidden = _conv_as_matmul(hidden, layer.conv)
        norm = getattr(layer, "layer_norm", None)
        if isinstance(norm, torch.nn.GroupNorm):  # one group per channel, over time
            var, mean = torch.var_mean(hidden.float(), dim=1, keepdim=True, correction=0)
            scale = norm.weight * torch.rsqrt(var + norm.eps)
            hidden = torch.addcmul(norm.bias - mean * scale, hidden.float(), scale)
        elif isinstance(norm, torch.nn.LayerNorm):  # over channels
            hidden = norm(hidden)
        hidden = layer.activation(hidden)
    return hidden.float().transpose(1, 2)


def enable_fast_inference(encoder: torch.nn.Module, dtype: torch.dtype = torch.float32) -> bool:
    """Route ``encoder``'s feature encoder through :func:`fast_conv_features` whenever it runs
    without gradients in eval mode (training and autograd keep the original module code), its
    later convolutions in ``dtype``.
    Returns False, changing nothing, for encoders of another structure."""
    feature_encoder = getattr(encoder, "feature_extractor", None)
    if feature_encoder is None or not _fast_path_supported(feature_encoder):
        return False
    feature_encoder._fast_dtype = dtype
    if getattr(feature_encoder, "_fast_inference", False):
        return True
    original = feature_encoder.forward

    def forward(input_values: torch.Tensor) -> torch.Tensor:
        if feature_encoder.training or torch.is_grad_enabled():
            return original(input_values)
        return fast_conv_features(feature_encoder, input_values, feature_encoder._fast_dtype)

    feature_encoder.forward = forward
    feature_encoder._fast_inference = True
    return True


# -- GPU: the positional convolution outside bf16 autocast -----------------------------------
# HuBERT's positional embedding is a grouped convolution (768 channels in 16 groups, kernel 128
# for `base`): 3-5 % of the FLOPs, but under CUDA's bf16 autocast cuDNN runs it on
# direct, non-tensor-core kernels (``implicit_convolve_sgemm``/``precomputed_convolve_sgemm``
# on bf16): about half of `base`'s bf16 forward and a quarter of a bf16 pretraining step on an
# H200 (benchmarks/gpu_throughput.py --profile), while in float32 it runs on TF32 tensor-core
# kernels (cuDNN's default) in a fraction of that time.


def _float32_pos_conv_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.is_cuda and torch.is_autocast_enabled("cuda"):
        with torch.autocast("cuda", enabled=False):
            return type(self).forward(self, hidden_states.float())
    return type(self).forward(self, hidden_states)


def float32_positional_conv(model: torch.nn.Module, enabled: bool = True) -> int:
    """Run every waveform encoder's positional convolution inside ``model`` in float32 when it
    meets CUDA tensors under autocast (in place; weights, state dict and CPU behaviour
    untouched), or with ``enabled=False`` as the module's own code again. Returns how many
    modules changed."""
    changed = 0
    for module in model.modules():
        if not type(module).__name__.endswith("PositionalConvEmbedding"):
            continue
        if not all(hasattr(module, a) for a in ("conv", "padding", "activation")):
            continue
        patched = "forward" in vars(module)
        if enabled and not patched:
            module.forward = types.MethodType(_float32_pos_conv_forward, module)
            changed += 1
        elif not enabled and patched:
            del module.forward
            changed += 1
    return changed
