"""What a person watching a run sees: a tqdm bar and a one-line summary on rank 0, TensorBoard
scalars and sample grids, and ``stats.jsonl`` (one JSON line per logged step)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


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
        if step % self.summary_every == 0:
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


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, reps: int = 5) -> float:
    """Matmul FLOP/s of this device in this dtype (the MFU denominator when no peak is given)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - start)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
