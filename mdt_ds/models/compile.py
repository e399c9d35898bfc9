"""Regional ``torch.compile``: each transformer block is compiled on its own, applied from
outside the model (torchtitan's approach), so parameter names and state_dict keys do not change
and a graph break or a recompile stays local to one block.

The masked pass's kept length K changes every step (the mask ratio is drawn per step). The
token dimension of the block inputs is marked dynamic in the masked pass, so every K runs the
same graph; the full pass (L tokens) keeps static shapes. Blocks of one kind share their graphs
(module parameters are graph inputs), so a model compiles a handful of graphs in all: one per
(skip or not) x (masked or full) x (checkpointed or not) x (train or eval) combination it runs.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from mdt_ds.models.mdt import MDTv2

# Each (block kind x pass x AC x mode) combination is one cache entry of the shared compiled
# function; dynamo's default limit of 8 entries per code object could be reached by a model that
# checkpoints some blocks, after which blocks would silently run eagerly.
RECOMPILE_LIMIT = 64


def _run_block(block: nn.Module, x: torch.Tensor, c: torch.Tensor, skip: torch.Tensor | None,
               ids_keep: torch.Tensor | None, attn_bias: torch.Tensor | None) -> torch.Tensor:
    return block._mdt_eager_forward(x, c, skip, ids_keep, attn_bias)


# One compiled function per set of torch.compile options, shared by every block that uses it.
_compiled: dict[tuple, Callable[..., torch.Tensor]] = {}


def _compiled_forward(
    self: nn.Module,
    x: torch.Tensor,
    c: torch.Tensor,
    skip: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    # Bound with types.MethodType and calling one module-level compiled function that takes the
    # block as an argument: copy.deepcopy (an EMA copy) rebinds to the copy's own weights.
    attn_bias = None
    if not x.is_cuda and self.attn.backend != "flex":
        # Inductor's C++ backend fuses the bias gather into the softmax as a scalar indirect
        # load per score: that kernel took 7.6 ms per S/2 block (batch 8) against 3.7 ms for
        # softmax(qk^T + bias) given the bias. Gathered here, eagerly, it is a graph input.
        # Triton handles the indirect load well, so CUDA keeps the gather (and its cast) fused.
        attn_bias = self.attn.bias(ids_keep)
    if ids_keep is not None:
        for tensor in (x, skip, ids_keep):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
        if attn_bias is not None:
            torch._dynamo.maybe_mark_dynamic(attn_bias, 2)
            torch._dynamo.maybe_mark_dynamic(attn_bias, 3)
    return self._mdt_compiled_fn(self, x, c, skip, ids_keep, attn_bias)


def compile_blocks(model: MDTv2, **compile_kwargs: object) -> int:
    """Compile every block of ``model.blocks()`` in place and return how many. Apply it after
    activation checkpointing (the checkpointed forward is traced inside the compiled region).
    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``mode=``, ``backend=``)."""
    key = tuple(sorted(compile_kwargs.items()))
    if key not in _compiled:
        _compiled[key] = torch.compile(_run_block, **compile_kwargs)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = model.blocks()
    for block in blocks:
        if getattr(block, "_mdt_compiled", False):
            continue
        eager = block.forward  # the checkpointed instance method if AC was applied, else the class's
        if not isinstance(eager, types.MethodType):
            raise TypeError(f"compile_blocks: block forward {eager!r} is not a bound method")
        block._mdt_eager_forward = eager
        block._mdt_compiled_fn = _compiled[key]  # a plain function: deepcopy shares it, rightly
        block.forward = types.MethodType(_compiled_forward, block)
        block._mdt_compiled = True
    return len(blocks)
