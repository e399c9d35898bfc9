"""Shard format: round trips of moments and pixels, manifest checks, layout mismatch, truncation."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from mdt_ds.data import shards
from mdt_ds.data.shards import SampleLayout, ShardError

pytestmark = pytest.mark.data

VAE = {"name": "sd-vae", "source": "test", "scale_factor": 0.18215}


def moments_layout(dtype: str = "bfloat16", store: str = "mean_logvar") -> SampleLayout:
    channels = 8 if store == "mean_logvar" else 4
    return SampleLayout("moments", (2, channels, 4, 4), dtype, VAE, 32, store)


def write_set(directory: Path, layout: SampleLayout, arrays: torch.Tensor, per_shard: int = 5) -> dict:
    records = []
    for s, start in enumerate(range(0, len(arrays), per_shard)):
        rows = [
            (start + i, arrays[start + i], (start + i) % 3, f"cls{(start + i) % 3}/img_{start + i}.JPEG")
            for i in range(min(per_shard, len(arrays) - start))
        ]
        records.append(shards.write_shard(directory, shards.shard_name("train", s), layout, rows))
    manifest = shards.build_manifest(layout, records, {"a": 0, "b": 1, "c": 2}, per_shard, flip=True)
    shards.write_manifest(directory, manifest)
    return manifest


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_moments_round_trip(tmp_path: Path, dtype: str) -> None:
    layout = moments_layout(dtype)
    arrays = torch.randn(12, *layout.shape).to(layout.torch_dtype)
    manifest = write_set(tmp_path, layout, arrays)
    assert manifest["num_samples"] == 12 and manifest["num_shards"] == 3
    assert manifest["sample_shape"] == [4, 4, 4]
    got, labels, keys = shards.read_all(tmp_path)
    assert got.dtype == layout.torch_dtype and torch.equal(got.view(torch.int16), arrays.view(torch.int16))
    assert labels.tolist() == [i % 3 for i in range(12)]
    assert keys[7] == "cls1/img_7.JPEG"
    assert shards.verify_shards(tmp_path) == []


def test_pixels_round_trip_and_mean_only_layout(tmp_path: Path) -> None:
    layout = SampleLayout("pixels", (3, 8, 8), "uint8", {"name": "pixel", "scale_factor": 1.0}, 8)
    arrays = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    write_set(tmp_path, layout, arrays)
    got, _, _ = shards.read_all(tmp_path)
    assert torch.equal(got, arrays)
    x = shards.pixels_to_float(got)
    assert x.min() >= -1 and x.max() <= 1 and torch.allclose(x, arrays.float() / 127.5 - 1)
    assert moments_layout(store="mean").sample_shape == (4, 4, 4)


def test_shards_are_deterministic_bytes(tmp_path: Path) -> None:
    layout = moments_layout()
    arrays = torch.randn(6, *layout.shape).to(torch.bfloat16)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_set(tmp_path / name, layout, arrays)
    for name in ("train-000000.tar", "train-000001.tar", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        members = tar.getmembers()
    # one member per sample, fixed mtime, named by the sample index
    assert [m.name for m in members] == [f"{i:09d}.mds" for i in range(5)]
    assert {m.mtime for m in members} == {shards.TAR_MTIME}


def test_wrong_array_size_is_refused() -> None:
    layout = moments_layout()
    with pytest.raises(ShardError, match="needs"):
        shards.encode_sample(layout, b"\0" * 10, 0, "k")
    with pytest.raises(ShardError, match="dtype"):
        shards.encode_sample(layout, torch.zeros(layout.shape), 0, "k")


def test_manifest_errors_name_file_and_field(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="manifest.json not found"):
        shards.read_manifest(tmp_path)
    layout = moments_layout()
    write_set(tmp_path, layout, torch.zeros(5, *layout.shape, dtype=torch.bfloat16))
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="version 99"):
        shards.read_manifest(tmp_path)
    data["version"] = shards.FORMAT_VERSION
    data["layout"]["shape"] = [2, 8, 8, 8]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="fingerprint"):
        shards.read_manifest(tmp_path)


def test_shard_from_another_codec_fails_validation(tmp_path: Path) -> None:
    layout = moments_layout()
    manifest = write_set(tmp_path, layout, torch.zeros(10, *layout.shape, dtype=torch.bfloat16))
    # Same byte size, other codec: only the per-sample fingerprint can tell.
    other = SampleLayout("moments", layout.shape, "bfloat16", dict(VAE, source="another-vae"), 32)
    shards.write_shard(
        tmp_path,
        "train-000001.tar",
        other,
        [(5 + i, torch.zeros(other.shape, dtype=torch.bfloat16), 0, f"cls0/img_{5 + i}.JPEG") for i in range(5)],
    )
    with pytest.raises(ShardError, match=r"train-000001\.tar.*another codec"):
        shards.validate_shards(tmp_path, manifest)
    with pytest.raises(ShardError, match="another codec"):  # never skipped: it is not corruption
        shards.validate_shards(tmp_path, manifest, skip_corrupt=True)


def test_truncated_shard_fails_or_is_skipped(tmp_path: Path) -> None:
    layout = moments_layout()
    manifest = write_set(tmp_path, layout, torch.randn(15, *layout.shape).to(torch.bfloat16))
    path = tmp_path / "train-000001.tar"
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ShardError, match=r"train-000001\.tar has 1500 bytes.*truncated"):
        shards.validate_shards(tmp_path, manifest)
    good, bad = shards.validate_shards(tmp_path, manifest, skip_corrupt=True)
    assert [p.name for p in good] == ["train-000000.tar", "train-000002.tar"] and len(bad) == 1
    assert shards.verify_shards(tmp_path) == ["train-000001.tar"]
    with pytest.raises(ShardError, match=r"train-000001\.tar is corrupt or truncated"):
        list(shards.iter_shard(path, layout))


def test_sidecar_marks_finished_shards(tmp_path: Path) -> None:
    layout = moments_layout()
    rows = [(0, torch.zeros(layout.shape, dtype=torch.bfloat16), 1, "k")]
    record = shards.write_shard(tmp_path, "train-000000.tar", layout, rows, skipped=[{"key": "x", "reason": "bad"}])
    assert shards.read_sidecar(tmp_path, "train-000000.tar", layout) == record
    with pytest.raises(ShardError, match="another codec"):
        shards.read_sidecar(tmp_path, "train-000000.tar", moments_layout("float16"))
    (tmp_path / "train-000000.tar").write_bytes(b"\0" * 512)  # a crash mid-copy: redo, do not trust
    assert shards.read_sidecar(tmp_path, "train-000000.tar", layout) is None
    assert not list(tmp_path.glob(".*tmp*"))


def test_manifest_counts_samples_per_class_and_sidecars_keep_them(tmp_path: Path) -> None:
    layout = moments_layout()
    manifest = write_set(tmp_path, layout, torch.randn(13, *layout.shape).bfloat16())  # labels i % 3
    assert manifest["class_counts"] == [5, 4, 4]
    record = shards.read_sidecar(tmp_path, shards.shard_name("train", 0), layout)
    assert record is not None and record.labels == {"0": 2, "1": 2, "2": 1}
    old = shards.ShardRecord("x.tar", 1, 1, "0" * 64)  # a sidecar that did not record labels
    assert shards.class_counts([record, old], 3) is None


def test_skip_reasons_carry_no_object_addresses(tmp_path: Path) -> None:
    """Reasons land in manifest.json, which must not depend on the process that read the file."""
    from mdt_ds.data.imagenet import BadImage, load_image

    (tmp_path / "empty.JPEG").write_bytes(b"")
    for data in (b"", tmp_path / "empty.JPEG"):
        with pytest.raises(BadImage, match=r"^empty file \(0 bytes\)$"):
            load_image(data, 32, "x")
    with pytest.raises(BadImage) as err:
        load_image(b"not an image at all", 32, "x")
    assert str(err.value) == "UnidentifiedImageError: cannot identify image file"
