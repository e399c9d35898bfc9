"""Host memory for training on a CPU: keep freed blocks in the process for reuse.

Every training step allocates the same large buffers anew: DeepSpeed's ZeRO step concatenates a
fresh flat gradient partition (154 MB for MDTv2-S/2), the backward fills fresh gradient buckets,
and each activation is a new tensor. glibc serves any block above its mmap threshold (at most
32 MiB) with ``mmap`` and unmaps it on ``free``, and it trims the heap top back to the kernel,
so each step faults those pages in again and the kernel zeroes them: 307,748 page faults per
MDTv2-S/2 step on a 2-core VM, 923 with this module (README, "Speed"; the step-time gain was
within that VM's run-to-run spread). With ``mmap`` off for large blocks and no trimming, a
freed block is reused as it is. On a GPU the caching allocator already reuses device memory;
this only concerns runs whose tensors live on the host.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import threading

log = logging.getLogger(__name__)

# mallopt(3) parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
TOP_PAD_BYTES = 64 << 20  # grow the heap in 64 MiB steps: fewer brk calls while it reaches its peak
# A user's own allocator choice wins: a preloaded allocator or glibc settings from the environment.
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_allocator_setting() -> str | None:
    """The environment setting that says the user chose the allocator's policy, if any."""
    for name in USER_SETTINGS:
        if name in os.environ:
            return name
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD"
    return None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory instead of returning it to the kernel: large
    blocks from the heap (no ``mmap``), no trimming of the heap top. Process-wide, and inherited
    by forked data workers. Returns False, changing nothing, off glibc or where the user set the
    allocator's policy (``MALLOC_*_``, ``GLIBC_TUNABLES``, a preloaded allocator). The cost: the
    process keeps its peak heap until it exits, which a training process reaches anyway."""
    setting = user_allocator_setting()
    if setting is not None:
        log.info("host memory: %s is set, glibc malloc left as configured", setting)
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = _libc()
    # mallopt returns 1 on success; a trim threshold of -1 turns trimming off (mallopt(3)).
    settings = {"M_MMAP_MAX": (M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),
                "M_TOP_PAD": (M_TOP_PAD, TOP_PAD_BYTES)}
    refused = [name for name, (param, value) in settings.items() if libc.mallopt(param, value) != 1]
    if refused:  # every setting is tried: a partial policy is named, not hidden
        log.warning("host memory: glibc refused mallopt %s; freed blocks may still be returned", refused)
        return False
    log.info("host memory: glibc malloc keeps freed blocks for reuse (cpu_malloc=keep)")
    return True


class _MallInfo2(ctypes.Structure):  # struct mallinfo2, glibc >= 2.33 (mallinfo(3))
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use_bytes() -> int | None:
    """Bytes glibc's malloc has handed out and not taken back (heap blocks in use plus mmapped
    blocks): the host's analogue of ``torch.cuda.memory_allocated``. Unlike the process's RSS it
    drops when tensors are freed, also where ``cpu_malloc=keep`` keeps the freed pages resident.
    None off glibc (or before 2.33)."""
    info = mallinfo2()
    return None if info is None else int(info.uordblks + info.hblkhd)


def mallinfo2() -> _MallInfo2 | None:
    """glibc's allocator statistics (mallinfo(3)): ``hblkhd`` bytes in mmapped blocks,
    ``uordblks`` bytes of heap blocks in use, ... None off glibc or before 2.33."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not hasattr(_libc(), "mallinfo2"):
        return None
    return _libc().mallinfo2()


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6")
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
    return libc


class HeapPeak:
    """The largest :func:`heap_in_use_bytes` seen while the ``with`` block runs, sampled every
    ``interval`` seconds from a thread (tensor ops release the GIL), and ``start``, the heap in
    use when it began: a per-phase peak of host memory, where the process's max RSS only ever
    grows. Both stay None off glibc."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while self._sample_once() and not self._stop.wait(self.interval):
            pass

    def __enter__(self) -> HeapPeak:
        self.start = heap_in_use_bytes()
        self._thread = threading.Thread(target=self._sample, name="heap-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_once()

    def _sample_once(self) -> bool:
        now = heap_in_use_bytes()
        if now is not None:
            self.peak = now if self.peak is None else max(self.peak, now)
        return now is not None
