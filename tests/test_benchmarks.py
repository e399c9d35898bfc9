"""The benchmarks' CPU-runnable parts: device_check.py's argument parsing, part order, failure
isolation, saved-as-it-grows JSON, the output limits of the device tool, and every part (b, a, c,
d) end to end in --quick CPU mode (one run, shared by the tests that read it); train_step.py
--quick JSON; the sampler benchmark's step extrapolation."""

from __future__ import annotations

import importlib.util
import json
import math
import re
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
    return load("device_check")  # puts benchmarks/ on sys.path: its sibling modules import by name


@pytest.fixture(scope="module")
def quick_run(device_check, tmp_path_factory) -> tuple[Path, dict]:
    """``device_check.py --device cpu --quick`` with every part, once for the tests below. Time
    limits x4: this shared 2-core machine runs other jobs beside the tests. The inductor cache is
    the default one (the check would make a fresh one per run: Adan's C++ kernel compiled anew)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    out = tmp_path_factory.mktemp("device_out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
        summary = device_check.main(["--device", "cpu", "--quick", "--limit-scale", "4", "--out", str(out)])
    return out, summary


def part(out: Path, name: str) -> dict:
    return json.loads((out / f"part_{name}.json").read_text())


def test_device_check_parts_and_out(device_check, monkeypatch) -> None:
    args = device_check.parse_args(["--parts", "d,a", "--device", "cpu"])
    assert args.parts == ["a", "d"] and args.device == "cpu"
    assert device_check.parse_args(["--parts", "a,b"]).parts == ["b", "a"]  # fixed order: throughput first
    monkeypatch.setenv("OUT", "/tmp/somewhere")
    assert device_check.parse_args([]).out == Path("/tmp/somewhere") and device_check.parse_args([]).parts == list("bacd")
    monkeypatch.delenv("OUT")
    assert device_check.parse_args([]).out == Path("device_out")
    with pytest.raises(SystemExit):
        device_check.parse_args(["--parts", "a,x"])


def test_device_check_isolates_failures_and_time_limits(device_check, monkeypatch, tmp_path) -> None:
    def boom(*_):
        raise RuntimeError("planted")

    def slow(args, device, deadline, report):
        report.put("first", 1)  # saved before the limit strikes: it must survive it
        time.sleep(5)

    monkeypatch.setattr(device_check, "part_b", boom)
    monkeypatch.setattr(device_check, "part_c", slow)
    monkeypatch.setattr(device_check, "part_d", lambda *_: {"value": 1})
    monkeypatch.setitem(device_check.LIMITS_S, "c", 0.3)
    start = time.monotonic()
    summary = device_check.main(["--parts", "b,c,d", "--device", "cpu", "--out", str(tmp_path)])
    assert time.monotonic() - start < 4
    assert "planted" in part(tmp_path, "b")["error"]
    c = part(tmp_path, "c")
    assert "limit" in c["error"] and c["first"] == 1 and c["seconds"] < 2
    assert part(tmp_path, "d")["value"] == 1
    assert summary["parts"] == ["b", "c", "d"] and json.loads((tmp_path / "summary.json").read_text())["d"]["value"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part_b.json", "part_c.json", "part_d.json", "summary.json"]


def test_device_check_budget_matches_outer_timeout(device_check) -> None:
    """The parts fit about 6 minutes, and device_check.sh's timeout is their sum plus a little."""
    total = sum(device_check.LIMITS_S.values())
    assert list(device_check.PARTS) == ["b", "a", "c", "d"] and total <= 360
    assert device_check.LIMITS_S["b"] >= device_check.LIMITS_S["a"] > device_check.LIMITS_S["c"]
    outer = int(re.search(r"timeout (?:-k \d+ )?(\d+) ", (REPO / "benchmarks" / "device_check.sh").read_text())[1])
    assert total < outer <= total + 30
    wheels = (REPO / "benchmarks" / "build_device_wheels.sh").read_text()
    assert "importlib_metadata==" not in wheels and re.search(r"typing_extensions==4\.\d+\.\d+", wheels)
    assert "pydantic==" in wheels


