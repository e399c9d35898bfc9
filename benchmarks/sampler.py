"""Sampler throughput (images/s) of a preset for each sampler / step count / guidance setting,
with per-image seeds exactly as ``eval/sample_ddp.py`` samples (random weights: speed only).

    python benchmarks/sampler.py --preset MDTv2-Tiny/2 --batch-size 16 --images 32
    python benchmarks/sampler.py --preset MDTv2-XL/2 --batch-size 64 --images 256 --configs ddpm250:3.8 \\
        --autocast bf16 --decode ema

    # one GPU, XL/2 250-step DDPM with CFG, 8 images, 25 of the 250 steps timed and extrapolated
    python benchmarks/sampler.py --preset MDTv2-XL/2 --batch-size 8 --images 8 --configs ddpm250:3.8 \
        --time-steps 25 --repeats 2

``--configs`` lists SAMPLER+STEPS:CFG[:LO-HI] items (SAMPLER: ddpm, ddim, dpm++2m, heun; LO-HI: the
guidance interval in original timesteps). Default: DDIM-50 and DDPM-250 with and without CFG, and
the few-step solvers. ``--time-steps N`` runs N steps per image and scales the rate by network evaluations to
the configured step count (each is one forward of the same batch; the JSON marks it ``extrapolated``).
On CUDA, TF32 is on for the whole process unless ``--no-tf32`` (as the release samples).
Latents only unless ``--decode CODEC`` adds the VAE decode. Prints one JSON object and writes it
to --out if given.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdt_ds.models import build_model  # noqa: E402
from mdt_ds.monitor import device_name  # noqa: E402
from mdt_ds.sampling import SampleOptions, generate, image_seed, sample_labels  # noqa: E402

DEFAULT_CONFIGS = "ddim50:1,ddim50:1.5,ddpm250:1,ddpm250:1.5,dpm++2m20:1.5,dpm++2m20:1.5:0-500,heun10:1.5"




def parse_config(item: str) -> tuple[str, int, float, tuple[int, int] | None]:
    """``SAMPLER+STEPS:CFG[:LO-HI]``, e.g. ``ddpm250:3.8`` or ``dpm++2m10:3.8:0-600`` (guidance
    only on original timesteps 0..600)."""
    parts = item.split(":")
    match = re.fullmatch(r"(ddpm|ddim|dpm\+\+2m|heun)(\d+)", parts[0])
    if match is None or len(parts) not in (2, 3):
        raise SystemExit(f"--configs item {item!r}: expected SAMPLER+STEPS:CFG[:LO-HI], e.g. dpm++2m10:3.8:0-600")
    interval = tuple(int(v) for v in parts[2].split("-")) if len(parts) == 3 else None
    return match.group(1), int(match.group(2)), float(parts[1]), interval


def bench_one(model, codec, sampler: str, steps: int, cfg: float, interval, args, device: torch.device) -> dict:
    """Images per second of one sampler setting (best and median of ``args.repeats``)."""
    timed_steps = min(args.time_steps or steps, steps)
    full = SampleOptions(cfg_scale=cfg, sampler=sampler, steps=steps, cfg_interval=interval)
    options = SampleOptions(cfg_scale=cfg, sampler=sampler, steps=timed_steps, cfg_interval=interval,
                            autocast=args.autocast)
    diffusion = options.diffusion()
    counted: dict = {}

    def run(indices: list[int]) -> None:
        labels = sample_labels(indices, model.num_classes, 0)
        latents = generate(
            model, diffusion, labels, [image_seed(0, i) for i in indices], cfg_scale=cfg, sampler=sampler,
            cfg_interval=interval, device=device, autocast_dtype=options.autocast_dtype(), stats=counted,
        )
        if codec is not None:
            codec.decode(latents)

    run(list(range(min(2, args.batch_size))))  # warm-up
    times = []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for first in range(0, args.images, args.batch_size):
            run(list(range(first, min(first + args.batch_size, args.images))))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    # Every network evaluation costs one forward of the same batch (a guided one, of the doubled
    # batch), so the rate scales with timed / configured evaluations (the decode, when on, is a
    # one-off per image and is scaled too: a small underestimate).
    scale = counted["network_calls_per_image"] / full.network_calls()
    rates = sorted(args.images / t * scale for t in times)
    return {
        "sampler": sampler,
        "steps": steps,
        "timesteps": full.respacing(),
        "cfg_interval": list(interval) if interval else None,
        "timed_steps": timed_steps,
        "extrapolated": timed_steps != steps,
        "cfg_scale": cfg,
        "images": args.images,
        "repeats": args.repeats,
        "images_per_second_best": round(rates[-1], 3),
        "images_per_second_median": round(rates[len(rates) // 2], 3),
        "network_calls_per_image": full.network_calls(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="MDTv2-Tiny/2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (best and median reported)")
    parser.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--decode", default=None, help="also decode with this codec (e.g. ema, tiny-random)")
    parser.add_argument("--time-steps", type=int, default=0, help="time this many steps, extrapolate (0: all)")
    parser.add_argument("--no-tf32", action="store_true", help="on CUDA: keep fp32 matmuls exact")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":  # set once for the whole sampling process
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
    torch.manual_seed(0)
    model = build_model(args.preset, device=device).eval()  # built in place: XL/2 inits slowly on a CPU
    codec = None
    if args.decode:
        from mdt_ds.models.codec import load_codec

        codec = load_codec(args.decode, device, channels=model.in_channels)
    results = [bench_one(model, codec, *parse_config(c), args, device) for c in args.configs.split(",")]
    report = {
        "benchmark": "sampler",
        "preset": args.preset,
        "batch_size": args.batch_size,
        "autocast": args.autocast,
        "decode": args.decode,
        "device": str(device),
        "tf32": bool(device.type == "cuda" and not args.no_tf32),
        "weights": "random (speed only)",
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
