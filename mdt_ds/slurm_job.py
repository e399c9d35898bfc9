"""What runs inside a Slurm job submitted by ``mdt-submit``: the job functions (:class:`TrainJob`,
:class:`ModuleJob`), the relay of Slurm's warning signals to the trainer's graceful stop, and the
self-requeue after a clean preemption stop. See :mod:`mdt_ds.launch` for the submission side and
the whole preemption story.
"""

from __future__ import annotations

import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

EXIT_PREEMPTED = 3  # = mdt_ds.train.EXIT_PREEMPTED (kept here so submitting does not import torch)
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


def _submitit():
    try:
        import submitit
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("mdt-submit needs submitit: pip install 'mdt-ds[slurm]'") from err
    return submitit


class _Relay:
    """Route every preemption signal to the program's graceful stop.

    submitit's own USR2 handler would requeue at once, in the middle of a step; the trainer listens
    for SIGUSR1/SIGTERM from ``train()`` on. Installed before the program runs: while the program
    listens to SIGUSR1, a USR2 (or a SIGTERM it does not handle) goes to that handler. A signal that
    arrives before it listens is kept and delivered as SIGUSR1 as soon as it does (a thread checks
    every 0.2 s) -- or, with ``on_unhandled_warning`` (programs that never listen, e.g. the
    sampler, which resumes by rerun), a USR1/USR2 calls it (requeue now) and a SIGTERM ends the
    process as it would have without submitit."""

    def __init__(self, on_unhandled_warning: Callable[[], None] | None = None) -> None:
        self.on_unhandled_warning = on_unhandled_warning
        self.pending = threading.Event()
        self.unhandled = threading.Event()
        self.received: list[str] = []

    def install(self) -> _Relay:
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._handle)
        threading.Thread(target=self._deliver_pending, name="mdt-preempt-relay", daemon=True).start()
        return self

    def _listener(self) -> Callable[..., Any] | None:
        handler = signal.getsignal(signal.SIGUSR1)
        return handler if callable(handler) and handler != self._handle else None

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signal.Signals(signum).name)
        listener = self._listener()
        if listener is not None:
            listener(signal.SIGUSR1, frame)
        elif self.on_unhandled_warning is None:
            self.pending.set()
        elif signum == signal.SIGTERM:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.unhandled.set()

    def _deliver_pending(self) -> None:
        while True:
            if self.pending.is_set() and self._listener() is not None:
                self.pending.clear()
                os.kill(os.getpid(), signal.SIGUSR1)
            if self.unhandled.is_set() and self.on_unhandled_warning is not None:
                self.unhandled.clear()
                self.on_unhandled_warning()
            time.sleep(0.2)


def _prepare_task(env: dict[str, str], on_unhandled_warning: Callable[[], None] | None = None) -> Any:
    """Environment of one task: extra variables, the torchrun variables, the signal relay."""
    submitit = _submitit()
    os.environ.update({k: str(v) for k, v in env.items()})
    # CUDA_VISIBLE_DEVICES is left alone: mdt_ds.dist selects cuda:LOCAL_RANK itself.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    _Relay(on_unhandled_warning).install()
    return submitit.JobEnvironment()


def slurm_job_state(job_id: str) -> str:
    """The controller's JobState of a job ("RUNNING", "CANCELLED", ...), "" when unknown."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = re.search(r"\bJobState=(\S+)", out)
    return match.group(1) if match else ""


def _say(message: str, error: bool = False) -> None:
    print(f"mdt-submit: {message}", file=sys.stderr if error else sys.stdout, flush=True)


def requeue_job(job_id: str, max_requeues: int) -> bool:
    """``scontrol requeue`` this job if it still runs (not when it is being cancelled, is out of
    time, or Slurm preempts and requeues it by itself) and has not been requeued too often."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        _say(f"not requeued: {restarts} requeues already (max_requeues={max_requeues}); resubmit to resume", True)
        return False
    state = slurm_job_state(job_id)
    if state != "RUNNING":
        _say(f"job {job_id} is {state or 'gone'}: not requeued (resubmit the same command to resume)", True)
        return False
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        _say(f"scontrol requeue {job_id} failed ({proc.stderr.strip()}); resubmit the same command to resume", True)
        return False
    _say(f"job {job_id} requeued (restart {restarts + 1})")
    return True


def _after_preemption(job_env: Any, max_requeues: int) -> None:
    """The program stopped cleanly after a preemption signal (checkpoint saved). Rank 0 requeues
    the job; every rank exits without a result (the requeued attempt writes it). Outside Slurm
    (local/debug executors) the result is returned as is."""
    if job_env.cluster != "slurm":
        return
    if job_env.global_rank == 0:
        _say("stopped cleanly after a preemption signal; checkpoint saved")
        requeue_job(job_env.job_id, max_requeues)
    sys.stdout.flush()
    sys.exit(EXIT_PREEMPTED)


@dataclass
class TrainJob:
    """The job function: ``train(load_config(configs, overrides))`` in every task.

    Stateless between attempts (the run's state lives in ``run_dir``), so :meth:`checkpoint` —
    what submitit resubmits on requeue — is this same job, which resumes from the latest checkpoint."""

    configs: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    max_requeues: int = 1000

    def __call__(self) -> dict:
        job_env = _prepare_task(self.env)
        from mdt_ds import dist
        from mdt_ds.config import load_config
        from mdt_ds.train import train

        cfg = load_config(self.configs, self.overrides)
        finished = False
        try:
            result = train(cfg)
            finished = True
        finally:
            dist.teardown(synchronise=finished)
        if result.get("preempted"):
            _after_preemption(job_env, self.max_requeues)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The resubmission after a preemption: the same job (it resumes from ``run_dir``)."""
        return _submitit().helpers.DelayedSubmission(self, *args, **kwargs)


@dataclass
class ModuleJob:
    """Run ``python -m MODULE ARGS`` (or a script path) in every task, e.g. the 50K sampler.
    Exit code 3 (EXIT_PREEMPTED) means "stopped cleanly, resume by rerun": the job is requeued.
    A program that does not handle SIGUSR1 (the sampler) is requeued as soon as the warning comes;
    its rerun must resume from what it wrote (the sampler keeps finished shards)."""

    target: str
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    max_requeues: int = 1000

    def __call__(self) -> dict:
        def requeue_now() -> None:  # a warning the program does not handle: it resumes by rerun
            job_env = _submitit().JobEnvironment()
            if job_env.cluster == "slurm" and job_env.global_rank == 0:
                requeue_job(job_env.job_id, self.max_requeues)

        job_env = _prepare_task(self.env, requeue_now)
        is_script = self.target.endswith(".py")
        sys.argv = [self.target, *self.argv]
        code: Any = 0
        try:
            if is_script:
                runpy.run_path(self.target, run_name="__main__")
            else:
                runpy.run_module(self.target, run_name="__main__", alter_sys=True)
        except SystemExit as done:
            code = done.code
        code = 0 if code is None else code
        if code == EXIT_PREEMPTED:
            _after_preemption(job_env, self.max_requeues)
        if code != 0:
            raise RuntimeError(f"{self.target} {' '.join(self.argv)} exited with {code}")
        return {"target": self.target, "exit_code": 0, "rank": job_env.global_rank}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        return _submitit().helpers.DelayedSubmission(self, *args, **kwargs)
