"""Per-sample checksums: damaged bytes inside a sample, labels out of range, old-format shards."""

from __future__ import annotations

import json
import logging
import struct
import tarfile
from pathlib import Path

import pytest
import torch

from mdt_ds.data import shards
from mdt_ds.data.loader import build_loader
from mdt_ds.data.shards import LayoutError, ShardError
from tests.test_data_loader import take, write_moments_set

pytestmark = pytest.mark.data


def overwrite_in_sample(directory: Path, shard: str, index: int, at: int = 100, n: int = 64) -> None:
    """Overwrite ``n`` bytes inside sample ``index``'s array (file size unchanged)."""
    path = directory / shard
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{index:09d}.{shards.EXT}")
    data = bytearray(path.read_bytes())
    start = member.offset_data + shards.HEADER.size + at
    data[start : start + n] = bytes((b ^ 0x5A) for b in data[start : start + n])
    path.write_bytes(bytes(data))


@pytest.fixture()
def damaged(tmp_path: Path) -> Path:
    # 2 shards of 20; sample 25 is shard 1's sixth member (not the first, which build_loader checks).
    directory = write_moments_set(tmp_path / "damaged", n=40, per_shard=20)
    overwrite_in_sample(directory, "train-000001.tar", 25)
    return directory


def test_damaged_sample_is_refused_naming_shard_key_and_fix(damaged: Path) -> None:
    with pytest.raises(ShardError) as err:
        take(damaged, 4, batch_size=10, shuffle_buffer=0, resampled=False)
    text = str(err.value)
    assert "train-000001.tar" in text and "000000025" in text and "checksum" in text
    assert "mdt-extract-latents" in text and "data.skip_corrupt=true" in text


def test_skip_corrupt_skips_counts_and_keeps_the_batch_count(damaged: Path, caplog: pytest.LogCaptureFixture) -> None:
    kw = dict(batch_size=10, seed=7, rank=0, world_size=1, num_workers=0, shuffle_buffer=0, resampled=False)
    loader = build_loader(str(damaged), skip_corrupt=True, with_index=True, **kw)
    it = iter(loader)
    with caplog.at_level(logging.WARNING):
        epoch = [i for _ in range(4) for i in next(it)[2].tolist()]  # 40 samples, 4 batches: one epoch
    assert 25 not in epoch and len(epoch) == 40
    assert set(epoch) == set(range(40)) - {25}  # the slot went to the next sample (a wrap: one seen twice)
    assert loader.skipped_samples == 1
    assert "train-000001.tar" in caplog.text and "000000025" in caplog.text


def test_skip_count_reaches_the_main_process_from_workers(damaged: Path) -> None:
    loader = build_loader(
        str(damaged),
        batch_size=10,
        seed=7,
        rank=0,
        world_size=1,
        num_workers=2,
        shuffle_buffer=0,
        resampled=False,
        skip_corrupt=True,
    )
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    assert all(b[0].shape[0] == 10 for b in batches)
    assert loader.skipped_samples >= 1  # counted in a worker process, read here
    del it


def test_label_out_of_range_is_refused(tmp_path: Path) -> None:
    directory = write_moments_set(tmp_path / "labels", n=20, per_shard=20)
    manifest = shards.read_manifest(directory)
    layout = shards.manifest_layout(manifest)
    arrays, labels, keys = shards.read_all(directory)
    rows = [(i, arrays[i], 12 if i == 7 else int(labels[i]), keys[i]) for i in range(20)]  # 12 >= 10 classes
    record = shards.write_shard(directory, "train-000000.tar", layout, rows)
    manifest["shards"][0].update(record.to_json())
    shards.write_manifest(directory, manifest)
    with pytest.raises(ShardError, match=r"train-000000\.tar, sample 000000007.*label 12 is outside"):
        take(directory, 2, batch_size=10, shuffle_buffer=0)
    got = take(directory, 2, batch_size=10, shuffle_buffer=0, skip_corrupt=True)
    assert all(int(y.max()) < 10 for _, y, _ in got)


def write_v1_set(directory: Path) -> Path:
    """A data set as format version 1 wrote it: 16-byte headers without a crc, manifest version 1."""
    directory = write_moments_set(directory, n=20, per_shard=20)
    manifest = shards.read_manifest(directory)
    layout = shards.manifest_layout(manifest)
    arrays, labels, keys = shards.read_all(directory)
    import io

    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0) as writer:
        for i in range(20):
            key = keys[i].encode()
            raw = arrays[i].contiguous().view(torch.uint8).numpy().tobytes()
            payload = struct.pack("<4sIiI", b"MDS1", layout.fingerprint, int(labels[i]), len(key)) + raw + key
            writer.write({"__key__": f"{i:09d}", shards.EXT: payload})
    (directory / "train-000000.tar").write_bytes(buf.getvalue())
    manifest["version"] = 1
    manifest["shards"][0]["bytes"] = len(buf.getvalue())
    (directory / shards.MANIFEST).write_text(json.dumps(manifest))
    return directory


def test_old_format_set_is_refused_with_the_commands(tmp_path: Path) -> None:
    directory = write_v1_set(tmp_path / "v1")
    with pytest.raises(ShardError) as err:
        take(directory, 1, batch_size=10)
    text = str(err.value)
    assert "version 1" in text and "mdt-extract-latents --input" in text and f"--verify {directory}" in text
    # An old shard slipped into a new set is a layout error, never skipped as corruption.
    manifest = json.loads((directory / shards.MANIFEST).read_text())
    manifest["version"] = shards.FORMAT_VERSION
    (directory / shards.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(LayoutError, match="format version 1"):
        take(directory, 1, batch_size=10, skip_corrupt=True)


def test_written_samples_carry_a_valid_crc(tmp_path: Path) -> None:
    directory = write_moments_set(tmp_path / "crc", n=20, per_shard=20)
    layout = shards.manifest_layout(shards.read_manifest(directory))
    with tarfile.open(directory / "train-000000.tar") as tar:
        payloads = [tar.extractfile(m).read() for m in tar]
    for payload in payloads:
        assert payload[:4] == shards.MAGIC
        assert shards.HEADER.unpack_from(payload)[4] == shards.payload_crc(payload)
        assert shards.sample_problem(payload, layout, 10) is None
    flipped = bytearray(payloads[3])
    flipped[8] ^= 0x10  # the label field: covered by the crc too
    assert "checksum" in shards.sample_problem(bytes(flipped), layout, 10)
