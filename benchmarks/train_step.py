"""Training-step throughput of one preset under one ZeRO stage / precision, with MFU against a
matmul peak measured in the same run, peak memory, and the EMA update's share of the step.

    python benchmarks/train_step.py --preset MDTv2-S/2 --zero-stage 2 --precision fp32 --batch 8
    torchrun --nproc_per_node=8 benchmarks/train_step.py --preset MDTv2-XL/2 --precision bf16 --batch 32

Synthetic latents (the data path has its own benchmark); both passes of the MDTv2 objective.
Prints one JSON object (rank 0) and writes it to --out if given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdt_ds import dist  # noqa: E402
from mdt_ds.config import TrainConfig, apply_overrides  # noqa: E402
from mdt_ds.diffusion import create_diffusion  # noqa: E402
from mdt_ds.diffusion.loss import MDTv2Loss  # noqa: E402
from mdt_ds.ema import ShardedEMA  # noqa: E402
from mdt_ds.engine import PRECISION_DTYPES, build_engine  # noqa: E402
from mdt_ds.models.flops import count_params, train_macs_per_image  # noqa: E402
from mdt_ds.monitor import measure_peak_flops, memory_gb  # noqa: E402


def timed(fn, steps: int, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="MDTv2-S/2")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per process")
    parser.add_argument("--ac", default="none", choices=["none", "encoder", "all"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    env = dist.init(use_deepspeed=True)
    cfg = apply_overrides(TrainConfig(), [
        f"model.preset={args.preset}", f"zero_stage={args.zero_stage}", f"precision={args.precision}",
        f"global_batch={args.batch * env.world_size}", f"activation_checkpointing={args.ac}", "optim.name=adan",
    ])
    engine, _ = build_engine(cfg, env.world_size)
    device, dtype = engine.device, PRECISION_DTYPES[args.precision]
    ema = ShardedEMA(engine)
    objective = MDTv2Loss(create_diffusion())
    m = cfg.model
    x = torch.randn(args.batch, m.in_channels, m.input_size, m.input_size, device=device)
    y = torch.randint(0, m.num_classes, (args.batch,), device=device)

    def model_fn(xt, t, **kw):
        return engine(xt.to(dtype), t, **kw).float()

    def step() -> None:
        loss, _ = objective(model_fn, x, y)
        engine.backward(loss)
        engine.step()

    timed(step, args.warmup, device)
    step_s = timed(step, args.steps, device)
    ema_s = timed(lambda: ema.update(0), args.steps, device)
    peak = measure_peak_flops(device, dtype, size=2048 if device.type == "cuda" else 1024)
    macs = train_macs_per_image(engine.module)
    images_s = args.batch * env.world_size / step_s
    result = {
        "preset": args.preset, "zero_stage": args.zero_stage, "precision": args.precision, "world_size": env.world_size,
        "micro_batch": args.batch, "activation_checkpointing": args.ac, "params": count_params(engine.module)["all"],
        "step_time_s": step_s, "images_per_s": images_s, "train_gmac_per_image": macs / 1e9,
        "measured_peak_tflops_per_device": peak / 1e12, "mfu": 2 * macs * images_s / (peak * env.world_size),
        "ema_update_s": ema_s, "ema_share_of_step": ema_s / (step_s + ema_s), "peak_memory_gb": memory_gb(device),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if dist.is_main():
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
    dist.teardown()


if __name__ == "__main__":
    main()
