"""Codecs between images and what the diffusion model sees.

- :class:`VAECodec`: the Stable Diffusion VAE (``stabilityai/sd-vae-ft-mse`` / ``-ema``) through
  diffusers' ``AutoencoderKL``, by hub id or local directory; latents are scaled by 0.18215.
- :class:`PixelCodec`: identity on pixels mapped to [-1, 1], for pixel-space data (MNIST demo).

Images are float tensors in [-1, 1], NCHW.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

SD_VAE_SCALE = 0.18215
SD_VAE_IDS = {"mse": "stabilityai/sd-vae-ft-mse", "ema": "stabilityai/sd-vae-ft-ema"}


class CodecError(RuntimeError):
    """Weights missing or a codec used wrongly; the message says how to fix it."""


class PixelCodec:
    """Pixels are the latents: ``encode`` checks the range, ``decode`` is the identity."""

    name = "pixel"
    scale_factor = 1.0
    downsample = 1

    def __init__(self, channels: int = 3):
        self.channels = channels

    def to(self, device: str | torch.device) -> "PixelCodec":
        """No weights to move: latents stay wherever the sampler made them."""
        return self

    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "scale_factor": self.scale_factor}


class VAECodec:
    """SD VAE. ``encode_moments`` returns the posterior mean and log-variance ``[N, 2C, h, w]``
    (unscaled, as stored in latent shards); ``encode`` draws ``posterior.sample() * scale``;
    ``decode`` maps scaled latents back to images in [-1, 1]."""

    name = "sd-vae"
    downsample = 8

    def __init__(self, vae: torch.nn.Module, source: str = "", scale_factor: float = SD_VAE_SCALE):
        self.vae = vae.eval().requires_grad_(False)
        self.source = source
        self.scale_factor = scale_factor
        self.channels = vae.config.latent_channels

    @classmethod
    def from_pretrained(
        cls, source: str = "mse", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "VAECodec":
        """Load by short name ("mse", "ema"), hub id or local directory. A hub id is read from the
        local Hugging Face cache first and downloaded only if it is not there; with
        HF_HUB_OFFLINE=1 (or no network) a missing download fails with a message saying how to
        provide it. A local path that does not exist says so (and how to point to the folder)."""
        repo = SD_VAE_IDS.get(source, source)
        check_vae(repo)  # a moved folder: one line naming it, not the hub's advice for a path
        try:
            vae = _load_autoencoder(repo, dtype)
        except (OSError, ValueError) as err:
            cause = " ".join(str(err).split())[:200]
            raise CodecError(f"{_hub_advice(repo)} Cause: {err.__class__.__name__}: {cause}") from err
        # A local folder is recorded (in manifests) absolute: a relative one would break from another cwd.
        local = Path(repo).expanduser().is_dir()
        return cls(vae.to(device), source=os.path.abspath(Path(repo).expanduser()) if local else str(repo))

    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int = 0, source: str = "random") -> "VAECodec":
        """A randomly initialised AutoencoderKL (tests, tiny data sets)."""
        from diffusers import AutoencoderKL

        with torch.random.fork_rng(devices=[]):  # no side effect on the global generator
            torch.manual_seed(seed)
            return cls(AutoencoderKL(**config), source=source)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device: str | torch.device) -> "VAECodec":
        """Move the VAE (in place, like ``nn.Module.to``) so decode runs where the latents are."""
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return torch.cat([dist.mean, dist.logvar], dim=1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self.encode_moments(images).chunk(2, dim=1)
        # Drawn on the generator's device (CPU by default) so a seeded draw is device-independent.
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + torch.exp(0.5 * logvar) * eps) * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((latents / self.scale_factor).to(self.device, self.vae.dtype)).sample.float()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "scale_factor": self.scale_factor}


# A tiny AutoencoderKL with the real 8x downsampling and 4 latent channels (0.25M parameters).
TINY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def _load_autoencoder(repo: str, dtype: torch.dtype) -> torch.nn.Module:
    """The AutoencoderKL of a local folder or a hub id, the local cache tried first: online,
    a cached id would otherwise make the hub client retry the network (minutes without one)."""
    from diffusers import AutoencoderKL

    # low_cpu_mem_usage=False: the meta-device init needs `accelerate` (not a dependency);
    # diffusers would otherwise print a multi-line "accelerate was not found" block.
    kwargs = dict(torch_dtype=dtype, low_cpu_mem_usage=False)
    if Path(repo).expanduser().is_dir() or _offline():
        return AutoencoderKL.from_pretrained(repo, **kwargs)
    try:
        return AutoencoderKL.from_pretrained(repo, local_files_only=True, **kwargs)
    except (OSError, ValueError):  # not cached (or incomplete): download it
        return AutoencoderKL.from_pretrained(repo, **kwargs)


def _hub_advice(repo: str, how: str = "") -> str:
    """Why a hub id did not load and how to provide it, in one line (CLIs print it as their error
    line), naming the repo asked for and today's hub command (huggingface_hub >= 1.0 ships `hf`)."""
    hint = "HF_HUB_OFFLINE is set, so nothing is downloaded. " if _offline() else ""
    return (
        f"cannot load the VAE {repo!r}: {hint}Download it once on a machine with internet "
        f"(hf download {repo}) and pass its local directory{f' ({how})' if how else ''} "
        f"(hf download {repo} --local-dir DIR), or fill the Hugging Face cache (HF_HOME / HF_HUB_CACHE)."
    )


