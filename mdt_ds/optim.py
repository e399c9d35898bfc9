"""Optimisers: Adan (faithful to Xie et al. 2022 / the official code; timm's implementation with
a multi-tensor update that makes fewer passes over memory, or one fused compiled kernel) and
AdamW (fused on CUDA), and the LR schedule (constant, with an optional linear warm-up)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.optim import Adan as TimmAdan

from mdt_ds.config import OptimConfig


def _adan_multi_tensor(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    n: list[torch.Tensor],
    neg_prev: list[torch.Tensor],
    *,
    betas: tuple[float, float, float],
    step: int,
    lr: float,
    eps: float,
    weight_decay: float,
    no_prox: bool,
) -> None:
    """The official Adan update (Xie et al. 2022, Algorithm 1; github.com/sail-sg/Adan) in 11-13
    multi-tensor passes instead of timm's 16, and with no allocation: lerp for the moving averages,
    bias corrections folded into the step sizes, no weight-decay pass when weight_decay is 0, and
    ``neg_prev`` (dead once n is updated) reused for sqrt(n) before it takes -g. The step is
    memory-bound, so passes and fresh buffers (page faults on a CPU) are its cost. State layout as
    timm's (``neg_pre_grad`` = -g_prev), so checkpoints interchange."""
    b1, b2, b3 = betas
    bc1, bc2, bc3_sqrt = 1 - b1**step, 1 - b2**step, math.sqrt(1 - b3**step)
    # ZeRO-1/2 hand over one flat partition per group: per-tensor ops with out= cost nothing
    # there; many small tensors (ZeRO-0) keep to multi-tensor kernels.
    few = len(params) <= 16
    torch._foreach_add_(neg_prev, grads)  # d = g - g_prev (0 at step 1, where g_prev := g)
    torch._foreach_lerp_(m, grads, 1 - b1)  # m = b1 m + (1 - b1) g
    torch._foreach_lerp_(v, neg_prev, 1 - b2)  # v = b2 v + (1 - b2) d
    # w / (1 + b2) = lerp(d, g, 1 / (1 + b2)) with w = g + b2 d; the factor returns squared below.
    torch._foreach_lerp_(neg_prev, grads, 1 / (1 + b2))
    torch._foreach_mul_(n, b3)
    torch._foreach_addcmul_(n, neg_prev, neg_prev, value=(1 - b3) * (1 + b2) ** 2)  # n = b3 n + (1-b3) w^2
    # u = (m / bc1 + b2 v / bc2) / (sqrt(n) / bc3_sqrt + eps): multiply through by bc3_sqrt.
    denom = neg_prev
    _apply_into(denom, n, torch.sqrt, torch._foreach_sqrt_, few)
    torch._foreach_add_(denom, eps * bc3_sqrt)
    if no_prox and weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(params, m, denom, value=-lr * bc3_sqrt / bc1)
    torch._foreach_addcdiv_(params, v, denom, value=-lr * b2 * bc3_sqrt / bc2)
    if not no_prox and weight_decay:
        torch._foreach_div_(params, 1 + lr * weight_decay)  # proximal: p = (p - lr u) / (1 + lr wd)
    _apply_into(neg_prev, grads, torch.neg, torch._foreach_neg_, few)


def _adan_fused_update_(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, n: torch.Tensor, neg_prev: torch.Tensor,
    b1: float, b2: float, b3: float, lr: float, eps: float, bc1: float, bc2: float, bc3_sqrt: float,
    decay_mul: float, decay_div: float,
) -> None:
    """The same Adan step as :func:`_adan_multi_tensor` on one tensor, written elementwise so that
    ``torch.compile`` makes it ONE pass over memory (read p, g, m, v, n, -g_prev; write all but g):
    11 tensor passes against the multi-tensor update's 31. ``decay_mul`` is ``1 - lr wd`` for
    decoupled decay (no_prox), ``decay_div`` is ``1 + lr wd`` for the proximal form; else 1."""
    d = g + neg_prev  # g - g_prev
    m.lerp_(g, 1 - b1)
    v.lerp_(d, 1 - b2)
    w = g + b2 * d
    n.mul_(b3).addcmul_(w, w, value=1 - b3)
    # (m / bc1 + b2 v / bc2) / (sqrt(n) / bc3_sqrt + eps), multiplied through by bc3_sqrt
    update = (m * (lr * bc3_sqrt / bc1) + v * (lr * b2 * bc3_sqrt / bc2)) / (n.sqrt() + eps * bc3_sqrt)
    p.mul_(decay_mul).sub_(update).div_(decay_div)
    neg_prev.copy_(g.neg())


@functools.lru_cache(maxsize=1)
def _compiled_update() -> Callable[..., None]:
    """:func:`_adan_fused_update_` compiled once per process, on first use. dynamic=True: one
    graph for every partition size (ranks differ), and the scalars (lr, bias corrections: new
    every step) are kernel arguments, not recompile triggers. Not fullgraph: under a
    TorchDispatchMode (the benchmark's host-sync counter) dynamo cannot trace, and the same
    update then runs eagerly instead of raising."""
    return torch.compile(_adan_fused_update_, dynamic=True)


