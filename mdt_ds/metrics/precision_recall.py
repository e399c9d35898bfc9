"""Improved precision and recall (Kynkäänniemi et al., 2019) as the ADM suite computes them
(guided-diffusion ``evaluations/evaluator.py``: ``ManifoldEstimator``, ``DistanceBlock``):

- squared Euclidean distances ``max(|u|^2 - 2 u.v + |v|^2, 0)`` computed in float16, with a
  float32 recomputation of a block only when some float16 value is not finite;
- k = 3 manifold radii (the 4th smallest distance of a row, the point itself included: ADM's
  ``np.partition(d, seq)[:, 3]``), over row and column blocks of 10,000;
- precision = fraction of samples inside some reference ball; recall = fraction of references
  inside some sample ball, with ``<=``.

TF's float16 matmul accumulates in float32 and rounds the result to float16; we do the same
(float32 products of float16-rounded inputs, rounded to float16), which also runs on CPUs.
"""

from __future__ import annotations

import torch

BATCH = 10_000


def _distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's ``_batch_pairwise_distances`` in the dtype of u and v (float16 or float32)."""
    norm_u = (u * u).float().sum(1).to(u.dtype)[:, None]
    norm_v = (v * v).float().sum(1).to(v.dtype)[None, :]
    uv = (u.float() @ v.float().T).to(u.dtype)
    return torch.clamp_min(norm_u - 2 * uv + norm_v, 0.0)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor, fp16: bool = True) -> torch.Tensor:
    """Float32 squared distances of one block: float16 first, float32 if that overflows."""
    if fp16:
        d16 = _distances(u.half(), v.half())
        if torch.isfinite(d16).all():
            return d16.float()
    return _distances(u.float(), v.float())


def manifold_radii(features: torch.Tensor, k: int = 3, batch: int = BATCH, fp16: bool = True) -> torch.Tensor:
    """Distance of every feature to its k-th nearest neighbour (itself excluded), [N]."""
    radii = []
    for begin1 in range(0, len(features), batch):
        rows = features[begin1 : begin1 + batch]
        best = None
        for begin2 in range(0, len(features), batch):
            d = pairwise_distances(rows, features[begin2 : begin2 + batch], fp16)
            block = torch.topk(d, min(k + 1, d.shape[1]), dim=1, largest=False).values
            best = block if best is None else torch.cat([best, block], dim=1)
            best = torch.topk(best, min(k + 1, best.shape[1]), dim=1, largest=False).values
        if best.shape[1] < k + 1:
            raise ValueError(f"precision/recall with k={k} needs more than {k} features, got {len(features)}")
        radii.append(best[:, k])
    return torch.cat(radii)


def evaluate_pr(
    ref: torch.Tensor,
    ref_radii: torch.Tensor,
    sample: torch.Tensor,
    sample_radii: torch.Tensor,
    batch: int = BATCH,
    fp16: bool = True,
) -> tuple[float, float]:
    """(precision, recall): ADM's ``evaluate_pr(ref, radii_ref, sample, radii_sample)``."""
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
    sample_in = torch.zeros(len(sample), dtype=torch.bool, device=ref.device)
    for begin1 in range(0, len(ref), batch):
        end1 = begin1 + batch
        for begin2 in range(0, len(sample), batch):
            end2 = begin2 + batch
            d = pairwise_distances(ref[begin1:end1], sample[begin2:end2], fp16)
            ref_in[begin1:end1] |= (d <= sample_radii[begin2:end2][None, :]).any(dim=1)
            sample_in[begin2:end2] |= (d <= ref_radii[begin1:end1][:, None]).any(dim=0)
    return sample_in.float().mean().item(), ref_in.float().mean().item()


def precision_recall(
    ref: torch.Tensor,
    sample: torch.Tensor,
    k: int = 3,
    batch: int = BATCH,
    fp16: bool = True,
    device: torch.device | str | None = None,
) -> tuple[float, float]:
    """ADM's ``compute_prec_recall(ref_acts, sample_acts)`` on pool_3 features."""
    ref = torch.as_tensor(ref, dtype=torch.float32).to(device or "cpu")
    sample = torch.as_tensor(sample, dtype=torch.float32).to(device or "cpu")
    ref_radii = manifold_radii(ref, k, batch, fp16)
    sample_radii = manifold_radii(sample, k, batch, fp16)
    return evaluate_pr(ref, ref_radii, sample, sample_radii, batch, fp16)
