"""One typed config for a run: model, diffusion, data, optimiser and run settings.

A run is a :class:`TrainConfig`. It comes from presets, a YAML/JSON file and dotted CLI
overrides (``--optim.lr=3e-4``), each checked against the dataclass field types; unknown keys and
wrong types fail with a message that names the key and what is allowed. Everything else (the
DeepSpeed JSON, the model, the diffusion) is derived from it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# --------------------------------------------------------------------------- model presets
# The paper's sizes (all patch 2, 256px images -> 32x32x4 SD-VAE latents, 1000 classes), with the
# decoder depths of the release scripts / paper (6/6/4/4), plus small presets that run on a CPU.
_IMAGENET = dict(input_size=32, patch_size=2, in_channels=4, num_classes=1000)
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "MDTv2-S/2": dict(_IMAGENET, depth=12, hidden_size=384, num_heads=6, decode_layer=6),
    "MDTv2-B/2": dict(_IMAGENET, depth=12, hidden_size=768, num_heads=12, decode_layer=6),
    "MDTv2-L/2": dict(_IMAGENET, depth=24, hidden_size=1024, num_heads=16, decode_layer=4),
    "MDTv2-XL/2": dict(_IMAGENET, depth=28, hidden_size=1152, num_heads=16, decode_layer=4),
    # Tests: 8x8x4 latents (16 tokens), 10 classes; 0.43M parameters.
    "MDTv2-Tiny/2": dict(
        input_size=8, patch_size=2, in_channels=4, num_classes=10, depth=4, hidden_size=64,
        num_heads=4, decode_layer=2,
    ),
    # The CPU demo (README "The demo"; mdt_ds/demo.py): 16x16 MNIST pixels, 64 tokens, 10 classes.
    "MDTv2-Demo/2": dict(
        input_size=16, patch_size=2, in_channels=1, num_classes=10, depth=6, hidden_size=128,
        num_heads=4, decode_layer=2,
    ),
}


class ConfigError(ValueError):
    """A config value, key or file is wrong; the message names it and says what is allowed."""


AUTO = "auto"  # a model field taken from the data (mdt_ds.data.compat)


@dataclass
class ModelConfig:
    """MDTv2 constructor arguments (the release's keyword names) plus the preset they came from."""

    preset: str = "MDTv2-S/2"
    # input_size, in_channels, num_classes: "auto" takes them from the data's manifest (mdt-train),
    # the default, so that a bare `mdt-train` fits its default data; a preset sets the paper's values.
    input_size: int | Literal["auto"] = AUTO
    patch_size: int = 2
    in_channels: int | Literal["auto"] = AUTO
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int | Literal["auto"] = AUTO
    learn_sigma: bool = True
    mask_ratio: float | None = 0.3
    decode_layer: int = 6
    # How attention with the relative position bias is computed (same maths, same state_dict):
    # "sdpa" (scaled_dot_product_attention with the bias as an additive mask), "flex"
    # (FlexAttention with a score_mod that reads the bias; GPUs, compiled) or "explicit"
    # (softmax(q k^T / sqrt(d) + B) v written out, as the release computes it).
    attention: Literal["sdpa", "flex", "explicit"] = "sdpa"

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        return cls(preset=name, **{**MODEL_PRESETS[name], **overrides})

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``MDTv2(...)``."""
        auto = [k for k in ("input_size", "in_channels", "num_classes") if getattr(self, k) == AUTO]
        if auto:
            raise ConfigError(f"model.{auto[0]}=auto is resolved from the data by mdt-train (mdt_ds.data.compat); "
                              "set a number here")
        kwargs = dataclasses.asdict(self)
        kwargs.pop("preset")
        return kwargs


@dataclass
class DiffusionConfig:
    """Improved-DDPM diffusion as MDTv2 uses it (linear betas, eps prediction, learned range)."""

    num_timesteps: int = 1000
    min_snr_gamma: float = 5.0  # Min-SNR weight min(SNR, gamma) / SNR on the mse term
    # How the training grids (sample_steps steps) and the in-training FID (fid_steps) sample;
    # mdt-sample has its own flags. See mdt_ds.sampling.SampleOptions.
    sampler: Literal["ddpm", "ddim", "dpm++2m", "heun"] = "ddim"
    sample_steps: int = 25
    sample_spacing: Literal["auto", "time", "ddim", "logsnr"] = "auto"
    cfg_scale: float = 1.0  # 1.0 = no guidance
    cfg_pow: float = 4.0
    guide_channels: Literal["release", "all"] = "release"
    cfg_interval: list[int] = field(default_factory=list)  # [LO, HI]: guide only at timesteps LO..HI; []: all

    def __post_init__(self) -> None:
        if self.sample_steps < 1:
            raise ConfigError(f"diffusion.sample_steps must be at least 1, got {self.sample_steps}")
        interval = self.cfg_interval
        if interval and (len(interval) != 2 or not 0 <= interval[0] <= interval[1] < self.num_timesteps):
            raise ConfigError(f"diffusion.cfg_interval must be [LO, HI] with 0 <= LO <= HI < "
                              f"{self.num_timesteps}, or [] for every step; got {interval}")


@dataclass
class DataConfig:
    """Where training samples come from: a shard directory with a manifest.json, or "mnist16" /
    "mnist32" for the embedded MNIST digits."""

    source: str = "mnist16"
    num_workers: int = 1
    shuffle_buffer: int = 1000
    resampled: bool = True
    skip_corrupt: bool = False
    # Train a model with more label rows than the data has classes (e.g. a 1000-class checkpoint
    # fine-tuned on a subset): the extra rows stay untrained, and sampling draws only the data's
    # classes. Off, such a num_classes is a config error.
    untrained_classes: bool = False
    # The VAE that decodes the data's latents (grids, in-training FID): "" is the one the data's
    # manifest names (mdt-extract-latents --codec); set a folder (or hub id) when that VAE folder
    # moved, as when data is copied to a cluster. mdt_ds.grids.check_decoder checks it at the start.
    vae: str = ""


@dataclass
class OptimConfig:
    """Optimiser. Adan defaults are the official ones (betas .98/.92/.99, eps 1e-8)."""

    name: Literal["adan", "adamw"] = "adan"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.98, 0.92, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_prox: bool = False
    grad_clip: float = 1.0
    warmup_steps: int = 0
    # Adan's update as one fused torch.compile kernel per flat ZeRO partition (one pass over
    # memory instead of ~31 tensor passes); "auto": when the run compiles (compile=true).
    fused: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        # Caught here, naming the key, rather than by the optimizer's own check at build time.
        for name in ("lr", "weight_decay", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must each be in [0, 1), got {self.betas}")
        if self.fused is True and self.name != "adan":
            raise ConfigError("optim.fused=true fuses Adan's update; AdamW is fused on CUDA by itself (use 'auto')")


@dataclass
class CommConfig:
    """How the ranks talk: the collective timeout and DeepSpeed's gradient buckets (derived into
    the DeepSpeed JSON). Bucket sizes are in elements. Smaller buckets start the first gradient
    reduction earlier in the backward (DeepSpeed's default, 5e8 elements, is most of an XL/2
    model: its reduction would begin after about two thirds of the backward); see the README's
    multi-node settings."""

    # Minutes a collective may wait before the process group aborts. Every rank-0-only phase
    # (a checkpoint's publish, an EMA snapshot, a grid) must fit in it: DeepSpeed's default is 10.
    timeout_min: float = 60.0  # mdt_ds.dist.DEFAULT_TIMEOUT_MIN
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    # Reduce the gradient buckets on a side stream while the backward goes on (ZeRO-1/2;
    # DeepSpeed turns it on only for ZeRO-3 by default).
    overlap_comm: bool = True
    # DeepSpeed's default (true) all-reduces every bucket to all ranks; false reduces each range
    # to the rank that owns it, which is what ZeRO-1/2 need (less traffic per rank).
    multi_rank_bucket_allreduce: bool = False

    def __post_init__(self) -> None:
        if not self.timeout_min > 0:
            raise ConfigError(f"comm.timeout_min must be > 0, got {self.timeout_min}")
        for name in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"comm.{name} must be >= 1 element, got {getattr(self, name)}")


# Training precisions: "fp32"; "bf16-amp": fp32 parameters (and residual stream, norms,
# modulation, embeddings) with the matmuls under torch.autocast (DeepSpeed's torch_autocast);
# "bf16": DeepSpeed's bf16 mode, every parameter and activation in bf16 (fp32 master in the
# optimizer); "fp16": as "bf16" in fp16, with dynamic loss scaling.
PRECISIONS = ("bf16", "bf16-amp", "fp16", "fp32")


@dataclass
class TrainConfig:
    """One training run. ``global_batch = micro_batch x grad_accum x world_size``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    run_dir: str = "runs/default"
    steps: int = 400_000
    global_batch: int = 256
    micro_batch: int = 0  # 0: global_batch / world_size (no accumulation)
    precision: Literal["bf16", "bf16-amp", "fp16", "fp32"] = "bf16"  # see PRECISIONS
    zero_stage: Literal[0, 1, 2, 3] = 2
    # Extra DeepSpeed systems knobs (communication, buckets, loss scaling), merged into the
    # derived JSON; fields derived from this config (batch, precision, stage, clipping) may not
    # be set here. ds_configs/*.yaml fill it.
    deepspeed: dict[str, Any] = field(default_factory=dict)
    # "none", "encoder", "all", a block count N (the first N blocks in the masked pass's
    # execution order, see MDTv2.blocks()) or block indices "0,3,5" into that order.
    activation_checkpointing: str | int = "none"
    compile: bool = False  # torch.compile each transformer block (regional), dynamic in the kept length
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + step) / (10 + step)) for short runs
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 5000
    keep_ckpts: int = 3  # newest full checkpoints kept (resume state); 0: keep all
    # The world-size-independent form of the training state (what resuming on another number of
    # GPUs or ZeRO stage reads) goes into every universal_every-th checkpoint and into the
    # checkpoints of a stop (preemption, time budget) and of the end; 1: every checkpoint.
    universal_every: int = 4
    # EMA snapshots (small, for sampling): every snapshot_every steps (0: with every checkpoint)
    # and at the end of the run; the newest keep_snapshots are kept (0: all); one format by default.
    snapshot_every: int = 0
    keep_snapshots: int = 10
    snapshot_format: Literal["pt", "safetensors", "both"] = "pt"
    sample_every: int = 0  # 0: no sample grids during training
    max_bad_steps: int = 0  # bad (NaN/inf or exploding) steps skipped before the run stops; 0: stop at the first
    # With max_bad_steps > 0 a step whose loss is more than explode_factor times the median of the
    # last 50 good steps counts as bad too (a diverging run can stay finite while it wrecks the
    # weights); 0: only NaN/inf. See mdt_ds.guards.
    explode_factor: float = 100.0
    # In-training FID of the EMA model (off by default): every fid_every steps, fid_images
    # samples (diffusion.sampler, fid_steps steps, diffusion.cfg_scale) against the reference batch fid_ref (.npz).
    fid_every: int = 0
    fid_ref: str = ""
    fid_images: int = 2000
    fid_steps: int = 50
    fid_inception: str = ""  # weights spec; empty: the first found (see README "Inception weights")
    time_budget_min: float = 0.0  # stop (checkpointed, not preempted) after this many minutes; 0: none
    init_from: str = ""  # start a NEW run from these model weights (a .pt/.safetensors state_dict)
    force_resume: bool = False  # resume even if run_dir/config.json holds another config
    peak_tflops: float = 0.0  # device peak for MFU; 0: the device's dense peak from a table, else measured
    # dtype of the data-parallel gradient reduction: "auto" keeps DeepSpeed's default (the
    # training precision, bf16 under bf16); the release reduces fp32 gradients ("fp32").
    grad_reduce_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    stop_check_every: int = 10  # steps between the collective that agrees on a stop (signal, budget)
    # Training on a CPU: "keep" has glibc reuse freed host memory (no mmap, no trim), so the step's
    # fresh ZeRO and activation buffers stop page-faulting every step; "default" leaves malloc alone.
    cpu_malloc: Literal["keep", "default"] = "keep"

    def __post_init__(self) -> None:
        checkpointing_scope(self.activation_checkpointing)
        if self.stop_check_every < 1:
            raise ConfigError(f"stop_check_every must be >= 1, got {self.stop_check_every}")
        if self.compile and self.zero_stage == 3:
            # DeepSpeed's ZeRO-3 gathers parameters in module hooks that dynamo traces, hits its
            # recompile limit in and runs eagerly behind: untested, and slower than ZeRO-2.
            raise ConfigError("compile=true with zero_stage=3 is not supported (untested: DeepSpeed's ZeRO-3 "
                              "parameter hooks defeat the compiled blocks); use zero_stage=1 or 2 with compile, "
                              "or compile=false")
        for name in ("keep_ckpts", "keep_snapshots", "snapshot_every", "ckpt_every", "universal_every",
                     "explode_factor", "max_bad_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


CHECKPOINTING_HELP = (
    "'none', 'encoder', 'all', a block count N (the first N blocks in execution order) or block indices like '0,3,5'"
)


def checkpointing_scope(value: str | int) -> str | list[int]:
    """Parse ``activation_checkpointing``: a scope name, or the list of block indices (a count N
    is ``list(range(N))``). Indices are checked against the model later, when it is built."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"activation_checkpointing: a block count must be >= 0, got {value}")
        return list(range(value))
    text = str(value).strip()
    if text in ("none", "encoder", "all"):
        return text
    if text.isdigit():
        return list(range(int(text)))
    parts = [p.strip() for p in text.strip("[]").split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts):
        return sorted({int(p) for p in parts})
    raise ConfigError(f"activation_checkpointing: {value!r} is not allowed; use {CHECKPOINTING_HELP}")


# --------------------------------------------------------------------------- (de)serialisation
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert: int -> float, "3e-4" -> float on the CLI) one value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        for option in options:  # the first option that takes the value wins
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        allowed = " or ".join(_type_name(option) for option in options)
        raise ConfigError(f"{key}: expected {allowed}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        allowed = typing.get_args(tp)
        # type check too: True == 1 and 2.0 == 2 in Python, but neither is a ZeRO stage
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, str) and value.isdigit():
        # config.json files of earlier versions hold diffusion.sample_steps as a string ("250")
        return int(value)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _did_you_mean(key: str) -> str:
    """``lr`` -> "optim.lr": the one place in the config tree where an unknown key's last part is
    a field (a section's leaf, or a top-level field given under a section); "" when there is no
    such place or more than one, and the caller lists the allowed keys instead."""
    leaf = key.rsplit(".", 1)[-1]
    top = {f.name: f for f in dataclasses.fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    places = [f"{name}.{leaf}" for name in top if dataclasses.is_dataclass(hints[name])
              and leaf in {f.name for f in dataclasses.fields(hints[name])}]
    if "." in key and leaf in top:
        places.append(leaf)
    places = [p for p in places if p != key]
    return places[0] if len(places) == 1 else ""


def _unknown_key(key: str, allowed: list[str]) -> ConfigError:
    near = _did_you_mean(key)
    if near:
        return ConfigError(f"unknown key {key}; did you mean {near}?")
    return ConfigError(f"unknown key {key}; allowed keys: {allowed}")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types.
    A model section with a ``preset`` key starts from that preset."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise _unknown_key(f"{path}.{unknown[0]}" if path else unknown[0], names)
    values = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    if cls is ModelConfig and "preset" in values:
        return ModelConfig.from_preset(values.pop("preset"), **values)
    return cls(**values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _parse_cli_value(text: str) -> Any:
    """CLI values are JSON when they parse as JSON (numbers, true/false, null, lists), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.key=value`` overrides. ``model.preset=...`` is applied first and resets
    the model fields to that preset; later model overrides go on top."""
    data = to_dict(cfg)
    pairs, raw = [], {}
    for item in overrides:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=3e-4)")
        key, text = item.split("=", 1)
        pairs.append((key, _parse_cli_value(text)))
        raw[key] = text
    pairs.sort(key=lambda kv: kv[0] != "model.preset")
    for key, value in pairs:
        if key == "model.preset":
            if not isinstance(value, str):
                raise ConfigError(f"model.preset must be a preset name; choose one of {sorted(MODEL_PRESETS)}")
            data["model"] = to_dict(ModelConfig.from_preset(value))
            continue
        *parents, leaf = key.split(".")
        free_form = bool(parents) and parents[0] == "deepspeed"  # raw DeepSpeed knobs: any key
        node = data
        for i, part in enumerate(parents):
            if free_form and part not in node:
                node[part] = {}
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown key {'.'.join(parents[: i + 1])} in override {key!r}")
            node = node[part]
        if leaf not in node and not free_form:
            raise _unknown_key(key, sorted(node))
        if isinstance(node.get(leaf), str) and not isinstance(value, (str, bool)):
            # a text field keeps the text (sample_steps=250, run_dir=2024, activation_checkpointing=[1,4]);
            # true/false stay booleans for a field that takes either (optim.fused: true, false or "auto")
            value = raw[key]
        node[leaf] = value
    return from_dict(TrainConfig, data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse error is reported with the file name
        raise ConfigError(f"cannot parse config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not (key == "model" and "preset" in value):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(paths: str | Path | list | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults <- YAML/JSON files (later files win, e.g. a run file then a ds_configs/ file)
    <- dotted overrides."""
    if paths is None or isinstance(paths, (str, Path)):
        paths = [paths] if paths else []
    data: dict[str, Any] = {}
    for path in paths:
        data = _merge(data, read_config_file(path))
    return apply_overrides(from_dict(TrainConfig, data), overrides or [])


# --------------------------------------------------------------------------- derived: DeepSpeed
DERIVED_DS_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "steps_per_print", "zero_allow_untested_optimizer",
)


def resolve_batch(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) with ``global = micro x accum x world``, or a clear error."""
    if cfg.global_batch <= 0 or world_size <= 0:
        raise ConfigError(f"global_batch ({cfg.global_batch}) and world size ({world_size}) must be positive")
    if not cfg.micro_batch and cfg.global_batch % world_size:
        below = cfg.global_batch // world_size * world_size
        options = " or ".join(str(n) for n in (below, below + world_size) if n > 0)
        raise ConfigError(f"global_batch={cfg.global_batch} does not split over {world_size} processes: pick a "
                          f"multiple of {world_size} (e.g. global_batch={options})")
    micro = cfg.micro_batch or cfg.global_batch // world_size
    per_step = micro * world_size
    if micro <= 0 or cfg.global_batch % per_step:
        raise ConfigError(
            f"global_batch={cfg.global_batch} is not micro_batch ({micro}) x grad_accum x world_size ({world_size}); "
            f"pick global_batch as a multiple of {per_step} or set micro_batch so that "
            f"micro_batch x world_size divides global_batch"
        )
    return micro, cfg.global_batch // per_step


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The effective DeepSpeed JSON: systems knobs from ``cfg.deepspeed`` plus the fields derived
    from the run config (batch arithmetic, precision, ZeRO stage, clipping, communication) in one
    place."""
    clash = sorted(set(cfg.deepspeed) & set(DERIVED_DS_KEYS))
    if clash:
        raise ConfigError(f"deepspeed.{clash[0]} is derived from the run config; set it there instead ({DERIVED_DS_KEYS})")
    micro, accum = resolve_batch(cfg, world_size)
    ds = {
        **cfg.deepspeed,
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": _zero_section(cfg),
        "steps_per_print": 10**9,  # we log ourselves
        "zero_allow_untested_optimizer": True,  # Adan is a client optimizer
    }
    ds.update(_precision_sections(cfg, accum))
    return ds


# zero_optimization keys derived from cfg.comm (comm.<name> -> DeepSpeed's key)
COMM_ZERO_KEYS = {
    "reduce_bucket_size": "reduce_bucket_size", "allgather_bucket_size": "allgather_bucket_size",
    "overlap_comm": "overlap_comm", "multi_rank_bucket_allreduce": "use_multi_rank_bucket_allreduce",
}


def _zero_section(cfg: TrainConfig) -> dict[str, Any]:
    zero = dict(cfg.deepspeed.get("zero_optimization", {}))
    if "stage" in zero and zero["stage"] != cfg.zero_stage:
        raise ConfigError(f"deepspeed.zero_optimization.stage={zero['stage']} contradicts zero_stage={cfg.zero_stage}")
    zero["stage"] = cfg.zero_stage
    offload = sorted(k for k in ("offload_optimizer", "offload_param") if zero.get(k, {}).get("device", "none") != "none")
    if offload:
        # The EMA shadows sit beside the fp32 master fragments, and their collectives assume
        # them on the accelerator; offloaded fragments live on the host (NCCL refuses them).
        raise ConfigError(f"deepspeed.zero_optimization.{offload[0]} is not supported: the EMA and the universal "
                          "checkpoint keep the fp32 fragments on the GPU. Use activation_checkpointing or a higher "
                          "zero_stage to save memory instead.")
    for ours, theirs in COMM_ZERO_KEYS.items():
        if theirs in zero:
            raise ConfigError(f"deepspeed.zero_optimization.{theirs} is derived from comm.{ours}; set comm.{ours}")
        zero[theirs] = getattr(cfg.comm, ours)
    return zero


def _precision_sections(cfg: TrainConfig, accum: int) -> dict[str, Any]:
    """bf16 / fp16 / torch_autocast sections, the gradient accumulation dtype and the reduction dtype."""
    out: dict[str, Any] = {}
    amp = cfg.precision == "bf16-amp"
    # Precision comes from `precision`; the bf16/fp16 sections may only carry knobs (loss scaling).
    for name in ("bf16", "fp16", "torch_autocast"):
        knobs = dict(cfg.deepspeed.get(name, {}))
        if "enabled" in knobs or (name == "torch_autocast" and knobs):
            raise ConfigError(f"deepspeed.{name} is derived from precision={cfg.precision!r}; remove it")
        if name != "torch_autocast":
            out[name] = {**knobs, "enabled": cfg.precision == name}
    if amp:
        # fp32 parameters; DeepSpeed's engine runs the forward under torch.autocast(bf16). Its
        # "lower precision safe" modules (Linear, Conv) reduce their gradients in bf16 unless
        # grad_reduce_dtype=fp32 names none of them.
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
        if cfg.grad_reduce_dtype == "fp32":
            out["torch_autocast"]["lower_precision_safe_modules"] = []
        elif cfg.grad_reduce_dtype == "fp16":
            raise ConfigError("grad_reduce_dtype='fp16' does not go with precision='bf16-amp'; use 'auto', 'bf16' or 'fp32'")
    if "data_types" in cfg.deepspeed:
        raise ConfigError("deepspeed.data_types is derived: gradients accumulate in fp32 whenever grad_accum > 1")
    if accum > 1 and cfg.precision in ("bf16", "fp16"):
        # DeepSpeed accumulates in the parameter dtype unless told: a bf16 sum over micro-steps.
        if cfg.zero_stage == 0:
            raise ConfigError(f"precision={cfg.precision!r} with zero_stage=0 would accumulate gradients over "
                              f"{accum} micro-steps in {cfg.precision} (DeepSpeed has no fp32 accumulation there); "
                              "use zero_stage>=1, precision='bf16-amp', or grad_accum 1")
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    # DeepSpeed 0.19.8 reads "communication_data_type" (runtime/config.py) and casts every
    # gradient bucket to it before the all-reduce / reduce-scatter (ZeRO-0 engine path and the
    # ZeRO-1/2/3 optimizers). Unset, it reduces in the training precision: bf16 under bf16.
    if cfg.grad_reduce_dtype != "auto" and not amp:
        user = cfg.deepspeed.get("communication_data_type")
        if user is not None and user != cfg.grad_reduce_dtype:
            raise ConfigError(
                f"deepspeed.communication_data_type={user!r} contradicts grad_reduce_dtype="
                f"{cfg.grad_reduce_dtype!r}; set only grad_reduce_dtype"
            )
        out["communication_data_type"] = cfg.grad_reduce_dtype
    return out


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
