"""``make demo``: train a small MDTv2 on the embedded MNIST digits, then show and score it.

1. builds the embedded 16x16 MNIST shards (first use only; no download),
2. trains ``MDTv2-Demo/2`` with 2 processes under DeepSpeed ZeRO-2 (torchrun) for a fixed step
   count capped by a time budget (fp32: faster than bf16 on these CPUs, MACHINE_NOTES),
3. samples 20 digits per class from the EMA model (DDIM-50, CFG 2.0) into a PNG grid,
4. trains a small CNN on the training digits, checks it on the held-out split, and reports the
   conditional accuracy: the share of generated digits it assigns to their conditioning class.

    python -m mdt_ds.demo [--run-dir runs/demo] [--minutes 8] [--steps 1100] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mdt_ds.clihelp import HelpFormatter

DEMO_OVERRIDES = [
    # MDTv2-Demo/2 narrowed to hidden 96, depth 4 (0.96M parameters): on a 2-core AVX2 CPU it sees
    # ~2.5x more images in the budget than the 128/6 preset, which matters more than width here.
    "model.preset=MDTv2-Demo/2", "model.hidden_size=96", "model.depth=4", "data.source=mnist16", "data.num_workers=0", "data.shuffle_buffer=2000",
    "global_batch=32", "precision=fp32", "zero_stage=2", "optim.name=adamw", "optim.lr=2e-3",
    "optim.betas=[0.9,0.999]", "optim.weight_decay=0.0", "ema_decay=0.995", "ema_warmup=true", "log_every=25",
    "ckpt_every=250", "sample_every=250", "diffusion.cfg_scale=2.0",
]


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


def run_training(run_dir: Path, steps: int, minutes: float, nproc: int) -> None:
    from mdt_ds.dist import free_port

    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "mdt_ds.train", *DEMO_OVERRIDES,
        f"steps={steps}", f"time_budget_min={minutes}", f"run_dir={run_dir}",
    ]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def sample_and_score(run_dir: Path, per_class: int = 20) -> dict:
    from mdt_ds.config import TrainConfig, from_dict
    from mdt_ds.data.demo import load_heldout, load_train_arrays
    from mdt_ds.grids import sample_images
    from mdt_ds.sampling import save_grid, to_uint8
    from mdt_ds.tools.convert_checkpoint import load_state_dict_file

    snapshot = sorted((run_dir / "snapshots").glob("ema_*.pt"))[-1]
    cfg = from_dict(TrainConfig, json.loads((run_dir / "config.json").read_text()))
    start = time.time()
    images, labels = sample_images(cfg, load_state_dict_file(snapshot), per_class=per_class, steps=50, cfg_scale=2.0)
    sample_s = time.time() - start
    grid_path = run_dir / "demo_samples.png"
    save_grid(to_uint8(images), grid_path, nrow=per_class)
    train_x, train_y = load_train_arrays()
    held_x, held_y = load_heldout()
    net = train_classifier(train_x, train_y)
    return {
        "snapshot": str(snapshot), "grid": str(grid_path), "classifier_heldout_accuracy": accuracy(net, held_x, held_y),
        "conditional_accuracy": accuracy(net, images.clamp(-1, 1), labels), "samples": len(labels),
        "sampling_seconds": sample_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)
    from mdt_ds.data.demo import ensure_mnist_shards

    print(f"embedded data: {ensure_mnist_shards(variant='mnist16')}", flush=True)
    run_training(args.run_dir.resolve(), args.steps, args.minutes, args.nproc)
    report = sample_and_score(args.run_dir.resolve())
    (args.run_dir / "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    stats = [json.loads(x) for x in (args.run_dir / "stats.jsonl").read_text().splitlines()]
    print(
        f"\nDemo done: {Path(report['snapshot']).stem.split('_')[-1].lstrip('0')} steps, "
        f"last logged loss {stats[-1]['loss']:.4f}.\n"
        f"  conditional accuracy of generated digits: {report['conditional_accuracy']:.1%} "
        f"(classifier: {report['classifier_heldout_accuracy']:.1%} on held-out real digits)\n"
        f"  samples (10 classes x 20, EMA, DDIM-50, CFG 2): {report['grid']}\n"
        f"  checkpoints: {args.run_dir}/checkpoints, EMA snapshots: {args.run_dir}/snapshots\n"
        f"  training grids: {args.run_dir}/samples; TensorBoard: tensorboard --logdir {args.run_dir}/tensorboard\n"
        f"  report: {args.run_dir}/demo_report.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
