"""One typed configuration schema for every stage and job.

A config is a YAML file validated by :class:`MessRayConfig`. Every job reads the same
schema, so a single file describes a whole deployment (storage, audio framing, model,
training, index and serving). Unknown keys are errors: a typo must not silently fall back
to a default.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    field_validator,
    model_validator,
)

DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"


def pin_local_path(value: str | None) -> str | None:
    """Absolute form of a local path (URLs unchanged): relative paths mean "from where the
    command ran", and Ray workers run in other working directories."""
    if value is None or ("://" in value and not value.startswith("file://")):
        return value
    if not value.strip():
        raise ValueError("a path must not be empty")
    return str(Path(value.removeprefix("file://")).expanduser().resolve())


def _is_number_field(annotation: Any) -> bool:
    """int/float (optionally None) but not bool: such a field must not take ``true``."""
    args = get_args(annotation) or (annotation,)
    return bool not in args and any(a in (int, float) for a in args)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        # pydantic's lax mode reads `port: true` as 1; in a config that is always a mistake.
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field and _is_number_field(field.annotation):
                    raise ValueError(f"{name}: expected a number, got {str(value).lower()}")
        return data


class StorageConfig(_Section):
    root: str = Field(
        "./mess-ray-data",
        validate_default=True,
        description="Local folder or s3://bucket/prefix (any fsspec URL).",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint for S3-compatible stores (MinIO, moto...)."
    )

    _pin_root = field_validator("root")(pin_local_path)


class RayConfig(_Section):
    address: str | None = Field(
        None, description="Cluster address; None starts an embedded local Ray."
    )
    num_cpus: int | None = Field(None, description="Logical CPUs of the embedded local Ray.")


class AudioConfig(_Section):
    sample_rate: int = Field(16000, ge=8000, le=192000)
    window_s: float = Field(4.0, gt=0)
    hop_s: float = Field(2.0, gt=0)
    min_duration_s: float = Field(1.0, ge=0, description="Shorter recordings are rejected.")

    @model_validator(mode="after")
    def _hop_not_above_window(self) -> AudioConfig:
        if self.hop_s > self.window_s:
            raise ValueError("audio.hop_s must not exceed audio.window_s (gaps would lose audio)")
        return self


