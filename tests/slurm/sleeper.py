"""A stand-in for ``mdt_ds.train`` in the fast Slurm tests (``MDT_TRAIN_MODULE=tests.slurm.sleeper``).

It starts in a blink (no torch), appends a line per process to ``run_dir/launch.jsonl`` as the
trainer does, then waits: SIGUSR1/SIGTERM make it exit 3 (the trainer's EXIT_PREEMPTED) after
writing ``run_dir/signals.jsonl``. A restarted attempt (SLURM_RESTART_COUNT >= 1) finishes at once
with exit code 0. Never signalled within ``max_seconds``: exit 1.

    python -m tests.slurm.sleeper run_dir=DIR [max_seconds=120]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def main(argv: list[str]) -> int:
    opts = dict(arg.lstrip("-").split("=", 1) for arg in argv if "=" in arg)
    run_dir = Path(opts["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    received: list[int] = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    record = {
        "rank": rank,
        "world_size": int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1))),
        "local_rank": int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0))),
        "host": socket.gethostname(),
        "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in env else ("rank-env" if "RANK" in env else "slurm"),
        "slurm_nodeid": env.get("SLURM_NODEID"),
        "slurm_restart_count": env.get("SLURM_RESTART_COUNT"),
        "master": f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}",
        "pid": os.getpid(),
        "ppid": os.getppid(),
    }
    _append(run_dir / "launch.jsonl", record)
    if int(env.get("SLURM_RESTART_COUNT") or 0) >= 1:
        return 0
    deadline = time.monotonic() + float(opts.get("max_seconds", 120))
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    if not received:
        return 1
    _append(run_dir / "signals.jsonl", {"rank": rank, "signal": signal.Signals(received[0]).name})
    return 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
