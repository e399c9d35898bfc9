"""What a state_dict says about the MDTv2 that wrote it, and how it differs from a built model.

An official-format checkpoint carries no config, but its shapes fix most of the architecture:
``x_embedder.proj`` (hidden size, latent channels, patch), ``pos_embed`` (tokens, hence the input
size), the label table (classes), the block lists (depth, decoder depth), the relative position
bias table (heads), ``mlp.fc1`` (MLP ratio) and the final layer (learned sigma). Training knobs
(mask ratio, class dropout) and the attention backend leave no trace and come from elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from mdt_ds.config import MODEL_PRESETS, ModelConfig

CUSTOM = "custom"
# The fields that define the parameter shapes; a config equal to a preset on all of them is that preset.
ARCHITECTURE = (
    "input_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "num_classes",
    "learn_sigma",
    "decode_layer",
)


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"^{prefix}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _first(state: Mapping[str, torch.Tensor], suffix: str) -> torch.Tensor | None:
    return next((v for k, v in state.items() if k.endswith(suffix)), None)


def infer_model_fields(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The :class:`ModelConfig` fields that ``state``'s shapes determine; a field whose keys are
    absent (or shaped unlike MDTv2's) is left out rather than guessed."""
    fields: dict[str, Any] = {}
    embed = state.get("x_embedder.proj.weight")
    if embed is None or embed.ndim != 4:
        return fields
    hidden, channels, patch = int(embed.shape[0]), int(embed.shape[1]), int(embed.shape[2])
    fields.update(hidden_size=hidden, in_channels=channels, patch_size=patch)
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        fields["input_size"] = math.isqrt(pos.shape[1]) * patch
    table = state.get("y_embedder.embedding_table.weight")
    if table is not None:  # the last row is the null label of classifier-free guidance
        fields["num_classes"] = int(table.shape[0]) - 1
    encoder = _count_blocks(state, "en_inblocks") + _count_blocks(state, "en_outblocks")
    decoder = _count_blocks(state, "de_blocks")
    if encoder or decoder:
        fields.update(depth=encoder + decoder, decode_layer=decoder)
    bias = _first(state, "attn.rel_pos_bias.relative_position_bias_table")
    if bias is not None and bias.ndim == 2:
        fields["num_heads"] = int(bias.shape[1])
    fc1 = _first(state, "mlp.fc1.weight")
    if fc1 is not None and hidden:
        fields["mlp_ratio"] = fc1.shape[0] / hidden
    final = state.get("final_layer.linear.weight")
    if final is not None:
        fields["learn_sigma"] = int(final.shape[0]) == 2 * channels * patch * patch
    return fields


def preset_label(cfg: ModelConfig) -> str:
    """The preset whose architecture ``cfg`` has (its own preset first), else ``"custom"``."""
    names = [cfg.preset, *MODEL_PRESETS] if cfg.preset in MODEL_PRESETS else list(MODEL_PRESETS)
    for name in names:
        preset = ModelConfig.from_preset(name)
        if all(getattr(preset, f) == getattr(cfg, f) for f in ARCHITECTURE):
            return name
    return CUSTOM


def fit_to_state(
    cfg: ModelConfig, state: Mapping[str, torch.Tensor], keep: set[str] = frozenset()
) -> tuple[ModelConfig, dict[str, tuple[Any, Any]]]:
    """``cfg`` with the fields ``state`` determines taken from it (except those in ``keep``: the
    user set them), relabelled by :func:`preset_label`; also {field: (was, now)} for what changed."""
    inferred = {k: v for k, v in infer_model_fields(state).items() if k not in keep}
    changed = {k: (getattr(cfg, k), v) for k, v in inferred.items() if getattr(cfg, k) != v}
    fitted = dataclasses.replace(cfg, **inferred)
    return dataclasses.replace(fitted, preset=preset_label(fitted)), changed


def state_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], show: int = 3) -> str:
    """Empty when ``state`` fits ``own`` (a model's state_dict) key for key and shape for shape, else
    what differs: counts, the first keys, and the first shapes on both sides."""
    # In state_dict order, so the first shown is the root cause (pos_embed before the blocks).
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing from the checkpoint {missing[:show]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys {unexpected[:show]}")
    if wrong:
        shapes = "; ".join(
            f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}" for k in wrong[:show]
        )
        parts.append(f"{len(wrong)} with other shapes ({shapes})")
    return ", ".join(parts)