class StyleSpec(_Section):
    """An expressive profile applied to a score before synthesis (see mess_ray.render.expressive)."""

    name: str
    tempo_scale: float = Field(1.0, gt=0.1, le=4.0, description="Global tempo factor (>1 faster).")
    rubato: float = Field(0.0, ge=0, le=1, description="Depth of phrase-arch tempo curves.")
    tempo_jitter: float = Field(0.0, ge=0, le=0.5, description="Random-walk tempo deviation.")
    velocity: int = Field(80, ge=1, le=127, description="Mean MIDI velocity.")
    velocity_range: int = Field(10, ge=0, le=63, description="Spread of dynamics around the mean.")
    dynamics_arc: Literal["flat", "crescendo", "diminuendo", "hairpin"] = "flat"
    accent_every: int = Field(0, ge=0, description="Accent every n-th beat (0: none).")
    articulation: float = Field(
        1.0, gt=0.05, le=2.0, description="Note length ratio: <1 staccato, >1 legato overlap."
    )
    pedal: bool = False
    program: int = Field(0, ge=0, le=127, description="General MIDI program (timbre).")
    phrase_bars: int = Field(4, ge=1, le=32, description="Bars per phrase for the rubato arch.")
    pedal_mode: Literal["bar", "harmony"] = Field(
        "bar", description="Re-pedal at each bar or at bass changes."
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "brightness" in data:
            raise ValueError(
                "style key 'brightness' was removed: CC74 leaves FluidSynth's audio bit-identical "
                "with every chain SoundFont (FluidR3_GM, TimGM6mb, MuseScore_General_Lite; measured by "
                "python -m benchmarks.brightness_centroid), so it never distinguished styles in the "
                "audio; delete the key (program sets the timbre)"
            )
        return data

    @model_validator(mode="after")
    def _name_is_slug(self) -> StyleSpec:
        # The name becomes part of track ids and file names.
        import re

        if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", self.name) or "__" in self.name:
            raise ValueError(
                f"style name {self.name!r} must be a lowercase slug ([a-z0-9_-], no '__')"
            )
        return self


def default_styles() -> list[StyleSpec]:
    return [
        StyleSpec(
            name="romantic",
            tempo_scale=0.8,
            rubato=0.6,
            velocity=70,
            velocity_range=30,
            dynamics_arc="hairpin",
            articulation=1.2,
            pedal=True,
        ),
        StyleSpec(
            name="baroque_crisp",
            tempo_scale=1.25,
            velocity=85,
            velocity_range=6,
            accent_every=4,
            articulation=0.45,
        ),
        StyleSpec(
            name="soft_legato",
            tempo_scale=0.95,
            rubato=0.2,
            velocity=40,
            velocity_range=8,
            articulation=1.05,
            pedal=True,
        ),
        StyleSpec(
            name="march_marcato",
            tempo_scale=1.1,
            velocity=110,
            velocity_range=12,
            dynamics_arc="crescendo",
            accent_every=2,
            articulation=0.7,
            program=1,
        ),
    ]


class StyleGridConfig(_Section):
    """Renderings of the style parameter grid (mess_ray.style_grid; issue 15 task 6): the score of
    a piece performed with sampled parameter values, one instrument, loudness-normalised."""

    eval_renders: int = Field(
        0,
        ge=0,
        le=64,
        description="Evaluation-grid combinations rendered for each held-out piece (validation + "
        "test of eval.holdout_fraction / eval.seed) that has a score (music21 / midi_folder scores, "
        "ASAP midi_score); they feed the protocol's style_parameters task only. 0: none.",
    )
    train_renders: int = Field(
        0,
        ge=0,
        le=64,
        description="Training-grid combinations rendered for every training piece (the same "
        "combinations for all, so their style labels are fine-tuning classes like presets). "
        "Training values never equal an evaluation value. 0: none.",
    )
    lufs: float = Field(
        -23.0,
        ge=-40,
        le=-10,
        description="Integrated loudness of every grid rendering (pyloudnorm).",
    )


class RenderConfig(_Section):
    source: Literal["music21", "midi_folder", "asap"] = "music21"
    source_path: str | None = Field(None, description="Folder for midi_folder/asap sources.")
    midi_as_played: bool = Field(
        False,
        description="midi_folder: the files are performances (e-piano recordings, MAESTRO-style "
        "MIDI): render each once as played, no style transforms (style ''); false: each file "
        "is a score rendered in every render.styles.",
    )
    _pin_paths = field_validator("source_path", "soundfont")(pin_local_path)
    pieces: list[str] = Field(
        default_factory=list, description="music21 corpus paths; empty: the default list."
    )
    num_pieces: int = Field(8, ge=1)
    min_performances: int = Field(
        1, ge=1, description="asap: only pieces with at least this many performances."
    )
    styles: list[StyleSpec] = Field(default_factory=default_styles)
    max_duration_s: float = Field(24.0, gt=0)
    soundfont: str = DEFAULT_SOUNDFONT
    seed: int = 0
    sample_rate: int = Field(
        22050, ge=8000, le=96000, description="Synthesis rate (ingest resamples later)."
    )
    channels: Literal[1, 2] = Field(
        1, description="WAV channels written (FluidSynth renders stereo)."
    )
    gain: float = Field(0.5, gt=0, lt=10, description="FluidSynth master gain.")
    tail_s: float = Field(
        1.5, ge=0, description="Reverb/release kept after the last note-off at most."
    )
    silence_db: float = Field(
        -60.0, lt=0, description="Level below which the trailing tail is cut."
    )
    synth_timeout_s: float = Field(
        300.0, gt=0, description="Kill a FluidSynth run after this long."
    )
    chains: list[str] = Field(
        default_factory=lambda: ["dry"],
        min_length=1,
        description="Recording chains every performance is rendered through (mess_ray.render.chains): "
        "'dry' (render.soundfont, nothing after it) or 'train-<seed>' (a sampled training-side chain). "
        "With only 'dry' track ids carry no chain suffix.",
    )
    style_grid: StyleGridConfig = Field(
        default_factory=StyleGridConfig,
        description="Style-parameter grid renderings (held-out values for evaluation).",
    )
    eval_chains: list[str] = Field(
        default_factory=list,
        description="Evaluation-only chains ('eval-<seed>': SoundFonts never used for training), "
        "rendered besides render.chains for the evaluation's held-out pieces only (validation + test "
        "of eval.holdout_fraction / eval.seed), so no training stage ever hears them.",
    )

    train_piece_chains: list[str] = Field(
        default_factory=list,
        description="Extra training-side chains ('train-<seed>') rendered for the training pieces "
        "only (not the eval.holdout_fraction / eval.seed held-out pieces): pretraining and "
        "fine-tuning hear every performance through several pianos, rooms and microphones, the "
        "evaluation's chain conditions stay render.chains + render.eval_chains. Fine-tuning pairs "
        "a segment with the same performance at the same time through another chain "
        "(finetune.cross_chain_views).",
    )

    @field_validator("chains", "eval_chains", "train_piece_chains")
    @classmethod
    def _known_chains(cls, value: list[str]) -> list[str]:
        import re as _re

        if len(set(value)) != len(value):
            raise ValueError(f"chains must be distinct, got {value}")
        for name in value:
            if name != "dry" and not _re.fullmatch(r"(train|eval)-\d+", name):
                raise ValueError(f"unknown chain {name!r}: 'dry', 'train-<n>' or 'eval-<n>'")
        return value

    @model_validator(mode="after")
    def _chain_sides(self) -> RenderConfig:
        wrong = [c for c in self.train_piece_chains if not c.startswith("train-")]
        if wrong:
            raise ValueError(
                f"render.train_piece_chains takes training-side chains ('train-<n>') only, got {wrong}"
            )
        both = set(self.train_piece_chains) & set(self.chains)
        if both:
            raise ValueError(
                f"{sorted(both)} is in render.chains already (every piece): drop it from "
                "render.train_piece_chains"
            )
        return self


class IngestConfig(_Section):
    source: str | None = Field(
        None, description="Audio folder/URL or manifest; None: the latest render output."
    )
    _pin_source = field_validator("source")(pin_local_path)
    catalog: Literal["auto", "folder", "manifest", "render", "maestro", "asap"] = Field(
        "auto",
        description="auto: render if no source, MAESTRO/ASAP layouts by their metadata file, "
        ".csv/.parquet: manifest, else folder.",
    )
    read_block_s: float = Field(
        30.0, gt=0, description="Seconds decoded per read: bounds memory per worker."
    )
    max_files: int | None = None
    incremental: bool = Field(
        True, description="Reuse segments of unchanged files from the previous version."
    )
    cpus_per_task: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Ray CPUs per decode task. A task is single-threaded, so 1 (one worker "
        "process per logical CPU); fractions start more workers than Ray keeps warm.",
    )
    max_concurrent_tasks: int | None = Field(
        None,
        ge=1,
        description="Cap on decode tasks running at once (None: as many as the cluster's CPUs "
        "and cpus_per_task allow).",
    )


class ModelConfig(_Section):
    size: Literal["tiny", "small", "base"] = "tiny"
    pretrained: str | None = Field(
        None,
        description="Folder (or cached hub name) of a published checkpoint to start from: "
        "Wav2Vec2, HuBERT, Data2Vec-audio or MERT (remote code); its preprocessor_config.json "
        "sets the rate the encoder hears (audio is resampled to it). When set it wins over a "
        "local pretrain artifact under finetune.init_from: auto, unless that artifact was "
        "pretrained from this same checkpoint; init_from: pretrain forces the artifact.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Explicit opt-in for checkpoints with custom code (MERT): runs the "
        "modeling_*.py shipped in the folder.",
    )
    embedding_dim: int = Field(
        128, ge=8, description="Size of the overall part of the fine-tuned embedding."
    )
    pooling: Literal["mean", "attentive", "stats"] = Field(
        "stats",
        description="Pooling over time: mean, attentive (learned frame weights), or stats "
        "(mean and standard deviation: keeps how much things vary within a passage).",
    )
    facet_dim: int = Field(
        16,
        ge=0,
        description="Size of each facet part (tempo, dynamics, articulation, timbre) "
        "of the fine-tuned embedding; 0: no facet heads, a plain embedding. The embedding has "
        "embedding_dim + 4 * facet_dim dimensions.",
    )
    level_channel: bool = Field(
        True,
        description="Feed the raw audio's log-RMS level per frame to the heads "
        "(the encoder only sees loudness-normalised audio).",
    )
    level_reference: Literal["absolute", "window"] = Field(
        "absolute",
        description="The level channel's reference: absolute (dB re full scale: carries the "
        "recording chain's gain) or window (relative to the passage's median level, so a "
        "chain's gain cancels; issue 20, item 3).",
    )
    descriptor_channel: bool = Field(
        True,
        description="Feed each passage's z-scored audio descriptors (mess_ray.descriptors; their "
        "z-scoring fitted on training segments and saved with the model) to every head next to the pooled "
        "frames.",
    )
    timeline_bins: int = Field(
        0,
        ge=0,
        description="A timeline part at the end of the fine-tuned embedding: the passage's frames "
        "projected to timeline_dim each and kept in time order over this many bins (minus their "
        "average), so the same performance through another recording chain lines up moment by "
        "moment (the protocol's chain invariance). Trained on the cross-chain positives "
        "(finetune.timeline_weight). 0: none; otherwise >= 2.",
    )
    timeline_dim: int = Field(8, ge=1, description="Width of each timeline bin.")
    content_timeline: bool = Field(
        False,
        description="Append the passage's chroma and onset timelines (mess_ray.content.timelines:"
        " no learning; what tells the same performance through another recording chain from "
        "the same notes played with other timing) to every embedding as a last 'timeline' part "
        "with the share of one more part (w_timeline re-weights it at search time). Measured on "
        "validation, not the default: README 'The chroma and onset timelines as a part of the "
        "shipped vector'. Recorded in the embedder's info, so an index is searched as built.",
    )
    content_timeline_rates: tuple[PositiveFloat, PositiveFloat] = Field(
        (20.0, 50.0),
        description="Frames per second of the content timeline's chroma and onset envelope.",
    )
    content_timeline_query_shift_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="A query's content timeline is also tried moved up to this many ms earlier "
        "and later (every content_timeline_query_step_ms), and each candidate is scored at its "
        "best lag: a recording chain delays the sound (a far microphone, a codec), and the "
        "timelines compare moments tens of ms apart. 0: one lag. Only queries pay (index "
        "vectors are unchanged). Recorded with the timeline in the embedder's info.",
    )
    content_timeline_query_step_ms: PositiveFloat = Field(
        20.0, description="Step between the lags tried (content_timeline_query_shift_ms)."
    )
    seed: int = Field(
        0, description="Seed of randomly initialised encoders (the 'random' baseline)."
    )
    ssl_layer: int | None = Field(
        None,
        description="Hidden state mean-pooled by 'pretrain'/'random' embedders (0 = conv features, "
        "-1 = last layer); None: the middle layer.",
    )
    inference_batch_size: int = Field(
        16, ge=1, description="Rows per forward pass in Embedder.embed."
    )
    inference_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Embedder arithmetic on CPU: 'float32' throughout; 'bfloat16' = the conv "
        "front end's GEMMs after its first layer in bf16 and the transformer under bf16 "
        "autocast (GEMMs in bf16 with float32 accumulation; LayerNorm, softmax, residuals and "
        "the first conv layer with its folded GroupNorm in float32); 'auto' = 'bfloat16' where "
        "the CPU has native bf16 (AVX512-BF16/AMX) and the encoder is wide (front end and "
        "hidden size >= 256, e.g. base), else 'float32'. benchmarks/embed_throughput.py "
        "measures recall@10 of each against the plain float32 vectors. On a GPU: 'auto' = "
        "float32 tensors with TF32 matrix products and convolutions, 'bfloat16' = bf16 "
        "autocast with the positional conv in float32, 'float32' = no TF32 "
        "(benchmarks/gpu_throughput.py).",
    )
    fast_inference: bool = Field(
        True,
        description="CPU embedding through the fast path (the conv front end as cache-sized "
        "GEMMs with its first GroupNorm folded in); false: the plain module forward, the "
        "baseline of benchmarks/embed_throughput.py and benchmarks/serve_latency.py "
        "--only upload-inference.",
    )


