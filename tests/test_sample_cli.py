"""mdt-sample's inputs and user errors: a failed run does not lock --output, the offline VAE and
hub errors name the repo and today's `hf download`, the codec defaults to the run's training
codec, non-preset official checkpoints load (shapes inferred, "custom"), hf:// checkpoints come
from the hub cache offline, and every user error is one `mdt-sample: error:` line, exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from mdt_ds.config import ConfigError, ModelConfig, TrainConfig, to_dict
from mdt_ds.models import build_model
from mdt_ds.tools import sample as sample_cli
from mdt_ds.tools import sample_inputs
from mdt_ds.tools.convert_checkpoint import WeightsFileError, load_state_dict_file

FAST = ["--num-samples", "4", "--batch-size", "2", "--steps", "2", "--cfg-scale", "1", "--no-progress"]
TINY = ["--model", "MDTv2-Tiny/2"]


def save_tiny(path: Path, **overrides) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = build_model(ModelConfig.from_preset("MDTv2-Tiny/2", **overrides)).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ema_0000100.pt"
    save_tiny(path)
    return path


@pytest.fixture(autouse=True)
def quiet_diffusers():
    """diffusers' own stderr handler keeps the stream of the test that first used it (capsys closes
    it afterwards) and warns about `accelerate` at every load: keep it to errors here."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(level)


def run(capsys, *argv: str) -> tuple[int, str]:
    """main() in this process with one thread; (exit code, stderr)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = sample_cli.main(list(argv))
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The error line: exactly one, last (libraries may log warnings before it), no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mdt-sample: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


# --------------------------------------------------------------------------- item 3
def test_a_failed_run_does_not_lock_its_output(tiny_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "s.npz"
    parts = out.with_name(out.name + ".parts")
    base = ["--ckpt", str(tiny_ckpt), "--output", str(out), *TINY, *FAST]
    code, err = run(capsys, *base, "--vae", "mdt-ds-tests/no-such-vae")
    assert code == 2 and "no-such-vae" in one_error_line(err)
    assert not (parts / "run.json").exists()  # nothing recorded: no shard was made
    code, _ = run(capsys, *base, "--vae", "tiny-random", "--max-batches", "1")
    assert code == 0 and len(sample_cli.list_parts(parts)) == 1
    code, err = run(capsys, *base, "--vae", "tiny-random", "--seed", "6")
    line = one_error_line(err)
    assert code == 2 and "other settings (seed)" in line and "--overwrite" in line
    code, _ = run(capsys, *base, "--vae", "tiny-random", "--seed", "6", "--overwrite")
    assert code == 0 and json.loads(out.with_suffix(".json").read_text())["settings"]["seed"] == 6


# --------------------------------------------------------------------------- item 4
def test_offline_vae_error_names_the_repo_and_hf_download(tiny_ckpt, tmp_path, capsys) -> None:
    argv = ["--ckpt", str(tiny_ckpt), "--output", str(tmp_path / "s.npz"), *TINY, *FAST, "--vae", "ema"]
    code, err = run(capsys, *argv)
    line = one_error_line(err)
    assert code == 2 and "'stabilityai/sd-vae-ft-ema'" in line
    assert "hf download stabilityai/sd-vae-ft-ema" in line and "HF_HUB_OFFLINE" in line
    assert "huggingface-cli" not in line and "sd-vae-ft-mse" not in line


# --------------------------------------------------------------------------- item 5
def make_run(root: Path, codec_source: str) -> Path:
    """A run directory whose snapshot's config names a shard folder encoded by ``codec_source``."""
    from mdt_ds.data.shards import SampleLayout, build_manifest, write_manifest, write_shard

    data = root / "latents"
    data.mkdir(parents=True)
    codec = {"name": "sd-vae", "source": codec_source, "scale_factor": 0.18215}
    layout = SampleLayout("moments", (2, 8, 8, 8), "float16", codec, 64)
    record = write_shard(data, "train-000000.tar", layout, [(0, np.zeros((2, 8, 8, 8), np.float16), 0, "x/0")])
    write_manifest(data, build_manifest(layout, [record], {"0": 0}, 100, True))
    cfg = dataclasses.replace(TrainConfig(model=ModelConfig.from_preset("MDTv2-Tiny/2")), run_dir=str(root))
    cfg.data.source = str(data)
    snapshot = root / "snapshots" / "ema_0000100.pt"
    save_tiny(snapshot)
    (snapshot.parent / "config.json").write_text(json.dumps(to_dict(cfg)))
    return snapshot


