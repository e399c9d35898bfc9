"""The MDTv2 training objective as one callable (edm2's loss-as-object).

One call draws t once and runs two passes with their own noise (and their own label dropout):
the full pass and the masked pass (Gao et al., MDTv2, sec. 3.3). The masked pass's loss covers
all tokens. ``loss = mean(full) + mean(masked)``, one backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mdt_ds.diffusion.gaussian import GaussianDiffusion


class MDTv2Loss:
    """``loss, terms = objective(model, x_start, y)``; terms hold detached per-batch means of
    ``loss, mse, vb`` (full pass) and ``m_mse, m_vb`` (masked pass) for logging."""

    def __init__(self, diffusion: GaussianDiffusion, masked_pass: bool = True):
        self.diffusion = diffusion
        self.masked_pass = masked_pass

    def __call__(
        self,
        model: Callable[..., torch.Tensor],
        x_start: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = x_start.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=generator).to(x_start.device)

        def noise() -> torch.Tensor:
            return torch.randn(x_start.shape, generator=generator, dtype=x_start.dtype).to(x_start.device)

        full = self.diffusion.training_losses(model, x_start, t, {"y": y}, noise())
        loss = full["loss"].mean()
        terms = {"mse": full["mse"].mean().detach(), "vb": full["vb"].mean().detach()}
        if self.masked_pass:
            masked = self.diffusion.training_losses(model, x_start, t, {"y": y, "enable_mask": True}, noise())
            loss = loss + masked["loss"].mean()
            terms["m_mse"] = masked["mse"].mean().detach()
            terms["m_vb"] = masked["vb"].mean().detach()
        terms["loss"] = loss.detach()
        return loss, terms