class TrainConfig(_Section):
    """Settings shared by pretraining and fine-tuning (both run on Ray Train)."""

    run_name: str | None = Field(
        None,
        description="Checkpoints and artifact version. None: derived from the inputs and settings, so "
        "re-running the same job resumes it and new data or settings start a new run.",
    )
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    steps: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1, description="Per worker.")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(2, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    checkpoint_every: int = Field(50, ge=1)
    report_every: int = Field(
        10,
        ge=1,
        description="Steps between Ray Train metric reports (each step's "
        "loss is always kept in the run's history).",
    )
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="Checkpoints kept: the best K by the mean training loss "
        "since the previous checkpoint (the latest one is always kept too, for resume).",
    )
    max_failures: int = Field(2, ge=0)
    test_fail_at_step: int | None = Field(
        None,
        ge=1,
        description="TEST ONLY (fault-tolerance tests): the last-rank worker exits abruptly after this "
        "step, once per run (a marker file in the run folder stops the retry failing again).",
    )
    shuffle_buffer: int = Field(
        256,
        ge=1,
        description="Rows in each worker's local shuffle buffer "
        "(mixes tracks and styles within batches).",
    )
    materialize_below_mb: float = Field(
        256.0,
        ge=0,
        description="Training data whose ingest segment files total at most this many MB (on "
        "storage) is read once into Ray's object store before training, so each epoch replays "
        "it instead of restarting the read (every epoch boundary otherwise stalls all workers "
        "for seconds); larger corpora stream. 0: always stream. Does not change the batches.",
    )
    seed: int = 0
    deterministic: bool = Field(
        False,
        description="Deterministic torch kernels and one intra-op thread on every worker (with "
        "num_workers: 1 a rerun from the same seeds gives the same weights; slower).",
    )


