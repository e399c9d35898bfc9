"""Class-conditional samples of the EMA model for training grids and the demo: fixed seeds and
classes, the run's sampler (diffusion.sampler, default DDIM-25), decoded with the data set's codec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mdt_ds.config import ConfigError, DiffusionConfig, TrainConfig
from mdt_ds.models import build_model
from mdt_ds.models.codec import PixelCodec, VAECodec, load_codec


def codec_for_source(source: str, channels: int, device: torch.device | str | None = None,
                     vae: str = "") -> PixelCodec | VAECodec:
    """The codec that decodes this data source's latents, from its manifest (shard folders and
    the embedded sets "mnist16", "mnist32", "tiny-latents" alike), on ``device`` (None: CPU);
    ``vae`` (``data.vae``) replaces the manifest's VAE (a moved folder)."""
    return load_codec(vae or codec_name_for_source(source), device=device or "cpu", channels=channels)


def codec_name_for_source(source: str) -> str:
    """The :func:`load_codec` name of the codec this data source was encoded with, from its
    manifest: ``"pixel"``, or the VAE's recorded source (a hub id, a directory, ``"tiny-random"``)."""
    from mdt_ds.data.loader import resolve_source
    from mdt_ds.data.shards import manifest_layout, read_manifest

    codec = manifest_layout(read_manifest(resolve_source(source))).codec
    if codec.get("name", "pixel") == "pixel":
        return "pixel"
    return codec.get("source") or codec.get("hub_id") or "mse"


def check_decoder(cfg: TrainConfig) -> str:
    """At the start of a run: the decoder its grids and in-training FID will use (``data.vae``,
    else the data manifest's VAE), checked without loading it. Raises :class:`ConfigError` in one
    line when it cannot load here (a VAE folder that moved: set data.vae=DIR; a hub id neither
    cached nor downloadable offline). Returns the codec name, or "" for a run that never decodes
    (sample_every=0, fid_every=0): it needs no decoder, so none is checked."""
    from mdt_ds.data.shards import ShardError
    from mdt_ds.models.codec import CodecError, check_vae

    if not (cfg.sample_every or cfg.fid_every):
        return ""
    if cfg.data.vae:
        name, where = cfg.data.vae, f"data.vae={cfg.data.vae}"
    else:
        try:
            name = codec_name_for_source(cfg.data.source)
        except ShardError as err:  # the data check reports it, with its own advice
            raise ConfigError(f"data.source: {err}") from None
        where = f"the VAE named by the manifest of {cfg.data.source}"
    try:
        check_vae(name, "data.vae=DIR")
    except CodecError as err:
        raise ConfigError(f"{where}: {err}") from None
    return name


def trained_classes(cfg: TrainConfig) -> int:
    """The classes the run trains on: the model's label rows, or with data.untrained_classes the
    data's classes (the other rows are never trained, so nothing samples them)."""
    if not cfg.data.untrained_classes:
        return int(cfg.model.num_classes)
    from mdt_ds.data.compat import data_facts

    return min(int(cfg.model.num_classes), data_facts(cfg.data.source)["classes"])


def sample_options(d: DiffusionConfig, steps: int, sampler: str | None = None, cfg_scale: float | None = None,
                   cfg_interval: list[int] | None = None, autocast: str = "none", label_classes: int = 0):
    """How the run samples its grids and in-training FID: ``cfg.diffusion``'s sampler, spacing,
    guidance (at least 1) and interval, each overridable; the model's forward in fp32 unless
    ``autocast`` ("bf16", "fp16") says otherwise."""
    from mdt_ds.sampling import SampleOptions

    return SampleOptions(
        cfg_scale=cfg_scale if cfg_scale is not None else max(d.cfg_scale, 1.0), cfg_pow=d.cfg_pow,
        guide_channels=d.guide_channels, sampler=sampler or d.sampler, steps=steps, spacing=d.sample_spacing,
        cfg_interval=d.cfg_interval if cfg_interval is None else cfg_interval, num_timesteps=d.num_timesteps,
        autocast=autocast, label_classes=label_classes,
    )


