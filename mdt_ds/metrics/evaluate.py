"""The ADM evaluation, distributed: every rank computes Inception features of its block of
images; FID and sFID come from float64 sufficient statistics all-reduced across ranks; the raw
pool_3 features (and softmax outputs, for IS) are gathered to rank 0 only, which computes
Inception Score, precision and recall. Works the same in one plain process.

ADM (guided-diffusion ``evaluations/evaluator.py``) reports, for a sample batch against a
reference batch: ``Inception Score``, ``FID``, ``sFID``, ``Precision``, ``Recall``, using stored
``mu/sigma`` (``mu_s/sigma_s``) of a batch instead of recomputing them when the batch has them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mdt_ds import dist
from mdt_ds.metrics.checks import protocol_checks
from mdt_ds.metrics.inception import FeatureExtractor, no_tf32
from mdt_ds.metrics.npz import AdmBatch
from mdt_ds.metrics.precision_recall import precision_recall
from mdt_ds.metrics.stats import FeatureStats, frechet_distance, gather_rows, inception_score

log = logging.getLogger(__name__)


@dataclass
class Activations:
    """Reduced statistics (every rank) and gathered raw features (rank 0 only, when kept)."""

    count: int
    pool_stats: FeatureStats
    spatial_stats: FeatureStats | None
    pool: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    seconds: float = 0.0

    def statistics(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {"pool": self.pool_stats.mean_cov()}
        if self.spatial_stats is not None:
            out["spatial"] = self.spatial_stats.mean_cov()
        return out


@dataclass
class FeatureAccumulator:
    """Feed uint8 NHWC batches on this rank; :meth:`finish` reduces and gathers (collective)."""

    extractor: FeatureExtractor
    device: torch.device
    keep_pool: bool = True
    keep_probs: bool = True
    _pool: list = field(default_factory=list)
    _probs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pool_stats = FeatureStats(self.extractor.pool_dim, self.device)
        spatial = self.extractor.spatial_dim
        self.spatial_stats = FeatureStats(spatial, self.device) if spatial else None
        self.keep_probs = self.keep_probs and self.extractor.has_logits
        self._start = time.time()

    @torch.no_grad()
    def add(self, images: np.ndarray | torch.Tensor) -> None:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.array(images, copy=True))  # memory maps are read-only
        batch = images.to(self.device)
        with no_tf32():
            out = self.extractor(batch)
        pool = out["pool"].float()
        self.pool_stats.update(pool)
        if self.spatial_stats is not None:
            self.spatial_stats.update(out["spatial"].float())
        if self.keep_pool:
            self._pool.append(pool.cpu())
        if self.keep_probs:
            self._probs.append(torch.softmax(out["logits"].float(), dim=1).cpu())

    def finish(self) -> Activations:
        self.pool_stats.all_reduce()
        if self.spatial_stats is not None:
            self.spatial_stats.all_reduce()
        pool = probs = None
        if self.keep_pool:
            pool = gather_rows(_cat(self._pool, self.extractor.pool_dim))
        if self.keep_probs:
            width = self._probs[0].shape[1] if self._probs else self.extractor.logits_weight.shape[0]
            probs = gather_rows(_cat(self._probs, width))
        return Activations(
            self.pool_stats.n, self.pool_stats, self.spatial_stats, pool, probs, time.time() - self._start
        )


def _cat(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, width)


def rank_block(n: int, rank: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous block of ``range(n)``; concatenating blocks in rank order gives 0..n-1."""
    rank = dist.rank() if rank is None else rank
    world = dist.world_size() if world is None else world
    return range(n * rank // world, n * (rank + 1) // world)


def compute_activations(
    images: np.ndarray,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    keep_pool: bool = True,
    keep_probs: bool = True,
    progress: bool = False,
    desc: str = "features",
) -> Activations:
    """Features of uint8 NHWC ``images`` (e.g. a memory map): collective over all ranks."""
    acc = FeatureAccumulator(extractor, torch.device(device), keep_pool, keep_probs)
    block = rank_block(len(images))
    bar = None
    if progress and dist.rank() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(images), desc=desc, unit="img", dynamic_ncols=True)
    for start in range(block.start, block.stop, batch_size):
        stop = min(start + batch_size, block.stop)
        acc.add(images[start:stop])
        if bar is not None:
            bar.update((stop - start) * dist.world_size())
    if bar is not None:
        bar.close()
    return acc.finish()


