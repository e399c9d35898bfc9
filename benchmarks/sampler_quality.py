"""Sample quality per network call on the demo task: each sampler setting's conditional accuracy
(the demo's classifier), a Fréchet distance on that classifier's 128-d penultimate features
against the 500 held-out digits, network calls per image and images/s.

    python -m mdt_ds.demo                          # a trained demo run (runs/demo) first
    python benchmarks/sampler_quality.py --run-dir runs/demo --out benchmarks/sampler_quality.json \\
        --plot docs/sampler_quality.png

Every row samples the same N images (``--per-class`` per digit, the same per-image seeds and
classes), so rows differ only by the sampler. The distance is NOT an FID: the features are a
small CNN's, N is a few hundred, and the digits are 16x16 MNIST; it ranks samplers on this task
only. Paper-comparable FID needs the release protocol (DDPM-250 on 50K images, ADM suite).

``--configs`` lists SAMPLER+STEPS[:LO-HI] items (guidance interval in original timesteps); the
CFG scale is ``--cfg-scale`` for every row (default: the demo's).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdt_ds.config import TrainConfig, from_dict  # noqa: E402
from mdt_ds.demo import DEMO_SAMPLER, train_classifier  # noqa: E402
from mdt_ds.metrics.stats import compute_statistics, frechet_distance  # noqa: E402

DEFAULT_INTERVAL = "0-500"  # with power-cosine (pow 4) w(t) < 1.03 above t = 500: the calls buy little
DEFAULT_CONFIGS = ",".join(
    f"{spec}{suffix}" for spec in ("ddpm250", "ddim50", "ddim25", "dpm++2m20", "dpm++2m10", "heun10")
    for suffix in ("", f":{DEFAULT_INTERVAL}")
)


def parse(item: str) -> tuple[str, int, list[int] | None]:
    match = re.fullmatch(r"(ddpm|ddim|dpm\+\+2m|heun)(\d+)(?::(\d+)-(\d+))?", item)
    if match is None:
        raise SystemExit(f"--configs item {item!r}: expected SAMPLER+STEPS[:LO-HI], e.g. dpm++2m10:0-700")
    interval = [int(match.group(3)), int(match.group(4))] if match.group(3) else None
    return match.group(1), int(match.group(2)), interval


@torch.no_grad()
def features(net: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(penultimate 128-d features, predicted classes) of [-1, 1] digits."""
    images = images.clamp(-1, 1)
    feats = net[:-1](images)
    return feats.double().numpy(), net[-1](feats).argmax(1)


def measure(cfg: TrainConfig, state: dict, net, ref_stats, item: str, per_class: int, cfg_scale: float) -> dict:
    from mdt_ds.grids import sample_images

    sampler, steps, interval = parse(item)
    stats: dict = {}
    start = time.perf_counter()
    images, labels = sample_images(cfg, state, per_class=per_class, steps=steps, cfg_scale=cfg_scale,
                                   sampler=sampler, cfg_interval=interval or [], stats=stats)
    seconds = time.perf_counter() - start
    feats, predicted = features(net, images)
    mu, sigma = compute_statistics(feats)
    return {
        "config": item, "sampler": sampler, "steps": steps, "cfg_interval": interval, "cfg_scale": cfg_scale,
        "images": len(labels),
        "conditional_accuracy": round(float((predicted == labels).float().mean()), 4),
        "frechet_distance": round(frechet_distance(mu, sigma, *ref_stats, method="eigh"), 3),
        "network_calls_per_image": stats["network_calls_per_image"],
        "images_per_second": round(len(labels) / seconds, 2),
    }


def plot(rows: list[dict], path: Path) -> Path:
    """Accuracy and Fréchet distance against network calls per image (log scale): one colour per
    sampler, filled with guidance on every step, hollow with guidance only on the interval, each
    point labelled with its step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"ddpm": "tab:red", "ddim": "tab:blue", "dpm++2m": "tab:green", "heun": "tab:purple"}
    for ax, key in zip(axes, ("conditional_accuracy", "frechet_distance")):
        for sampler, colour in colours.items():
            for limited in (False, True):
                series = sorted((r for r in rows if r["sampler"] == sampler and bool(r["cfg_interval"]) == limited),
                                key=lambda r: r["network_calls_per_image"])
                if not series:
                    continue
                xs, ys = [r["network_calls_per_image"] for r in series], [r[key] for r in series]
                ax.plot(xs, ys, color=colour, marker="o", markersize=7, linestyle=":" if limited else "-",
                        markerfacecolor="none" if limited else colour)
                if not limited:
                    for r in series:
                        ax.annotate(str(r["steps"]), (r["network_calls_per_image"], r[key]), fontsize=7,
                                    xytext=(5, 4), textcoords="offset points", color=colour)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([10, 20, 50, 100, 200, 500, 1000]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("network calls per image (log scale)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("conditional accuracy (demo classifier)")
    axes[1].set_ylabel("Fréchet distance on classifier features (lower is better)")
    handles = [Line2D([], [], color=c, marker="o", label=name) for name, c in colours.items()
               if any(r["sampler"] == name for r in rows)]
    handles.append(Line2D([], [], color="grey", marker="o", markerfacecolor="none", linestyle=":",
                          label="guidance only on the interval"))
    axes[1].legend(handles=handles, fontsize=8)
    n = rows[0]["images"] if rows else 0
    fig.suptitle(f"Sample quality per network call on the demo task: {n} images per row, CFG "
                 f"{rows[0]['cfg_scale'] if rows else ''}; numbers: sampler steps", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    parser.add_argument("--per-class", type=int, default=50, help="images per digit in every row")
    parser.add_argument("--cfg-scale", type=float, default=DEMO_SAMPLER["cfg_scale"])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--replot", type=Path, help="only draw --plot from this earlier --out JSON")
    args = parser.parse_args(argv)
    if args.replot:
        report = json.loads(args.replot.read_text())
        report["plot"] = str(plot(report["rows"], args.plot or args.replot.with_suffix(".png")))
        return report
    from mdt_ds.data.demo import load_heldout, load_train_arrays
    from mdt_ds.tools.convert_checkpoint import load_state_dict_file

    snapshots = sorted((args.run_dir / "snapshots").glob("ema_*.pt"))
    if not snapshots:
        raise SystemExit(f"{args.run_dir}: no EMA snapshot; train the demo first (python -m mdt_ds.demo)")
    cfg = from_dict(TrainConfig, json.loads((args.run_dir / "config.json").read_text()))
    state = load_state_dict_file(snapshots[-1])
    net = train_classifier(*load_train_arrays())
    held_x, _ = load_heldout()
    ref_stats = compute_statistics(features(net, held_x)[0])
    rows = []
    for item in args.configs.split(","):
        rows.append(measure(cfg, state, net, ref_stats, item, args.per_class, args.cfg_scale))
        print(json.dumps(rows[-1]), flush=True)
    report = {
        "benchmark": "sampler_quality", "snapshot": str(snapshots[-1]), "reference": f"{len(held_x)} held-out digits",
        "features": "demo classifier, 128-d penultimate layer", "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        report["plot"] = str(plot(rows, args.plot))
    return report


if __name__ == "__main__":
    main()
