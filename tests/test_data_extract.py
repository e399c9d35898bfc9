"""mdt-extract-latents: ADM crop, 1 vs 2 processes byte for byte, bad images, resume, tar input."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdt_ds.data import shards
from mdt_ds.data.imagenet import InputError, center_crop_arr, list_image_folder
from mdt_ds.tools import extract_latents

pytestmark = pytest.mark.data

TRUNCATED = "n00000001/img_005.JPEG"
COMMON = [
    "--codec",
    "tiny-random",
    "--image-size",
    "64",
    "--samples-per-shard",
    "8",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--no-progress",
]


def make_image_folder(root: Path, classes: int = 4, per_class: int = 10) -> Path:
    """Real digits as RGB JPEGs of assorted non-square sizes, ImageNet-style, one of them truncated."""
    from mdt_ds.data.demo import _mnist_digits

    images, labels = _mnist_digits()
    for c in range(classes):
        folder = root / f"n0000000{c}"
        folder.mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            img = Image.fromarray(images[i]).convert("RGB").resize((72 + 8 * (k % 3), 64 + 6 * (k % 2)))
            img.save(folder / f"img_{k:03d}.JPEG", quality=90)
    path = root / TRUNCATED
    if path.is_file():
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return root


def run_inprocess(argv: list[str]) -> int:
    """The CLI in this process with one thread, as torchrun gives each rank (bit-exact comparisons)."""
    threads = torch.get_num_threads()
    try:
        return extract_latents.main([*argv, "--threads", "1"])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagenet") / "train")


@pytest.fixture(scope="module")
def single(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "latents"
    assert run_inprocess(["--input", str(folder), "--output", str(out), *COMMON]) == 0
    return out


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_adm_center_crop() -> None:
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    # 1024 -> BOX 512 -> BOX 256 -> bicubic at scale 1 (a no-op): two BOX halvings, about 4x4 block
    # means (PIL rounds each halving up by about half a level), not one big bicubic reduction
    got = center_crop_arr(Image.fromarray(big), 256)
    halved = Image.fromarray(big).resize((512, 512), Image.BOX).resize((256, 256), Image.BOX)
    assert got.shape == (256, 256, 3) and np.array_equal(got, np.array(halved))
    block_means = big.reshape(256, 4, 256, 4, 3).mean((1, 3))
    assert np.abs(got - block_means).max() <= 2.0
    bicubic = np.array(Image.fromarray(big).resize((256, 256), Image.BICUBIC)).astype(float)
    assert np.abs(bicubic - block_means).mean() > 3.0
    wide = center_crop_arr(Image.fromarray(rng.integers(0, 256, (100, 300, 3), dtype=np.uint8)), 64)
    assert wide.shape == (64, 64, 3)


def test_single_process_manifest_counts_the_truncated_jpeg(single: Path) -> None:
    manifest = shards.read_manifest(single)
    assert manifest["num_samples"] == 39 and manifest["num_shards"] == 5 and manifest["num_classes"] == 4
    assert manifest["num_skipped"] == 1 and manifest["skipped"][0]["key"] == TRUNCATED
    assert "truncated" in manifest["skipped"][0]["reason"]
    assert manifest["classes"] == {f"n0000000{c}": c for c in range(4)}
    assert manifest["layout"]["shape"] == [2, 8, 8, 8] and manifest["sample_shape"] == [4, 8, 8]
    assert manifest["codec"] == {"name": "sd-vae", "source": "tiny-random", "scale_factor": 0.18215}
    assert shards.verify_shards(single) == []


def test_extracted_samples_carry_checksums(
    single: Path, folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = shards.read_manifest(single)
    layout = shards.manifest_layout(manifest)
    assert manifest["version"] == shards.FORMAT_VERSION
    for entry in manifest["shards"]:
        assert json.loads((single / entry["name"].replace(".tar", ".json")).read_text())["version"] == 2
        with tarfile.open(single / entry["name"]) as tar:
            for member in tar:
                payload = tar.extractfile(member).read()
                assert shards.HEADER.unpack_from(payload)[4] == shards.payload_crc(payload)
                assert shards.sample_problem(payload, layout, manifest["num_classes"]) is None
    # A rerun into a folder written by the previous format version is refused, not mixed.
    old = tmp_path / "old"
    shutil.copytree(single, old)
    config = json.loads((old / "extract_config.json").read_text())
    del config["format_version"]
    (old / "extract_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    assert run_inprocess(["--input", str(folder), "--output", str(old), *COMMON]) == 2
    assert "describes another extraction" in caplog.text


def test_moments_are_the_vae_posterior_of_image_and_flip(single: Path, folder: Path) -> None:
    from mdt_ds.models.codec import load_codec

    moments, labels, keys = shards.read_all(single)
    codec = load_codec("tiny-random")
    for i in (0, 17, 38):
        crop = center_crop_arr(Image.open(folder / keys[i]).convert("RGB"), 64)
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
        expected = torch.cat([codec.encode_moments(x), codec.encode_moments(x.flip(-1))])
        # float16 storage: 11 significant bits (bfloat16 rounding, 8 bits, misses this tolerance)
        assert moments.dtype == torch.float16
        assert torch.allclose(moments[i].float(), expected, atol=1e-3, rtol=1e-3), keys[i]
        assert labels[i] == int(keys[i][8])


def test_defaults_are_an_fp32_vae_and_float16_moments(single: Path) -> None:
    args = extract_latents.parse_args(["--input", "in", "--output", "out"])
    assert args.precision == "fp32" and args.dtype == "float16"
    assert shards.read_manifest(single)["layout"]["dtype"] == "float16"
    tiny = extract_latents.parse_args(["--input", "in", "--output", "out", "--codec", "tiny-random"])
    assert extract_latents._load_codec(tiny, 0).vae.dtype == torch.float32
    tiny.precision = "bf16"
    assert extract_latents._load_codec(tiny, 0).vae.dtype == torch.bfloat16


def test_each_rank_makes_its_gpu_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local rank 1 encodes on cuda:1 and makes it the current device (else cuDNN workspaces and
    caches of every rank land on cuda:0); with one GPU shown per task (srun --gpus-per-task) it
    is cuda:0."""
    set_to, loaded = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: set_to.append(str(device)))
    monkeypatch.setattr(extract_latents, "load_codec", lambda name, device: loaded.append(str(device)) or object())
    args = extract_latents.parse_args(["--input", "x", "--output", "y"])
    for visible in (2, 1):
        monkeypatch.setattr(torch.cuda, "device_count", lambda visible=visible: visible)
        extract_latents._load_codec(args, local_rank=1)
    assert set_to == loaded == ["cuda:1", "cuda:0"]


