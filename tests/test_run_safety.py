"""Run-directory lock, stale leftovers, snapshot pruning, free-space refusal, moved run_dir."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdt_ds import dist
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


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes in units that show the difference (it said "needs about 0.02 GiB and has 0.02 GiB
    free"), and what exists: with no checkpoint yet there is nothing "intact and resumable"."""
    import mdt_ds.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "free_bytes", lambda path: 20 << 20)
    with pytest.raises(ckpt.DiskFullError, match=r"needs about 21 MiB and .* has 20 MiB free.*no checkpoint has "
                                                 r"been written yet"):
        check_free_space(tmp_path, 21 << 20)
    assert not (tmp_path / "checkpoints").exists()
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000002" / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"the last checkpoint, step_0000002, is intact and resumable"):
        check_free_space(tmp_path, 21 << 20)
    check_free_space(tmp_path, 1)
    assert ckpt.human_bytes(1.8 * 2**30) == "1.8 GiB" and ckpt.human_bytes(512) == "512 bytes"


def test_a_run_whose_checkpoints_cannot_fit_stops_before_its_first_step(tmp_path: Path) -> None:
    """Checked at the start against the run's largest save, in one line (exit 2), not after hours."""
    from tests.conftest import PYTHON, REPO, TINY_RUN, subprocess_env

    script = ("import sys, mdt_ds.checkpoint as c; c.free_bytes = lambda path: 1 << 20; "
              "from mdt_ds.train import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([PYTHON, "-c", script, *TINY_RUN, f"run_dir={tmp_path / 'run'}", "steps=5"],
                          env=subprocess_env(MDT_DS_DATA=str(REPO / ".cache" / "data")), capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mdt-train: error: not enough disk space for this run's checkpoints: one needs about")
    assert "has 1 MiB free" in last and "no checkpoint has been written yet" in last
    assert not (tmp_path / "run" / "stats.jsonl").exists()


def test_a_moved_run_dir_resumes_but_another_config_is_refused(tmp_path: Path) -> None:
    cfg = apply_overrides(TrainConfig(), [f"run_dir={tmp_path / 'a'}", "optim.lr=1e-3"])
    prepare_run_dir(cfg)
    (tmp_path / "a").rename(tmp_path / "b")
    prepare_run_dir(apply_overrides(cfg, [f"run_dir={tmp_path / 'b'}", "keep_snapshots=2"]))
    with pytest.raises(Exception, match="changed: optim"):
        prepare_run_dir(apply_overrides(cfg, [f"run_dir={tmp_path / 'b'}", "optim.lr=2e-3"]))


class FakeIO:
    """DeepSpeed's checkpoint engine: every write of ``save_checkpoint`` goes through it."""

    def __init__(self, fail: BaseException | None) -> None:
        self.fail = fail

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: dict, path: str) -> None:
        Path(path).write_bytes(b"x" * 1000)
        if self.fail is not None:
            raise self.fail


class FakeEngine:
    """What save_training_state needs of a DeepSpeed engine: DeepSpeed 0.19's save_checkpoint
    shape (barrier, writes through its checkpoint engine, barrier), with a write that may fail."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.checkpoint_engine = FakeIO(fail)

    def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
        dist.barrier()
        self.checkpoint_engine.makedirs(str(Path(root) / tag), exist_ok=True)
        self.checkpoint_engine.save({}, str(Path(root) / tag / "mp_rank_00_model_states.pt"))
        dist.barrier()

    def zero_optimization_stage(self) -> int:
        return 2


class FakeEMA:
    def state_dict(self) -> dict:
        return {}


@pytest.fixture
def fake_universal(monkeypatch: pytest.MonkeyPatch) -> None:
    import mdt_ds.universal

    monkeypatch.setattr(mdt_ds.universal, "write_fragments", lambda engine, ema, folder: {})
    monkeypatch.setattr(mdt_ds.universal, "write_index", lambda engine, folder, mine: None)


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
    with pytest.raises(CheckpointError, match=r"under .*step_0000004\.tmp failed \(no space left on device\); the "
                       r"last checkpoint, step_0000002, is intact"):
        ckpt.save_training_state(FakeEngine(RuntimeError("basic_ios::clear: iostream error")), FakeEMA(), tmp_path, 4)
    assert ckpt.find_latest(tmp_path) == first  # the previous checkpoint is the one to resume
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000002"]  # partial removed
    with pytest.raises(CheckpointError, match=r"failed \(OSError: \[Errno 5\] Input/output error\)"):
        monkeypatch.setattr(ckpt, "free_bytes", lambda path: 1 << 40)
        ckpt.save_training_state(FakeEngine(OSError(5, "Input/output error")), FakeEMA(), tmp_path, 6)


TWO_RANK_SAVES = """
import errno, json, sys
from pathlib import Path
import torch
from mdt_ds import dist
import mdt_ds.universal as universal
from mdt_ds.checkpoint import CheckpointError, find_latest, save_training_state
from tests.test_run_safety import FakeEMA, FakeEngine

