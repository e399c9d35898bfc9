"""Optimisers: the fewer-pass and the fused (compiled, one-pass) Adan against timm's (which
matches the official code to 1e-7), the fused-Adan wiring through the engine, and the
fused-AdamW decision."""

from __future__ import annotations

import functools
import json
import subprocess

import pytest
import torch
from timm.optim import Adan as TimmAdan
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from mdt_ds import optim
from mdt_ds.config import ConfigError, OptimConfig, TrainConfig, apply_overrides
from mdt_ds.optim import Adan, adamw_kwargs, build_optimizer
from tests.conftest import PYTHON, REPO, TINY_RUN, subprocess_env

SHAPES = {"few": [(64, 32), (32,), (5, 3, 3)], "many": [(7, 5)] * 20}  # flat-partition path / foreach path


def _params(shapes: list[tuple[int, ...]]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _run(cls: type | functools.partial, shapes: list[tuple[int, ...]], steps: int, **kw) -> tuple[list[torch.Tensor], dict]:
    params = _params(shapes)
    opt = cls(params, lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, foreach=True, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:  # gradients that change sign and scale from step to step
            p.grad = torch.randn(p.shape, generator=gen) * (1 + p.detach())
        opt.step()
    return [p.detach().clone() for p in params], opt.state_dict()


@pytest.mark.parametrize("fused", [False, True], ids=["multi_tensor", "fused"])
@pytest.mark.parametrize("layout", sorted(SHAPES))
@pytest.mark.parametrize("weight_decay,no_prox", [(0.0, False), (0.05, False), (0.05, True)])
def test_adan_matches_timm_over_8_steps(layout: str, weight_decay: float, no_prox: bool, fused: bool) -> None:
    ours, ours_state = _run(functools.partial(Adan, fused=fused), SHAPES[layout], 8, weight_decay=weight_decay,
                            no_prox=no_prox)
    ref, ref_state = _run(TimmAdan, SHAPES[layout], 8, weight_decay=weight_decay, no_prox=no_prox)
    moved = max((a - b).abs().max().item() for a, b in zip(ours, _params(SHAPES[layout])))
    assert moved > 1e-2  # the parameters really moved
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # The compiled kernel contracts multiply-adds (FMA): moments built from d = g - g_prev, a
    # difference of O(1) numbers, then differ from eager by an ulp of g, up to ~3e-7 here.
    state_atol = 1e-6 if fused else 1e-7
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"):  # same state layout
        for i in ref_state["state"]:
            torch.testing.assert_close(ours_state["state"][i][key], ref_state["state"][i][key], rtol=1e-5,
                                       atol=state_atol)


def test_fused_adan_compiles_once_for_every_step_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """lr and the bias corrections change every step and partitions differ in size between
    ranks: all are kernel arguments of one graph, never a recompile."""
    calls: list[int] = []
    inner = optim._adan_fused
    monkeypatch.setattr(optim, "_adan_fused", lambda *a, **k: calls.append(len(a[0])) or inner(*a, **k))
    def compiled_entries() -> int:
        return len(_debug_get_cache_entry_list(optim._adan_fused_update_.__code__))

    _run(functools.partial(Adan, fused=True), [(300,)], 2)  # 1-D tensors, as ZeRO's flat partitions
    entries = compiled_entries()
    _, state = _run(functools.partial(Adan, fused=True), [(1000,), (77,)], 6, weight_decay=0.05)
    # compiled (no silent eager fallback), and not again for other sizes, scalars or steps
    assert entries >= 1 and compiled_entries() == entries
    assert calls == [1] * 2 + [2] * 6 and state["param_groups"][0]["step"] == 6


def test_fused_adan_is_chosen_by_config() -> None:
    params = torch.nn.Linear(4, 2).parameters

    def fused(compiled_run: bool, **kw: object) -> bool:
        return build_optimizer(params(), OptimConfig(**kw), compiled_run=compiled_run).fused

    assert fused(True) and not fused(False)  # auto: with compile=true
    assert fused(False, fused=True) and not fused(True, fused=False)
    assert apply_overrides(TrainConfig(), ["optim.fused=true"]).optim.fused is True
    with pytest.raises(ConfigError, match="optim.fused"):
        OptimConfig(name="adamw", betas=[0.9, 0.999], fused=True)
    with pytest.raises(ConfigError, match="expected bool or one of 'auto'"):  # names every allowed value
        apply_overrides(TrainConfig(), ["optim.fused=yes"])


# In a child process: DeepSpeed keeps its process groups in module globals, and a second
# in-process engine after this one's teardown would find them stale (test_safe_load's does).
ENGINE_SCRIPT = """
import json, sys, torch
from mdt_ds import dist, engine as engine_module, optim
from mdt_ds.config import TrainConfig, apply_overrides

calls = []
inner = optim._adan_fused
optim._adan_fused = lambda *a, **k: calls.append(len(a[0])) or inner(*a, **k)
engine_module.compile_blocks = lambda model: 0  # compile=true only to select optim.fused=auto
dist.init(use_deepspeed=True)

def weights(overrides, steps):
    torch.manual_seed(0)
    engine, _ = engine_module.build_engine(apply_overrides(TrainConfig(), json.loads(sys.argv[1]) + overrides), 1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 1, 16, 16, generator=gen)
        out = engine(x, torch.randint(0, 1000, (8,), generator=gen), torch.randint(0, 10, (8,), generator=gen))
        engine.backward((out - 1).square().mean())  # adaLN-Zero: the output starts at 0
        engine.step()
    return torch.cat([p.detach().flatten() for p in engine.module.parameters()])

start = weights(["optim.fused=false"], 0)
plain = weights(["optim.fused=false"], 3)
plain_calls = list(calls)
fused = weights(["compile=true"], 3)
dist.teardown()
print(json.dumps({"plain_calls": plain_calls, "fused_calls": calls[len(plain_calls):],
                  "trained": float((plain - start).abs().max()), "max_diff": float((fused - plain).abs().max())}))
"""


def test_engine_runs_the_fused_update_on_its_flat_partition() -> None:
    overrides = json.dumps([*TINY_RUN, "precision=fp32", "zero_stage=2"])
    proc = subprocess.run([PYTHON, "-c", ENGINE_SCRIPT, overrides], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["plain_calls"] == []  # optim.fused=false: the multi-tensor update
    assert r["fused_calls"] == [1, 1, 1]  # auto with compile=true: ZeRO-2's one flat fp32 partition per step
    assert r["trained"] > 1e-3 and r["max_diff"] <= 1e-6  # the same weights after 3 steps


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
