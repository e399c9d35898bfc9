"""ShardedEMA: fp32 masters under bf16 ZeRO-0, no update on a skipped step, shards loaded onto
the run's device. Unit tests use a fake engine; one real 1-process bf16 ZeRO-0 run checks the
DeepSpeed wiring."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mdt_ds.checkpoint import load_training_state
from mdt_ds.ema import ShardedEMA
from mdt_ds.syncs import count_host_syncs
from tests.conftest import PYTHON, REPO, subprocess_env


class FakeEngine:
    """What ShardedEMA reads from a DeepSpeedEngine at ZeRO stage 0."""

    def __init__(self, module: torch.nn.Module, optimizer: object = None, applied: bool = True):
        self.module, self.optimizer, self.applied = module, optimizer, applied

    def zero_optimization_stage(self) -> int:
        return 0

    def was_step_applied(self) -> bool:
        return self.applied


def _module(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(8, 4).to(dtype)


def test_skipped_step_leaves_shadow_unchanged_and_costs_no_sync() -> None:
    module = _module(torch.float32)
    engine = FakeEngine(module, applied=False)
    ema = ShardedEMA(engine, decay=0.5)
    before = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)  # the master moved (as if applied), but DeepSpeed reports a skipped step
    with count_host_syncs() as syncs:
        ema.update(1)
    assert syncs.count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, ema.shadow)) and ema.skipped == 1
    engine.applied = True
    with count_host_syncs() as syncs:
        ema.update(2)
    assert syncs.count == 0
    for old, new, p in zip(before, ema.shadow, module.parameters()):
        torch.testing.assert_close(new, 0.5 * old + 0.5 * p.detach(), rtol=0, atol=1e-7)


def test_bf16_zero0_reads_fp32_masters_of_unfused_optimizer() -> None:
    module = _module(torch.bfloat16)
    low = [p for p in module.parameters()]
    high = [p.detach().float() + 1e-3 for p in low]  # not bf16-representable: tells them apart
    ema = ShardedEMA(FakeEngine(module, SimpleNamespace(fp16_groups=[low], fp32_groups=[high])), decay=0.0)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    assert all(src is h for src, h in zip(ema.sources, high))
    for h in high:
        h.add_(1e-4)
    ema.update(1)
    assert all(torch.equal(s, h) for s, h in zip(ema.shadow, high))


def test_low_precision_params_without_masters_are_refused() -> None:
    module = _module(torch.bfloat16)
    with pytest.raises(RuntimeError, match="no fp32 master copy.*zero_stage=1 or 2"):
        ShardedEMA(FakeEngine(module, SimpleNamespace()), decay=0.9)


def test_ema_shards_load_onto_the_runs_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Saved from one device, loaded onto the engine's ("meta" stands in for a GPU). The first
    # shadow is the empty CPU placeholder of a ZeRO-1/2 rank that owns no slice of parameter 0:
    # its device is not the run's.
    monkeypatch.setattr("mdt_ds.checkpoint.dist.rank", lambda: 0)
    torch.save({"decay": 0.9, "shadow": [torch.empty(0), torch.ones(3)]}, tmp_path / "ema_rank00000.pt")
    seen: dict = {}
    ema = SimpleNamespace(shadow=[torch.empty(0), torch.empty(3, device="meta")], load_state_dict=seen.update,
                          engine=SimpleNamespace(device=torch.device("meta")))
    engine = SimpleNamespace(load_checkpoint=lambda *a, **k: (str(tmp_path), {"step": 7}),
                             zero_optimization_stage=lambda: 2)
    (tmp_path / "meta.json").write_text('{"step": 7, "world_size": 1, "zero_stage": 2}')
    assert load_training_state(engine, ema, tmp_path) == 7
    assert [t.device.type for t in seen["shadow"]] == ["meta", "meta"]


def test_bf16_zero0_run_keeps_fp32_ema_of_the_master(tmp_path: Path) -> None:
    """A real run: with ema_decay=0 the EMA equals the fp32 master after each step. Under the old
    code it was the bf16 weights, so every value was bf16-representable."""
    tiny = [
        "model.preset=MDTv2-Tiny/2",
        "model.input_size=16",
        "model.in_channels=1",
        "data.source=mnist16",
        "data.num_workers=0",
        "data.shuffle_buffer=64",
        "global_batch=4",
        "log_every=1",
        "optim.lr=1e-3",
    ]
    run = tmp_path / "run"
    cmd = [
        PYTHON,
        "-m",
        "mdt_ds.train",
        *tiny,
        f"run_dir={run}",
        "precision=bf16",
        "zero_stage=0",
        "steps=2",
        "ckpt_every=2",
        "ema_decay=0.0",
    ]
    env = subprocess_env(MDT_DS_DATA=str(REPO / ".cache" / "data"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ema = torch.load(run / "snapshots" / "ema_0000002.pt", weights_only=True)
    states = torch.load(run / "checkpoints" / "step_0000002" / "mp_rank_00_model_states.pt", weights_only=False)
    names = [n for n in states["module"] if n not in states["buffer_names"]]
    masters = [t for group in states["optimizer"]["fp32_groups"] for t in group]  # FP16_UnfusedOptimizer's
    assert len(masters) == len(names) > 0 and all(states["module"][n].dtype == torch.bfloat16 for n in names)
    assert all(ema[n].dtype == torch.float32 and torch.equal(ema[n], m) for n, m in zip(names, masters))
    moved = [n for n, m in zip(names, masters) if not torch.equal(m, states["module"][n].float())]
    assert len(moved) >= 10  # the EMA holds fp32 values that the bf16 weights cannot