def test_moments_that_overflow_float16_are_refused_naming_the_image(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mdt_ds.models.codec import VAECodec

    real = VAECodec.encode_moments
    monkeypatch.setattr(VAECodec, "encode_moments", lambda self, x: real(self, x) * 1e6)  # |x| >> 65504
    argv = ["--input", str(folder), "--output", str(tmp_path / "out"), *COMMON, "--limit", "4"]
    assert run_inprocess(argv) == 2
    assert "overflows --dtype float16" in caplog.text and "--dtype bfloat16" in caplog.text
    assert "image n0000000" in caplog.text  # the first image of the batch, by its key
    assert not (tmp_path / "out" / "train-000000.tar").exists()
    assert run_inprocess([*argv[:3], str(tmp_path / "bf16"), *argv[4:], "--dtype", "bfloat16"]) == 0
    monkeypatch.setattr(VAECodec, "encode_moments", lambda self, x: real(self, x) * float("nan"))
    assert run_inprocess([*argv[:3], str(tmp_path / "nan"), *argv[4:]]) == 2
    assert "not finite" in caplog.text


def test_two_processes_write_the_same_bytes(single: Path, folder: Path, tmp_path: Path) -> None:
    from tests.conftest import REPO, subprocess_env, torchrun_command

    out = tmp_path / "latents"
    cmd = torchrun_command(
        2,
        "-m",
        "mdt_ds.tools.extract_latents",
        "--input",
        str(folder),
        "--output",
        str(out),
        *COMMON,
    )
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TRUNCATED in proc.stderr and "skipping unreadable image" in proc.stderr  # named in the log
    assert "done: 39 images in 5 shards" in proc.stderr
    assert files_of(out) == files_of(single)


def test_rerun_redoes_only_missing_or_broken_shards(
    single: Path, folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "latents"
    shutil.copytree(single, out)
    (out / "train-000002.tar").unlink()  # a crash before this shard was written
    (out / "train-000002.json").unlink()
    tar3 = out / "train-000003.tar"  # a crash while copying: the sidecar says more bytes
    tar3.write_bytes(tar3.read_bytes()[:1000])
    (out / "manifest.json").unlink()
    untouched = (out / "train-000000.tar").stat().st_mtime_ns
    caplog.set_level("INFO")
    assert run_inprocess(["--input", str(folder), "--output", str(out), *COMMON]) == 0
    assert "2 shards to do (3 already done)" in caplog.text
    assert (out / "train-000000.tar").stat().st_mtime_ns == untouched
    assert files_of(out) == files_of(single)


def test_other_settings_into_the_same_output_are_refused(
    single: Path, folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "latents"
    shutil.copytree(single, out)
    argv = ["--input", str(folder), "--output", str(out), *COMMON]
    argv[argv.index("--samples-per-shard") + 1] = "10"
    assert run_inprocess(argv) == 2
    assert "another extraction" in caplog.text


def test_empty_class_folder_is_an_error_naming_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_image_folder(tmp_path / "train", classes=2, per_class=2)
    (root / "n00000009").mkdir()
    with pytest.raises(InputError, match="n00000009 holds no images"):
        list_image_folder(root)
    assert run_inprocess(["--input", str(root), "--output", str(tmp_path / "out"), *COMMON]) == 2
    assert "n00000009" in caplog.text


def test_image_tars_input_with_the_pixel_codec(folder: Path, tmp_path: Path) -> None:
    items, _ = list_image_folder(folder)
    for part in range(2):  # two input tars of <key>.jpg + <key>.cls, as ImageNet webdatasets ship
        with tarfile.open(tmp_path / f"in-{part}.tar", "w") as tar:
            for j, item in enumerate(items[part::2]):
                for name, data in (
                    (f"s{part}_{j:03d}.jpg", Path(item.source).read_bytes()),
                    (f"s{part}_{j:03d}.cls", str(item.label).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "pixels"
    argv = [
        "--input",
        str(tmp_path / "in-{0..1}.tar"),
        "--output",
        str(out),
        "--codec",
        "pixel",
        "--image-size",
        "32",
        "--samples-per-shard",
        "16",
        "--workers",
        "0",
        "--no-progress",
    ]
    assert run_inprocess(argv) == 0
    manifest = shards.read_manifest(out)
    assert manifest["num_samples"] == 39 and manifest["num_skipped"] == 1
    assert manifest["layout"]["kind"] == "pixels" and manifest["classes"] == {str(c): c for c in range(4)}
    pixels, labels, keys = shards.read_all(out)
    by_key = {f"in-{p}.tar/s{p}_{j:03d}": item for p in range(2) for j, item in enumerate(items[p::2])}
    for i in (0, 20, 38):
        item = by_key[keys[i]]
        expected = center_crop_arr(Image.open(item.source).convert("RGB"), 32)
        assert torch.equal(pixels[i], torch.from_numpy(expected).permute(2, 0, 1)) and labels[i] == item.label
    assert json.loads((out / "extract_config.json").read_text())["num_inputs"] == 40


def test_inputs_that_point_the_wrong_way_say_where_to_point(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A missing --input said "no tar files match"; the folder above train/ said a class folder
    "holds no images"."""
    root = tmp_path / "imagenet"
    make_image_folder(root / "train", classes=1, per_class=1)
    (root / "val" / "n00000000").mkdir(parents=True)
    cases = {
        tmp_path / "missing": f"input {tmp_path / 'missing'} does not exist; pass an ImageNet-style train/ folder",
        root: f"{root} looks one level too high: {root / 'train'} holds folders, not images; "
              f"pass its train/ subfolder ({root / 'train'})",
    }
    for given, says in cases.items():
        caplog.clear()
        assert run_inprocess(["--input", str(given), "--output", str(tmp_path / "out"), *COMMON]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and says in errors[0], errors


def test_links_and_hidden_names_in_tars_are_counted_as_skipped(folder: Path, tmp_path: Path) -> None:
    """Symlink and hardlink members were dropped without a word (neither images nor skipped), and
    a hidden ``dir/.jpg`` became a sample whose id has no name: each is now skipped, named, with why."""
    jpeg = (folder / "n00000000" / "img_000.JPEG").read_bytes()
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "a.tar", "w") as tar:
        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("s0.jpg", jpeg), add("s0.cls", b"0"), add("s1.jpg", jpeg), add("s1.cls", b"1")
        add("s2.jpg", kind=tarfile.SYMTYPE, link="s0.jpg"), add("s2.cls", b"0")
        add("s3.jpg", kind=tarfile.LNKTYPE, link="s1.jpg"), add("s3.cls", b"1")
        add("dir/.jpg", jpeg), add("dir/.cls", b"1")
    out = tmp_path / "out"
    argv = ["--input", str(tmp_path / "in"), "--output", str(out), "--codec", "pixel", "--image-size", "32",
            "--workers", "0", "--no-progress"]
    assert run_inprocess(argv) == 0
    manifest = shards.read_manifest(out)
    skipped = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert manifest["num_samples"] == 2 and manifest["num_skipped"] == 3 and manifest["classes"] == {"0": 0, "1": 1}
    assert skipped == {
        "a.tar/s2.jpg": "a symbolic link to 's0.jpg', not an image; store the image itself in the tar",
        "a.tar/s3.jpg": "a hard link to 's1.jpg', not an image; store the image itself in the tar",
        "a.tar/dir/.jpg": "a hidden file name (no sample key)",
    }
