"""The demo's pictures and report: a labelled sample grid (one row per class, each sample framed
green where the classifier agrees with its class, red where not), a progress picture (the
fixed-seed training grids side by side over the steps, above the loss curve), and the
accuracies the report stores. PIL only: matplotlib is not a dependency."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

AGREE = (40, 180, 60)
DISAGREE = (220, 40, 40)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont:
    # Pillow >= 10.1 scales its built-in font when FreeType is there; older ones have one size.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _rgb(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 NHWC RGB from uint8 NHWC or float [-1, 1] NCHW."""
    if isinstance(images, torch.Tensor):
        from mdt_ds.sampling import to_uint8

        images = to_uint8(images.clamp(-1, 1)) if images.dtype != torch.uint8 else images.cpu().numpy()
    images = np.asarray(images)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def per_class_accuracy(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> list[float]:
    """Share of class c's samples the classifier assigns to c, for each class (nan if none)."""
    return [float((predicted[labels == c] == c).float().mean()) if (labels == c).any() else float("nan")
            for c in range(num_classes)]


def labelled_grid(
    images: np.ndarray | torch.Tensor, labels: Sequence[int], agree: Sequence[bool], path: Path,
    per_class: int, scale: int = 2, border: int = 2,
) -> Path:
    """One row per class (class-major input, ``per_class`` each), the digit written at the row's
    start, every sample framed in green (classifier agrees) or red; ``scale`` enlarges pixels."""
    rgb = _rgb(images)
    n, h, w, _ = rgb.shape
    if n != len(labels) or n != len(agree) or n % per_class:
        raise ValueError(f"labelled_grid: {n} images, {len(labels)} labels, {len(agree)} flags, per_class {per_class}")
    cell_h, cell_w = h * scale + 2 * border, w * scale + 2 * border
    gap, label_w, rows = 2, 28, n // per_class
    canvas = Image.new("RGB", (label_w + per_class * (cell_w + gap) + gap, rows * (cell_h + gap) + gap), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font(min(24, max(10, cell_h - 8)))  # fits the 28-px label column
    for i in range(n):
        row, col = divmod(i, per_class)
        x, y = label_w + gap + col * (cell_w + gap), gap + row * (cell_h + gap)
        if col == 0:
            draw.text((label_w // 2, y + cell_h // 2), str(int(labels[i])), fill=INK, font=font, anchor="mm")
        draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=AGREE if agree[i] else DISAGREE)
        tile = Image.fromarray(rgb[i]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (x + border, y + border))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def read_stats(stats_path: Path) -> list[dict]:
    """The JSON lines of ``stats.jsonl`` (empty when the file is missing)."""
    if not stats_path.is_file():
        return []
    return [json.loads(line) for line in stats_path.read_text().splitlines() if line.strip()]


def _loss_panel(stats: list[dict], width: int, height: int = 180) -> Image.Image:
    """The logged loss against the step as a polyline with its axis range written out."""
    panel = Image.new("RGB", (width, height), BACKGROUND)
    draw, font = ImageDraw.Draw(panel), _font(12)
    points = [(s["step"], s["loss"]) for s in stats if "loss" in s and np.isfinite(s["loss"])]
    left, right, top, bottom = 56, width - 12, 22, height - 26
    draw.rectangle([left, top, right, bottom], outline=INK)
    draw.text((left, 4), "training loss (stats.jsonl)", fill=INK, font=font)
    if len(points) < 2:
        draw.text((left + 8, top + 8), "fewer than 2 logged steps", fill=INK, font=font)
        return panel
    steps, losses = np.array(points, dtype=float).T
    lo, hi = float(losses.min()), float(losses.max())
    span, step_span = (hi - lo) or 1.0, (steps[-1] - steps[0]) or 1.0
    xy = [(left + (s - steps[0]) / step_span * (right - left), bottom - (v - lo) / span * (bottom - top))
          for s, v in zip(steps, losses)]
    draw.line(xy, fill=(30, 90, 200), width=2)
    draw.text((left - 4, top), f"{hi:.3f}", fill=INK, font=font, anchor="ra")
    draw.text((left - 4, bottom), f"{lo:.3f}", fill=INK, font=font, anchor="rd")
    draw.text((left, bottom + 4), f"step {int(steps[0])}", fill=INK, font=font)
    draw.text((right, bottom + 4), f"step {int(steps[-1])}", fill=INK, font=font, anchor="ra")
    return panel


def _pick(items: list, most: int) -> list:
    """At most ``most`` items spread evenly, always keeping the first and the last."""
    if len(items) <= most:
        return items
    idx = np.linspace(0, len(items) - 1, most).round().astype(int)
    return [items[i] for i in sorted(set(idx))]


def progress_picture(samples_dir: Path, stats_path: Path, path: Path, most: int = 8, scale: int = 0) -> Path:
    """The training grids ``samples_dir/step_*.png`` (fixed seeds and classes) side by side, each
    captioned with its step, above the loss curve from ``stats_path``. ``scale`` enlarges them;
    0: by 2 for a grid under 200 px tall (saved at the samples' native size), else not at all
    (grids are enlarged when drawn now: mdt_ds.sampling.MIN_TILE)."""
    grids = sorted(samples_dir.glob("step_*.png"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    tiles = [(int(re.sub(r"\D", "", p.stem)), Image.open(p).convert("RGB")) for p in _pick(grids, most)]
    factor = [scale or (2 if img.height < 200 else 1) for _, img in tiles]
    tiles = [(step, img.resize((img.width * k, img.height * k), Image.NEAREST))
             for (step, img), k in zip(tiles, factor)]
    gap, caption = 8, 18
    tile_w = max((img.width for _, img in tiles), default=0)
    tile_h = max((img.height for _, img in tiles), default=0)
    width = max(420, gap + len(tiles) * (tile_w + gap))
    loss = _loss_panel(read_stats(stats_path), width)
    canvas = Image.new("RGB", (width, caption + tile_h + gap + loss.height), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), _font(12)
    if not tiles:
        draw.text((gap, 2), f"no training grids in {samples_dir}", fill=INK, font=font)
    for k, (step, img) in enumerate(tiles):
        x = gap + k * (tile_w + gap)
        draw.text((x + tile_w // 2, 2), f"step {step}", fill=INK, font=font, anchor="ma")
        canvas.paste(img, (x, caption))
    canvas.paste(loss, (0, caption + tile_h + gap))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def loud(message: str) -> str:
    """A banner no one scrolls past: the safety stop and other results that are not the recipe's."""
    bar = "!" * 78
    return "\n".join(["", bar, *(f"!!! {line}" for line in message.splitlines()), bar, ""])


def format_report(report: dict) -> str:
    """The demo's closing summary for people (the JSON report holds the same numbers)."""
    acc, acc1 = report["conditional_accuracy"], report["conditional_accuracy_cfg1"]
    per_class = " ".join(f"{c}:{a:.0%}" for c, a in enumerate(report["per_class_accuracy"]))
    sampler = report["recipe"]["sampler"]
    lines = [
        f"Demo done (seed {report['seed']}): {report['steps_done']} of {report['steps_planned']} steps, "
        f"{report['images_seen']:,} training images, training {report['train_seconds'] / 60:.1f} min "
        f"(estimated {report['estimate_seconds'] / 60:.1f} min), whole demo {report['total_seconds'] / 60:.1f} min.",
        f"  conditional accuracy at CFG {sampler['cfg_scale']:g} ({sampler['name']}-{sampler['steps']}, EMA): {acc:.1%}; "
        f"without guidance (CFG 1): {acc1:.1%}; classifier on held-out real digits: "
        f"{report['classifier_heldout_accuracy']:.1%}",
        f"  per class at CFG {sampler['cfg_scale']:g}: {per_class}",
        f"  labelled samples (green: classifier agrees): {report['grid']}",
        f"  progress (training grids + loss): {report['progress']}",
    ]
    if report["stopped_by_time_budget"]:
        lines.insert(0, loud(f"SAFETY STOP: the {report['time_budget_min']:g}-minute budget ended training at step "
                             f"{report['steps_done']} of {report['steps_planned']}; accuracy is below what the "
                             "recipe reaches."))
    return "\n".join(lines)