def gather_only(engine, folder, mine):  # the real write_index's collective, without the engine
    torch.distributed.all_gather_object([None] * dist.world_size(), mine)

universal.write_fragments, universal.write_index = (lambda engine, ema, folder: {}), gather_only
dist.init()
run, rank, seen = Path(sys.argv[1]), dist.rank(), {}

def attempt(name, step, engine, before_publish=None):
    try:
        save_training_state(engine, FakeEMA(), run, step, before_publish=before_publish)
        seen[name] = "published"
    except CheckpointError as err:
        seen[name] = str(err)

def rank_0_snapshot_fails():
    if rank == 0:
        raise CheckpointError("the EMA snapshot could not be written")

attempt("ok", 2, FakeEngine())
full = OSError(errno.ENOSPC, "No space left on device")
attempt("rank_1_disk_full", 4, FakeEngine(full if rank == 1 else None))
attempt("rank_0_snapshot", 6, FakeEngine(), before_publish=rank_0_snapshot_fails)
attempt("after", 8, FakeEngine())

import types
import mdt_ds.trainer as trainer

def snapshot_fails(state, cfg, run_dir, step):
    raise CheckpointError("the EMA snapshot could not be written")

trainer.save_ema_snapshot = snapshot_fails  # on rank 0, the only writer
fake = types.SimpleNamespace(_gathered_ema=dict, run_dir=run, disk={"snapshot": 0}, step=10, cfg=None,
                             _publishing_blocked=lambda what: False)
try:
    trainer.Trainer.snapshot(fake)
    seen["snapshot_alone"] = "written"
except CheckpointError as err:
    seen["snapshot_alone"] = str(err)
seen["latest"] = find_latest(run).name
seen["folders"] = sorted(p.name for p in (run / "checkpoints").iterdir())
def load_weights():
    if rank == 1:
        raise FileNotFoundError("/cache/inception.pt is missing")
    return "weights"

try:
    seen["load"] = dist.load_everywhere(load_weights, "the Inception network")
except Exception as err:
    seen["load"] = f"{type(err).__name__}: {err}"
import mdt_ds.data.loader as loader_mod
from mdt_ds.config import TrainConfig
from mdt_ds.data.shards import ShardError

checks = []

def check_fails(fails):
    def check(source, skip_corrupt):
        checks.append(rank)
        if fails:
            raise ShardError("/data/in256/shard-000002.tar: missing")
        return (["a", "b"] if rank == 0 else ["a"]), []  # a check on rank 1 would find another list
    return check

def build_fails(fails):
    def build(*args, checked, **kwargs):
        if fails:
            raise ShardError("/data/in256/shard-000001.tar: truncated")
        return types.SimpleNamespace(checked=checked)
    return build

me = types.SimpleNamespace(cfg=TrainConfig(), micro=2, env=types.SimpleNamespace(rank=rank, world_size=2),
                           device=torch.device("cpu"), resume_meta={})
