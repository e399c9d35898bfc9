"""Few-step deterministic solvers of the probability-flow ODE for an eps-prediction model.

The grid is a respaced diffusion's kept timesteps ``k_0 = 0 < k_1 < ... < k_{N-1}``; the
model is evaluated only there, at ORIGINAL timesteps, so no fractional timestep is ever asked
of a network trained on integers. With ``alpha_i = sqrt(abar_{k_i})`` and ``sigma_i =
sqrt(1 - abar_{k_i})`` the ODE's solution between two grid points depends only on their
(alpha, sigma), not on how time is parametrised. Every solver ends like DDIM does: the last
evaluation, at k_0, returns its predicted x_0 (a step to sigma = 0). The learned-variance
channels are not used: the solvers are deterministic.

- ``dpm++2m``: DPM-Solver++(2M), Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling
  of Diffusion Probabilistic Models", Algorithm 2 (data prediction, multistep, first order on
  the first step); one network evaluation per step.
- ``heun``: the second-order Heun step of Karras et al. 2022 (EDM), Algorithm 1 without churn,
  in ``y = x / alpha`` and ``s = sigma / alpha`` where ``dy/ds = eps``; two evaluations per
  step except the last (Euler to s = 0), 2N - 1 in all.

Coefficients are Python floats from the float64 schedule: no device table and no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

ODE_SOLVERS = ("dpm++2m", "heun")

# eps_fn(x, i): the model's eps at x for respaced step i (original timestep timestep_map[i]).
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


class OdeGrid:
    """alpha_i and sigma_i of a respaced diffusion's kept timesteps (index 0 = least noise)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = [float(a) for a in alphas_cumprod.double().cpu()]
        if any(not 0.0 < a < 1.0 for a in abar):
            raise ValueError("alphas_cumprod must lie in (0, 1)")
        self.alphas = [math.sqrt(a) for a in abar]
        self.sigmas = [math.sqrt(1.0 - a) for a in abar]

    def __len__(self) -> int:
        return len(self.alphas)

    def log_snr(self, i: int) -> float:
        """lambda_i = log(alpha_i / sigma_i), DPM-Solver's time variable."""
        return math.log(self.alphas[i] / self.sigmas[i])

    def denoise(self, x: torch.Tensor, i: int, eps: torch.Tensor, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) at step i; with ``clip`` x_0 is clamped to [-1, 1] and eps re-derived from it."""
        x0 = (x - self.sigmas[i] * eps) / self.alphas[i]
        if not clip:
            return x0, eps
        x0 = x0.clamp(-1, 1)
        return x0, (x - self.alphas[i] * x0) / self.sigmas[i]


def evaluation_plan(solver: str, num_steps: int) -> list[int]:
    """The respaced indices a solver evaluates the network at, in order (their count is its NFE)."""
    if num_steps < 1:
        raise ValueError(f"a solver needs at least one step, got {num_steps}")
    if solver == "dpm++2m":
        return list(range(num_steps - 1, -1, -1))
    if solver == "heun":
        return [j for i in range(num_steps - 1, 0, -1) for j in (i, i - 1)] + [0]
    raise ValueError(f"solver must be one of {ODE_SOLVERS}, got {solver!r}")


def dpm_solver_pp_2m(
    eps_fn: EpsFn, x: torch.Tensor, grid: OdeGrid, clip: bool = False, steps: Iterable[int] | None = None
) -> torch.Tensor:
    """DPM-Solver++(2M) from x at step N-1 to x_0 (Lu et al. 2022, Alg. 2):
    ``x_{i-1} = (sigma_{i-1} / sigma_i) x_i - alpha_{i-1} (e^{-h} - 1) D_i`` with
    ``h = lambda_{i-1} - lambda_i`` and ``D_i = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i+1}``,
    ``r = h_prev / h``; ``D = x0`` on the first step (DDIM's update)."""
    prev_x0, prev_h = None, None
    for i in steps if steps is not None else range(len(grid) - 1, -1, -1):
        x0, _ = grid.denoise(x, i, eps_fn(x, i), clip)
        if i == 0:
            return x0
        h = grid.log_snr(i - 1) - grid.log_snr(i)
        if prev_x0 is None:
            direction = x0
        else:
            half_inv_r = h / (2 * prev_h)  # 1 / (2r)
            direction = (1 + half_inv_r) * x0 - half_inv_r * prev_x0
        x = (grid.sigmas[i - 1] / grid.sigmas[i]) * x - grid.alphas[i - 1] * math.expm1(-h) * direction
        prev_x0, prev_h = x0, h
    return x


def heun(
    eps_fn: EpsFn, x: torch.Tensor, grid: OdeGrid, clip: bool = False, steps: Iterable[int] | None = None
) -> torch.Tensor:
    """Heun's method (EDM Alg. 1, no churn) in y = x / alpha over s = sigma / alpha, dy/ds = eps:
    an Euler predictor to the next grid point, then the trapezoidal corrector; Euler to s = 0
    from the last grid point, which returns the predicted x_0."""
    s = [sig / a for sig, a in zip(grid.sigmas, grid.alphas)]
    for i in steps if steps is not None else range(len(grid) - 1, -1, -1):
        _, d = grid.denoise(x, i, eps_fn(x, i), clip)
        y = x / grid.alphas[i]
        if i == 0:
            return y - s[0] * d
        ds = s[i - 1] - s[i]
        x_euler = grid.alphas[i - 1] * (y + ds * d)
        _, d_next = grid.denoise(x_euler, i - 1, eps_fn(x_euler, i - 1), clip)
        x = grid.alphas[i - 1] * (y + ds * (d + d_next) / 2)
    return x


SOLVER_FNS = {"dpm++2m": dpm_solver_pp_2m, "heun": heun}
