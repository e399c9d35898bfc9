"""Activation checkpointing applied from outside the model (torchtitan's split of the model
definition from how it is run). The block's forward is wrapped on the instance, so parameter
names and state_dict keys do not change; skip / kept-index arguments pass straight through."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import torch.utils.checkpoint
from torch import nn

from mdt_ds.models.mdt import MDTv2

CheckpointFn = Callable[..., object]
Scope = Literal["none", "encoder", "all"]


def _torch_checkpoint(fn: Callable, *args: object) -> object:
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)


def checkpointed_blocks(model: MDTv2, scope: Scope) -> list[nn.Module]:
    """"encoder": en_inblocks + en_outblocks (where the masked pass spends its activations on the
    kept tokens); "all": every block including side and decoder blocks; "none": no block."""
    if scope == "none":
        return []
    if scope == "encoder":
        return [*model.en_inblocks, *model.en_outblocks]
    if scope == "all":
        return model.blocks()
    raise ValueError(f"activation_checkpointing must be 'none', 'encoder' or 'all', got {scope!r}")


def apply_activation_checkpointing(model: MDTv2, scope: Scope, checkpoint_fn: CheckpointFn | None = None) -> int:
    """Recompute the chosen blocks' activations in backward. ``checkpoint_fn(fn, *args)``
    defaults to ``torch.utils.checkpoint`` (non-reentrant); the trainer may pass DeepSpeed's.
    Returns the number of wrapped blocks."""
    checkpoint_fn = checkpoint_fn or _torch_checkpoint
    blocks = checkpointed_blocks(model, scope)
    for block in blocks:
        if getattr(block, "_mdt_checkpointed", False):
            continue
        original = block.forward

        @functools.wraps(original)
        def forward(x, c, skip=None, ids_keep=None, _original=original, _block=block):
            if not torch.is_grad_enabled() or not _block.training:
                return _original(x, c, skip, ids_keep)
            return checkpoint_fn(_original, x, c, skip, ids_keep)

        block.forward = forward
        block._mdt_checkpointed = True
    return len(blocks)
