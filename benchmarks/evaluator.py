"""Evaluator cost for N images on this device: Inception features (TF1 resize + network) per
image, the Fréchet distance at 2048-d (ADM's sqrtm and the eigenvalue form), and precision/recall
(fp16 distances) for N samples against N references. Prints one JSON object.

    python benchmarks/evaluator.py --images 64 --image-size 256
    python benchmarks/evaluator.py --images 2000 --inception /path/to/inception-2015-12-05.pt

Extrapolate the feature time linearly to 50K + 10K images (one GPU) and divide by the ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdt_ds.metrics.evaluate import compute_activations  # noqa: E402
from mdt_ds.metrics.inception import load_extractor  # noqa: E402
from mdt_ds.metrics.precision_recall import precision_recall  # noqa: E402
from mdt_ds.metrics.stats import frechet_distance  # noqa: E402
from mdt_ds.monitor import device_name  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--inception", default=None)
    parser.add_argument("--skip-sqrtm", action="store_true", help="skip ADM's sqrtm (slow on small CPUs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    extractor, load_s = timed(lambda: load_extractor(args.inception, device))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, args.images, args.image_size, args.image_size, 3), dtype=np.uint8)
    compute_activations(images[0][:2], extractor, batch_size=2, device=device)  # warm-up
    acts, feat_s = timed(lambda: compute_activations(images[0], extractor, batch_size=args.batch_size, device=device))
    other = compute_activations(images[1], extractor, batch_size=args.batch_size, device=device)
    mu1, mu2 = acts.pool_stats.mean_cov()[0], other.pool_stats.mean_cov()[0]
    # N images give covariances of rank N - 1; time the distance on full-rank 2048-d ones.
    gen = np.random.default_rng(1)
    s1 = np.cov(gen.standard_normal((3000, 2048)), rowvar=False)
    s2 = np.cov(gen.standard_normal((3000, 2048)) * 1.1, rowvar=False)
    eigh_value, eigh_s = timed(lambda: frechet_distance(mu1, s1, mu2, s2, method="eigh"))
    report = {
        "benchmark": "evaluator",
        "images": args.images,
        "image_size": args.image_size,
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "features": extractor.description,
        "load_seconds": round(load_s, 2),
        "feature_seconds": round(feat_s, 2),
        "seconds_per_image": round(feat_s / args.images, 4),
        "fd_eigh_seconds": round(eigh_s, 2),
    }
    if not args.skip_sqrtm:
        sqrtm_value, sqrtm_s = timed(lambda: frechet_distance(mu1, s1, mu2, s2, method="sqrtm"))
        report.update(fd_sqrtm_seconds=round(sqrtm_s, 2), fd_relative_difference=abs(eigh_value / sqrtm_value - 1))
    _, pr_s = timed(lambda: precision_recall(acts.pool, other.pool, device=device))
    report["precision_recall_seconds"] = round(pr_s, 3)
    report["extrapolated_feature_hours_60k_images_one_device"] = round(feat_s / args.images * 60_000 / 3600, 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