for name, check, build in (("checked_once", check_fails(False), build_fails(False)),
                           ("rank_0_check", check_fails(rank == 0), build_fails(False)),
                           ("rank_1_data", check_fails(False), build_fails(rank == 1))):
    loader_mod.check_shards, loader_mod.build_loader = check, build
    try:
        seen[name] = trainer.Trainer._build_loader(me, 0).checked
    except Exception as err:
        seen[name] = f"{type(err).__name__}: {err}"
seen["checks"] = checks
(run / f"rank{rank}.json").write_text(json.dumps(seen))
dist.teardown(synchronise=True)
"""


def test_a_write_error_on_one_rank_stops_every_rank_without_a_hang(tmp_path: Path) -> None:
    """Rank 1's DeepSpeed write fails (full disk) while DeepSpeed's save still has a barrier to
    run, then rank 0's snapshot fails before publishing, then a snapshot of its own: before the fix the failed rank skipped
    that barrier and met its peer in another collective (a hang on NCCL). Now every rank raises
    CheckpointError with the reason, the last good checkpoint stays the latest, and saving goes
    on afterwards. A load that fails on one rank (the in-training FID's networks, the training
    data) reaches both, and only rank 0 opens the shards: every rank splits its list."""
    from mdt_ds.supervise import descendants
    from tests.conftest import REPO, subprocess_env, torchrun_command

    script = tmp_path / "saves.py"
    script.write_text(TWO_RANK_SAVES)
    run = tmp_path / "run"
    env = subprocess_env()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.Popen(torchrun_command(2, str(script), str(run)), env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        # The workers first, found through /proc: they lead their own sessions (out of the
        # launcher's process group) and hold the pipes open.
        for pid in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the ranks hung in mismatched collectives:\n{out[-2000:]}\n{err[-2000:]}")
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    seen = [json.loads((run / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in seen:
        assert rank["ok"] == rank["after"] == "published"
        assert rank["latest"] == "step_0000008"
        assert rank["folders"] == ["step_0000002", "step_0000008"]  # no partial step 4 or 6 left
    assert "no space left on device" in seen[1]["rank_1_disk_full"]
    assert "another rank failed" in seen[0]["rank_1_disk_full"]
    assert seen[0]["rank_0_snapshot"] == "the EMA snapshot could not be written"
    assert "another rank failed" in seen[1]["rank_0_snapshot"]
    # a snapshot without a checkpoint (snapshot_every): rank 0's failure reaches rank 1 too
    assert seen[0]["snapshot_alone"] == "the EMA snapshot could not be written"
    assert "rank 0 could not write the EMA snapshot" in seen[1]["snapshot_alone"]
    # a load that fails on one rank (in-training FID's VAE and Inception): both ranks hear of it
    assert seen[1]["load"] == "FileNotFoundError: /cache/inception.pt is missing"  # its own error, as raised
    assert seen[0]["load"] == "ConfigError: could not load the Inception network: it failed on another rank (see its log)"
    # the data: rank 0 alone opens the shards, every rank splits its list, and a rank's ShardError reaches all
    assert seen[0]["checked_once"] == seen[1]["checked_once"] == [["a", "b"], []]
    assert seen[0]["checks"] == [0, 0, 0] and seen[1]["checks"] == []
    assert seen[0]["rank_0_check"] == "ShardError: /data/in256/shard-000002.tar: missing"
    assert seen[1]["rank_0_check"].startswith("ConfigError: could not load the training data") and "rank 0" in \
        seen[1]["rank_0_check"]
    assert seen[1]["rank_1_data"] == "ShardError: /data/in256/shard-000001.tar: truncated"
    assert seen[0]["rank_1_data"].startswith("ConfigError: could not load the training data")


def fake_checkpoint(root: Path, step: int, universal: bool = False, world_size: int = 2) -> Path:
    """A checkpoint folder as a resume reads it: meta.json, DeepSpeed's and the EMA's .pt files
    (zip archives, as torch.save writes them) and optionally a universal form (index.json plus
    one rank's safetensors file holding the fragments the index names)."""
    from safetensors.torch import save_file

    path = root / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "world_size": world_size, "zero_stage": 2}))
    for name in ("mp_rank_00_model_states.pt", "ema_rank00000.pt"):
        torch.save({"step": step}, path / name)
    if universal:
        (path / "universal").mkdir()
        index = {"format": 1, "state_keys": {"exp_avg": "float32"}, "params": {
            "w": {"shape": [4], "numel": 4, "fragments": [[0, 4, 0]]}}}
        (path / "universal" / "index.json").write_text(json.dumps(index))
        save_file({f"w@0/{k}": torch.zeros(4) for k in ("fp32", "ema", "exp_avg")},
                  str(path / "universal" / "rank00000.safetensors"))
    return path