def test_device_check_quick_cpu_output_limits(quick_run) -> None:
    """What the device tool hands back: at most 8 files, no more than 2 folders below $OUT."""
    out, summary = quick_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert sorted(p.name for p in files) == ["part_a.json", "part_b.json", "part_c.json", "part_d.json", "summary.json"]
    assert summary["parts"] == ["b", "a", "c", "d"] and summary["quick"]
    for name in "bacd":  # every part ran to its end on the CPU
        assert "error" not in summary[name] and summary[name]["seconds"] > 0
    assert not any(out.glob("*.tmp")) and Path(summary["work_dir"]).is_dir()


def test_device_check_quick_part_b(quick_run) -> None:
    b = part(quick_run[0], "b")
    assert b["preset"] == "MDTv2-Tiny/2" and b["micro_batch"] == 2 and b["precision"] == "fp32"  # CPU: no bf16 units
    rows = b["summary"]["variants"]
    assert rows["compile"]["skipped"] and "CPU" in rows["compile"]["error"]
    eager, release = rows["eager"], rows["release-like"]
    assert eager["images_per_s"] > 0 and 0 < eager["mfu_spec"] < 1 and eager["peak_memory_gb"] > 0
    assert eager["ms_per_image"] == pytest.approx(1e3 / eager["images_per_s"])
    assert len(eager["step_losses"]) == 2 and math.isfinite(eager["first_step_loss"])  # warm-up 1 + timed 1
    assert len(eager["largest_costs_ms"]) == 3 and 0 < eager["matmul_share"] < 1  # one profiled step
    assert release["precision"] == "fp32" and release["micro_batch"] == 2
    assert set(b["runs"]["eager"]["variants"]) == {"eager", "release-like"}  # one child on a CPU (no compile)
    # adaLN-Zero init: step 1's loss is the same whatever the attention form or precision
    assert release["first_step_loss"] == pytest.approx(eager["first_step_loss"], rel=1e-5)
    assert b["summary"]["losses_compile_vs_eager"]["skipped"]
    goal = b["summary"]["goal_vs_measured"]
    assert goal["goal"] == {**b["goal"]} and goal["goal"]["mfu_spec"] == 0.5 and goal["goal"]["images_per_s"] == 375
    assert goal["measured"]["variant"] == "eager" and goal["met"] is False
    assert b["summary"]["best_over_release_like_per_image"] > 0
    assert b["runs"]["eager"]["variants"]["eager"]["dynamo"]["timed_steps"]["frames_compiled"] == 0


def test_device_check_quick_part_a(quick_run, device_check) -> None:
    a = part(quick_run[0], "a")
    assert list(a)[:8] == ["train_resume", "cuda_vs_cpu", "bf16_vs_fp32_xl_depth", "bias_table_grad",
                           "compiled_vs_eager", "fused_adan", "cuda_only_paths", "flex_vs_sdpa"]  # order of value
    for gpu_only in ("cuda_vs_cpu", "cuda_only_paths", "compiled_vs_eager", "train_resume"):
        assert a[gpu_only]["skipped"] and a[gpu_only]["reason"]
    prec = a["bf16_vs_fp32_xl_depth"]
    assert prec["ok"] and prec["preset"] == "MDTv2-Tiny/2"  # MDTv2-XL/2 on the GPU
    for mode in ("pure_bf16", "bf16_amp"):
        fwd, grads = prec[mode]["forward"], prec[mode]["grads"]
        assert 0 < fwd["rel_err"] <= fwd["tol"] and set(fwd["per_pass"]) == {"full", "masked"}
        assert 0 < grads["rel_err"] <= grads["tol"] and grads["missing"] == 0 and grads["bias_tables"] > 0
        assert grads["tensors"] > 50 and len(grads["worst"]) == 3
    bias = a["bias_table_grad"]
    assert bias["ok"] and bias["kept"] == 179 and bias["tokens"] == 256 and bias["heads"] == 16
    new = bias["new_fp32_gather"]
    assert 0 < new["rel_err"] <= new["tol"] and new["fp32_param_amp"] < 1e-6  # fp32 sums, no rounding
    assert bias["old_bf16_gather"]["rel_err"] > 0 and bias["old_over_new"] > 0
    adan = a["fused_adan"]  # runs on the CPU too: the compiled C++ kernel against the multi-tensor update
    assert adan["ok"] and adan["max_abs_diff"] <= adan["tol"] and adan["fused"]["sync_free"] is None  # no device
    flex = a["flex_vs_sdpa"]  # the child process: forward only on a CPU, at both head dims
    for head_dim in ("head_dim_16", "head_dim_72"):
        assert flex[head_dim]["forward"]["ok"] and flex[head_dim]["backward"]["skipped"]
    assert flex["check_flex_refuses_72"]["skipped"] and "error" not in flex


