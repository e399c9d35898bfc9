"""What ``mdt-sample`` samples from: the checkpoint (a local file or ``hf://``), the model that
fits it, and the codec that decodes its latents.

- The model: ``--config`` (a run's config.json), else ``--model PRESET [key=value ...]``, else the
  config.json beside a run's EMA snapshot, else the checkpoint's own shapes (see
  :mod:`mdt_ds.models.fit`). Without a run config, what the shapes determine is taken from them
  (an official-format checkpoint of a non-preset size loads), except fields the user set.
- The codec: the training data's codec when the checkpoint is a run's snapshot (its config names
  the data, whose manifest names the codec); the paper's sd-vae-ft-ema decoder otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from mdt_ds.config import ConfigError, ModelConfig, TrainConfig, apply_overrides, from_dict

log = logging.getLogger("mdt_ds.sample")
DEFAULT_CODEC = "ema"  # sd-vae-ft-ema: the decoder of the paper's FID tables
MODEL_HELP = "--model PRESET [key=value ...] (e.g. --model MDTv2-Tiny/2 input_size=16)"


class SampleError(RuntimeError):
    """The run cannot proceed (mismatched settings, broken shards); the message says what to do."""


# --------------------------------------------------------------------------- checkpoint
def load_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``ckpt`` (weights-only) with DDP/compile prefixes stripped."""
    from mdt_ds.tools.convert_checkpoint import load_state_dict_file

    state = load_state_dict_file(ckpt)
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def load_model(ckpt: Path | dict[str, torch.Tensor], cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """Build the model and load a raw state_dict (ours or the release's; a path or the dict), strictly."""
    from mdt_ds.models import build_model
    from mdt_ds.models.fit import state_mismatch

    state = load_state(ckpt) if isinstance(ckpt, (str, Path)) else ckpt
    model = build_model(cfg)
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch:
        what = "the checkpoint" if isinstance(ckpt, dict) else str(ckpt)
        raise SampleError(
            f"{what} does not fit the model {cfg.preset!r} (hidden_size={cfg.hidden_size}, depth={cfg.depth}, "
            f"input_size={cfg.input_size}): {mismatch}; pass {MODEL_HELP} as it was trained, "
            "or --config RUN_DIR/config.json"
        )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.to(device).eval()


# --------------------------------------------------------------------------- model config
def parse_model_spec(items: str | list[str] | None) -> tuple[str | None, list[str]]:
    """``--model`` as (preset or None, ["key=value", ...])."""
    if not items:
        return None, []
    items = [items] if isinstance(items, str) else list(items)
    preset, rest = (None, items) if "=" in items[0] else (items[0], items[1:])
    bad = [item for item in rest if "=" not in item]
    if bad:
        raise SampleError(f"--model {' '.join(items)}: {bad[0]!r} is not key=value; use {MODEL_HELP}")
    return preset, rest


def run_config_file(model: str | list[str] | None, config: Path | None, ckpt: Path, hub: bool = False) -> Path | None:
    """The run config.json that describes ``ckpt``: ``--config``, else (without ``--model``) the
    one beside a snapshot; a hub download's folder holds no config of ours."""
    if config is not None:
        if not config.is_file():
            raise SampleError(f"--config {config} does not exist")
        return config
    beside = ckpt.parent / "config.json"
    return beside if not model and not hub and beside.is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SampleError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise SampleError(f"{path} must hold a JSON mapping (a run's config.json)")
    return data


def model_config(
    model: str | list[str] | None,
    config: Path | None,
    ckpt: Path,
    state: dict[str, torch.Tensor] | None = None,
    hub: bool = False,
) -> ModelConfig:
    """The model to build (see the module docstring); with ``state``, the fields its shapes
    determine are taken from it unless a run config or a ``key=value`` set them, and logged."""
    from mdt_ds.models.fit import fit_to_state, preset_label

    run_file = run_config_file(model, config, ckpt, hub)
    if run_file is not None:
        data = _read_json(run_file)
        cfg = from_dict(ModelConfig, data.get("model", data), "model")
        # A section without a preset gets the dataclass default's name; label it by what it is.
        return dataclasses.replace(cfg, preset=preset_label(cfg))
    preset, overrides = parse_model_spec(model)
    cfg = ModelConfig.from_preset(preset or "MDTv2-XL/2")
    if overrides:
        cfg = apply_overrides(TrainConfig(model=cfg), [f"model.{item}" for item in overrides]).model
    if state is None:
        return dataclasses.replace(cfg, preset=preset_label(cfg))
    keep = {item.split("=", 1)[0] for item in overrides}
    fitted, changed = fit_to_state(cfg, state, keep)
    if preset is None:
        shown = ", ".join(
            f"{k}={getattr(fitted, k)}"
            for k in ("hidden_size", "depth", "num_heads", "patch_size", "in_channels", "num_classes", "input_size")
        )
        log.info("no --model: inferred from the checkpoint's shapes: %s -> %s", shown, fitted.preset)
    elif changed:
        shown = ", ".join(f"{k}={now} (preset {was})" for k, (was, now) in changed.items())
        log.info("the checkpoint's shapes differ from %s: %s -> building %s", preset, shown, fitted.preset)
    return fitted


# --------------------------------------------------------------------------- codec
def _training_source(run_file: Path | None) -> str | None:
    """The ``data.source`` of the run in ``run_file`` (None: no run config, or none in it)."""
    if run_file is None:
        return None
    data = _read_json(run_file).get("data")
    source = data.get("source") if isinstance(data, dict) else None
    return source or None


def trained_classes(run_file: Path | None) -> int | None:
    """How many classes the run in ``run_file`` trained on (its data manifest), or None: an
    official checkpoint, or data this machine cannot read (then every label row is drawn)."""
    source = _training_source(run_file)
    if source is None:
        return None
    from mdt_ds.data.compat import data_facts

    try:
        return int(data_facts(source)["classes"])
    except ConfigError as err:
        log.warning("cannot read the classes of the training data (%s); labels come from every label row", err)
        return None


def trained_timesteps(run_file: Path | None) -> int:
    """The run's ``diffusion.num_timesteps`` (what its timesteps and guidance schedule mean), or
    the release's 1000 for official checkpoints."""
    if run_file is None:
        return 1000
    section = _read_json(run_file).get("diffusion")
    value = section.get("num_timesteps", 1000) if isinstance(section, dict) else 1000
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise SampleError(f"{run_file}: diffusion.num_timesteps must be an integer >= 2, got {value!r}")
    return value


def _codec_key(name: str) -> str:
    from mdt_ds.models.codec import SD_VAE_IDS

    name = SD_VAE_IDS.get(name, name)
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def training_codec(run_file: Path | None) -> str | None:
    """The codec the run in ``run_file`` was trained on (from its data manifest), or None when
    there is no run config or its data cannot be read here (a warning says why)."""
    source = _training_source(run_file)
    if source is None:
        return None
    from mdt_ds.grids import codec_name_for_source

    try:
        return codec_name_for_source(source)
    except Exception as err:  # noqa: BLE001 - the data may live on another machine: warn, fall back
        log.warning(
            "cannot read the codec of the training data %r (%s: %s); decoding with %r",
            source,
            type(err).__name__,
            " ".join(str(err).split())[:160],
            DEFAULT_CODEC,
        )
        return None


def choose_codec(requested: str | None, run_file: Path | None) -> str:
    """``--vae`` if given (with a warning when it differs from the training codec), else the
    training codec of a run's snapshot, else the paper's ema decoder (official checkpoints)."""
    trained = training_codec(run_file)
    if requested is None:
        if trained is not None:
            log.info("decoding with %r, the codec the run was trained on (its data manifest)", trained)
        return trained or DEFAULT_CODEC
    from mdt_ds.models.codec import is_local_path

    if trained is not None and is_local_path(trained) and not Path(trained).expanduser().is_dir():
        # The run's VAE folder moved (data copied elsewhere): --vae names its new place, no warning.
        log.info("the run's VAE folder %s is not here; decoding with --vae %s (it must be the same VAE)",
                 trained, requested)
    elif trained is not None and _codec_key(requested) != _codec_key(trained):
        log.warning(
            "--vae %s differs from the codec the run was trained on (%s): its latents decode "
            "correctly only with that one; omit --vae to use it",
            requested,
            trained,
        )
    return requested