def test_every_rank_resumes_the_checkpoint_rank_0_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 sees a newer checkpoint on disk (a second job published it meanwhile); the decision
    broadcast from rank 0 wins, so all ranks load the same one."""
    import mdt_ds.checkpoint as ckpt
    import mdt_ds.resume_point as rp

    root = tmp_path / "checkpoints"
    for step in (2, 4):
        fake_checkpoint(root, step)
    sent = []
    monkeypatch.setattr(rp.dist, "is_main", lambda: True)
    monkeypatch.setattr(rp.dist, "from_main", lambda value: sent.append(value) or value)
    assert rp.agreed_resume_point(tmp_path, 2, 2) == root / "step_0000004" and sent == [("step_0000004", False)]
    fake_checkpoint(root, 6)
    monkeypatch.setattr(rp.dist, "is_main", lambda: False)  # rank 1: rank 0 said step 4
    monkeypatch.setattr(rp.dist, "from_main", lambda value: ("step_0000004", False))
    assert ckpt.find_latest(tmp_path) == root / "step_0000006"
    assert rp.agreed_resume_point(tmp_path, 2, 2) == root / "step_0000004"


def test_a_new_layout_resumes_the_newest_checkpoint_with_the_universal_form(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only some checkpoints carry the world-size-independent form (universal_every): the same
    layout resumes the newest checkpoint, another layout the newest one with that form (the
    warning names the steps given up and how to keep them), none at all is one clear error; and
    pruning never deletes the newest universal checkpoint while the kept ones lack it."""
    import logging

    import mdt_ds.checkpoint as ckpt
    from mdt_ds.resume_point import resume_point

    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2)
    with pytest.raises(ckpt.ResumeError, match="Resume with 2 processes and zero_stage=2"):
        resume_point(tmp_path, 1, 2)
    fake_checkpoint(root, 4, universal=True)
    for step in (6, 8):
        fake_checkpoint(root, step)
    assert resume_point(tmp_path, 2, 2) == root / "step_0000008"
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path, 1, 2) == root / "step_0000004"
        assert resume_point(tmp_path, 2, 3) == root / "step_0000004"
    assert "step_0000008 (step 8) has only its 2-process ZeRO-2 layout. To keep its 4 steps" in caplog.text
    assert ckpt.prune(root, 2) == ["step_0000002"]  # step 4 stays: the only universal one
    fake_checkpoint(root, 10, universal=True)
    assert ckpt.prune(root, 2) == ["step_0000004", "step_0000006"]
    assert sorted(p.name for p in root.iterdir()) == ["step_0000008", "step_0000010"]


@pytest.mark.parametrize("damage", ["empty", "truncated", "not a record"])
def test_a_damaged_meta_json_falls_back_to_the_checkpoint_before(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    """A truncated or empty meta.json in the newest checkpoint made the run unresumable
    (JSONDecodeError on every rank, exit 1): the newest checkpoint that parses is resumed, the
    damaged one is named and left in place."""
    import logging

    from mdt_ds.resume_point import resume_point

    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2)
    bad = fake_checkpoint(root, 4) / "meta.json"
    bad.write_text({"empty": "", "truncated": '{"step": 4, "world_si', "not a record": "[4, 2]"}[damage])
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path, 2, 2) == root / "step_0000002"
    assert f"skipping step_0000004: {bad}" in caplog.text and "left in place" in caplog.text
    assert bad.is_file()


