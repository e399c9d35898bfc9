"""``mdt-extract-latents``: ImageNet-style images -> VAE-moment (or pixel) shards + manifest.json.

Runs as one process, under torchrun or under srun (``mdt_ds.dist.launcher_env``). Sample ``i`` is
input item ``order[i]`` (a fixed seeded permutation, so every shard mixes classes); shard ``s``
holds samples ``[s * P, (s + 1) * P)`` and belongs to rank ``s % world``. A shard's bytes depend
only on its samples (encoding batches never cross a shard boundary), each shard is written
atomically with a sidecar that marks it done, and a rerun skips finished shards. Every sample
carries a crc32 (``shards.encode_sample``) that the training loader checks. Rank 0 waits for
every sidecar and writes the manifest; no collective is needed, so no process group is created.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdt_ds.data.imagenet import ImageItems, InputError, Item, list_inputs
from mdt_ds.data.shards import (
    FORMAT_VERSION,
    SampleLayout,
    ShardError,
    ShardRecord,
    atomic_write,
    build_manifest,
    read_sidecar,
    shard_name,
    verify_shards,
    write_manifest,
    write_shard,
)
from mdt_ds.dist import launcher_env, local_gpu
from mdt_ds.models.codec import CodecError, load_codec

log = logging.getLogger("mdt_ds.extract")


def default_workers() -> int:
    """Up to 4 decoding processes, never more than the CPUs we may run on (more only makes torch's
    DataLoader warn and the processes compete)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cpus))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from mdt_ds.clihelp import HelpFormatter

    p = argparse.ArgumentParser(
        prog="mdt-extract-latents", description="ImageNet-style images -> VAE-moment (or pixel) shards + manifest.json.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--input",
        help="ImageNet-style train/ folder (<wnid>/*.JPEG), or image tars "
        "(a folder of .tar, a glob or a brace pattern; <key>.jpg + <key>.cls)",
    )
    p.add_argument("--output", help="output folder for the shards and manifest.json")
    p.add_argument(
        "--codec",
        default="mse",
        help="'mse'/'ema' (SD VAE), a hub id, a local VAE folder, 'pixel', or 'tiny-random' (tests)",
    )
    p.add_argument("--image-size", type=int, default=256,
                   help="ADM centre crop size in pixels, e.g. 256 or 512 (32 or 64 for small tests); "
                   "a multiple of 8 for a VAE")
    p.add_argument("--samples-per-shard", type=int, default=1000,
                   help="samples per output shard (a rerun redoes unfinished shards only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE call (the flips double it)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="image decoding processes per rank (0: in-process); default min(4, CPUs this process may use)")
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16"),
        default="float16",
        help="stored moments dtype; float16 keeps 3 more mantissa bits than bfloat16, and every value is "
        "checked to fit it (|x| <= 65504); bfloat16 has fp32's range",
    )
    p.add_argument(
        "--store",
        choices=("moments", "mean"),
        default="moments",
        help="mean and log-variance (fresh posterior samples in training) or the mean only",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="VAE compute dtype: fp32 (as the release encodes; 'auto' is the same) or bf16 (faster on GPUs)",
    )
    p.add_argument("--device", default="", help="default: cuda:<local rank> if available, else cpu")
    p.add_argument("--order-seed", type=int, default=0, help="seed of the fixed sample order; -1 keeps input order")
    p.add_argument("--limit", type=int, default=0, help="only the first N samples of that order (trials)")
    p.add_argument("--prefix", default="train", help="shard file names: PREFIX-000000.tar, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--wait-timeout", type=float, default=6 * 3600, help="seconds rank 0 waits for other ranks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verify", metavar="DIR", help="check every shard's sha256 against DIR/manifest.json and exit")
    args = p.parse_args(argv)
    if not args.verify and (not args.input or not args.output):
        p.error("--input and --output are required (or --verify DIR)")
    return args


def make_layout(codec: Any, args: argparse.Namespace) -> SampleLayout:
    size = args.image_size
    if codec.name == "pixel":
        return SampleLayout("pixels", (3, size, size), "uint8", codec.describe(), size)
    if size % codec.downsample:
        raise CodecError(f"--image-size {size} is not a multiple of the VAE's downsampling {codec.downsample}")
    h = size // codec.downsample
    channels = 2 * codec.channels if args.store == "moments" else codec.channels
    moments = "mean_logvar" if args.store == "moments" else "mean"
    return SampleLayout("moments", (2, channels, h, h), args.dtype, codec.describe(), size, moments)


def sample_order(n_items: int, seed: int, limit: int) -> list[int]:
    order = list(range(n_items))
    if seed >= 0:
        random.Random(seed).shuffle(order)  # stable across Python versions and machines
    return order[:limit] if limit > 0 else order


def _keep(batch: list) -> list:
    return batch


