"""What a person watching a run sees: a tqdm bar and a one-line summary on rank 0, TensorBoard
scalars and sample grids, and ``stats.jsonl`` (one JSON line per logged step)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def drop_lines_after(stats: Path, step: int) -> int:
    """On resume at ``step``: drop the lines of steps after it (trained by a run that died before
    its next checkpoint and retrained now), as TensorBoard's ``purge_step`` does for its events.
    Atomic (rewritten beside it, then renamed); returns how many lines were dropped."""
    if not stats.is_file():
        return 0
    lines = stats.read_text().splitlines(keepends=True)
    keep = [line for line in lines if _line_step(line) <= step]
    if len(keep) == len(lines):
        return 0
    tmp = stats.with_name(stats.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, stats)
    return len(lines) - len(keep)


def _line_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line from a killed run: dropped with the lines after


class Monitor:
    def __init__(self, run_dir: Path, start_step: int, total_steps: int, enabled: bool, summary_every: int = 100):
        self.enabled = enabled
        self.run_dir = run_dir
        self.summary_every = max(1, summary_every)
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
        drop_lines_after(run_dir / "stats.jsonl", start_step)
        self.stats = open(run_dir / "stats.jsonl", "a", buffering=1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.started = time.time()

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        """Scalars must already be averaged across ranks (every rank calls, rank 0 writes).
        ``train`` scalars go to stats.jsonl; others (``eval``) to ``{prefix}.jsonl``."""
        if not self.enabled:
            return
        for key, value in scalars.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        line = json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n"
        if prefix != "train":
            with open(self.run_dir / f"{prefix}.jsonl", "a") as f:
                f.write(line)
            self.bar.write(f"step {step}: " + " ".join(f"{prefix}/{k}={v:.4g}" for k, v in scalars.items()))
            return
        self.stats.write(line)
        self.bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}", refresh=False)
        if step % self.summary_every == 0 or step == self.bar.total:  # and always the last step
            parts = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            self.bar.write(f"step {step}: {parts}")

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def image(self, tag: str, grid_uint8_hwc: np.ndarray, step: int) -> None:
        if self.enabled:
            self.writer.add_image(tag, grid_uint8_hwc, step, dataformats="HWC")

    def text(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.writer.close()
        self.stats.close()


class StepClock:
    """Seconds per training step over a logging window, without the phases that run between
    steps (checkpoints, EMA snapshots, grids, the in-training FID): counted in, their time would
    land in the next window and img/s and MFU would dip after each of them. On a GPU the device
    is synchronised at a phase's edges, so the phase is charged its own time, not the queued
    kernels of the step before it (the phase waits for them anyway)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.restart()

    def restart(self) -> None:
        self.start, self.steps, self.excluded_s = time.perf_counter(), 0, 0.0

    def tick(self) -> None:
        self.steps += 1

    def per_step(self) -> float:
        return (time.perf_counter() - self.start - self.excluded_s) / max(1, self.steps)

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        self._sync()
        began = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.excluded_s += time.perf_counter() - began

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


CPU_PEAK_BUDGET_S = 0.5  # a training run's start may not wait longer for its MFU denominator


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 0, reps: int = 0) -> float:
    """Matmul FLOP/s of this device in this dtype, timed on square matmuls large enough not to be
    launch-bound (8192 x 10 on a GPU: a 1024^3 matmul reads about 200 of an H100's 989 TFLOP/s;
    1024 x 5 on a CPU, where that size already runs at the cores' rate). On a CPU without
    hardware support for the dtype (bf16 on AVX2 runs about 1 GFLOP/s) the default size and reps
    shrink to fit ``CPU_PEAK_BUDGET_S``: the full measurement took 29 s there at every run start."""
    cuda = device.type == "cuda"
    if not cuda and not size and not reps:
        size, reps = _cpu_peak_plan(dtype)
    size = size or (8192 if cuda else 1024)
    reps = reps or (10 if cuda else 5)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2 if cuda else 1):  # warm-up: cuBLAS heuristics, clocks
        a @ b
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda:
        torch.cuda.synchronize(device)
    return 2 * size**3 * reps / (time.perf_counter() - start)


def _cpu_peak_plan(dtype: torch.dtype) -> tuple[int, int]:
    """(size, reps) for a CPU measurement within the budget, from one 256^3 probe matmul (which
    under-reads the rate, so the plan errs on the short side)."""
    probe = torch.randn(256, 256, dtype=dtype)
    start = time.perf_counter()
    probe @ probe
    rate = 2 * 256**3 / max(time.perf_counter() - start, 1e-9)
    for size in (1024, 512, 256):
        seconds = 2 * size**3 / rate  # one matmul; the warm-up runs one more than reps
        if seconds * 2 <= CPU_PEAK_BUDGET_S:
            break
    return size, max(1, min(5, int(CPU_PEAK_BUDGET_S / seconds) - 1))


