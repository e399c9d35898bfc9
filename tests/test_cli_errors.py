"""Expected user errors are one line with exit code 2, before anything is built: the model
against the data (shape, channels, classes; ``auto`` from the manifest), optimizer values named
by key, batch advice that works, and the same line and code through plain python, torchrun and
the deepspeed launcher (under mdt-launch)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from mdt_ds.config import ConfigError, TrainConfig, apply_overrides, resolve_batch
from mdt_ds.dist import free_port
from tests.conftest import PYTHON, REPO, subprocess_env

pytestmark = pytest.mark.trainer

TINY = ["model.preset=MDTv2-Tiny/2", "model.input_size=16", "model.in_channels=1", "data.source=mnist16",
        "data.num_workers=0", "global_batch=8", "steps=1"]


def env() -> dict[str, str]:
    return subprocess_env(MDT_DS_DATA=str(REPO / ".cache" / "data"))


def config(*overrides: str) -> TrainConfig:
    return apply_overrides(TrainConfig(), [*TINY, *overrides])


def test_the_model_is_checked_against_the_manifest() -> None:
    from mdt_ds.data.compat import fit_model_to_data

    assert fit_model_to_data(config()).model.input_size == 16
    cases = {
        "model.input_size=8": r"holds 1x16x16 samples \(pixel\) of 10 classes, but model.input_size=8 "
                              r"\(set model.input_size=16 or auto\)",
        "model.in_channels=4": r"model.in_channels=4 \(set model.in_channels=1 or auto\)",
        "model.num_classes=2": r"model.num_classes=2 is fewer than the data's labels \(set model.num_classes=10",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            fit_model_to_data(config(override))
    fitted = fit_model_to_data(config("model.input_size=auto", "model.in_channels=auto", "model.num_classes=auto"))
    assert (fitted.model.input_size, fitted.model.in_channels, fitted.model.num_classes) == (16, 1, 10)
    with pytest.raises(ConfigError, match="input_size=auto is resolved from the data"):
        config("model.input_size=auto").model.model_kwargs()  # never built unresolved
    with pytest.raises(ConfigError, match="data.source: .*neither a shard directory"):
        fit_model_to_data(config("data.source=/nonexistent/shards"))


def test_more_label_rows_than_classes_is_asked_for_explicitly(tmp_path: Path) -> None:
    """A 20-class model on 10-class data left 10 label rows untrained (one INFO line) and the
    sampler then drew from all 20: now a config error with auto as the fix, unless asked for
    (data.untrained_classes=true); then grids, the in-training FID and mdt-sample draw only the
    10 trained classes, and mdt-sample says so."""
    import torch

    from mdt_ds.config import ModelConfig
    from mdt_ds.data.compat import fit_model_to_data
    from mdt_ds.grids import trained_classes
    from mdt_ds.models import build_model
    from mdt_ds.sampling import SampleOptions, sample_labels
    from mdt_ds.tools import sample as sample_cli

    with pytest.raises(ConfigError, match=r"model.num_classes=20 would leave 10 label rows untrained for sampling to "
                                          r"draw from \(set model.num_classes=10 or auto, or data.untrained_classes"):
        fit_model_to_data(config("model.num_classes=20"))
    asked = fit_model_to_data(config("model.num_classes=20", "data.untrained_classes=true"))
    assert asked.model.num_classes == 20 and trained_classes(asked) == 10 and trained_classes(config()) == 10
    run_file = tmp_path / "config.json"
    run_file.write_text(json.dumps({"data": {"source": "mnist16"}}))
    model_cfg = ModelConfig.from_preset("MDTv2-Tiny/2", num_classes=20)
    assert sample_cli._label_classes(run_file, model_cfg) == 10
    assert sample_cli._label_classes(None, model_cfg) == 0  # an official checkpoint: every row
    options = SampleOptions(label_classes=10)
    assert "label_classes" not in SampleOptions().as_dict() and options.as_dict()["label_classes"] == 10
    labels = sample_labels(range(200), options.label_classes, 0)
    assert int(labels.max()) == 9 and len(set(labels.tolist())) == 10
    from mdt_ds.sampling import sample_batch

    class Pixels:
        def decode(self, latents: torch.Tensor) -> torch.Tensor:
            return latents[:, :1].clamp(-1, 1)

    model, few = build_model(model_cfg), SampleOptions(steps=2, sampler="ddim", label_classes=10)
    _, drawn = sample_batch(model, few.diffusion(), Pixels(), range(64), 0, few)
    assert int(drawn.max()) < 10 and model.num_classes == 20


def test_the_default_config_fits_the_default_data() -> None:
    """A bare mdt-train used to fail: the default model (S/2 at 32x32x4, 1000 classes) did not
    fit the default data (16x16 digits, 10 classes). The data fields now default to auto."""
    from mdt_ds.data.compat import fit_model_to_data

    fitted = fit_model_to_data(TrainConfig())
    assert (fitted.model.input_size, fitted.model.in_channels, fitted.model.num_classes) == (16, 1, 10)
    assert fitted.model.hidden_size == 384  # S/2's width
    dry = subprocess.run([PYTHON, "-m", "mdt_ds.train", "--dry-run"], env=env(), capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert dry.returncode == 0, dry.stderr[-2000:]


def test_optimizer_values_and_batch_advice_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"optim.lr must be >= 0, got -0.001"):
        config("optim.lr=-1e-3")
    with pytest.raises(ConfigError, match=r"optim.betas must each be in \[0, 1\)"):
        config("optim.betas=[0.9,1.5,0.99]")
    with pytest.raises(ConfigError, match=r"does not split over 2 processes.*global_batch=6 or 8"):
        resolve_batch(config("global_batch=7"), 2)
    assert resolve_batch(config("global_batch=8"), 2) == (4, 1)  # the advice works


def test_dry_run_catches_the_mismatch_in_one_line(tmp_path: Path) -> None:
    cmd = [PYTHON, "-m", "mdt_ds.train", *TINY, f"run_dir={tmp_path}", "model.input_size=8", "--dry-run"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1].startswith("mdt-train: config error: the model (MDTv2-Tiny/2)")
    assert "Traceback" not in proc.stderr


LAUNCHERS = {
    "python": lambda: [PYTHON, "-m", "mdt_ds.train"],
    "torchrun": lambda: [PYTHON, "-m", "mdt_ds.supervise", "--", PYTHON, "-m", "torch.distributed.run",
                         "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                         f"--master_port={free_port()}", "-m", "mdt_ds.train"],
    "deepspeed": lambda: [PYTHON, "-m", "mdt_ds.supervise", "--", str(Path(PYTHON).parent / "deepspeed"),
                          "--num_gpus", "2", "--master_port", str(free_port()), "--module", "mdt_ds.train"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_a_config_error_is_one_line_and_exit_2_through_every_launcher(tmp_path: Path, launcher: str) -> None:
    """4 classes of data, 2 in the model (num_classes=2 of 10 here): every rank stops before
    building anything; rank 0 alone prints the line; the exit code is 2, not torchrun's 1."""
    cmd = [*LAUNCHERS[launcher](), *TINY, f"run_dir={tmp_path / 'run'}", "model.num_classes=2"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180, cwd=REPO)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "mdt-train: config error" in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "model.num_classes=2 is fewer than the data's labels" in lines[0], lines
    # no launcher failure report either: under mdt-launch the workers exit 0 and the code travels
    # in the exit file (torchrun would print a ChildFailedError traceback for an exit 2)
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the run dir was written