def check_range(moments: torch.Tensor, rows: list, layout: SampleLayout) -> None:
    """Refuse moments that are non-finite or would overflow the stored dtype (float16: |x| > 65504
    becomes inf). SD-VAE means and log-variances are far inside that range, so a failure means a
    broken image or VAE, or a VAE whose latents are unusually large."""
    flat = moments.flatten(1)
    finite = torch.isfinite(flat).all(1)
    limit = torch.finfo(layout.torch_dtype).max
    fits = flat.abs().amax(1) <= limit
    bad = torch.nonzero(~(finite & fits)).flatten().tolist()  # one sync per batch
    if not bad:
        return
    i, key = rows[bad[0]][0], rows[bad[0]][3]
    if not bool(finite[bad[0]]):
        raise ShardError(
            f"image {key} (sample {i}): the VAE moments are not finite (NaN/inf); check the image, "
            "and encode with --precision fp32 if it ran in bf16"
        )
    peak = float(flat[bad[0]].abs().amax())
    raise ShardError(
        f"image {key} (sample {i}): a VAE moment of magnitude {peak:.4g} overflows --dtype {layout.dtype} "
        f"(largest finite value {limit:.6g}); store the moments with --dtype bfloat16"
    )


def encode_batch(rows: list, codec: Any, layout: SampleLayout) -> list[torch.Tensor]:
    """Decoded crops -> per-sample arrays in the stored dtype (moments of image and flip, or pixels).
    Moments are range-checked against the stored dtype before the cast (``check_range``)."""
    pixels = torch.from_numpy(np.stack([r[1] for r in rows])).permute(0, 3, 1, 2)
    if layout.kind == "pixels":
        return list(pixels.contiguous())
    x = pixels.float().div_(127.5).sub_(1.0)
    n = len(rows)
    moments = codec.encode_moments(torch.cat([x, x.flip(-1)])).float().cpu()
    moments = torch.stack([moments[:n], moments[n:]], 1)  # [n, 2 (image, flip), 2C, h, w]
    if layout.moments == "mean":
        moments = moments[:, :, : layout.shape[1]]
    check_range(moments, rows, layout)
    return list(moments.to(layout.torch_dtype).contiguous())


class ShardEncoder:
    """Encodes this rank's unfinished shards, writing each as soon as its last batch is done."""

    def __init__(self, items: list[Item], codec: Any, layout: SampleLayout, args: argparse.Namespace, out: Path):
        self.items, self.codec, self.layout, self.args, self.out = items, codec, layout, args, out
        self.per_shard = args.samples_per_shard
        self.records: dict[int, ShardRecord] = {}

    def shard_range(self, s: int) -> range:
        return range(s * self.per_shard, min((s + 1) * self.per_shard, len(self.items)))

    def run(self, shards: list[int], progress: Any) -> None:
        bs = self.args.batch_size
        batches = [list(r[b : b + bs]) for s in shards for r in [self.shard_range(s)] for b in range(0, len(r), bs)]
        loader = torch.utils.data.DataLoader(
            ImageItems(self.items, self.args.image_size),
            batch_sampler=batches,
            collate_fn=_keep,
            num_workers=self.args.workers,
            prefetch_factor=4 if self.args.workers else None,
        )
        pending: dict[int, tuple[list, list]] = {}
        for rows in loader:
            s = rows[0][0] // self.per_shard
            samples, skipped = pending.setdefault(s, ([], []))
            good = []
            for i, arr, label, key, err in rows:
                if arr is None:
                    log.warning("skipping unreadable image %s (sample %d): %s", key, i, err)
                    skipped.append({"key": key, "reason": err})
                else:
                    good.append((i, arr, label, key))
            if good:
                arrays = encode_batch(good, self.codec, self.layout)
                samples.extend((i, a, label, key) for (i, _, label, key), a in zip(good, arrays))
            progress.update(len(rows))
            if rows[-1][0] == self.shard_range(s)[-1]:
                self.records[s] = write_shard(self.out, shard_name(self.args.prefix, s), self.layout, samples, skipped)
                del pending[s]


def wait_for_shards(out: Path, names: list[str], layout: SampleLayout, timeout: float) -> list[ShardRecord]:
    """Rank 0: poll the sidecars until every shard is finished (other ranks write theirs)."""
    deadline, last_note = time.monotonic() + timeout, time.monotonic()
    while True:
        records = [read_sidecar(out, name, layout) for name in names]
        missing = [n for n, r in zip(names, records) if r is None]
        if not missing:
            return records  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise ShardError(
                f"{len(missing)} shards (e.g. {missing[0]}) were not finished by the other ranks "
                f"within {timeout:.0f}s; rerun the same command to finish them (finished shards are kept)"
            )
        if time.monotonic() - last_note > 60:
            log.info("waiting for %d shards from other ranks", len(missing))
            last_note = time.monotonic()
        time.sleep(0.5)


