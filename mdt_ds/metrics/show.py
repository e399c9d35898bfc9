"""``mdt-eval show``: a look at any ADM ``.npz`` (samples or a reference batch) as one PNG grid, the
class label (``arr_1``) drawn on each tile, so a wrong label order or a broken decode shows at a
glance before 50K samples go into an FID."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mdt_ds.metrics.npz import AdmBatch
from mdt_ds.sampling import MIN_TILE, enlarge, save_grid


def _font(tile_height: int):
    from PIL import ImageFont

    try:  # Pillow >= 10.1 scales its built-in font; a label an eighth of the tile stays legible
        return ImageFont.load_default(size=max(8, tile_height // 8))
    except TypeError:
        return ImageFont.load_default()


def label_tiles(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Copies of uint8 NHWC ``images`` with ``labels[i]`` in white on black at the top left
    (negative labels, "no class", are left off)."""
    from PIL import Image, ImageDraw

    font = _font(images.shape[1])
    out = []
    for image, label in zip(images, labels):
        tile = Image.fromarray(np.ascontiguousarray(image))
        if int(label) >= 0:
            draw = ImageDraw.Draw(tile)
            box = draw.textbbox((1, 0), str(int(label)), font=font)
            draw.rectangle((0, 0, box[2] + 1, box[3] + 1), fill=(0, 0, 0))
            draw.text((1, 0), str(int(label)), fill=(255, 255, 255), font=font)
        out.append(np.asarray(tile))
    return np.stack(out)


def show_npz(
    path: str | Path, out: str | Path | None = None, nrow: int = 8, max_images: int = 64, labels: bool = True
) -> dict[str, Any]:
    """Write the first ``max_images`` images of ``path`` as a grid (``nrow`` per row, tiles under
    MIN_TILE px enlarged; default ``out``: ``NPZ.grid.png`` beside it); returns what was written."""
    path = Path(path)
    batch = AdmBatch(path)
    count = min(len(batch), max_images)
    images = np.asarray(batch.images[:count])
    labelled = labels and batch.labels is not None and len(batch.labels) >= count
    # Enlarged before labelling: on a 32-px tile the smallest legible label covered a third of it.
    images = enlarge(images, MIN_TILE)
    if labelled:
        images = label_tiles(images, np.asarray(batch.labels[:count]))
    out = Path(out) if out is not None else path.with_name(path.stem + ".grid.png")
    save_grid(images, out, nrow=nrow)
    return {"output": str(out), "images": count, "of": len(batch), "nrow": nrow, "labels": bool(labelled)}
