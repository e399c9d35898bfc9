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
import logging
import os
import platform

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
    libc = ctypes.CDLL("libc.so.6")
    # mallopt returns 1 on success; a trim threshold of -1 turns trimming off (mallopt(3)).
    settings = {"M_MMAP_MAX": (M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),
                "M_TOP_PAD": (M_TOP_PAD, TOP_PAD_BYTES)}
    refused = [name for name, (param, value) in settings.items() if libc.mallopt(param, value) != 1]
    if refused:  # every setting is tried: a partial policy is named, not hidden
        log.warning("host memory: glibc refused mallopt %s; freed blocks may still be returned", refused)
        return False
    log.info("host memory: glibc malloc keeps freed blocks for reuse (cpu_malloc=keep)")
    return True
