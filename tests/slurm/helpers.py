"""Helpers of the tests on the local Slurm cluster: Slurm commands with timeouts, the tiny run
they train, and readers of a run's outputs. Every wait here has a timeout: a cancelled or stuck
job fails a test, never hangs it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import PYTHON, REPO, subprocess_env

HERE = Path(__file__).resolve().parent
START = HERE / "start-local-slurm.sh"
STOP = HERE / "stop-local-slurm.sh"
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"

# The tiny CPU run of the Slurm tests: 2 ranks (2 nodes x 1 task), ZeRO 2, fp32, a checkpoint every
# 8 steps; 24 steps leave time to interrupt a run after its second step. peak_tflops skips the
# FLOPS probe at start-up (it only feeds the MFU column).
TINY = [
    "model.preset=MDTv2-Tiny/2",
    "model.input_size=16",
    "model.in_channels=1",
    "data.source=mnist16",
    "data.num_workers=0",
    "global_batch=8",
    "ckpt_every=8",
    "log_every=1",
    "precision=fp32",
    "zero_stage=2",
    "optim.name=adamw",
    "optim.lr=1e-3",
    "peak_tflops=1",
]
STEPS = 24
JOB_TIMEOUT = 240  # seconds for one job, a requeue included
TASK_CPUS = 2  # each emulated node has this host's 2 cores; task/affinity binds each task to what it asked


@dataclass
class Cluster:
    state_dir: Path
    env: dict[str, str]  # SLURM_CONF=... for every Slurm command
    partition: str

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout, check=check
        )

    def job_env(self, **extra: str) -> dict[str, str]:
        """Environment for sbatch/mdt-submit: passed on to the jobs (repo on PYTHONPATH, one thread
        per rank, the repo-local TORCH_EXTENSIONS_DIR, CPU DeepSpeed, offline hub)."""
        return subprocess_env(**self.env, MDT_PYTHON=PYTHON, MDT_REPO=str(REPO), **extra)

    def sbatch(self, *args: str, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", *args], env=env or self.job_env(), capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, f"sbatch failed: {out.stderr}"
        return out.stdout.strip().split(";")[0]

    def squeue_state(self, job_id: str) -> str:
        out = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
        return out.stdout.strip()

    def sacct_states(self, job_id: str) -> list[str]:
        """Every attempt's state, oldest first (``-D``: requeued attempts too)."""
        out = self.run("sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State", check=False)
        return [line.split("|")[1].split()[0] for line in out.stdout.splitlines() if line.strip()]

    def wait_sacct(self, job_id: str, predicate: Callable[[list[str]], bool], timeout: float = 30) -> list[str]:
        """sacct rows are written asynchronously: poll until ``predicate(states)`` holds."""
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            states = self.sacct_states(job_id)
            if predicate(states):
                return states
            time.sleep(1)
        raise AssertionError(f"sacct for job {job_id} did not reach the expected states in {timeout:.0f} s: {states}")

    def wait_gone(self, job_id: str, timeout: float = JOB_TIMEOUT, log: Path | None = None) -> None:
        """Wait until the job left the queue (finished, failed, cancelled), at most ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.squeue_state(job_id):
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
                raise AssertionError(f"job {job_id} still queued/running after {timeout:.0f} s; cancelled.\n{tail}")
            time.sleep(1)


# --------------------------------------------------------------------------- run outputs
def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curve(run_dir: Path) -> dict[int, float]:
    """step -> loss from stats.jsonl (the last line of a step wins)."""
    return {int(r["step"]): float(r["loss"]) for r in read_jsonl(run_dir / "stats.jsonl") if "loss" in r}


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def submit_train_sbatch(
    cluster: Cluster,
    workdir: Path,
    run_dir: Path,
    *overrides: str,
    env: dict[str, str] | None = None,
    sbatch_args: tuple[str, ...] = (),
    nodes: int = 2,
    cpus_per_task: int = TASK_CPUS,
) -> tuple[str, Path]:
    """slurm/train.sbatch on ``nodes`` nodes x 1 task (CPU): returns (job id, its log file)."""
    log = workdir / "slurm-%j.out"
    job_id = cluster.sbatch(
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        "--gpus-per-node=0",
        f"--cpus-per-task={cpus_per_task}",
        f"--output={log}",
        f"--partition={cluster.partition}",
        "--time=15",
        *sbatch_args,
        str(TRAIN_SBATCH),
        *TINY,
        f"steps={STEPS}",
        f"run_dir={run_dir}",
        *overrides,
        env=env,
    )
    return job_id, Path(str(log).replace("%j", job_id))


@dataclass
class Reference:
    run_dir: Path
    job_id: str
    log: Path
    losses: dict[int, float]
