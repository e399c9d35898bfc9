"""One run directory, one job: an exclusive lock that rank 0 holds while the job runs.

Two jobs on one run directory (a requeue while the old job still writes, a copy-pasted command)
resume from each other's half-written state, interleave ``stats.jsonl`` and deadlock when their
ranks disagree on the latest checkpoint. ``flock`` on ``RUN_DIR/.lock`` is released by the kernel
when the holder dies (kill -9 included), so a crashed job never leaves a stale lock behind.
The file records who holds it, for the message the second job prints.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from mdt_ds import dist
from mdt_ds.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirBusy(ConfigError):
    """Another job holds the run directory."""


class RunLock:
    """Rank 0's exclusive lock on a run directory (other ranks hold nothing)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another job"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
        job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
        return f"pid {info.get('pid')} on {info.get('host')}{job}, since {since}"

    def acquire(self) -> str | None:
        """Take the lock; returns None, or the message saying who holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return (f"{self.path.parent} is in use by another job ({self.holder()}; lock {self.path}). Wait for it "
                    f"to end or stop it, or use another run_dir.")
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("cannot lock %s (%s: the filesystem has no flock); make sure no other job uses this run_dir",
                        self.path, err.strerror)
        os.ftruncate(fd, 0)
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def lock_run_dir(run_dir: Path) -> RunLock:
    """Collective: rank 0 takes the lock and every rank learns the outcome, so a busy run
    directory stops all ranks with the same message (no rank left waiting in a barrier)."""
    lock = RunLock(run_dir)
    busy = None
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        busy = lock.acquire()
    busy = dist.from_main(busy)
    if busy:
        raise RunDirBusy(busy)
    return lock


def record_launch(run_dir: Path, env: dist.DistEnv, start_step: int) -> list[dict]:
    """Collective: who and where every rank is, and the CPU cores it may use, appended to
    ``run_dir/launch.jsonl`` by rank 0 alone (ranks appending to one file on a shared filesystem
    interleave their lines). A rank with one core under Slurm usually means srun was not given
    ``--cpus-per-task`` (several Slurm releases do not pass sbatch's on to srun)."""
    cpus = dist.usable_cpus()
    mine = {
        "rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank, "host": socket.gethostname(),
        "launcher": env.launcher, "slurm_nodeid": os.environ.get("SLURM_NODEID"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        "start_step": start_step, "time": time.time(), "cpus": len(cpus), "cpu_list": cpus,
    }
    log.warning("rank %d/%d on %s (node %s) starts at step %d with %d CPU core(s)", env.rank, env.world_size,
                mine["host"], mine["slurm_nodeid"], start_step, len(cpus))
    records = dist.gather_objects(mine)
    if dist.is_main():
        with open(run_dir / "launch.jsonl", "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
    return records
