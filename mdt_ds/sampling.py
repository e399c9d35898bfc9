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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mdt_ds.diffusion.solvers import ODE_SOLVERS, SOLVER_FNS, OdeGrid, evaluation_plan
from mdt_ds.dist import derive_seed

SAMPLERS = ("ddpm", "ddim", *ODE_SOLVERS)
SPACINGS = ("auto", "time", "ddim", "logsnr")
# The grid each sampler uses under spacing="auto" (measured on the demo task: README, "Few-step sampling").
AUTO_SPACING = {"ddpm": "time", "ddim": "ddim", "dpm++2m": "logsnr", "heun": "time"}
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


class Denoiser:
    """The network as the samplers call it at original timestep ``k``: the release's CFG
    contract (batch doubled with the null label, one forward, guided eps, conditional half kept)
    where guidance applies, a plain conditional forward elsewhere. Guidance applies when
    ``cfg_scale > 1`` and ``k`` lies in ``interval`` (inclusive original timesteps; None: every
    step), so a step outside the interval costs one network evaluation per image instead of two
    (Kynkaenniemi et al. 2024, "Applying guidance in a limited interval improves sample and
    distribution quality in diffusion models"). ``calls`` counts evaluations per image."""

    def __init__(
        self, model: torch.nn.Module, labels: torch.Tensor, cfg_scale: float, cfg_pow: float, guide_channels: str,
        diffusion_steps: int, autocast_dtype: torch.dtype | None, interval: Sequence[int] | None = None,
    ):
        self.model, self.labels = model, labels
        self.cfg_scale, self.cfg_pow, self.guide_channels = cfg_scale, cfg_pow, guide_channels
        self.diffusion_steps, self.autocast_dtype = diffusion_steps, autocast_dtype
        self.interval = check_interval(interval, diffusion_steps)
        self.calls = 0

    def guided(self, k: int) -> bool:
        return guided_at(k, self.cfg_scale, self.interval)

    def __call__(self, x: torch.Tensor, k: int) -> torch.Tensor:
        t = torch.full((len(x),), int(k), device=x.device, dtype=torch.long)
        y = self.labels
        dtype = self.autocast_dtype
        ctx = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            if self.guided(k):
                self.calls += 2
                out = self.model.forward_with_cfg(
                    torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.model.num_classes)]),
                    self.cfg_scale, diffusion_steps=self.diffusion_steps, scale_pow=self.cfg_pow,
                    guide_channels=self.guide_channels,
                )[: len(x)]
            else:
                self.calls += 1
                out = self.model(x, t, y)
        return out.float()


def check_interval(interval: Sequence[int] | None, diffusion_steps: int = 1000) -> tuple[int, int] | None:
    """``(lo, hi)`` with ``0 <= lo <= hi < diffusion_steps``, or None (guidance on every step)."""
    if interval is None or len(interval) == 0:
        return None
    if len(interval) != 2 or not 0 <= int(interval[0]) <= int(interval[1]) < diffusion_steps:
        raise ValueError(f"the guidance interval must be two timesteps LO <= HI in 0..{diffusion_steps - 1}, "
                         f"got {list(interval)}")
    return int(interval[0]), int(interval[1])


def guided_at(k: int, cfg_scale: float, interval: tuple[int, int] | None) -> bool:
    """Whether the step at original timestep ``k`` runs classifier-free guidance."""
    return cfg_scale > 1.0 and (interval is None or interval[0] <= k <= interval[1])