def evaluate_batches(
    ref_path: str | Path,
    sample_path: str | Path,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    fd_method: str = "sqrtm",
    pr_fp16: bool = True,
    progress: bool = False,
) -> dict | None:
    """ADM's evaluation of ``sample_path`` against ``ref_path``. Collective; returns the results on
    rank 0 and None elsewhere. Metrics the weights cannot give are None with a note."""
    start = time.time()
    ref = AdmBatch(ref_path, require_images=False)
    sample = AdmBatch(sample_path)
    if ref.images is None and "pool" not in ref.statistics():
        raise ValueError(f"{ref_path}: neither images (arr_0) nor stored statistics (mu, sigma)")
    kwargs = dict(batch_size=batch_size, device=device, progress=progress)
    ref_acts = None
    if ref.images is not None:
        ref_acts = compute_activations(ref.images, extractor, keep_probs=False, desc="reference", **kwargs)
    sample_acts = compute_activations(sample.images, extractor, desc="samples", **kwargs)
    if dist.rank() != 0:
        return None
    results = adm_metrics(ref, sample, ref_acts, sample_acts, fd_method, pr_fp16, device)
    results.update(protocol_checks(ref, sample, extractor))
    results.update(
        feature_seconds=(ref_acts.seconds if ref_acts else 0.0) + sample_acts.seconds, seconds=time.time() - start
    )
    return results


def adm_metrics(
    ref: AdmBatch,
    sample: AdmBatch,
    ref_acts: Activations | None,
    sample_acts: Activations,
    fd_method: str,
    pr_fp16: bool,
    device: torch.device | str,
) -> dict:
    """ADM's five numbers from the gathered activations (rank 0). A batch's stored statistics
    replace the computed ones, as ADM's ``read_statistics`` does."""
    ref_stats = {**(ref_acts.statistics() if ref_acts is not None else {}), **ref.statistics()}
    sample_stats = {**sample_acts.statistics(), **sample.statistics()}
    notes = []
    results = {
        "inception_score": None,
        "fid": frechet_distance(*sample_stats["pool"], *ref_stats["pool"], method=fd_method),
        "sfid": None,
        "precision": None,
        "recall": None,
        "num_samples": len(sample),
        "num_reference_images": len(ref),
        "reference_statistics": "stored" if "pool" in ref.statistics() else "computed",
    }
    if sample_acts.probs is not None:
        results["inception_score"] = inception_score(sample_acts.probs.numpy().astype(np.float32))
    else:
        notes.append(
            "Inception Score unavailable: these Inception weights have no logits layer "
            "(use NVIDIA's inception-2015-12-05.pt for IS)"
        )
    if "spatial" in sample_stats and "spatial" in ref_stats:
        results["sfid"] = frechet_distance(*sample_stats["spatial"], *ref_stats["spatial"], method=fd_method)
    else:
        notes.append("sFID unavailable: this backend gives no mixed_6/conv features")
    if ref_acts is not None:
        pr = precision_recall(ref_acts.pool, sample_acts.pool, fp16=pr_fp16, device=device)
        results["precision"], results["recall"] = pr
    else:
        notes.append("precision/recall unavailable: the reference batch has no images (arr_0)")
    results.update(notes=notes, fd_method=fd_method, pr_distances="fp16 (fp32 fallback)" if pr_fp16 else "fp32")
    return results


def format_results(results: dict) -> str:
    """ADM's printout."""
    names = [
        ("inception_score", "Inception Score"),
        ("fid", "FID"),
        ("sfid", "sFID"),
        ("precision", "Precision"),
        ("recall", "Recall"),
    ]
    lines = [f"{label}: {'unavailable' if results[key] is None else results[key]}" for key, label in names]
    notes = [f"note: {n}" for n in results.get("notes", [])]
    return "\n".join(lines + notes + [f"warning: {w}" for w in results.get("warnings", [])])