def test_device_check_quick_parts_c_d(quick_run) -> None:
    """Part (c) as it will run on the GPU (Tiny preset, batch 2, 2 timed steps here): DDPM-250 and
    the few-step solvers, with the calls each one costs; part (d) both precisions."""
    c = part(quick_run[0], "c")
    assert c["cfg_scale"] == 4.0 and c["batch"] == 2
    for variant in ("fp32_tf32", "bf16_autocast"):
        rows = {(r["sampler"], r["steps"], tuple(r["cfg_interval"] or ())): r for r in c[variant]["results"]}
        assert rows[("ddpm", 250, ())]["network_calls_per_image"] == 500 and rows[("ddpm", 250, ())]["extrapolated"]
        assert rows[("heun", 10, ())]["network_calls_per_image"] == 38
        assert rows[("dpm++2m", 20, (0, 500))]["network_calls_per_image"] < rows[("dpm++2m", 20, ())][
            "network_calls_per_image"] == 40
        assert all(r["images_per_second_best"] > 0 and r["cfg_scale"] == 4.0 for r in rows.values())
    assert c["bf16_autocast"]["autocast"] == "bf16" and c["fp32_tf32"]["autocast"] == "none"
    d = part(quick_run[0], "d")
    assert d["fp32_images_per_s"] > 0 and d["bf16_images_per_s"] > 0 and d["latent_shape"] == [2, 4, 8, 8]


def test_summarise_b_losses_goal_and_release(device_check) -> None:
    """The part-(b) summary on made-up child JSON: step losses compared, the goal beside the best
    variant, per-image speed-up over release-like at its own micro-batch, a failed child named."""
    def run(name: str, img_s: float, mfu: float, losses: list[float], batch: int = 32) -> dict:
        variant = {"images_per_s": img_s, "mfu_spec": mfu, "step_losses": losses, "first_step_loss": losses[0],
                   "precision": "bf16", "compile": name == "compile",
                   "profile": {"top_ms": {"mm": 9.0, "attn": 5.0, "ln": 2.0, "gelu": 1.0}, "matmul_share": 0.7}}
        return {"micro_batch": batch, "variants": {name: variant}, "peaks": {"bf16": {"spec_source": "table"}}}

    s = device_check.summarise_b({"compile": run("compile", 400.0, 0.53, [1.0, 0.9, 0.8]),
                                  "eager": run("eager", 300.0, 0.40, [1.0, 0.9, 0.81]),
                                  "release-like": run("release-like", 100.0, 0.2, [1.0], batch=16)})
    losses = s["losses_compile_vs_eager"]
    assert losses["first_step"]["ok"] and losses["first_step"]["rel_diff"] == 0
    assert losses["max_rel_diff_after_step_1"] == pytest.approx(0.01 / 0.81) and "adaLN-Zero" in losses["first_step_note"]
    assert s["goal_vs_measured"]["measured"] == {"variant": "compile", "images_per_s": 400.0, "mfu_spec": 0.53}
    assert s["goal_vs_measured"]["met"] and s["best_over_release_like_per_image"] == pytest.approx(4.0)
    assert list(s["variants"]["compile"]["largest_costs_ms"]) == ["mm", "attn", "ln"]
    s = device_check.summarise_b({"compile": {"error": "timed out after 115 s"}, "eager": run("eager", 300.0, 0.4, [1.0])})
    assert s["variants"]["compile"]["error"].startswith("timed out") and s["losses_compile_vs_eager"]["skipped"]
    assert s["goal_vs_measured"]["measured"]["variant"] == "eager" and not s["goal_vs_measured"]["met"]


