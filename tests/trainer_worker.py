"""Runs training scenarios inside ONE torchrun job (2 processes) so the trainer tests pay the
process start and DeepSpeed import once. Writes a JSON of results from rank 0.

    torchrun --nproc_per_node=2 tests/trainer_worker.py OUT.json WORKDIR SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mdt_ds import dist
from mdt_ds.config import load_config
from mdt_ds.train import train

BASE = [
    "model.preset=MDTv2-Tiny/2", "model.input_size=16", "model.in_channels=1", "data.source=mnist16",
    "data.num_workers=0", "data.shuffle_buffer=64", "global_batch=8", "log_every=1", "ema_decay=0.9",
    "optim.lr=1e-3",
]


def run(workdir: Path, name: str, *overrides: str) -> dict:
    cfg = load_config(None, [*BASE, f"run_dir={workdir / name}", *overrides])
    result = train(cfg)
    stats = [json.loads(line) for line in (workdir / name / "stats.jsonl").read_text().splitlines()]
    result["losses"] = [s["loss"] for s in stats]
    result["steps_logged"] = [s["step"] for s in stats]
    return result


def ema_of(workdir: Path, name: str, step: int) -> dict[str, torch.Tensor]:
    return torch.load(workdir / name / "snapshots" / f"ema_{step:07d}.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def scenario_stages(workdir: Path) -> dict:
    """ZeRO 1/2/3 in bf16 and the fp32 ZeRO-0 baseline: stage used, loss falls, EMA across stages."""
    out = {}
    for stage, precision in ((1, "bf16"), (2, "bf16"), (3, "bf16"), (0, "fp32")):
        name = f"stage{stage}_{precision}"
        out[name] = run(workdir, name, f"zero_stage={stage}", f"precision={precision}", "steps=8", "ckpt_every=0")
    emas = {k: ema_of(workdir, k, 8) for k in out}
    out["ema_diff_vs_stage2"] = {k: max_diff(emas[k], emas["stage2_bf16"]) for k in emas}
    return out


def scenario_resume(workdir: Path) -> dict:
    """Uninterrupted 6 steps vs 3 + resume to 6, with Adan, for ZeRO-2 and ZeRO-3."""
    out = {}
    for stage in (2, 3):
        common = [f"zero_stage={stage}", "precision=bf16", "optim.name=adan", "ckpt_every=3"]
        full = run(workdir, f"full{stage}", *common, "steps=6")
        run(workdir, f"part{stage}", *common, "steps=3")
        resumed = run(workdir, f"part{stage}", *common, "steps=6")
        out[f"stage{stage}"] = {
            "full": full["losses"], "resumed": resumed["losses"], "resumed_steps": resumed["steps_logged"],
            "ema_diff": max_diff(ema_of(workdir, f"full{stage}", 6), ema_of(workdir, f"part{stage}", 6)),
        }
    return out


def scenario_checkpointing(workdir: Path) -> dict:
    """Activation checkpointing (all blocks) gives the same losses as none."""
    common = ["zero_stage=2", "precision=fp32", "steps=4", "ckpt_every=0"]
    plain = run(workdir, "ac_none", *common, "activation_checkpointing=none")
    ckpt = run(workdir, "ac_all", *common, "activation_checkpointing=all")
    return {"none": plain["losses"], "all": ckpt["losses"]}


def main() -> None:
    out_path, workdir, *scenarios = sys.argv[1:]
    dist.init(use_deepspeed=True)
    results = {name: globals()[f"scenario_{name}"](Path(workdir)) for name in scenarios}
    if dist.is_main():
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.teardown()


if __name__ == "__main__":
    main()
