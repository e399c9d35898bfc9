"""Reference batches as ADM makes them (``VIRTUAL_imagenet256_labeled.npz``): statistics of the
WHOLE image set (``mu``, ``sigma`` on pool_3; ``mu_s``, ``sigma_s`` on the sFID feature, float64)
and a random subset of 10,000 images (``arr_0``, uint8 NHWC, with labels in ``arr_1``) for
precision and recall.

Sources are images, never latent shards (which hold no images): an ImageNet-style class folder
tree or image webdataset tars (ADM centre crop to ``image_size``, via :mod:`mdt_ds.data.imagenet`),
or an image ``.npz``. Distributed: every rank reads its block; statistics all-reduce exactly;
the kept images are gathered to rank 0, which writes the file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from mdt_ds import dist
from mdt_ds.metrics.evaluate import FeatureAccumulator, rank_block
from mdt_ds.metrics.inception import FeatureExtractor
from mdt_ds.metrics.npz import AdmBatch, NpzWriter
from mdt_ds.metrics.stats import gather_rows

log = logging.getLogger(__name__)


def _collate(batch: list) -> list:
    return batch


def _image_batches(source: Path, block: range, image_size: int, batch_size: int, workers: int):
    """Yield (indices, uint8 NHWC images, labels) over ``block`` of the source's items."""
    if source.suffix == ".npz":
        batch = AdmBatch(source)
        for start in range(block.start, block.stop, batch_size):
            stop = min(start + batch_size, block.stop)
            labels = batch.labels[start:stop] if batch.labels is not None else np.full(stop - start, -1)
            yield np.arange(start, stop), np.asarray(batch.images[start:stop]), np.asarray(labels, np.int64)
        return
    from mdt_ds.data.imagenet import ImageItems, list_inputs

    items, _ = list_inputs(str(source))
    dataset = torch.utils.data.Subset(ImageItems(items, image_size), list(block))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate)
    for rows in loader:
        good = [r for r in rows if r[1] is not None]
        for r in rows:
            if r[1] is None:
                log.warning("skipping unreadable image %s: %s", r[3], r[4])
        if good:
            yield (
                np.array([r[0] for r in good]),
                np.stack([r[1] for r in good]),
                np.array([r[2] for r in good], dtype=np.int64),
            )


def source_shape(source: Path, image_size: int) -> tuple[int, tuple[int, ...]]:
    """(number of items, image shape HWC) of a source."""
    if source.suffix == ".npz":
        batch = AdmBatch(source)
        return len(batch), tuple(batch.images.shape[1:])
    from mdt_ds.data.imagenet import list_inputs

    return len(list_inputs(str(source))[0]), (image_size, image_size, 3)


def _read_block(source: Path, keep: np.ndarray, acc: FeatureAccumulator, total: int, args: dict, progress: bool):
    """Features of this rank's block into ``acc``; returns its kept (images, labels, indices)."""
    kept: tuple[list, list, list] = ([], [], [])
    bar = None
    if progress and dist.rank() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="reference", unit="img", dynamic_ncols=True)
    for indices, images, labels in _image_batches(source, rank_block(total), **args):
        acc.add(images)
        mask = np.isin(indices, keep)
        for store, values in zip(kept, (images, labels, indices)):
            store.append(torch.from_numpy(np.ascontiguousarray(values[mask])))
        if bar is not None:
            bar.update(len(indices) * dist.world_size())
    if bar is not None:
        bar.close()
    return kept


def build_reference(
    source: str | Path,
    out: str | Path,
    extractor: FeatureExtractor,
    *,
    image_size: int = 256,
    num_images: int = 10_000,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    workers: int = 4,
    progress: bool = False,
) -> dict | None:
    """Write an ADM reference batch from ``source``. Collective; returns a summary on rank 0."""
    start_time = time.time()
    source, out = Path(source), Path(out)
    total, shape = source_shape(source, image_size)
    keep = np.sort(np.random.default_rng(seed).choice(total, size=min(num_images, total), replace=False))
    acc = FeatureAccumulator(extractor, torch.device(device), keep_pool=False, keep_probs=False)
    args = dict(image_size=image_size, batch_size=batch_size, workers=workers)
    images, labels, index = _read_block(source, keep, acc, total, args, progress)
    acts = acc.finish()
    images = gather_rows(torch.cat([torch.zeros((0, *shape), dtype=torch.uint8), *images]))
    labels = gather_rows(torch.cat([torch.zeros(0, dtype=torch.long), *labels]))
    index = gather_rows(torch.cat([torch.zeros(0, dtype=torch.long), *index]))
    if dist.rank() != 0:
        return None
    stats = acts.statistics()
    with NpzWriter(out) as writer:
        writer.add("arr_0", images.numpy())
        writer.add("arr_1", labels.numpy())
        writer.add("mu", stats["pool"][0])
        writer.add("sigma", stats["pool"][1])
        if "spatial" in stats:
            writer.add("mu_s", stats["spatial"][0])
            writer.add("sigma_s", stats["spatial"][1])
    if acts.count < total:
        log.warning("%d of %d images were unreadable and left out", total - acts.count, total)
    return {
        "output": str(out),
        "source": str(source),
        "images_in_statistics": acts.count,
        "images_listed": total,
        "images_kept": len(images),
        "image_size": shape[0],
        "seed": seed,
        "kept_indices_sha1": _index_digest(index.numpy()),
        "seconds": time.time() - start_time,
        "inception": getattr(extractor, "description", {}),
    }


def _index_digest(index: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(index, dtype=np.int64).tobytes()).hexdigest()
