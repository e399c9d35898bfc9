"""The DeepSpeed trainer on CPU: ZeRO stages, precision, exact resume, EMA, activation
checkpointing, guards, launchers. Multi-process scenarios share one torchrun job each."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mdt_ds.config import ConfigError, TrainConfig, apply_overrides, deepspeed_config, resolve_batch
from mdt_ds.dist import free_port
from tests.conftest import PYTHON, REPO, subprocess_env, torchrun_command

pytestmark = pytest.mark.trainer

TINY = [
    "model.preset=MDTv2-Tiny/2", "model.input_size=16", "model.in_channels=1", "data.source=mnist16",
    "data.num_workers=0", "data.shuffle_buffer=64", "global_batch=8", "log_every=1", "ema_decay=0.9",
    "optim.lr=1e-3",
]


def child_env() -> dict[str, str]:
    return subprocess_env(MDT_DS_DATA=str(REPO / ".cache" / "data"))


def torchrun(args: list[str], timeout: int = 420, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = torchrun_command(nproc, *args)
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train_cli(run_dir: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [PYTHON, "-m", "mdt_ds.train", *TINY, f"run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 2-process job that runs the stage, resume and checkpointing scenarios."""
    work = tmp_path_factory.mktemp("trainer")
    out = work / "results.json"
    torchrun(["tests/trainer_worker.py", str(out), str(work), "stages", "resume", "checkpointing"], timeout=900)
    return {"work": work, **json.loads(out.read_text())}


@pytest.mark.parametrize("name,stage", [("stage1_bf16", 1), ("stage2_bf16", 2), ("stage3_bf16", 3), ("stage0_fp32", 0)])
def test_zero_stages_train_and_loss_falls(scenarios: dict, name: str, stage: int) -> None:
    result = scenarios["stages"][name]
    assert result["zero_stage"] == stage and result["world_size"] == 2
    curve = result["losses"]
    assert len(curve) == 8 and all(math.isfinite(v) for v in curve)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve


def test_ema_agrees_across_zero_stages(scenarios: dict) -> None:
    # Same data, seeds and init; the stages differ only in reduction order and bf16 rounding
    # of gathers, so the EMA weights agree to bf16 precision (fp32 ZeRO-0 differs by precision).
    diffs = scenarios["stages"]["ema_diff_vs_stage2"]
    for name in ("stage1_bf16", "stage3_bf16"):
        assert diffs[name] < 2e-2, diffs
    assert diffs["stage0_fp32"] < 5e-2, diffs


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_is_bit_exact(scenarios: dict, stage: int) -> None:
    result = scenarios["resume"][f"stage{stage}"]
    assert result["resumed_steps"] == [1, 2, 3, 4, 5, 6]
    assert result["resumed"] == result["full"]  # bit for bit, Adan, ZeRO-2/3, bf16
    assert result["ema_diff"] == 0.0


def test_activation_checkpointing_gives_identical_losses(scenarios: dict) -> None:
    assert scenarios["checkpointing"]["all"] == scenarios["checkpointing"]["none"]


def test_ema_snapshot_loads_strictly_into_plain_model(scenarios: dict) -> None:
    from safetensors.torch import load_file

    from mdt_ds.config import ModelConfig
    from mdt_ds.models import build_model

    run = scenarios["work"] / "stage3_bf16"
    state = torch.load(run / "snapshots" / "ema_0000008.pt", weights_only=True)
    twin = load_file(str(run / "snapshots" / "ema_0000008.safetensors"))
    model = build_model(ModelConfig.from_preset("MDTv2-Tiny/2", input_size=16, in_channels=1))
    model.load_state_dict(state, strict=True)
    assert set(twin) == set(state) and all(torch.equal(twin[k], state[k]) for k in state)
    saved_cfg = json.loads((run / "snapshots" / "config.json").read_text())
    assert saved_cfg["model"]["in_channels"] == 1


def test_world_size_change_is_refused_before_compute(scenarios: dict, tmp_path: Path) -> None:
    run = scenarios["work"] / "part2"  # written by 2 processes
    proc = train_cli(run, "zero_stage=2", "precision=bf16", "optim.name=adan", "ckpt_every=3", "steps=9")
    assert proc.returncode != 0
    assert "written by 2 processes but this run has 1" in proc.stderr
    assert "convert_checkpoint" in proc.stderr
    assert json.loads((run / "stats.jsonl").read_text().splitlines()[-1])["step"] == 6  # nothing trained


