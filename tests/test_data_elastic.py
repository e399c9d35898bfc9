"""The data position across a world-size change: split epochs finish without repeats, resampled
streams continue deterministically, and a restart inside the handed-over remainder is exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mdt_ds.data.loader import Loader, build_loader
from tests.test_data_loader import write_moments_set

pytestmark = pytest.mark.data

N = 120  # 6 shards of 20


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_moments_set(tmp_path_factory.mktemp("elastic"), n=N, per_shard=20)


def loaders(data: Path, world: int, batch: int, start: int = 0, resume=None, workers: int = 0, **kw) -> list[Loader]:
    args = dict(seed=7, num_workers=workers, shuffle_buffer=15, resampled=False, with_index=True)
    args.update(kw)
    return [
        build_loader(
            str(data), batch_size=batch, rank=r, world_size=world, start_step=start, resume_from=resume, **args
        )
        for r in range(world)
    ]


def run(parts: list[Loader], steps: int) -> list[list[tuple[torch.Tensor, ...]]]:
    """``steps`` batches from every rank: [rank][step] -> (x, y, index)."""
    out = []
    for loader in parts:
        it = iter(loader)
        out.append([next(it) for _ in range(steps)])
        del it
    return out


def indices(batches: list[list[tuple[torch.Tensor, ...]]]) -> list[int]:
    return [i for rank in batches for b in rank for i in b[2].tolist()]


def test_position_is_small_json_computed_without_data(data: Path) -> None:
    loader = loaders(data, 2, 10)[1]
    pos = loader.position(3)
    assert json.loads(json.dumps(pos)) == pos
    assert pos["world_size"] == 2 and pos["lanes"] == 1 and pos["batch_size"] == 10 and pos["mode"] == "split"
    assert pos["samples"] == 60 and pos["step"] == 3 and pos["remainder"] is None


def test_split_two_ranks_to_one_mid_epoch(data: Path) -> None:
    # Epoch 0 gives each of 2 ranks 3 shards = 6 batches of 10; stop after 3 (60 samples seen).
    before = loaders(data, 2, 10)
    seen = indices(run(before, 3))
    pos = before[0].position(3)
    # The new layout keeps the global batch (1 x 20 = 2 x 10): micro-step 3 = the same 60 samples.
    after = loaders(data, 1, 20, start=3, resume=pos)
    rest = run(after, 3 + 6)[0]
    finished = seen + [i for b in rest[:3] for i in b[2].tolist()]
    assert len(finished) == len(set(finished)) == N  # the epoch: every sample exactly once
    assert after[0].position(6)["remainder"] is None and after[0].position(6)["base"] == {"step": 6, "epoch": 1}
    # Epoch 1 is the new layout's ordinary epoch 1 (the same samples per step as a fresh 1-rank run).
    fresh = run(loaders(data, 1, 20), 12)[0]
    assert [b[2].tolist() for b in rest[3:]] == [b[2].tolist() for b in fresh[6:]]


def test_split_one_rank_to_two_with_workers_and_a_restart_inside_the_remainder(data: Path) -> None:
    before = loaders(data, 1, 20)
    seen = indices(run(before, 2))  # 40 of 120
    pos = before[0].position(2)
    after = loaders(data, 2, 10, start=2, resume=pos, workers=2)  # 2 ranks x 2 lanes
    # 80 unseen samples over 4 lanes: 2 batches per lane, steps 2..5 of each rank.
    assert after[0].position(3)["remainder"]["batches"] == 2
    rest = run(after, 4)
    finished = seen + indices(rest)
    assert len(finished) == len(set(finished)) == N
    # A restart at step 4 with the same layout, from the position saved then: exactly the same batches.
    again = run(loaders(data, 2, 10, start=4, resume=after[0].position(4), workers=2), 2)
    for r in range(2):
        for a, b in zip(rest[r][2:], again[r]):
            assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    # A change to yet another layout inside the remainder (4 ranks x 5): still no sample twice.
    third = loaders(data, 4, 5, start=4, resume=after[1].position(3 + 1))
    tail = run(third, 4)  # 80 - 40 = 40 unseen over 4 ranks: 2 batches of 5 each
    assert third[0].position(4)["remainder"]["batches"] == 2
    union = seen + indices([r[:2] for r in rest]) + indices([r[:2] for r in tail])
    assert len(union) == len(set(union)) == N


def test_resume_from_the_same_layout_is_the_plain_stream(data: Path) -> None:
    plain = run(loaders(data, 2, 10, start=4), 4)
    pos = loaders(data, 2, 10)[0].position(4)
    same = run(loaders(data, 2, 10, start=4, resume=pos), 4)
    assert all(torch.equal(a[0], b[0]) for r in range(2) for a, b in zip(plain[r], same[r]))


@pytest.mark.parametrize("world", [1, 3])
def test_resampled_continues_the_new_world_size_stream(data: Path, world: int) -> None:
    # Resampled mode: a loader for world size W started at step k yields batches k.. of an
    # uninterrupted W stream, whatever layout saved the position.
    old = loaders(data, 2, 6, resampled=True, segment_batches=2)[0].position(5)
    full = run(loaders(data, world, 4, resampled=True, segment_batches=2), 8)
    resumed = run(loaders(data, world, 4, start=5, resume=old, resampled=True, segment_batches=2), 3)
    for r in range(world):
        for a, b in zip(full[r][5:], resumed[r]):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