class PretrainConfig(TrainConfig):
    steps: int = Field(100, ge=1)
    num_clusters: int = Field(
        32, ge=2, description="k-means codebook size for masked-prediction targets."
    )
    kmeans_sample_frames: int = Field(20000, ge=100)
    mask_prob: float = Field(0.65, gt=0, lt=1)
    mask_length: int = Field(5, ge=1)
    n_mels: int = Field(64, ge=8, description="Log-mel bands of the k-means target features.")
    kmeans_iterations: int = Field(20, ge=1)
    targets: list[Literal["logmel", "mfcc", "dynamics", "chroma"]] = Field(
        default_factory=lambda: ["logmel"],
        min_length=1,
        description="Masked-prediction targets, one k-means codebook and head each (MERT-style multi-target): "
        "logmel, mfcc (spectral envelope), dynamics (level/flux/centroid), chroma (CQT pitch class).",
    )
    exclude_eval_holdout: bool = Field(
        False,
        description="Leave the evaluation hold-out pieces (eval.holdout_fraction, eval.seed) out of "
        "pretraining too, so the benchmark measures the SSL encoder on audio it never saw.",
    )
    audio_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of the eligible performances pretraining uses (learning curves, "
        "benchmarks.model_scale): a performance (all its chains) is kept when its seeded hash "
        "(pretrain.seed) is below the fraction, so smaller fractions keep nested subsets; the "
        "manifest records the seconds of audio actually used (counts.pretrain_audio_s). 1: all.",
    )
    chain_augment_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Chance that a pretraining segment reaches the encoder recorded through a "
        "training-side chain (mess_ray.render.chains.record_segment, as finetune.augment.chain_prob) "
        "while its masked-prediction targets come from the clean segment: codes that survive the room, "
        "microphone and codec. 0: off.",
    )
    chain_pool: int = Field(
        8,
        ge=1,
        le=256,
        description="Chains the pretraining augmentation draws from (cached rooms).",
    )

    @field_validator("targets")
    @classmethod
    def _distinct_targets(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"targets must be distinct, got {value}")
        return value


