"""Run-directory lock, stale leftovers, snapshot pruning, free-space refusal, moved run_dir."""

from __future__ import annotations

import json
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


class FakeEngine:
    """What save_training_state needs of a DeepSpeed engine: a save that writes (or fails)."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail = fail

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 1000)
        if self.fail is not None:
            raise self.fail

    def zero_optimization_stage(self) -> int:
        return 2


class FakeEMA:
    def state_dict(self) -> dict:
        return {}


@pytest.fixture
def fake_universal(monkeypatch: pytest.MonkeyPatch) -> None:
    import mdt_ds.universal

    monkeypatch.setattr(mdt_ds.universal, "save_universal", lambda engine, ema, folder: None)


def test_the_snapshot_is_written_before_its_checkpoint_is_published(tmp_path: Path, fake_universal: None) -> None:
    from mdt_ds.checkpoint import find_latest, save_training_state

    seen = []

    def snapshot() -> None:  # what the trainer passes: the EMA snapshot of this step
        seen.append((find_latest(tmp_path), sorted(p.name for p in (tmp_path / "checkpoints").iterdir())))

    final = save_training_state(FakeEngine(), FakeEMA(), tmp_path, 4, before_publish=snapshot, meta={"x": 1})
    # at that moment every file was written, and no complete checkpoint of step 4 existed yet
    assert seen == [(None, ["step_0000004.tmp"])]
    assert final.name == "step_0000004" and find_latest(tmp_path) == final
    meta = json.loads((final / "meta.json").read_text())
    assert meta["step"] == 4 and meta["x"] == 1 and meta["world_size"] == 1


def test_a_full_disk_names_the_path_and_keeps_the_last_checkpoint(
    tmp_path: Path, fake_universal: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mdt_ds.checkpoint as ckpt

    first = ckpt.save_training_state(FakeEngine(), FakeEMA(), tmp_path, 2)
    # torch.save's C++ writer on a full disk: no errno, only this; the disk is then asked.
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 4096)
    with pytest.raises(CheckpointError, match=r"under .*step_0000004\.tmp failed \(no space left on device\).*intact"):
        ckpt.save_training_state(FakeEngine(RuntimeError("basic_ios::clear: iostream error")), FakeEMA(), tmp_path, 4)
    assert ckpt.find_latest(tmp_path) == first  # the previous checkpoint is the one to resume
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002"]  # partial removed
    with pytest.raises(CheckpointError, match=r"failed \(OSError: \[Errno 5\] Input/output error\)"):
        monkeypatch.setattr(ckpt, "free_bytes", lambda path: 1 << 40)
        ckpt.save_training_state(FakeEngine(OSError(5, "Input/output error")), FakeEMA(), tmp_path, 6)


def test_every_rank_resumes_the_checkpoint_rank_0_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 sees a newer checkpoint on disk (a second job published it meanwhile); the decision
    broadcast from rank 0 wins, so all ranks load the same one."""
    import mdt_ds.checkpoint as ckpt

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:07d}").mkdir(parents=True)
        (root / f"step_{step:07d}" / "meta.json").write_text("{}")
    sent = []
    monkeypatch.setattr(ckpt.dist, "is_main", lambda: True)
    monkeypatch.setattr(ckpt.dist, "from_main", lambda value: sent.append(value) or value)
    assert ckpt.agreed_latest(tmp_path) == root / "step_0000004" and sent == ["step_0000004"]
    (root / "step_0000006").mkdir()
    (root / "step_0000006" / "meta.json").write_text("{}")
    monkeypatch.setattr(ckpt.dist, "is_main", lambda: False)  # rank 1: rank 0 said step 4
    monkeypatch.setattr(ckpt.dist, "from_main", lambda value: "step_0000004")
    assert ckpt.find_latest(tmp_path) == root / "step_0000006"
    assert ckpt.agreed_latest(tmp_path) == root / "step_0000004"
