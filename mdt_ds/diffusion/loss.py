"""The MDTv2 training objective as one callable (edm2's loss-as-object).

One call draws t once and runs two passes with their own noise (and their own label dropout):
the full pass and the masked pass (Gao et al., MDTv2, sec. 3.3). The masked pass's loss covers
all tokens. ``loss = mean(full) + mean(masked)``, one backward.

Every draw happens where it is used, with no host-device sync: t, both noises, the label
dropout and the masking noise come from one ``torch.Generator`` on x's device (the model draws
the last two from it), and the masked pass's ratio is a Python float drawn on the host, from
U[mask_ratio, mask_ratio + 0.2) as the release draws it (``torch.rand(1) * 0.2 + mask_ratio``
in its ``forward_masker``), so the model never reads a ratio tensor back with ``int()``.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from mdt_ds.diffusion.gaussian import GaussianDiffusion

# Width of the release's training mask-ratio interval: U[mask_ratio, mask_ratio + 0.2).
MASK_RATIO_SPAN = 0.2


def _on(device: torch.device, generator: torch.Generator | None) -> torch.device:
    """Where to draw: the generator's device (a CPU generator for a GPU batch is copied after)."""
    return device if generator is None else generator.device


class MDTv2Loss:
    """``loss, terms = objective(model, x_start, y, generator, host_rng)``; terms hold detached
    per-batch means of ``loss, mse, vb`` (full pass) and ``m_mse, m_vb`` (masked pass).

    ``mask_ratio`` is the model's lower bound of the masked pass's ratio. Given, each call draws
    the ratio on the host from ``host_rng`` (default: torch's global CPU generator) and passes
    it to the model as a float; None lets the model draw it (the old path, one sync)."""

    def __init__(self, diffusion: GaussianDiffusion, masked_pass: bool = True, mask_ratio: float | None = None):
        self.diffusion = diffusion
        self.masked_pass = masked_pass
        self.mask_ratio = None if mask_ratio is None else float(mask_ratio)

    def draw_mask_ratio(self, host_rng: random.Random | None = None) -> float | None:
        """U[mask_ratio, mask_ratio + 0.2) as a Python float (None without a lower bound)."""
        if self.mask_ratio is None:
            return None
        # A CPU draw only: reading a CPU tensor never waits for a device.
        u = host_rng.random() if host_rng is not None else float(torch.rand(()))
        return self.mask_ratio + MASK_RATIO_SPAN * u

    def __call__(
        self,
        model: Callable[..., torch.Tensor],
        x_start: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator | None = None,
        host_rng: random.Random | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n, device = x_start.shape[0], x_start.device
        where = _on(device, generator)
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=generator, device=where).to(device)

        def noise() -> torch.Tensor:
            return torch.randn(x_start.shape, generator=generator, dtype=x_start.dtype, device=where).to(device)

        extra = {} if generator is None else {"generator": generator}
        full = self.diffusion.training_losses(model, x_start, t, {"y": y, **extra}, noise())
        loss = full["loss"].mean()
        terms = {"mse": full["mse"].mean().detach(), "vb": full["vb"].mean().detach()}
        if self.masked_pass:
            kwargs = {"y": y, "enable_mask": True, **extra}
            ratio = self.draw_mask_ratio(host_rng)
            if ratio is not None:
                kwargs["mask_ratio"] = ratio
            masked = self.diffusion.training_losses(model, x_start, t, kwargs, noise())
            loss = loss + masked["loss"].mean()
            terms["m_mse"] = masked["mse"].mean().detach()
            terms["m_vb"] = masked["vb"].mean().detach()
        terms["loss"] = loss.detach()
        return loss, terms
