"""Reading ImageNet-style inputs: a class-folder tree (``train/<wnid>/*.JPEG``) or image webdataset
tars, and the ADM centre crop that ADM, DiT and MDT train on.

Every listing is sorted, so each process of a distributed extraction sees the same items in the same
order and sample indices mean the same thing everywhere.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp", ".bmp")
TAR_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
TAR_LABEL_KEYS = ("cls", "label")


class InputError(RuntimeError):
    """The input tree or tar set is unusable as a whole (an empty class folder, no images)."""


class BadImage(RuntimeError):
    """One image could not be decoded; extraction skips and counts it."""


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion ``image_datasets.center_crop_arr``, as used by DiT and
    MDT): halve with BOX while the short side is at least twice the target, one BICUBIC resize so the
    short side equals ``image_size``, then crop the centre. Returns uint8 HWC."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def load_image(data: bytes | str | Path, image_size: int, name: str) -> np.ndarray:
    """Decode (fully: a truncated file fails here, not later), convert to RGB, ADM-crop."""
    size = len(data) if isinstance(data, bytes) else Path(data).stat().st_size
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        with Image.open(source) as img:
            img.load()
            rgb = img.convert("RGB")
        return center_crop_arr(rgb, image_size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadImage(f"{err.__class__.__name__}: {strip_reprs(str(err))}") from err


def strip_reprs(text: str) -> str:
    """``cannot identify image file <_io.BytesIO object at 0x7f...>`` -> ``cannot identify image
    file``: a repr's address differs per process, and the reason lands in manifest.json, which
    must be byte-identical however many processes extracted it."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text).strip()


@dataclass(frozen=True)
class Item:
    """One input image: where its bytes are, its label and its key (relative path / tar key)."""

    source: str  # a file path, or a tar path
    member: str  # "" for files; the image member name inside the tar
    label: int
    key: str
    # Set for an input listed but not readable as an image (a link in a tar, a hidden name): the
    # extractor counts it as skipped with this reason, like an image that fails to decode.
    problem: str = ""


