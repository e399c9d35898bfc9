"""The prepared GPU device check: one script, at most about 5 minutes on one H200.

    OUT=./device_out python benchmarks/device_check.py --parts a,b,c,d
    python benchmarks/device_check.py --device cpu --quick --parts a     # the CPU-runnable logic

Parts (each with its own time limit and try/except, each writing its own JSON under $OUT, so one
failure loses nothing else; $OUT gets part_<x>.json and summary.json only, five files at most):
  a  correctness: tiny MDTv2 CUDA vs CPU; bf16 vs fp32; flex vs SDPA forward and backward; a
     1-GPU ZeRO-2 bf16 run of 20 steps through `mdt_ds.train` with a sample grid, a checkpoint at
     step 10 and a resume, bit-exact under torch.use_deterministic_algorithms(True) with
     CUBLAS_WORKSPACE_CONFIG=:4096:8 (its cost measured), within a tolerance otherwise
  b  XL/2 bf16 training img/s, MFU and memory at micro-batch 32: best settings and release-like
  c  the sampler's img/s for XL/2, 250-step DDPM with CFG, and the few-step solvers (DPM-Solver++(2M)
     20 steps with and without interval guidance, Heun 10 steps)
  d  SD-VAE (sd-vae-ft-mse architecture, random weights) encode img/s
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARTS = ("a", "b", "c", "d")
# 320 s in all at most (device_check.sh stops everything at 330 s), so a failed first try leaves
# device time for a second within the 15 minutes; typical runs end sooner.
LIMITS_S = {"a": 130, "b": 140, "c": 30, "d": 20}
# Tolerances (relative L2 error ||out - ref|| / ||ref||), stated in the JSON beside each value.
TOL = {"cuda_vs_cpu_fp32": 1e-4, "bf16_vs_fp32": 3e-2, "flex_vs_sdpa_fwd": 2e-3, "flex_vs_sdpa_grad": 1e-2,
       "resume_loss_rel": 1e-2}
TRAIN = [  # the tiny run of part (a): mnist16 pixels, Tiny preset, ZeRO-2 bf16, one process
    "model.preset=MDTv2-Tiny/2", "model.input_size=16", "model.in_channels=1", "data.source=mnist16",
    "data.num_workers=0", "data.shuffle_buffer=64", "global_batch=8", "log_every=1", "ema_decay=0.9",
    "optim.lr=1e-3", "zero_stage=2", "precision=bf16", "ckpt_every=10", "sample_every=10",
]
SD_VAE_MSE_CONFIG = dict(  # stabilityai/sd-vae-ft-mse config.json (architecture only)
    in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


class PartTimeout(Exception):
    """A part ran past its limit."""


@contextmanager
def time_limit(seconds: float):
    """SIGALRM-based limit for the Python code of a part (subprocesses get their own timeouts)."""
    def handler(signum, frame):
        raise PartTimeout(f"ran past its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def check(value: float, tol: float, **extra) -> dict:
    return {"rel_err": value, "tol": tol, "ok": bool(value <= tol), **extra}


def skipped(reason: str) -> dict:
    return {"skipped": True, "reason": reason}


# --------------------------------------------------------------------------- part (a)
def tiny_model(attention: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """MDTv2-Tiny/2 with every weight perturbed (adaLN-Zero alone would output zeros)."""
    from mdt_ds.models import build_model

    torch.manual_seed(seed)
    model = build_model("MDTv2-Tiny/2", attention=attention)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def tiny_inputs(batch: int = 4, seed: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 4, 8, 8, generator=gen), "t": torch.randint(0, 1000, (batch,), generator=gen),
            "y": torch.randint(0, 10, (batch,), generator=gen), "mask_noise": torch.rand(batch, 16, generator=gen)}


def both_passes(model: torch.nn.Module, inputs: dict, device: torch.device, dtype=None) -> list[torch.Tensor]:
    """Full and masked pass (fixed masking: same kept tokens everywhere) on ``device``."""
    x, t, y = (inputs[k].to(device) for k in ("x", "t", "y"))
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        full = model(x, t, y)
        masked = model(x, t, y, enable_mask=True, mask_noise=inputs["mask_noise"].to(device), mask_ratio=0.4)
    return [full.float(), masked.float()]


def check_cuda_vs_cpu(device: torch.device) -> dict:
    if device.type != "cuda":
        return skipped("needs CUDA: compares the CUDA outputs with the CPU's")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # true fp32 vs CPU
    model, inputs = tiny_model().eval(), tiny_inputs()
    with torch.no_grad():
        ref = both_passes(model, inputs, torch.device("cpu"))
        out = both_passes(model.to(device), inputs, device)
    err = max(rel_err(o, r) for o, r in zip(out, ref))
    return check(err, TOL["cuda_vs_cpu_fp32"], passes=["full", "masked"], precision="fp32, TF32 off")


def check_bf16(device: torch.device) -> dict:
    model, inputs = tiny_model().eval().to(device), tiny_inputs()
    with torch.no_grad():
        ref = both_passes(model, inputs, device)
        out = both_passes(model, inputs, device, dtype=torch.bfloat16)
    err = max(rel_err(o, r) for o, r in zip(out, ref))
    return check(err, TOL["bf16_vs_fp32"], what="bf16 autocast vs fp32 on the same device, both passes")


def check_flex(device: torch.device, quick: bool) -> dict:
    """flex vs SDPA: forward (both passes) and, on CUDA, the parameter gradients."""
    if quick and device.type != "cuda":
        return skipped("--quick on CPU: flex compiles for tens of seconds; its CPU forward is tested in tests/")
    # eval(): no label-dropout draws, which would differ between the two models (their forwards
    # draw from the global generator one after the other); gradients still flow.
    sdpa, flex = tiny_model("sdpa").to(device).eval(), tiny_model("flex").to(device).eval()
    flex.load_state_dict(sdpa.state_dict())
    inputs = tiny_inputs()
    grad_ok = device.type == "cuda"  # FlexAttention has no backward on CPU (torch 2.14)
    with torch.set_grad_enabled(grad_ok):
        ref, out = both_passes(sdpa, inputs, device), both_passes(flex, inputs, device)
    result = {"forward": check(max(rel_err(o, r) for o, r in zip(out, ref)), TOL["flex_vs_sdpa_fwd"])}
    if not grad_ok:
        result["backward"] = skipped("FlexAttention has no backward on CPU")
        return result
    sum(o.square().mean() for o in ref).backward()
    sum(o.square().mean() for o in out).backward()
    grads = [(p.grad, q.grad) for p, q in zip(flex.parameters(), sdpa.parameters()) if q.grad is not None]
    flat_out, flat_ref = torch.cat([g.flatten() for g, _ in grads]), torch.cat([g.flatten() for _, g in grads])
    result["backward"] = check(rel_err(flat_out, flat_ref), TOL["flex_vs_sdpa_grad"], what="all parameter grads")
    return result


def train_run(run_dir: Path, steps: int, deterministic: bool, timeout: float, extra: tuple[str, ...] = ()) -> dict:
    """``python -m mdt_ds.train`` in a child process (deterministic mode switched on first)."""
    prologue = "import sys, torch\n"
    if deterministic:
        prologue += "torch.use_deterministic_algorithms(True)\n"
    code = prologue + "from mdt_ds.train import main\nsys.exit(main(sys.argv[1:]))\n"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    cmd = [sys.executable, "-c", code, *TRAIN, f"run_dir={run_dir}", f"steps={steps}", "force_resume=true", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"training run failed ({proc.returncode}): {proc.stderr[-1500:]}")
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return {"wall_s": time.perf_counter() - start, "stats": stats}


def ema_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "snapshots" / f"ema_{step:07d}.pt", map_location="cpu", weights_only=True)


def median_step_time(stats: list[dict]) -> float:
    times = sorted(float(s["step_time"]) for s in stats if "step_time" in s and int(s.get("step", 0)) > 2)
    return times[len(times) // 2] if times else float("nan")


def losses_by_step(stats: list[dict]) -> dict[int, float]:
    return {int(s["step"]): float(s["loss"]) for s in stats if "loss" in s}


def check_cuda_only_paths(device: torch.device) -> dict:
    """What the suite skips on CPU: fused AdamW on CUDA parameters, and a training objective
    step (device generator, float mask ratio) with no host sync and no device-to-host copy."""
    if device.type != "cuda":
        return skipped("needs CUDA: fused AdamW and device-to-host copies exist only there")
    from mdt_ds.config import OptimConfig
    from mdt_ds.diffusion import create_diffusion
    from mdt_ds.diffusion.loss import MDTv2Loss
    from mdt_ds.optim import build_optimizer
    from mdt_ds.syncs import count_host_syncs

    model = tiny_model().to(device).train()
    opt = build_optimizer(model.parameters(), OptimConfig(name="adamw", betas=[0.9, 0.999]))
    fused = bool(opt.param_groups[0].get("fused"))
    objective = MDTv2Loss(create_diffusion().to(device), mask_ratio=0.3)
    inputs = tiny_inputs()
    x, y = inputs["x"].to(device), inputs["y"].to(device)
    gen, host_rng = torch.Generator(device=device).manual_seed(0), random.Random(0)  # as the trainer draws
    objective(model, x, y, gen, host_rng)  # warm-up (kernels, caches)
    before = [p.detach().clone() for p in model.parameters()]
    with count_host_syncs() as counter:
        loss, _ = objective(model, x, y, gen, host_rng)
        loss.backward()
    opt.step()
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    return {"fused_adamw": fused, "params_updated": moved, "host_syncs": counter.count,
            "copies_to_host": counter.copies_to_host,
            "ok": fused and moved > 0 and counter.count == 0 and counter.copies_to_host == 0}


def check_fused_adan(device: torch.device, quick: bool) -> dict:
    """Adan's fused update (one compiled kernel per flat partition: Triton on CUDA, C++ on CPU)
    against the multi-tensor one: the same parameters after 4 steps, no host sync in a step
    (CUDA's sync debug mode, which sees into compiled code; a dispatch-mode counter would make
    dynamo fall back to eager), and the time per step of each on a flat partition of 2^26
    elements on CUDA (2^20 on a CPU or in --quick)."""
    from mdt_ds.optim import Adan

    size = 1 << (20 if quick or device.type != "cuda" else 26)
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(size, generator=gen).to(device)
    grads = [torch.randn(size, generator=gen).to(device) for _ in range(4)]
    out: dict = {"elements": size}
    params = {}
    for fused in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = Adan([p], lr=1e-2, weight_decay=0.05, foreach=True, fused=fused)
        for g in grads[:-1]:
            p.grad = g
            opt.step()
        p.grad = grads[-1]
        sync_free = sync_free_step(opt.step, device)
        params[fused] = p.detach().clone()
        sync(device)
        begin = time.perf_counter()
        for _ in range(5):
            opt.step()
        sync(device)
        out["fused" if fused else "multi_tensor"] = {"step_ms": (time.perf_counter() - begin) / 5 * 1e3,
                                                     "sync_free": sync_free}
    out["max_abs_diff"] = float((params[True] - params[False]).abs().max())
    out["tol"] = 1e-5
    out["ok"] = out["max_abs_diff"] <= out["tol"] and out["fused"]["sync_free"] is not False
    return out


def sync_free_step(step: Callable[[], object], device: torch.device) -> bool | None:
    """Run ``step`` under CUDA's sync debug mode set to error: False if it synchronised with the
    host, True if not, None where there is no device to synchronise with (a CPU)."""
    if device.type != "cuda":
        step()
        return None
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return True
    except RuntimeError as err:
        if "synchroniz" not in str(err):
            raise
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_resume(work: Path, device: torch.device, quick: bool, deadline: float) -> dict:
    """20 steps straight vs 10 + resume to 20, deterministic and normal: losses and EMA."""
    if quick:
        return skipped("--quick: five training runs; the trainer's tests cover resume on CPU")
    out: dict = {}
    for mode in ("deterministic", "normal"):
        det = mode == "deterministic"
        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731 - past the deadline: fail fast
        straight = train_run(work / f"{mode}_straight", 20, det, left())
        train_run(work / f"{mode}_resumed", 10, det, left())
        resumed = train_run(work / f"{mode}_resumed", 20, det, left())
        a, b = losses_by_step(straight["stats"]), losses_by_step(resumed["stats"])
        shared = sorted(set(a) & set(b) & set(range(11, 21)))
        ea, eb = ema_state(work / f"{mode}_straight", 20), ema_state(work / f"{mode}_resumed", 20)
        loss_rel = max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-12) for s in shared) if shared else float("nan")
        out[mode] = {
            "steps_compared": shared, "max_loss_rel_diff": loss_rel,
            "ema_bit_exact": all(torch.equal(ea[k], eb[k]) for k in ea),
            "ema_max_abs_diff": max(float((ea[k].float() - eb[k].float()).abs().max()) for k in ea),
            "straight_wall_s": straight["wall_s"],
            "median_step_time_s": median_step_time(straight["stats"]),
            "grid": (work / f"{mode}_straight" / "samples" / "step_0000010.png").is_file(),
            "checkpoint": any((work / f"{mode}_resumed").rglob("step_0000010*")),
            "last_stats": straight["stats"][-1],
        }
    d, n = out["deterministic"], out["normal"]
    d["ok"] = d["ema_bit_exact"] and d["max_loss_rel_diff"] == 0.0
    n["tol"] = TOL["resume_loss_rel"]
    n["ok"] = n["max_loss_rel_diff"] <= TOL["resume_loss_rel"]
    out["deterministic_cost"] = {
        "wall_ratio_det_over_normal": d["straight_wall_s"] / n["straight_wall_s"],
        "step_time_ratio_det_over_normal": d["median_step_time_s"] / n["median_step_time_s"],
        "note": "wall: whole 20-step runs incl. start-up; step time: median of stats.jsonl step_time, steps 3-20",
    }
    return out


def part_a(args: argparse.Namespace, device: torch.device, deadline: float) -> dict:
    checks: dict[str, Callable[[], dict]] = {
        "cuda_vs_cpu": lambda: check_cuda_vs_cpu(device),
        "bf16_vs_fp32": lambda: check_bf16(device),
        "flex_vs_sdpa": lambda: check_flex(device, args.quick),
        "cuda_only_paths": lambda: check_cuda_only_paths(device),
        "fused_adan": lambda: check_fused_adan(device, args.quick),
        "train_resume": lambda: check_resume(args.work / "runs", device, args.quick, deadline),
    }
    out: dict = {}
    for name, fn in checks.items():
        if name in out:
            continue
        try:
            out[name] = guarded(fn)
        except PartTimeout as err:  # keep what finished; the rest would not fit either
            out[name] = {"error": f"part (a) time limit reached during this check: {err}"}
            out.update({rest: skipped("part (a) time limit reached") for rest in checks if rest not in out})
    return out


# --------------------------------------------------------------------------- parts (b)-(d)
def bench(script: str, argv: list[str], out: Path, timeout: float) -> dict:
    """Run a benchmark script in a child process; its JSON (or the error) comes back."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *argv, "--out", str(out)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "cmd": cmd}
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}", "cmd": cmd}
    return json.loads(out.read_text())


