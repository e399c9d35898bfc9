"""Part (a)'s train-and-resume check of benchmarks/device_check.py: a 1-GPU ZeRO-2 bf16 run of 20
steps through ``mdt_ds.train`` against 10 steps + a resume to 20, deterministic mode first.

Deterministic mode switches ``torch.utils.deterministic.fill_uninitialized_memory`` on (torch's
default there): every ``torch.empty`` is filled with NaN, so code that reads memory it never
wrote gets NaN where a normal run gets whatever the memory held. NaN losses in that mode are
therefore rerun once with the fill off: finite then, the NaN came from an uninitialised read
(a real bug that normal runs hide, not a divergence); NaN again, the training itself diverges.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from device_common import REPO, TOL, Report, child_env, guarded, skipped

TRAIN = [  # the tiny run: mnist16 pixels, Tiny preset, ZeRO-2 bf16, one process
    "model.preset=MDTv2-Tiny/2", "model.input_size=16", "model.in_channels=1", "data.source=mnist16",
    "data.num_workers=0", "data.shuffle_buffer=64", "global_batch=8", "log_every=1", "ema_decay=0.9",
    "optim.lr=1e-3", "zero_stage=2", "precision=bf16", "ckpt_every=10", "sample_every=10",
]
NAN_NOTE = ("NaN losses under torch.use_deterministic_algorithms(True), which fills uninitialised memory "
            "(torch.empty) with NaN (torch.utils.deterministic.fill_uninitialized_memory): rerun once with the "
            "fill off, see deterministic_no_fill")


def train_cmd(run_dir: Path, steps: int, deterministic: bool, fill: bool = True) -> list[str]:
    """``python -m mdt_ds.train`` as a child, deterministic mode switched on before anything runs."""
    code = "import sys, torch\n"
    if deterministic:
        code += "torch.use_deterministic_algorithms(True)\n"
        if not fill:
            code += "torch.utils.deterministic.fill_uninitialized_memory = False\n"
    code += "from mdt_ds.train import main\nsys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", code, *TRAIN, f"run_dir={run_dir}", f"steps={steps}", "force_resume=true"]


def train_runs(jobs: list[tuple[Path, int]], deterministic: bool, fill: bool, timeout: float) -> list[dict]:
    """Run the given (run_dir, steps) trainings side by side (separate processes on the one GPU:
    a Tiny run leaves it mostly idle), each result with its stats, exit code and stderr tail.
    Stderr goes to files: a pipe left unread while another run is waited for could fill and stall."""
    env = child_env(**({"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if deterministic else {}))
    start = time.perf_counter()
    logs = [run_dir.with_name(f"{run_dir.name}_{steps}.stderr") for run_dir, steps in jobs]
    procs = []
    for (run_dir, steps), log in zip(jobs, logs):
        with log.open("w") as err:
            procs.append(subprocess.Popen(train_cmd(run_dir, steps, deterministic, fill), env=env, cwd=REPO,
                                          stdout=subprocess.DEVNULL, stderr=err))
    results = []
    try:
        for (run_dir, _), proc, log in zip(jobs, procs, logs):
            proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
            stats_file = run_dir / "stats.jsonl"
            stats = [json.loads(line) for line in stats_file.read_text().splitlines()] if stats_file.is_file() else []
            results.append({"returncode": proc.returncode, "stats": stats, "wall_s": time.perf_counter() - start,
                            "stderr": log.read_text(errors="replace")[-1500:]})
    finally:
        for proc in procs:  # a timeout or the part's limit: no training outlives the check
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def ema_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "snapshots" / f"ema_{step:07d}.pt", map_location="cpu", weights_only=True)


def median_step_time(stats: list[dict]) -> float:
    times = sorted(float(s["step_time"]) for s in stats if "step_time" in s and int(s.get("step", 0)) > 2)
    return times[len(times) // 2] if times else float("nan")


def losses_by_step(stats: list[dict]) -> dict[int, float]:
    return {int(s["step"]): float(s["loss"]) for s in stats if "loss" in s}


def has_nan(runs: list[dict]) -> bool:
    """A non-finite loss in any run's stats, or a run the trainer stopped for one."""
    return any(not math.isfinite(v) for r in runs for v in losses_by_step(r["stats"]).values()) or any(
        r["returncode"] != 0 and "non-finite" in r["stderr"] for r in runs)


