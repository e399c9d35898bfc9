"""In-training FID: sample a few thousand images with the per-image seeds of
:mod:`mdt_ds.sampling`, extract Inception features on the fly (no images kept, no files) and
compare with a reference batch. Every rank samples its block of the indices; statistics
all-reduce; rank 0 computes the distances and broadcasts them.

The trainer calls::

    from mdt_ds.metrics import fid_for_model
    result = fid_for_model(ema_model, codec, "VIRTUAL_imagenet256_labeled.npz", num_images=5000,
                           options=SampleOptions(sampler="ddim", steps=50, cfg_scale=1.0))
    # on every rank: {"fid": ..., "sfid": ..., "num_images": 5000, "seconds": ...}
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from mdt_ds import dist
from mdt_ds.metrics.evaluate import FeatureAccumulator, compute_activations, rank_block
from mdt_ds.metrics.inception import FeatureExtractor, load_extractor
from mdt_ds.metrics.npz import AdmBatch
from mdt_ds.metrics.stats import comm_device, frechet_distance

RefStats = dict[str, tuple[np.ndarray, np.ndarray]]
_EXTRACTORS: dict[tuple, FeatureExtractor] = {}
_REFERENCES: dict[tuple, RefStats] = {}


def cached_extractor(spec: str | None, device: torch.device) -> FeatureExtractor:
    """Load the feature network once per (spec, device) and process."""
    key = (spec, str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = load_extractor(spec, device)
    return _EXTRACTORS[key]


def reference_statistics(
    ref: str | Path | RefStats, extractor: FeatureExtractor, device: torch.device, batch_size: int = 64
) -> RefStats:
    """Stored ``mu/sigma`` (``mu_s/sigma_s``) of an ADM batch, else computed from its images once
    per process (collective in that case); a dict of statistics is returned as is."""
    if isinstance(ref, dict):
        return ref
    path = Path(ref).resolve()
    key = (str(path), path.stat().st_mtime_ns, id(extractor))
    if key not in _REFERENCES:
        batch = AdmBatch(path, require_images=False)
        stats = batch.statistics()
        if "pool" not in stats or ("spatial" not in stats and extractor.spatial_dim):
            if batch.images is None:
                raise ValueError(f"{path}: no stored statistics and no images (arr_0)")
            acts = compute_activations(
                batch.images, extractor, batch_size=batch_size, device=device, keep_pool=False, keep_probs=False
            )
            stats = {**acts.statistics(), **stats}
        _REFERENCES[key] = stats
    return _REFERENCES[key]


def fid_for_model(
    model: torch.nn.Module,
    codec,
    ref: str | Path | RefStats,
    *,
    num_images: int = 5000,
    batch_size: int = 32,
    seed: int = 0,
    options=None,
    inception: str | None = None,
    extractor: FeatureExtractor | None = None,
    device: torch.device | str | None = None,
    fd_method: str = "eigh",
    progress: bool = False,
) -> dict[str, float]:
    """FID (and sFID when the features allow) of ``num_images`` samples of ``model`` against
    ``ref``. Collective: call it on every rank; every rank gets the same dict. ``options`` is a
    :class:`mdt_ds.sampling.SampleOptions` (default: DDPM-250 without guidance, uniform labels,
    truncation); ``inception`` a weights spec (see :mod:`mdt_ds.metrics.inception`);
    ``fd_method="eigh"`` is the fast eigenvalue form (``"sqrtm"``: ADM's exact code). Sampling
    and decoding run on ``device`` (default: the model's); the codec is moved there (in place),
    and on CUDA sampling runs with TF32 on."""
    from mdt_ds.sampling import SampleOptions, iter_samples, sampling_tf32

    start = time.time()
    options = options or SampleOptions()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # Decode where the latents are made: a CPU VAE would hold rank 0 (and every rank waiting on
    # it) for minutes on a GPU run.
    codec = codec.to(device) if hasattr(codec, "to") else codec
    extractor = extractor or cached_extractor(inception, device)
    ref_stats = reference_statistics(ref, extractor, device)
    diffusion = options.diffusion()
    acc = FeatureAccumulator(extractor, device, keep_pool=False, keep_probs=False)
    block = rank_block(num_images)
    bar = None
    if progress and dist.rank() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_images, desc="fid samples", unit="img", dynamic_ncols=True)
    with sampling_tf32(device):  # the extractor switches TF32 off inside itself, as ADM's TF graph runs
        for indices, images, _ in iter_samples(model, diffusion, codec, block, seed, options, batch_size, device):
            acc.add(images)
            if bar is not None:
                bar.update(len(indices) * dist.world_size())
    if bar is not None:
        bar.close()
    stats = acc.finish().statistics()
    values = torch.full((2,), float("nan"), dtype=torch.float64)
    if dist.rank() == 0:
        values[0] = frechet_distance(*stats["pool"], *ref_stats["pool"], method=fd_method)
        if "spatial" in stats and "spatial" in ref_stats:
            values[1] = frechet_distance(*stats["spatial"], *ref_stats["spatial"], method=fd_method)
    if torch.distributed.is_initialized() and dist.world_size() > 1:
        values = values.to(comm_device())
        torch.distributed.broadcast(values, src=0)
        values = values.cpu()
    return {"fid": float(values[0]), "sfid": float(values[1]), "num_images": num_images, "seconds": time.time() - start}
