"""Gaussian diffusion as MDTv2 uses it: improved-DDPM / ADM (Nichol & Dhariwal 2021; Dhariwal &
Nichol 2021) with linear betas, epsilon prediction and learned-range variance, plus the Min-SNR
weight of MDTv2 (Hang et al. 2023). Only the branches MDTv2 uses are ported.

Schedules are kept in float64 and read as float32 at t, as ADM's ``_extract_into_tensor``
does (gather in float64, then cast); that is what makes the numbers match the release's. The
cast is elementwise, so casting the whole table once and gathering from it gives the same
float32 numbers: each table is cast and copied to a device once and cached there, so a training
step makes no host-to-device copy for the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mdt_ds.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl

ModelFn = Callable[..., torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def linear_beta_schedule(num_timesteps: int) -> torch.Tensor:
    """ADM's linear schedule, scaled so any T spans the same range as 1e-4..0.02 at T = 1000."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def extract(arr: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``arr[t]`` as float32, broadcast to ``shape`` (ADM's ``_extract_into_tensor``). ``arr`` must
    already be float32 on ``t``'s device for a copy-free gather (see ``GaussianDiffusion.table``)."""
    out = arr.to(t.device)[t].float()
    return out.view(-1, *([1] * (len(shape) - 1))).expand(shape)


# The float64 schedules of a GaussianDiffusion, gathered at t through ``GaussianDiffusion.at``.
SCHEDULES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "log_betas",
)


class GaussianDiffusion:
    """q(x_t | x_0), the learned-variance reverse process p(x_{t-1} | x_t), the training terms
    and the DDPM / DDIM samplers."""

    def __init__(self, betas: torch.Tensor, min_snr_gamma: float = 5.0):
        betas = betas.double()
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D tensor in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.min_snr_gamma = min_snr_gamma
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        # Posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log variance clipped: the posterior variance is 0 at t = 0, so use the t = 1 value there.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------ schedules on the device
    def table(self, name: str, device: torch.device | str) -> torch.Tensor:
        """The float64 schedule ``name`` as a float32 tensor on ``device``, made once per device."""
        device = torch.device(device)
        key = (name, device)
        cached = self._tables.get(key)
        if cached is None:
            cached = self._tables[key] = getattr(self, name).float().to(device)
        return cached

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """Put every schedule on ``device`` now (optional: :meth:`at` does it on first use)."""
        for name in SCHEDULES:
            self.table(name, device)
        return self

    def at(self, name: str, t: torch.Tensor, shape: torch.Size | tuple) -> torch.Tensor:
        """Schedule ``name`` at ``t`` as float32, broadcast to ``shape``: ADM's
        ``_extract_into_tensor`` without the per-call float64 copy."""
        out = self.table(name, t.device)[t]
        return out.view(-1, *([1] * (len(shape) - 1))).expand(shape)

    # ------------------------------------------------------------ forward process
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            self.at("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self.at("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self.at("posterior_mean_coef1", t, x_t.shape) * x_start
            + self.at("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        return (
            mean,
            self.at("posterior_variance", t, x_t.shape),
            self.at("posterior_log_variance_clipped", t, x_t.shape),
        )

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t), as the float32 ratio the release computes."""
        alpha = self.at("sqrt_alphas_cumprod", t, t.shape)
        sigma = self.at("sqrt_one_minus_alphas_cumprod", t, t.shape)
        return (alpha / sigma) ** 2

    def min_snr_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weight for epsilon prediction: min(SNR, gamma) / SNR (Hang et al. 2023)."""
        snr = self.snr(t)
        return torch.clamp(snr, max=self.min_snr_gamma) / snr

    # ------------------------------------------------------------ reverse process
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            self.at("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self.at("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return (self.at("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart) / self.at(
            "sqrt_recipm1_alphas_cumprod", t, x_t.shape
        )

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the model sees (overridden by respacing: the original 0..T-1)."""
        return t

    def p_mean_variance_from_output(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a model output [eps, v]: learned-range variance
        ``log var = f log(beta_t) + (1 - f) log(beta_tilde_t)`` with ``f = (v + 1) / 2``
        (Nichol & Dhariwal 2021, eq. 15), and the mean through the predicted x_0."""
        channels = x.shape[1]
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels; learned variance needs {2 * channels}"
            )
        eps, var_values = torch.split(model_output, channels, dim=1)
        min_log = self.at("posterior_log_variance_clipped", t, x.shape)
        max_log = self.at("log_betas", t, x.shape)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(output, x, t, clip_denoised)

    # ------------------------------------------------------------ training terms
    def vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """L_vb in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the
        discretised decoder NLL at t = 0 (Ho et al. 2020, eq. 5; ADM ``_vb_terms_bpd``)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def training_losses(
        self,
        model: ModelFn,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample terms, keyed as the release keys them: ``mse`` is the Min-SNR weighted eps
        error ``min(SNR, gamma)/SNR * |eps - eps_hat|^2`` (``mse_raw`` is unweighted), ``vb`` the
        learned-variance term (stop-gradient on the mean, not weighted), ``loss = mse + vb``."""
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        channels = x_t.shape[1]
        eps, var_values = torch.split(output, channels, dim=1)
        # Stop-gradient on the mean: L_vb trains only the variance (improved DDPM, sec. 3.1).
        frozen = torch.cat([eps.detach(), var_values], dim=1)
        vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        mse_raw = mean_flat((noise - eps) ** 2)
        mse = self.min_snr_weight(t) * mse_raw
        return {"mse": mse, "mse_raw": mse_raw, "vb": vb, "loss": mse + vb}

    # ------------------------------------------------------------ sampling
    def p_sample(
        self, model: ModelFn, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, model_kwargs: dict | None = None,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} (no noise at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(
        self,
        model: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """One DDIM step (Song et al. 2021, eq. 12) with the eps implied by the predicted x_0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self.at("alphas_cumprod", t, x.shape)
        abar_prev = self.at("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        if eta == 0 or noise is None:
            return mean
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        return mean + nonzero * sigma * noise

    def _loop(
        self, step: Callable, shape: tuple, noise: torch.Tensor | None, noise_fn: NoiseFn, device: torch.device | str,
        progress: bool,
    ) -> torch.Tensor:
        """Run ``step(x, t)`` from t = T-1 down to 0, starting at ``noise`` or a fresh draw."""
        x = noise if noise is not None else noise_fn(torch.empty(shape, device=device))
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc="sampling", leave=False)
        for i in indices:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                x = step(x, t)
        return x

    def p_sample_loop(
        self,
        model: ModelFn,
        shape: tuple,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
        noise_fn: NoiseFn | None = None,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T. ``noise_fn(like)`` draws every Gaussian (default
        ``randn_like``), so a caller can give each image its own generator. ``clip_denoised``
        clamps the predicted x_0 to [-1, 1] (pixel data; the release samples latents unclipped)."""
        fn = noise_fn or torch.randn_like

        def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.p_sample(model, x, t, fn(x), model_kwargs, clip_denoised)

        return self._loop(step, shape, noise, fn, device, progress)

    def ddim_sample_loop(
        self,
        model: ModelFn,
        shape: tuple,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        device: torch.device | str = "cpu",
        progress: bool = False,
        eta: float = 0.0,
        noise_fn: NoiseFn | None = None,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """DDIM sampling (deterministic for eta = 0)."""
        fn = noise_fn or torch.randn_like

        def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.ddim_sample(model, x, t, fn(x) if eta else None, model_kwargs, eta, clip_denoised)

        return self._loop(step, shape, noise, fn, device, progress)
