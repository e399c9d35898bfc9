"""Optimisers: Adan (faithful to Xie et al. 2022 / the official code, through timm) and AdamW,
and the LR schedule (constant, with an optional linear warm-up)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mdt_ds.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """``adan``: ``timm.optim.Adan`` (official betas (0.98, 0.92, 0.99), eps 1e-8, proximal
    weight decay unless ``no_prox``, multi-tensor foreach); adan-pytorch is not used because it
    departs from the published update (MACHINE_NOTES). ``adamw``: ``torch.optim.AdamW`` with the
    first two betas. Clipping is DeepSpeed's global-norm ``gradient_clipping``."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adan":
        from timm.optim import Adan

        if len(cfg.betas) != 3:
            raise ValueError(f"Adan needs three betas, got optim.betas={cfg.betas}")
        return Adan(
            params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
            no_prox=cfg.no_prox, foreach=True,
        )
    betas = tuple(cfg.betas[:2])
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_lambda(warmup_steps: int):
    """Constant LR after a linear warm-up of ``warmup_steps`` optimizer steps (the release is
    constant)."""

    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps))
