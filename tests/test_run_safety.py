"""Run-directory lock, stale leftovers, snapshot pruning, free-space refusal, moved run_dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mdt_ds.checkpoint import CheckpointError, check_free_space, prune, prune_snapshots, remove_stale
from mdt_ds.config import TrainConfig, apply_overrides
from mdt_ds.rundir import RunDirBusy, lock_run_dir
from mdt_ds.train import prepare_run_dir

HOLD = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"host": "h", "pid": os.getpid(), "since": time.time()}).encode())
print("held", flush=True)
time.sleep(60)
"""


def test_second_job_on_a_run_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"in use by another job \\(pid {holder.pid} on h"):
            lock_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait(timeout=10)
    lock = lock_run_dir(tmp_path)  # the kernel dropped the dead holder's lock
    assert lock.fd is not None
    lock.release()


def test_stale_tmp_leftovers_are_removed(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step_0000004.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000002").mkdir()
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / "ema_0000004.pt.tmp").write_bytes(b"x" * 10)
    assert sorted(remove_stale(tmp_path)) == ["ema_0000004.pt.tmp", "step_0000004.tmp"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002"]


def test_checkpoints_and_snapshots_are_pruned_to_keep(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        (tmp_path / f"step_{step:07d}").mkdir()
        (tmp_path / f"ema_{step:07d}.pt").write_bytes(b"")
        (tmp_path / f"ema_{step:07d}.safetensors").write_bytes(b"")
    assert prune(tmp_path, 2) == ["step_0000001", "step_0000002"]
    assert prune_snapshots(tmp_path, 1) == [f"ema_{s:07d}.{e}" for s in (1, 2, 3) for e in ("pt", "safetensors")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ema_0000004.pt", "ema_0000004.safetensors", "step_0000003", "step_0000004"]


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not enough disk space.*last checkpoint is intact"):
        check_free_space(tmp_path, 1 << 60)
    assert not (tmp_path / "checkpoints").exists()
    check_free_space(tmp_path, 1)


def test_a_moved_run_dir_resumes_but_another_config_is_refused(tmp_path: Path) -> None:
    cfg = apply_overrides(TrainConfig(), [f"run_dir={tmp_path / 'a'}", "optim.lr=1e-3"])
    prepare_run_dir(cfg)
    (tmp_path / "a").rename(tmp_path / "b")
    prepare_run_dir(apply_overrides(cfg, [f"run_dir={tmp_path / 'b'}", "keep_snapshots=2"]))
    with pytest.raises(Exception, match="changed: optim"):
        prepare_run_dir(apply_overrides(cfg, [f"run_dir={tmp_path / 'b'}", "optim.lr=2e-3"]))
