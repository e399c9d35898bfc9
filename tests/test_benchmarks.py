"""The benchmarks' CPU-runnable parts: device_check.py's argument parsing, part selection,
failure isolation and its part (a) logic in --quick CPU mode; train_step.py --quick JSON; the
sampler benchmark's step extrapolation."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, REPO, subprocess_env


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def device_check():
    return load("device_check")


def test_device_check_parts_and_out(device_check, monkeypatch) -> None:
    args = device_check.parse_args(["--parts", "d,a", "--device", "cpu"])
    assert args.parts == ["a", "d"] and args.device == "cpu"  # fixed order: correctness first
    monkeypatch.setenv("OUT", "/tmp/somewhere")
    assert device_check.parse_args([]).out == Path("/tmp/somewhere") and device_check.parse_args([]).parts == list("abcd")
    monkeypatch.delenv("OUT")
    assert device_check.parse_args([]).out == Path("device_out")
    with pytest.raises(SystemExit):
        device_check.parse_args(["--parts", "a,x"])


def test_device_check_isolates_failures_and_time_limits(device_check, monkeypatch, tmp_path) -> None:
    def boom(*_):
        raise RuntimeError("planted")

    def slow(*_):
        time.sleep(5)
        return {}

    monkeypatch.setattr(device_check, "part_b", boom)
    monkeypatch.setattr(device_check, "part_c", slow)
    monkeypatch.setattr(device_check, "part_d", lambda *_: {"value": 1})
    monkeypatch.setitem(device_check.LIMITS_S, "c", 0.3)
    start = time.monotonic()
    summary = device_check.main(["--parts", "b,c,d", "--device", "cpu", "--out", str(tmp_path)])
    assert time.monotonic() - start < 4
    assert "planted" in json.loads((tmp_path / "part_b.json").read_text())["error"]
    assert "limit" in json.loads((tmp_path / "part_c.json").read_text())["error"]
    assert json.loads((tmp_path / "part_d.json").read_text())["value"] == 1
    assert summary["parts"] == ["b", "c", "d"] and (tmp_path / "summary.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part_b.json", "part_c.json", "part_d.json", "summary.json"]


def test_device_check_part_a_quick_on_cpu(device_check, tmp_path) -> None:
    device_check.main(["--parts", "a", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    a = json.loads((tmp_path / "part_a.json").read_text())
    assert a["cuda_vs_cpu"]["skipped"] and "CUDA" in a["cuda_vs_cpu"]["reason"]
    bf16 = a["bf16_vs_fp32"]
    assert bf16["ok"] and 0 < bf16["rel_err"] <= bf16["tol"] == device_check.TOL["bf16_vs_fp32"]
    assert a["flex_vs_sdpa"]["skipped"] and a["train_resume"]["skipped"] and a["cuda_only_paths"]["skipped"]
    adan = a["fused_adan"]  # runs on the CPU too: the compiled C++ kernel against the multi-tensor update
    assert adan["ok"] and adan["max_abs_diff"] <= adan["tol"] and adan["fused"]["sync_free"] is None  # no device
    assert adan["fused"]["step_ms"] > 0 and adan["multi_tensor"]["step_ms"] > 0


def test_device_check_part_c_quick_on_cpu(device_check, tmp_path) -> None:
    """Part (c) as it will run on the GPU (Tiny preset and 5 timed steps here): DDPM-250 and the
    few-step solvers, with the calls each one costs."""
    device_check.main(["--parts", "c", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    c = json.loads((tmp_path / "part_c.json").read_text())
    for variant in ("fp32_tf32", "bf16_autocast"):
        rows = {(r["sampler"], r["steps"], tuple(r["cfg_interval"] or ())): r for r in c[variant]["results"]}
        assert rows[("ddpm", 250, ())]["network_calls_per_image"] == 500
        assert rows[("heun", 10, ())]["network_calls_per_image"] == 38
        assert rows[("dpm++2m", 20, (0, 500))]["network_calls_per_image"] < rows[("dpm++2m", 20, ())][
            "network_calls_per_image"] == 40
        assert all(r["images_per_second_best"] > 0 for r in rows.values())


def test_device_check_helpers(device_check) -> None:
    ref = torch.ones(4)
    assert device_check.rel_err(ref * 1.01, ref) == pytest.approx(0.01)
    assert device_check.rel_err(torch.full((4,), float("nan")), ref) == float("inf")
    assert not device_check.check(0.2, 0.1)["ok"] and device_check.check(0.05, 0.1)["ok"]
    assert device_check.losses_by_step([{"step": 3, "loss": 0.5}, {"step": 4}]) == {3: 0.5}


def test_train_step_quick_json(tmp_path) -> None:
    """--quick (Tiny preset, 1 step) reports every field the issue names, side by side."""
    fake = tmp_path / "release" / "masked_diffusion"  # a stand-in checkout: tests the import path
    fake.mkdir(parents=True)
    (fake / "models.py").write_text(
        "from mdt_ds.models import build_model\n\n\ndef MDTv2(**kw):\n    return build_model('MDTv2-Tiny/2')\n"
    )
    out = tmp_path / "quick.json"
    cmd = [PYTHON, "benchmarks/train_step.py", "--quick", "--profile", "--release-src", str(fake.parent),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["quick"] and r["preset"] == "MDTv2-Tiny/2"
    assert set(r["variants"]) == {"eager", "flex", "explicit", "release-like"}
    eager = r["variants"]["eager"]
    assert eager["step_time_s"] > 0 and eager["images_per_s"] > 0 and eager["peak_memory_gb"] > 0
    # per variant on a CPU (the heap in use), not the process's max RSS that every variant inherits
    assert "mallinfo2" in eager["memory_note"] and eager["process_max_rss_gb"] > 0
    assert set(eager["phases_s"]) == {"full_pass_s", "masked_pass_s", "backward_s", "optimizer_step_s", "ema_s"}
    assert set(eager["host_syncs_per_step"]) == {"ours", "deepspeed_step", "ema"}
    assert 0 < eager["mfu_spec"] < 1 and 0 < eager["mfu_measured"] < 1
    assert r["variants"]["release-like"]["attention"] == "explicit" and r["variants"]["release-like"]["precision"] == "fp32"
    assert r["variants"]["flex"]["train_step"] == "unavailable" and "CPU" in r["variants"]["flex"]["reason"]
    assert {"ours_vs_release_like", "eager_vs_explicit", "best_variant"} <= set(r["ratios"])
    assert r["peaks"]["fp32"]["measured_flops"] > 0 and r["peaks"]["fp32"]["spec_source"]
    profile = eager["profile"]
    assert 0 < profile["matmul_share"] < 1 and profile["non_matmul_share"] == pytest.approx(1 - profile["matmul_share"])
    assert profile["non_matmul_share_per_step"] == [profile["non_matmul_share"]]  # --quick profiles one step
    faults = profile["host_page_faults_per_profiled_step"]
    assert len(faults) == 1 and profile["fault_free_profiled_steps"] == int(faults[0] < 1000)
    assert 0 < r["variants"]["release-like"]["profile"]["non_matmul_share"] < 1  # every trained variant
    assert r["release"]["release_over_ours"] > 0 and r["release"]["src"] == str(fake.parent)


def test_sampler_benchmark_extrapolates_steps(tmp_path) -> None:
    sampler = load("sampler")
    report = sampler.main(["--images", "2", "--batch-size", "2", "--configs", "ddpm250:2,dpm++2m10:2:0-500,heun4:2",
                           "--time-steps", "2", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path / "s.json")])
    result, solver, heun = report["results"]
    assert result["steps"] == 250 and result["timed_steps"] == 2 and result["extrapolated"]
    assert result["network_calls_per_image"] == 500 and not report["tf32"]
    # log-SNR grid: 10 timesteps, those at or below 500 guided (two calls), the rest one call
    assert solver["sampler"] == "dpm++2m" and len(solver["timesteps"]) == 10 and solver["cfg_interval"] == [0, 500]
    assert solver["network_calls_per_image"] == 10 + sum(k <= 500 for k in solver["timesteps"])
    assert heun["network_calls_per_image"] == 2 * (2 * 4 - 1)  # Heun: 2N - 1 evaluations, each guided
    assert json.loads((tmp_path / "s.json").read_text())["results"][0]["timed_steps"] == 2


def test_sampler_quality_rows_and_plot(tmp_path) -> None:
    """The quality-per-call benchmark on a throwaway run: every row the same N, calls as planned,
    scores in range, the JSON holds the rows, and the plot is written."""
    from PIL import Image

    from mdt_ds.config import load_config, save_config
    from mdt_ds.models import build_model
    from mdt_ds.sampling import SampleOptions

    quality = load("sampler_quality")
    run = tmp_path / "run"
    (run / "snapshots").mkdir(parents=True)
    cfg = load_config(None, ["model.preset=MDTv2-Tiny/2", "model.in_channels=1", "model.input_size=16",
                             "data.source=mnist16"])
    save_config(cfg, run / "config.json")
    torch.manual_seed(0)
    torch.save(build_model(cfg.model).state_dict(), run / "snapshots" / "ema_0000001.pt")
    report = quality.main(["--run-dir", str(run), "--configs", "dpm++2m4,dpm++2m4:0-500,heun3", "--per-class", "2",
                           "--out", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png")])
    rows = report["rows"]
    assert [r["images"] for r in rows] == [20, 20, 20]
    assert rows[0]["network_calls_per_image"] == SampleOptions(sampler="dpm++2m", steps=4, cfg_scale=4).network_calls()
    assert rows[1]["network_calls_per_image"] < rows[0]["network_calls_per_image"]
    assert rows[2]["network_calls_per_image"] == 2 * 5
    assert all(0 <= r["conditional_accuracy"] <= 1 and r["frechet_distance"] > 0 for r in rows)
    assert json.loads((tmp_path / "q.json").read_text())["rows"] == rows
    assert Image.open(tmp_path / "q.png").size[0] > 500
