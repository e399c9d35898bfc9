"""Seed-per-image sampling: what the 50K FID sampler, the in-training FID hook and the training
grids share.

Image ``i`` of a run with global seed ``s`` owns two generators: ``image_seed(s, i)`` draws its
initial noise and every step's noise, ``label_seed(s, i)`` its class (EDM's per-seed generators),
so an image depends only on (s, i), never on the world size, the batch size or its neighbours.
Defaults follow the MDT release's FID protocol: uniformly random labels, 250-step DDPM, fp32,
truncating quantisation; class-balanced labels, DDIM, bf16 autocast and rounding are options.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mdt_ds.dist import derive_seed

SAMPLERS = ("ddpm", "ddim")
LABEL_MODES = ("uniform", "balanced")
ROUNDINGS = ("truncate", "round")


@contextlib.contextmanager
def sampling_tf32(device: torch.device | str | None) -> Iterator[bool]:
    """TF32 matmuls and convolutions while sampling on CUDA (as the release's and DiT's samplers run), restored on
    exit so the training step around a grid or an in-training FID keeps its own setting. A
    no-op elsewhere: TF32 exists only on CUDA. Yields whether TF32 is on inside. The sampling
    entries (training grids, in-training FID, benchmarks) use it; ``generate`` itself does not,
    so the eval CLI's ``--no-tf32`` (a process-wide setting) still holds."""
    if device is None or torch.device(device).type != "cuda":
        yield False
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def image_seed(global_seed: int, index: int) -> int:
    """The seed of image ``index``'s noise generator."""
    return derive_seed(global_seed, int(index))


def label_seed(global_seed: int, index: int) -> int:
    """The seed of image ``index``'s label generator (a stream apart from its noise)."""
    return derive_seed(global_seed, "label", int(index))


def sample_labels(indices: Sequence[int], num_classes: int, global_seed: int, mode: str = "uniform") -> torch.Tensor:
    """Class labels of the given image indices: ``"uniform"`` draws each from the image's own
    generator (the release draws uniformly at random, not class-balanced); ``"balanced"`` gives
    ``index % num_classes``, exactly balanced when N is a multiple of the class count."""
    if mode == "balanced":
        return torch.tensor([int(i) % num_classes for i in indices], dtype=torch.long)
    if mode != "uniform":
        raise ValueError(f"label mode must be one of {LABEL_MODES}, got {mode!r}")
    draws = [
        torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(label_seed(global_seed, i)))
        for i in indices
    ]
    return torch.cat(draws) if draws else torch.zeros(0, dtype=torch.long)


def _guided_model_fn(
    model: torch.nn.Module,
    cfg_scale: float,
    cfg_pow: float,
    guide_channels: str,
    diffusion_steps: int,
    autocast_dtype: torch.dtype | None,
    device: torch.device,
) -> Callable[..., torch.Tensor]:
    """The function the diffusion loop calls: a plain forward, or the release's CFG contract (batch
    doubled with the null label, one forward, guided eps) keeping the conditional half."""
    null_label = model.num_classes

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with ctx:
            if cfg_scale > 1.0:
                out = model.forward_with_cfg(
                    torch.cat([x, x]),
                    torch.cat([t, t]),
                    torch.cat([y, torch.full_like(y, null_label)]),
                    cfg_scale,
                    diffusion_steps=diffusion_steps,
                    scale_pow=cfg_pow,
                    guide_channels=guide_channels,
                )[: len(x)]
            else:
                out = model(x, t, y)
        return out.float()

    return fn


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    diffusion,
    labels: torch.Tensor,
    seeds: Sequence[int],
    *,
    cfg_scale: float = 1.0,
    cfg_pow: float = 4.0,
    guide_channels: str = "release",
    sampler: str = "ddpm",
    eta: float = 0.0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Sample latents [N, C, H, W] (float32, on ``device``) for ``labels`` with per-image seeds.

    Image i's generator (CPU, seeded ``seeds[i]``) draws its x_T and every step's noise, so the
    result does not depend on batch composition. ``diffusion`` is a respaced diffusion from
    ``create_diffusion`` ("250" for DDPM, "ddim50" for DDIM). ``cfg_scale > 1`` applies
    power-cosine classifier-free guidance (``model.forward_with_cfg``; null label =
    ``model.num_classes``). The model runs in eval mode (restored afterwards) and only its
    forward runs under ``autocast_dtype``; the diffusion maths stay float32. ``clip_denoised``
    clamps predicted x_0 to [-1, 1]: right for pixel data, off for latents (as released)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shape = (len(seeds), model.in_channels, model.input_size, model.input_size)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def noise_fn(like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] != len(generators):
            raise ValueError(f"noise requested for {like.shape[0]} images, have {len(generators)} generators")
        noise = torch.stack([torch.randn(like.shape[1:], generator=g) for g in generators])
        return noise.to(like.device, like.dtype)

    x_T = noise_fn(torch.empty(shape, device=device))
    steps = getattr(diffusion, "original_num_steps", diffusion.num_timesteps)
    model_fn = _guided_model_fn(model, cfg_scale, cfg_pow, guide_channels, steps, autocast_dtype, device)
    kwargs = dict(
        noise=x_T,
        model_kwargs={"y": labels.to(device, torch.long)},
        device=device,
        progress=progress,
        noise_fn=noise_fn,
        clip_denoised=clip_denoised,
    )
    was_training = model.training
    model.eval()
    try:
        if sampler == "ddpm":
            out = diffusion.p_sample_loop(model_fn, shape, **kwargs)
        else:
            out = diffusion.ddim_sample_loop(model_fn, shape, eta=eta, **kwargs)
    finally:
        model.train(was_training)
    return out.float()


