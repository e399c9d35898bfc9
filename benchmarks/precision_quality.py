"""Training precision against sample quality: should ``precision=bf16`` mean DeepSpeed's pure-bf16
mode ("bf16": bf16 parameters and activations, fp32 master weights) or bf16 autocast over fp32
parameters ("bf16-amp")? The official MDT release trains in fp32, the reference here.

Four measurements, one JSON (sections merge into an existing ``--out``, so parts can run apart):

``demo``: for each precision and seed, the demo recipe (mdt_ds.demo: 2 processes, its fixed
  steps, ``precision=`` and ``log_every=1`` appended, a 120-min safety stop that never cuts a
  run), then the final EMA snapshot scored with the SAME sampling seeds for every run
  (``--sample-seed``): conditional accuracy of the demo classifier (DDIM 50, CFG 4, 20 per
  class) and a Fréchet distance on that classifier's 128-d features against the 500 held-out
  digits (benchmarks/sampler_quality.py; NOT an FID). Also the final loss (mean of the last 100
  logged steps), training seconds, and each precision's paired difference from the fp32 run of
  the same seed. A run dir with its final snapshot is reused, a partial one resumed, so rerunning
  the command continues. With seeds beyond 0-2 the 0-2 summaries are kept beside the full ones.
``sampling``: each fp32-trained demo run sampled with autocast "none" and "bf16" (same seeds).
``noise``: each fp32-trained run scored with other image seeds (``--noise-sample-seeds``): how
  much accuracy and FD move from sampling alone, at fixed weights.
``s2``: MDTv2-S/2 on the embedded 32x32 digits (mnist32: in_channels 1, 10 classes), one
  process, micro-batch 8, ``--s2-steps`` steps, seed 0 (same data order), log_every 1: the loss
  of every step per precision and its difference from fp32.

    export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 MDT_DS_DATA=$PWD/.cache/data \\
        TORCH_EXTENSIONS_DIR=$PWD/.torch_extensions
    python benchmarks/precision_quality.py --parts demo,sampling,noise --seeds 0,1,2,3,4 \\
        --root runs/precision --out docs/precision_quality.json
    python benchmarks/precision_quality.py --parts s2 --s2-steps 35 --s2-threads 1 \\
        --root runs/precision --out docs/precision_quality.json --plot docs/precision_quality.png
    python benchmarks/precision_quality.py --replot docs/precision_quality.json --plot docs/precision_quality.png

Std is the sample standard deviation (ddof 1) over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRECISIONS = ("fp32", "bf16", "bf16-amp")
COLOURS = {"fp32": "tab:blue", "bf16": "tab:red", "bf16-amp": "tab:green"}
SEEDS = (0, 1, 2)
LOSS_TAIL = 100  # final loss: mean of the last LOSS_TAIL logged steps
SAFETY_MINUTES = 120.0  # the demo's time-budget stop, set far beyond any run here
S2_OVERRIDES = [
    "model.preset=MDTv2-S/2", "model.in_channels=1", "model.num_classes=10", "model.input_size=32",
    "data.source=mnist32", "data.num_workers=0", "global_batch=8", "micro_batch=8", "log_every=1",
    "ckpt_every=100000", "sample_every=0", "seed=0",
]


# --------------------------------------------------------------------------- small pure helpers
def mean_std(values: list[float]) -> dict:
    """Mean, sample std (ddof 1; 0 for one value) and the values themselves."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def loss_tail(stats: list[dict], tail: int = LOSS_TAIL) -> float | None:
    """Mean loss of the last ``tail`` logged steps (None without any)."""
    losses = [float(s["loss"]) for s in stats if "loss" in s][-tail:]
    return statistics.fmean(losses) if losses else None


def curve_differences(curves: dict[str, list[float]], reference: str = "fp32") -> dict:
    """Per precision: the step-wise difference from the reference curve, its mean and max |.|,
    and the relative difference of the last 10 steps' mean."""
    ref = curves[reference]
    out = {}
    for name, curve in curves.items():
        if name == reference:
            continue
        n = min(len(ref), len(curve))
        diff = [curve[i] - ref[i] for i in range(n)]
        tail_ref, tail = statistics.fmean(ref[n - 10:n]), statistics.fmean(curve[n - 10:n])
        out[name] = {
            "per_step": [round(d, 6) for d in diff],
            "mean_abs": statistics.fmean(abs(d) for d in diff),
            "max_abs": max(abs(d) for d in diff),
            "mean_signed": statistics.fmean(diff),
            "last10_relative": (tail - tail_ref) / tail_ref,
        }
    return out