class AugmentConfig(_Section):
    """Expression-preserving augmentations for fine-tuning (EQ tilt, noise, reverb; never a
    time-stretch): extra positive views of each row."""

    views: int = Field(
        0,
        ge=0,
        le=2,
        description="Augmented views of each row added as positives "
        "(EQ tilt, noise, reverb; never time-stretch).",
    )
    eq_tilt_db: float = Field(2.0, ge=0, description="Max EQ tilt, dB per octave around 1 kHz.")
    noise_snr_db: float = Field(30.0, ge=0, description="Lowest SNR of added noise (0: no noise).")
    reverb_prob: float = Field(
        0.5, ge=0, le=1, description="Chance that a view gets a reverb tail."
    )
    reverb_max_s: float = Field(0.4, ge=0, description="Longest synthetic reverb RT60.")
    chain_prob: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Chance that an augmented view is recorded through a training-side recording "
        "chain instead (mess_ray.render.chains.record_segment: the renderer's simulated room, "
        "microphone EQ, level as a fixed gain, noise, MP3 codec; the SoundFont stays). 0: off.",
    )
    chain_pool: int = Field(
        8,
        ge=1,
        le=256,
        description="Chains the augmentation draws from (train-1000 ... train-<999 + chain_pool>); "
        "each worker simulates each room once and caches its impulse response, so a view costs a "
        "convolution, three filters and an MP3 round trip.",
    )


# finetune.augment_<x> before the settings were nested: finetune.augment.<x>
_REMOVED_FINETUNE_KEYS = {
    "augment_views": "views",
    "augment_eq_tilt_db": "eq_tilt_db",
    "augment_noise_snr_db": "noise_snr_db",
    "augment_reverb_prob": "reverb_prob",
    "augment_reverb_max_s": "reverb_max_s",
}


class FinetuneConfig(TrainConfig):
    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in _REMOVED_FINETUNE_KEYS.items():
                if old in data:
                    raise ValueError(
                        f"finetune.{old} was removed: the augmentation settings are one block, "
                        f"set finetune.augment.{new} instead"
                    )
        return data

    steps: int = Field(150, ge=1)
    lr: float = Field(3e-4, gt=0)
    loss: Literal["infonce", "triplet"] = "infonce"
    temperature: float = Field(0.1, gt=0)
    learn_temperature: bool = False
    margin: float = Field(0.2, gt=0)
    freeze_encoder: bool = False
    freeze_layers: int = Field(0, ge=0)
    init_from: Literal["auto", "pretrain", "pretrained", "random"] = Field(
        "auto",
        description="Encoder start: auto = model.pretrained when set (or the latest pretrain "
        "artifact if it was pretrained from it), else the latest pretrain artifact, else "
        "random; pretrain/pretrained/random force one.",
    )
    hard_negative_weight: float = Field(
        2.0,
        gt=0,
        description="infonce: same-piece-other-style negatives count this many times in the denominator.",
    )
    contrastive_target: Literal["full", "overall"] = Field(
        "full",
        description="With facet heads: the contrastive loss acts on the whole faceted vector, or only on "
        "its overall part.",
    )
    facet_weight: float = Field(
        1.0, ge=0, description="Weight of the facet-descriptor loss (model.facet_dim > 0)."
    )
    facet_temperature: float = Field(
        0.1, gt=0, description="Temperature of facet cosines in the facet loss."
    )
    facet_target_temperature: float = Field(
        0.5,
        gt=0,
        description="Sharpness of the descriptor-neighbour targets (times the batch's median distance).",
    )
    descriptor_sample: int = Field(
        256,
        ge=8,
        description="Training segments whose descriptors fix the z-scoring of facet targets.",
    )
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="Augmented views added as positives; these are the augmentation settings "
        "themselves (mess_ray.train.augment.augment_batch reads them).",
    )
    cross_chain_views: bool = Field(
        False,
        description="Positives across recording chains: every training segment is paired with the same "
        "performance at the same time (same performance id and start sample) rendered through another "
        "chain (render.chains / render.train_piece_chains), added as a positive view that shares its "
        "label; the training data is then read one performance per block (mess_ray.train.pairs). "
        "Segments whose moment no other chain holds get no partner.",
    )
    mine_clusters: int = Field(
        0,
        ge=0,
        description="Pair source for segments without a style (human "
        "performances): k-means clusters of their descriptors become labels, positive "
        "across different pieces only. 0: such segments are skipped.",
    )
    mine_max_segments: int = Field(
        4000,
        ge=2,
        description="Unlabelled training segments described for mining (a seeded sample).",
    )
    midi_weight: float = Field(
        4.0,
        ge=0,
        description="Pair source (b) with performed MIDI: weight of a soft-neighbour loss that makes "
        "the embedding rank other pieces' passages as their expressive MIDI descriptors do (tempo against the "
        "score, rubato, timing, velocity, articulation, pedal). Used when training segments have MIDI (see "
        "midi_targets_for); 0: off.",
    )
    midi_targets_for: Literal["unstyled", "all"] = Field(
        "unstyled",
        description="Which training segments with MIDI get MIDI targets: 'unstyled' (human "
        "performances; renderings with a style already have exact labels, and MIDI targets on them cost "
        "style retrieval without helping agreement, README Fine-tuning) or 'all'.",
    )
    midi_target_temperature: float = Field(
        0.5,
        gt=0,
        description="Sharpness of the MIDI-descriptor neighbour targets (times the batch's median "
        "distance).",
    )
    performer_weight: float = Field(
        0.0,
        ge=0,
        description="Performer positives (issue 20): weight of an InfoNCE term whose positives are "
        "the same pianist in another training piece (mess_ray.train.losses.performer_infonce; "
        "pianists from the catalog's performer tags, only those who play two or more training "
        "pieces), against the batch and a memory of recent batches (finetune.performer_memory). "
        "The evaluation's learned descriptor head gets the same term. 0: off.",
    )
    timeline_weight: float = Field(
        1.0,
        ge=0,
        description="With model.timeline_bins > 0: weight of an InfoNCE term on the timeline part "
        "alone whose positives are a segment's own views (its cross-chain partner: the same "
        "performance at the same time through another chain, and its augmented views) and whose "
        "negatives are every other segment of the batch. The other losses then act on the "
        "embedding without its timeline.",
    )
    performer_memory: int = Field(
        1024,
        ge=0,
        description="Rows of recent batches (detached vectors, pianist and piece) the performer "
        "term also ranks against: a batch of a few segments seldom holds one pianist in two "
        "pieces. 0: the batch only.",
    )