def check_run_config(out: Path, config: dict[str, Any]) -> None:
    """One output folder, one extraction: refuse to mix shards of different inputs or shard sizes."""
    path = out / "extract_config.json"
    text = json.dumps(config, indent=1, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() != text:
        raise ShardError(
            f"{path} describes another extraction (input count, order, shard size or layout); use a new --output folder"
        )
    atomic_write(path, text.encode())  # every rank writes the same bytes; the rename is atomic


def _setup_logging(rank: int) -> None:
    # Rank 0 reports progress; the others only warn (bad images are named by whichever rank meets them).
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stderr,
        format=f"[rank {rank}] %(levelname)s %(message)s",
    )


def _load_codec(args: argparse.Namespace, local_rank: int) -> Any:
    # cuda:0 under srun --gpus-per-task=1, which shows each task only its own GPU
    device = torch.device(args.device or (f"cuda:{local_gpu(local_rank, torch.cuda.device_count())}"
                                          if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # The current device too: kernels and libraries that allocate on "the" device (cuDNN
        # workspaces, the VAE's caches) would otherwise all land on cuda:0 beside rank 0.
        torch.cuda.set_device(device)
    codec = load_codec(args.codec, device)
    # fp32 by default on every device, as the release encodes; bf16 only when asked for.
    if hasattr(codec, "vae") and args.precision == "bf16":
        codec.vae.to(torch.bfloat16)
    return codec


def _encode_mine(encoder: ShardEncoder, todo: list[int], rank: int, world: int, quiet: bool) -> tuple[int, float]:
    """Encode this rank's shards under a progress bar (rank 0 only); returns (images, seconds)."""
    from tqdm import tqdm

    total = sum(len(encoder.shard_range(s)) for s in todo)
    bar = tqdm(total=total, unit="img", desc=f"rank 0/{world}", disable=rank != 0 or quiet, file=sys.stderr)
    start = time.time()
    with bar:
        encoder.run(todo, bar)
    return total, time.time() - start


def _finish(
    out: Path,
    names: list[str],
    layout: SampleLayout,
    classes: dict[str, int],
    args: argparse.Namespace,
    source: dict[str, Any],
) -> dict[str, Any]:
    """Rank 0: wait for every shard, write the manifest, return the totals."""
    records = wait_for_shards(out, names, layout, args.wait_timeout)
    manifest = build_manifest(layout, records, classes, args.samples_per_shard, flip=True, extra={"source": source})
    write_manifest(out, manifest)
    return {
        "images": manifest["num_samples"],
        "shards": len(records),
        "skipped": manifest["num_skipped"],
        "bytes": sum(r.bytes for r in records),
    }


def extract(args: argparse.Namespace) -> dict[str, Any]:
    """Encode this rank's share of the shards; rank 0 then writes the manifest. Returns a summary."""
    env = launcher_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    items, classes = list_inputs(args.input)
    order = sample_order(len(items), args.order_seed, args.limit)
    items = [items[j] for j in order]
    codec = _load_codec(args, env.local_rank)
    layout = make_layout(codec, args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    source = {
        "input_kind": "tars" if items[0].member else "folder",
        "num_inputs": len(order),
        "order_seed": args.order_seed,
    }
    # The format version is part of the run: a rerun into a folder of older shards (no per-sample
    # checksums) must not mix them with new ones.
    run = dict(source, limit=args.limit, samples_per_shard=args.samples_per_shard, fingerprint=layout.fingerprint)
    check_run_config(out, dict(run, format_version=FORMAT_VERSION))
    names = [shard_name(args.prefix, s) for s in range(math.ceil(len(items) / args.samples_per_shard))]
    mine = [s for s in range(len(names)) if s % env.world_size == env.rank]
    todo = [s for s in mine if read_sidecar(out, names[s], layout) is None]
    if env.rank == 0:
        log.info(
            "%d images, %d classes -> %d shards in %s; %d ranks; this rank: %d shards to do (%d already done)",
            len(items),
            len(classes),
            len(names),
            out,
            env.world_size,
            len(todo),
            len(mine) - len(todo),
        )
    encoder = ShardEncoder(items, codec, layout, args, out)
    images, seconds = _encode_mine(encoder, todo, env.rank, env.world_size, args.no_progress)
    summary: dict[str, Any] = {"rank": env.rank, "written": len(todo)}
    if env.rank == 0:
        summary.update(_finish(out, names, layout, classes, args, source))
        log.info(
            "done: %d images in %d shards (%d written now), %d skipped, %.1f MB, %.1f s (%.1f img/s on rank 0)",
            summary["images"],
            summary["shards"],
            len(todo),
            summary["skipped"],
            summary["bytes"] / 1e6,
            time.time() - start,
            images / max(seconds, 1e-9),
        )
    summary["seconds"] = round(time.time() - start, 2)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging(launcher_env().rank)
    try:
        if args.verify:
            bad = verify_shards(args.verify)
            for name in bad:
                log.error("shard %s does not match its sha256 in the manifest", name)
            log.info("%s: %s", args.verify, "all shards match" if not bad else f"{len(bad)} bad shards")
            return 1 if bad else 0
        extract(args)
    except (InputError, ShardError, CodecError) as err:
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
