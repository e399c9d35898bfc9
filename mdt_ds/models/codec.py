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
        """Load by short name ("mse", "ema"), hub id or local directory. With HF_HUB_OFFLINE=1
        (or no network) a missing download fails with a message saying how to provide it."""
        from diffusers import AutoencoderKL

        repo = SD_VAE_IDS.get(source, source)
        try:
            # low_cpu_mem_usage=False: the meta-device init needs `accelerate` (not a dependency);
            # diffusers would otherwise print a multi-line "accelerate was not found" block.
            vae = AutoencoderKL.from_pretrained(repo, torch_dtype=dtype, low_cpu_mem_usage=False)
        except (OSError, ValueError) as err:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            hint = "HF_HUB_OFFLINE is set, so nothing is downloaded. " if offline else ""
            # One line (CLIs print it as their error line), naming the repo actually asked for and
            # today's hub command: huggingface_hub >= 1.0 ships `hf`, not `huggingface-cli`.
            cause = " ".join(str(err).split())[:200]
            raise CodecError(
                f"cannot load the VAE {repo!r}: {hint}Download it once on a machine with internet "
                f"(hf download {repo}) and pass its local directory (hf download {repo} --local-dir DIR), or "
                f"fill the Hugging Face cache (HF_HOME / HF_HUB_CACHE). Cause: {err.__class__.__name__}: {cause}"
            ) from err
        return cls(vae.to(device), source=str(repo))

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