def test_train_resume_reruns_nan_without_fill(device_check, monkeypatch, tmp_path) -> None:
    """NaN in deterministic mode is rerun once with fill_uninitialized_memory off; every mode is
    saved to the part's JSON as soon as it ends."""
    import device_check_train as train  # on sys.path through the device_check fixture
    from device_common import Report

    report, calls = Report(tmp_path / "part_a.json"), []

    def fake_mode(work, name, det, fill, left):
        calls.append((name, det, fill))
        if calls[-1] != ("deterministic", True, True):  # what the file held when this mode began
            assert set(json.loads(report.path.read_text())["train_resume"]) >= {"deterministic"}
        nan = det and fill
        return {"nan_losses": nan, "ok": not nan, "straight_wall_s": 10.0, "median_step_time_s": 0.1}

    monkeypatch.setattr(train, "resume_mode", fake_mode)
    out = train.check_resume(tmp_path, quick=False, deadline=time.monotonic() + 60, report=report)
    assert calls == [("deterministic", True, True), ("deterministic_no_fill", True, False), ("normal", False, True)]
    assert "fill_uninitialized_memory" in out["deterministic"]["note"] and not out["ok"]
    assert "uninitialised read" in out["deterministic_no_fill"]["verdict"]
    assert json.loads(report.path.read_text())["train_resume"]["normal"]["ok"]
    assert out["deterministic_cost"]["wall_ratio_det_over_normal"] == 1.0


def test_device_check_helpers(device_check) -> None:
    import device_check_train as train
    import device_common as common

    ref = torch.ones(4)
    assert common.rel_err(ref * 1.01, ref) == pytest.approx(0.01)
    assert common.rel_err(torch.full((4,), float("nan")), ref) == float("inf")
    assert not common.check(0.2, 0.1)["ok"] and common.check(0.05, 0.1)["ok"]
    assert train.losses_by_step([{"step": 3, "loss": 0.5}, {"step": 4}]) == {3: 0.5}
    finite = {"returncode": 0, "stats": [{"step": 1, "loss": 0.5}], "stderr": ""}
    assert not train.has_nan([finite])
    assert train.has_nan([finite, {"returncode": 0, "stats": [{"step": 2, "loss": float("nan")}], "stderr": ""}])
    assert train.has_nan([{"returncode": 1, "stats": [], "stderr": "mdt-train: error: non-finite loss at step 3"}])
    assert "real bug" in train.nan_verdict({"nan_losses": True})


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
    assert len(eager["step_losses"]) == 2 and eager["first_step_loss"] == eager["step_losses"][0]  # warm-up + timed
    dynamo = eager["dynamo"]  # eager compiles nothing: no frames, graphs or recompiles
    assert dynamo["recompiles"] == 0 and dynamo["warmup"]["frames_compiled"] == dynamo["timed_steps"]["frames_compiled"] == 0
    assert 0 < eager["mfu_spec"] < 1 and 0 < eager["mfu_measured"] < 1
    assert r["variants"]["release-like"]["attention"] == "explicit" and r["variants"]["release-like"]["precision"] == "fp32"
    assert r["variants"]["flex"]["train_step"] == "unavailable" and "CPU" in r["variants"]["flex"]["reason"]
    assert {"ours_vs_release_like", "eager_vs_explicit", "best_variant"} <= set(r["ratios"])
    assert r["peaks"]["fp32"]["measured_flops"] > 0 and r["peaks"]["fp32"]["spec_source"]
    profile = eager["profile"]
    assert 0 < profile["matmul_share"] < 1 and profile["non_matmul_share"] == pytest.approx(1 - profile["matmul_share"])
    assert profile["non_matmul_share_per_step"] == [profile["non_matmul_share"]]  # --quick profiles one step
    assert len(profile["top_ms"]) >= 3 and list(profile["top_ms"].values()) == sorted(profile["top_ms"].values(), reverse=True)
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