class IndexConfig(_Section):
    type: Literal["auto", "flat", "ivf", "hnsw"] = "auto"
    batch_size: int = Field(16, ge=1)
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(
        0.0,
        ge=0,
        description="GPU share per embedding actor (Ray Data num_gpus); "
        "0: CPU actors. With a GPU the embedder runs the model on CUDA.",
    )
    shards: int = Field(2, ge=1)
    ivf_above: int = Field(
        50_000,
        ge=1,
        description="auto: IVF instead of exact search from this many vectors "
        "(benchmarks/index_search.py: exact p99 passes 5 ms on 2 cores near 1e5).",
    )
    ivfpq_above: int = Field(
        1_000_000, ge=1, description="ivf: IVF-PQ with exact re-ranking from this many vectors."
    )
    memory_budget_mb: float = Field(
        8192,
        gt=0,
        description="ivf: IVF-PQ codes instead of full vectors when an "
        "IVF-Flat index would exceed this many MiB.",
    )
    nprobe: int = Field(
        16,
        ge=1,
        description="IVF lists probed per query (recall@10 >= 0.99 at 1e5 and 1e6 "
        "clustered vectors in benchmarks/index_search.py; 4 is too few at 1e5). Recorded in the "
        "index at build time and applied again whenever the search service loads an index (capped "
        "at its nlist), so --set index.nprobe=... on mess-ray serve takes effect without a rebuild.",
    )
    hnsw_m: int = Field(32, ge=4)
    ef_search: int = Field(
        64,
        ge=1,
        description="HNSW search beam. Recorded in the index at build time and applied again "
        "whenever the search service loads an index, so --set index.ef_search=... on mess-ray "
        "serve takes effect without a rebuild.",
    )
    hnsw_ef_construction: int = Field(
        40,
        ge=8,
        description="HNSW build beam. Measured at 1e5 x 128 (2 cores): 40 gives recall@10 0.94 at "
        "ef_search 64, 128 gives 0.996 but builds 5.5x slower.",
    )
    ondisk: Literal["auto", "always", "never"] = Field(
        "auto",
        description="IVF: merge shards on disk into a memory-mapped index.ivfdata (auto: when the "
        "inverted lists would exceed memory_budget_mb; always: every IVF index).",
    )
    use_gpu: Literal["auto"] | bool = Field(
        "auto",
        description="FAISS on GPU for IVF training (k-means) and IVF-Flat shard building (auto: when "
        "FAISS sees a GPU; true: fail clearly without one). Needs the faiss-gpu build: pip install -e .[gpu].",
    )
    actor_max_restarts: int = Field(
        16,
        ge=-1,
        description="Embedding actors: how often Ray restarts a dead actor (-1: always). A killed "
        "actor loses no segments: its batches are retried. Bounded so a batch that kills every "
        "actor it lands on fails the job instead of looping; a lost node costs each of its "
        "actors one restart.",
    )
    actor_task_retries: int = Field(
        -1,
        ge=-1,
        description="Embedding actors: retries of a batch whose actor died or is unreachable "
        "(-1: until the actor is confirmed dead). Ray counts every failed RPC to an actor on a "
        "lost node as a retry until the node is declared dead (ray-project/ray#25457, #44719), "
        "so a small bound is used up by one node loss; actor_max_restarts is the bound on crashes.",
    )


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_upload_mb: float = Field(20.0, gt=0)
    max_query_s: float = Field(30.0, gt=0)
    default_k: int = Field(10, ge=1, le=1000)
    num_replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(0.5, gt=0)
    gpus_per_replica: float = Field(
        0.0,
        ge=0,
        description="GPU share reserved per replica (ray_actor_options num_gpus); 0: CPU replicas.",
    )
    index_version: str | None = Field(None, description="Index version to serve; None: the latest.")
    reload_interval_s: float = Field(
        30.0,
        ge=0,
        description="Replicas poll the index LATEST pointer this often and swap to a new version; "
        "0 disables (a pinned index_version never reloads).",
    )
    batch_max_size: int = Field(
        8, ge=1, description="Uploads embedded together in one model call (@serve.batch)."
    )
    batch_wait_s: float = Field(0.01, ge=0, description="How long a batch waits for more uploads.")
    descriptor_cache_size: int = Field(
        4096, ge=1, description="Hit passages whose descriptors are kept (LRU)."
    )
    mmr_pool: int = Field(
        50, ge=1, le=10000, description="Candidates re-ranked when diversity (MMR) is asked for."
    )
    min_upload_rate_hz: int = Field(
        4000, ge=1, description="Uploads declaring a lower sample rate are refused (415)."
    )
    max_upload_rate_hz: int = Field(
        384000, ge=1, description="Uploads declaring a higher sample rate are refused (415)."
    )
    max_upload_channels: int = Field(
        8, ge=1, le=1024, description="Uploads declaring more channels are refused (415)."
    )
    max_decode_samples: int = Field(
        8_000_000,
        ge=1000,
        description="Work budget of one upload: at most this many source samples (frames x "
        "channels) are decoded, whatever the file declares; decoding also stops at max_query_s. "
        "8 M float32 samples bound a request's decoded audio to about 32 MiB.",
    )
    max_concurrent_decodes: int = Field(
        2,
        ge=1,
        description="Decodes (uploads, /audio passages, waveforms, hit passages) running at once "
        "per replica; further requests wait for a slot.",
    )
    api_key: str | None = Field(
        None,
        description="When set (or MESS_RAY_API_KEY in the environment), every endpoint but "
        "/healthz and the page itself requires it as X-API-Key or Authorization: Bearer.",
    )
    source_prefixes: list[str] = Field(
        default_factory=list,
        description="Folders or URL prefixes (besides storage.root) that indexed source_uris may "
        "point into; a source anywhere else (another folder, http://...) is never read.",
    )

    @field_validator("source_prefixes")
    @classmethod
    def _pin_prefixes(cls, value: list[str]) -> list[str]:
        return [pin_local_path(v) for v in value]