# Dense peaks (no 2:4 sparsity), TFLOP/s: (bf16/fp16 tensor core, TF32 tensor core, fp32 non-tensor).
# NVIDIA datasheets list the tensor-core rates "with sparsity"; dense is half of that:
# A100 datasheet (SXM4 and PCIe, 40/80 GB): 312 / 156 / 19.5.
# H100 datasheet: SXM 989 / 494 / 67; PCIe 756 / 378 / 51; NVL 835 / 418 / 60.
# H200 datasheet: H200 SXM as H100 SXM (same GH100 compute); H200 NVL 835 / 418 / 60.
# H800 / A800 (export parts): the same compute as H100 / A100, only NVLink differs.
# V100 datasheet (Volta: fp16 tensor cores only, no bf16, no TF32): SXM2 125 / - / 15.7, PCIe
# 112 / - / 14; its "TF32" entry is the fp32 rate (fp32 matmuls run there with TF32 allowed too).
_PEAKS: dict[str, tuple[float, float, float]] = {
    "V100 SXM2": (125.0, 15.7, 15.7),
    "V100 PCIe": (112.0, 14.0, 14.0),
    "A100": (312.0, 156.0, 19.5),
    "H100 SXM": (989.0, 494.0, 67.0),
    "H100 PCIe": (756.0, 378.0, 51.0),
    "H100 NVL": (835.0, 418.0, 60.0),
    "H200 NVL": (835.0, 418.0, 60.0),
}
PEAK_PARTS = (*_PEAKS, "H200")  # names the table answers to (H200 SXM reads as H100 SXM)
NO_BF16 = ("V100 SXM2", "V100 PCIe")  # no bf16 tensor cores: no dense bf16 peak to divide by


def _part(name: str) -> str | None:
    """A ``torch.cuda.get_device_name()`` string -> a _PEAKS key (None: not in the table).
    e.g. "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H200" and "NVIDIA GH200 480GB" count as
    H100 SXM, "NVIDIA A100-SXM4-80GB" and "NVIDIA A100 80GB PCIe" are both A100."""
    n = name.upper()
    if "V100" in n:  # "Tesla V100-SXM2-32GB", "Tesla V100-PCIE-16GB"; a bare "V100" is the SXM2 part
        return "V100 PCIe" if "PCIE" in n else "V100 SXM2"
    if "H200" in n:
        return "H200 NVL" if "NVL" in n else "H100 SXM"
    if "H100" in n or "H800" in n:
        return "H100 PCIe" if "PCIE" in n else "H100 NVL" if "NVL" in n else "H100 SXM"
    if "A100" in n or "A800" in n:
        return "A100"
    return None


def tf32_enabled() -> bool:
    """Whether fp32 matmuls may run as TF32 (then the TF32 peak is the honest denominator)."""
    return torch.get_float32_matmul_precision() in ("high", "medium") or torch.backends.cuda.matmul.allow_tf32


def table_peak_flops(name: str, kind: str) -> tuple[float, str] | None:
    """Dense datasheet peak FLOP/s of a GPU named as ``torch.cuda.get_device_name()`` says or for
    short ("H100", "A100", "V100", "H200 NVL"), and the table's part name; ``kind``: "bf16", "fp16",
    "tf32" or "fp32" (no tensor cores). None: the part is not in the table (or, for bf16, has
    no bf16 tensor cores: NO_BF16)."""
    part = _part(name)
    if part is None or (kind == "bf16" and part in NO_BF16):
        return None
    half, tf32, fp32 = _PEAKS[part]
    tflops = {"bf16": half, "fp16": half, "tf32": tf32, "fp32": fp32}[kind]
    return tflops * 1e12, part


def device_peak_flops(device: torch.device, dtype: torch.dtype, measured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from) for MFU: the dense datasheet peak of a known NVIDIA part
    in the training dtype (fp32: TF32 when TF32 is allowed), else a measured large matmul
    (``measured`` if the caller timed one already)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if dtype in (torch.bfloat16, torch.float16):
            kind, label = "bf16" if dtype == torch.bfloat16 else "fp16", str(dtype).removeprefix("torch.")
        elif tf32_enabled():
            kind = label = "tf32"
        else:
            kind, label = "fp32", "fp32 (TF32 off)"
        found = table_peak_flops(name, kind)
        if found is not None:
            return found[0], f"{found[1]} dense {label} peak from NVIDIA's datasheet ({name})"
        label = f"{name}, no bf16 tensor cores" if _part(name) in NO_BF16 else f"{name}, not in the peak table"
    else:
        label = device.type
    flops = measured or measure_peak_flops(device, dtype)
    return flops, f"measured large-matmul peak ({label}, {str(dtype).removeprefix('torch.')})"


def device_name(device: torch.device) -> str:
    """What benchmarks record as the machine: the GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
