"""The model config against the data, before anything is built: the shards' sample shape,
channels and classes (from ``manifest.json``) must fit the model, or the run stops with both
sides named and the override that fixes it. ``model.input_size=auto``, ``model.in_channels=auto``
and ``model.num_classes=auto`` take the value from the manifest. (Without this check a mismatch
surfaced at step 0 deep inside DeepSpeed, or as an ``IndexError`` in the label embedding.)"""

from __future__ import annotations

import dataclasses
import logging

from mdt_ds.config import AUTO, ConfigError, TrainConfig
from mdt_ds.data.shards import ShardError, manifest_layout, read_manifest

log = logging.getLogger(__name__)


def data_facts(source: str) -> dict:
    """What the model must match: sample (channels, height, width), class count, codec name."""
    from mdt_ds.data.loader import resolve_source

    try:
        manifest = read_manifest(resolve_source(source))
    except (ShardError, OSError) as err:
        raise ConfigError(f"data.source: {err}") from None
    layout = manifest_layout(manifest)
    codec = layout.codec.get("name", "pixel")
    codec = codec if codec == "pixel" else layout.codec.get("source") or layout.codec.get("hub_id") or codec
    return {"shape": tuple(layout.sample_shape), "classes": int(manifest["num_classes"]), "codec": str(codec)}


def fit_model_to_data(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its ``auto`` model fields resolved from the data; a ConfigError naming both
    sides when the model does not fit the shards."""
    facts = data_facts(cfg.data.source)
    channels, height, width = facts["shape"]
    what = f"{cfg.data.source} holds {channels}x{height}x{width} samples ({facts['codec']}) of {facts['classes']} classes"
    if height != width:
        raise ConfigError(f"{what}: MDTv2 takes square inputs")
    model = cfg.model
    resolved = {k: v for k, v in (("input_size", height), ("in_channels", channels),
                                   ("num_classes", facts["classes"])) if getattr(model, k) == AUTO}
    if resolved:
        log.info("model from the data: %s", ", ".join(f"{k}={v}" for k, v in resolved.items()))
        model = dataclasses.replace(model, **resolved)
    problems = []
    if model.input_size != height:
        problems.append(f"model.input_size={model.input_size} (set model.input_size={height} or auto)")
    if model.in_channels != channels:
        problems.append(f"model.in_channels={model.in_channels} (set model.in_channels={channels} or auto)")
    if model.num_classes < facts["classes"]:
        problems.append(f"model.num_classes={model.num_classes} is fewer than the data's labels "
                        f"(set model.num_classes={facts['classes']} or auto)")
    elif model.num_classes > facts["classes"] and not cfg.data.untrained_classes:
        problems.append(f"model.num_classes={model.num_classes} would leave {model.num_classes - facts['classes']} "
                        f"label rows untrained for sampling to draw from (set model.num_classes={facts['classes']} or "
                        "auto, or data.untrained_classes=true to keep them, e.g. to fine-tune a 1000-class checkpoint)")
    if problems:
        raise ConfigError(f"the model ({model.preset}) does not fit the data: {what}, but " + "; ".join(problems))
    if model.input_size % model.patch_size:
        raise ConfigError(f"model.input_size={model.input_size} is not a multiple of model.patch_size={model.patch_size}")
    if model.num_classes > facts["classes"]:
        log.warning("model.num_classes=%d but the data has %d classes (data.untrained_classes=true): the extra "
                    "label rows stay untrained; sampling draws the data's %d classes", model.num_classes,
                    facts["classes"], facts["classes"])
    return dataclasses.replace(cfg, model=model)