def test_convert_checkpoint_and_init_from(scenarios: dict, tmp_path: Path) -> None:
    from mdt_ds.tools.convert_checkpoint import main as convert

    ckpt = scenarios["work"] / "full2" / "checkpoints" / "step_0000006"
    out = tmp_path / "weights.pt"
    assert convert([str(ckpt), str(out)]) == 0
    proc = train_cli(tmp_path / "new", "zero_stage=2", "precision=fp32", "steps=1", f"init_from={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "initialised weights from" in proc.stderr


def test_signal_stops_at_step_boundary_and_resume_matches(tmp_path: Path) -> None:
    """SIGUSR1 mid-run: checkpoint, exit code 3; rerunning finishes with the uninterrupted curve."""
    common = ["zero_stage=2", "precision=fp32", "steps=30", "ckpt_every=0"]
    full = train_cli(tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "interrupted"
    cmd = [PYTHON, "-m", "mdt_ds.train", *TINY, f"run_dir={run}", *common]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.time() + 180
    while not (run / "stats.jsonl").is_file() or len(losses(run)) < 3:
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    stopped_at = len(losses(run))
    assert 3 <= stopped_at < 30 and (run / "checkpoints" / f"step_{stopped_at:07d}" / "meta.json").is_file()
    again = train_cli(run, *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert losses(run) == losses(tmp_path / "full")


def test_nan_guard_names_step_terms_and_checkpoint(tmp_path: Path) -> None:
    proc = train_cli(tmp_path / "nan", "precision=fp32", "zero_stage=0", "steps=6", "ckpt_every=2", "optim.lr=1e30",
                     "optim.grad_clip=0.0", "optim.name=adamw")
    assert proc.returncode != 0
    assert "non-finite loss at step" in proc.stderr and "last good checkpoint" in proc.stderr


def test_run_dir_with_other_config_is_refused(tmp_path: Path) -> None:
    from mdt_ds.train import prepare_run_dir

    cfg = apply_overrides(TrainConfig(), [f"run_dir={tmp_path}", "optim.lr=1e-3"])
    prepare_run_dir(cfg)
    with pytest.raises(ConfigError, match="changed: optim"):
        prepare_run_dir(apply_overrides(cfg, ["optim.lr=2e-3"]))
    prepare_run_dir(apply_overrides(cfg, ["steps=10"]))  # longer run: allowed
    prepare_run_dir(apply_overrides(cfg, ["optim.lr=2e-3", "force_resume=true"]))


def test_batch_arithmetic_errors_are_clear() -> None:
    cfg = apply_overrides(TrainConfig(), ["global_batch=256"])
    assert resolve_batch(cfg, 8) == (32, 1)
    assert resolve_batch(apply_overrides(cfg, ["micro_batch=8"]), 8) == (8, 4)
    with pytest.raises(ConfigError, match="global_batch=256 is not micro_batch"):
        resolve_batch(cfg, 6)
    ds = deepspeed_config(apply_overrides(cfg, ["micro_batch=16", "precision=fp16", "zero_stage=3"]), 4)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (256, 16, 4)
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="derived"):
        deepspeed_config(apply_overrides(cfg, ['deepspeed={"train_batch_size": 3}']), 8)


def test_cli_dry_run_and_bad_override() -> None:
    env = child_env()
    dry = subprocess.run([PYTHON, "-m", "mdt_ds.train", "--dry-run", "model.preset=MDTv2-XL/2"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)
    assert shown["config"]["model"]["hidden_size"] == 1152 and shown["deepspeed"]["train_batch_size"] == 256
    bad = subprocess.run([PYTHON, "-m", "mdt_ds.train", "--dry-run", "precision=bf17"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "precision" in bad.stderr and "'bf16'" in bad.stderr


def test_shipped_ds_configs_load_and_derive() -> None:
    from mdt_ds.config import load_config

    for path in sorted((REPO / "ds_configs").glob("*.yaml")):
        cfg = load_config([path])
        ds = deepspeed_config(cfg, 8)
        assert ds["zero_optimization"]["stage"] == cfg.zero_stage, path


def test_deepspeed_launcher_path(tmp_path: Path) -> None:
    """`deepspeed --num_gpus 2` appends --local_rank; the trainer accepts it."""
    ds = Path(PYTHON).parent / "deepspeed"
    cmd = [str(ds), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "mdt_ds.train", *TINY,
           f"run_dir={tmp_path}", "steps=2", "ckpt_every=0", "precision=fp32"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    launches = [json.loads(x) for x in (tmp_path / "launch.jsonl").read_text().splitlines()]
    assert sorted(x["rank"] for x in launches) == [0, 1] and all(x["world_size"] == 2 for x in launches)
    assert len(losses(tmp_path)) == 2


def test_python_entry_point_single_process_with_grid_and_fid(tmp_path: Path) -> None:
    """Plain `python -m mdt_ds.train`: sample grid, TensorBoard events and in-training FID of the
    EMA model against a reference batch of real held-out digits (offline Inception)."""
    import numpy as np

    from mdt_ds.data.demo import load_heldout

    images, _ = load_heldout(REPO / ".cache" / "data")
    pixels = ((images[:48] + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, 3)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=pixels.numpy())
    proc = train_cli(tmp_path / "run", "steps=2", "precision=fp32", "zero_stage=0", "ckpt_every=0", "sample_every=2",
                     "fid_every=2", f"fid_ref={ref}", "fid_images=16", "fid_steps=3", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "samples" / "step_0000002.png").is_file()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    fid = json.loads((tmp_path / "run" / "eval.jsonl").read_text().splitlines()[-1])
    assert fid["step"] == 2 and math.isfinite(fid["fid"]) and fid["fid"] > 0


def test_fid_without_reference_is_refused(tmp_path: Path) -> None:
    proc = train_cli(tmp_path, "steps=1", "fid_every=1", timeout=120)
    assert proc.returncode == 2 and "needs fid_ref" in proc.stderr
