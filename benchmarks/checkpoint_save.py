"""What a checkpoint costs with and without the world-size-independent (universal) form: bytes
on disk and seconds to write, side by side in one process, plus the by-formula size at every
preset (mdt_ds.checkpoint.estimate_bytes).

    DS_ACCELERATOR=cpu python benchmarks/checkpoint_save.py --preset MDTv2-S/2 --out save.json

One process, ZeRO-2, Adan, one training step first (the optimizer's moments exist from then on),
then ``--reps`` saves of each kind alternating, each into a fresh run directory, fsynced as the
trainer's saves are. Since ``universal_every`` the universal form goes into one checkpoint in
N (and those of a stop and the end), so the average save costs ``plain + universal / N``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdt_ds import dist  # noqa: E402
from mdt_ds.checkpoint import GiB, estimate_bytes, measured_bytes, save_training_state  # noqa: E402
from mdt_ds.config import MODEL_PRESETS, load_config  # noqa: E402
from mdt_ds.ema import ShardedEMA  # noqa: E402
from mdt_ds.engine import PRECISION_DTYPES, build_engine  # noqa: E402
from mdt_ds.models import build_model  # noqa: E402


def trained_engine(preset: str, precision: str, batch: int) -> tuple[object, ShardedEMA]:
    """An engine after one optimizer step (random latents), and its EMA."""
    cfg = load_config(None, [f"model.preset={preset}", f"precision={precision}", "zero_stage=2",
                             f"global_batch={batch}", "optim.name=adan"])
    engine, _ = build_engine(cfg, world_size=1)
    ema = ShardedEMA(engine, cfg.ema_decay)
    m, dtype = cfg.model, PRECISION_DTYPES[precision]
    x = torch.randn(batch, m.in_channels, m.input_size, m.input_size, dtype=dtype)
    out = engine(x, torch.randint(0, 1000, (batch,)), torch.randint(0, m.num_classes, (batch,)))
    engine.backward(out.float().square().mean())
    engine.step()
    ema.update(1)
    return engine, ema


def time_saves(engine, ema, reps: int) -> dict[str, dict]:
    """Seconds and bytes of ``reps`` saves of each kind, alternating (the page cache and the
    allocator warm alike for both)."""
    out: dict[str, dict] = {"with_universal": {"seconds": []}, "without_universal": {"seconds": []}}
    for _ in range(reps):
        for name, universal in (("with_universal", True), ("without_universal", False)):
            run_dir = Path(tempfile.mkdtemp(prefix="mdt_save_"))
            try:
                start = time.perf_counter()
                path = save_training_state(engine, ema, run_dir, step=1, universal=universal)
                out[name]["seconds"].append(time.perf_counter() - start)
                out[name]["bytes"] = measured_bytes(path)
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)
    for entry in out.values():
        entry["median_seconds"] = sorted(entry["seconds"])[len(entry["seconds"]) // 2]
        entry["total_bytes"] = sum(entry["bytes"].values())
    return out


def by_formula(precision: str) -> dict[str, dict]:
    """Each preset's checkpoint and universal form in GiB (Adan), from the parameter count."""
    out = {}
    for preset in (p for p in MODEL_PRESETS if p.startswith("MDTv2-") and p.endswith("/2") and "Demo" not in p):
        params = sum(p.numel() for p in build_model(preset, device="meta").parameters())
        sizes = estimate_bytes(params, precision, "adan")
        out[preset] = {"params": params, "checkpoint_gib": sizes["checkpoint"] / GiB,
                       "universal_gib": sizes["universal"] / GiB}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="MDTv2-S/2")
    p.add_argument("--precision", default="bf16", choices=("bf16", "bf16-amp", "fp32"))
    p.add_argument("--batch", type=int, default=2, help="images in the one training step")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = p.parse_args(argv)
    dist.init(use_deepspeed=True)
    engine, ema = trained_engine(args.preset, args.precision, args.batch)
    saves = time_saves(engine, ema, args.reps)
    with_u, without = saves["with_universal"], saves["without_universal"]
    result = {
        "preset": args.preset, "precision": args.precision, "zero_stage": 2, "world_size": 1, "optimizer": "adan",
        "reps": args.reps, **saves,
        "size_ratio_without_over_with": without["total_bytes"] / with_u["total_bytes"],
        "time_ratio_without_over_with": without["median_seconds"] / with_u["median_seconds"],
        "by_formula": by_formula(args.precision),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    dist.teardown()
    return result


if __name__ == "__main__":
    main()
