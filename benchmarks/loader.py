"""Training-stream throughput: latents/s per process for VAE-moment shards, by worker count.

Writes synthetic shards (random bf16 moments of image and flip, ``[2, 8, 32, 32]`` for 32x32x4
latents, the shape of 256x256 ImageNet) once into a cache folder, then times the stream as the
trainer uses it: resampled shards, per-sample crc32 and label checks, shuffle buffer, batching,
the vectorised posterior draw and flip.
Prints one JSON object. Target: >= 10,000 latents/s per process for 32x32x4 on the project's CPU.

    python benchmarks/loader.py --workers 0 1 2 --batch-size 256 --seconds 10

``crc_side_by_side`` times 0 workers with zlib-ng's crc32 and with zlib's own, alternated in one
run (the two compute the same checksums; only the speed differs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdt_ds.data.loader import build_loader  # noqa: E402
from mdt_ds.data.shards import (  # noqa: E402
    FORMAT_VERSION,
    MANIFEST,
    SampleLayout,
    build_manifest,
    write_manifest,
    write_shard,
)


def make_shards(directory: Path, latent: int, channels: int, samples: int, per_shard: int) -> Path:
    """Synthetic moments shards (cached: rebuilt only if the manifest is missing)."""
    if (directory / MANIFEST).is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    codec = {"name": "sd-vae", "source": "synthetic", "scale_factor": 0.18215}
    layout = SampleLayout("moments", (2, 2 * channels, latent, latent), "bfloat16", codec, latent * 8)
    gen = torch.Generator().manual_seed(0)
    records = []
    for s, start in enumerate(range(0, samples, per_shard)):
        n = min(per_shard, samples - start)
        moments = torch.randn((n, *layout.shape), generator=gen)
        moments[:, :, channels:] = moments[:, :, channels:] * 0.5 - 4.0  # plausible log-variances
        moments = moments.to(torch.bfloat16)
        rows = ((start + i, moments[i], (start + i) % 1000, f"synthetic/{start + i}") for i in range(n))
        records.append(write_shard(directory, f"train-{s:06d}.tar", layout, rows, sidecar=False))
    classes = {str(i): i for i in range(1000)}
    write_manifest(directory, build_manifest(layout, records, classes, per_shard, flip=True))
    return directory


def time_stream(directory: Path, workers: int, args: argparse.Namespace) -> dict[str, float]:
    loader = build_loader(
        str(directory),
        batch_size=args.batch_size,
        seed=0,
        rank=0,
        world_size=1,
        num_workers=workers,
        shuffle_buffer=args.shuffle_buffer,
    )
    it = iter(loader)
    for _ in range(args.warmup):  # worker start-up and the first shuffle-buffer fill
        next(it)
    n, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < args.seconds:
        x, _ = next(it)
        n += x.shape[0]
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del it
    result = {
        "workers": workers,
        "latents_per_s": round(n / elapsed, 1),
        "batches": n // args.batch_size,
        "seconds": round(elapsed, 2),
    }
    if workers == 0:
        # On a shared machine the wall-clock rate follows the load; the rate per CPU second of this
        # process is what it reaches with a core of its own.
        result["latents_per_cpu_s"] = round(n / max(cpu, 1e-9), 1)
    return result


def crc_side_by_side(directory: Path, args: argparse.Namespace, rounds: int = 2) -> dict[str, float]:
    """0-worker latents/s per CPU second with the per-sample check on zlib-ng's crc32, on zlib's,
    and off (what the check costs), alternated, best of ``rounds`` each."""
    import zlib

    from mdt_ds.data import loader, shards

    check, fast = loader.sample_problem, shards.fast_crc32
    variants = {"zlib-ng": (check, fast), "zlib": (check, zlib.crc32), "off": (lambda *a: None, fast)}
    best = dict.fromkeys(variants, 0.0)
    try:
        for _ in range(rounds):
            for name, (problem, crc) in variants.items():
                loader.sample_problem, shards.fast_crc32 = problem, crc
                best[name] = max(best[name], time_stream(directory, 0, args)["latents_per_cpu_s"])
    finally:
        loader.sample_problem, shards.fast_crc32 = check, fast
    return {**best, "check_cost_zlib_ng": round(1 - best["zlib-ng"] / best["off"], 3),
            "check_cost_zlib": round(1 - best["zlib"] / best["off"], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--per-shard", type=int, default=512)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "mdt-ds-bench-shards"))
    args = p.parse_args()
    torch.set_num_threads(1)  # one process of a multi-rank job: the trainer owns the other cores
    directory = make_shards(
        Path(args.cache) / f"v{FORMAT_VERSION}-c{args.channels}-l{args.latent}-n{args.samples}",
        args.latent,
        args.channels,
        args.samples,
        args.per_shard,
    )
    results = [time_stream(directory, w, args) for w in args.workers]
    crc = crc_side_by_side(directory, args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(
        json.dumps(
            {
                "benchmark": "loader",
                "latent_shape": [args.channels, args.latent, args.latent],
                "batch_size": args.batch_size,
                "shuffle_buffer": args.shuffle_buffer,
                "cpu_count": os.cpu_count(),
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "target_latents_per_s": 10000,
                "load_average_1min": load,
                "results": results,
                "crc_side_by_side": crc,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