# --------------------------------------------------------------------------- pixels
def to_uint8(images: torch.Tensor, rounding: str = "truncate") -> np.ndarray:
    """[-1, 1] NCHW floats to uint8 NHWC. ``"truncate"`` is the MDT release's
    ``((x + 1) * 127.5).clamp(0, 255).to(uint8)``; ``"round"`` is DiT's
    ``clamp(127.5 x + 128, 0, 255).to(uint8)``. The choice moves FID slightly: record it."""
    images = images.detach().float()
    if rounding == "truncate":
        out = ((images + 1) * 127.5).clamp(0, 255)
    elif rounding == "round":
        out = torch.clamp(127.5 * images + 128.0, 0, 255)
    else:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return out.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def as_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC with 1 channel repeated to 3 (ADM batches and Inception need RGB)."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def save_grid(images: np.ndarray | torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """Write a PNG grid, ``nrow`` images per row (torchvision's ``make_grid`` layout, black
    padding). ``images``: uint8 NHWC (array or tensor) or float [-1, 1] NCHW tensor."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy() if images.dtype == torch.uint8 else to_uint8(images)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"save_grid needs uint8 NHWC images, got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    ncol = max(1, min(nrow, n))
    rows = -(-n // ncol)
    grid = np.zeros((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = img
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


# --------------------------------------------------------------------------- batches of images
@dataclass(frozen=True)
class SampleOptions:
    """How images are made; the defaults are the release's FID-50K protocol except guidance,
    which callers set (the published FID uses cfg_scale 3.8, pow 4)."""

    cfg_scale: float = 1.0
    cfg_pow: float = 4.0
    guide_channels: str = "release"
    sampler: str = "ddpm"
    steps: int = 250
    eta: float = 0.0
    labels: str = "uniform"
    rounding: str = "truncate"
    autocast: str = "none"  # "none", "bf16", "fp16"

    def respacing(self) -> str:
        return f"ddim{self.steps}" if self.sampler == "ddim" else str(self.steps)

    def autocast_dtype(self) -> torch.dtype | None:
        return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]

    def as_dict(self) -> dict:
        return asdict(self)


def sample_batch(
    model: torch.nn.Module,
    diffusion,
    codec,
    indices: Sequence[int],
    global_seed: int,
    options: SampleOptions,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``indices`` of the run ``global_seed``: (uint8 NHWC RGB, int64 labels)."""
    labels = sample_labels(indices, model.num_classes, global_seed, options.labels)
    seeds = [image_seed(global_seed, i) for i in indices]
    latents = generate(
        model,
        diffusion,
        labels,
        seeds,
        cfg_scale=options.cfg_scale,
        cfg_pow=options.cfg_pow,
        guide_channels=options.guide_channels,
        sampler=options.sampler,
        eta=options.eta,
        device=device,
        autocast_dtype=options.autocast_dtype(),
        progress=progress,
    )
    images = codec.decode(latents)
    return as_rgb(to_uint8(images, options.rounding)), labels.numpy()


def iter_samples(
    model: torch.nn.Module,
    diffusion,
    codec,
    indices: Sequence[int],
    global_seed: int,
    options: SampleOptions,
    batch_size: int,
    device: torch.device | str | None = None,
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """Yield (indices, uint8 NHWC images, labels) batch by batch over ``indices``."""
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        images, labels = sample_batch(model, diffusion, codec, chunk, global_seed, options, device)
        yield chunk, images, labels
