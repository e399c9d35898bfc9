"""The ADM batch format: an ``.npz`` with ``arr_0`` uint8 images [N, H, W, 3] (NHWC), labels in
``arr_1`` (ignored by the metrics) and, in reference batches, precomputed float64 statistics
``mu``/``sigma`` (pool_3, 2048) and ``mu_s``/``sigma_s`` (sFID, 2023).

Reading maps ``arr_0`` straight from the file when it is stored uncompressed (as ``np.savez``
writes it), so 50,000 images at 256 px are never loaded whole; a compressed member is read into
memory. Writing streams arrays into the zip member by member (:class:`NpzWriter`), so a packer
holds one shard at a time, and the result is byte-identical for identical inputs (fixed member
timestamps).
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class NpzFormatError(ValueError):
    """An .npz is not a valid ADM batch; the message names the file, the field and the fix."""


def _member_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Byte offset of a stored member's data: after its local header (30 bytes + name + extra)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if header[:4] != b"PK\x03\x04":
            raise NpzFormatError(f"{path}: corrupt zip local header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_len + extra_len


def _open_member_array(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray:
    info = zf.getinfo(name)
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        header_len = f.tell()
    if dtype.hasobject:  # loading it needs allow_pickle, i.e. running whatever the file pickled
        raise NpzFormatError(
            f"{path}: {name[:-4]} is an object array (dtype=object), which only loads with allow_pickle and is "
            "refused; save plain numeric arrays, e.g. np.savez(path, np.stack(images).astype(np.uint8))"
        )
    if info.compress_type == zipfile.ZIP_STORED and not fortran:
        offset = _member_offset(path, info) + header_len
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


class AdmBatch:
    """One ADM ``.npz`` batch, validated on open. ``images`` is uint8 NHWC (memory-mapped when the
    member is stored uncompressed); ``statistics()`` returns the stored ``mu/sigma`` pairs if any."""

    def __init__(self, path: str | Path, require_images: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise NpzFormatError(f"{self.path}: no such file")
        try:
            zf = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as err:
            raise NpzFormatError(f"{self.path}: not an .npz (zip) file ({err}); write batches with np.savez") from err
        with zf:
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            self.keys = sorted(names)
            self.images = _open_member_array(self.path, zf, "arr_0.npy") if "arr_0" in names else None
            self.labels = _open_member_array(self.path, zf, "arr_1.npy") if "arr_1" in names else None
            self._stats = {k: _open_member_array(self.path, zf, f"{k}.npy") for k in STAT_KEYS if k in names}
        if self.images is None:
            if require_images:
                raise NpzFormatError(
                    f"{self.path}: no 'arr_0' array (keys: {self.keys}); an ADM batch stores its images as "
                    "arr_0, uint8 [N, H, W, 3] (np.savez(path, images) names the first array arr_0)"
                )
        else:
            check_images(self.images, f"{self.path}: arr_0")

    def __len__(self) -> int:
        return 0 if self.images is None else len(self.images)

    def statistics(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Stored statistics: ``{"pool": (mu, sigma), "spatial": (mu_s, sigma_s)}`` where present."""
        out = {}
        for kind, (mu, sigma) in {"pool": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}.items():
            if mu in self._stats and sigma in self._stats:
                out[kind] = (np.asarray(self._stats[mu], np.float64), np.asarray(self._stats[sigma], np.float64))
        return out


def check_images(arr: np.ndarray, where: str) -> None:
    """Raise :class:`NpzFormatError` unless ``arr`` is uint8 [N, H, W, 3]."""
    if arr.dtype != np.uint8:
        hint = (
            " (floats in [-1, 1]: convert with mdt_ds.sampling.to_uint8; floats in [0, 255]: round and clip)"
            if arr.dtype.kind == "f"
            else ""
        )
        raise NpzFormatError(f"{where} has dtype {arr.dtype}; ADM batches hold uint8 pixels in [0, 255]{hint}")
    if arr.ndim != 4:
        raise NpzFormatError(f"{where} has shape {arr.shape}; expected [N, H, W, 3] (NHWC)")
    if arr.shape[-1] != 3:
        if arr.shape[1] == 3:
            raise NpzFormatError(
                f"{where} has shape {arr.shape}, which looks NCHW; ADM batches are NHWC: use arr.transpose(0, 2, 3, 1)"
            )
        if arr.shape[-1] == 1:
            raise NpzFormatError(
                f"{where} has shape {arr.shape} (one channel); repeat it to RGB: np.repeat(arr, 3, axis=-1)"
            )
        raise NpzFormatError(f"{where} has shape {arr.shape}; expected 3 colour channels last (NHWC)")


class NpzWriter:
    """Write an ``.npz`` member by member, atomically (``path.tmp`` then rename on close).

    ``add(name, array)`` writes a whole array; ``stream(name, shape, dtype, chunks)`` writes the
    header, then each chunk's bytes, checking the total, so only one chunk is ever in memory.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)

    def _open(self, name: str):
        info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_TIME)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = 0o644 << 16
        return self._zip.open(info, "w", force_zip64=True)

    def add(self, name: str, array: np.ndarray) -> None:
        with self._open(name) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)

    def stream(self, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: Iterable[np.ndarray]) -> None:
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        expected = int(np.prod(shape)) * dtype.itemsize
        written = 0
        with self._open(name) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                f.write(chunk.tobytes())
                written += chunk.nbytes
        if written != expected:
            raise ValueError(f"{self.path}: {name} got {written} bytes, expected {expected} for shape {shape}")

    def close(self) -> Path:
        self._zip.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._zip.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