def _steps(count: int, progress: bool) -> Iterable[int]:
    indices = range(count - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(indices, desc="sampling", leave=False)
    return indices


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
    cfg_interval: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    clip_denoised: bool = False,
    stats: dict | None = None,
) -> torch.Tensor:
    """Sample latents [N, C, H, W] (float32, on ``device``) for ``labels`` with per-image seeds.

    Image i's generator (CPU, seeded ``seeds[i]``) draws its x_T and every step's noise, so the
    result does not depend on batch composition. ``diffusion`` is a respaced diffusion (see
    :meth:`SampleOptions.diffusion`); the model always sees original timesteps. ``sampler``:
    "ddpm" (ancestral, learned variance), "ddim" (``eta`` 0: deterministic), or the ODE solvers
    "dpm++2m" / "heun" (:mod:`mdt_ds.diffusion.solvers`). ``cfg_scale > 1`` applies power-cosine
    classifier-free guidance (null label = ``model.num_classes``), only on steps whose timestep
    lies in ``cfg_interval`` when one is given. The model runs in eval mode (restored
    afterwards) and only its forward runs under ``autocast_dtype``; the diffusion maths stay
    float32. ``clip_denoised`` clamps predicted x_0 to [-1, 1]: right for pixel data, off for
    latents (as released). ``stats``, if given, receives ``network_calls_per_image``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    shape = (len(seeds), model.in_channels, model.input_size, model.input_size)
    noise = predraw_noise(seeds, 1 + noise_draws_per_run(sampler, eta, diffusion.num_timesteps), shape[1:], device)
    drawn = iter(noise)

    def noise_fn(like: torch.Tensor) -> torch.Tensor:
        return next(drawn).to(like.device, like.dtype, non_blocking=True)

    x = noise_fn(torch.empty(shape, device=device))
    steps = getattr(diffusion, "original_num_steps", diffusion.num_timesteps)
    denoiser = Denoiser(model, labels.to(device, torch.long), cfg_scale, cfg_pow, guide_channels, steps,
                        autocast_dtype, cfg_interval)
    timesteps = getattr(diffusion, "timestep_map", torch.arange(diffusion.num_timesteps)).tolist()
    was_training = model.training
    model.eval()
    try:
        if sampler in ODE_SOLVERS:
            grid = OdeGrid(diffusion.alphas_cumprod)

            def eps_fn(x: torch.Tensor, i: int) -> torch.Tensor:
                return denoiser(x, timesteps[i])[:, : x.shape[1]]

            x = SOLVER_FNS[sampler](eps_fn, x, grid, clip=clip_denoised, steps=_steps(len(grid), progress))
        else:
            for i in _steps(diffusion.num_timesteps, progress):
                t = torch.full((len(x),), i, device=device, dtype=torch.long)

                def model_fn(x_: torch.Tensor, _t: torch.Tensor, k: int = timesteps[i]) -> torch.Tensor:
                    return denoiser(x_, k)  # _t: the same original timestep k, as a tensor

                if sampler == "ddpm":
                    x = diffusion.p_sample(model_fn, x, t, noise_fn(x), clip_denoised=clip_denoised)
                else:
                    noise = noise_fn(x) if eta else None
                    x = diffusion.ddim_sample(model_fn, x, t, noise, eta=eta, clip_denoised=clip_denoised)
    finally:
        model.train(was_training)
    if stats is not None:
        stats["network_calls_per_image"] = denoiser.calls
    return x.float()


def noise_draws_per_run(sampler: str, eta: float, steps: int) -> int:
    """Noise tensors each image draws after its x_T: one per step for ancestral sampling (DDPM,
    DDIM with eta > 0), none for deterministic DDIM and the ODE solvers."""
    return steps if sampler == "ddpm" or (sampler == "ddim" and eta) else 0


def predraw_noise(seeds: Sequence[int], draws: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """``[draws, N, *shape]`` float32 noise on the host: image i's generator (CPU, seeded
    ``seeds[i]``) draws its ``draws`` tensors in the order the sampler uses them (x_T first), the
    same values one draw per step gives. Drawn before the first step into pinned memory when
    sampling on CUDA, so each step's copy is asynchronous: drawn per step and copied from
    pageable memory, every step waited for the host."""
    out = torch.empty((draws, len(seeds), *shape), pin_memory=device.type == "cuda")
    for i, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed))
        for k in range(draws):
            torch.randn(tuple(shape), generator=generator, out=out[k, i])
    return out


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


MIN_TILE = 64  # px: smaller samples are enlarged for people to judge (16x16 digits were 16 px tiles)


def enlarge(images: np.ndarray, min_size: int = MIN_TILE) -> np.ndarray:
    """uint8 NHWC enlarged by the smallest whole factor that makes each side at least ``min_size``,
    nearest-neighbour (a pixel stays a sharp block: no interpolation invents detail)."""
    factor = -(-min_size // max(1, min(images.shape[1], images.shape[2])))
    return images if factor <= 1 else images.repeat(factor, axis=1).repeat(factor, axis=2)


def _label_column(labels: Sequence[str], rows: int, cell: int, padding: int, height: int) -> np.ndarray:
    """A black column as tall as the grid with ``labels[r]`` in white, centred on row ``r``."""
    from PIL import Image, ImageDraw, ImageFont

    try:  # Pillow >= 10.1 scales its built-in font; a fifth of a tile, 10 to 24 px
        font = ImageFont.load_default(size=min(24, max(10, cell // 5)))
    except TypeError:
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = 2 * padding + 4 + max(int(draw.textlength(str(t), font=font)) for t in labels)
    column = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(column)
    for r in range(min(rows, len(labels))):
        y = padding + r * (cell + padding) + cell // 2
        draw.text((width // 2, y), str(labels[r]), fill=(255, 255, 255), font=font, anchor="mm")
    return np.asarray(column)


def save_grid(images: np.ndarray | torch.Tensor, path: str | Path, nrow: int = 8, padding: int = 2,
              row_labels: Sequence[str] | None = None, min_tile: int = 0) -> Path:
    """Write a PNG grid, ``nrow`` images per row (torchvision's ``make_grid`` layout, black
    padding). ``images``: uint8 NHWC (array or tensor) or float [-1, 1] NCHW tensor. Images
    smaller than ``min_tile`` px are enlarged first (:func:`enlarge`); ``row_labels`` (e.g. one
    class name per row) are written in a column on the left (the grid is then saved as RGB)."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().numpy() if images.dtype == torch.uint8 else to_uint8(images)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"save_grid needs uint8 NHWC images, got {images.dtype} {images.shape}")
    images = enlarge(images, min_tile) if min_tile else images
    n, h, w, c = images.shape
    ncol = max(1, min(nrow, n))
    rows = -(-n // ncol)
    grid = np.zeros((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = img
    if row_labels:
        rgb = as_rgb(grid[None])[0]
        grid = np.concatenate([_label_column(row_labels, rows, h, padding, len(grid)), rgb], axis=1)
        c = 3
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


# --------------------------------------------------------------------------- batches of images
@dataclass(frozen=True)
class SampleOptions:
    """How images are made; the defaults are the release's FID-50K protocol except guidance,
    which callers set (the published FID uses cfg_scale 3.8, pow 4). ``spacing`` picks the kept
    timesteps: "time" spreads them evenly over 0..T-1 (ADM respacing), "ddim" uses DDIM's integer
    stride, "logsnr" spreads them evenly in log-SNR; "auto" is ``AUTO_SPACING[sampler]``.
    ``cfg_interval`` (LO, HI) limits guidance to original timesteps LO..HI."""

    cfg_scale: float = 1.0
    cfg_pow: float = 4.0
    guide_channels: str = "release"
    sampler: str = "ddpm"
    steps: int = 250
    eta: float = 0.0
    labels: str = "uniform"
    rounding: str = "truncate"
    autocast: str = "none"  # "none", "bf16", "fp16"
    spacing: str = "auto"
    cfg_interval: tuple[int, int] | None = None
    num_timesteps: int = 1000  # the diffusion the model was trained on (diffusion.num_timesteps)
    # Labels come from the first label_classes classes (0: all of the model's label rows): a run
    # trained on fewer classes than its model has rows (data.untrained_classes) samples its own.
    label_classes: int = 0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")
        object.__setattr__(self, "cfg_interval", check_interval(self.cfg_interval, self.num_timesteps))

    def respacing(self) -> list[int]:
        """The kept (original) timesteps, ascending."""
        from mdt_ds.diffusion import linear_beta_schedule, space_timesteps
        from mdt_ds.diffusion.respace import logsnr_timesteps

        total = self.num_timesteps
        spacing = AUTO_SPACING[self.sampler] if self.spacing == "auto" else self.spacing
        if spacing == "ddim":
            return space_timesteps(total, f"ddim{self.steps}")
        if spacing == "logsnr":
            return logsnr_timesteps(torch.cumprod(1 - linear_beta_schedule(total), 0), self.steps)
        return space_timesteps(total, str(self.steps))

    def diffusion(self):
        """The respaced diffusion ``generate`` runs on."""
        from mdt_ds.diffusion import SpacedDiffusion, linear_beta_schedule

        return SpacedDiffusion(linear_beta_schedule(self.num_timesteps), self.respacing())

    def network_calls(self) -> int:
        """Network evaluations per image (a guided step costs two), known before sampling."""
        kept = self.respacing()
        plan = evaluation_plan(self.sampler, len(kept)) if self.sampler in ODE_SOLVERS else range(len(kept))
        return sum(2 if guided_at(kept[i], self.cfg_scale, self.cfg_interval) else 1 for i in plan)

    def autocast_dtype(self) -> torch.dtype | None:
        return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]

    def as_dict(self) -> dict:
        out = asdict(self)
        # Written only when set: settings recorded before these options existed still match.
        if out["spacing"] == "auto":
            del out["spacing"]
        if out["num_timesteps"] == 1000:
            del out["num_timesteps"]
        if not out["label_classes"]:
            del out["label_classes"]
        if out["cfg_interval"] is None:
            del out["cfg_interval"]
        else:
            out["cfg_interval"] = list(out["cfg_interval"])
        return out


def sample_batch(
    model: torch.nn.Module,
    diffusion,
    codec,
    indices: Sequence[int],
    global_seed: int,
    options: SampleOptions,
    device: torch.device | str | None = None,
    progress: bool = False,
    stats: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``indices`` of the run ``global_seed``: (uint8 NHWC RGB, int64 labels); ``stats``
    as in :func:`generate`."""
    labels = sample_labels(indices, options.label_classes or model.num_classes, global_seed, options.labels)
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
        cfg_interval=options.cfg_interval,
        device=device,
        autocast_dtype=options.autocast_dtype(),
        progress=progress,
        stats=stats,
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
