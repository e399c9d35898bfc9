"""Regional torch.compile (one compiled function shared by every block) and the engine's model
preparation: activation checkpointing, then compile, then the move to the accelerator.

The compiled test runs the Tiny preset only; inductor's cache (default location) makes reruns
fast. A cold first run compiles about ten small graphs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from mdt_ds import engine as engine_mod
from mdt_ds.config import ConfigError, TrainConfig, apply_overrides
from mdt_ds.models import build_model
from mdt_ds.models.checkpointing import apply_activation_checkpointing
from mdt_ds.models.compile import compile_blocks
from mdt_ds.models.mdt import MDTv2

pytestmark = pytest.mark.core

# Six mask ratios giving six different kept lengths K of Tiny's 16 tokens: 11, 10, 8, 7, 6, 4.
RATIOS = (0.3, 0.35, 0.45, 0.55, 0.62, 0.7)
AC_BLOCKS = [0, 3]  # en_inblocks.0 and de_blocks.0 checkpointed, the other blocks not


def tiny_pair() -> tuple[MDTv2, MDTv2]:
    torch.manual_seed(0)
    eager = build_model("MDTv2-Tiny/2").train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in eager.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        apply_activation_checkpointing(model, AC_BLOCKS)
    assert compile_blocks(compiled) == len(compiled.blocks())
    return eager, compiled


def step(model: MDTv2, ratio: float, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    t, y = torch.randint(0, 1000, (3,), generator=gen), torch.randint(0, 10, (3,), generator=gen)
    model.zero_grad(set_to_none=True)
    full = model(x, t, y, generator=gen)
    masked = model(x, t, y, enable_mask=True, mask_ratio=ratio, generator=gen)
    loss = full.square().mean() + masked.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def compiled_run():
    eager, compiled = tiny_pair()
    base = counters["stats"]["unique_graphs"]  # process-wide: count the differences
    graphs, results = [], []
    for i, ratio in enumerate(RATIOS):
        results.append((step(eager, ratio, i), step(compiled, ratio, i)))
        graphs.append(counters["stats"]["unique_graphs"] - base)
    return eager, compiled, results, graphs


def test_compiled_blocks_equal_eager_with_and_without_checkpointing(compiled_run) -> None:
    eager, compiled, results, _ = compiled_run
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for (loss_e, grads_e), (loss_c, grads_c) in results:
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-5, msg=name)


def test_varying_kept_length_does_not_recompile(compiled_run) -> None:
    """The token dimension is dynamic in the masked pass: after the first step no K adds a
    graph. The first step compiles one graph per (skip or not, masked or full, checkpointed or
    not, aliased inputs or not) combination the model runs: bounded, not per step."""
    _, _, _, graphs = compiled_run
    assert len({int(16 * (1 - r)) for r in RATIOS}) == 6
    assert graphs == [graphs[0]] * len(RATIOS), graphs  # no graph after the first step
    # Tiny with blocks 0 and 3 checkpointed runs 7 block variants over both passes.
    assert 0 < graphs[0] <= 8, graphs


def test_compiled_model_deepcopies_with_its_own_weights(compiled_run) -> None:
    _, compiled, _, _ = compiled_run
    ema = copy.deepcopy(compiled)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(1.5)
    plain = build_model("MDTv2-Tiny/2").train()
    plain.load_state_dict(ema.state_dict())
    torch.testing.assert_close(step(ema, 0.4, 7)[0], step(plain, 0.4, 7)[0], atol=1e-5, rtol=1e-5)


def config(**overrides: object) -> TrainConfig:
    items = {"model.preset": "MDTv2-Tiny/2", "global_batch": 2, **overrides}
    return apply_overrides(TrainConfig(), [f"{k}={v}" for k, v in items.items()])


def test_prepare_model_checkpoints_compiles_and_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    class Meta:  # stands in for a CUDA accelerator: the model must land on its device
        def current_device_name(self) -> str:
            return "meta"

    monkeypatch.setattr(engine_mod, "get_accelerator", Meta)
    model = engine_mod.prepare_model(config(activation_checkpointing="2", compile="true"))
    blocks = model.blocks()
    assert [getattr(b, "_mdt_checkpointed", False) for b in blocks] == [True, True] + [False] * (len(blocks) - 2)
    assert all(getattr(b, "_mdt_compiled", False) for b in blocks)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    plain = engine_mod.prepare_model(config(), device=torch.device("cpu"))
    assert not any(getattr(b, "_mdt_compiled", False) for b in plain.blocks())
    with pytest.raises(ConfigError, match="flex.*CPU"):
        engine_mod.prepare_model(config(**{"model.attention": "flex"}), device=torch.device("cpu"))


class GraphCapture:
    """A torch.compile backend that keeps the graphs dynamo hands it and runs them as traced
    (no inductor: fast), so tests can read what ends up inside a compiled region."""

    def __init__(self) -> None:
        self.targets: list[set[object]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.targets.append({node.target for node in gm.graph.nodes})
        return gm.forward


def test_compiled_gelu_is_the_sigmoid_form_of_the_same_function() -> None:
    """Inside a compiled region GELU(tanh) is x * sigmoid(2c(x + 0.044715 x^3)): inductor's CPU
    tanh is slow. Same values and gradients as aten's kernel; eager keeps aten's kernel."""
    import torch.nn.functional as F

    from mdt_ds.models.layers import gelu_tanh

    capture = GraphCapture()
    compiled = torch.compile(gelu_tanh, backend=capture, fullgraph=True)
    x = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4).requires_grad_(True)
    got = compiled(x)
    assert torch.sigmoid in capture.targets[0] and F.gelu not in capture.targets[0]
    want = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-6)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    (g_want,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


def test_cpu_compiled_blocks_take_the_gathered_bias_as_an_input() -> None:
    """On CPU the relative position bias is gathered eagerly and enters each compiled block as
    an input: fused into the softmax, inductor's C++ gather was a scalar indirect load per score
    (a 2x slower kernel at S/2). The outputs stay the eager model's."""
    eager, _ = tiny_pair()
    compiled = copy.deepcopy(eager).eval()
    eager.eval()
    capture = GraphCapture()
    compile_blocks(compiled, backend=capture)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 2])
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    for kwargs in ({}, {"enable_mask": True, "mask_ratio": 0.4, "mask_noise": noise}):
        torch.testing.assert_close(compiled(x, t, y, **kwargs), eager(x, t, y, **kwargs), atol=1e-5, rtol=1e-5)
    assert capture.targets, "nothing was compiled"
    assert all(torch.gather not in graph for graph in capture.targets)
