"""``make demo``: train a small MDTv2 on the embedded MNIST digits, then show and score it.

1. builds the embedded 16x16 MNIST shards (first use only; no download),
2. trains ``MDTv2-Demo/2`` (narrowed, see DEMO_OVERRIDES) with 2 processes under DeepSpeed ZeRO-2
   (torchrun) for a FIXED number of steps, so the result depends on the work done and not on the
   machine's speed; it prints a time estimate from the first steps, and a time budget only stops
   a run that is far too slow (loudly, and the report says so),
3. samples 20 digits per class from the EMA model (DDIM, CFG as DEMO_SAMPLER says) and again
   without guidance (CFG 1), trains a small CNN on the training digits, checks it on the held-out
   split, and reports the conditional accuracy: the share of generated digits it assigns to their
   conditioning class, overall and per class,
4. draws the labelled grid (green: classifier agrees) and a progress picture (training grids over
   the steps above the loss curve), and stores everything in ``run_dir/demo_report.json``.

Rerunning the same command resumes an interrupted run (or only re-scores a finished one).

    python -m mdt_ds.demo [--run-dir runs/demo] [--seed 0] [--steps N] [--minutes M] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mdt_ds.clihelp import HelpFormatter
from mdt_ds.demo_report import format_report, labelled_grid, loud, per_class_accuracy, progress_picture, read_stats

# Recipe tuned by measurement on a 2-core CPU (notes in README "Demo"): fixed work, not fixed time.
DEMO_STEPS = 1500
DEMO_BATCH = 64
LOG_EVERY = 25
DEMO_SAMPLER = {"name": "ddim", "steps": 50, "cfg_scale": 4.0}
DEMO_OVERRIDES = [
    # The preset's width and depth (128/6; the narrower 96/4 scored 17.5% where 128/6 scored 38%
    # at 38,400 images) with 4x4 patches: 16 tokens instead of 64 make a step 2.3x cheaper here,
    # and per image seen it learns about as fast (patch 2: 81.5% after 64,000 images in 9.4 min
    # of steps; patch 4: 71% at 64,000 and 96.5% at 128,000 images).
    "model.preset=MDTv2-Demo/2", "model.patch_size=4", "data.source=mnist16",
    "data.num_workers=0", "data.shuffle_buffer=2000", f"global_batch={DEMO_BATCH}", "precision=fp32",
    "zero_stage=2", "optim.name=adamw", "optim.lr=2e-3", "optim.betas=[0.9,0.999]", "optim.weight_decay=0.0",
    "ema_decay=0.995", "ema_warmup=true", f"log_every={LOG_EVERY}", "ckpt_every=500", "sample_every=250",
    f"diffusion.cfg_scale={DEMO_SAMPLER['cfg_scale']}",
]
# A safety stop, not the recipe: the fixed step count takes ~6.5 min here (2 AVX-512 cores); a
# slower machine stops with a checkpoint (rerun the command to continue) and says so loudly.
# 8.5 min of training keeps the whole demo (start-up, scoring) within 10 minutes.
DEFAULT_MINUTES = 8.5
PER_CLASS = 20


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 6, seed: int = 0) -> nn.Module:
    """A digit classifier for scoring samples (~98% on the held-out digits)."""
    torch.manual_seed(seed)
    net = small_cnn()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images), 128):
            idx = order[start : start + 128]
            loss = nn.functional.cross_entropy(net(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((net(images).argmax(1) == labels).float().mean())


def training_command(run_dir: Path, steps: int, minutes: float, nproc: int, seed: int) -> list[str]:
    """torchrun -> ``mdt_ds.train`` (the normal ``train(cfg)`` path) with the demo recipe."""
    from mdt_ds.dist import free_port

    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "mdt_ds.train", *DEMO_OVERRIDES,
        f"steps={steps}", f"time_budget_min={minutes}", f"seed={seed}", f"run_dir={run_dir}",
    ]


def estimate_seconds(seen: list[tuple[float, int]], steps: int) -> float | None:
    """Seconds from the first observation to step ``steps``, from ``(wall time, step)`` pairs
    observed as log lines appeared. The first pair is the reference, so start-up and the first
    (slow, warming) window stay out of the rate; None until two pairs span some steps."""
    if len(seen) < 2 or seen[-1][1] <= seen[0][1]:
        return None
    (t0, s0), (t1, s1) = seen[0], seen[-1]
    rate = (t1 - t0) / (s1 - s0)
    return (t1 - t0) + rate * max(0, steps - s1)


def _watch(proc: subprocess.Popen, stats_path: Path, steps: int, minutes: float, started: float) -> float | None:
    """Poll stats.jsonl while training runs; print one time estimate after a few logged windows
    (loudly if the safety stop will cut the run). Returns the estimated training seconds."""
    skip = len(read_stats(stats_path))  # a resumed run: lines before this launch say nothing of its speed
    seen: list[tuple[float, int]] = []
    estimate = None
    while proc.poll() is None:
        time.sleep(1.0)
        lines = read_stats(stats_path)[skip:]
        if lines and (not seen or int(lines[-1]["step"]) != seen[-1][1]):
            seen.append((time.time(), int(lines[-1]["step"])))
        if estimate is None and len(seen) >= 3:
            total = estimate_seconds(seen, steps)
            if total is not None:
                estimate = (seen[0][0] - started) + total
                print(f"\n[demo] time estimate: {steps} steps in ~{estimate / 60:.1f} min of training on this "
                      f"machine (from steps {seen[0][1]}-{seen[-1][1]}); safety stop at {minutes:g} min\n", flush=True)
                if estimate > 60 * minutes:
                    print(loud(f"this machine is slow for the demo: ~{estimate / 60:.1f} min > the {minutes:g}-min "
                               "safety stop.\nTraining will stop early and accuracy will be lower; rerun the same "
                               "command to continue,\nor pass --minutes to allow more time."), flush=True)
    return estimate


def run_training(run_dir: Path, steps: int, minutes: float, nproc: int, seed: int, threads: int) -> dict:
    """Train under torchrun, watching its progress; returns timing facts for the report."""
    cmd = training_command(run_dir, steps, minutes, nproc, seed)
    print("+ " + " ".join(cmd), flush=True)
    # One thread per process: 2 ranks on 2 cores; more oversubscribes and slows both.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.time()
    proc = subprocess.Popen(cmd, env=env)
    try:
        estimate = _watch(proc, run_dir / "stats.jsonl", steps, minutes, started)
    except BaseException:
        proc.terminate()  # Ctrl-C: let the ranks save and exit rather than orphan them
        proc.wait()
        raise
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return {"train_seconds": time.time() - started, "estimate_seconds": estimate}


def _classify(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(images.clamp(-1, 1)).argmax(1)


def sample_and_score(run_dir: Path, per_class: int = PER_CLASS, sampler: dict | None = None) -> dict:
    """Sample the newest EMA snapshot at the demo's CFG and at CFG 1, score both, draw the grid."""
    from mdt_ds.config import TrainConfig, from_dict
    from mdt_ds.data.demo import load_heldout, load_train_arrays
    from mdt_ds.grids import sample_images
    from mdt_ds.tools.convert_checkpoint import load_state_dict_file

    sampler = sampler or DEMO_SAMPLER
    snapshot = sorted((run_dir / "snapshots").glob("ema_*.pt"))[-1]
    cfg = from_dict(TrainConfig, json.loads((run_dir / "config.json").read_text()))
    state = load_state_dict_file(snapshot)
    net = train_classifier(*load_train_arrays())
    held_x, held_y = load_heldout()
    start = time.time()
    how = {"per_class": per_class, "steps": sampler["steps"], "sampler": sampler["name"]}
    images, labels = sample_images(cfg, state, cfg_scale=sampler["cfg_scale"], **how)
    plain, plain_labels = sample_images(cfg, state, cfg_scale=1.0, **how)
    sample_s = time.time() - start
    predicted, predicted_plain = _classify(net, images), _classify(net, plain)
    from mdt_ds.sampling import MIN_TILE

    grid = labelled_grid(images, labels.tolist(), (predicted == labels).tolist(), run_dir / "demo_samples.png",
                         per_class=per_class, scale=max(1, -(-MIN_TILE // images.shape[-1])))
    return {
        "snapshot": str(snapshot), "grid": str(grid), "samples": len(labels),
        "classifier_heldout_accuracy": accuracy(net, held_x, held_y),
        "conditional_accuracy": float((predicted == labels).float().mean()),
        "conditional_accuracy_cfg1": float((predicted_plain == plain_labels).float().mean()),
        "per_class_accuracy": per_class_accuracy(predicted, labels),
        "per_class_accuracy_cfg1": per_class_accuracy(predicted_plain, plain_labels),
        "sampling_seconds": sample_s,
    }


def recipe(cfg: dict, sampler: dict, threads: int) -> dict:
    """What a reader needs to reproduce the numbers, from the run's own config.json."""
    model = {k: cfg["model"][k] for k in ("preset", "input_size", "patch_size", "hidden_size", "depth",
                                          "num_heads", "decode_layer", "mask_ratio", "class_dropout_prob")}
    optim = {k: cfg["optim"][k] for k in ("name", "lr", "betas", "weight_decay", "grad_clip", "warmup_steps")}
    return {
        "model": model, "optim": optim, "data": cfg["data"]["source"], "global_batch": cfg["global_batch"],
        "precision": cfg["precision"], "zero_stage": cfg["zero_stage"], "ema_decay": cfg["ema_decay"],
        "ema_warmup": cfg["ema_warmup"], "cfg_pow": cfg["diffusion"]["cfg_pow"],
        "sampler": dict(sampler), "omp_threads_per_process": threads,
    }


def build_report(run_dir: Path, args: argparse.Namespace, timing: dict, scores: dict, total: float) -> dict:
    """demo_report.json: accuracies, steps, images, times, seed, recipe and the pictures."""
    cfg = json.loads((run_dir / "config.json").read_text())
    stats = read_stats(run_dir / "stats.jsonl")
    # The final snapshot names the step reached: a safety stop ends between logged steps.
    done = int(Path(scores["snapshot"]).stem.split("_")[-1])
    return {
        "seed": args.seed, "steps_planned": args.steps, "steps_done": done,
        "images_seen": done * int(cfg["global_batch"]), "stopped_by_time_budget": done < args.steps,
        "time_budget_min": args.minutes, "last_loss": stats[-1]["loss"] if stats else None,
        **scores, "train_seconds": timing["train_seconds"],
        "estimate_seconds": timing["estimate_seconds"] or timing["train_seconds"], "total_seconds": total,
        "nproc": args.nproc, "recipe": recipe(cfg, DEMO_SAMPLER, args.threads),
        "progress": str(run_dir / "demo_progress.png"),
    }


def latest_snapshot(run_dir: Path) -> str | None:
    """The newest EMA snapshot's name: unchanged by a launch that trained no step."""
    found = sorted((run_dir / "snapshots").glob("ema_*.pt"))
    return found[-1].name if found else None


# What a launch that trained nothing cannot measure: it keeps these from the run that did the work.
TRAINING_FACTS = ("train_seconds", "estimate_seconds", "total_seconds")


def keep_training_facts(report: dict, earlier: Path) -> dict:
    """A rerun of a finished demo (training a no-op) re-scores: the new scores, with the timings
    of the launch that trained, from ``earlier`` (demo_report.json) when it reports the same step;
    ``rescore_seconds`` is this launch's time."""
    try:
        old = json.loads(earlier.read_text())
    except (OSError, ValueError):
        return report
    if old.get("steps_done") != report["steps_done"] or not all(k in old for k in TRAINING_FACTS):
        return report
    return {**report, **{k: old[k] for k in TRAINING_FACTS}, "rescore_seconds": report["total_seconds"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mdt_ds.demo", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"),
                        help="the training run's folder; rerunning resumes it (or only re-scores a finished one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training run and of its samples")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS, help="training steps (the recipe's work)")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help="safety stop for training (minutes); the run is sized by --steps")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (torchrun --nproc_per_node)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    parser.add_argument("--per-class", type=int, default=PER_CLASS, help="scored samples per class")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mdt_ds.data.demo import ensure_mnist_shards

    started = time.time()
    run_dir = args.run_dir.resolve()
    print(f"embedded data: {ensure_mnist_shards(variant='mnist16')}", flush=True)
    before = latest_snapshot(run_dir)
    timing = run_training(run_dir, args.steps, args.minutes, args.nproc, args.seed, args.threads)
    scores = sample_and_score(run_dir, per_class=args.per_class)
    progress_picture(run_dir / "samples", run_dir / "stats.jsonl", run_dir / "demo_progress.png")
    report = build_report(run_dir, args, timing, scores, time.time() - started)
    if before is not None and latest_snapshot(run_dir) == before:  # already finished: nothing trained now
        report = keep_training_facts(report, run_dir / "demo_report.json")
    (run_dir / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + format_report(report))
    print(f"  checkpoints: {run_dir}/checkpoints, EMA snapshots: {run_dir}/snapshots\n"
          f"  TensorBoard: tensorboard --logdir {run_dir}/tensorboard\n  report: {run_dir}/demo_report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
