"""The prepared GPU device check: one script, one shot of about 6 minutes on one H100 80 GB, the
most valuable figures first, every part's JSON saved as it grows.

    OUT=./device_out python benchmarks/device_check.py                # parts b, a, c, d
    python benchmarks/device_check.py --device cpu --quick           # every part, tiny sizes, on a CPU

Parts, in this order, each with its own time limit (LIMITS_S: 355 s in all; device_check.sh sends
SIGTERM at 370 s, on which the running part is saved and the rest skipped) and a try/except per
check, so one failure loses nothing else. $OUT gets part_<x>.json (rewritten after every check or
child, so a kill keeps what finished) and summary.json (after every part): five files, no folders
(the device tool returns 8 files, 2 folders deep). Training runs, child JSON and stderr, and the one
inductor cache that every child shares (TORCHINDUCTOR_CACHE_DIR, set once) live outside $OUT.

  b  170 s  XL/2 training, micro-batch 32, the default precision (TrainConfig().precision: bf16),
            model built on the GPU, one child per variant: `compile` first (step losses, dynamo's
            graphs, compiles in warm-up vs timed steps, recompiles and their reasons), then
            `eager` (its losses against compile's, step by step: step 1 is at adaLN-Zero init,
            where the output is exactly zero, so only later steps can differ), then `release-like`
            (fp32, explicit attention, micro-batch 16; per-image figures compare). Warm-up 2, timed
            3; img/s, MFU against mdt_ds.monitor's datasheet peak (COMPUTE_DTYPES), peak memory
            (torch.cuda.max_memory_allocated), the three largest costs of one profiled step; the
            goal (>= 50% MFU, >= 375 img/s on one H100) beside the best measured variant.
  a  140 s  correctness, in order: train-and-resume through `mdt_ds.train` (at most 80 s;
            deterministic mode first, each mode saved as it ends; NaN there is rerun once with
            torch.utils.deterministic.fill_uninitialized_memory off, to tell an uninitialised read
            from a real divergence), CUDA vs CPU, pure bf16 and bf16-amp vs fp32 at XL/2 depth
            (outputs and every gradient), the bias table's gradient at XL/2 width, masked pass,
            batch 32: gathered from fp32 (now) vs cast to bf16 first (before) against float64,
            compiled vs eager at three kept lengths (one a multiple of 8), fused Adan, the CUDA-only
            paths, and flex vs SDPA at head dims 16 and 72 with whether check_flex refuses 72 (a
            child process, started after train-and-resume and collected last).
  c   25 s  sampler img/s, XL/2, batch 32, CFG 4: DDPM-250, DPM-Solver++(2M)-20 with and without
            interval guidance, Heun-10; fp32/TF32 and bf16 autocast (10 steps timed, extrapolated).
  d   20 s  SD-VAE (sd-vae-ft-mse architecture, random weights) encode img/s, fp32 and bf16.

--quick (a CPU smoke test of every part): Tiny preset, batch 2, one timed step, fp32 training on a
CPU (bf16 matmuls are emulated there); compile and the GPU-only checks report
{"skipped": true, "reason": ...}.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from device_common import (  # noqa: E402
    REPO,
    TOL,
    PartTimeout,
    Report,
    guarded,
    run_child,
    skipped,
    sync,
    time_limit,
    write_json,
)

PARTS = ("b", "a", "c", "d")  # the most valuable first: throughput, then correctness
LIMITS_S = {"b": 170, "a": 140, "c": 25, "d": 20}
A_RESUME_S = 80  # train_resume's share of part (a): the numerical checks after it must get their turn
B_VARIANTS = ("compile", "eager", "release-like")
# Seconds each part-(b) child leaves for those after it: a compile that runs long must not take
# the eager and release-like figures with it.
B_RESERVE_S = {"compile": 55, "eager": 25, "release-like": 0}
GOAL = {"mfu_spec": 0.5, "images_per_s": 375.0, "what": "MDTv2-XL/2, bf16, one H100 (989 TFLOP/s dense bf16)"}
C_CONFIGS = "ddpm250:4.0,dpm++2m20:4.0,dpm++2m20:4.0:0-500,heun10:4.0"
SD_VAE_MSE_CONFIG = dict(  # stabilityai/sd-vae-ft-mse config.json (architecture only)
    in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)


# --------------------------------------------------------------------------- part (b)
def b_plan(quick: bool) -> dict:
    if quick:
        return {"preset": "MDTv2-Tiny/2", "batch": 2, "release_batch": 2, "steps": 1, "warmup": 1}
    # release-like is fp32 with explicit attention: at 32, its activations and saved [B, H, L, L]
    # scores would need about 90 GB by estimate (16: about half), beyond an H100's 80
    return {"preset": "MDTv2-XL/2", "batch": 32, "release_batch": 16, "steps": 3, "warmup": 2}


def b_groups(cuda: bool, plan: dict) -> list[list[str]]:
    """The variants each child runs. On a GPU each alone: a compile that runs long or crashes loses
    only its own figure. On a CPU (nothing compiled) eager and release-like share one child, one
    start-up less, when their micro-batches agree."""
    if cuda or plan["batch"] != plan["release_batch"]:
        return [[name] for name in B_VARIANTS]
    return [["compile"], ["eager", "release-like"]]


def b_argv(names: list[str], plan: dict, precision: str) -> list[str]:
    batch = plan["release_batch"] if names == ["release-like"] else plan["batch"]
    argv = [str(REPO / "benchmarks" / "train_step.py"), "--preset", plan["preset"], "--precision", precision,
            "--batch", str(batch), "--variants", ",".join(names), "--steps", str(plan["steps"]),
            "--warmup", str(plan["warmup"])]
    if names != ["release-like"]:  # one profiled step each: the largest costs
        argv += ["--profile", "--profile-steps", "1", "--profile-warmup", "0"]
    return argv


def part_b(args: argparse.Namespace, device: torch.device, deadline: float, report: Report) -> None:
    """A child per variant (model built on the GPU, the shared inductor cache), the summary saved
    as soon as each child ends."""
    from mdt_ds.config import TrainConfig

    plan, cuda = b_plan(args.quick), device.type == "cuda"
    # A CPU emulates bf16 matmuls (about 1 GFLOP/s on AVX2): fp32 there keeps the smoke test short.
    precision = TrainConfig().precision if cuda else "fp32"
    report.update(preset=plan["preset"], precision=precision, micro_batch=plan["batch"],
                  release_like_micro_batch=plan["release_batch"], goal=GOAL)
    runs: dict = {}
    for names in b_groups(cuda, plan):
        left = deadline - time.monotonic() - B_RESERVE_S[names[-1]]  # what the later groups need
        if names == ["compile"] and not cuda and args.quick:
            result = skipped("--quick on a CPU: inductor compiles an MDTv2 for minutes on this CPU")
        elif left < 15:
            result = skipped("part (b) time limit: too little left for this variant")
        else:
            argv, out = b_argv(names, plan, precision), args.work / f"train_step_{names[0]}.json"
            result = guarded(lambda: run_child(argv, out, left))  # noqa: B023 - called at once
        runs.update(dict.fromkeys(names, result))
        report["runs"] = runs
        report.put("summary", summarise_b(runs))


def top(costs: dict | None, n: int = 3) -> dict:
    return dict(list((costs or {}).items())[:n])


def variant_row(name: str, run: dict) -> dict:
    """The figures of one part-(b) child that the summary compares."""
    v = (run.get("variants") or {}).get(name) or {}
    if "images_per_s" not in v:
        return {"error": v.get("error") or run.get("error") or run.get("reason") or "no result",
                "skipped": bool(run.get("skipped"))}
    row = {k: v.get(k) for k in ("images_per_s", "mfu_spec", "mfu_measured", "peak_memory_gb", "step_time_s",
                                 "first_step_loss", "step_losses", "compiled_blocks", "phases_s")}
    row.update(micro_batch=run.get("micro_batch"), ms_per_image=1e3 / v["images_per_s"], precision=v.get("precision"),
               peak_source=(run.get("peaks") or {}).get(v.get("precision"), {}).get("spec_source"))
    profile = v.get("profile") or {}
    if profile:
        row.update(largest_costs_ms=top(profile.get("top_ms")), largest_non_matmul_ms=top(profile.get("top_non_matmul_ms")),
                   matmul_share=profile.get("matmul_share"))
    if v.get("compile"):
        row["dynamo"] = v.get("dynamo")
    return row


def compare_losses(rows: dict[str, dict]) -> dict:
    """Compile's losses against eager's, step by step (same weights, batch and draws)."""
    compiled, eager = (rows.get(n, {}).get("step_losses") or [] for n in ("compile", "eager"))
    if not compiled or not eager:
        return skipped("needs the losses of both compile and eager")
    rels = [abs(c - e) / max(abs(e), 1e-12) for c, e in zip(compiled, eager)]
    tol = TOL["first_loss_compile_vs_eager"]
    return {"first_step": {"compile": compiled[0], "eager": eager[0], "rel_diff": rels[0], "tol": tol,
                           "ok": rels[0] <= tol},
            "first_step_note": "at adaLN-Zero init the network's output is exactly zero: step 1's loss is the same "
                               "for any arithmetic, so only the later steps show compile-vs-eager differences "
                               "(which include compile's fused Adan update; part (a)'s compiled_vs_eager compares outputs "
                               "and gradients of perturbed weights)",
            "rel_diff_per_step": rels, "max_rel_diff_after_step_1": max(rels[1:], default=None)}


def summarise_b(runs: dict[str, dict]) -> dict:
    """Per-variant figures, compile's first-step loss against eager's, the goal beside the best
    measured variant, and the speed-up per image over the release-like run."""
    rows = {name: variant_row(name, run) for name, run in runs.items()}
    out: dict = {"variants": rows, "losses_compile_vs_eager": compare_losses(rows)}
    timed = [n for n in ("compile", "eager") if "images_per_s" in rows.get(n, {})]
    best = max(timed, key=lambda n: rows[n]["images_per_s"], default=None)
    measured = None if best is None else {"variant": best, "images_per_s": rows[best]["images_per_s"],
                                          "mfu_spec": rows[best]["mfu_spec"]}
    out["goal_vs_measured"] = {"goal": GOAL, "measured": measured, "met": measured is not None and (
        measured["mfu_spec"] >= GOAL["mfu_spec"] and measured["images_per_s"] >= GOAL["images_per_s"])}
    release = rows.get("release-like", {})
    if best is not None and "ms_per_image" in release:
        out["best_over_release_like_per_image"] = release["ms_per_image"] / rows[best]["ms_per_image"]
    return out


# --------------------------------------------------------------------------- part (a)
def part_a(args: argparse.Namespace, device: torch.device, deadline: float, report: Report) -> None:
    """The checks in order of value, each saved as soon as it is in; the flex child runs in the
    background from the end of train_resume (its runs' timings stay undisturbed) to the end."""
    import device_check_a as a
    from device_check_train import check_resume

    resume_deadline = min(deadline, time.monotonic() + A_RESUME_S * args.limit_scale)
    checks: list[tuple[str, Callable[[], dict]]] = [
        ("train_resume", lambda: check_resume(args.work / "runs", args.quick, resume_deadline, report)),
        ("cuda_vs_cpu", lambda: a.check_cuda_vs_cpu(device)),
        ("bf16_vs_fp32_xl_depth", lambda: a.check_precisions(device, args.quick)),
        ("bias_table_grad", lambda: a.check_bias_grad(device, args.quick)),
        ("compiled_vs_eager", lambda: a.check_compiled(device, args.quick)),
        ("fused_adan", lambda: a.check_fused_adan(device, args.quick)),
        ("cuda_only_paths", lambda: a.check_cuda_only_paths(device)),
        ("flex_vs_sdpa", lambda: flex.collect(deadline - time.monotonic()) if flex else {"error": flex_error}),
    ]
    flex, flex_error = None, "not started"
    try:
        for name, fn in checks:
            report.put(name, guarded(fn))
            if name == "train_resume":
                try:
                    flex = a.start_flex_child(args.work, device)
                except OSError as err:
                    flex_error = f"the flex child did not start: {err}"
            empty_cache(device)
    except PartTimeout as err:  # keep what finished, mark the rest, let the driver record the part's end
        partial = report.get(name)
        if isinstance(partial, dict) and partial:  # train_resume saves its modes as they end
            partial["error"] = f"stopped during this check: {err}"
        else:
            report[name] = {"error": f"stopped during this check: {err}"}
        report.update({rest: skipped(f"not reached: {err}") for rest, _ in checks if rest not in report})
        report.save()
        raise
    finally:
        if flex is not None:
            flex.kill()


def empty_cache(device: torch.device) -> None:
    """Hand cached GPU memory back between checks and parts: children started later need it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- parts (c), (d)
def part_c(args: argparse.Namespace, device: torch.device, deadline: float, report: Report) -> None:
    """The sampler benchmark in a child per precision. A few steps per setting are timed and the
    rate extrapolated to the full count (the JSON says so): 250 steps twice would not fit."""
    preset, batch = ("MDTv2-Tiny/2", 2) if args.quick else ("MDTv2-XL/2", 32)
    argv = [str(REPO / "benchmarks" / "sampler.py"), "--preset", preset, "--batch-size", str(batch),
            "--images", str(batch), "--configs", C_CONFIGS, "--repeats", "1", "--device", str(device),
            "--time-steps", "2" if args.quick else "10"]
    report.update(preset=preset, batch=batch, cfg_scale=4.0)
    for i, (name, extra) in enumerate((("fp32_tf32", []), ("bf16_autocast", ["--autocast", "bf16"]))):
        left = deadline - time.monotonic()
        share = left * 0.55 if i == 0 else left  # the first must leave the second its turn
        out = args.work / f"sampler_{name}.json"
        report.put(name, guarded(lambda: run_child(argv + extra, out, share)) if share > 5  # noqa: B023
                   else skipped("part (c) time limit reached"))


def part_d(args: argparse.Namespace, device: torch.device, deadline: float, report: Report) -> None:
    """Encode throughput of the SD-VAE architecture (random weights), fp32 (the default for
    extraction) and bf16, 256x256 images."""
    from diffusers import AutoencoderKL

    batch, size, reps = (2, 64, 1) if args.quick else (32, 256, 5)
    # --quick: the same blocks, 32 channels wide (the full 84M parameters take seconds to build on a CPU)
    widths = dict(block_out_channels=(32,) * 4, norm_num_groups=8) if args.quick else {}
    torch.manual_seed(0)
    vae = AutoencoderKL(**dict(SD_VAE_MSE_CONFIG, sample_size=size, **widths)).to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    report.update(batch=batch, image_size=size, params=sum(p.numel() for p in vae.parameters()))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = vae.to(dtype)
        with torch.no_grad():
            model.encode(x.to(dtype))  # warm-up (cuDNN autotune)
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                latents = model.encode(x.to(dtype)).latent_dist.mean
            sync(device)
        report["latent_shape"] = list(latents.shape)
        report.put(f"{name}_images_per_s", batch * reps / (time.perf_counter() - start))


# --------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of b,a,c,d (run in that order)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test of every part)")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiply every part's time limit")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "device_out"))
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        p.error(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
    args.parts = [x for x in PARTS if x in parts]  # fixed order: the most valuable first
    return args


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device),
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=props.total_memory / 2**30, capability=[props.major, props.minor])
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as err:  # noqa: BLE001
        info["deepspeed"] = f"unavailable: {err}"
    return info


def run_part(part: str, args: argparse.Namespace, device: torch.device, runner: Callable) -> Report:
    """One part under its time limit; its report, saved, whatever happened."""
    report = Report(args.out / f"part_{part}.json")
    limit = LIMITS_S[part] * args.limit_scale
    start = time.monotonic()
    try:
        with time_limit(limit):
            returned = runner(args, device, start + limit - 5, report)
        if isinstance(returned, dict) and returned is not report:
            report.update(returned)
    except PartTimeout as err:
        report["error"] = f"part {part} {err}"
    except Exception as err:  # noqa: BLE001 - keep the other parts
        report.update(error=f"{type(err).__name__}: {str(err)[:1500]}", traceback=traceback.format_exc()[-2000:])
    report["seconds"] = time.monotonic() - start
    report.save()
    empty_cache(device)
    return report


def on_sigterm(signum, frame) -> None:  # noqa: ANN001 - signal's API
    raise PartTimeout("terminated (SIGTERM: the outer timeout)")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Training runs, child JSON and caches stay outside $OUT: the device tool returns at most 8 files.
    args.work = Path(tempfile.mkdtemp(prefix="mdt_device_check_"))
    # ONE inductor (and Triton) cache for this process and every child, set before anything
    # compiles: what one child compiled is a cache hit for the next.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.work / "inductor_cache"))
    device = torch.device(args.device)
    runners = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}
    summary: dict = {"environment": environment(device), "parts": args.parts, "quick": args.quick, "tolerances": TOL,
                     "limits_s": {k: LIMITS_S[k] * args.limit_scale for k in args.parts}, "work_dir": str(args.work)}
    old = signal.signal(signal.SIGTERM, on_sigterm)  # the outer timeout: save, then stop
    terminated = False
    try:
        for part in args.parts:
            if terminated:
                summary[part] = skipped("terminated before this part")
                continue
            summary[part] = dict(run_part(part, args, device, runners[part]))
            terminated = "SIGTERM" in str(summary[part].get("error", ""))
            write_json(args.out / "summary.json", summary)  # after every part: a kill keeps it
            print(f"part {part}: {summary[part]['seconds']:.1f} s -> {args.out / f'part_{part}.json'}", flush=True)
    finally:
        signal.signal(signal.SIGTERM, old)
    write_json(args.out / "summary.json", summary)
    return summary


if __name__ == "__main__":
    main()
