"""What the device check's modules share: time limits, the saved-as-it-grows part report, error
measures, tolerances and child processes (benchmarks/device_check.py is the entry point)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Tolerances (relative L2 error ||out - ref|| / ||ref|| unless named otherwise), stated in the JSON
# beside each value. bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 2e-3 per value): one
# layer's output is off by a few 1e-3; 28 blocks and a backward pass compound that.
TOL = {
    "cuda_vs_cpu_fp32": 1e-4,
    "bf16_fwd_xl": 5e-2, "bf16_grad_xl": 1e-1,  # pure bf16 and bf16-amp vs fp32 at XL/2 depth
    "bias_grad_bf16": 1e-2,  # the table gradient summed in fp32, rounded once to bf16
    "compiled_fwd": 2e-2, "compiled_grad": 5e-2,  # compiled vs eager, both bf16 (inductor fuses, reorders)
    "compiled_fwd_fp32": 1e-4, "compiled_grad_fp32": 1e-3,
    "flex_vs_sdpa_fwd": 2e-3, "flex_vs_sdpa_grad": 1e-2,
    "first_loss_compile_vs_eager": 1e-2,  # XL/2 bf16 training: the first step's loss, relative
    "resume_loss_rel": 1e-2,
}


class PartTimeout(Exception):
    """A part ran past its limit (or the outer timeout's SIGTERM arrived)."""


class Report(dict):
    """A part's result that rewrites its JSON file at every ``put``: whatever finished before a
    crash, a time limit or the outer timeout's kill is on disk already."""

    def __init__(self, path: Path | None = None):
        super().__init__()
        self.path = path

    def put(self, key: str, value: object) -> object:
        self[key] = value
        self.save()
        return value

    def save(self) -> None:
        if self.path is not None:
            write_json(self.path, self)


def write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")  # renamed into place: never a half-written file
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """SIGALRM-based limit for the Python code of a part (a child process it waits on is killed
    by subprocess when the exception arrives)."""
    def handler(signum, frame):  # noqa: ANN001 - signal's API
        raise PartTimeout(f"ran past its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def check(value: float, tol: float, **extra: object) -> dict:
    return {"rel_err": value, "tol": tol, "ok": bool(value <= tol), **extra}


def skipped(reason: str) -> dict:
    return {"skipped": True, "reason": reason}


def guarded(fn: Callable[[], dict]) -> dict:
    """``fn()``, or its error as a dict: one failed check must not lose the others. A time limit
    still ends the part. The result gets its wall time ("seconds": what the next budget is cut by)."""
    start = time.monotonic()
    try:
        result = fn()
    except PartTimeout:
        raise
    except Exception as err:  # noqa: BLE001
        result = {"error": f"{type(err).__name__}: {str(err)[:1500]}", "traceback": traceback.format_exc()[-2000:]}
    if isinstance(result, dict):
        result.setdefault("seconds", time.monotonic() - start)
    return result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this repository importable, the rest inherited (the shared
    inductor cache directory among it)."""
    return dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra)


class Child:
    """``python ARGV... --out OUT`` started now, collected later: its JSON, or the error. A child
    that saved part of its JSON before it failed or timed out still returns that part. Its stderr
    goes to a file beside OUT (a pipe nobody reads while it runs could fill and stall it)."""

    def __init__(self, argv: list[str], out: Path):
        self.out, self.err = out, out.with_name(out.name + ".stderr")
        self.cmd = [sys.executable, *argv, "--out", str(out)]
        with self.err.open("w") as err:
            self.proc = subprocess.Popen(self.cmd, env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)

    def collect(self, timeout: float) -> dict:
        error = None
        try:
            self.proc.wait(timeout=max(1.0, timeout))
            if self.proc.returncode != 0 or not self.out.is_file():
                error = f"exit {self.proc.returncode}: {self.err.read_text(errors='replace')[-1500:]}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s: {self.err.read_text(errors='replace')[-500:]}"
        finally:
            self.kill()  # a timeout, or the part's limit arriving here: the child does not outlive it
        result = json.loads(self.out.read_text()) if self.out.is_file() else {}
        if error:
            result.update(error=error, cmd=" ".join(self.cmd))
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_child(argv: list[str], out: Path, timeout: float) -> dict:
    """A :class:`Child` waited for at once."""
    return Child(argv, out).collect(timeout)
