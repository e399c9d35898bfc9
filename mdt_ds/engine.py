"""The one place that calls ``deepspeed.initialize``: model + optimiser + schedule + derived
DeepSpeed JSON -> engine."""

from __future__ import annotations

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

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def accelerator_device() -> torch.device:
    """The device DeepSpeed will place the engine on (``cuda:LOCAL_RANK``, or ``cpu``)."""
    return torch.device(get_accelerator().current_device_name())


def prepare_model(
    cfg: TrainConfig, device: torch.device | None = None, init_state: dict[str, torch.Tensor] | None = None
) -> MDTv2:
    """Build the model (seeded from ``cfg.seed`` so every rank starts from the same weights) or
    load ``init_state`` into it, apply activation checkpointing, then regional ``torch.compile``
    (compiled blocks trace the checkpointed forward), and move it to ``device`` (default: the
    accelerator's) before the optimiser is built, so that the optimiser sees device parameters
    (fused AdamW on CUDA).

    ``init_state`` must be loaded HERE, before ``deepspeed.initialize``: DeepSpeed clones its
    fp32 master weights (which the EMA follows) at initialize, and its first ``step()`` copies
    them over the module, so weights loaded into the engine's module afterwards are silently lost."""
    device = device or accelerator_device()
    if cfg.model.attention == "flex" and device.type == "cpu":
        raise ConfigError(
            f"model.attention='flex' cannot train on CPU: FlexAttention has no backward on CPU in "
            f"torch {torch.__version__}; use model.attention='sdpa' here"
        )
    torch.manual_seed(cfg.seed)
    model: MDTv2 = build_model(cfg.model)
    if init_state is not None:
        load_init_state(model, init_state, cfg.init_from)
    scope = checkpointing_scope(cfg.activation_checkpointing)
    wrapped = apply_activation_checkpointing(model, scope)
    if wrapped:
        log.info("activation checkpointing on %d of %d blocks (%s)", wrapped, len(model.blocks()), scope)
    if cfg.compile:
        log.info("torch.compile on %d blocks (regional, dynamic in the kept length)", compile_blocks(model))
    return model.to(device)


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
