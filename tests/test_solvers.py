"""Few-step ODE solvers and interval guidance.

Correctness on Gaussian data, whose exact eps is closed-form: for x_0 ~ N(mu, s^2) (per
channel) and x_t = alpha x_0 + sigma eps, E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 +
sigma^2). In y = x / alpha and r = sigma / alpha the probability-flow ODE then moves y - mu by
the factor sqrt(s^2 + r^2) / sqrt(s^2 + r_T^2): its map from x_T is affine and known exactly,
so each solver's error against it (from the same x_T, ending with the same final denoising at
t = 0) shows the solver's order without the prior mismatch at T or any sampling noise.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mdt_ds.config import ConfigError, DiffusionConfig, load_config
from mdt_ds.diffusion import linear_beta_schedule
from mdt_ds.diffusion.respace import logsnr_timesteps
from mdt_ds.diffusion.solvers import SOLVER_FNS, OdeGrid, evaluation_plan
from mdt_ds.sampling import SampleOptions, generate, image_seed
from tests.test_eval_sampler import COMMON, run_in_process, tiny_ckpt, tiny_model  # noqa: F401 - fixture

pytestmark = pytest.mark.evaluation

ABAR = torch.cumprod(1 - linear_beta_schedule(1000), 0)
MU = torch.tensor([0.5, -0.3, 0.1, 0.0], dtype=torch.float64).view(1, 4, 1, 1)
STD = torch.tensor([0.5, 1.0, 0.3, 0.7], dtype=torch.float64).view(1, 4, 1, 1)


def exact_eps(x: torch.Tensor, k: int) -> torch.Tensor:
    alpha, sigma = ABAR[k].sqrt(), (1 - ABAR[k]).sqrt()
    return (sigma * (x - alpha * MU) / (alpha**2 * STD**2 + sigma**2)).to(x.dtype)


def exact_solution(x_T: torch.Tensor, k_T: int) -> torch.Tensor:
    """The ODE's exact map from x at timestep k_T to t = 0, then the final denoising at t = 0."""
    r_T, r_0 = ((1 - ABAR[k_T]) / ABAR[k_T]).sqrt(), ((1 - ABAR[0]) / ABAR[0]).sqrt()
    y_0 = MU + (x_T / ABAR[k_T].sqrt() - MU) * torch.sqrt(STD**2 + r_0**2) / torch.sqrt(STD**2 + r_T**2)
    x_0 = ABAR[0].sqrt() * y_0
    return (x_0 - (1 - ABAR[0]).sqrt() * exact_eps(x_0, 0)) / ABAR[0].sqrt()


def solve(solver: str, steps: int, spacing: str, x_T: torch.Tensor) -> torch.Tensor:
    options = SampleOptions(sampler="ddim" if solver == "ddim" else solver, steps=steps, spacing=spacing)
    diffusion = options.diffusion()
    timesteps = diffusion.timestep_map.tolist()
    if solver == "ddim":  # the release's DDIM loop, as a first-order reference
        def model(x, t, **_):
            return torch.cat([exact_eps(x, int(t[0])), torch.zeros_like(x)], 1)

        return diffusion.ddim_sample_loop(model, x_T.shape, noise=x_T.clone())
    grid = OdeGrid(diffusion.alphas_cumprod)
    return SOLVER_FNS[solver](lambda x, i: exact_eps(x, timesteps[i]), x_T.clone(), grid)


@pytest.mark.parametrize("solver,spacing,order", [
    ("ddim", "time", 1), ("dpm++2m", "time", 2), ("dpm++2m", "logsnr", 2), ("heun", "time", 2), ("heun", "logsnr", 2),
])
def test_error_shrinks_at_the_solvers_order(solver: str, spacing: str, order: int) -> None:
    x_T = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for steps in (64, 128, 256):
        out = solve(solver, steps, spacing, x_T)
        errors.append(float((out - exact_solution(x_T, 999)).pow(2).mean().sqrt()))
    slopes = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(order - 0.3 < s < order + 0.35 for s in slopes), (errors, slopes)
    assert errors[-1] < (2e-2 if order == 1 else 2e-3)


def test_few_steps_beat_ddim_where_each_grid_suits_it() -> None:
    """At 10 network evaluations DPM-Solver++(2M) on the log-SNR grid is an order of magnitude
    closer to the exact solution than DDIM (what the few-step default relies on)."""
    x_T = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = exact_solution(x_T, 999)
    ddim = float((solve("ddim", 10, "time", x_T) - ref).pow(2).mean().sqrt())
    dpm = float((solve("dpm++2m", 10, "logsnr", x_T) - ref).pow(2).mean().sqrt())
    assert dpm < ddim / 5, (dpm, ddim)


