"""Model registry: presets named as in the paper, built from a :class:`ModelConfig`."""

from __future__ import annotations

from typing import Any

import torch

from mdt_ds.config import MODEL_PRESETS, ModelConfig
from mdt_ds.models.mdt import MDTv2

__all__ = ["MDTv2", "MODEL_PRESETS", "build_model"]


def build_model(cfg: ModelConfig | str, device: str | torch.device | None = None, **overrides: Any) -> MDTv2:
    """Build MDTv2 from a config or a preset name (``"MDTv2-XL/2"``), with keyword overrides.
    ``device="meta"`` builds without allocating (for counting parameters and MACs)."""
    if isinstance(cfg, str):
        cfg = ModelConfig.from_preset(cfg, **overrides)
    elif overrides:
        cfg = ModelConfig(**{**cfg.__dict__, **overrides})
    with torch.device(device or "cpu"):
        return MDTv2(**cfg.model_kwargs())
