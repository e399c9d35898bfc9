"""Activation checkpointing applied from outside the model (torchtitan's split of the model
definition from how it is run). The block's forward is wrapped on the instance, so parameter
names and state_dict keys do not change; skip / kept-index arguments pass straight through."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from typing import Literal

import torch.utils.checkpoint
from torch import nn

from mdt_ds.models.mdt import MDTv2

CheckpointFn = Callable[..., object]
Scope = Literal["none", "encoder", "all"] | Sequence[int]


def _torch_checkpoint(fn: Callable, *args: object) -> object:
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def checkpointed_blocks(model: MDTv2, scope: Scope) -> list[nn.Module]:
    """"encoder": en_inblocks + en_outblocks (where the masked pass spends its activations on the
    kept tokens); "all": every block including side and decoder blocks; "none": no block; a list
    of indices into ``model.blocks()`` (what ``mdt_ds.config.checkpointing_scope`` returns for a
    block count N or for "0,3,5"): exactly those blocks."""
    if isinstance(scope, str):
        if scope == "none":
            return []
        if scope == "encoder":
            return [*model.en_inblocks, *model.en_outblocks]
        if scope == "all":
            return model.blocks()
        raise ValueError(
            f"activation_checkpointing must be 'none', 'encoder', 'all' or block indices, got {scope!r}"
        )
    blocks = model.blocks()
    indices = list(scope)
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(
            f"activation_checkpointing: block indices {bad} are out of range; this model has "
            f"{len(blocks)} blocks (indices 0..{len(blocks) - 1} in MDTv2.blocks() order)"
        )
    return [blocks[i] for i in sorted(set(indices))]


def _checkpointed_forward(
    self: nn.Module,
    x: torch.Tensor,
    c: torch.Tensor,
    skip: torch.Tensor | None = None,
    ids_keep: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    # Bound to the block with types.MethodType (not a closure over it), so copy.deepcopy of the
    # model (e.g. an EMA copy) rebinds it to the copied block and its own weights.
    forward = functools.partial(type(self).forward, self)
    if not torch.is_grad_enabled() or not self.training:
        return forward(x, c, skip, ids_keep, attn_bias)
    return self._mdt_checkpoint_fn(forward, x, c, skip, ids_keep, attn_bias)


def apply_activation_checkpointing(model: MDTv2, scope: Scope, checkpoint_fn: CheckpointFn | None = None) -> int:
    """Recompute the chosen blocks' activations in backward. ``checkpoint_fn(fn, *args)``
    defaults to ``torch.utils.checkpoint`` (non-reentrant); the trainer may pass DeepSpeed's.
    Returns the number of wrapped blocks."""
    checkpoint_fn = checkpoint_fn or _torch_checkpoint
    blocks = checkpointed_blocks(model, scope)
    for block in blocks:
        if getattr(block, "_mdt_checkpointed", False):
            continue
        block._mdt_checkpoint_fn = checkpoint_fn
        block.forward = types.MethodType(_checkpointed_forward, block)
        block._mdt_checkpointed = True
    return len(blocks)