class GaussianModel(torch.nn.Module):
    """A 'network' with the exact eps of the Gaussian data, the sampler's model interface and a
    log of (batch size, timesteps, labels) per forward."""

    num_classes, in_channels, input_size = 10, 4, 4

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the sampler a device
        self.calls: list[tuple[int, list[int], list[int]]] = []

    def forward(self, x, t, y):
        self.calls.append((len(x), t.tolist(), y.tolist()))
        k = int(t[0])
        # a label-dependent shift, so that guidance changes the output
        shift = (y.to(x.dtype) / 10 - torch.where(y == self.num_classes, 1.0, 0.0)).view(-1, 1, 1, 1) * 0.05
        return torch.cat([exact_eps(x.double(), k).float() + shift, torch.zeros_like(x)], 1)

    def forward_with_cfg(self, x, t, y, cfg_scale, diffusion_steps=1000, scale_pow=4.0, guide_channels="release"):
        from mdt_ds.models.guidance import guide_eps

        half = x[: len(x) // 2]
        return guide_eps(self.forward(torch.cat([half, half]), t, y), t, cfg_scale, 4, diffusion_steps, scale_pow,
                         guide_channels)


def run(options: SampleOptions, n: int = 3, model: GaussianModel | None = None) -> tuple[torch.Tensor, dict]:
    model = model or GaussianModel()
    stats: dict = {}
    out = generate(model, options.diffusion(), torch.arange(n), [image_seed(0, i) for i in range(n)],
                   cfg_scale=options.cfg_scale, sampler=options.sampler, cfg_interval=options.cfg_interval,
                   stats=stats)
    return out, stats


@pytest.mark.parametrize("sampler", ["dpm++2m", "heun"])
def test_at_many_steps_each_solver_agrees_with_ddim(sampler: str) -> None:
    """Through generate() with float32 maths: at 500 steps the solvers land where DDIM does, to
    within DDIM's own discretisation error; at 10 steps they are far apart."""
    many = [run(SampleOptions(sampler=s, steps=500, spacing="time"))[0] for s in ("ddim", sampler)]
    few = [run(SampleOptions(sampler=s, steps=10, spacing="time"))[0] for s in ("ddim", sampler)]
    close, apart = float((many[0] - many[1]).abs().max()), float((few[0] - few[1]).abs().max())
    assert close < 0.02 and apart > 5 * close, (close, apart)


def test_interval_guidance_runs_only_the_conditional_half_outside_it() -> None:
    options = SampleOptions(sampler="dpm++2m", steps=10, cfg_scale=4.0, cfg_interval=(100, 600))
    model = GaussianModel()
    out, stats = run(options, n=3, model=model)
    kept = options.respacing()
    guided = [k for k in kept if 100 <= k <= 600]
    assert 0 < len(guided) < len(kept)
    for size, t, y in model.calls:
        if 100 <= t[0] <= 600:  # the release's doubled batch: [labels; null]
            assert size == 6 and y == [0, 1, 2, 10, 10, 10]
        else:
            assert size == 3 and y == [0, 1, 2]
    # what the sampler reports, what it planned, and what the network saw agree
    assert stats["network_calls_per_image"] == options.network_calls() == len(kept) + len(guided)
    assert sum(size for size, _, _ in model.calls) == 3 * options.network_calls()
    # guidance everywhere == an interval over every timestep; an interval missing every grid
    # point == no guidance at all
    everywhere = run(SampleOptions(sampler="dpm++2m", steps=10, cfg_scale=4.0))[0]
    assert torch.equal(everywhere, run(SampleOptions(sampler="dpm++2m", steps=10, cfg_scale=4.0,
                                                     cfg_interval=(0, 999)))[0])
    gap = next(k for k in range(1000) if k not in kept)
    plain = run(SampleOptions(sampler="dpm++2m", steps=10))[0]
    assert torch.equal(plain, run(SampleOptions(sampler="dpm++2m", steps=10, cfg_scale=4.0,
                                                cfg_interval=(gap, gap)))[0])
    assert not torch.allclose(out, everywhere) and not torch.allclose(out, plain)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_interval_guidance_in_the_release_samplers(sampler: str) -> None:
    options = SampleOptions(sampler=sampler, steps=20, cfg_scale=3.0, cfg_interval=(0, 499))
    model = GaussianModel()
    _, stats = run(options, model=model)
    assert [size for size, t, _ in model.calls] == [6 if t[0] <= 499 else 3 for _, t, _ in model.calls]
    assert stats["network_calls_per_image"] == options.network_calls() == 20 + 10


def test_heun_evaluates_twice_per_step_but_the_last() -> None:
    model = GaussianModel()
    options = SampleOptions(sampler="heun", steps=6, cfg_scale=2.0)
    _, stats = run(options, model=model)
    kept = options.respacing()
    assert [t[0] for _, t, _ in model.calls] == [kept[i] for i in evaluation_plan("heun", 6)]
    assert stats["network_calls_per_image"] == options.network_calls() == 2 * (2 * 6 - 1)


@pytest.mark.parametrize("sampler", ["dpm++2m", "heun"])
def test_solver_images_do_not_depend_on_batch_composition(sampler: str) -> None:
    model = tiny_model()
    options = SampleOptions(sampler=sampler, steps=5, cfg_scale=2.0, cfg_interval=(0, 700))
    labels, seeds = torch.tensor([1, 2, 3, 4]), [image_seed(0, i) for i in range(4)]

    def make(lab, sd):
        return generate(model, options.diffusion(), lab, sd, cfg_scale=2.0, sampler=sampler, cfg_interval=(0, 700))

    together = make(labels, seeds)
    apart = torch.cat([make(labels[i : i + 1], seeds[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(together).all() and not torch.allclose(together, make(labels, [9, 8, 7, 6]))


def test_spacings_and_options() -> None:
    assert SampleOptions(sampler="ddim", steps=50).respacing() == list(range(0, 1000, 20))
    assert SampleOptions(sampler="ddpm", steps=250).respacing()[-1] == 999
    logsnr = logsnr_timesteps(ABAR, 20)
    assert logsnr == SampleOptions(sampler="dpm++2m", steps=20).respacing()
    assert logsnr[0] == 0 and logsnr[-1] == 999 and len(set(logsnr)) == 20 == len(logsnr)
    lam = [0.5 * math.log(ABAR[k] / (1 - ABAR[k])) for k in logsnr]
    gaps = np.diff(lam)
    assert np.allclose(gaps, gaps.mean(), rtol=0.25)  # even in log-SNR up to integer rounding
    dense = logsnr_timesteps(ABAR, 400)  # more steps than log-SNR room near t = 0: pushed, distinct
    assert len(set(dense)) == 400 and dense == sorted(dense) and dense[-1] == 999
    assert SampleOptions(sampler="heun", steps=4, spacing="ddim").respacing() == [0, 250, 500, 750]
    plain = SampleOptions(sampler="dpm++2m", steps=10)
    assert "cfg_interval" not in plain.as_dict() and "spacing" not in plain.as_dict()
    assert SampleOptions(cfg_interval=[10, 20]).as_dict()["cfg_interval"] == [10, 20]
    for bad in ({"cfg_interval": (5, 1)}, {"cfg_interval": (0, 1000)}, {"cfg_interval": (3,)}, {"sampler": "euler"},
                {"spacing": "karras"}):
        with pytest.raises(ValueError):
            SampleOptions(**bad)


def test_training_grids_take_the_configured_sampler(tmp_path) -> None:
    from mdt_ds.grids import sample_images

    cfg = load_config(None, ["model.preset=MDTv2-Tiny/2", "model.in_channels=4", "model.input_size=8",
                             "data.source=tiny-latents", "diffusion.sampler=dpm++2m", "diffusion.sample_steps=4",
                             "diffusion.cfg_scale=2.0", "diffusion.cfg_interval=[0,500]"])
    stats: dict = {}
    images, labels = sample_images(cfg, tiny_model().state_dict(), per_class=1, max_classes=2, stats=stats)
    kept = SampleOptions(sampler="dpm++2m", steps=4).respacing()
    assert images.shape[0] == 2 and torch.isfinite(images).all()
    assert stats["network_calls_per_image"] == 4 + sum(k <= 500 for k in kept)
    with pytest.raises(ConfigError, match="cfg_interval"):
        DiffusionConfig(cfg_interval=[700, 100])
    # config.json of earlier versions: sample_steps as the respacing string, read as an int
    assert load_config(None, []).diffusion.sample_steps == 25
    from mdt_ds.config import TrainConfig, from_dict

    assert from_dict(TrainConfig, {"diffusion": {"sample_steps": "250"}}).diffusion.sample_steps == 250


def test_mdt_sample_few_step_solver_with_an_interval(tiny_ckpt, tmp_path, capsys) -> None:  # noqa: F811
    out = tmp_path / "dpm.npz"
    assert run_in_process(tiny_ckpt, out, "--sampler", "dpm++2m", "--steps", "4", "--cfg-interval", "0", "600") == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    options = SampleOptions(sampler="dpm++2m", steps=4, cfg_scale=2.0, cfg_interval=(0, 600))
    assert summary["settings"]["sampler"] == "dpm++2m" and summary["settings"]["cfg_interval"] == [0, 600]
    assert summary["network_calls_per_image"] == options.network_calls() < 8
    with np.load(out) as data:
        assert data["arr_0"].shape == (10, 64, 64, 3)
    with pytest.raises(SystemExit) as err:
        run_in_process(tiny_ckpt, tmp_path / "bad.npz", "--sampler", "dpm++2m", "--cfg-interval", "600", "100")
    assert err.value.code == 2 and "guidance interval" in capsys.readouterr().err
