"""Diffusion maths against closed forms (Ho et al. 2020; Nichol & Dhariwal 2021; Song et al. 2021;
Hang et al. 2023), respacing, the samplers' timestep contract, and the MDTv2 loss object."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mdt_ds.diffusion import GaussianDiffusion, SpacedDiffusion, create_diffusion, space_timesteps
from mdt_ds.diffusion.loss import MDTv2Loss
from mdt_ds.diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from mdt_ds.models import build_model

pytestmark = pytest.mark.core

T = 1000
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
ABAR = torch.cumprod(1 - BETAS, 0)


def at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return values[t].view(-1, 1, 1, 1)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def recording_model(seen: list, channels: int = 2):
    """out = [eps, v] with eps = 0.1 x + t/1000 and v = tanh(x); records the timesteps it sees."""

    def model(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        seen.append(t.clone())
        eps = 0.1 * x + t.float().view(-1, 1, 1, 1) / 1000
        return torch.cat([eps, torch.tanh(x)], dim=1)

    return model


def test_schedule() -> None:
    d = create_diffusion("")
    assert isinstance(d, GaussianDiffusion) and d.num_timesteps == T
    torch.testing.assert_close(d.betas, BETAS)
    torch.testing.assert_close(d.alphas_cumprod, ABAR)


def test_q_sample_closed_form() -> None:
    d = create_diffusion("")
    x0, noise = randn(4, 3, 5, 5, seed=0), randn(4, 3, 5, 5, seed=1)
    t = torch.tensor([0, 1, 499, 999])
    want = at(ABAR.sqrt(), t) * x0.double() + at((1 - ABAR).sqrt(), t) * noise.double()
    torch.testing.assert_close(d.q_sample(x0, t, noise).double(), want, atol=1e-6, rtol=1e-6)


def test_posterior_matches_bayes_rule() -> None:
    """q(x_{t-1} | x_t, x_0) from q(x_{t-1} | x_0) = N(sqrt(abar') x0, 1 - abar') and
    q(x_t | x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta): precision adds, means weigh by precision."""
    d = create_diffusion("")
    x0, xt = randn(4, 2, 3, 3, seed=0), randn(4, 2, 3, 3, seed=1)
    t = torch.tensor([1, 2, 300, 999])
    abar_prev = ABAR[t - 1].view(-1, 1, 1, 1)
    alpha, beta = at(1 - BETAS, t), at(BETAS, t)
    var = 1 / (1 / (1 - abar_prev) + alpha / beta)
    mean = var * (abar_prev.sqrt() * x0.double() / (1 - abar_prev) + alpha.sqrt() * xt.double() / beta)
    got_mean, got_var, got_logvar = d.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(got_mean.double(), mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_var.double(), var.expand_as(got_var), atol=1e-9, rtol=1e-5)
    torch.testing.assert_close(got_logvar.double(), var.log().expand_as(got_var), atol=1e-6, rtol=1e-5)
    # The textbook coefficients (Ho et al. eq. 7).
    want = (abar_prev.sqrt() * beta / (1 - at(ABAR, t))) * x0.double() + (
        alpha.sqrt() * (1 - abar_prev) / (1 - at(ABAR, t))
    ) * xt.double()
    torch.testing.assert_close(got_mean.double(), want, atol=1e-6, rtol=1e-5)


def test_posterior_at_t0_is_clipped() -> None:
    d = create_diffusion("")
    x0, xt = randn(1, 1, 2, 2, seed=0), randn(1, 1, 2, 2, seed=1)
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, torch.tensor([0]))
    torch.testing.assert_close(mean, x0)  # abar_{-1} = 1: the posterior mean is x_0
    assert (var == 0).all()
    torch.testing.assert_close(logvar, torch.full_like(logvar, math.log(BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1]))))


def test_normal_kl_matches_torch_distributions() -> None:
    m1, m2 = randn(50, seed=0), randn(50, seed=1)
    lv1, lv2 = randn(50, seed=2), randn(50, seed=3)
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), want, atol=1e-5, rtol=1e-5)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-6


def test_discretized_decoder_nll_bins() -> None:
    """256 bins of width 2/255 on [-1, 1], open-ended at both edges: the edge bins take the
    tails, interior bins CDF differences, and the probabilities of all bins sum to one."""
    bins = torch.linspace(-1, 1, 256)
    mean = torch.tensor(0.3)
    log_scale = torch.tensor(math.log(0.6))
    ll = discretized_gaussian_log_likelihood(bins, mean.expand(256), log_scale.expand(256))
    sigma = math.exp(log_scale.item())

    def cdf(v: float) -> float:
        return approx_standard_normal_cdf(torch.tensor(v, dtype=torch.float64)).item()

    lo = math.log(cdf((-1 - 0.3 + 1 / 255) / sigma))  # P(x <= -1 + 1/255)
    hi = math.log(1 - cdf((1 - 0.3 - 1 / 255) / sigma))  # P(x >= 1 - 1/255)
    mid = math.log(cdf((bins[128].item() - 0.3 + 1 / 255) / sigma) - cdf((bins[128].item() - 0.3 - 1 / 255) / sigma))
    assert ll[0].item() == pytest.approx(lo, rel=1e-4)
    assert ll[-1].item() == pytest.approx(hi, rel=1e-4)
    assert ll[128].item() == pytest.approx(mid, rel=1e-4)
    assert ll.double().exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    # The tanh approximation is close to the true normal CDF.
    grid = torch.linspace(-4, 4, 81)
    assert (approx_standard_normal_cdf(grid) - torch.distributions.Normal(0, 1).cdf(grid)).abs().max() < 1e-3


def test_vb_terms_kl_and_decoder_nll() -> None:
    d = create_diffusion("")
    x0 = torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    xt = randn(3, 2, 4, 4, seed=1)
    output = torch.cat([randn(3, 2, 4, 4, seed=2), torch.tanh(randn(3, 2, 4, 4, seed=3))], dim=1)
    t = torch.tensor([0, 5, 700])
    vb = d.vb_terms_bpd(output, x0, xt, t)
    true_mean, _, true_logvar = d.q_posterior_mean_variance(x0, xt, t)
    p = d.p_mean_variance_from_output(output, xt, t)
    kl = normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"]).mean(dim=(1, 2, 3)) / math.log(2)
    nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]).mean(dim=(1, 2, 3))
    torch.testing.assert_close(vb[0], nll[0] / math.log(2))
    torch.testing.assert_close(vb[1:], kl[1:])


def test_learned_range_variance() -> None:
    d = create_diffusion("")
    xt = randn(2, 1, 2, 2, seed=0)
    t = torch.tensor([10, 600])
    for v, want_log in ((1.0, BETAS.log()), (-1.0, None)):
        out = torch.cat([torch.zeros_like(xt), torch.full_like(xt, v)], dim=1)
        p = d.p_mean_variance_from_output(out, xt, t)
        if want_log is None:  # v = -1: the posterior variance beta_tilde
            want_log = (BETAS * torch.cat([torch.ones(1, dtype=torch.float64), 1 - ABAR[:-1]]) / (1 - ABAR)).log()
        torch.testing.assert_close(p["log_variance"].double(), at(want_log, t).expand_as(xt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [0, 10, 50, 100, 200, 300, 500, 999])
def test_min_snr_weight(t: int) -> None:
    d = create_diffusion("")
    snr = (ABAR[t] / (1 - ABAR[t])).item()
    want = min(snr, 5.0) / snr
    got = d.min_snr_weight(torch.tensor([t])).item()
    assert got == pytest.approx(want, rel=1e-5)
    assert (got < 1) == (snr > 5)


def test_training_losses_terms_and_stop_gradient() -> None:
    d = create_diffusion("")
    a = torch.tensor(0.3, requires_grad=True)  # drives eps only
    b = torch.tensor(0.2, requires_grad=True)  # drives the variance only

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([a * x, torch.tanh(b * x)], dim=1)

    x0 = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = randn(4, 2, 4, 4, seed=1)
    t = torch.tensor([0, 20, 400, 999])
    out = d.training_losses(model, x0, t, {}, noise)
    assert {"mse", "vb", "loss"} <= set(out)
    xt = d.q_sample(x0, t, noise)
    raw = ((noise - a.detach() * xt) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["mse"], d.min_snr_weight(t) * raw)  # Min-SNR on the mse only
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])
    out["vb"].sum().backward()
    assert a.grad is None or a.grad == 0  # stop-gradient: L_vb does not train the mean
    assert b.grad is not None and b.grad != 0


def test_respacing_250_of_1000() -> None:
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert all(b > a for a, b in zip(steps, steps[1:]))
    assert all(abs(s - i * 999 / 249) <= 0.5 for i, s in enumerate(steps))  # evenly spaced, rounded
    d = create_diffusion("250")
    assert isinstance(d, SpacedDiffusion) and d.num_timesteps == 250
    assert d.timestep_map.tolist() == steps
    torch.testing.assert_close(d.alphas_cumprod, ABAR[steps])  # the original abar at the kept steps


def adm_space_timesteps(num_timesteps: int, section_counts: list[int]) -> set[int]:
    """ADM's / the release's ``space_timesteps`` (guided_diffusion/respace.py), verbatim logic."""
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def test_respacing_matches_release_rounding() -> None:
    for count in range(1, 1001):
        assert space_timesteps(1000, str(count)) == sorted(adm_space_timesteps(1000, [count])), count
    for sections in ([10, 20, 30], [100, 50], [7, 1, 13, 2]):
        text = ",".join(map(str, sections))
        assert space_timesteps(1000, text) == sorted(adm_space_timesteps(1000, sections)), text


def test_respacing_ddim50() -> None:
    steps = space_timesteps(1000, "ddim50")
    assert steps == list(range(0, 1000, 20))
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim600")  # no integer stride gives 600 steps


def test_respaced_model_sees_original_timesteps() -> None:
    d = create_diffusion("250")
    seen: list = []
    xt = randn(3, 1, 2, 2, seed=0)
    d.p_mean_variance(recording_model(seen), xt, torch.tensor([0, 100, 249]))
    assert seen[0].tolist() == [0, d.timestep_map[100].item(), 999]
    assert d.model_timesteps(torch.tensor([249])).item() == 999


def test_ddim_step_closed_form() -> None:
    d = create_diffusion("ddim50")
    seen: list = []
    model = recording_model(seen)
    x = randn(2, 1, 3, 3, seed=0)
    i = torch.tensor([10, 10])  # respaced index 10 = original 200, previous kept step 180
    orig, prev = 200, 180
    eps = 0.1 * x.double() + orig / 1000
    x0 = (x.double() - math.sqrt(1 - ABAR[orig]) * eps) / math.sqrt(ABAR[orig])
    want = math.sqrt(ABAR[prev]) * x0 + math.sqrt(1 - ABAR[prev]) * eps
    got = d.ddim_sample(model, x, i)
    assert seen[-1].tolist() == [orig, orig]
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # eta = 1 with given noise (Song et al. eq. 16)
    noise = randn(2, 1, 3, 3, seed=1)
    sigma = math.sqrt((1 - ABAR[prev]) / (1 - ABAR[orig])) * math.sqrt(1 - ABAR[orig] / ABAR[prev])
    want = math.sqrt(ABAR[prev]) * x0 + math.sqrt(1 - ABAR[prev] - sigma**2) * eps + sigma * noise.double()
    got = d.ddim_sample(model, x, i, noise=noise, eta=1.0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # The last step returns the predicted x_0.
    got = d.ddim_sample(model, x, torch.tensor([0, 0]))
    eps0 = 0.1 * x.double()  # the model sees t = 0
    x0_last = (x.double() - math.sqrt(1 - ABAR[0]) * eps0) / math.sqrt(ABAR[0])
    torch.testing.assert_close(got.double(), x0_last, atol=1e-5, rtol=1e-5)


def test_ancestral_step() -> None:
    d = create_diffusion("")
    x, noise = randn(2, 1, 3, 3, seed=0), randn(2, 1, 3, 3, seed=1)
    model = recording_model([])
    t = torch.tensor([0, 500])
    p = d.p_mean_variance(model, x, t)
    got = d.p_sample(model, x, t, noise)
    torch.testing.assert_close(got[0], p["mean"][0])  # no noise at t = 0
    torch.testing.assert_close(got[1], p["mean"][1] + (0.5 * p["log_variance"][1]).exp() * noise[1])


@pytest.mark.parametrize("respacing,loop", [("10", "p_sample_loop"), ("ddim10", "ddim_sample_loop")])
def test_sample_loops_walk_original_timesteps(respacing: str, loop: str) -> None:
    d = create_diffusion(respacing)
    seen: list = []
    noise = randn(2, 1, 4, 4, seed=0)
    out = getattr(d, loop)(recording_model(seen), (2, 1, 4, 4), noise=noise)
    assert out.shape == (2, 1, 4, 4) and torch.isfinite(out).all()
    assert [s[0].item() for s in seen] == d.timestep_map.flip(0).tolist()
    assert seen[0][0].item() == (999 if respacing == "10" else 900) and seen[-1][0].item() == 0
    again = getattr(d, loop)(recording_model([]), (2, 1, 4, 4), noise=noise, noise_fn=lambda x: torch.zeros_like(x))
    assert torch.isfinite(again).all()


# ----------------------------------------------------------------------------- MDTv2 objective
def test_mdtv2_loss_sums_full_and_masked() -> None:
    torch.manual_seed(0)
    model = build_model("MDTv2-Tiny/2")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.eval()  # no label dropout; the masking noise comes from the objective's generator
    diffusion = create_diffusion("")
    x0 = randn(3, 4, 8, 8, seed=1)
    y = torch.tensor([1, 2, 3])

    objective = MDTv2Loss(diffusion, mask_ratio=0.3)
    loss, terms = objective(model, x0, y, generator=torch.Generator().manual_seed(9), host_rng=random.Random(4))
    assert set(terms) == {"loss", "mse", "vb", "m_mse", "m_vb"}

    # Replay the same draws by hand: t, the full pass's noise (the model draws from the same
    # generator), the masked pass's noise, then the masked pass with a host-drawn float ratio.
    gen = torch.Generator().manual_seed(9)
    ratio = 0.3 + 0.2 * random.Random(4).random()
    with torch.no_grad():
        t = torch.randint(0, T, (3,), generator=gen)
        full = diffusion.training_losses(model, x0, t, {"y": y, "generator": gen}, torch.randn(x0.shape, generator=gen))
        masked = diffusion.training_losses(
            model, x0, t, {"y": y, "enable_mask": True, "generator": gen, "mask_ratio": ratio},
            torch.randn(x0.shape, generator=gen),
        )
    torch.testing.assert_close(loss.detach(), full["loss"].mean() + masked["loss"].mean())
    torch.testing.assert_close(terms["loss"], loss.detach())
    torch.testing.assert_close(terms["mse"], full["mse"].mean())
    torch.testing.assert_close(terms["vb"], full["vb"].mean())
    torch.testing.assert_close(terms["m_mse"], masked["mse"].mean())
    torch.testing.assert_close(terms["m_vb"], masked["vb"].mean())
    assert not any(v.requires_grad for v in terms.values())

    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["sideblocks.0.attn.qkv.weight"].abs().sum() > 0  # the masked pass trains the side block
    assert grads["mask_token"].abs().sum() > 0


def test_mdtv2_loss_passes_a_host_float_ratio_and_the_generator() -> None:
    """The masked pass gets a Python float in [lo, lo + 0.2) (the release's interval) and the
    device generator; t and both noises come from that generator, none from the global one."""
    calls: list[dict] = []

    def model(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        calls.append(kwargs)
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x)], dim=1)

    objective = MDTv2Loss(create_diffusion(""), mask_ratio=0.3)
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(2)
    ratios = []
    for _ in range(200):
        calls.clear()
        objective(model, randn(2, 1, 4, 4), torch.tensor([0, 1]), generator=gen, host_rng=rng)
        full, masked = calls
        assert full["generator"] is gen and "mask_ratio" not in full and not full.get("enable_mask")
        assert masked["generator"] is gen and masked["enable_mask"] and type(masked["mask_ratio"]) is float
        ratios.append(masked["mask_ratio"])
    assert 0.3 <= min(ratios) < 0.32 and 0.48 < max(ratios) < 0.5
    # Same generator state -> same draws; the global generator plays no part.
    state = torch.random.get_rng_state()
    one = objective(model, randn(2, 1, 4, 4), torch.tensor([0, 1]), torch.Generator().manual_seed(5), random.Random(0))
    torch.manual_seed(123)
    two = objective(model, randn(2, 1, 4, 4), torch.tensor([0, 1]), torch.Generator().manual_seed(5), random.Random(0))
    torch.random.set_rng_state(state)
    assert torch.equal(one[0], two[0])


def test_schedules_are_cast_once_per_device_and_match_release_extract() -> None:
    """Gathering from the cached float32 table equals ADM's gather-in-float64-then-cast, for
    every schedule, and the table is made once (same tensor object on the next call)."""
    from mdt_ds.diffusion.gaussian import SCHEDULES, extract

    d = create_diffusion("")
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    for name in SCHEDULES:
        assert torch.equal(d.at(name, t, (6, 2, 3, 3)), extract(getattr(d, name), t, (6, 2, 3, 3))), name
    first = d.table("sqrt_alphas_cumprod", "cpu")
    assert first.dtype == torch.float32 and d.table("sqrt_alphas_cumprod", torch.device("cpu")) is first
    assert d.to("cpu") is d and len(d._tables) == len(SCHEDULES)
    spaced = create_diffusion("ddim50")
    steps = torch.arange(50)
    assert spaced.model_timesteps(steps) is not None and spaced._tables[("timestep_map", steps.device)] is not None
    torch.testing.assert_close(spaced.model_timesteps(steps), spaced.timestep_map, rtol=0, atol=0)


def test_training_step_maths_copies_no_schedule() -> None:
    """A training-loss call reads only cached tables: no float64 tensor is created or copied
    (that would be a host-to-device copy per call on a GPU), and no host sync happens."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mdt_ds.syncs import count_host_syncs

    class Float64Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                self.ops.append(str(func))
            return out

    d = create_diffusion("").to("cpu")
    x0, t = randn(4, 2, 4, 4), torch.tensor([0, 3, 500, 999])
    with Float64Ops() as seen, count_host_syncs() as syncs:
        d.training_losses(recording_model([]), x0, t, noise=randn(4, 2, 4, 4, seed=2))
    assert seen.ops == [] and syncs.count == 0


def test_mdtv2_loss_without_masked_pass() -> None:
    model = build_model("MDTv2-Tiny/2")
    loss, terms = MDTv2Loss(create_diffusion(""), masked_pass=False)(
        model, randn(2, 4, 8, 8), torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0)
    )
    assert set(terms) == {"loss", "mse", "vb"} and torch.isfinite(loss)
