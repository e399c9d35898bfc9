"""benchmarks/precision_quality.py's CPU-cheap logic: summaries over seeds, the loss tail, the
loss-curve differences, the finished-run check, argument parsing and the plot from a JSON."""

from __future__ import annotations

import importlib.util
import math

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_precision_quality", REPO / "benchmarks" / "precision_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_std_and_loss_tail(bench) -> None:
    out = bench.mean_std([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["std"] == 1.0 and out["values"] == [1.0, 2.0, 3.0]  # sample std, ddof 1
    assert bench.mean_std([5.0])["std"] == 0.0
    stats = [{"step": i, "loss": float(i)} for i in range(1, 201)]
    assert bench.loss_tail(stats) == pytest.approx(sum(range(101, 201)) / 100)
    assert bench.loss_tail(stats[:10], tail=100) == pytest.approx(5.5)
    assert bench.loss_tail([]) is None


def test_curve_differences(bench) -> None:
    ref = [2.0] * 12
    out = bench.curve_differences({"fp32": ref, "bf16": [2.1] * 12, "bf16-amp": [2.0] * 11 + [1.0]})
    assert set(out) == {"bf16", "bf16-amp"}
    assert out["bf16"]["mean_abs"] == pytest.approx(0.1) and out["bf16"]["mean_signed"] == pytest.approx(0.1)
    assert out["bf16"]["last10_relative"] == pytest.approx(0.05)
    assert out["bf16-amp"]["max_abs"] == 1.0 and out["bf16-amp"]["per_step"][-1] == -1.0


def test_final_snapshot_and_summary(bench, tmp_path) -> None:
    assert bench.final_snapshot(tmp_path, 1500) is None
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / "ema_0001000.pt").write_bytes(b"")
    assert bench.final_snapshot(tmp_path, 1500) is None  # an interrupted run: resume, not reuse
    (tmp_path / "snapshots" / "ema_0001500.pt").write_bytes(b"")
    assert bench.final_snapshot(tmp_path, 1500).name == "ema_0001500.pt"
    runs = [{"precision": p, "seed": s, "conditional_accuracy": a, "frechet_distance": 10.0 * a, "final_loss": 0.1,
             "train_seconds": 60.0, "step_seconds": 50.0}
            for p, s, a in (("fp32", 1, 0.8), ("fp32", 0, 0.9), ("bf16", 0, 0.7))]
    summary = bench.summarise(runs)
    assert list(summary) == ["fp32", "bf16"] and summary["fp32"]["seeds"] == [0, 1]
    assert summary["fp32"]["conditional_accuracy"]["values"] == [0.9, 0.8]
    assert math.isclose(summary["fp32"]["conditional_accuracy"]["std"], math.sqrt(0.005))


def test_parse_args(bench) -> None:
    args = bench.parse_args(["--parts", "s2", "--seeds", "0,2", "--precisions", "fp32,bf16-amp"])
    assert args.parts == ["s2"] and args.seeds == [0, 2] and args.precisions == ["fp32", "bf16-amp"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--parts", "demo,x"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--precisions", "fp16"])


def test_plot_from_report(bench, tmp_path) -> None:
    runs = [{"precision": p, "seed": s, "conditional_accuracy": 0.5 + s / 10, "frechet_distance": 20.0 - s,
             "final_loss": 0.1, "train_seconds": 60.0, "step_seconds": 50.0}
            for p in bench.PRECISIONS for s in (0, 1)]
    curves = {p: [2.0 - i / 10 + k / 100 for i in range(12)] for k, p in enumerate(bench.PRECISIONS)}
    report = {
        "demo": {"summary": bench.summarise(runs)},
        "sampling": {"rows": [{"seed": s, "autocast": a, "conditional_accuracy": 0.5, "frechet_distance": 3.0}
                              for s in (0, 1) for a in ("none", "bf16")]},
        "s2": {"losses": curves, "differences_from_fp32": bench.curve_differences(curves)},
    }
    path = bench.plot(report, tmp_path / "p.png")
    assert path.stat().st_size > 10_000


def test_paired_differences_and_seed_subsets(bench) -> None:
    runs = [{"precision": p, "seed": s, "conditional_accuracy": 0.9 + d, "frechet_distance": 20.0 + 10 * d,
             "final_loss": 0.06, "train_seconds": 1.0, "step_seconds": 1.0}
            for s in (0, 1, 2, 3) for p, d in (("fp32", 0.0), ("bf16", 0.01 * s), ("bf16-amp", -0.02))]
    paired = bench.paired_differences(runs)
    assert set(paired) == {"bf16", "bf16-amp"}
    assert paired["bf16"]["conditional_accuracy"]["values"] == pytest.approx([0.0, 0.01, 0.02, 0.03])
    assert paired["bf16-amp"]["frechet_distance"]["mean"] == pytest.approx(-0.2)
    assert paired["bf16-amp"]["frechet_distance"]["std"] == pytest.approx(0.0, abs=1e-12)
    out = bench.demo_summaries(runs)
    assert out["summary"]["fp32"]["seeds"] == [0, 1, 2, 3]
    assert out["summary_seeds_0_1_2"]["fp32"]["seeds"] == [0, 1, 2]
    assert "summary_seeds_0_1_2" not in bench.demo_summaries([r for r in runs if r["seed"] < 3])
