"""cpu_malloc=keep: a training step's fresh host buffers are reused, not faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from mdt_ds import hostmem
from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.core

# A step's allocation pattern on the host: ZeRO's step concatenates the gradients into a fresh
# flat partition, and activations are fresh tensors; all freed at the end of the step.
STEP_SCRIPT = """
import json, resource, sys, torch
from mdt_ds.hostmem import keep_freed_memory, mallinfo2
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
mmapped_before = mallinfo2().hblkhd  # blocks the imports left mapped, policy or not
grads = [torch.randn(1 << 20) for _ in range(40)]  # 160 MB of gradients
mmapped = []

def step():
    flat = torch.cat(grads)
    act = torch.empty(30 << 20)
    act.fill_(1.0)
    flat.mul_(2.0)
    mmapped.append(mallinfo2().hblkhd)

faults = []
for _ in range(STEPS):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults, "mmapped_bytes": max(mmapped) - mmapped_before}))
""".replace("STEPS", "16")


def run_steps(mode: str, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT, mode], cwd=REPO, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux only")
def test_keep_freed_memory_stops_per_step_page_faults() -> None:
    default, keep = run_steps("default"), run_steps("keep")
    # The policy itself: by default glibc serves the step's large blocks (and the gradients) with
    # mmap and unmaps them on free; with keep, every block comes from the retained heap.
    assert not default["applied"] and default["mmapped_bytes"] > 300e6, default
    assert keep["applied"] and keep["mmapped_bytes"] == 0, keep
    # Its effect: default faults 190 MB of fresh blocks in (~48k pages of 4 KiB) on every step.
    # With keep the heap still grows over the first steps, until it holds a layout in which each
    # of the step's blocks fits a freed one: 1 to 6 steps of 20-40k faults, depending on what
    # else sits on the heap (CI's 25,600 per step was such a warm-up, averaged over 4 steps).
    # After it, none: asserted on the last 8 of 16 steps.
    assert min(default["faults"]) > 20_000, default
    assert max(keep["faults"][8:]) < 1_000, keep


def test_a_users_allocator_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_mallopt(*_args: object) -> None:
        raise AssertionError("mallopt must not be called when the user chose the allocator")

    monkeypatch.setattr(hostmem, "_libc", no_mallopt)
    for name, value in (("MALLOC_MMAP_MAX_", "65536"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1"),
                        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert hostmem.user_allocator_setting() == name
            assert hostmem.keep_freed_memory() is False


def test_cpu_engines_keep_host_memory_unless_told_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    from mdt_ds import engine
    from mdt_ds.config import TrainConfig, apply_overrides

    calls: list[bool] = []
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: calls.append(True) or True)

    class Built(Exception):
        pass

    def stop(*_args: object, **_kwargs: object) -> None:
        raise Built  # the allocator decision is made before DeepSpeed is touched

    monkeypatch.setattr(engine.deepspeed, "initialize", stop)
    monkeypatch.setattr(engine, "accelerator_device", lambda: engine.torch.device("cpu"))
    tiny = ["model.preset=MDTv2-Tiny/2", "global_batch=2", "precision=fp32"]
    for overrides, expected in ((tiny, [True]), (tiny + ["cpu_malloc=default"], [])):
        calls.clear()
        with pytest.raises(Built):
            engine.build_engine(apply_overrides(TrainConfig(), overrides), 1)
        assert calls == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux only")
def test_a_refused_setting_is_reported_and_the_rest_still_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[int] = []

    class Libc:
        @staticmethod
        def mallopt(param: int, value: int) -> int:
            tried.append(param)
            return 0 if param == hostmem.M_TRIM_THRESHOLD else 1

    monkeypatch.setattr(hostmem, "user_allocator_setting", lambda: None)
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(hostmem, "_libc", lambda: Libc())
    assert hostmem.keep_freed_memory() is False
    assert sorted(tried) == sorted([hostmem.M_MMAP_MAX, hostmem.M_TRIM_THRESHOLD, hostmem.M_TOP_PAD])


@pytest.mark.skipif(hostmem.heap_in_use_bytes() is None, reason="mallinfo2: glibc >= 2.33 only")
def test_heap_peak_is_per_block_where_max_rss_only_grows() -> None:
    """The benchmark's per-variant host memory: a block that held 400 MB peaks near 400 MB more
    than the base; a later block that holds 8 KB does not inherit it, as the max RSS would."""
    base = hostmem.heap_in_use_bytes()
    with hostmem.HeapPeak() as big:
        held = torch.ones(100 << 20)  # 400 MB, held while the sampler runs
        time.sleep(0.05)
        del held
    with hostmem.HeapPeak() as small:
        kept = torch.ones(2048)
        time.sleep(0.05)
    assert big.start == base and big.peak - base >= 400 << 20
    assert small.peak - small.start < 16 << 20 and small.peak - base < 16 << 20 and kept.sum() == 2048
