"""Training-step benchmark: several configurations of one preset side by side in ONE process
(ratios measured under the same load), per-pass times, host syncs, img/s, MFU against the
device's spec peak and a measured matmul peak, peak memory, a profiler split of matmul vs other
ops, and optionally the MDT release's own model timed alternately with ours.

    # CPU (idle machine; each line one configuration)
    python benchmarks/train_step.py --preset MDTv2-S/2 --precision fp32 --batch 8 --profile \\
        --release-src /tmp/mdt_release --out s2.json
    python benchmarks/train_step.py --preset MDTv2-B/2 --precision fp32 --batch 8 --out b2.json
    # one GPU
    python benchmarks/train_step.py --preset MDTv2-XL/2 --precision bf16 --batch 32 \\
        --variants eager,compile,flex,compile-flex,explicit,release-like --out xl2.json
    python benchmarks/train_step.py --quick          # Tiny preset, 1 step: a smoke test

Variants (dotted overrides over the base run): eager (sdpa, no compile), compile (blocks and
Adan's update), compile-adan-unfused (blocks only), flex, compile-flex, explicit, release-like
(explicit attention, fp32, no compile: how the release trains). Synthetic latents; both passes
of the MDTv2 objective; Adan as in the paper. Each variant also reports the loss of every warm-up
and timed step (same weights, batch and draws in every variant: compile's against eager's) and
dynamo's compiles in warm-up and in the timed steps, with its recompiles. MFU peaks are those of
the dtype the matmuls run in (mdt_ds.engine.COMPUTE_DTYPES: bf16 for bf16-amp). Prints one JSON
object (rank 0) and writes it to --out if given.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from release_model import release_comparison  # noqa: E402

from mdt_ds import dist  # noqa: E402
from mdt_ds.config import ConfigError, TrainConfig, apply_overrides  # noqa: E402
from mdt_ds.diffusion import create_diffusion  # noqa: E402
from mdt_ds.diffusion.loss import MDTv2Loss  # noqa: E402
from mdt_ds.ema import ShardedEMA  # noqa: E402
from mdt_ds.engine import COMPUTE_DTYPES, PRECISION_DTYPES, build_engine  # noqa: E402
from mdt_ds.hostmem import HeapPeak  # noqa: E402
from mdt_ds.models.flops import count_params, train_macs_per_image  # noqa: E402
from mdt_ds.monitor import device_name, measure_peak_flops, memory_gb  # noqa: E402
from mdt_ds.syncs import count_host_syncs  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "eager": ["model.attention=sdpa", "compile=false"],
    "compile": ["model.attention=sdpa", "compile=true"],  # optim.fused=auto: Adan's update fused too
    "compile-adan-unfused": ["model.attention=sdpa", "compile=true", "optim.fused=false"],
    "flex": ["model.attention=flex", "compile=false"],
    "compile-flex": ["model.attention=flex", "compile=true"],
    "explicit": ["model.attention=explicit", "compile=false"],
    "release-like": ["model.attention=explicit", "precision=fp32", "compile=false"],
}
# Ratios reported as time(b) / time(a): above 1 means a is faster.
RATIOS = {"compile_vs_eager": ("compile", "eager"), "eager_vs_explicit": ("eager", "explicit"),
          "flex_vs_sdpa": ("flex", "eager"), "compile_flex_vs_eager": ("compile-flex", "eager"),
          "ours_vs_release_like": ("eager", "release-like"), "best_vs_release_like": ("best", "release-like")}
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")
STEADY_STEP_FAULTS = 1000  # host page faults below which a profiled step counts as steady state
PHASES = ("full_pass_s", "masked_pass_s", "backward_s", "optimizer_step_s", "ema_s")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spec_peak(device: torch.device, dtype: torch.dtype, measured: float) -> tuple[float, str]:
    """The MFU denominator: the device's dense peak from mdt_ds.monitor's table where that
    exists, else the measured matmul peak (and say so)."""
    try:
        from mdt_ds.monitor import device_peak_flops
    except ImportError:
        return measured, "measured (mdt_ds.monitor.device_peak_flops not available)"
    return device_peak_flops(device, dtype, measured)  # off the table: this run's measurement, not a second one


def measured_peak(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """A large matmul, so that the peak is not launch-bound (8192^3 on a GPU)."""
    size = 512 if quick else (8192 if device.type == "cuda" else 2048)
    measure_peak_flops(device, dtype, size=size, reps=1)  # warm-up (handles, clocks)
    return measure_peak_flops(device, dtype, size=size, reps=3 if quick else 10)


class Runner:
    """One engine, its EMA, a synthetic batch and the step functions that the timings share."""

    def __init__(self, cfg: TrainConfig, world: int, batch: int, seed: int = 0):
        self.cfg = cfg
        self.engine, _ = build_engine(cfg, world)
        self.ema = ShardedEMA(self.engine)
        self.device, self.dtype = self.engine.device, PRECISION_DTYPES[cfg.precision]
        # As the trainer runs it: schedules on the device, a device generator and a host-drawn
        # mask ratio per step (no host syncs of ours).
        self.diffusion = create_diffusion().to(self.device)
        self.objective = MDTv2Loss(self.diffusion, mask_ratio=cfg.model.mask_ratio)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.host_rng = random.Random(seed)
        m = cfg.model
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, m.in_channels, m.input_size, m.input_size, generator=gen).to(self.device)
        self.y = torch.randint(0, m.num_classes, (batch,), generator=gen).to(self.device)
        self.steps = 0

    def model_fn(self, xt: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
        return self.engine(xt.to(self.dtype), t, **kw).float()

    def step(self) -> torch.Tensor:
        """One training step as the trainer runs it: objective, backward, step, EMA. Returns the
        loss, detached, on the device (reading it would sync)."""
        loss, _ = self.objective(self.model_fn, self.x, self.y, self.generator, self.host_rng)
        self.engine.backward(loss)
        self.engine.step()
        self.ema.update(self.steps)
        self.steps += 1
        return loss.detach()

    def counted_step(self) -> dict[str, int]:
        """The same step with host syncs counted per part (a dispatch mode: not timed)."""
        with count_host_syncs() as ours:
            loss, _ = self.objective(self.model_fn, self.x, self.y, self.generator, self.host_rng)
            self.engine.backward(loss)
        with count_host_syncs() as ds:
            self.engine.step()
        with count_host_syncs() as ema:
            self.ema.update(self.steps)
        self.steps += 1
        return {"ours": ours.count, "deepspeed_step": ds.count, "ema": ema.count}

    def phased_step(self) -> dict[str, float]:
        """One step with a device sync between its parts, for the per-pass split."""
        n, d = self.x.shape[0], self.device
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), device=d)
        times, mark = [], [time.perf_counter()]

        def lap() -> None:
            sync(d)
            mark.append(time.perf_counter())
            times.append(mark[-1] - mark[-2])

        sync(d)
        mark[0] = time.perf_counter()
        full = self.diffusion.training_losses(self.model_fn, self.x, t, {"y": self.y}, torch.randn_like(self.x))
        loss = full["loss"].mean()
        lap()
        kwargs = {"y": self.y, "enable_mask": True}
        loss = loss + self.diffusion.training_losses(self.model_fn, self.x, t, kwargs, torch.randn_like(self.x))[
            "loss"].mean()
        lap()
        self.engine.backward(loss)
        lap()
        self.engine.step()
        lap()
        self.ema.update(self.steps)
        lap()
        self.steps += 1
        return dict(zip(PHASES, times))

    def compiled_blocks(self) -> int:
        blocks = self.engine.module.blocks()
        return sum(bool(getattr(b, "_mdt_compiled", False)) for b in blocks)  # marked by compile_blocks


class RecompileLog(logging.Handler):
    """Counts dynamo's recompilations (its "recompiles" log artifact, switched on while in use)
    and keeps the first few reasons."""

    def __init__(self, keep: int = 6):
        super().__init__()
        self.count, self.reasons, self.keep = 0, [], keep

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.reasons) < self.keep:
            self.reasons.append(" ".join(record.getMessage().split())[:300])

    @staticmethod
    def logger() -> logging.Logger:
        from torch._dynamo import guards  # where dynamo defines its "recompiles" log artifact

        return getattr(guards, "recompiles_log", None) or logging.getLogger("torch._dynamo.guards.__recompiles")

    def __enter__(self) -> "RecompileLog":
        torch._logging.set_logs(recompiles=True)
        self.logger().addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger().removeHandler(self)
        torch._logging.set_logs()


def dynamo_counts() -> dict[str, int]:
    """Dynamo's process-wide counters: frames compiled, distinct graphs, graph breaks."""
    from torch._dynamo.utils import counters

    return {"frames_compiled": int(counters["frames"]["ok"]), "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def counts_since(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before[k] for k, v in dynamo_counts().items()}


def time_variant(runner: Runner, args: argparse.Namespace) -> dict:
    """Warm up, then time plain steps (no inner syncs) and phased steps (synced per part). Dynamo's
    compiles are counted over warm-up and the timed steps apart: a compile in a timed step means
    a shape (the masked pass's kept length) was not dynamic after all."""
    start_counts = dynamo_counts()
    losses = []  # same weights, batch and draws in every variant: compile's losses vs eager's
    with RecompileLog() as recompiles:
        for _ in range(args.warmup):
            losses.append(runner.step())
        sync(runner.device)
        warm_counts = dynamo_counts()
        times = []
        faults_before = minor_faults()
        for _ in range(args.steps):
            start = time.perf_counter()
            losses.append(runner.step())
            sync(runner.device)
            times.append(time.perf_counter() - start)
        faults = (minor_faults() - faults_before) / max(1, args.steps)
    dynamo = {"warmup": {k: v - start_counts[k] for k, v in warm_counts.items()}, "timed_steps": counts_since(warm_counts),
              "recompiles": recompiles.count, "recompile_reasons": recompiles.reasons}
    phases = [runner.phased_step() for _ in range(args.steps)]
    return {
        "step_time_s": statistics.median(times), "step_times_s": times,
        # pages the kernel mapped in (and zeroed) per step: fresh host memory, not reused
        "host_page_faults_per_step": faults,
        "phases_s": {k: statistics.median(p[k] for p in phases) for k in PHASES},
        "host_syncs_per_step": runner.counted_step(),
        # Step 1 runs at adaLN-Zero init: the output is exactly zero, so its loss is the same for any
        # arithmetic; the later steps' losses carry the differences.
        "step_losses": [float(v) for v in losses],
        "first_step_loss": float(losses[0]) if losses else None,
        "dynamo": dynamo,
    }


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def forward_only(cfg: TrainConfig, batch: int, reps: int) -> dict:
    """Full-pass forward without grad of a plain model, against the same model with SDPA: for an
    attention backend that cannot train here (flex on CPU: no backward in torch 2.14)."""
    from mdt_ds.models import build_model

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    m = cfg.model
    torch.manual_seed(0)
    model = build_model(m).to(device).eval()
    sdpa = build_model(m, attention="sdpa").to(device).eval()
    sdpa.load_state_dict(model.state_dict())
    x = torch.randn(batch, m.in_channels, m.input_size, m.input_size, device=device)
    t, y = torch.zeros(batch, dtype=torch.long, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    out: dict = {}
    with torch.no_grad():
        for name, net in (("forward_only_s", model), ("sdpa_forward_only_s", sdpa)):
            ref = net(x, t, y)  # warm-up (flex compiles here)
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                net(x, t, y)
            sync(device)
            out[name] = (time.perf_counter() - start) / reps
            out.setdefault("outputs", []).append(ref)
    first, second = out.pop("outputs")
    out["max_abs_diff_vs_sdpa"] = (first - second).abs().max().item()
    return out


def run_variant(name: str, base: list[str], args: argparse.Namespace, env, peaks: dict) -> dict:
    """Build the variant's engine, time it, and derive img/s, MFU and memory."""
    cfg = apply_overrides(TrainConfig(), base + VARIANTS[name])
    out: dict = {"overrides": VARIANTS[name], "precision": cfg.precision, "attention": cfg.model.attention,
                 "compile": cfg.compile}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    heap = HeapPeak()  # the host's per-variant peak: max RSS spans the whole process
    try:
        with heap:
            runner = Runner(cfg, env.world_size, args.batch)
            out["compiled_blocks"] = runner.compiled_blocks()
            out.update(time_variant(runner, args))
    except (NotImplementedError, RuntimeError, ConfigError) as err:  # the engine refuses flex training on CPU
        if cfg.model.attention != "flex" or torch.cuda.is_available():
            raise
        # flex cannot train on CPU (no backward in torch 2.14): say so, time its forward instead
        out.update(train_step="unavailable", reason=f"{type(err).__name__}: {str(err)[:300]}")
        if args.quick:  # flex compiles its kernel on first use: tens of seconds on a CPU
            out["forward_only"] = "skipped in --quick (flex compiles on first use)"
        else:
            out["forward_only"] = guarded(lambda: forward_only(cfg, args.batch, max(1, args.steps)))
        return out
    images_s = args.batch * env.world_size / out["step_time_s"]
    macs = train_macs_per_image(runner.engine.module)
    spec, measured = peaks[cfg.precision]["spec_flops"], peaks[cfg.precision]["measured_flops"]
    out.update(
        images_per_s=images_s, train_gmac_per_image=macs / 1e9,
        mfu_spec=2 * macs * images_s / (spec * env.world_size),
        mfu_measured=2 * macs * images_s / (measured * env.world_size),
        process_max_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # every variant so far
    )
    if runner.device.type == "cuda" or heap.peak is None:
        out.update(peak_memory_gb=memory_gb(runner.device), memory_note="torch.cuda.max_memory_allocated"
                   if runner.device.type == "cuda" else "process max RSS (every variant so far)")
    else:
        # Its own allocations: an engine leaves ~0.9 GB (S/2) in use after it is deleted, so the
        # heap's level at a variant's start grows with every variant before it.
        out.update(peak_memory_gb=(heap.peak - heap.start) / 2**30, heap_at_start_gb=heap.start / 2**30,
                   memory_note="peak glibc heap in use (mallinfo2, sampled every 2 ms while this variant was "
                   "built and timed) minus the heap in use when it began: allocated bytes, as "
                   "torch.cuda.max_memory_allocated counts them, pages never touched included")
    if args.profile:
        out["profile"] = profile_steps(runner, 1 if args.quick else args.profile_steps,
                                       0 if args.quick else args.profile_warmup)
    del runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def profile_steps(runner: Runner, steps: int, warmup: int = 1) -> dict:
    """Share of self time in matmul-class ops (matmuls, attention kernels, convolutions) vs the
    rest, per training step profiled on its own: the rest is what fusion and fewer copies can
    remove. The median step's split is reported with each step's share (and host page faults)
    beside it. ``warmup`` profiled steps go first, unreported: the profiler's own allocations
    move the host heap's layout, and the next step or two fault fresh pages in (on a CPU, into
    DeepSpeed's gradient copies) that an unprofiled training step no longer touches."""
    for _ in range(warmup):
        profile_step(runner)
    splits = sorted((profile_step(runner) for _ in range(max(1, steps))), key=lambda r: r["non_matmul_share"])
    median = dict(splits[len(splits) // 2])
    median["non_matmul_share_per_step"] = [r["non_matmul_share"] for r in splits]
    median["host_page_faults_per_profiled_step"] = [r["host_page_faults"] for r in splits]
    # A profiled step can still fault a fresh 154 MB (S/2) gradient partition in where its
    # unprofiled neighbours fault nothing (host_page_faults_per_step of the timed steps): the
    # share of the steps that did not is the steady state's, reported beside the median of all.
    steady = [r["non_matmul_share"] for r in splits if r["host_page_faults"] < STEADY_STEP_FAULTS]
    median["non_matmul_share_fault_free"] = statistics.median(steady) if steady else None
    median["fault_free_profiled_steps"] = len(steady)
    median["profiled_steps"] = len(splits)
    median["profile_warmup_steps"] = warmup
    return median


def profile_step(runner: Runner) -> dict:
    """The matmul / non-matmul split of one training step."""
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    faults = minor_faults()
    with profile(activities=activities) as prof:
        runner.step()
        sync(runner.device)
    faults = minor_faults() - faults
    rows = []
    for evt in prof.key_averages():
        self_us = evt.self_device_time_total if cuda else evt.self_cpu_time_total
        if self_us > 0:
            rows.append((evt.key, self_us))
    total = sum(us for _, us in rows) or 1.0
    matmul = sum(us for k, us in rows if is_matmul(k))
    others = sorted(((k, us) for k, us in rows if not is_matmul(k)), key=lambda r: -r[1])[:12]
    largest = sorted(rows, key=lambda r: -r[1])[:12]
    return {
        "time_base": "self device time" if cuda else "self CPU time", "total_ms": total / 1e3,
        "matmul_share": matmul / total, "non_matmul_share": 1 - matmul / total,
        "top_ms": {k: us / 1e3 for k, us in largest},  # every op, matmuls included
        "top_non_matmul_ms": {k: us / 1e3 for k, us in others}, "host_page_faults": faults,
    }


def is_matmul(name: str) -> bool:
    return name in MATMUL_OPS or name.startswith("aten::_scaled_dot_product") or "convolution" in name \
        or name.startswith("aten::_flash_attention") or name.startswith("aten::_efficient_attention")


def ratios(variants: dict) -> dict:
    """time(b) / time(a) for the named pairs present; "best" is the fastest trained variant."""
    timed = {k: v["step_time_s"] for k, v in variants.items() if "step_time_s" in v}
    ours = {k: s for k, s in timed.items() if k != "release-like"}
    if ours:
        timed["best"] = min(ours.values())
    out = {name: timed[b] / timed[a] for name, (a, b) in RATIOS.items() if a in timed and b in timed}
    if ours:
        out["best_variant"] = min(ours, key=ours.get)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="MDTv2-S/2")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["bf16", "bf16-amp", "fp16", "fp32"])
    p.add_argument("--batch", type=int, default=8, help="micro-batch per process")
    p.add_argument("--ac", default="none", help="activation_checkpointing: none/encoder/all/N/'0,3,5'")
    p.add_argument("--optim", default="adan")
    p.add_argument("--variants", default=None, help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="profiler split of each trained variant's step")
    p.add_argument("--profile-steps", type=int, default=3,
                   help="steps profiled one at a time (the share moves from step to step on a shared VM)")
    p.add_argument("--profile-warmup", type=int, default=1,
                   help="profiled steps run first and not reported (the profiler's allocations move the heap)")
    p.add_argument("--release-src", type=Path, help="a checkout of sail-sg/MDT: time its model alternately")
    p.add_argument("--release-reps", type=int, default=3)
    p.add_argument("--release-compiled", action="store_true",
                   help="also time ours with compile=true (regional) in the model-only comparison")
    p.add_argument("--quick", action="store_true", help="Tiny preset, 1 step, no warm-up: a smoke test")
    p.add_argument("--override", action="append", default=[], help="extra dotted override (repeatable)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.warmup, args.batch, args.release_reps = "MDTv2-Tiny/2", 1, 1, 2, 1
    if args.variants is None:
        cuda = torch.cuda.is_available()
        args.variants = "eager,compile,flex,compile-flex,explicit,release-like" if cuda else \
            ("eager,flex,explicit,release-like" if args.quick else "eager,compile,flex,explicit,release-like")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    env = dist.init(use_deepspeed=True)
    base = [f"model.preset={args.preset}", f"zero_stage={args.zero_stage}", f"precision={args.precision}",
            f"global_batch={args.batch * env.world_size}", f"activation_checkpointing={args.ac}",
            f"optim.name={args.optim}", *args.override]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    peaks = {}
    for prec in {args.precision, "fp32"} if "release-like" in args.variants else {args.precision}:
        dtype = COMPUTE_DTYPES[prec]  # what the matmuls run in (bf16-amp: bf16 under autocast)
        measured = measured_peak(device, dtype, args.quick)
        spec, source = spec_peak(device, dtype, measured)
        peaks[prec] = {"spec_flops": spec, "spec_source": source, "measured_flops": measured}
    variants = {}
    for name in args.variants.split(","):
        try:
            variants[name] = run_variant(name, base, args, env, peaks)
        except Exception as err:  # noqa: BLE001 - one failed variant must not lose the others
            variants[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    report = header(args, env, device, base) | {"peaks": peaks, "variants": variants, "ratios": ratios(variants)}
    if args.release_src:
        cfg = apply_overrides(TrainConfig(), base + VARIANTS["eager"])
        report["release"] = guarded(lambda: release_comparison(cfg, args, device))
    if dist.is_main():
        text = json.dumps(report, indent=2, default=str)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
    dist.teardown()
    return report


def guarded(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - a report with the error beats no report
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def header(args: argparse.Namespace, env, device: torch.device, base: list[str]) -> dict:
    cfg = apply_overrides(TrainConfig(), base)
    from mdt_ds.models import build_model

    return {
        "benchmark": "train_step", "quick": args.quick, "preset": args.preset, "zero_stage": args.zero_stage,
        "precision": args.precision, "micro_batch": args.batch, "world_size": env.world_size,
        "activation_checkpointing": args.ac, "optim": args.optim, "overrides": base,
        "params": count_params(build_model(cfg.model, device="meta"))["all"],
        "steps": args.steps, "warmup": args.warmup, "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "timing": "median wall time per step after warm-up, device synchronised; phases from separate "
                  "steps with a sync between parts; MFU = 2 * train MACs/image * img/s / peak",
    }


if __name__ == "__main__":
    main()