def test_codec_defaults_to_the_training_codec(tmp_path, capsys, caplog) -> None:
    snapshot = make_run(tmp_path / "run", "tiny-random")
    run_file = snapshot.parent / "config.json"
    assert sample_inputs.choose_codec(None, run_file) == "tiny-random"
    assert sample_inputs.choose_codec(None, None) == "ema"  # official checkpoints: the paper's decoder
    with caplog.at_level(logging.WARNING, logger="mdt_ds.sample"):
        assert sample_inputs.choose_codec("ema", run_file) == "ema"
    assert "differs from the codec the run was trained on (tiny-random)" in caplog.text
    out = tmp_path / "s.npz"
    code, err = run(capsys, "--ckpt", str(snapshot), "--output", str(out), *FAST)  # no --model, no --vae
    assert code == 0, err
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["vae"] == "tiny-random"
    helptext = " ".join(sample_cli.build_parser().format_help().split())
    assert "the codec it was trained on" in helptext and "for official checkpoints 'ema', the paper's" in helptext


# --------------------------------------------------------------------------- item 6
def test_non_preset_official_checkpoint(tmp_path, capsys, caplog) -> None:
    path = tmp_path / "tiny16.pt"
    state = save_tiny(path, input_size=16)
    with caplog.at_level(logging.INFO, logger="mdt_ds.sample"):
        cfg = sample_inputs.model_config(["MDTv2-Tiny/2"], None, path, state)
        assert cfg.input_size == 16 and cfg.preset == "custom"
        assert "input_size=16 (preset 8)" in caplog.text
        bare = sample_inputs.model_config(None, None, path, state)  # not XL/2: the shapes decide
    assert (bare.hidden_size, bare.depth, bare.num_heads, bare.num_classes, bare.input_size) == (64, 4, 4, 10, 16)
    assert bare.decode_layer == 2 and bare.preset == "custom" and "no --model: inferred" in caplog.text
    assert sample_inputs.model_config(["MDTv2-Tiny/2", "input_size=16"], None, path, state).preset == "custom"
    sample_inputs.load_model(state, bare, torch.device("cpu"))
    fields = {k: v for k, v in dataclasses.asdict(bare).items() if k != "preset"}
    hand_written = tmp_path / "hand" / "config.json"
    hand_written.parent.mkdir()
    hand_written.write_text(json.dumps({"model": fields}))  # no preset key: labelled "custom", not "MDTv2-S/2"
    assert sample_inputs.model_config(None, hand_written, path, state).preset == "custom"
    preset_state = build_model("MDTv2-Tiny/2").state_dict()
    assert sample_inputs.model_config(None, None, path, preset_state).preset == "MDTv2-Tiny/2"
    forced = sample_inputs.model_config(["MDTv2-Tiny/2", "input_size=8"], None, path, state)  # the user wins
    with pytest.raises(sample_inputs.SampleError, match=r"pos_embed: checkpoint \[1, 64, 64\] vs model \[1, 16, 64\]"):
        sample_inputs.load_model(state, forced, torch.device("cpu"))

    out = tmp_path / "s.npz"
    code, err = run(capsys, "--ckpt", str(path), "--output", str(out), *TINY, "--vae", "tiny-random", *FAST)
    assert code == 0, err
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["model"]["preset"] == "custom"
    for bad, says in (
        (["MDTv2-Huge/2"], "unknown model preset"),
        (["MDTv2-Tiny/2", "foo=1"], "unknown key model.foo"),
        (["MDTv2-Tiny/2", "depth"], "is not key=value"),
    ):
        code, err = run(capsys, "--ckpt", str(path), "--model", *bad, "--vae", "tiny-random", *FAST)
        assert code == 2 and says in one_error_line(err)