def is_local_path(name: str) -> bool:
    """Whether a codec name means a folder on this machine rather than a hub id ("owner/name"):
    an existing folder, or a name no hub id can be (absolute, ./ ../ ~, or more than one /)."""
    if name in SD_VAE_IDS or name in ("pixel", "tiny-random"):
        return False
    return Path(name).expanduser().is_dir() or name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_vae(name: str, how: str = "") -> None:
    """Raise :class:`CodecError` in one line when the VAE ``name`` cannot load here: a local
    folder that does not exist (or holds no config.json), or a hub id that is not in the local
    cache while HF_HUB_OFFLINE is set. ``how`` is how the caller's user names the folder
    (``--vae DIR``, ``data.vae=DIR``). Cheap: nothing is loaded."""
    fix = f"pass {how}, DIR being where it is now" if how else "pass the path where it is now"
    name = SD_VAE_IDS.get(name, name)
    if name in ("pixel", "tiny-random"):
        return
    if is_local_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise CodecError(f"the VAE folder {name} does not exist (moved, or not copied to this machine?): {fix}")
        if not (path / "config.json").is_file():
            raise CodecError(f"{name} is not a VAE folder (it holds no config.json, which diffusers' save_pretrained "
                             f"writes): pass the folder that does{f' ({how})' if how else ''}")
        return
    if _offline() and not _in_hub_cache(name):
        raise CodecError(_hub_advice(name, how))


def _in_hub_cache(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except ValueError:  # not a valid repo id: from_pretrained will say so
        return True


def load_codec(name: str, device: str | torch.device = "cpu", channels: int = 3) -> PixelCodec | VAECodec:
    """``"pixel"``; ``"mse"``/``"ema"``/a hub id/a local directory for the SD VAE; ``"tiny-random"``
    for the random tiny VAE used in tests."""
    if name == "pixel":
        return PixelCodec(channels)
    if name == "tiny-random":
        return VAECodec.from_config(TINY_VAE_CONFIG, source="tiny-random").to(device)
    if Path(name).is_dir() or name in SD_VAE_IDS or "/" in name:
        return VAECodec.from_pretrained(name, device)
    raise CodecError(f"unknown codec {name!r}: use 'pixel', 'mse', 'ema', 'tiny-random', a hub id or a directory")
