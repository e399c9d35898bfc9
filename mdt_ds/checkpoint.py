"""Checkpoints: full training state for resume, and small EMA snapshots for sampling.

Layout of a run directory::

    checkpoints/step_0005000/       DeepSpeed state (model, optimizer, LR schedule) + per-rank EMA
                 meta.json           written last: step, world size; its presence = complete
    snapshots/ema_0005000.pt         EMA weights, raw state_dict with the official key names
    snapshots/ema_0005000.safetensors
    snapshots/config.json

A checkpoint is written under ``step_XXXXXXX.tmp`` and renamed once every rank has finished,
so a crash mid-save never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from mdt_ds import dist
from mdt_ds.config import TrainConfig, save_config

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{7,})$")


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed as asked; the message says why and what to do."""


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def find_latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a ``step_*`` directory with ``meta.json``), or None."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return max(done, key=lambda p: int(STEP_DIR.match(p.name).group(1)), default=None)


def save_training_state(engine, ema, run_dir: Path, step: int, keep: int = 3) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint directory."""
    root = checkpoint_root(run_dir)
    tag = f"step_{step:07d}"
    tmp = root / f"{tag}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"step": step}, save_latest=False)
    torch.save(ema.state_dict(), tmp / f"ema_rank{dist.rank():05d}.pt")
    dist.barrier()
    final = root / tag
    if dist.is_main():
        meta = {"step": step, "world_size": dist.world_size(), "zero_stage": engine.zero_optimization_stage()}
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: p.name)
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def check_resumable(path: Path, world_size: int, zero_stage: int) -> dict:
    """Refuse before any compute when the world size or ZeRO stage differs from the saved run."""
    meta = read_meta(path)
    if meta["world_size"] != world_size:
        raise ResumeError(
            f"{path} was written by {meta['world_size']} processes but this run has {world_size}. "
            f"ZeRO shards optimizer state per rank, so resume with {meta['world_size']} processes. To move to a "
            f"different size, start a new run from the weights: `python -m mdt_ds.tools.convert_checkpoint {path} "
            f"OUT.pt` writes fp32 model weights (DeepSpeed's zero_to_fp32), then train with init_from=OUT.pt "
            f"(optimizer state restarts)."
        )
    if meta.get("zero_stage", zero_stage) != zero_stage:
        raise ResumeError(
            f"{path} was written with ZeRO stage {meta['zero_stage']}, this run uses {zero_stage}: "
            f"resume with zero_stage={meta['zero_stage']}"
        )
    return meta


def load_training_state(engine, ema, path: Path) -> int:
    """Collective: restore model, optimizer, LR schedule and EMA; returns the step to resume at."""
    load_path, client = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise ResumeError(f"DeepSpeed could not load {path}")
    # The shards hold this rank's fp32 slices; map them straight onto the device the run trains
    # on (not the device they were saved from, which may be another GPU index or absent).
    # (Not shadow[0]'s device: a rank that owns no slice of the first parameter holds an empty CPU
    # placeholder there.)
    device = ema.engine.device
    shard = path / f"ema_rank{dist.rank():05d}.pt"
    ema.load_state_dict(torch.load(shard, map_location=device, weights_only=True))
    return int(client["step"])


def save_ema_snapshot(state_dict: dict[str, torch.Tensor], cfg: TrainConfig, run_dir: Path, step: int) -> Path:
    """Rank 0 only: ``snapshots/ema_XXXXXXX.pt`` (a raw state_dict the official code loads) and a
    ``.safetensors`` twin, with the run config beside them."""
    from safetensors.torch import save_file

    out = run_dir / "snapshots"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ema_{step:07d}.pt"
    state = {k: v.contiguous() for k, v in state_dict.items()}
    torch.save(state, path.with_suffix(".pt.tmp"))
    os.replace(path.with_suffix(".pt.tmp"), path)
    save_file(state, str(path.with_suffix(".safetensors.tmp")), metadata={"step": str(step)})
    os.replace(path.with_suffix(".safetensors.tmp"), path.with_suffix(".safetensors"))
    save_config(cfg, out / "config.json")
    return path
