"""The one place that calls ``deepspeed.initialize``: model + optimiser + schedule + derived
DeepSpeed JSON -> engine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import deepspeed
import torch

from mdt_ds.config import TrainConfig, deepspeed_config
from mdt_ds.models import MDTv2, build_model
from mdt_ds.models.checkpointing import apply_activation_checkpointing
from mdt_ds.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_engine(cfg: TrainConfig, world_size: int, run_dir: Path | None = None) -> tuple[deepspeed.DeepSpeedEngine, dict]:
    """Build the model (seeded from ``cfg.seed`` so every rank starts from the same weights),
    apply activation checkpointing from outside, and wrap it in a DeepSpeed engine."""
    ds_config = deepspeed_config(cfg, world_size)
    torch.manual_seed(cfg.seed)
    model: MDTv2 = build_model(cfg.model)
    wrapped = apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if wrapped:
        log.info("activation checkpointing on %d blocks (%s)", wrapped, cfg.activation_checkpointing)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    if run_dir is not None and torch.distributed.get_rank() == 0:
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, ds_config