def part_b(args: argparse.Namespace, device: torch.device, deadline: float) -> dict:
    """One child per variant (a compile that runs long loses only its own figure)."""
    preset, batch, steps = ("MDTv2-Tiny/2", 2, 1) if args.quick else ("MDTv2-XL/2", 32, 5)
    variants = ["eager", "release-like", "compile", "compile-flex"] if device.type == "cuda" else ["eager"]
    out = {}
    for name in variants:
        left = deadline - time.monotonic()
        if left < 20:
            out[name] = skipped("part (b) time limit reached")
            continue
        argv = ["--preset", preset, "--precision", "bf16", "--batch", str(batch), "--variants", name,
                "--steps", str(steps), "--warmup", "1" if args.quick else "3"]
        out[name] = bench("train_step.py", argv, args.work / f"train_step_{name}.json", left)
    return out


def part_c(args: argparse.Namespace, device: torch.device, deadline: float) -> dict:
    preset = "MDTv2-Tiny/2" if args.quick else "MDTv2-XL/2"
    configs = "ddpm250:4.0,dpm++2m20:4.0,dpm++2m20:4.0:0-500,heun10:4.0"
    argv = ["--preset", preset, "--batch-size", "8", "--images", "8", "--configs", configs,
            "--repeats", "1" if args.quick else "2", "--device", str(device)]
    # Time a few steps and extrapolate to 250 (the JSON says so): a full 250-step run twice
    # would not fit the part's limit.
    argv += ["--time-steps", "5" if args.quick else "50"]
    out = {}
    for name, extra in (("fp32_tf32", []), ("bf16_autocast", ["--autocast", "bf16"])):
        left = deadline - time.monotonic()
        out[name] = bench("sampler.py", argv + extra, args.work / f"sampler_{name}.json", left) if left > 5 \
            else skipped("part (c) time limit reached")
    return out