def list_image_folder(root: str | Path) -> tuple[list[Item], dict[str, int]]:
    """``root/<class>/<image>`` -> items sorted by (class, file name) and the class map (sorted class
    folder names -> 0..K-1, as torchvision's ImageFolder and the ADM tools number ImageNet WNIDs)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"input folder {root} does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise InputError(f"{root} has no class folders: expected {root}/<wnid>/*.JPEG (pass the train/ folder)")
    classes = {d.name: i for i, d in enumerate(class_dirs)}
    items: list[Item] = []
    for d in class_dirs:
        files = sorted(f for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        if not files:
            _check_level(root, d)
            raise InputError(
                f"class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "remove it or add its images, since it would shift every class index after it"
            )
        items.extend(Item(str(d / f), "", classes[d.name], f"{d.name}/{f}") for f in files)
    return items, classes


def _check_level(root: Path, empty: Path) -> None:
    """An image-less "class folder" that holds folders means ``root`` is the tree's root (train/
    and val/ beside each other), one level above the class folders: say so, not "holds no images"."""
    if not any(p.is_dir() for p in empty.iterdir()):
        return
    split = root / "train" if (root / "train").is_dir() else empty
    raise InputError(
        f"{root} looks one level too high: {empty} holds folders, not images; "
        f"pass its {split.name}/ subfolder ({split}), whose subfolders are the classes"
    )


def expand_tar_input(spec: str) -> list[str]:
    """A directory of ``*.tar``, a glob, or a brace pattern (``imagenet-{000000..000146}.tar``)."""
    import braceexpand

    if Path(spec).is_dir():
        paths = sorted(glob.glob(str(Path(spec) / "*.tar")))
    else:
        paths = sorted({p for pattern in braceexpand.braceexpand(spec) for p in glob.glob(pattern)})
    if not paths:
        if not any(c in spec for c in "*?[{"):  # a plain path, not a pattern: it is simply not there
            raise InputError(
                f"input {spec} does not exist; pass an ImageNet-style train/ folder (<wnid>/*.JPEG), "
                "a folder of .tar files, or a glob/brace pattern of tars"
            )
        raise InputError(f"no tar files match {spec!r}")
    return paths


def list_image_tars(paths: Sequence[str]) -> tuple[list[Item], dict[str, int]]:
    """Index image webdataset tars (``<key>.jpg`` + ``<key>.cls`` integer label). Only headers and the
    small label members are read; images are fetched later by member name. Image members that
    cannot be samples (links, hidden names) are listed with their reason, to be counted as skipped."""
    items: list[Item] = []
    labels: set[int] = set()
    for path in paths:
        images, found, unusable = _index_tar(path)
        for key in sorted(images):
            if key not in found:
                raise InputError(f"input tar {path}: sample {key!r} has no .cls/.label member")
            items.append(Item(path, images[key], found[key], f"{Path(path).name}/{key}"))
            labels.add(found[key])
        # Listed (and so counted as skipped, by name) rather than dropped without a word.
        items.extend(Item(path, name, -1, f"{Path(path).name}/{name}", why) for name, why in sorted(unusable.items()))
    if not any(not item.problem for item in items):
        raise InputError(f"no images found in {len(paths)} tar files")
    # Integer labels carry no names: the class map is the identity over 0..max.
    classes = {str(i): i for i in range(max(labels) + 1)}
    return items, classes


def _unusable_image(member: tarfile.TarInfo) -> str:
    """Why an image member cannot be a sample ("" if it can): a link, or a hidden name such as
    ``dir/.jpg``, whose sample key would be empty."""
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        return f"a {kind} link to {member.linkname!r}, not an image; store the image itself in the tar"
    if not member.isreg():
        return "not a regular file"
    if Path(member.name).name.startswith("."):
        return "a hidden file name (no sample key)"
    return ""


def _index_tar(path: str) -> tuple[dict[str, str], dict[str, int], dict[str, str]]:
    """One tar's image members by key, its labels by key, and its image members that cannot be
    samples (member name -> reason)."""
    from webdataset.tariterators import base_plus_ext

    images: dict[str, str] = {}
    found: dict[str, int] = {}
    unusable: dict[str, str] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isdir():
                    continue
                name = Path(member.name).name
                ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
                why = _unusable_image(member) if ext in TAR_IMAGE_KEYS else ""
                key, full_ext = base_plus_ext(member.name)  # webdataset's own key/extension split
                if why:
                    unusable[member.name] = why
                elif member.isreg() and key is not None and full_ext.lower() in TAR_IMAGE_KEYS:
                    images[key] = member.name
                elif member.isreg() and key is not None and full_ext.lower() in TAR_LABEL_KEYS:
                    found[key] = int(tar.extractfile(member).read().decode().strip())
    except (tarfile.TarError, OSError, ValueError) as err:
        raise InputError(f"input tar {path} is unreadable ({err})") from err
    return images, found, unusable


def list_inputs(spec: str) -> tuple[list[Item], dict[str, int]]:
    """A class-folder tree, or tars (a directory of .tar files, a glob or a brace pattern)."""
    path = Path(spec)
    if path.is_dir() and not any(path.glob("*.tar")):
        return list_image_folder(path)
    return list_image_tars(expand_tar_input(spec))


def read_item_bytes(item: Item, handles: dict[str, tarfile.TarFile] | None = None) -> bytes:
    """The encoded image bytes of one item (tar handles are cached per process by the caller)."""
    if not item.member:
        with open(item.source, "rb") as fh:
            return fh.read()
    handles = {} if handles is None else handles
    if item.source not in handles:
        handles[item.source] = tarfile.open(item.source, "r:")
    return handles[item.source].extractfile(item.member).read()


class ImageItems:
    """Map-style dataset over items: ``ds[i] -> (i, HWC uint8 array or None, label, key, error)``.
    A bad image yields ``None`` and the error text instead of raising, so a DataLoader worker never
    dies on one file and the caller can log and count it."""

    def __init__(self, items: Sequence[Item], image_size: int):
        self.items = items
        self.image_size = image_size
        self._tars: dict[str, tarfile.TarFile] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, int, str, str]:
        item = self.items[i]
        if item.problem:
            return i, None, item.label, item.key, item.problem
        try:
            data = read_item_bytes(item, self._tars)
            return i, load_image(data, self.image_size, item.key), item.label, item.key, ""
        except (BadImage, OSError, tarfile.TarError, KeyError) as err:
            return i, None, item.label, item.key, str(err)
