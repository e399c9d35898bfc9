"""mdt-eval's guard rails and extras: warnings for too few images and for mismatched image sizes
(printed early and recorded in metrics.json), the reference summary JSON beside the batch, the
`show` grid, and --help with every default. Features come from the seeded tiny network
(``--inception tiny-random``, 32-d pool, 32 px input), never the real Inception."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mdt_ds.metrics import cli
from mdt_ds.metrics.checks import protocol_checks
from mdt_ds.metrics.npz import AdmBatch, NpzWriter

pytestmark = pytest.mark.evaluation
TINY = ["--inception", "tiny-random", "--no-progress", "--batch-size", "16"]


def write_batch(path: Path, n: int, size: int, labels: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    arrays = [images, np.arange(n, dtype=np.int64) % 10] if labels else [images]
    np.savez(path, *arrays)
    return path


def evaluate(tmp_path: Path, ref: Path, sample: Path, capsys) -> tuple[dict, str]:
    out = tmp_path / "metrics.json"
    assert cli.main([str(ref), str(sample), *TINY, "--fd-method", "eigh", "--out", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().err


# --------------------------------------------------------------------------- warnings
def test_small_n_and_size_mismatch_warn_and_are_recorded(tmp_path, capsys) -> None:
    ref = write_batch(tmp_path / "ref.npz", 40, 32)
    sample = write_batch(tmp_path / "sample.npz", 20, 16, seed=1)
    results, err = evaluate(tmp_path, ref, sample, capsys)
    assert "mdt-eval: warning: sample N=20 is not above the feature dimension 32" in err
    assert "sample images are 16x16 but reference images are 32x32" in err and "tf1-bilinear to 32x32" in err
    assert len(results["warnings"]) == 2 and "rank at most 19" in results["warnings"][0]
    assert results["num_samples"] == 20 and results["reference_statistics_images"] == 40
    assert results["sample_image_size"] == [16, 16] and results["reference_image_size"] == [32, 32]
    assert results["inception_source"] == "tiny-random" and results["resize"] == "tf1-bilinear to 32x32"


def test_no_warning_when_n_exceeds_the_dimension_and_sizes_match(tmp_path, capsys) -> None:
    ref = write_batch(tmp_path / "ref.npz", 40, 32)
    sample = write_batch(tmp_path / "sample.npz", 36, 32, seed=1)
    results, err = evaluate(tmp_path, ref, sample, capsys)
    assert results["warnings"] == [] and "warning" not in err
    assert results["num_samples"] == 36 and results["feature_dim"] == 32


def test_the_threshold_is_inceptions_2048_on_both_sides(tmp_path) -> None:
    """N <= 2048 gives a covariance of rank <= 2047 < 2048; 2049 images are enough (1-pixel images
    keep this cheap, no network runs). A reference with stored statistics takes its N from the
    summary JSON that `mdt-eval ref` writes beside it; without one its N is unknown (no warning)."""
    inception = SimpleNamespace(pool_dim=2048, input_size=299, description={"source": "fake", "resize": "tf1-bilinear"})
    at, above = write_batch(tmp_path / "a.npz", 2048, 1), write_batch(tmp_path / "b.npz", 2049, 1)
    assert protocol_checks(AdmBatch(above), AdmBatch(above), inception)["warnings"] == []
    warned = protocol_checks(AdmBatch(above), AdmBatch(at), inception)["warnings"]
    assert len(warned) == 1 and warned[0].startswith("sample N=2048") and "2047 < 2048" in warned[0]
    with NpzWriter(tmp_path / "stats.npz") as writer:  # statistics only, as VIRTUAL_imagenet256 stores them
        writer.add("mu", np.zeros(2048))
        writer.add("sigma", np.eye(2048))
    stats = AdmBatch(tmp_path / "stats.npz", require_images=False)
    unknown = protocol_checks(stats, AdmBatch(above), inception)
    assert unknown["reference_statistics_images"] is None and unknown["warnings"] == []
    (tmp_path / "stats.json").write_text(json.dumps({"images_in_statistics": 1000, "image_size": 64}))
    known = protocol_checks(stats, AdmBatch(above), inception)
    assert known["reference_statistics_images"] == 1000 and known["reference_image_size"] == [64, 64]
    assert [w.split(" ")[0] for w in known["warnings"]] == ["reference", "sample"]  # N, then 1x1 vs 64x64


# --------------------------------------------------------------------------- ref summary
def test_ref_writes_its_summary_beside_the_npz_and_eval_reads_it(tmp_path, capsys) -> None:
    source = write_batch(tmp_path / "source.npz", 40, 32)
    out = tmp_path / "ref.npz"
    assert cli.main(["ref", str(source), str(out), *TINY, "--workers", "0", "--num-images", "8"]) == 0
    summary = json.loads((tmp_path / "ref.json").read_text())
    assert summary["images_in_statistics"] == 40 and summary["images_kept"] == 8 and summary["output"] == str(out)
    assert f"wrote {out} and {tmp_path / 'ref.json'}" in capsys.readouterr().out
    sample = write_batch(tmp_path / "sample.npz", 36, 32, seed=2)
    results, _ = evaluate(tmp_path, out, sample, capsys)
    assert results["reference_statistics"] == "stored" and results["reference_statistics_images"] == 40


# --------------------------------------------------------------------------- show
def test_show_writes_a_labelled_grid(tmp_path, capsys) -> None:
    labelled = write_batch(tmp_path / "s.npz", 10, 32)
    plain = write_batch(tmp_path / "plain.npz", 10, 32, labels=False)  # the same images, no arr_1
    assert cli.main(["show", str(labelled), "--nrow", "4"]) == 0
    assert "10 of 10 images, 4 per row, labelled" in capsys.readouterr().out
    grid = Image.open(tmp_path / "s.grid.png")
    # 32-px images are enlarged (nearest) to 64-px tiles before labelling; save_grid's layout, 2 px padding
    assert grid.size == (4 * (64 + 2) + 2, 3 * (64 + 2) + 2)
    assert cli.main(["show", str(plain), "--nrow", "4", "--out", str(tmp_path / "p.png")]) == 0
    assert cli.main(["show", str(labelled), "--nrow", "4", "--no-labels", "--out", str(tmp_path / "n.png")]) == 0
    a, b, c = (np.asarray(Image.open(tmp_path / name)) for name in ("s.grid.png", "p.png", "n.png"))
    assert np.array_equal(b, c) and not np.array_equal(a, b)
    tile = b[2:66, 2:66]
    assert np.array_equal(tile, np.asarray(AdmBatch(tmp_path / "plain.npz").images[0]).repeat(2, 0).repeat(2, 1))
    changed = np.argwhere((a != b).any(-1))  # only the label boxes in each tile's top-left corner
    assert len({(y // 66, x // 66) for y, x in changed}) == 10
    corners = {(y // 66, x // 66): (y % 66, x % 66) for y, x in changed}  # the last changed pixel per tile
    assert all((y % 66) < 16 for y, x in changed) and all(dy * dx < 64 * 64 / 8 for dy, dx in corners.values())
    assert cli.main(["show", str(labelled), "--max", "5", "--nrow", "4", "--out", str(tmp_path / "m.png")]) == 0
    assert Image.open(tmp_path / "m.png").size == (266, 2 * 66 + 2)


def test_show_bad_input_is_one_error_line(tmp_path, capsys) -> None:
    np.savez(tmp_path / "nchw.npz", np.zeros((2, 3, 8, 8), dtype=np.uint8))
    assert cli.main(["show", str(tmp_path / "nchw.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mdt-eval: error:") and "NCHW" in err[0]


# --------------------------------------------------------------------------- ordinary mistakes
def one_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mdt-eval: error: ") and "Traceback" not in captured.err, lines
    return lines[0]


def test_object_arrays_and_bad_ref_sources_are_one_line_exit_2(tmp_path, capsys) -> None:
    """Each was a traceback: an object array (np.load needs allow_pickle) as samples or as the
    reference; `ref` on the folder above train/, on an empty class folder, on a missing path."""
    objects = tmp_path / "objects.npz"
    np.savez(objects, arr_0=np.array([np.zeros((2, 2)), np.zeros(3)], dtype=object))
    good = write_batch(tmp_path / "good.npz", 4, 32)
    for ref, sample in ((good, objects), (objects, good)):
        assert cli.main([str(ref), str(sample), *TINY]) == 2
        line = one_error(capsys)
        assert f"{objects}: arr_0 is an object array (dtype=object)" in line and "np.savez(path, np.stack(" in line
    root = tmp_path / "imagenet"  # ImageNet-style root: train/ and val/ beside each other
    for split in ("train", "val"):
        (root / split / "n01").mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(root / split / "n01" / "a.JPEG")
    (root / "train" / "n02").mkdir()  # an empty class folder
    cases = {
        root: f"{root} looks one level too high: {root / 'train'} holds folders, not images; pass its train/ "
              f"subfolder ({root / 'train'})",
        root / "train": f"class folder {root / 'train' / 'n02'} holds no images",
        tmp_path / "nope": f"input {tmp_path / 'nope'} does not exist; pass an ImageNet-style train/ folder",
    }
    for source, says in cases.items():
        assert cli.main(["ref", str(source), str(tmp_path / "ref.npz"), *TINY, "--workers", "0"]) == 2
        assert says in one_error(capsys)
    assert not (tmp_path / "ref.npz").exists()


# --------------------------------------------------------------------------- help
@pytest.mark.parametrize(
    "command,defaults",
    [
        ([], ["(default: 64)", "(default: sqrtm)", "(default: adm)", "(default: auto)"]),
        (["ref"], ["(default: 256)", "(default: 10000)", "(default: 4)"]),
        (["show"], ["(default: 8)", "(default: 64)"]),
    ],
)
def test_help_shows_defaults_and_every_command(command, defaults, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(d in out for d in defaults), out
    assert "(default: None)" not in out
    if not command:
        usage = out.split("\n\n")[0]
        assert "REF.npz SAMPLE.npz" in usage and "ref SOURCE OUT.npz" in usage and "show NPZ" in usage


def test_inception_download_is_refused_offline(monkeypatch) -> None:
    """README: no download when HF_HUB_OFFLINE/MDT_OFFLINE is set, `--inception download` included."""
    import urllib.request

    import pytest

    from mdt_ds.metrics import inception

    def no_network(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(inception.InceptionWeightsError, match="nothing is downloaded"):
        inception.resolve_weights("download")


def test_a_downloaded_inception_file_appears_with_its_hash_already_beside_it(tmp_path, monkeypatch) -> None:
    """Ranks sharing a cache: one that finds the weights file must find its complete .sha256
    too (it was written after the rename, so a rank could read it empty and crash)."""
    import io
    import os
    import socket
    import urllib.request

    from mdt_ds.metrics import inception

    payload = b"weights" * 1000
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MDT_OFFLINE", raising=False)
    monkeypatch.delenv("MDT_INCEPTION_SHA256", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    dest = tmp_path / "pt_inception.pth"
    seen, replace = [], os.replace

    def watched_replace(src, dst):
        replace(src, dst)
        if Path(dst) == dest:  # the moment another rank could see the weights
            sidecar = dest.with_name(dest.name + ".sha256")
            seen.append(sidecar.read_text() if sidecar.exists() else "")

    def watched_replace_named(src, dst):
        # Part files name host and pid: two hosts sharing the cache over NFS can share a pid.
        assert Path(src).name.endswith(f".part.{socket.gethostname()}.{os.getpid()}"), src
        watched_replace(src, dst)

    monkeypatch.setattr(inception.os, "replace", watched_replace_named)
    assert inception.download_weights(dest) == dest and dest.read_bytes() == payload
    assert len(seen) == 1 and seen[0].split()[0] == hashlib.sha256(payload).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pt_inception.pth", "pt_inception.pth.sha256"]