def resume_mode(work: Path, name: str, deterministic: bool, fill: bool, left: Callable[[], float]) -> dict:
    """20 steps straight vs 10 + resume to 20: the straight run and the first half run side by
    side, then the resume."""
    straight_dir, resumed_dir = work / f"{name}_straight", work / f"{name}_resumed"
    straight, first = train_runs([(straight_dir, 20), (resumed_dir, 10)], deterministic, fill, left())
    resumed = train_runs([(resumed_dir, 20)], deterministic, fill, left())[0]
    out: dict = {"deterministic": deterministic, "fill_uninitialized_memory": fill if deterministic else None,
                 "nan_losses": has_nan([straight, first, resumed])}
    failed = {k: r for k, r in (("straight", straight), ("first_half", first), ("resume", resumed)) if r["returncode"]}
    if failed:
        out["failed_runs"] = {k: {"returncode": r["returncode"], "stderr": r["stderr"]} for k, r in failed.items()}
        out["ok"] = False
        return out
    a, b = losses_by_step(straight["stats"]), losses_by_step(resumed["stats"])
    shared = sorted(set(a) & set(b) & set(range(11, 21)))
    ea, eb = ema_state(straight_dir, 20), ema_state(resumed_dir, 20)
    loss_rel = max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in shared) if shared else float("nan")
    out.update({
        "steps_compared": shared, "max_loss_rel_diff": loss_rel,
        "ema_bit_exact": all(torch.equal(ea[k], eb[k]) for k in ea),
        "ema_max_abs_diff": max(float((ea[k].float() - eb[k].float()).abs().max()) for k in ea),
        "straight_wall_s": straight["wall_s"], "median_step_time_s": median_step_time(straight["stats"]),
        "grid": (straight_dir / "samples" / "step_0000010.png").is_file(),
        "checkpoint": any(resumed_dir.rglob("step_0000010*")), "last_stats": straight["stats"][-1],
    })
    if deterministic:
        out["ok"] = bool(out["ema_bit_exact"] and loss_rel == 0.0 and not out["nan_losses"])
    else:
        out.update(tol=TOL["resume_loss_rel"], ok=bool(loss_rel <= TOL["resume_loss_rel"]))
    return out


def nan_verdict(no_fill: dict) -> str:
    if no_fill.get("nan_losses"):
        return "NaN with the fill off too: the training itself produces NaN (a real bug), not deterministic-mode noise"
    return ("finite with the fill off: the NaN came from reading memory that was never written (torch.empty "
            "filled with NaN); normal runs read whatever it held, so this is an uninitialised read to find, "
            "not a divergence")


def check_resume(work: Path, quick: bool, deadline: float, report: Report | None = None) -> dict:
    """Deterministic mode first, then normal; each mode's result is saved (``report.save()``) as
    soon as it is in. NaN in deterministic mode: that mode once more with the fill off."""
    if quick:
        return skipped("--quick: six training runs; the trainer's tests cover resume on CPU")
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    if report is not None:
        report["train_resume"] = out  # the same dict: every save below writes what is in it so far

    def left() -> float:
        return max(1.0, deadline - time.monotonic())  # past the deadline: fail fast

    def save() -> None:
        if report is not None:
            report.save()

    plan = [("deterministic", True, True), ("normal", False, True)]
    while plan:
        name, det, fill = plan.pop(0)
        if deadline - time.monotonic() < 10:
            out[name] = skipped("train_resume's share of part (a) used up")
        else:
            out[name] = guarded(lambda: resume_mode(work, name, det, fill, left))  # noqa: B023 - called at once
            if det and fill and out[name].get("nan_losses"):
                out[name]["note"] = NAN_NOTE
                plan.insert(0, ("deterministic_no_fill", True, False))
            elif name == "deterministic_no_fill":
                out[name]["verdict"] = nan_verdict(out[name])
        save()
    d, n = out.get("deterministic", {}), out.get("normal", {})
    if "straight_wall_s" in d and "straight_wall_s" in n:
        out["deterministic_cost"] = {
            "wall_ratio_det_over_normal": d["straight_wall_s"] / n["straight_wall_s"],
            "step_time_ratio_det_over_normal": d["median_step_time_s"] / n["median_step_time_s"],
            "note": "wall: whole 20-step runs incl. start-up (each beside the first 10 steps of the resumed "
                    "run, in both modes); step time: median of stats.jsonl step_time, steps 3-20",
        }
    out["ok"] = all(v.get("ok", False) for k, v in out.items() if k in ("deterministic", "normal"))
    save()
    return out
