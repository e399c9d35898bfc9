"""``make demo``'s pieces: the time estimate, the labelled grid, the progress picture, the report
and the safety stop (one short real run under torchrun); no test asserts the demo's accuracy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdt_ds import demo, demo_report
from tests.conftest import PYTHON, subprocess_env

pytestmark = pytest.mark.data


def test_estimate_uses_the_rate_after_the_first_window() -> None:
    assert demo.estimate_seconds([], 100) is None
    assert demo.estimate_seconds([(10.0, 25)], 100) is None
    # 25 steps per 5 s after the reference line: 75 steps seen in 15 s, 900 to go take 180 s more
    seen = [(10.0, 25), (15.0, 50), (25.0, 100)]
    assert demo.estimate_seconds(seen, 1000) == pytest.approx(15.0 + 180.0)
    assert demo.estimate_seconds(seen, 100) == pytest.approx(15.0)


def test_labelled_grid_frames_agreement_green_and_disagreement_red(tmp_path: Path) -> None:
    images = torch.linspace(-1, 1, 6 * 16 * 16).view(6, 1, 16, 16)
    agree = [True, False, True, True, False, True]
    path = demo_report.labelled_grid(images, [0, 0, 0, 1, 1, 1], agree, tmp_path / "grid.png", per_class=3)
    grid = np.asarray(Image.open(path).convert("RGB"))
    cell, gap, label_w = 16 * 2 + 4, 2, 28
    assert grid.shape == (2 * (cell + gap) + gap, label_w + 3 * (cell + gap) + gap, 3)
    for i, ok in enumerate(agree):
        row, col = divmod(i, 3)
        corner = grid[gap + row * (cell + gap), label_w + gap + col * (cell + gap)]
        assert tuple(corner) == (demo_report.AGREE if ok else demo_report.DISAGREE)
    assert (grid[:, :label_w] < 128).any()  # the digit is written in the label column
    with pytest.raises(ValueError, match="per_class"):
        demo_report.labelled_grid(images, [0] * 5, agree, tmp_path / "bad.png", per_class=3)


def test_progress_picture_puts_grids_side_by_side_above_the_loss(tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    for step in (200, 400, 600, 800, 1000):
        Image.fromarray(np.full((20, 10), step // 5, np.uint8)).save(samples / f"step_{step:07d}.png")
    stats = tmp_path / "stats.jsonl"
    stats.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(25, 1001, 25)))
    out = Image.open(demo_report.progress_picture(samples, stats, tmp_path / "p.png", most=3, scale=2))
    assert out.width == 420 and out.height == 18 + 40 + 8 + 180  # 3 grids of 20x40, then the loss panel
    picked = demo_report._pick(sorted(samples.glob("*.png")), 3)
    assert [p.name for p in picked] == ["step_0000200.png", "step_0000600.png", "step_0001000.png"]
    empty = tmp_path / "none"
    empty.mkdir()
    assert Image.open(demo_report.progress_picture(empty, tmp_path / "missing.jsonl", tmp_path / "q.png")).width == 420


def test_per_class_accuracy_and_loud_report() -> None:
    predicted, labels = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1])
    assert demo_report.per_class_accuracy(predicted, labels, 3)[:2] == [1.0, pytest.approx(1 / 3)]
    report = {
        "seed": 1, "steps_done": 10, "steps_planned": 40, "images_seen": 640, "train_seconds": 60.0,
        "estimate_seconds": 240.0, "total_seconds": 90.0, "conditional_accuracy": 0.5,
        "conditional_accuracy_cfg1": 0.25, "classifier_heldout_accuracy": 0.95, "per_class_accuracy": [0.5] * 10,
        "grid": "g.png", "progress": "p.png", "stopped_by_time_budget": True, "time_budget_min": 1.0,
        "recipe": {"sampler": demo.DEMO_SAMPLER},
    }
    text = demo_report.format_report(report)
    assert "!!! SAFETY STOP" in text and "step 10 of 40" in text and "seed 1" in text
    assert "SAFETY" not in demo_report.format_report({**report, "stopped_by_time_budget": False})


def test_short_demo_run_stops_loudly_and_writes_its_report(tmp_path: Path) -> None:
    """2 processes, ZeRO-2, a budget spent at the first stop check: the run stops at step 10 of
    40 with a checkpoint, the report says so and holds every field and both pictures."""
    run_dir = tmp_path / "demo"
    cmd = [PYTHON, "-m", "mdt_ds.demo", f"--run-dir={run_dir}", "--steps=40", "--minutes=0.0001",
           "--per-class=2", "--seed=3"]
    out = subprocess.run(cmd, env=subprocess_env(MDT_DS_DATA=str(tmp_path / "data")), capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "!!! SAFETY STOP" in out.stdout
    report = json.loads((run_dir / "demo_report.json").read_text())
    assert report["stopped_by_time_budget"] and report["steps_done"] == 10 and report["steps_planned"] == 40
    assert report["seed"] == 3 and report["images_seen"] == 10 * demo.DEMO_BATCH and report["samples"] == 20
    assert len(report["per_class_accuracy"]) == 10 and 0 <= report["conditional_accuracy_cfg1"] <= 1
    assert report["recipe"]["sampler"] == demo.DEMO_SAMPLER and report["recipe"]["zero_stage"] == 2
    assert report["train_seconds"] > 0 and report["estimate_seconds"] > 0
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 3
    grid = Image.open(run_dir / "demo_samples.png")
    assert grid.height > grid.width // 2  # 10 rows of 2
    assert Image.open(run_dir / "demo_progress.png").width >= 420
    assert sorted((run_dir / "checkpoints").iterdir()) and (run_dir / "tensorboard").is_dir()


def test_scoring_samples_with_the_sampler_it_reports(tmp_path: Path, monkeypatch) -> None:
    """sample_and_score hands DEMO_SAMPLER's name and steps to the grid sampler, at the demo's CFG
    and at CFG 1 (the name was once only written into the report)."""
    import mdt_ds.grids
    from mdt_ds.config import load_config, save_config

    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    save_config(load_config(None, demo.DEMO_OVERRIDES), run / "config.json")
    torch.save({"x_embedder.proj.bias": torch.zeros(128)}, run / "snapshots" / "ema_0000001.pt")  # unused: spied
    calls = []

    def spy(cfg, state, **kwargs):
        calls.append(kwargs)
        labels = torch.arange(10).repeat_interleave(kwargs["per_class"])
        return torch.zeros(len(labels), 1, 16, 16), labels

    monkeypatch.setattr(mdt_ds.grids, "sample_images", spy)
    monkeypatch.setattr(demo, "train_classifier", lambda *_: torch.nn.Sequential(torch.nn.Flatten(),
                                                                                 torch.nn.Linear(256, 10)))
    sampler = {"name": "dpm++2m", "steps": 7, "cfg_scale": 3.0}
    scores = demo.sample_and_score(run, per_class=1, sampler=sampler)
    assert [(c["sampler"], c["steps"], c["cfg_scale"]) for c in calls] == [("dpm++2m", 7, 3.0), ("dpm++2m", 7, 1.0)]
    assert scores["samples"] == 10 and Path(scores["grid"]).is_file()


def test_a_rerun_of_a_finished_demo_keeps_the_timings_of_the_run_that_trained(tmp_path: Path, monkeypatch) -> None:
    """Rerunning a finished `make demo` trains nothing (8 s) and overwrote the report with that
    no-op's time for 96,000 images; now it re-scores and keeps the timings of the launch that
    trained. A launch that did train reports its own."""
    import mdt_ds.data.demo
    from mdt_ds.config import load_config, save_config

    run = tmp_path / "demo"
    (run / "snapshots").mkdir(parents=True)
    save_config(load_config(None, demo.DEMO_OVERRIDES), run / "config.json")
    finished = run / "snapshots" / "ema_0000040.pt"
    launches = [(40, 400.0, 380.0), (40, 8.0, None)]  # (snapshot step after the launch, seconds, estimate)

    def fake_training(run_dir, steps, minutes, nproc, seed, threads):
        step, seconds, estimate = launches.pop(0)
        (run_dir / "snapshots" / f"ema_{step:07d}.pt").touch()
        return {"train_seconds": seconds, "estimate_seconds": estimate}

    accuracy = iter([0.5, 0.75])
    monkeypatch.setattr(mdt_ds.data.demo, "ensure_mnist_shards", lambda **kw: "embedded")
    monkeypatch.setattr(demo, "run_training", fake_training)
    monkeypatch.setattr(demo, "progress_picture", lambda *args: None)
    monkeypatch.setattr(demo, "sample_and_score", lambda run_dir, per_class: {
        "snapshot": str(finished), "conditional_accuracy": next(accuracy), "conditional_accuracy_cfg1": 0.5,
        "classifier_heldout_accuracy": 0.9, "per_class_accuracy": [0.5] * 10, "grid": "g.png"})
    argv = [f"--run-dir={run}", "--steps=40"]
    assert demo.main(argv) == 0
    first = json.loads((run / "demo_report.json").read_text())
    assert (first["train_seconds"], first["estimate_seconds"]) == (400.0, 380.0) and "rescore_seconds" not in first
    assert demo.main(argv) == 0  # already at step 40: training is a no-op
    again = json.loads((run / "demo_report.json").read_text())
    facts = ("train_seconds", "estimate_seconds", "total_seconds")
    assert [again[k] for k in facts] == [first[k] for k in facts] and again["train_seconds"] == 400.0
    assert again["conditional_accuracy"] == 0.75 and again["rescore_seconds"] >= 0  # re-scored
