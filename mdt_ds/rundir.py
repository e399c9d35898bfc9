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