def part_d(args: argparse.Namespace, device: torch.device, deadline: float) -> dict:
    """Encode throughput of the SD-VAE architecture (random weights), fp32 (the default for
    extraction) and bf16, 256x256 images."""
    from diffusers import AutoencoderKL

    batch, size, reps = (2, 64, 1) if args.quick else (32, 256, 5)
    config = dict(SD_VAE_MSE_CONFIG, sample_size=size)
    torch.manual_seed(0)
    vae = AutoencoderKL(**config).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    out = {"batch": batch, "image_size": size, "params": sum(p.numel() for p in vae.parameters())}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = vae.to(dtype)
        with torch.no_grad():
            model.encode(x.to(dtype))  # warm-up (cuDNN autotune)
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                latents = model.encode(x.to(dtype)).latent_dist.mean
            sync(device)
        out[f"{name}_images_per_s"] = batch * reps / (time.perf_counter() - start)
        out["latent_shape"] = list(latents.shape)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- driver
def guarded(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except PartTimeout:
        raise
    except Exception as err:  # noqa: BLE001 - one failed check must not lose the others
        return {"error": f"{type(err).__name__}: {str(err)[:1500]}", "traceback": traceback.format_exc()[-2000:]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="a,b,c,d", help="comma list of a,b,c,d")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test of the logic)")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiply every part's time limit")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "device_out"))
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        p.error(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
    args.parts = [x for x in PARTS if x in parts]  # fixed order: correctness first
    return args


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=props.total_memory / 2**30, capability=[props.major, props.minor])
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as err:  # noqa: BLE001
        info["deepspeed"] = f"unavailable: {err}"
    return info


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Training runs and child JSON stay outside $OUT: the device tool returns at most 8 files.
    import tempfile

    args.work = Path(tempfile.mkdtemp(prefix="mdt_device_check_"))
    device = torch.device(args.device)
    runners = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}
    summary: dict = {"environment": environment(device), "parts": args.parts, "quick": args.quick,
                     "tolerances": TOL, "limits_s": {k: LIMITS_S[k] * args.limit_scale for k in args.parts}}
    for part in args.parts:
        limit = LIMITS_S[part] * args.limit_scale
        start = time.monotonic()
        try:
            with time_limit(limit):
                result = runners[part](args, device, start + limit - 5)
        except PartTimeout as err:
            result = {"error": f"part {part} {err}"}
        except Exception as err:  # noqa: BLE001 - keep the other parts
            result = {"error": f"{type(err).__name__}: {str(err)[:1500]}", "traceback": traceback.format_exc()[-2000:]}
        result["seconds"] = time.monotonic() - start
        (args.out / f"part_{part}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        summary[part] = result
        print(f"part {part}: {result['seconds']:.1f} s -> {args.out / f'part_{part}.json'}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


if __name__ == "__main__":
    main()
