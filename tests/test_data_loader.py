"""Training stream: posterior draws and flips, exact resume, split vs resampled, corruption, 2 ranks.

Run as a script (under torchrun) this file is also the 2-process worker of
``test_two_ranks_split_disjoint_resampled_different``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdt_ds.data import shards
from mdt_ds.data.loader import StreamSpec, build_loader, lane_raw_batches
from mdt_ds.data.shards import SampleLayout, ShardError

pytestmark = pytest.mark.data

SCALE = 0.18215
IMAGE_STD, FLIP_STD = 0.5, 0.2


def write_moments_set(directory: Path, n: int = 120, per_shard: int = 20, store: str = "mean_logvar") -> Path:
    """Image moments: mean +1, std 0.5; flip moments: mean -1, std 0.2 (so a draw tells which it was)."""
    directory.mkdir(parents=True, exist_ok=True)
    channels = 4
    mean = torch.stack([torch.ones(channels, 4, 4), -torch.ones(channels, 4, 4)])
    logvar = torch.stack(
        [torch.full((channels, 4, 4), 2 * math.log(IMAGE_STD)), torch.full((channels, 4, 4), 2 * math.log(FLIP_STD))]
    )
    moments = torch.cat([mean, logvar], 1) if store == "mean_logvar" else mean
    codec = {"name": "sd-vae", "source": "test", "scale_factor": SCALE}
    layout = SampleLayout("moments", tuple(moments.shape), "bfloat16", codec, 32, store)
    records = []
    for s, start in enumerate(range(0, n, per_shard)):
        rows = [(i, moments.to(torch.bfloat16), i % 10, f"k{i}") for i in range(start, min(start + per_shard, n))]
        records.append(shards.write_shard(directory, shards.shard_name("train", s), layout, rows))
    classes = {str(c): c for c in range(10)}
    shards.write_manifest(directory, shards.build_manifest(layout, records, classes, per_shard, flip=True))
    return directory


@pytest.fixture(scope="module")
def moments_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_moments_set(tmp_path_factory.mktemp("moments"))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "mdt-data"


def take(directory: Path | str, n: int, **kw) -> list[tuple[torch.Tensor, ...]]:
    args = dict(batch_size=16, seed=7, rank=0, world_size=1, num_workers=0, shuffle_buffer=30, with_index=True)
    args.update(kw)
    it = iter(build_loader(str(directory), **args))
    return [next(it) for _ in range(n)]


def test_posterior_draw_and_flip_statistics(moments_dir: Path) -> None:
    batches = take(moments_dir, 30, batch_size=64)
    x = torch.cat([b[0] for b in batches]) / SCALE
    assert x.shape == (30 * 64, 4, 4, 4) and x.dtype == torch.float32
    per_sample = x.flatten(1)
    flipped = per_sample.mean(1) < 0
    assert abs(flipped.float().mean().item() - 0.5) < 0.05
    assert abs(per_sample[~flipped].std().item() - IMAGE_STD) < 0.02
    assert abs(per_sample[flipped].std().item() - FLIP_STD) < 0.01
    assert abs(per_sample[~flipped].mean().item() - 1) < 0.01 and abs(per_sample[flipped].mean().item() + 1) < 0.01
    no_flip = torch.cat([b[0] for b in take(moments_dir, 5, flip=False)])
    assert (no_flip.flatten(1).mean(1) > 0).all()


def test_mean_only_shards_give_scaled_means(tmp_path: Path) -> None:
    directory = write_moments_set(tmp_path / "mean", n=40, store="mean")
    x = torch.cat([b[0] for b in take(directory, 4)])
    assert set(torch.unique(x / SCALE).round().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "split"])
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_stream(moments_dir: Path, resampled: bool, workers: int) -> None:
    # Small chunks (segments of 2 batches; split epochs of 6 steps) so resuming crosses boundaries.
    kw = dict(resampled=resampled, num_workers=workers, segment_batches=2)
    full = take(moments_dir, 12, **kw)
    for start in (5, 7):
        resumed = take(moments_dir, 12 - start, start_step=start, **kw)
        for a, b in zip(full[start:], resumed):
            assert torch.equal(a[2], b[2]) and torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not all(torch.equal(full[0][2], b[2]) for b in full[1:])


def test_zero_and_one_worker_give_the_same_stream(moments_dir: Path) -> None:
    a, b = take(moments_dir, 4, num_workers=0), take(moments_dir, 4, num_workers=1)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) for x, y in zip(a, b))


def lane_indices(spec: StreamSpec, lane: int, n: int) -> list[int]:
    it = lane_raw_batches(spec, lane, 0)
    return [int(s["__key__"]) for _ in range(n) for s in next(it)[1]]


def make_spec(directory: Path, world: int, rank: int, lanes: int, resampled: bool) -> StreamSpec:
    manifest = shards.read_manifest(directory)
    return StreamSpec(
        tuple(str(directory / e["name"]) for e in manifest["shards"]),
        tuple(e["samples"] for e in manifest["shards"]),
        shards.manifest_layout(manifest),
        batch_size=10,
        seed=1,
        rank=rank,
        world_size=world,
        lanes=lanes,
        shuffle_buffer=15,
        resampled=resampled,
        flip=True,
        segment_batches=3,
        skip_corrupt=False,
        with_index=True,
    )


def test_split_epoch_lanes_are_disjoint_and_resampled_lanes_differ(moments_dir: Path) -> None:
    # 6 shards of 20 over 2 ranks x 2 lanes: the smallest lane share is 1 shard -> 2 batches of 10.
    split = [lane_indices(make_spec(moments_dir, 2, r, 2, False), lane, 2) for r in range(2) for lane in range(2)]
    flat = [i for part in split for i in part]
    assert len(flat) == len(set(flat)) == 80
    resampled = [lane_indices(make_spec(moments_dir, 2, r, 2, True), lane, 6) for r in range(2) for lane in range(2)]
    assert len({tuple(p) for p in resampled}) == 4
    assert len(resampled[0]) == 60  # past the end of a segment and of a shard: the stream goes on


def test_split_mode_needs_enough_shards(moments_dir: Path) -> None:
    with pytest.raises(ShardError, match="cannot be split over 4 ranks x 2 workers"):
        build_loader(
            str(moments_dir),
            batch_size=4,
            seed=0,
            rank=0,
            world_size=4,
            num_workers=2,
            shuffle_buffer=0,
            resampled=False,
        )


def test_corrupt_shard_mid_stream_is_named_or_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = write_moments_set(tmp_path / "bad", n=40)
    path = directory / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[3 * 1024 : 3 * 1024 + 16] = b"garbage!garbage!"  # same size, so only reading can tell
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000001\.tar"):
        take(directory, 8, shuffle_buffer=0)
    got = take(directory, 8, shuffle_buffer=0, skip_corrupt=True)
    assert len(got) == 8 and "train-000001.tar" in caplog.text


def test_mnist_stream_is_pixels_without_flips(data_root: Path) -> None:
    from mdt_ds.data.demo import load_train_arrays

    loader = build_loader(
        "mnist16",
        batch_size=64,
        seed=0,
        rank=0,
        world_size=1,
        num_workers=0,
        shuffle_buffer=500,
        data_root=str(data_root),
        with_index=True,
    )
    assert loader.sample_shape == (1, 16, 16) and loader.num_classes == 10 and loader.manifest["flip"] is False
    images, labels = load_train_arrays(data_root, "mnist16")
    x, y, index = next(iter(loader))
    assert torch.equal(x, images[index]) and torch.equal(y, labels[index])
    assert len(set(y.tolist())) >= 6  # the fixed shuffled order mixes classes in every shard


# --------------------------------------------------------------------------- two processes
def test_two_ranks_split_disjoint_resampled_different(tmp_path: Path, data_root: Path) -> None:
    from mdt_ds.data.demo import ensure_mnist_shards
    from tests.conftest import REPO, subprocess_env, torchrun_command

    ensure_mnist_shards(data_root, "mnist16")  # built once here, not raced by the two ranks
    cmd = torchrun_command(
        2,
        __file__,
        str(tmp_path),
        str(data_root),
    )
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # split: within the epoch (40 steps per rank here) every sample is seen at most once overall
    split = [i for run in runs for batch in run["split"] for i in batch]
    assert len(split) == 2 * 40 * 50 and len(set(split)) == len(split)
    # resampled: ranks (and the two worker lanes of each rank) draw different streams
    first = [tuple(run["resampled"][k]) for run in runs for k in (0, 1)]
    assert len(set(first)) == 4
    # a rank's stream does not depend on torch.distributed: rebuilt here from (rank, world) alone
    local = take(
        "mnist16",
        3,
        batch_size=50,
        seed=3,
        rank=1,
        world_size=2,
        num_workers=2,
        shuffle_buffer=200,
        resampled=False,
        data_root=str(data_root),
    )
    assert [b[2].tolist() for b in local] == runs[1]["split"][:3]


def _worker(out: Path, root: str) -> None:
    from mdt_ds.dist import launcher_env

    env = launcher_env()
    result = {}
    for mode, resampled, steps in (("split", False, 40), ("resampled", True, 4)):
        loader = build_loader(
            "mnist16",
            batch_size=50,
            seed=3,
            rank=env.rank,
            world_size=env.world_size,
            num_workers=2,
            shuffle_buffer=200,
            resampled=resampled,
            data_root=root,
            with_index=True,
        )
        it = iter(loader)
        result[mode] = [next(it)[2].tolist() for _ in range(steps)]
        del it
    (out / f"rank{env.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]), sys.argv[2])


@pytest.mark.parametrize("workers", [0, 1])
def test_pin_memory_reaches_the_dataloader(moments_dir: Path, monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    """pin_memory=True (what the trainer asks for on CUDA) pins every batch: the DataLoader gets
    pin_memory=True with workers, and each batch is pinned without; False pins nothing."""
    seen: list[dict] = []
    pinned: list[int] = []

    class FakeDataLoader:
        def __init__(self, dataset, **kwargs) -> None:
            seen.append(kwargs)
            self.dataset = dataset

        def __iter__(self):
            return iter(self.dataset)

    def fake_pin(self: torch.Tensor) -> torch.Tensor:  # pinning needs CUDA: record the call instead
        pinned.append(self.numel())
        return self

    monkeypatch.setattr(torch.utils.data, "DataLoader", FakeDataLoader)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    for pin in (False, True):
        seen.clear(), pinned.clear()
        loader = build_loader(
            moments_dir,
            batch_size=4,
            seed=0,
            rank=0,
            world_size=1,
            num_workers=workers,
            shuffle_buffer=8,
            pin_memory=pin,
        )
        x, y = next(iter(loader))
        assert loader.pin_memory is pin
        if workers:
            assert [k["pin_memory"] for k in seen] == [pin] and pinned == []
        else:
            assert seen == [] and pinned == ([x.numel(), y.numel()] if pin else [])