# Settings of evaluation's former own actor pool; evaluation now embeds on the index stage's.
_REMOVED_EVAL_KEYS = ("min_actors", "max_actors", "cpus_per_actor")


class ContentConfig(_Section):
    """The content view (mess_ray/content.py): chroma features precomputed by the index job,
    subsequence alignment of a passage in every other performance, expression curves."""

    features: bool = Field(
        True,
        description="Compute content features (chroma, onset strength, level) for every track in the "
        "index job and reindex; GET /passages needs them.",
    )
    feature_rate: float = Field(
        20.0, gt=1, le=100, description="Feature frames per second (rounded to a CQT hop)."
    )
    cpus_per_task: float = Field(
        0.5, gt=0, description="Ray CPUs per feature-extraction task in the index job."
    )
    min_query_s: float = Field(2.0, gt=0, description="Shortest passage a query may span.")
    max_query_s: float = Field(60.0, gt=0, description="Longest passage a query may span.")
    max_candidates: int = Field(
        50, ge=1, description="Most other performances aligned per query (the work's tracks first)."
    )
    max_cost: float = Field(
        0.35,
        gt=0,
        le=2,
        description="Alignments with a higher mean cosine distance of centred chroma per step are "
        "not a match (0: identical, ~1: unrelated music).",
    )
    dtw_step_weight: float = Field(
        2.0,
        ge=1,
        le=100,
        description="Alignment: cost multiplier of the subsequence DTW's tempo-change steps (1:2 and "
        "2:1) relative to a 1:1 step; higher keeps the path nearer a constant tempo. Alignment "
        "costs (and so max_cost) are on this weighting's scale.",
    )
    coarse_factor: int = Field(
        4,
        ge=1,
        le=16,
        description="Alignment: candidates longer than 30 s (and 4x the query) are first aligned at "
        "1/coarse_factor of the frame rate, then at full rate around that span (1: full rate "
        "everywhere, slower).",
    )
    curve_points: int = Field(64, ge=8, le=1000, description="Samples per returned curve.")
    smooth_s: float = Field(
        1.0, gt=0, description="Smoothing of the tempo and onset curves (seconds of the query)."
    )
    tempo_weight: float = Field(
        1.0, ge=0, description="Weight of the tempo-shape distance in the 'plays it alike' ranking."
    )
    loudness_weight: float = Field(
        1.0, ge=0, description="Weight of the loudness-shape distance in the ranking."
    )
    identify_top: int = Field(
        5,
        ge=1,
        description="For a query whose piece is unknown: the best tracks by chroma-shingle votes; "
        "they and every performance of their works are aligned.",
    )

    def align_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`mess_ray.content.align_passage` from this section."""
        return {"step_weight": self.dtw_step_weight, "coarse_factor": self.coarse_factor}


class EvalConfig(_Section):
    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in _REMOVED_EVAL_KEYS:
                if key in data:
                    raise ValueError(
                        f"eval.{key} was removed: evaluation embeds on the index stage's actor "
                        f"pool, so set index.{key} instead"
                    )
        return data

    holdout_fraction: float = Field(0.34, gt=0, lt=1)
    seed: int = 0
    batch_size: int = Field(16, ge=1, description="Segments per embedding batch.")
    ray_data_min_segments: int = Field(
        256,
        ge=0,
        description="Embed from this many held-out segments on the index stage's Ray Data actor "
        "pool (sized by index.min_actors / index.max_actors / index.cpus_per_actor / "
        "index.gpus_per_actor / index.batch_size); fewer: driver-side, eval.batch_size at a time.",
    )
    recall_ks: list[int] = Field(
        default_factory=lambda: [1, 10], description="k values of recall@k."
    )
    ndcg_k: int = Field(10, ge=1)
    triplet_margin: float = Field(0.2, ge=0)
    max_plot_points: int = Field(
        2000, ge=10, description="Embeddings drawn in the PCA map (subsampled, seeded)."
    )
    protocol: bool = Field(
        True,
        description="Also write the protocol table (mess_ray.eval.protocol: performer identity, chain "
        "invariance, passages, agreement x systems x baselines x chains, CIs over pieces).",
    )
    validation_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Share of the held-out pieces that are validation (rest: test).",
    )
    test_pianist_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of pianists on the test side of the seeded pianist split "
        "(mess_ray.splits.pianist_holdout, eval.seed): pretraining and fine-tuning (and the "
        "evaluation's learned descriptor head) leave out every performance by those pianists, in "
        "every piece and chain, and record the pianists they heard in their manifests; the protocol's "
        "performer_identity_unseen rows read them there. 0: every pianist may be heard.",
    )
    dtw_max_queries: int | None = Field(
        None,
        ge=1,
        description="Queries per view the CENS subsequence-DTW passage baseline scores (a seeded "
        "sample; its rows cover those, the table's footnote says so); None: every query.",
    )
    bootstrap_samples: int = Field(1000, ge=100, description="Draws of the bootstrap over pieces.")
    max_queries_per_chain: int | None = Field(
        400, ge=1, description="Queries per split and chain (seeded sample); None: every segment."
    )
    head_steps: int = Field(300, ge=1, description="Training steps of the learned descriptor head.")
    head_max_segments: int = Field(
        1500,
        ge=16,
        description="Training-piece segments the descriptor head trains on (seeded sample).",
    )


class WorkRelativeConfig(_Section):
    """Expression relative to the work (mess_ray.work_relative; issue 20, item 5)."""

    enabled: bool = Field(
        True,
        description="The index job fits per-work norms of the embeddings (works with "
        "min_performances or more performances) and stores them in the index artifact; "
        "work-relative search uses them. The protocol scores the '+work-rel' systems.",
    )
    mode: Literal["center", "standardise"] = Field(
        "standardise",
        description="center: subtract the work's mean vector (scale by the corpus spread); "
        "standardise: also divide by the work's own spread per dimension.",
    )
    min_performances: int = Field(
        2, ge=2, description="Performances a work needs in the corpus to have a norm."
    )
    aligned: bool = Field(
        False,
        description="Protocol: norm each passage by the passages of the other performances "
        "that cover the same score beats (else by the whole work).",
    )
    by_chain: bool = Field(
        False,
        description="Protocol: one norm per (work, recording chain) instead of per work.",
    )


class MessRayConfig(_Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    audio: AudioConfig = Field(default_factory=AudioConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    content: ContentConfig = Field(default_factory=ContentConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    work_relative: WorkRelativeConfig = Field(default_factory=WorkRelativeConfig)

    def digest(self) -> str:
        """Short stable hash of the config, recorded in artifact manifests."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


MAX_CONFIG_BYTES = 2**20


class StrictLoader(yaml.SafeLoader):
    """YAML safe loader for config files: no aliases (so no billion-laughs expansion; config
    files never need them) and no duplicate keys (the second would silently win)."""

    def compose_node(self, parent, index):  # noqa: ANN001
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in a config", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # noqa: ANN001
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str = "config") -> Any:
    """Parse YAML config text with :class:`StrictLoader`; errors name ``source``."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(f"{source}: a config must be under {MAX_CONFIG_BYTES // 1024} KiB")
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: {err}") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> MessRayConfig:
    """Read a YAML config (or the defaults) and apply ``key.sub=value`` overrides.

    Override values are parsed as YAML, so ``train.steps=5`` gives an int and
    ``storage.root=s3://b/p`` a string.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = load_yaml(text, str(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a mapping of sections")
        tree = loaded
    apply_overrides(tree, overrides or [])
    return MessRayConfig.model_validate(tree)


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``section.key=value`` of ``overrides`` (values parsed as YAML) in ``tree``."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), load_yaml(raw, f"override {key.strip()}"))
    return tree


def dump_config(cfg: MessRayConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
