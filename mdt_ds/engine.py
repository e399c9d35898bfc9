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
from mdt_ds.models import MDTv2, build_model
from mdt_ds.models.checkpointing import apply_activation_checkpointing
from mdt_ds.models.compile import compile_blocks
from mdt_ds.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def accelerator_device() -> torch.device:
    """The device DeepSpeed will place the engine on (``cuda:LOCAL_RANK``, or ``cpu``)."""
    return torch.device(get_accelerator().current_device_name())


def prepare_model(cfg: TrainConfig, device: torch.device | None = None) -> MDTv2:
    """Build the model (seeded from ``cfg.seed`` so every rank starts from the same weights),
    apply activation checkpointing, then regional ``torch.compile`` (compiled blocks trace the
    checkpointed forward), and move it to ``device`` (default: the accelerator's) before the
    optimiser is built, so that the optimiser sees device parameters (fused AdamW on CUDA)."""
    device = device or accelerator_device()
    if cfg.model.attention == "flex" and device.type == "cpu":
        raise ConfigError(
            f"model.attention='flex' cannot train on CPU: FlexAttention has no backward on CPU in "
            f"torch {torch.__version__}; use model.attention='sdpa' here"
        )
    torch.manual_seed(cfg.seed)
    model: MDTv2 = build_model(cfg.model)
    scope = checkpointing_scope(cfg.activation_checkpointing)
    wrapped = apply_activation_checkpointing(model, scope)
    if wrapped:
        log.info("activation checkpointing on %d of %d blocks (%s)", wrapped, len(model.blocks()), scope)
    if cfg.compile:
        log.info("torch.compile on %d blocks (regional, dynamic in the kept length)", compile_blocks(model))
    return model.to(device)


def build_engine(cfg: TrainConfig, world_size: int, run_dir: Path | None = None) -> tuple[deepspeed.DeepSpeedEngine, dict]:
    """:func:`prepare_model`, the optimiser and schedule, and the DeepSpeed engine around them."""
    ds_config = deepspeed_config(cfg, world_size)
    model = prepare_model(cfg)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    if run_dir is not None and torch.distributed.get_rank() == 0:
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, ds_config