def test_damaged_universal_and_deepspeed_files_are_named_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A garbage fragment file ended in SafetensorError ("header too large") with no file named;
    a truncated .pt only at DeepSpeed's load. Each is now found before any load: another layout
    falls back to the previous universal checkpoint, the same layout past a damaged archive; with
    nothing readable, one ResumeError names every file (exit 2)."""
    import logging

    import mdt_ds.checkpoint as ckpt
    from mdt_ds.resume_point import resume_point

    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2, universal=True)
    newest = fake_checkpoint(root, 4, universal=True)
    (newest / "universal" / "rank00000.safetensors").write_bytes(b"\xff" * 64)  # garbage header
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path, 1, 2) == root / "step_0000002"  # another layout: reads universal
        assert resume_point(tmp_path, 2, 2) == newest  # the same layout does not read it...
    assert f"{newest / 'universal' / 'rank00000.safetensors'} is not a readable safetensors file" in caplog.text
    assert "its world-size-independent form is damaged" in caplog.text  # ...but says so now
    model_states = newest / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:100])  # truncated
    assert resume_point(tmp_path, 2, 2) == root / "step_0000002"
    (root / "step_0000002" / "meta.json").write_text("")
    with pytest.raises(ckpt.ResumeError, match=r"step_0000004: .*mp_rank_00_model_states.pt is damaged.*"
                       r"step_0000002: .*meta.json is empty"):
        resume_point(tmp_path, 2, 2)


def test_a_save_rereads_the_header_of_the_universal_form_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Part of a complete checkpoint: what a rank wrote reads back with every fragment in it; a
    file that does not (a silent short write) fails the save instead of surfacing on the day a
    resume on another number of GPUs needs it."""
    import mdt_ds.universal as universal

    frag = universal.Fragment("w", 0, 0, torch.ones(4), {"exp_avg": torch.zeros(4)})
    monkeypatch.setattr(universal, "local_fragments", lambda engine: [frag])
    monkeypatch.setattr(universal, "_ema_views", lambda ema, frags: [torch.ones(4)])
    monkeypatch.setattr(universal.dist, "get_rank", lambda: 0)
    written = universal.write_fragments(None, None, tmp_path / "ok")
    assert written["fragments"] == [("w", 0, 4)]

    def short_write(tensors, path, metadata=None):
        from safetensors.torch import save_file

        save_file({"w@0/fp32": torch.ones(4)}, path)  # a readable file that lost two fragments

    monkeypatch.setattr(universal, "save_file", short_write)
    with pytest.raises(OSError, match=r"re-reading the universal form written: .*lacks 2 of the fragments"):
        universal.write_fragments(None, None, tmp_path / "short")


def test_each_rank_claims_only_its_own_checkpoint_files(tmp_path: Path) -> None:
    """Rank 0 used to claim every rank's ZeRO shard (``mp_rank_00`` is the model-parallel rank):
    on 64 GPUs it fsynced and, on resume, opened all 64 ranks' optimizer files."""
    from mdt_ds.checkpoint import _own_files

    names = ["mp_rank_00_model_states.pt", "ema_rank00000.pt", "ema_rank00001.pt", "ema_rank00010.pt"]
    names += [f"{p}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1, 10) for p in ("", "bf16_")]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    owned = {r: sorted(p.name for p in _own_files(tmp_path, r)) for r in (0, 1, 10, 2)}
    assert owned[0] == sorted(["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "ema_rank00000.pt",
                               "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
    assert owned[1] == sorted(["bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "ema_rank00001.pt",
                               "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
    assert owned[10] == sorted(["bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt", "ema_rank00010.pt",
                                "zero_pp_rank_10_mp_rank_00_optim_states.pt"])
    assert owned[2] == []
