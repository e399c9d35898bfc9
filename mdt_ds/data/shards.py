"""Shard format: webdataset tars of fixed-layout samples plus one ``manifest.json`` (see FORMAT.md).

A sample is ONE tar member ``{index:09d}.mds`` whose payload is a 20-byte little-endian header
(magic, layout fingerprint, label, key length, crc32 of the rest), the raw array bytes (dtype and shape from the
manifest, never from the member) and the UTF-8 source key. One member per sample is what
webdataset reads fastest, and a fixed-size array lets the loader decode a whole batch with one
``frombuffer`` instead of one parse per sample.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import struct
import tarfile
import zlib

try:  # the same crc32 (zlib's polynomial, same values), ~15x faster: SIMD/PCLMUL in zlib-ng
    from zlib_ng.zlib_ng import crc32 as fast_crc32
except ImportError:  # pragma: no cover - zlib-ng is an install requirement; zlib is the fallback
    fast_crc32 = zlib.crc32
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "mdt-ds-shards"
FORMAT_VERSION = 2
MAGIC = b"MDS2"
OLD_MAGICS = {b"MDS1": 1}  # earlier versions: recognised to say "re-extract", never read
HEADER = struct.Struct("<4sIiII")  # magic, layout fingerprint (crc32), label, key length, sample crc32
_CRC_AT = 16  # the crc covers payload[:16] (the other header fields) and payload[20:] (array + key)
EXT = "mds"
TAR_MTIME = 0  # a fixed member mtime: reruns produce byte-identical shards
MANIFEST = "manifest.json"

# Storage dtypes. numpy has no bfloat16, so arrays travel as raw bytes and torch views them.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "bfloat16": (torch.bfloat16, 2),
    "float16": (torch.float16, 2),
    "float32": (torch.float32, 4),
    "uint8": (torch.uint8, 1),
}


class ShardError(RuntimeError):
    """A shard or manifest is missing, corrupt or inconsistent; the message names the file."""


class SampleError(ShardError):
    """One sample's bytes are damaged (checksum, header or label): corruption, skippable."""


REEXTRACT_HINT = (
    "re-extract it (delete the shard and its .json sidecar, then rerun the same mdt-extract-latents "
    "command: it redoes missing shards; an embedded set is rebuilt when its folder is deleted; "
    "mdt-extract-latents --verify DIR checks the other shards), or set data.skip_corrupt=true to "
    "skip damaged samples"
)


class LayoutError(ShardError):
    """A shard was written with another codec, shape or dtype than the manifest says: a setup
    mistake, never skipped as corruption."""