def final_snapshot(run_dir: Path, steps: int) -> Path | None:
    """The EMA snapshot of step ``steps`` if the run got there."""
    path = run_dir / "snapshots" / f"ema_{steps:07d}.pt"
    return path if path.is_file() else None


def read_stats(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def machine_facts() -> dict:
    """CPU model, the bf16-relevant ISA flags, core count, library versions, date."""
    import deepspeed
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {
        "cpu_model": fields.get("Model name", platform.processor()).strip(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": sorted(f for f in flags if f.startswith("amx")) or False,
        "cpus": os.cpu_count(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- training
def launch(cmd: list[str], log_path: Path, threads: int) -> float:
    """Run one training command with its output in ``log_path``; returns wall seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.time()
    with open(log_path, "a") as log:
        log.write("+ " + " ".join(cmd) + "\n")
        log.flush()
        result = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"training failed (exit {result.returncode}); see {log_path}")
    return time.time() - started


def record_launch(timing_path: Path, seconds: float) -> float:
    """Append one launch's wall seconds to the run's timing file; returns the total so far."""
    launches = json.loads(timing_path.read_text()) if timing_path.is_file() else []
    launches.append(round(seconds, 1))
    timing_path.write_text(json.dumps(launches) + "\n")
    return sum(launches)


def train_demo(root: Path, precision: str, seed: int, steps: int) -> dict:
    """One demo-recipe run (resumed or reused), its losses and times."""
    from mdt_ds.demo import training_command

    name = f"demo-{precision}-s{seed}"
    run_dir = (root / name).resolve()
    timing_path = root / "logs" / f"{name}.seconds.json"
    if final_snapshot(run_dir, steps) is None:
        cmd = training_command(run_dir, steps, SAFETY_MINUTES, 2, seed) + [f"precision={precision}", "log_every=1"]
        print(f"[precision] training {name}", flush=True)
        record_launch(timing_path, launch(cmd, root / "logs" / f"{name}.log", threads=1))
    snapshot = final_snapshot(run_dir, steps)
    if snapshot is None:
        raise SystemExit(f"{run_dir}: no snapshot of step {steps} after training; see {root}/logs/{name}.log")
    stats = read_stats(run_dir / "stats.jsonl")
    return {
        "precision": precision, "seed": seed, "run_dir": str(run_dir), "snapshot": str(snapshot),
        "final_loss": loss_tail(stats), "logged_steps": len(stats),
        "train_seconds": sum(json.loads(timing_path.read_text())) if timing_path.is_file() else None,
        "step_seconds": sum(float(s.get("step_time", 0.0)) for s in stats),
    }


# --------------------------------------------------------------------------- scoring
class Scorer:
    """The demo classifier and the held-out digits' feature statistics, built once."""

    def __init__(self) -> None:
        from benchmarks.sampler_quality import features
        from mdt_ds.data.demo import load_heldout, load_train_arrays
        from mdt_ds.demo import accuracy, train_classifier
        from mdt_ds.metrics.stats import compute_statistics

        self.features = features
        self.net = train_classifier(*load_train_arrays())
        held_x, held_y = load_heldout()
        self.heldout_accuracy = accuracy(self.net, held_x, held_y)
        self.reference = compute_statistics(features(self.net, held_x)[0])

    def score(self, run_dir: Path, snapshot: Path, sample_seed: int, per_class: int, autocast: str = "none") -> dict:
        """Sample the snapshot (demo sampler, image seeds from ``sample_seed``) and score it."""
        from mdt_ds.config import TrainConfig, from_dict
        from mdt_ds.demo import DEMO_SAMPLER
        from mdt_ds.grids import sample_images
        from mdt_ds.metrics.stats import compute_statistics, frechet_distance
        from mdt_ds.tools.convert_checkpoint import load_state_dict_file

        cfg = from_dict(TrainConfig, json.loads((run_dir / "config.json").read_text()))
        cfg = dataclasses.replace(cfg, seed=sample_seed)  # image_seed(cfg.seed, i): one set for every run
        start = time.perf_counter()
        images, labels = sample_images(cfg, load_state_dict_file(snapshot), per_class=per_class,
                                       steps=DEMO_SAMPLER["steps"], cfg_scale=DEMO_SAMPLER["cfg_scale"],
                                       sampler=DEMO_SAMPLER["name"], autocast=autocast)
        seconds = time.perf_counter() - start
        feats, predicted = self.features(self.net, images)
        mu, sigma = compute_statistics(feats)
        return {
            "conditional_accuracy": round(float((predicted == labels).float().mean()), 4),
            "frechet_distance": round(frechet_distance(mu, sigma, *self.reference, method="eigh"), 3),
            "images": len(labels), "sampling_seconds": round(seconds, 1),
        }


def summarise(runs: list[dict]) -> dict:
    """Per precision: accuracy, FD, final loss and train seconds as mean/std/values over seeds."""
    out = {}
    for precision in PRECISIONS:
        mine = sorted((r for r in runs if r["precision"] == precision), key=lambda r: r["seed"])
        if not mine:
            continue
        out[precision] = {"seeds": [r["seed"] for r in mine]} | {
            key: mean_std([r[key] for r in mine if r.get(key) is not None])
            for key in ("conditional_accuracy", "frechet_distance", "final_loss", "train_seconds", "step_seconds")
        }
    return out


def paired_differences(runs: list[dict], reference: str = "fp32") -> dict:
    """Per precision: (run - the reference run of the same seed) for accuracy and FD, over seeds."""
    ref = {r["seed"]: r for r in runs if r["precision"] == reference}
    out = {}
    for precision in PRECISIONS:
        mine = sorted((r for r in runs if r["precision"] == precision and r["seed"] in ref), key=lambda r: r["seed"])
        if precision == reference or not mine:
            continue
        out[precision] = {"seeds": [r["seed"] for r in mine]} | {
            key: mean_std([r[key] - ref[r["seed"]][key] for r in mine])
            for key in ("conditional_accuracy", "frechet_distance", "final_loss")
        }
    return out


def demo_summaries(runs: list[dict]) -> dict:
    """Summary and paired differences over every seed run, and over seeds 0-2 alone when more ran."""
    out = {"summary": summarise(runs), "paired_vs_fp32": paired_differences(runs)}
    first = [r for r in runs if r["seed"] in SEEDS]
    if len(first) < len(runs):
        out |= {"summary_seeds_0_1_2": summarise(first), "paired_vs_fp32_seeds_0_1_2": paired_differences(first)}
    return out


def demo_part(args: argparse.Namespace, scorer: Scorer, save=lambda part: None) -> dict:
    """Train (or reuse) and score every precision x seed; ``save`` gets the part after each run."""
    runs: list[dict] = []
    for seed in args.seeds:
        for precision in args.precisions:
            run = train_demo(args.root, precision, seed, args.steps)
            run.update(scorer.score(Path(run["run_dir"]), Path(run["snapshot"]), args.sample_seed, args.per_class))
            print(json.dumps(run), flush=True)
            runs.append(run)
            part = {"runs": runs, **demo_summaries(runs), "classifier_heldout_accuracy": scorer.heldout_accuracy}
            save(part)
    return part


def sampling_part(args: argparse.Namespace, scorer: Scorer) -> dict:
    """fp32-trained runs sampled in fp32 and under bf16 autocast, the same image seeds."""
    rows = []
    for seed in args.seeds:
        run_dir = (args.root / f"demo-fp32-s{seed}").resolve()
        snapshot = final_snapshot(run_dir, args.steps)
        if snapshot is None:
            print(f"[precision] sampling: {run_dir} has no final snapshot; run --parts demo first", flush=True)
            continue
        for autocast in ("none", "bf16"):
            rows.append({"seed": seed, "autocast": autocast,
                         **scorer.score(run_dir, snapshot, args.sample_seed, args.per_class, autocast)})
            print(json.dumps(rows[-1]), flush=True)
    summary = {a: {k: mean_std([r[k] for r in rows if r["autocast"] == a])
                   for k in ("conditional_accuracy", "frechet_distance", "sampling_seconds")}
               for a in ("none", "bf16") if any(r["autocast"] == a for r in rows)}
    return {"trained_in": "fp32", "rows": rows, "summary": summary}


def noise_part(args: argparse.Namespace, scorer: Scorer) -> dict:
    """Sampling noise at fixed weights: each fp32 run's snapshot scored with other image seeds
    (``--noise-sample-seeds``, plus ``--sample-seed``), the std over those per run."""
    rows, per_run = [], {}
    for seed in args.seeds:
        run_dir = (args.root / f"demo-fp32-s{seed}").resolve()
        snapshot = final_snapshot(run_dir, args.steps)
        if snapshot is None:
            continue
        mine = []
        for sample_seed in [args.sample_seed, *args.noise_sample_seeds]:
            mine.append({"seed": seed, "sample_seed": sample_seed,
                         **scorer.score(run_dir, snapshot, sample_seed, args.per_class)})
            print(json.dumps(mine[-1]), flush=True)
        rows += mine
        per_run[seed] = {k: mean_std([r[k] for r in mine]) for k in ("conditional_accuracy", "frechet_distance")}
    within = {k: statistics.fmean(v[k]["std"] for v in per_run.values()) for k in ("conditional_accuracy",
              "frechet_distance")} if per_run else {}
    return {"trained_in": "fp32", "rows": rows, "per_run": per_run, "mean_within_run_std": within}


def s2_part(args: argparse.Namespace) -> dict:
    """MDTv2-S/2 loss curves, one process, same seed and data order per precision."""
    from mdt_ds.data.demo import ensure_mnist_shards

    ensure_mnist_shards(variant="mnist32")
    curves, seconds = {}, {}
    for precision in PRECISIONS:
        run_dir = (args.root / f"s2-{precision}").resolve()
        stats = read_stats(run_dir / "stats.jsonl")
        if len(stats) < args.s2_steps:
            cmd = [sys.executable, "-m", "mdt_ds.train", *S2_OVERRIDES, f"steps={args.s2_steps}",
                   f"precision={precision}", f"run_dir={run_dir}"]
            print(f"[precision] S/2 loss curve, {precision}", flush=True)
            launch(cmd, args.root / "logs" / f"s2-{precision}.log", threads=args.s2_threads)
            stats = read_stats(run_dir / "stats.jsonl")
        curves[precision] = [float(s["loss"]) for s in stats[: args.s2_steps]]
        # step 1 warms up (allocation, oneDNN kernels): left out of the per-step median
        seconds[precision] = statistics.median(float(s["step_time"]) for s in stats[1: args.s2_steps])
    return {
        "overrides": S2_OVERRIDES + [f"steps={args.s2_steps}"], "omp_threads": args.s2_threads,
        "losses": curves, "differences_from_fp32": curve_differences(curves),
        "median_step_seconds": seconds,
    }


def s2_data_check() -> dict:
    """The mnist32 manifest's sample shape against the S/2 overrides (in_channels 1, input 32)."""
    from mdt_ds.data.demo import ensure_mnist_shards
    from mdt_ds.data.shards import manifest_layout, read_manifest

    layout = manifest_layout(read_manifest(ensure_mnist_shards(variant="mnist32")))
    fits = layout.kind == "pixels" and tuple(layout.shape) == (1, 32, 32)
    return {"source": "mnist32", "kind": layout.kind, "shape": list(layout.shape), "dtype": layout.dtype,
            "fits_overrides": fits}


# --------------------------------------------------------------------------- plot
def _seed_points(ax, summary: dict, key: str) -> None:
    """One column per precision: the seeds as points, the mean as a bar-less black tick."""
    names = [p for p in PRECISIONS if p in summary]
    for x, name in enumerate(names):
        values = summary[name][key]["values"]
        ax.scatter([x] * len(values), values, color=COLOURS[name], s=40, zorder=3)
        for seed, v in zip(summary[name]["seeds"], values):
            ax.annotate(f"s{seed}", (x, v), fontsize=7, xytext=(6, -3), textcoords="offset points")
        mean = summary[name][key]["mean"]
        ax.plot([x - 0.2, x + 0.2], [mean, mean], color="black", linewidth=2)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.grid(alpha=0.3, axis="y")


def _curves(ax_loss, ax_diff, s2: dict) -> None:
    for name, curve in s2["losses"].items():
        ax_loss.plot(range(1, len(curve) + 1), curve, color=COLOURS[name], label=name, linewidth=1.2)
    for name, diff in s2["differences_from_fp32"].items():
        ax_diff.plot(range(1, len(diff["per_step"]) + 1), diff["per_step"], color=COLOURS[name], label=name)
    ax_diff.axhline(0.0, color=COLOURS["fp32"], linewidth=0.8)
    ax_loss.set(xlabel="step", ylabel="loss")
    ax_diff.set(xlabel="step", ylabel="loss - fp32 loss")
    ax_loss.set_title("MDTv2-S/2 loss (mnist32, batch 8, 1 process, seed 0)", fontsize=9)
    ax_diff.set_title("MDTv2-S/2: loss difference from fp32, per step", fontsize=9)
    for ax in (ax_loss, ax_diff):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def _sampling(axes, sampling: dict) -> None:
    """Accuracy and FD of each fp32-trained run sampled in fp32 and under bf16 autocast, one line per seed."""
    for ax, key in zip(axes, ("conditional_accuracy", "frechet_distance")):
        for seed in sorted({r["seed"] for r in sampling["rows"]}):
            pair = sorted((r for r in sampling["rows"] if r["seed"] == seed), key=lambda r: r["autocast"] != "none")
            ax.plot(range(len(pair)), [r[key] for r in pair], marker="o", label=f"seed {seed}")
        ax.set_xticks([0, 1], ["sampled fp32", "sampled bf16 autocast"])
        ax.set_xlim(-0.4, 1.4)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    axes[0].set_title("fp32-trained runs: accuracy by sampling precision", fontsize=9)
    axes[1].set_title("fp32-trained runs: Fréchet distance by sampling precision", fontsize=9)


def plot(report: dict, path: Path) -> Path:
    """Top: accuracy, FD, final loss, train time per precision (seeds as points). Bottom: bf16
    sampling of the fp32 runs, the S/2 loss curves and their difference from fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax in axes.flat:
        ax.axis("off")
    demo = report.get("demo")
    if demo:
        titles = {"conditional_accuracy": "demo: conditional accuracy (higher is better)",
                  "frechet_distance": "demo: Fréchet distance, classifier features (lower is better)",
                  "final_loss": f"demo: final loss (mean of last {LOSS_TAIL} steps)",
                  "train_seconds": "demo: training wall seconds (shared 2-core CPU)"}
        for ax, (key, title) in zip(axes[0], titles.items()):
            ax.axis("on")
            _seed_points(ax, demo["summary"], key)
            ax.set_title(title, fontsize=9)
    if report.get("sampling", {}).get("rows"):
        for ax in axes[1, :2]:
            ax.axis("on")
        _sampling(axes[1, :2], report["sampling"])
    if report.get("s2"):
        for ax in axes[1, 2:]:
            ax.axis("on")
        _curves(axes[1, 2], axes[1, 3], report["s2"])
    fig.suptitle("Training precision vs quality (black ticks: mean over seeds; "
                 f"{report.get('machine', {}).get('cpu_model', '')})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mdt_ds.demo import DEMO_STEPS, PER_CLASS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="demo,sampling,noise,s2", help="comma list of demo, sampling, noise, s2")
    parser.add_argument("--root", type=Path, default=Path("runs/precision"), help="run directories go here")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="demo training steps (the recipe's)")
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="scored samples per digit")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the image seeds, for every run")
    parser.add_argument("--noise-sample-seeds", default="1,2", help="extra image seeds of the noise part")
    parser.add_argument("--s2-steps", type=int, default=35)
    parser.add_argument("--s2-threads", type=int, default=2, help="OMP_NUM_THREADS of the one S/2 process")
    parser.add_argument("--out", type=Path, default=Path("docs/precision_quality.json"))
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--replot", type=Path, help="only draw --plot from this earlier --out JSON")
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = set(args.parts) - {"demo", "sampling", "noise", "s2"}
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; use demo, sampling, noise, s2")
    args.precisions = [p for p in args.precisions.split(",") if p]
    if set(args.precisions) - set(PRECISIONS):
        parser.error(f"--precisions: use some of {PRECISIONS}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.noise_sample_seeds = [int(s) for s in args.noise_sample_seeds.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.replot:
        report = json.loads(args.replot.read_text())
        plot(report, args.plot or args.replot.with_suffix(".png"))
        return report
    from mdt_ds.data.demo import ensure_mnist_shards
    from mdt_ds.demo import DEMO_OVERRIDES, DEMO_SAMPLER

    report = json.loads(args.out.read_text()) if args.out.is_file() else {"benchmark": "precision_quality"}
    report["machine"] = machine_facts()
    report["recipe"] = {
        "demo_overrides": DEMO_OVERRIDES, "appended": ["precision=<p>", "log_every=1"], "steps": args.steps,
        "nproc": 2, "omp_threads_per_process": 1, "time_budget_min": SAFETY_MINUTES, "sampler": DEMO_SAMPLER,
        "per_class": args.per_class, "sample_seed": args.sample_seed, "final_loss": f"mean of last {LOSS_TAIL} steps",
        "std": "sample std (ddof 1) over seeds", "frechet_distance": "demo classifier's 128-d features vs 500 "
        "held-out digits (not an FID)",
    }
    ensure_mnist_shards(variant="mnist16")
    scorer = Scorer() if {"demo", "sampling", "noise"} & set(args.parts) else None

    def save(key: str, value: dict) -> None:  # after each run and part: partial results survive
        report[key] = value
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    for part in args.parts:
        if part == "demo":
            save("demo", demo_part(args, scorer, lambda value: save("demo", value)))
        elif part == "sampling":
            save("sampling", sampling_part(args, scorer))
        elif part == "noise":
            save("sampling_noise", noise_part(args, scorer))
        else:
            save("s2", {"data": s2_data_check(), **s2_part(args)})
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
