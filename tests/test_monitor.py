"""MFU denominators: the dense datasheet peak per NVIDIA part and dtype, or a measured matmul."""

from __future__ import annotations

import json

import pytest
import torch

from mdt_ds import monitor
from mdt_ds.monitor import device_peak_flops, measure_peak_flops

# torch.cuda.get_device_name() strings -> (bf16, tf32, fp32) dense TFLOP/s and the part's name.
NAMES = [
    ("NVIDIA A100-SXM4-80GB", (312, 156, 19.5), "A100"),
    ("NVIDIA A100-SXM4-40GB", (312, 156, 19.5), "A100"),
    ("NVIDIA A100 80GB PCIe", (312, 156, 19.5), "A100"),
    ("NVIDIA A100-PCIE-40GB", (312, 156, 19.5), "A100"),
    ("NVIDIA H100 80GB HBM3", (989, 494, 67), "H100 SXM"),
    ("NVIDIA H100 PCIe", (756, 378, 51), "H100 PCIe"),
    ("NVIDIA H100 NVL", (835, 418, 60), "H100 NVL"),
    ("NVIDIA H200", (989, 494, 67), "H100 SXM"),
    ("NVIDIA H200 NVL", (835, 418, 60), "H200 NVL"),
    ("NVIDIA GH200 480GB", (989, 494, 67), "H100 SXM"),
]


@pytest.fixture
def matmul_precision():
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("name,peaks,part", NAMES)
def test_table_peak_for_each_part_and_dtype(name, peaks, part, monkeypatch, matmul_precision) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    for dtype in (torch.bfloat16, torch.float16):
        flops, source = device_peak_flops(cuda, dtype)
        assert flops == peaks[0] * 1e12 and part in source and "datasheet" in source
    torch.set_float32_matmul_precision("high")  # TF32 allowed: fp32 matmuls run on tensor cores
    flops, source = device_peak_flops(cuda, torch.float32)
    assert flops == peaks[1] * 1e12 and "tf32" in source
    torch.set_float32_matmul_precision("highest")
    flops, source = device_peak_flops(cuda, torch.float32)
    assert flops == peaks[2] * 1e12 and "TF32 off" in source


def test_unknown_gpu_is_measured(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    calls = []
    monkeypatch.setattr(monitor, "measure_peak_flops", lambda d, t: calls.append((d.type, t)) or 1.5e14)
    flops, source = device_peak_flops(torch.device("cuda"), torch.bfloat16)
    assert flops == 1.5e14 and calls == [("cuda", torch.bfloat16)]
    assert "measured" in source and "RTX 4090" in source and "not in the peak table" in source


def test_cpu_falls_back_to_a_measured_peak() -> None:
    flops, source = device_peak_flops(torch.device("cpu"), torch.float32)
    assert 1e8 < flops < 1e14 and "measured" in source and "cpu" in source


def test_measured_peak_uses_large_gpu_matmuls(monkeypatch) -> None:
    # The sizes chosen, not the timing: 8192^3 x 10 on a GPU (1024^3 is launch-bound there).
    sizes = []
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *s, **k: sizes.append(s) or real_randn(2, 2))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    measure_peak_flops(torch.device("cuda"), torch.float32)
    assert sizes[0] == (8192, 8192)
    sizes.clear()
    measure_peak_flops(torch.device("cpu"), torch.float32)  # a 256^3 probe, then the plan
    assert sizes[0] == (256, 256) and sizes[1] == (1024, 1024)


@pytest.mark.parametrize("probe_gflops,plan", [(100.0, (1024, 5)), (1.0, (256, 5)), (2.0, (512, 2))])
def test_cpu_peak_measurement_fits_its_budget(monkeypatch, probe_gflops: float, plan: tuple[int, int]) -> None:
    """A dtype the CPU has no hardware for (bf16 on AVX2: about 1 GFLOP/s) once made every run's
    start wait 29 s for 12 matmuls of 1024^3; the plan now shrinks to the budget."""
    clock = iter([0.0, 2 * 256**3 / (probe_gflops * 1e9)])
    monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
    size, reps = monitor._cpu_peak_plan(torch.bfloat16)
    assert (size, reps) == plan
    if probe_gflops < 10:  # warm-up + reps within the budget at the probed rate
        assert (reps + 1) * 2 * size**3 / (probe_gflops * 1e9) <= monitor.CPU_PEAK_BUDGET_S


def test_a_given_measurement_is_not_timed_again(monkeypatch) -> None:
    monkeypatch.setattr(monitor, "measure_peak_flops", lambda *a, **k: pytest.fail("timed a second time"))
    flops, source = monitor.device_peak_flops(torch.device("cpu"), torch.bfloat16, measured=5e10)
    assert flops == 5e10 and "measured" in source


def test_resume_drops_stats_lines_after_the_checkpoint(tmp_path) -> None:
    """A run killed at step 5 after its step-3 checkpoint: the rerun retrains 4 and 5, so their
    old lines (and a torn last line) go; the file then holds each step once."""
    from mdt_ds.monitor import drop_lines_after

    stats = tmp_path / "stats.jsonl"
    stats.write_text("".join(f'{{"step": {s}, "loss": {s / 10}}}\n' for s in range(1, 6)) + '{"step": 6, "lo')
    assert drop_lines_after(stats, 3) == 3
    assert [line["step"] for line in map(json.loads, stats.read_text().splitlines())] == [1, 2, 3]
    assert drop_lines_after(stats, 3) == 0 and drop_lines_after(tmp_path / "none.jsonl", 0) == 0


def test_summary_lines_fire_in_short_runs_too() -> None:
    from mdt_ds.trainer import summary_interval

    assert summary_interval(100, 400_000) == 1000  # every 10th logged step on a long run
    assert summary_interval(1, 20) == 2 and summary_interval(1, 5) == 1  # ~10 lines on short ones
    assert summary_interval(10, 50) == 10 and summary_interval(0, 10) == 1


def test_v100_has_fp16_and_fp32_peaks_and_no_bf16_one(monkeypatch, matmul_precision) -> None:
    """The docs recommend fp16 on V100s: the table has their dense fp16 tensor-core and fp32
    peaks; bf16 (no tensor cores for it) is measured, saying why."""
    for name, half, fp32, part in (("Tesla V100-SXM2-32GB", 125, 15.7, "V100 SXM2"),
                                   ("Tesla V100-PCIE-16GB", 112, 14, "V100 PCIe")):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        flops, source = device_peak_flops(torch.device("cuda", 0), torch.float16)
        assert flops == half * 1e12 and part in source
        for precision in ("high", "highest"):  # no TF32 on Volta: fp32 either way
            torch.set_float32_matmul_precision(precision)
            assert device_peak_flops(torch.device("cuda", 0), torch.float32)[0] == fp32 * 1e12
        monkeypatch.setattr(monitor, "measure_peak_flops", lambda d, t: 1e13)
        assert device_peak_flops(torch.device("cuda", 0), torch.bfloat16) == (
            1e13, f"measured large-matmul peak ({name}, no bf16 tensor cores, bfloat16)")