def test_help_lists_config_sections_defaults_and_dry_run(capsys: pytest.CaptureFixture) -> None:
    from mdt_ds.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "config sections" in text and "optim: name='adan', lr=0.0003" in text and "data: source='mnist16'" in text
    assert "--dry-run" in text.split("config sections")[1] and re.search(r"\(default:\s+\[\]\)", text)


def test_extraction_workers_default_to_the_cpus_available() -> None:
    import os

    from mdt_ds.tools.extract_latents import default_workers, parse_args

    assert default_workers() == max(1, min(4, len(os.sched_getaffinity(0))))
    assert parse_args(["--input", "x", "--output", "y"]).workers == default_workers()


def test_loading_a_vae_prints_no_accelerate_block(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    from mdt_ds.models.codec import VAECodec, load_codec

    load_codec("tiny-random").vae.save_pretrained(str(tmp_path))
    capfd.readouterr()
    VAECodec.from_pretrained(str(tmp_path))
    out = capfd.readouterr()
    assert "accelerate" not in out.out + out.err


def test_a_missing_data_set_or_weights_file_is_one_line(tmp_path: Path) -> None:
    for override, message in ((f"data.source={tmp_path / 'nope'}", "data.source: data source"),
                              (f"init_from={tmp_path / 'w.pt'}", "does not exist")):
        cmd = [PYTHON, "-m", "mdt_ds.train", *TINY, f"run_dir={tmp_path / 'run'}", override]
        proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def undocumented(text: str) -> list[str]:
    """Options printed by --help with no help text (argparse writes the bare invocation)."""
    lines = text.splitlines()
    bare = []
    for i, line in enumerate(lines):
        match = re.match(r"^  (-\S.*?)(\s{2,}\S.*)?$", line)
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if match and not match.group(2) and not following.startswith(" " * 24):
            bare.append(match.group(1))
    return bare


def test_every_cli_help_documents_its_options_and_defaults_once(capsys: pytest.CaptureFixture) -> None:
    """Options without help, "(default: )", defaults printed twice, usages that left out the
    launcher's `--` or named demo.py, a crop size said to be "256 or 512", and mdt-info's peak
    table without the V100 that the docs recommend fp16 on."""
    from mdt_ds import demo, launch, supervise
    from mdt_ds.metrics import cli as eval_cli
    from mdt_ds.tools import extract_latents, info
    from mdt_ds.tools import sample as sample_cli

    mains = {"mdt-extract-latents": extract_latents.main, "mdt-sample": sample_cli.main, "mdt-info": info.main,
             "mdt-submit": launch.main, "mdt-launch": supervise.main, "demo": demo.main, "mdt-eval": eval_cli.main}
    helps = {}
    for name, main in mains.items():
        with pytest.raises(SystemExit) if name != "mdt-info" else contextlib.nullcontext():
            main(["--help"])
        helps[name] = capsys.readouterr().out
        assert undocumented(helps[name]) == [], (name, undocumented(helps[name]))
        flat = " ".join(helps[name].split())
        assert "(default: )" not in flat and not re.search(r"\(default[^()]*\) \(default", flat), name
    assert helps["mdt-launch"].startswith("usage: mdt-launch [-h] [--grace GRACE] -- LAUNCHER ARGS...")
    assert helps["demo"].startswith("usage: python -m mdt_ds.demo [-h]")
    extract = " ".join(helps["mdt-extract-latents"].split())
    assert "256 or 512 (32 or 64 for small tests)" in extract and "--prefix PREFIX shard file names" in extract
    assert "--time TIME, -t TIME time limit: minutes or [D-]HH:MM:SS (default: 24:00:00)" in " ".join(
        helps["mdt-submit"].split())
    assert "V100 SXM2, V100 PCIe" in " ".join(helps["mdt-info"].split())
    assert "--precision {bf16,bf16-amp,fp16,fp32}" in helps["mdt-info"]
    assert info.main(["--gpu", "V100", "--precision", "fp16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["speed"]["peak_flops"] == 125e12
