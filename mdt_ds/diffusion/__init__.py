"""MDTv2 diffusion maths (pure torch), with DiT's ``create_diffusion`` factory."""

from __future__ import annotations

from mdt_ds.diffusion.gaussian import GaussianDiffusion, linear_beta_schedule
from mdt_ds.diffusion.respace import SpacedDiffusion, space_timesteps

__all__ = ["GaussianDiffusion", "SpacedDiffusion", "create_diffusion", "space_timesteps"]


def create_diffusion(
    timestep_respacing: str | list[int] | None = "",
    diffusion_steps: int = 1000,
    min_snr_gamma: float = 5.0,
) -> GaussianDiffusion:
    """The diffusion MDTv2 trains and samples with: linear betas, eps prediction, learned-range
    variance, Min-SNR weighting. ``timestep_respacing`` "" (or None) keeps all steps for
    training; "250" or "ddim50" respaces for sampling."""
    betas = linear_beta_schedule(diffusion_steps)
    if not timestep_respacing:
        return GaussianDiffusion(betas, min_snr_gamma)
    return SpacedDiffusion(betas, space_timesteps(diffusion_steps, timestep_respacing), min_snr_gamma)
