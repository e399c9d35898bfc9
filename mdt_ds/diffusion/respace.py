"""Timestep respacing (improved DDPM, sec. 4): sample with a subset of the T steps. The
respaced process keeps the original abar at the chosen steps, and the model is called with the
ORIGINAL timesteps (0..T-1)."""

from __future__ import annotations

import torch

from mdt_ds.diffusion.gaussian import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> list[int]:
    """The kept timesteps, sorted. ``"250"`` spreads 250 steps evenly (rounded), ``"10,20"``
    uses sections, ``"ddimN"`` uses a fixed integer stride as the DDIM paper does."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot make exactly {desired} steps from {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulated (cur += stride) exactly as ADM/the release does: round(stride * j) rounds
        # differently for 278 of the step counts 1..1000 (e.g. "21", "59", "111").
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over the kept timesteps of a base schedule; ``timestep_map[i]`` is the original
    timestep of respaced step i, which is what the model sees."""

    def __init__(self, base_betas: torch.Tensor, use_timesteps: list[int], min_snr_gamma: float = 5.0):
        base = GaussianDiffusion(base_betas, min_snr_gamma)
        keep = sorted(set(use_timesteps))
        abar = base.alphas_cumprod[keep]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        super().__init__(1 - abar / abar_prev, min_snr_gamma)
        self.timestep_map = torch.tensor(keep, dtype=torch.long)
        self.original_num_steps = len(base_betas)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        key = ("timestep_map", t.device)
        if key not in self._tables:  # copied to each device once, like the schedules
            self._tables[key] = self.timestep_map.to(t.device)
        return self._tables[key][t]


def logsnr_timesteps(alphas_cumprod: torch.Tensor, count: int) -> list[int]:
    """``count`` timesteps of a base schedule spread evenly in log-SNR ``lambda = log(alpha /
    sigma)`` from t = 0 to t = T - 1, as DPM-Solver recommends for its solvers (Lu et al. 2022,
    sec. 3.3 "logSNR" step schedule), each rounded to the nearest integer timestep; near t = 0,
    where one integer step spans more log-SNR than the grid's spacing, timesteps are pushed up
    so that all ``count`` stay distinct."""
    abar = alphas_cumprod.double()
    num_timesteps = len(abar)
    if not 2 <= count <= num_timesteps:
        raise ValueError(f"log-SNR spacing needs 2..{num_timesteps} steps, got {count}")
    lam = 0.5 * torch.log(abar / (1 - abar))  # decreasing in t
    targets = torch.linspace(float(lam[0]), float(lam[-1]), count, dtype=torch.float64)
    steps: list[int] = []
    for j, target in enumerate(targets):
        nearest = int((lam - target).abs().argmin())
        floor = steps[-1] + 1 if steps else 0
        ceiling = num_timesteps - (count - j)  # leave room for the remaining steps
        steps.append(min(max(nearest, floor), ceiling))
    return steps
