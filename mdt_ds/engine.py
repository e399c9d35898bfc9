"""The one place that calls ``deepspeed.initialize``: model + optimiser + schedule + derived
DeepSpeed JSON -> engine."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from mdt_ds.config import ConfigError, TrainConfig, checkpointing_scope, deepspeed_config
from mdt_ds.hostmem import keep_freed_memory
from mdt_ds.models import MDTv2, build_model
from mdt_ds.models.checkpointing import apply_activation_checkpointing
from mdt_ds.models.compile import compile_blocks
from mdt_ds.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

# The dtype of the module's parameters and inputs, and the dtype its matmuls run in (the MFU peak).
PRECISION_DTYPES = {"bf16": torch.bfloat16, "bf16-amp": torch.float32, "fp16": torch.float16, "fp32": torch.float32}
COMPUTE_DTYPES = {**PRECISION_DTYPES, "bf16-amp": torch.bfloat16}

# What training is tested with: compile=true reads torch._dynamo.config.recompile_limit and the
# fused Adan relies on torch.compile's float arguments (both 2.6); the EMA and the universal form
# read DeepSpeed internals (ZeRO fragment mappings, optimizer wrappers) as of 0.19.
TORCH_FLOOR = (2, 6)
DEEPSPEED_RANGE = ((0, 19), (0, 20))


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_versions(torch_version: str | None = None, deepspeed_version: str | None = None) -> None:
    """Refuse, in one line, a torch or DeepSpeed that training was not tested with."""
    torch_version = torch_version or torch.__version__
    deepspeed_version = deepspeed_version or deepspeed.__version__
    if _major_minor(torch_version) < TORCH_FLOOR:
        raise ConfigError(f"torch {torch_version} is too old: mdt-ds trains with torch >= "
                          f"{'.'.join(map(str, TORCH_FLOOR))} (install your CUDA's build of a newer torch)")
    low, high = DEEPSPEED_RANGE
    if not low <= _major_minor(deepspeed_version) < high:
        raise ConfigError(f"deepspeed {deepspeed_version} is untested: mdt-ds reads DeepSpeed internals tested on "
                          f"0.{low[1]}.x; pip install 'deepspeed>={low[0]}.{low[1]},<{high[0]}.{high[1]}'")


def accelerator_device() -> torch.device:
    """The device DeepSpeed will place the engine on (``cuda:LOCAL_RANK``, or ``cpu``)."""
    return torch.device(get_accelerator().current_device_name())


def prepare_model(
    cfg: TrainConfig, device: torch.device | None = None, init_state: dict[str, torch.Tensor] | None = None
) -> MDTv2:
    """Build the model (seeded from ``cfg.seed`` so every rank starts from the same weights) or
    load ``init_state`` into it, apply activation checkpointing, then regional ``torch.compile``
    (compiled blocks trace the checkpointed forward), all on ``device`` (default: the accelerator's)
    before the optimiser is built, so that the optimiser sees device parameters (fused AdamW on CUDA).

    ``init_state`` must be loaded HERE, before ``deepspeed.initialize``: DeepSpeed clones its
    fp32 master weights (which the EMA follows) at initialize, and its first ``step()`` copies
    them over the module, so weights loaded into the engine's module afterwards are silently lost."""
    device = device or accelerator_device()
    if cfg.model.attention == "flex":
        check_flex(device, cfg.model.hidden_size // cfg.model.num_heads)
    # Built on its device (no serial CPU init of an XL/2 on every rank), from one seed: every rank
    # starts from the same weights.
    torch.manual_seed(cfg.seed)
    model: MDTv2 = build_model(cfg.model, device=device)
    if init_state is not None:
        load_init_state(model, init_state, cfg.init_from)
    scope = checkpointing_scope(cfg.activation_checkpointing)
    wrapped = apply_activation_checkpointing(model, scope)
    if wrapped:
        log.info("activation checkpointing on %d of %d blocks (%s)", wrapped, len(model.blocks()), scope)
    if cfg.compile:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        log.info("torch.compile on %d blocks (regional, dynamic in the kept length); inductor cache %s "
                 "(TORCHINDUCTOR_CACHE_DIR: one per node)", compile_blocks(model), cache_dir())
    return model


@functools.cache
def check_flex(device: torch.device, head_dim: int) -> None:
    """``model.attention=flex`` on ``device``: refused on a CPU (no FlexAttention backward there),
    and probed once per head dim on a GPU with a tiny forward and backward, so that a head dim
    torch's FlexAttention rejects (its kernels want some sizes; XL/2 has 72) fails here, in one
    line, rather than at the first compiled step."""
    if device.type == "cpu":
        raise ConfigError(
            f"model.attention='flex' cannot train on CPU: FlexAttention has no backward on CPU in "
            f"torch {torch.__version__}; use model.attention='sdpa' here"
        )
    from mdt_ds.models.layers import flex_attention_with_bias

    try:
        q = torch.randn(1, 2, 16, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        flex_attention_with_bias(q, q, q, torch.zeros(2, 16, 16, device=device), head_dim**-0.5).sum().backward()
    except Exception as err:  # noqa: BLE001 - whatever torch raises, the advice is the same
        raise ConfigError(f"model.attention='flex' fails for head dim {head_dim} with torch {torch.__version__} "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); use model.attention='sdpa'"
                          ) from err


def load_init_state(model: MDTv2, state: dict[str, torch.Tensor], source: str) -> None:
    """``strict`` load of given weights, with the first mismatches named instead of torch's wall."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(
            part for part in (
                f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                f"{len(shapes)} with other shapes (e.g. {shapes[0]}: file {tuple(state[shapes[0]].shape)}, "
                f"model {tuple(own[shapes[0]].shape)})" if shapes else "",
            ) if part
        )
        raise ConfigError(f"init_from={source} does not fit model {describe_model(model)}: {detail}")
    model.load_state_dict(state, strict=True)


def describe_model(model: MDTv2) -> str:
    return f"(hidden {model.hidden_size}, {len(model.blocks())} blocks, input {model.input_size})"


def build_engine(
    cfg: TrainConfig, world_size: int, run_dir: Path | None = None, init_state: dict[str, torch.Tensor] | None = None
) -> tuple[deepspeed.DeepSpeedEngine, dict]:
    """:func:`prepare_model` (with ``init_state`` loaded before DeepSpeed clones its fp32 master),
    the optimiser and schedule, and the DeepSpeed engine around them. On a CPU, host memory is
    kept for reuse first (``cfg.cpu_malloc``, :mod:`mdt_ds.hostmem`)."""
    check_versions()
    ds_config = deepspeed_config(cfg, world_size)
    if cfg.cpu_malloc == "keep" and accelerator_device().type == "cpu":
        keep_freed_memory()
    model = prepare_model(cfg, init_state=init_state)
    optimizer = build_optimizer(model.parameters(), cfg.optim, compiled_run=cfg.compile)
    scheduler = build_scheduler(optimizer, cfg.optim)
    if run_dir is not None and torch.distributed.get_rank() == 0:
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, ds_config
