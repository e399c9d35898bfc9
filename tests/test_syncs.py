"""mdt_ds.syncs: counting host syncs (``aten::_local_scalar_dense``) on CPU."""

from __future__ import annotations

import pytest
import torch

from mdt_ds.syncs import count_host_syncs

pytestmark = pytest.mark.core


def test_counts_each_scalar_read_and_nothing_else() -> None:
    x = torch.arange(6.0)
    with count_host_syncs() as counter:
        y = (x * 2).sum()  # device-side work: no sync
        torch.where(x > 2, x, -x).cumsum(0)
    assert counter.count == 0
    with count_host_syncs() as counter:
        y.item()
        float(y)
        int(x[1])
        bool(x[2] > 0)
        if x[3]:
            pass
    assert counter.count == 5


def test_nested_counters_both_see_the_inner_syncs() -> None:
    """The trainer's sync test splits a step into DeepSpeed's share (inner) and the total (outer)."""
    x = torch.ones(3)
    with count_host_syncs() as outer:
        float(x.sum())
        with count_host_syncs() as inner:
            float(x.mean())
            int(x.max())
    assert (outer.count, inner.count) == (3, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device-to-host copies need a GPU (device check)")
def test_device_to_host_copies_are_counted_apart_on_cuda() -> None:
    x = torch.ones(4, device="cuda")
    with count_host_syncs() as counter:
        x.sum().tolist()
        x.cpu()
        (x * 2).mean()
    assert counter.copies_to_host == 2 and counter.count == 0