# --------------------------------------------------------------------------- item 13
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def use_hub_cache(monkeypatch, cache: Path) -> None:
    """HF_HUB_CACHE at ``cache``, offline; huggingface_hub read both at import, so patch its constants too."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_hf_checkpoint_from_the_hub_cache_offline(tmp_path, monkeypatch, capsys) -> None:
    repo = tmp_path / "hub" / "models--shgao--MDT-XL2"
    state = save_tiny(repo / "snapshots" / COMMIT / "mdt_xl2_v2_ckpt.pt")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    use_hub_cache(monkeypatch, tmp_path / "hub")
    spec = "hf://shgao/MDT-XL2/mdt_xl2_v2_ckpt.pt"
    loaded = load_state_dict_file(spec)  # the trainer's init_from goes through this
    assert loaded.keys() == state.keys() and torch.equal(loaded["pos_embed"], state["pos_embed"])
    out = tmp_path / "s.npz"
    code, err = run(capsys, "--ckpt", spec, "--output", str(out), *TINY, "--vae", "tiny-random", *FAST)
    assert code == 0, err
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["checkpoint"] == spec

    use_hub_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(WeightsFileError, match="hf download shgao/MDT-XL2 mdt_xl2_v2_ckpt.pt"):
        load_state_dict_file(spec)
    code, err = run(capsys, "--ckpt", spec, *TINY, "--vae", "tiny-random", *FAST)
    line = one_error_line(err)
    assert code == 2 and "hf download shgao/MDT-XL2 mdt_xl2_v2_ckpt.pt" in line and "HF_HUB_OFFLINE" in line


# --------------------------------------------------------------------------- item 7
def test_files_that_are_not_checkpoints(tmp_path, capsys) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("experiment notes, not weights\n")
    fake = tmp_path / "notes.safetensors"
    fake.write_text("not a safetensors file either\n")
    for path in (text, fake):
        with pytest.raises(WeightsFileError, match=rf"{path.name} is not a checkpoint: expected a state_dict"):
            load_state_dict_file(path)
    assert issubclass(WeightsFileError, ConfigError)  # mdt-train reports init_from errors as config errors
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"w": torch.zeros(1), "args": argparse.Namespace(lr=1)}, unsafe)  # needs pickled objects
    lists = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], lists)
    cases = {
        text: "is not a checkpoint",
        tmp_path / "missing.pt": "does not exist",
        unsafe: "NOT loaded",
        lists: "is not a state_dict",
    }
    for path, says in cases.items():
        code, err = run(capsys, "--ckpt", str(path), *TINY, "--vae", "tiny-random", *FAST)
        line = one_error_line(err)
        assert code == 2 and says in line and path.name in line


@pytest.mark.parametrize("fails", [False, True])
def test_rank_0_packs_after_every_rank_left_the_group(monkeypatch, capsys, fails: bool) -> None:
    """The 50K npz is packed by rank 0 after the process group is torn down: no other rank waits
    for it in a collective whose timeout the pack could outlast. A pack error is rank 0's one
    line and exit 2."""
    from mdt_ds import dist
    from mdt_ds.dist import DistEnv

    events: list[str] = []

    def pack() -> None:
        events.append("pack")
        if fails:
            raise sample_cli.SampleError("samples.parts: have 10 of 50000 images; rerun the same command to finish")

    monkeypatch.setattr(dist, "launcher_env", lambda argv=(): DistEnv(0, 0, 2, "127.0.0.1", 1, "torchrun"))
    monkeypatch.setattr(dist, "init", lambda *args, **kwargs: events.append("init"))
    monkeypatch.setattr(dist, "teardown", lambda synchronise=False: events.append(f"teardown {synchronise}"))
    monkeypatch.setattr(dist, "exit_launched_rank", lambda code: events.append(f"exit {code}") or code)
    monkeypatch.setattr(sample_cli, "sample_main", lambda args: events.append("sampled") or pack)
    sample_cli.main(["--ckpt", "x.pt", "--num-samples", "50000"])
    assert events == ["init", "sampled", "teardown True", "pack", f"exit {2 if fails else 0}"]
    assert ("have 10 of 50000 images" in capsys.readouterr().err) == fails


# --------------------------------------------------------------------------- nothing misleading
def test_a_checkpoint_folder_or_a_json_file_as_ckpt_says_what_to_pass(tmp_path, capsys) -> None:
    """A step folder said "does not exist"; a config.json got the crafted-pickle refusal."""
    run_dir = tmp_path / "run"
    step = run_dir / "checkpoints" / "step_0000100"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    config = run_dir / "config.json"
    config.write_text(json.dumps(to_dict(TrainConfig())))
    expected = {
        step: f"{step} is a training checkpoint folder, not a weights file: use an EMA snapshot "
              f"({run_dir / 'snapshots'}/ema_*.pt), or convert it: "
              f"python -m mdt_ds.tools.convert_checkpoint {step} OUT.pt",
        config: f"{config} is not a checkpoint (it holds JSON, e.g. a run's config.json): expected a state_dict",
    }
    for ckpt, says in expected.items():
        code, err = run(capsys, "--ckpt", str(ckpt), *TINY, "--vae", "tiny-random", *FAST)
        line = one_error_line(err)
        assert code == 2 and says in line and "pickled code" not in line, line


def test_a_moved_vae_folder_fails_at_the_start_and_vae_points_to_it(tmp_path, capsys, monkeypatch, caplog) -> None:
    """The manifest names the VAE folder the latents were made with; moved, mdt-sample said
    `hf download /a/local/path` after loading the model. Now: one line before the checkpoint
    loads, and --vae DIR (the folder's new place) samples without a warning."""
    from mdt_ds.models.codec import load_codec

    moved = tmp_path / "vae-was-here"
    snapshot = make_run(tmp_path / "run", str(moved))
    argv = ["--ckpt", str(snapshot), "--output", str(tmp_path / "s.npz"), *FAST]
    with monkeypatch.context() as patch:
        patch.setattr(sample_cli, "load_state", lambda path: pytest.fail("the checkpoint loaded before the VAE check"))
        code, err = run(capsys, *argv)
    assert code == 2 and one_error_line(err) == (
        f"mdt-sample: error: the VAE folder {moved} does not exist (moved, or not copied to this machine?): "
        "pass --vae DIR, DIR being where it is now")
    now = tmp_path / "vae-now"
    load_codec("tiny-random").vae.save_pretrained(str(now))
    with caplog.at_level(logging.INFO, logger="mdt_ds.sample"):
        code, err = run(capsys, *argv, "--vae", str(now))
    assert code == 0, err
    assert f"the run's VAE folder {moved} is not here; decoding with --vae {now}" in caplog.text
    assert "differs from the codec" not in caplog.text


def test_a_run_checks_its_decoder_at_the_start_and_data_vae_points_to_a_moved_one(tmp_path, monkeypatch) -> None:
    """check_decoder (the trainer calls it before the first step) names data.vae for a moved
    folder and gives `hf download` advice for a hub id only; data.vae decodes the grids."""
    from mdt_ds.config import apply_overrides
    from mdt_ds.grids import check_decoder, codec_for_source
    from mdt_ds.models.codec import load_codec

    moved = tmp_path / "vae-was-here"
    data = make_run(tmp_path / "run", str(moved)).parent.parent / "latents"
    assert check_decoder(apply_overrides(TrainConfig(), [f"data.source={data}"])) == ""  # it never decodes
    cfg = apply_overrides(TrainConfig(), [f"data.source={data}", "sample_every=100"])
    with pytest.raises(ConfigError) as err:
        check_decoder(cfg)
    assert str(err.value) == (f"the VAE named by the manifest of {data}: the VAE folder {moved} does not exist "
                              "(moved, or not copied to this machine?): pass data.vae=DIR, DIR being where it is now")
    now = tmp_path / "vae-now"
    load_codec("tiny-random").vae.save_pretrained(str(now))
    cfg = apply_overrides(cfg, [f"data.vae={now}"])
    assert check_decoder(cfg) == str(now) and codec_for_source(str(data), 4, vae=cfg.data.vae).source == str(now)
    with pytest.raises(ConfigError, match=rf"^data.vae={tmp_path / 'gone'}: the VAE folder .* does not exist"):
        check_decoder(apply_overrides(cfg, [f"data.vae={tmp_path / 'gone'}"]))
    use_hub_cache(monkeypatch, tmp_path / "empty-hub")
    with pytest.raises(ConfigError) as err:
        check_decoder(apply_overrides(cfg, ["data.vae=stabilityai/sd-vae-ft-ema"]))
    assert "hf download stabilityai/sd-vae-ft-ema" in str(err.value) and "(data.vae=DIR)" in str(err.value)
