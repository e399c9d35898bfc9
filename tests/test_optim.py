"""Optimisers: the fewer-pass Adan against timm's (which matches the official code to 1e-7), and
the fused-AdamW decision."""

from __future__ import annotations

import pytest
import torch
from timm.optim import Adan as TimmAdan

from mdt_ds.config import OptimConfig
from mdt_ds.optim import Adan, adamw_kwargs, build_optimizer

SHAPES = {"few": [(64, 32), (32,), (5, 3, 3)], "many": [(7, 5)] * 20}  # flat-partition path / foreach path


def _params(shapes: list[tuple[int, ...]]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _run(cls: type, shapes: list[tuple[int, ...]], steps: int, **kw) -> tuple[list[torch.Tensor], dict]:
    params = _params(shapes)
    opt = cls(params, lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, foreach=True, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:  # gradients that change sign and scale from step to step
            p.grad = torch.randn(p.shape, generator=gen) * (1 + p.detach())
        opt.step()
    return [p.detach().clone() for p in params], opt.state_dict()


@pytest.mark.parametrize("layout", sorted(SHAPES))
@pytest.mark.parametrize("weight_decay,no_prox", [(0.0, False), (0.05, False), (0.05, True)])
def test_adan_matches_timm_over_8_steps(layout: str, weight_decay: float, no_prox: bool) -> None:
    ours, ours_state = _run(Adan, SHAPES[layout], 8, weight_decay=weight_decay, no_prox=no_prox)
    ref, ref_state = _run(TimmAdan, SHAPES[layout], 8, weight_decay=weight_decay, no_prox=no_prox)
    moved = max((a - b).abs().max().item() for a, b in zip(ours, _params(SHAPES[layout])))
    assert moved > 1e-2  # the parameters really moved
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"):  # same state layout
        for i in ref_state["state"]:
            torch.testing.assert_close(ours_state["state"][i][key], ref_state["state"][i][key], rtol=1e-5, atol=1e-7)


def test_adan_resumes_from_a_timm_checkpoint() -> None:
    _, state = _run(TimmAdan, SHAPES["few"], 3)
    params = _params(SHAPES["few"])
    opt = Adan(params, lr=1e-2, foreach=True)
    opt.load_state_dict(state)
    assert opt.param_groups[0]["step"] == 3 and set(opt.state[params[0]]) == set(state["state"][0])


def test_adamw_is_fused_only_on_cuda() -> None:
    assert adamw_kwargs(torch.device("cuda", 0)) == {"fused": True}
    assert adamw_kwargs(torch.device("cpu")) == {"foreach": True}
    opt = build_optimizer(torch.nn.Linear(4, 2).parameters(), OptimConfig(name="adamw", betas=[0.9, 0.999]))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["fused"] in (None, False) and opt.defaults["foreach"] is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW needs CUDA parameters (device check)")
def test_adamw_on_cuda_params_is_fused() -> None:
    opt = build_optimizer(torch.nn.Linear(4, 2).cuda().parameters(), OptimConfig(name="adamw", betas=[0.9, 0.999]))
    assert opt.defaults["fused"] is True