@dataclass(frozen=True)
class SampleLayout:
    """What one sample holds. ``kind="moments"``: ``shape = [2, 2C, h, w]`` (VAE mean and log-variance
    of the image and of its horizontal flip), or ``[2, C, h, w]`` with ``moments="mean"``.
    ``kind="pixels"``: ``shape = [C, H, W]``; uint8 means 0..255, floats are already in [-1, 1]."""

    kind: str
    shape: tuple[int, ...]
    dtype: str
    codec: dict[str, Any]
    image_size: int
    moments: str = "mean_logvar"  # or "mean" (store-only-mean); ignored for pixels

    def __post_init__(self) -> None:
        if self.kind not in ("moments", "pixels"):
            raise ShardError(f"layout kind must be 'moments' or 'pixels', got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ShardError(f"layout dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.kind == "moments" and (len(self.shape) != 4 or self.shape[0] != 2):
            raise ShardError(f"moments layout needs shape [2, channels, h, w], got {list(self.shape)}")
        if self.kind == "moments" and self.moments not in ("mean_logvar", "mean"):
            raise ShardError(f"moments must be 'mean_logvar' or 'mean', got {self.moments!r}")
        if self.kind == "pixels" and len(self.shape) != 3:
            raise ShardError(f"pixels layout needs shape [C, H, W], got {list(self.shape)}")

    # Cached: the loader asks for these once per sample (a JSON dump each time cost ~13 us).
    @functools.cached_property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * DTYPES[self.dtype][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Shape of one training input ``x`` (latent or image, CHW)."""
        if self.kind == "pixels":
            return tuple(self.shape)  # type: ignore[return-value]
        channels = self.shape[1] // 2 if self.moments == "mean_logvar" else self.shape[1]
        return (channels, self.shape[2], self.shape[3])

    def to_json(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "codec": dict(self.codec),
            "image_size": self.image_size,
        }
        if self.kind == "moments":
            out["moments"] = self.moments
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SampleLayout":
        return cls(
            data["kind"],
            tuple(int(s) for s in data["shape"]),
            data["dtype"],
            dict(data["codec"]),
            int(data["image_size"]),
            data.get("moments", "mean_logvar"),
        )

    @functools.cached_property
    def fingerprint(self) -> int:
        """crc32 of the canonical layout: written into every sample, so a shard made with another
        codec, shape or dtype is caught before training even when its byte size happens to match."""
        return zlib.crc32(json.dumps(self.to_json(), sort_keys=True).encode())


# --------------------------------------------------------------------------- samples
def payload_crc(payload: bytes | memoryview) -> int:
    """crc32 of a payload without its crc field: catches any changed byte of header, array or key
    (zlib-ng's crc32: ~1.5 us for a 32 KB latent sample; zlib's own takes ~20 us)."""
    view = memoryview(payload)
    return fast_crc32(view[HEADER.size :], fast_crc32(view[:_CRC_AT]))


def encode_sample(layout: SampleLayout, array: bytes | np.ndarray | torch.Tensor, label: int, key: str) -> bytes:
    """One member payload: header (with the sample crc32) + array bytes (C order, little-endian) + UTF-8 key."""
    if isinstance(array, torch.Tensor):
        if array.dtype != layout.torch_dtype:
            raise ShardError(f"sample {key!r}: tensor dtype {array.dtype} but layout says {layout.dtype}")
        array = array.contiguous().view(torch.uint8).numpy().tobytes()
    elif isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array).tobytes()
    if len(array) != layout.nbytes:
        raise ShardError(
            f"sample {key!r}: {len(array)} array bytes, layout {list(layout.shape)} "
            f"{layout.dtype} needs {layout.nbytes}"
        )
    key_bytes = key.encode("utf-8")
    payload = bytearray(HEADER.pack(MAGIC, layout.fingerprint, int(label), len(key_bytes), 0) + array + key_bytes)
    struct.pack_into("<I", payload, _CRC_AT, payload_crc(payload))
    return bytes(payload)


def sample_problem(payload: bytes, layout: SampleLayout, num_classes: int | None = None) -> str | None:
    """Why this payload is corrupt, or None if it is sound. The crc is checked first, so a damaged
    header reads as corruption; a sound sample of another layout raises :class:`LayoutError`."""
    if len(payload) < HEADER.size:
        return f"sample of {len(payload)} bytes is shorter than the header"
    magic, fingerprint, label, key_len, crc = HEADER.unpack_from(payload)
    if payload[:4] in OLD_MAGICS:
        raise LayoutError(
            f"written in shard format version {OLD_MAGICS[payload[:4]]} (no per-sample checksums); this code "
            f"reads version {FORMAT_VERSION}: re-extract the data set into a new folder (mdt-extract-latents)"
        )
    if crc != payload_crc(payload):
        return "sample checksum (crc32) mismatch: bytes changed on disk or in transfer"
    if magic != MAGIC:
        return f"not an mdt-ds sample (magic {magic!r})"
    if fingerprint != layout.fingerprint:
        raise LayoutError(
            f"written with another codec/shape/dtype than the manifest describes "
            f"({layout.codec.get('name')}, {list(layout.shape)} {layout.dtype}); re-extract it or fix the manifest"
        )
    if len(payload) != HEADER.size + layout.nbytes + key_len:
        return f"sample has {len(payload)} bytes, the manifest layout needs {HEADER.size + layout.nbytes + key_len}"
    if num_classes is not None and not 0 <= label < num_classes:
        return f"label {label} is outside the manifest's {num_classes} classes"
    return None


def check_payload(payload: bytes, layout: SampleLayout, where: str, num_classes: int | None = None) -> tuple[int, str]:
    """Validate one payload against the layout; returns (label, key). ``where`` names the shard."""
    try:
        problem = sample_problem(payload, layout, num_classes)
    except LayoutError as err:
        raise LayoutError(f"{where}: {err}") from None
    if problem is not None:
        raise SampleError(f"{where}: {problem}")
    _, _, label, key_len, _ = HEADER.unpack_from(payload)
    key = payload[HEADER.size + layout.nbytes :].decode("utf-8")
    return label, key


def member_index(name: str) -> int:
    return int(name.split(".", 1)[0])


# --------------------------------------------------------------------------- writing
def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def atomic_write(path: Path, data: bytes) -> None:
    # A temp file in the same directory, then rename: readers and reruns never see half a file.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class ShardRecord:
    """One finished shard as listed in the manifest (and its ``.json`` sidecar)."""

    name: str
    samples: int
    bytes: int
    sha256: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    labels: dict[str, int] | None = None  # samples per label ("3": 51); None: not recorded

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "skipped": list(self.skipped),
        }
        if self.labels is not None:
            out["labels"] = dict(self.labels)
        return out


def tar_bytes(
    layout: SampleLayout, samples: Iterable[tuple[int, Any, int, str]], labels: dict[str, int] | None = None
) -> tuple[bytes, int]:
    """An in-memory tar of ``(index, array, label, key)`` samples; returns (bytes, count), and counts
    the samples per label into ``labels``. Members get fixed mtime/owner/mode so the bytes depend
    on the samples only."""
    import webdataset as wds

    buf = io.BytesIO()
    count = 0
    labels = {} if labels is None else labels
    with wds.TarWriter(buf, user="mdt", group="mdt", mode=0o444, encoder=False, mtime=TAR_MTIME) as writer:
        for index, array, label, key in samples:
            writer.write({"__key__": f"{index:09d}", EXT: encode_sample(layout, array, label, key)})
            labels[str(int(label))] = labels.get(str(int(label)), 0) + 1
            count += 1
    # Closing the writer flushes the end-of-archive blocks but leaves our BytesIO open.
    return buf.getvalue(), count


def write_shard(
    directory: str | Path,
    name: str,
    layout: SampleLayout,
    samples: Iterable[tuple[int, Any, int, str]],
    skipped: Sequence[dict[str, str]] = (),
    sidecar: bool = True,
) -> ShardRecord:
    """Write one shard atomically, then its sidecar ``<name>.json`` (the sidecar marks it finished)."""
    directory = Path(directory)
    labels: dict[str, int] = {}
    data, count = tar_bytes(layout, samples, labels)
    labels = {k: labels[k] for k in sorted(labels, key=int)}
    record = ShardRecord(name, count, len(data), hashlib.sha256(data).hexdigest(), list(skipped), labels)
    atomic_write(directory / name, data)
    if sidecar:
        side = dict(record.to_json(), fingerprint=layout.fingerprint, version=FORMAT_VERSION)
        atomic_write(directory / (name[: -len(".tar")] + ".json"), json.dumps(side, sort_keys=True).encode())
    return record


def read_sidecar(directory: str | Path, name: str, layout: SampleLayout) -> ShardRecord | None:
    """The record of a finished shard, or None if it is missing or incomplete (to be redone).
    A finished shard from another layout is an error: the output folder belongs to another run."""
    directory = Path(directory)
    side, tar = directory / (name[: -len(".tar")] + ".json"), directory / name
    if not side.is_file() or not tar.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if data.get("fingerprint") != layout.fingerprint:
        raise LayoutError(f"{side}: written with another codec/image size/dtype; use a new output folder")
    if data.get("version", 1) != FORMAT_VERSION:
        raise LayoutError(
            f"{side}: written in shard format version {data.get('version', 1)}, this code writes "
            f"{FORMAT_VERSION} (per-sample checksums); use a new output folder"
        )
    if tar.stat().st_size != data.get("bytes"):
        return None
    return ShardRecord(data["name"], data["samples"], data["bytes"], data["sha256"], data.get("skipped", []),
                       data.get("labels"))


# --------------------------------------------------------------------------- manifest
def class_counts(records: Sequence[ShardRecord], num_classes: int) -> list[int] | None:
    """Samples per class label (index = label) over all shards; None if a shard did not record them."""
    if any(r.labels is None for r in records):
        return None
    counts = [0] * num_classes
    for record in records:
        for label, n in (record.labels or {}).items():
            if 0 <= int(label) < num_classes:
                counts[int(label)] += n
    return counts


def build_manifest(
    layout: SampleLayout,
    records: Sequence[ShardRecord],
    classes: dict[str, int],
    samples_per_shard: int,
    flip: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The data set description. Nothing in it depends on when or on how many processes it was made."""
    skipped = [s for r in records for s in r.skipped]
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layout": layout.to_json(),
        "codec": dict(layout.codec),  # a copy of layout.codec for readers that only need the codec
        "fingerprint": layout.fingerprint,
        "sample_shape": list(layout.sample_shape),
        "flip": flip,
        "num_classes": len(classes),
        "classes": dict(classes),
        "samples_per_shard": samples_per_shard,
        "num_samples": sum(r.samples for r in records),
        "num_shards": len(records),
        "shards": [{k: v for k, v in r.to_json().items() if k not in ("skipped", "labels")} for r in records],
        "class_counts": class_counts(records, len(classes)),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
    manifest.update(extra or {})
    return manifest


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST
    atomic_write(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Load and check ``manifest.json``; errors name the file and the field."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: a shard directory needs the manifest written by mdt-extract-latents")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise ShardError(old_version_message(path, manifest.get("version")))
    for key in ("layout", "fingerprint", "num_classes", "classes", "shards", "flip"):
        if key not in manifest:
            raise ShardError(f"{path}: field {key!r} is missing")
    layout = SampleLayout.from_json(manifest["layout"])
    if layout.fingerprint != manifest["fingerprint"]:
        raise ShardError(f"{path}: 'fingerprint' does not match 'layout' (edited by hand?)")
    if not manifest["shards"]:
        raise ShardError(f"{path}: lists no shards")
    return manifest


def old_version_message(path: Path, version: Any) -> str:
    """Shards of another format version are refused, not read: version 1 has no per-sample
    checksums, so damaged bytes inside a sample could reach the model unnoticed."""
    directory = path.parent
    return (
        f"{path}: shard format version {version}, but this code reads version {FORMAT_VERSION} "
        "(per-sample crc32 checksums). Re-extract into a new folder with the arguments recorded in "
        f"{directory / 'extract_config.json'}: mdt-extract-latents --input IMAGES --output NEW_DIR "
        "[--codec ... --image-size ...]; an embedded set (mnist16, mnist32, tiny-latents) is rebuilt "
        "automatically. To check the old shards' sha256 sums meanwhile: mdt-extract-latents --verify "
        f"{directory} with the mdt-ds release that wrote them"
    )


def manifest_layout(manifest: dict[str, Any]) -> SampleLayout:
    return SampleLayout.from_json(manifest["layout"])


def _check_shard_file(path: Path, entry: dict[str, Any], layout: SampleLayout) -> None:
    """Cheap checks on one shard: size against the manifest and the first sample's header."""
    if not path.is_file():
        raise ShardError(f"shard {path} listed in the manifest is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise ShardError(
            f"shard {path} has {size} bytes, the manifest says {entry['bytes']} (truncated or "
            "replaced?); re-extract it (mdt-extract-latents skips finished shards) or pass skip_corrupt"
        )
    if entry["samples"] == 0:
        return
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
            payload = tar.extractfile(first).read() if first is not None else b""
    except (tarfile.TarError, OSError, AttributeError) as err:
        raise ShardError(f"shard {path} is not a readable tar ({err})") from err
    check_payload(payload, layout, f"shard {path}, sample {first.name if first else '?'}")


def validate_shards(
    directory: str | Path,
    manifest: dict[str, Any],
    skip_corrupt: bool = False,
    split: str | None = None,
) -> tuple[list[Path], list[str]]:
    """Check every shard before training. Returns (good shard paths, skipped shard messages).
    A layout mismatch always fails; a missing/truncated shard fails unless ``skip_corrupt``."""
    directory = Path(directory)
    layout = manifest_layout(manifest)
    entries = manifest["shards"] if split is None else manifest["splits"][split]["shards"]
    good: list[Path] = []
    bad: list[str] = []
    for entry in entries:
        path = directory / entry["name"]
        try:
            _check_shard_file(path, entry, layout)
        except LayoutError:
            raise
        except SampleError as err:
            if not skip_corrupt:
                raise SampleError(f"{err}; {REEXTRACT_HINT}") from None
            # One damaged sample: the loader skips (and counts) just that sample, not the shard.
        except ShardError as err:
            if not skip_corrupt:
                raise
            log.warning("skipping %s", err)
            bad.append(str(err))
            continue
        good.append(path)
    if not good:
        raise ShardError(f"{directory}: no usable shards ({len(bad)} skipped)")
    return good, bad


def verify_shards(directory: str | Path) -> list[str]:
    """Full content check (sha256 of every shard, train and other splits); returns the bad names."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    entries = list(manifest["shards"])
    for split in manifest.get("splits", {}).values():
        entries += split["shards"]
    bad = []
    for entry in entries:
        path = directory / entry["name"]
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if digest != entry["sha256"]:
            bad.append(entry["name"])
    return bad


# --------------------------------------------------------------------------- reading (small sets, tools)
def iter_shard(path: str | Path, layout: SampleLayout) -> Iterator[tuple[int, np.ndarray, int, str]]:
    """``(index, raw uint8 array bytes, label, key)`` for each sample of one shard, in order."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                payload = tar.extractfile(member).read()
                label, key = check_payload(payload, layout, f"shard {path}, sample {member.name}")
                raw = np.frombuffer(payload, np.uint8, layout.nbytes, HEADER.size)
                yield member_index(member.name), raw, label, key
    except (tarfile.TarError, OSError) as err:
        raise ShardError(f"shard {path} is corrupt or truncated ({err})") from err


def read_all(directory: str | Path, split: str | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every sample of a (small) data set in index order: (arrays in the stored dtype, labels, keys)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    layout = manifest_layout(manifest)
    entries = manifest["shards"] if split is None else manifest["splits"][split]["shards"]
    rows: list[tuple[int, np.ndarray, int, str]] = []
    for entry in entries:
        rows.extend(iter_shard(directory / entry["name"], layout))
    rows.sort(key=lambda r: r[0])
    raw = np.stack([r[1] for r in rows]) if rows else np.zeros((0, layout.nbytes), np.uint8)
    arrays = torch.from_numpy(raw).view(layout.torch_dtype).reshape(len(rows), *layout.shape)
    labels = torch.tensor([r[2] for r in rows], dtype=torch.int64)
    return arrays, labels, [r[3] for r in rows]


def pixels_to_float(arrays: torch.Tensor) -> torch.Tensor:
    """Stored pixels to float32 in [-1, 1] (uint8 0..255 -> [-1, 1]; floats are stored in range)."""
    if arrays.dtype == torch.uint8:
        return arrays.float().div_(127.5).sub_(1.0)
    return arrays.float()
