"""No pickled code runs on resume or conversion: DeepSpeed's own checkpoint files (model states,
ZeRO optimizer states) are loaded weights-only, a crafted one is refused with an error that names
it, and a genuine checkpoint still loads."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mdt_ds.safe_load import UnsafeCheckpointError, deepspeed_weights_only
from tests.conftest import PYTHON, REPO, TINY_RUN, subprocess_env

TINY = [*TINY_RUN, "precision=fp32", "zero_stage=1", "steps=1", "ckpt_every=1"]
MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


class Payload:
    """Unpickling it runs ``touch MARKER`` (what an attacker's file would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def craft(path: Path, marker: Path) -> None:
    """Replace a checkpoint file by a torch.save'd dict that looks plausible and carries the payload."""
    torch.save({"module": {"w": torch.zeros(1)}, "payload": Payload(marker)}, path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine 1-process ZeRO-1 fp32 checkpoint of the tiny model after one step."""
    run_dir = tmp_path_factory.mktemp("safe_load") / "run"
    cmd = [PYTHON, "-m", "mdt_ds.train", *TINY, f"run_dir={run_dir}"]
    proc = subprocess.run(
        cmd,
        env=subprocess_env(MDT_DS_DATA=str(REPO / ".cache" / "data")),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = sorted((run_dir / "checkpoints").glob("step_*"))
    assert (ckpt / MODEL_FILE).is_file() and (ckpt / OPTIM_FILE).is_file()
    return ckpt


def tampered(checkpoint: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A copy of the run's checkpoints folder with ``name`` replaced; returns (step dir, marker)."""
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(checkpoint.parent, root)
    step = root / checkpoint.name
    marker = tmp_path / "PWNED"
    craft(step / name, marker)
    return step, marker


# ----------------------------------------------------------------------------- no DeepSpeed
def test_context_forces_weights_only_over_an_explicit_false(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    craft(tmp_path / "evil.pt", marker)
    before = torch.load
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt.*NOT loaded") as err, deepspeed_weights_only():
        torch.load(tmp_path / "evil.pt", weights_only=False)
    assert not marker.exists()
    assert err.value.path == str(tmp_path / "evil.pt") and "posix.system" in str(err.value)
    assert torch.load is before and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_env_var_alone_also_refuses(tmp_path: Path) -> None:
    """A loader bound before the context (``torch.serialization.load``) is covered by the
    environment variable, which torch reads at call time."""
    marker = tmp_path / "PWNED"
    craft(tmp_path / "evil.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match="NOT loaded"), deepspeed_weights_only():
        torch.serialization.load(tmp_path / "evil.pt", weights_only=False)
    assert not marker.exists()


# ----------------------------------------------------------------------------- convert_checkpoint
@pytest.mark.parametrize("name", [MODEL_FILE, OPTIM_FILE])
def test_convert_refuses_a_crafted_deepspeed_file(
    checkpoint: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture
) -> None:
    from mdt_ds.tools.convert_checkpoint import main

    step, marker = tampered(checkpoint, tmp_path, name)
    assert main([str(step), str(tmp_path / "out.pt")]) == 2
    assert not marker.exists(), "the pickled payload ran"
    err = capsys.readouterr().err
    assert str(step / name) in err and "NOT loaded" in err and "Traceback" not in err
    assert not (tmp_path / "out.pt").exists()


def test_convert_still_converts_a_genuine_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    from mdt_ds.tools.convert_checkpoint import main

    assert main([str(checkpoint), str(tmp_path / "out.pt")]) == 0
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert state and all(v.dtype == torch.float32 for v in state.values())


# ----------------------------------------------------------------------------- engine.load_checkpoint
@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Iterator[object]:
    """The run's DeepSpeed engine, built in this process (a process group of one)."""
    from mdt_ds import dist
    from mdt_ds.config import TrainConfig, apply_overrides
    from mdt_ds.engine import build_engine

    saved = dict(os.environ)
    try:
        dist.init(use_deepspeed=True)
        cfg = apply_overrides(TrainConfig(), TINY)
        engine, _ = build_engine(cfg, 1)
        yield engine
    finally:
        dist.teardown()
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("name", [MODEL_FILE, OPTIM_FILE])
def test_engine_load_refuses_a_crafted_deepspeed_file(engine, checkpoint: Path, tmp_path: Path, name: str) -> None:
    step, marker = tampered(checkpoint, tmp_path, name)
    with pytest.raises(UnsafeCheckpointError) as err, deepspeed_weights_only():
        engine.load_checkpoint(
            str(step.parent), tag=step.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    assert not marker.exists(), "the pickled payload ran"
    assert err.value.path == str(step / name)


def test_engine_load_still_loads_a_genuine_checkpoint(engine, checkpoint: Path) -> None:
    with deepspeed_weights_only():
        path, client = engine.load_checkpoint(
            str(checkpoint.parent), tag=checkpoint.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    assert path is not None and client["step"] == 1


def test_resume_refuses_a_crafted_model_file(engine, checkpoint: Path, tmp_path: Path) -> None:
    """The trainer's resume path (checkpoint.load_training_state) goes through the same guard."""
    from mdt_ds.checkpoint import load_training_state
    from mdt_ds.ema import ShardedEMA

    step, marker = tampered(checkpoint, tmp_path, MODEL_FILE)
    with pytest.raises(UnsafeCheckpointError, match=MODEL_FILE):
        load_training_state(engine, ShardedEMA(engine, decay=0.9), step)
    assert not marker.exists(), "the pickled payload ran"


def test_mdt_train_resume_refuses_a_crafted_optimizer_file(checkpoint: Path, tmp_path: Path) -> None:
    """End to end: rerunning the run with a crafted ZeRO optimizer file exits 2 with a one-line
    reason that names the file; the payload never runs."""
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint.parent.parent, run_dir)
    marker = tmp_path / "PWNED"
    craft(run_dir / "checkpoints" / checkpoint.name / OPTIM_FILE, marker)
    cmd = [PYTHON, "-m", "mdt_ds.train", *TINY, f"run_dir={run_dir}", "steps=2"]
    env = subprocess_env(MDT_DS_DATA=str(REPO / ".cache" / "data"))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # exported by the in-process engine fixture; this is a fresh run
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert not marker.exists(), "the pickled payload ran"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{OPTIM_FILE} holds pickled code" in proc.stderr and "Traceback" not in proc.stderr