def _adan_fused(
    *state: list[torch.Tensor], betas: tuple[float, float, float], step: int, lr: float, eps: float,
    weight_decay: float, no_prox: bool,
) -> None:
    """:func:`_adan_fused_update_` over each (flat) tensor, compiled. ``state``:
    the lists of :func:`_adan_multi_tensor` (params, grads, m, v, n, neg_prev), same keywords."""
    b1, b2, b3 = betas
    decay_mul = 1 - lr * weight_decay if no_prox else 1.0
    decay_div = 1.0 if no_prox else 1 + lr * weight_decay
    scalars = (b1, b2, b3, lr, eps, 1 - b1**step, 1 - b2**step, math.sqrt(1 - b3**step), decay_mul, decay_div)
    for tensors in zip(*state):
        # Flat views: dynamo keeps a parameter's shape static (a recompile per partition size);
        # a view is a plain tensor, and the update writes through it. (A view of a 2-D or 4-D
        # parameter, ZeRO-0's few-tensor case, adds one graph per rank of its base.)
        _compiled_update()(*(t.view(-1) for t in tensors), *scalars)


def _apply_into(dst: list[torch.Tensor], src: list[torch.Tensor], op, foreach_op_, few: bool) -> None:
    """``dst[i] = op(src[i])`` with no allocation: per-tensor ``out=`` for a few (flat ZeRO)
    tensors, else copy then the in-place multi-tensor op."""
    if few:
        for s, d in zip(src, dst):
            op(s, out=d)
    else:
        torch._foreach_copy_(dst, src)
        foreach_op_(dst)


# Up to this many tensors per group the fused update runs tensor by tensor (ZeRO-1/2/3 hand over
# one flat partition per group); more (ZeRO-0: every parameter) keep the multi-tensor kernels.
FUSED_MAX_TENSORS = 16


class Adan(TimmAdan):
    """``timm.optim.Adan`` (official betas, ``no_prox``, state and checkpoint layout) with
    ``_adan_multi_tensor`` as its update, or with ``fused=True`` the compiled one-pass
    ``_adan_fused_update_`` for groups of flat partitions; both match timm's foreach update to
    1e-6 over 8 steps (tests/test_optim.py). ``caution`` (not part of the published algorithm)
    is timm's own path."""

    def __init__(self, params: Any, *args: Any, fused: bool = False, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self.fused = fused

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if any(group.get("caution", False) for group in self.param_groups):  # timm < 1.0.12 has no caution
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            lists: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                        state[key] = torch.zeros_like(p)
                if "neg_pre_grad" not in state or group["step"] == 1:
                    state["neg_pre_grad"] = -p.grad.clone()
                for out, t in zip(
                    lists,
                    (p, p.grad, state["exp_avg"], state["exp_avg_diff"], state["exp_avg_sq"], state["neg_pre_grad"]),
                ):
                    out.append(t)
            if lists[0]:
                fuse = self.fused and len(lists[0]) <= FUSED_MAX_TENSORS
                fuse = fuse and all(t.is_contiguous() for ts in lists for t in ts)  # flat views below
                update = _adan_fused if fuse else _adan_multi_tensor
                update(
                    *lists,
                    betas=tuple(group["betas"]),
                    step=group["step"],
                    lr=group["lr"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    no_prox=group["no_prox"],
                )
        return loss


def adamw_kwargs(device: torch.device) -> dict[str, bool]:
    """torch AdamW's implementation: the fused CUDA kernel (one launch for all tensors) where the
    parameters live on CUDA, else multi-tensor foreach (fused=True raises on this torch's CPU
    path for some dtypes, and foreach is the tested default there)."""
    return {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimConfig, compiled_run: bool = False
) -> torch.optim.Optimizer:
    """``adan``: ``Adan`` above (official betas (0.98, 0.92, 0.99), eps 1e-8, proximal weight
    decay unless ``no_prox``), its update fused by ``torch.compile`` when ``cfg.fused`` says so
    (``"auto"``: in a ``compiled_run``); adan-pytorch is not used because it departs from the
    published update (the official sail-sg/Adan code). ``adamw``: ``torch.optim.AdamW`` with the first two betas,
    fused when every parameter is on CUDA (the engine moves the model there first). Clipping is
    DeepSpeed's global-norm ``gradient_clipping``."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adan":
        if len(cfg.betas) != 3:
            raise ValueError(f"Adan needs three betas, got optim.betas={cfg.betas}")
        return Adan(
            params,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            no_prox=cfg.no_prox,
            foreach=True,
            fused=compiled_run if cfg.fused == "auto" else cfg.fused,
        )
    devices = {p.device.type for p in params}
    kwargs = adamw_kwargs(torch.device("cuda")) if devices == {"cuda"} else adamw_kwargs(torch.device("cpu"))
    betas = tuple(cfg.betas[:2])
    return torch.optim.AdamW(params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **kwargs)


def lr_lambda(warmup_steps: int):
    """Constant LR after a linear warm-up of ``warmup_steps`` optimizer steps (the release is
    constant)."""

    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps))
