"""Embedder: the one way every later stage turns audio into vectors.

``Embedder.from_ref(cfg, storage, ref)`` where ref is

- ``"finetune"``: the latest fine-tuned :class:`EmbeddingModel` (``finetune/<version>/model/``);
- ``"pretrain"``: the latest SSL encoder (``pretrain/<version>/model/``), mean-pooled hidden
  states of ``cfg.model.ssl_layer`` (middle layer by default), no projection head;
- ``"random"``: a randomly initialised encoder of ``cfg.model.size`` seeded with
  ``cfg.model.seed`` (deterministic: the same config gives the same vectors);
- ``"shipped"`` / ``"shipped:<name>"``: a model shipped inside the package
  (:mod:`mess_ray.models.shipped`);
- ``"auto"``: the latest ``finetune`` artifact if one exists, else the shipped default;
- a local folder or remote URL of either kind of model folder (an artifact folder holding
  ``model/`` works too).

``.info`` records what was loaded (ref, kind, stage, version, path, layer, and ``facet_layout``:
the faceted embedding's part ranges as JSON lists, None without facet heads; ``content_timeline``:
the rates of the appended content timeline part, None without one, see ``model.content_timeline``;
``query_facet_weights``: the per-part weights its queries are searched with when a query names
none, a shipped model's declaration, None: equal) so that a server or evaluator can rebuild exactly the same embedder with ``Embedder.from_info``.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mess_ray.config import MessRayConfig
from mess_ray.models import shipped
from mess_ray.models.embedding import EmbeddingModel, is_embedding_model_dir
from mess_ray.models.encoder import (
    build_encoder,
    enable_fast_inference,
    encoder_input,
    float32_positional_conv,
    load_encoder,
)
from mess_ray.segments import fit_length, window_samples
from mess_ray.storage import Storage

MODEL_SUBDIR = "model"
STAGE_REFS = ("finetune", "pretrain")


def resolve_layer(num_layers: int, layer: int | None) -> int:
    """Index into ``hidden_states`` (length num_layers + 1); None picks the middle layer."""
    num_states = num_layers + 1
    if layer is None:
        return num_states // 2
    index = layer if layer >= 0 else num_states + layer
    if not 0 <= index < num_states:
        raise ValueError(f"ssl_layer={layer} out of range for an encoder with {num_layers} layers")
    return index


class MeanPooledEncoder(nn.Module):
    """Encoder without a head: one hidden layer averaged over time, L2-normalised
    (waveform at ``sample_rate``; a published encoder hears it at its own rate)."""

    def __init__(
        self, encoder: nn.Module, layer: int | None = None, sample_rate: int = 16000
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.sample_rate = int(sample_rate)
        self.layer = resolve_layer(int(encoder.config.num_hidden_layers), layer)
        self.embedding_dim = int(encoder.config.hidden_size)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        encoder_in = encoder_input(self.encoder).prepare(waveform, self.sample_rate)
        if not self.training and not torch.is_grad_enabled() and _stops_early(self.encoder):
            states = _hidden_state_up_to(self.encoder, encoder_in, self.layer)
        else:
            states = self.encoder(encoder_in, output_hidden_states=True).hidden_states[self.layer]
        return F.normalize(states.mean(dim=1).float(), dim=-1)


class ContentTimelineJoined(nn.Module):
    """A model's vectors with the passage's content timelines appended as a last ``timeline``
    part (:func:`mess_ray.content.timelines`; computed on the CPU from the waveform, no
    learning). The model's parts and the timeline each get ``1 / (parts + 1)`` of the cosine,
    as the facets contract gives every part; a model without a layout counts as one
    ``overall`` part. A model that already has a (learned) timeline part is refused."""

    def __init__(
        self,
        model: nn.Module,
        sample_rate: int,
        window: int,
        rates: tuple[float, float],
        query_shifts_ms: tuple[float, ...] = (0.0,),
    ) -> None:
        from mess_ray.content import timelines
        from mess_ray.facets import OVERALL, TIMELINE

        super().__init__()
        base = getattr(model, "facet_layout", None) or {OVERALL: (0, int(model.embedding_dim))}
        if TIMELINE in base:
            raise ValueError(
                "model.content_timeline: this model already has a timeline part "
                "(model.timeline_bins); use one or the other"
            )
        self.model = model
        self.sample_rate = int(sample_rate)
        self.rates = (float(rates[0]), float(rates[1]))
        self.query_shifts_ms = tuple(float(v) for v in query_shifts_ms) or (0.0,)
        self._timelines = timelines
        self.base_parts = len(base)
        base_dim = int(model.embedding_dim)
        width = timelines(np.zeros((1, int(window)), np.float32), self.sample_rate, *self.rates)
        self.timeline_dim = int(width.shape[1])
        self.embedding_dim = base_dim + self.timeline_dim
        self.facet_layout = {**base, TIMELINE: (base_dim, self.embedding_dim)}

    @property
    def encoder(self) -> nn.Module | None:  # the fast CPU path and precision act on it
        return getattr(self.model, "encoder", None)

    @property
    def layer(self) -> int | None:
        return getattr(self.model, "layer", None)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        base = F.normalize(self.model(waveform).float(), dim=-1)
        audio = waveform.detach().float().cpu().numpy()
        timeline = torch.from_numpy(
            self._timelines(audio, self.sample_rate, *self.rates).astype(np.float32)
        ).to(base.device)
        parts = self.base_parts + 1
        return torch.cat(
            [base * float(np.sqrt((parts - 1) / parts)), timeline * float(np.sqrt(1 / parts))],
            dim=-1,
        )

    def query_variants(self, vectors: np.ndarray, audio: np.ndarray) -> np.ndarray:
        """[K, N, D]: ``vectors`` (this model's, of ``audio`` [N, T]) with the timeline part
        recomputed at each of ``query_shifts_ms`` (the first is 0: ``vectors`` themselves)."""
        return timeline_query_variants(
            vectors, audio, self.sample_rate, self.rates, self.query_shifts_ms, self.facet_layout
        )


def timeline_query_variants(
    vectors: np.ndarray,
    audio: np.ndarray,
    sample_rate: int,
    rates: tuple[float, float],
    shifts_ms: tuple[float, ...],
    layout: dict,
) -> np.ndarray:
    """[K, N, D]: ``vectors`` of ``audio`` [N, T] (a model with the content timeline appended as
    the last part of ``layout``) with that part recomputed at each lag of ``shifts_ms``
    (:func:`mess_ray.content.timeline_variants`; a lag of 0 keeps ``vectors`` as they are)."""
    from mess_ray.content import timeline_variants
    from mess_ray.facets import TIMELINE

    start, end = (int(v) for v in layout[TIMELINE])
    out = np.repeat(np.asarray(vectors, dtype=np.float32)[None], len(shifts_ms), 0)
    moved = [k for k, ms in enumerate(shifts_ms) if ms != 0]
    if moved and len(out[0]):
        shifted = timeline_variants(audio, sample_rate, [shifts_ms[k] for k in moved], *rates)
        out[moved, :, start:end] = shifted * float(np.sqrt(1 / len(layout)))
    return out


def query_variants_from_info(
    info: dict[str, Any], vectors: np.ndarray, audio: np.ndarray, sample_rate: int
) -> np.ndarray | None:
    """:func:`timeline_query_variants` for vectors an embedder described by ``info`` made
    (e.g. on an embedding pool), None when it tries its queries at one lag only."""
    from mess_ray.content import record_query_shifts, timeline_record

    record = timeline_record(info.get("content_timeline"))
    shifts = record_query_shifts(record)
    if len(shifts) == 1:
        return None
    rates = (record["chroma_rate"], record["onset_rate"])
    return timeline_query_variants(vectors, audio, sample_rate, rates, shifts, info["facet_layout"])


def _stops_early(encoder: nn.Module) -> bool:
    """A plain HuBERT encoder (post-norm layers), whose hidden state k is the output of its
    first k layers: inference can stop there instead of running the whole stack."""
    return type(encoder).__name__ == "HubertModel" and type(encoder.encoder).__name__ == (
        "HubertEncoder"
    )


def _hidden_state_up_to(encoder: nn.Module, waveform: torch.Tensor, layer: int) -> torch.Tensor:
    """``encoder(waveform, output_hidden_states=True).hidden_states[layer]`` in eval mode, running
    only the first ``layer`` transformer layers (tests check both agree)."""
    features = encoder.feature_extractor(waveform).transpose(1, 2)
    hidden = encoder.feature_projection(features)
    stack = encoder.encoder
    hidden = stack.layer_norm(hidden + stack.pos_conv_embed(hidden))
    for block in stack.layers[:layer]:
        hidden = block(hidden, attention_mask=None)
        if isinstance(hidden, tuple):  # older transformers return (hidden, attentions)
            hidden = hidden[0]
    return hidden


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 / AMX via oneDNN)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(
    precision: str, device: torch.device, encoder: nn.Module | None = None
) -> tuple[torch.dtype, torch.dtype]:
    """(front-end dtype, autocast dtype) of CPU inference.

    - ``float32``: everything in float32 (the same function as the module's own forward).
    - ``bfloat16``: the conv front end's GEMMs after its first layer in bf16, and the rest of
      the model under bf16 autocast, for any encoder (a narrow one such as `tiny` gains
      nothing and its neighbour rankings of nearly collinear random vectors move).
    - ``auto``: the same as ``bfloat16`` where the CPU has native bf16 (AVX512-BF16 / AMX) and
      the encoder is wide (front end >= 256 channels, hidden size >= 256), else float32.
      Under autocast the transformer's GEMMs (projections, FFN, attention, positional conv)
      run in bf16 with float32 accumulation, while LayerNorm, softmax statistics, residual sums
      and the front end's first layer with its folded GroupNorm stay float32: recall@10
      against the plain float32 vectors >= 0.99 in benchmarks/embed_throughput.py.
    On a GPU (no separate front end: the fast path is CPU-only), measured for `base` at 24 kHz,
    batch 256, on an H200 (``benchmarks/gpu_throughput.py``, docs/scaling.md): ``auto`` keeps
    float32 tensors and lets the Embedder run matrix products and convolutions in TF32 (3.2x
    plain float32; recall@10 against it 0.9988); ``bfloat16`` runs the model under CUDA's bf16
    autocast with the positional convolution in float32 (1,580 segments/s against TF32's
    1,634-1,676 in other runs; recall@10 0.9926).
    """
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}")
    if precision == "float32":
        return torch.float32, torch.float32
    if device.type != "cpu":
        bf16 = precision == "bfloat16" and device.type == "cuda"
        return torch.float32, torch.bfloat16 if bf16 else torch.float32
    if precision == "bfloat16":
        return torch.bfloat16, torch.bfloat16
    config = getattr(encoder, "config", None)
    widths = getattr(config, "conv_dim", None) or (0,)
    wide = min(widths) >= 256 and int(getattr(config, "hidden_size", 0) or 0) >= 256
    if wide and cpu_has_native_bf16():
        return torch.bfloat16, torch.bfloat16
    return torch.float32, torch.float32


@contextlib.contextmanager
def allow_tf32(enabled: bool) -> Iterator[None]:
    """CUDA matrix products and cuDNN convolutions in TF32 inside the block (when ``enabled``),
    the process's settings restored after. The flags are process-wide: two blocks overlapping in
    threads (a replica serving concurrent requests) can end each other's TF32 early, which
    costs speed, never correctness beyond TF32's own rounding."""
    if not enabled:
        yield
        return
    backends = torch.backends
    before = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
    backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = before


class Embedder:
    """Batched no-grad inference: float32 [B, T] at cfg.audio.sample_rate -> float32 [B, D].

    On CPU, ``fast`` (default) computes the encoder's convolutional front end as cache-sized
    GEMMs (:func:`mess_ray.models.encoder.enable_fast_inference`; the same function up to float
    rounding), and ``precision`` (see :func:`resolve_precision`) picks bf16 where it pays: the
    front end's later GEMMs, and the transformer under bf16 autocast.
    ``fast=False, precision="float32"`` is the plain module forward (the benchmarks' baseline).
    """

    def __init__(
        self,
        model: nn.Module,
        dim: int,
        info: dict[str, Any],
        window_samples: int,
        batch_size: int = 16,
        precision: str = "auto",
        fast: bool = True,
    ) -> None:
        # On a GPU replica or embedding actor (num_gpus > 0) Ray exposes CUDA: run the model there.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        if self.device.type == "cuda":
            float32_positional_conv(self.model)  # cuDNN's bf16 kernels for it are slow
        # TF32 on CUDA where 'auto' leaves float32 (see resolve_precision).
        self.tf32 = self.device.type == "cuda" and precision == "auto"
        self.dim = int(dim)
        self.info = info
        self.window_samples = int(window_samples)
        self.batch_size = int(batch_size)
        encoder = getattr(self.model, "encoder", None)
        front_dtype, self.dtype = resolve_precision(precision, self.device, encoder)
        self.fast = (
            bool(fast) and self.device.type == "cpu" and enable_fast_inference(encoder, front_dtype)
        )
        self.front_end_dtype = front_dtype if self.fast else torch.float32
        if precision == "auto" and not self.fast:
            # 'auto' trades precision only where its recall was measured: on the fast path.
            self.dtype = torch.float32

    def embed(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim == 1:
            raise ValueError("embed expects a batch [B, T]; wrap a single clip as batch[None, :]")
        if batch.ndim != 2:
            raise ValueError(f"embed expects a 2-D float array [B, T], got shape {batch.shape}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if not np.isfinite(batch).all():
            raise ValueError("audio contains NaN or infinite samples")
        batch = self._fit_window(batch)
        outputs = []
        autocast = torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )
        with torch.inference_mode(), autocast, allow_tf32(self.tf32):
            for start in range(0, len(batch), self.batch_size):
                chunk = torch.from_numpy(
                    np.ascontiguousarray(batch[start : start + self.batch_size])
                )
                outputs.append(self.model(chunk.to(self.device)).float().cpu().numpy())
        return np.concatenate(outputs).astype(np.float32, copy=False)

    __call__ = embed

    @property
    def query_shifts_ms(self) -> tuple[float, ...]:
        """The lags a query's content timeline is tried at ((0.0,): one)."""
        return getattr(self.model, "query_shifts_ms", (0.0,))

    def query_variants(self, vectors: np.ndarray, batch: np.ndarray) -> np.ndarray:
        """[K, N, D]: the query vectors to search with for ``batch`` [N, T] whose embeddings
        are ``vectors`` (one per lag of :attr:`query_shifts_ms`, the unshifted first); a
        candidate's score is its best over the K (:meth:`SearchIndex.search` with [K, D])."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(self.query_shifts_ms) == 1:
            return vectors[None]
        return self.model.query_variants(vectors, self._fit_window(batch))

    def _fit_window(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` [B, T] as float32 rows of the model's window (cropped or padded)."""
        batch = np.asarray(batch, dtype=np.float32)
        if batch.shape[1] != self.window_samples:
            batch = np.stack([fit_length(row, self.window_samples) for row in batch])
        return batch

    def embed_query(self, batch: np.ndarray) -> np.ndarray:
        """[K, N, D]: :meth:`embed` of ``batch`` and its :meth:`query_variants`."""
        return self.query_variants(self.embed(batch), batch)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_ref(cls, cfg: MessRayConfig, storage: Storage, ref: str) -> Embedder:
        if not ref:
            raise ValueError(
                "model ref must be 'auto', 'finetune', 'pretrain', 'shipped', 'random' or a folder"
            )
        if ref == shipped.AUTO:
            ref = "finetune" if storage.latest("finetune") else shipped.SHIPPED_PREFIX
        declared = None
        if shipped.is_shipped_ref(ref):
            name = shipped.shipped_name(ref)
            shipped.model_dir(name)  # a clear error for an unknown name
            info: dict[str, Any] = {"ref": ref, "shipped": name}
            # A shipped model that declares the content timeline has it whatever the config
            # says (it is part of that model's vectors); any other takes it from the config.
            declared = shipped.declared_content_timeline(name)
        elif ref == "random":
            info = {
                "ref": "random",
                "kind": "random",
                "size": cfg.model.size,
                "seed": cfg.model.seed,
            }
        elif ref in STAGE_REFS:
            version = storage.require_latest(ref)
            info = {
                "ref": ref,
                "stage": ref,
                "version": version,
                "path": storage.url(ref, version, MODEL_SUBDIR),
            }
        else:
            info = {"ref": ref, "path": ref}
        # A new embedder takes the content timeline from the config (or the shipped model's
        # declaration); a rebuilt one (from_info with a manifest's record) keeps the record.
        info["content_timeline"] = declared or configured_content_timeline(cfg)
        return cls.from_info(cfg, storage, info)

    @classmethod
    def from_info(cls, cfg: MessRayConfig, storage: Storage, info: dict[str, Any]) -> Embedder:
        """Rebuild the embedder described by ``info`` (from a manifest), same version and weights."""
        window = window_samples(cfg.audio.window_s, cfg.audio.sample_rate)
        if info.get("kind") == "random":
            size, seed = info.get("size", cfg.model.size), int(info.get("seed", cfg.model.seed))
            model = MeanPooledEncoder(
                build_encoder(size, seed=seed),
                info.get("layer", cfg.model.ssl_layer),
                cfg.audio.sample_rate,
            )
            model, timeline = _with_content_timeline(cfg, model, info, window)
            full = {
                "ref": info.get("ref", "random"),
                "kind": "random",
                "size": size,
                "seed": seed,
                "version": None,
                "path": None,
                "layer": model.layer,
                "sample_rate": cfg.audio.sample_rate,
                "facet_layout": facet_layout_json(model),
                "content_timeline": timeline,
            }
            return cls(
                model,
                model.embedding_dim,
                full,
                window,
                cfg.model.inference_batch_size,
                cfg.model.inference_precision,
                cfg.model.fast_inference,
            )
        # The recorded layer wins over the config: from_info must rebuild the same vectors.
        layer = info.get("layer", cfg.model.ssl_layer)
        if info.get("shipped"):
            # By name, not path: every node resolves it inside its own installed package.
            model, kind = _load_model_folder(cfg, shipped.model_dir(info["shipped"]), layer)
        elif info.get("stage"):
            rel = posixpath.join(info["stage"], info["version"], MODEL_SUBDIR)
            if not storage.exists(rel):
                raise FileNotFoundError(
                    f"{storage.url(rel)} does not exist: was the "
                    f"'{info['stage']}' artifact {info['version']} deleted?"
                )
            with storage.local_dir(rel) as local:
                model, kind = _load_model_folder(cfg, local, layer)
        elif info.get("path"):
            model, kind = _load_from_path(cfg, str(info["path"]), layer)
        else:
            raise ValueError(
                f"embedder info needs kind='random', a stage+version or a path: {info}"
            )
        model, timeline = _with_content_timeline(cfg, model, info, window)
        weights = (
            shipped.declared_query_facet_weights(info["shipped"])
            if info.get("shipped")
            else info.get("query_facet_weights")
        )
        if weights:  # a clear error now rather than at the first query
            from mess_ray.facets import normalize_weights, parse_layout

            layout = parse_layout(facet_layout_json(model))
            if layout is None:
                raise ValueError("query_facet_weights need a model with facet parts")
            normalize_weights(weights, layout)
        full = {
            "ref": info.get("ref"),
            "kind": kind,
            "stage": info.get("stage"),
            "version": info.get("version"),
            "path": info.get("path"),
            "shipped": info.get("shipped"),
            "layer": getattr(model, "layer", None),
            "sample_rate": cfg.audio.sample_rate,
            "facet_layout": facet_layout_json(model),
            "content_timeline": timeline,
            "query_facet_weights": weights or None,
        }
        return cls(
            model,
            model.embedding_dim,
            full,
            window,
            cfg.model.inference_batch_size,
            cfg.model.inference_precision,
            cfg.model.fast_inference,
        )


def configured_content_timeline(cfg: MessRayConfig) -> dict[str, float] | None:
    """The content timeline ``model.content_timeline`` asks for, as an embedder records it."""
    if not cfg.model.content_timeline:
        return None
    from mess_ray.content import timeline_record

    chroma_rate, onset_rate = cfg.model.content_timeline_rates
    return timeline_record(
        {
            "chroma_rate": chroma_rate,
            "onset_rate": onset_rate,
            "query_shift_ms": cfg.model.content_timeline_query_shift_ms,
            "query_step_ms": cfg.model.content_timeline_query_step_ms,
        }
    )


def _with_content_timeline(
    cfg: MessRayConfig, model: nn.Module, info: dict[str, Any], window: int
) -> tuple[nn.Module, dict[str, float] | None]:
    """``model`` with the content timeline appended where ``info`` records one (an index is
    searched as it was built; a record without the key, from before the option, has none)."""
    from mess_ray.content import record_query_shifts, timeline_record

    record = timeline_record(info.get("content_timeline"))
    if record is None:
        return model, None
    rates = (record["chroma_rate"], record["onset_rate"])
    shifts = record_query_shifts(record)
    joined = ContentTimelineJoined(model, cfg.audio.sample_rate, window, rates, shifts)
    return joined, record


def facet_layout_json(model: nn.Module) -> dict[str, list[int]] | None:
    """The model's facet layout as JSON lists (``mess_ray.facets.parse_layout`` reads it back);
    None for models without facet heads (callers must then refuse facet weights)."""
    layout = getattr(model, "facet_layout", None)
    return (
        {name: [int(start), int(end)] for name, (start, end) in layout.items()} if layout else None
    )


def _load_model_folder(
    cfg: MessRayConfig, folder: Path, layer: int | None
) -> tuple[nn.Module, str]:
    """An EmbeddingModel folder, or a save_pretrained encoder folder (mean pooled)."""
    folder = Path(folder)
    if (folder / MODEL_SUBDIR).is_dir():  # an artifact folder rather than its model/
        folder = folder / MODEL_SUBDIR
    if is_embedding_model_dir(folder):
        model = EmbeddingModel.load(folder, trust_remote_code=cfg.model.trust_remote_code)
        trained_rate = model.options.get("sample_rate")
        if trained_rate and int(trained_rate) != cfg.audio.sample_rate:
            raise ValueError(
                f"model in {folder} was trained at {trained_rate} Hz but "
                f"audio.sample_rate is {cfg.audio.sample_rate}"
            )
        return model, "embedding_model"
    if (folder / "config.json").exists():
        encoder = load_encoder(folder, trust_remote_code=cfg.model.trust_remote_code)
        return MeanPooledEncoder(encoder, layer, cfg.audio.sample_rate), "encoder"
    raise ValueError(f"{folder} holds neither an EmbeddingModel nor a save_pretrained encoder")


def _load_from_path(cfg: MessRayConfig, path: str, layer: int | None) -> tuple[nn.Module, str]:
    if "://" in path and not path.startswith("file://"):
        remote = Storage(path, cfg.storage.s3_endpoint_url)
        if not remote.fs.exists(remote.base):
            raise FileNotFoundError(f"model folder {path} does not exist")
        with remote.local_dir("") as local:
            return _load_model_folder(cfg, local, layer)
    local = Path(path.removeprefix("file://")).expanduser()
    if not local.is_dir():
        raise FileNotFoundError(
            f"model ref {path!r} is neither 'finetune', 'pretrain', 'random' nor an existing folder"
        )
    return _load_model_folder(cfg, local, layer)