@torch.no_grad()
def sample_images(
    cfg: TrainConfig, state_dict: dict[str, torch.Tensor], per_class: int = 4, max_classes: int = 10,
    steps: int | None = None, cfg_scale: float | None = None, device: torch.device | str | None = None,
    sampler: str | None = None, cfg_interval: list[int] | None = None, stats: dict | None = None,
    autocast: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` images for each of the first ``max_classes`` classes, class-major:
    (images in [-1, 1] NCHW on the CPU, labels). Image i uses seed ``image_seed(cfg.seed, i)``.
    Sampler, steps, spacing, guidance and its interval default to ``cfg.diffusion``'s (``sampler``,
    ``sample_steps``, ``sample_spacing``, ``cfg_scale``, ``cfg_interval``).
    The model, the codec and the latents live on ``device`` (None: CPU); on CUDA with TF32 on.
    The trainer passes its engine's device: sampling a grid on the CPU would keep rank 0 away
    for minutes while the other ranks wait at a barrier."""
    from mdt_ds.sampling import generate, image_seed, sampling_tf32

    device = torch.device(device or "cpu")
    # The random init is overwritten at once; forking keeps rank 0's global generators (which
    # the other ranks do not advance) untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_model(cfg.model, device=device)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    classes = min(trained_classes(cfg), max_classes)
    labels = torch.arange(classes).repeat_interleave(per_class)
    seeds = [image_seed(cfg.seed, i) for i in range(len(labels))]
    options = sample_options(cfg.diffusion, steps or cfg.diffusion.sample_steps, sampler, cfg_scale, cfg_interval,
                             autocast)
    codec = codec_for_source(cfg.data.source, cfg.model.in_channels, device=device, vae=cfg.data.vae)
    with sampling_tf32(device):
        latents = generate(
            model, options.diffusion(), labels, seeds, cfg_scale=options.cfg_scale,
            cfg_pow=options.cfg_pow, guide_channels=options.guide_channels, sampler=options.sampler,
            cfg_interval=options.cfg_interval, clip_denoised=isinstance(codec, PixelCodec), device=device,
            autocast_dtype=options.autocast_dtype(), stats=stats,
        )
        images = codec.decode(latents)
    return images.cpu(), labels


def class_names(source: str) -> dict[int, str]:
    """Class index -> name from the data manifest's class map (WNIDs for an ImageNet folder, the
    digits for MNIST); empty when the manifest cannot be read (callers then write the index)."""
    from mdt_ds.data.loader import resolve_source
    from mdt_ds.data.shards import ShardError, read_manifest

    try:
        classes = read_manifest(resolve_source(source))["classes"]
    except (ShardError, OSError):
        return {}
    return {int(index): str(name) for name, index in classes.items()}


def render_grid(cfg: TrainConfig, state_dict: dict[str, torch.Tensor], path: Path, per_class: int = 4,
                device: torch.device | str | None = None, **kwargs) -> np.ndarray:
    """Sample (one row per class) on ``device``, save a PNG at ``path``, return the grid as
    uint8 HWC. Small samples are enlarged (nearest) to at least MIN_TILE px, and each row starts
    with its class name (from the data manifest, else the class index)."""
    from PIL import Image

    from mdt_ds.sampling import MIN_TILE, save_grid, to_uint8

    images, labels = sample_images(cfg, state_dict, per_class=per_class, device=device, **kwargs)
    names = class_names(cfg.data.source)
    rows = [names.get(int(label), str(int(label))) for label in labels[::per_class]]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(to_uint8(images), path, nrow=per_class, row_labels=rows, min_tile=MIN_TILE)
    return np.asarray(Image.open(path).convert("RGB"))
