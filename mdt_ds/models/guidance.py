"""Classifier-free guidance with MDTv2's power-cosine schedule (used by the model's
``forward_with_cfg`` and by the sampler)."""

from __future__ import annotations

import math

import torch

GUIDE_CHANNELS = ("release", "all")


def power_cosine_scale(
    t: torch.Tensor, cfg_scale: float, diffusion_steps: int = 1000, scale_pow: float = 4.0
) -> torch.Tensor:
    """MDTv2's guidance weight at original timestep t:
    ``w(t) = 1 + (scale - 1) * (1 - cos(pi * (1 - t/T) ** pow)) / 2``.
    It is ~1 at t = T (pure noise) and reaches ``cfg_scale`` at t = 0."""
    step = (1 - torch.cos(((1 - t / diffusion_steps) ** scale_pow) * math.pi)) / 2
    return (cfg_scale - 1) * step + 1


def guided_channel_count(latent_channels: int, guide_channels: str = "release") -> int:
    """How many eps channels are guided: ``min(3, C)`` as released (DiT's habit of guiding 3 of
    the 4 SD-VAE channels, clamped so it never reaches the variance channels), or all C."""
    if guide_channels not in GUIDE_CHANNELS:
        raise ValueError(f"guide_channels must be one of {GUIDE_CHANNELS}, got {guide_channels!r}")
    return min(3, latent_channels) if guide_channels == "release" else latent_channels


def guide_eps(
    model_out: torch.Tensor,
    t: torch.Tensor,
    cfg_scale: float,
    latent_channels: int,
    diffusion_steps: int = 1000,
    scale_pow: float = 4.0,
    guide_channels: str = "release",
) -> torch.Tensor:
    """Combine a doubled batch's output ``[cond; uncond]`` into ``[guided; guided]``:
    ``eps = eps_u + w(t) (eps_c - eps_u)`` on the guided channels; every other channel is
    returned as each half produced it (the release's contract)."""
    n = guided_channel_count(latent_channels, guide_channels)
    eps, rest = model_out[:, :n], model_out[:, n:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    w = power_cosine_scale(t[: len(eps) // 2], cfg_scale, diffusion_steps, scale_pow)
    w = w.view(-1, *([1] * (eps.dim() - 1))).to(eps.dtype)
    half_eps = uncond_eps + w * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
