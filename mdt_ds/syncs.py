"""Count host-device synchronisations of a block of code.

``aten::_local_scalar_dense`` is the op behind ``Tensor.item()``, ``float(t)``,
``int(t)`` and ``bool(t)``: on a GPU every call waits for the device queue to
drain. Counting it with a ``TorchDispatchMode`` works on CPU too, so the
"no host sync inside a training step" target is testable without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OP = torch.ops.aten._local_scalar_dense.default
_COPY_OPS = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


def _device_to_host(func: Any, args: Any, kwargs: dict, out: Any) -> bool:
    """Whether this copy brings an accelerator tensor to the CPU (``.cpu()``, ``.tolist()``)."""
    src = args[1] if func is torch.ops.aten.copy_.default else args[0]
    dst = args[0] if func is torch.ops.aten.copy_.default else out
    return (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device.type not in ("cpu", "meta")
            and dst.device.type == "cpu")


class SyncCounter(TorchDispatchMode):
    """Dispatch mode that counts ``aten::_local_scalar_dense`` calls (``count``) and, separately,
    device-to-host copies (``copies_to_host``: ``.cpu()``, ``.tolist()`` of a GPU tensor, which
    also wait for the device; on a CPU-only machine there are none)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.copies_to_host = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _SYNC_OP:
            self.count += 1
        out = func(*args, **kwargs)
        if func in _COPY_OPS and _device_to_host(func, args, kwargs, out):
            self.copies_to_host += 1
        return out


@contextmanager
def count_host_syncs() -> Iterator[SyncCounter]:
    """``with count_host_syncs() as c: ...``; then ``c.count`` is the number of syncs."""
    counter = SyncCounter()
    with counter:
        yield counter
