"""What makes an FID number incomparable, said before the features are computed and recorded in
``metrics.json``: too few images for the feature dimension, and sample and reference images of
different sizes (the network resizes both, so FID then also measures the resampling).

With N images the covariance has rank at most N - 1: at N <= 2048 (Inception's pool_3 width)
Sigma is singular, sqrtm of the product is ill-defined and FID is biased far above its 50K value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mdt_ds.metrics.inception import FeatureExtractor
from mdt_ds.metrics.npz import AdmBatch


def reference_summary(path: Path) -> dict[str, Any]:
    """The summary ``mdt-eval ref`` wrote beside a reference batch (``REF.json``), or {}: it knows
    how many images stored statistics were computed from, which the .npz does not say."""
    summary = path.with_suffix(".json")
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and "images_in_statistics" in data else {}


def _size(batch: AdmBatch) -> list[int] | None:
    return None if batch.images is None else [int(batch.images.shape[1]), int(batch.images.shape[2])]


def protocol_checks(ref: AdmBatch, sample: AdmBatch, extractor: FeatureExtractor) -> dict[str, Any]:
    """N of both sides (the reference's N is that of its statistics: stored ones count what the
    summary JSON beside the batch says, else unknown), the image sizes, the feature network's
    source and resize, and a ``warnings`` list."""
    description = getattr(extractor, "description", {})
    dim, size = extractor.pool_dim, getattr(extractor, "input_size", None)
    resize = f"{description.get('resize', 'unknown')} to {size}x{size}" if size else description.get("resize")
    summary = reference_summary(ref.path) if "pool" in ref.statistics() else {}
    ref_n = summary.get("images_in_statistics") if "pool" in ref.statistics() else len(ref)
    ref_size = _size(ref) or ([summary["image_size"]] * 2 if "image_size" in summary else None)
    record = {
        "num_samples": len(sample),
        "reference_statistics_images": ref_n,
        "sample_image_size": _size(sample),
        "reference_image_size": ref_size,
        "inception_source": description.get("source") or description.get("network"),
        "resize": resize,
        "feature_dim": dim,
    }
    warnings = []
    for side, n in (("sample", len(sample)), ("reference", ref_n)):
        if n is not None and n <= dim:
            warnings.append(
                f"{side} N={n} is not above the feature dimension {dim}: its covariance has rank at most "
                f"{max(n - 1, 0)} < {dim}, so FID is rank-deficient and meaningless (ADM's protocol: 50,000 samples)"
            )
    if ref_size is not None and record["sample_image_size"] != ref_size:
        (sh, sw), (rh, rw) = record["sample_image_size"], ref_size
        warnings.append(
            f"sample images are {sh}x{sw} but reference images are {rh}x{rw}: both are resized ({resize}), so FID "
            "also measures the resampling; generate samples at the reference size"
        )
    return {**record, "warnings": warnings}
