"""The seed-per-image sampler: generate() semantics, pixels, labels, shard planning and packing,
and the CLI under torchrun (world sizes 1 and 2 give the same bytes; an interrupted run resumes
to the same file)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdt_ds.diffusion import create_diffusion
from mdt_ds.dist import derive_seed, free_port
from mdt_ds.models import build_model
from mdt_ds.sampling import generate, image_seed, sample_labels, save_grid, to_uint8
from mdt_ds.tools import sample as sample_cli
from tests.conftest import PYTHON, REPO, subprocess_env

pytestmark = pytest.mark.evaluation


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """MDTv2-Tiny/2 with every weight perturbed (the adaLN-Zero init would output zeros)."""
    torch.manual_seed(seed)
    model = build_model("MDTv2-Tiny/2")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ema_0000100.pt"
    torch.save(tiny_model().state_dict(), path)
    return path


# --------------------------------------------------------------------------- generate()
def test_images_do_not_depend_on_batch_composition() -> None:
    model, diffusion = tiny_model(), create_diffusion("10")
    labels, seeds = torch.tensor([1, 2, 3, 4]), [image_seed(0, i) for i in range(4)]
    together = generate(model, diffusion, labels, seeds, cfg_scale=2.0)
    apart = torch.cat(
        [generate(model, diffusion, labels[i : i + 1], seeds[i : i + 1], cfg_scale=2.0) for i in range(4)]
    )
    assert together.shape == (4, 4, 8, 8) and together.dtype == torch.float32
    # Same noise; only the rounding of batched matmuls differs (the CLI cuts batches at fixed
    # index multiples, which makes its files bit-identical across world sizes).
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-4)
    again = generate(model, diffusion, labels.flip(0), seeds[::-1], cfg_scale=2.0).flip(0)
    torch.testing.assert_close(together, again, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler, draws", [("ddpm", 1 + 6), ("ddim", 1)])
def test_every_noise_draw_happens_before_the_first_step(sampler: str, draws: int) -> None:
    """The sampler draws each image's noise for the whole run up front (into pinned memory on
    CUDA, then one asynchronous copy per step), not per step from pageable memory: by the first
    network call every draw is done, and the images are those of one draw per step (the release
    contract test above checks the values)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NormalDraws(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            self.count += func.overloadpacket.__name__ in ("normal", "normal_", "randn")
            return func(*args, **(kwargs or {}))

    model, seen_at_calls = tiny_model(), []
    forward = model.forward

    def counting_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen_at_calls.append(spy.count)
        return forward(*args, **kwargs)

    model.forward = counting_forward
    with NormalDraws() as spy:
        generate(model, create_diffusion("6"), torch.tensor([1, 2, 3]), [5, 6, 7], sampler=sampler)
    assert len(seen_at_calls) == 6 and set(seen_at_calls) == {3 * draws} and spy.count == 3 * draws


def test_cfg_follows_the_release_contract() -> None:
    """The release samples a doubled batch [z; z] with labels [y; null] through forward_with_cfg
    and keeps the first half: our N-image loop gives exactly those images."""
    model, diffusion = tiny_model(), create_diffusion("8")
    labels, seeds = torch.tensor([3, 7]), [11, 12]
    ours = generate(model, diffusion, labels, seeds, cfg_scale=3.8, cfg_pow=4.0)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draw = lambda: torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens])  # noqa: E731
    z = draw()
    x, y = torch.cat([z, z]), torch.cat([labels, torch.full_like(labels, model.num_classes)])

    def release_model(x, t, y):
        return model.forward_with_cfg(x, t, y, 3.8, scale_pow=4.0)

    with torch.no_grad():
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((4,), i, dtype=torch.long)
            noise = draw()
            x = diffusion.p_sample(release_model, x, t, torch.cat([noise, torch.randn_like(noise)]), {"y": y})
    assert torch.equal(ours, x[:2])


def test_ddim_guidance_and_modes() -> None:
    model, diffusion = tiny_model(), create_diffusion("ddim10")
    labels, seeds = torch.tensor([0, 5]), [1, 2]
    model.train()
    a = generate(model, diffusion, labels, seeds, sampler="ddim", cfg_scale=2.0)
    assert model.training, "generate() must restore the caller's mode"
    b = generate(model, diffusion, labels, seeds, sampler="ddim", cfg_scale=2.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, generate(model, diffusion, labels, seeds, sampler="ddim"))
    assert not torch.allclose(a, generate(model, diffusion, labels, [3, 4], sampler="ddim", cfg_scale=2.0))
    assert not torch.allclose(
        a, generate(model, diffusion, labels, seeds, sampler="ddim", cfg_scale=2.0, guide_channels="all")
    )
    stochastic = generate(model, diffusion, labels, seeds, sampler="ddim", eta=1.0)
    assert torch.isfinite(stochastic).all()
    bf16 = generate(model, diffusion, labels, seeds, sampler="ddim", cfg_scale=2.0, autocast_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and (bf16 - a).abs().max() < 0.02 * a.abs().max()
    with pytest.raises(ValueError, match="sampler"):
        generate(model, diffusion, labels, seeds, sampler="euler")


# --------------------------------------------------------------------------- pixels, labels, seeds
def test_to_uint8_truncates_or_rounds() -> None:
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5]).view(1, 1, 1, 6)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 127, 191, 255, 255]
    assert to_uint8(x, "round")[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_save_grid_layout(tmp_path) -> None:
    from PIL import Image

    images = np.full((5, 8, 8, 3), 200, dtype=np.uint8)
    path = save_grid(images, tmp_path / "g.png", nrow=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (22, 32, 3) and grid[2, 2, 0] == 200 and grid[0, 0, 0] == 0
    assert np.asarray(Image.open(save_grid(torch.zeros(2, 1, 4, 4), tmp_path / "m.png", nrow=2))).shape == (8, 14)


def test_labels_and_seeds_belong_to_the_index() -> None:
    everything = sample_labels(range(200), 10, global_seed=7)
    assert torch.equal(sample_labels([3, 150, 4], 10, 7), everything[[3, 150, 4]])
    assert everything.min() >= 0 and everything.max() <= 9 and len(everything.unique()) == 10
    assert not torch.equal(everything, sample_labels(range(200), 10, global_seed=8))
    assert sample_labels(range(12), 5, 0, "balanced").tolist() == [i % 5 for i in range(12)]
    assert image_seed(3, 9) == derive_seed(3, 9) and image_seed(3, 9) != image_seed(3, 10)


# --------------------------------------------------------------------------- shards
def test_plan_chunks_cut_at_batch_multiples() -> None:
    plan = sample_cli.plan_chunks
    assert plan(10, [], 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan(10, [(4, 8, None)], 4) == [(0, 4), (8, 10)]
    assert plan(10, [(0, 3, None)], 4) == [(3, 4), (4, 8), (8, 10)]  # batch size changed on resume
    assert plan(6, [(0, 4, None), (4, 8, None)], 4) == []


def test_pack_streams_shards_and_finds_gaps(tmp_path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    for start, stop in [(0, 4), (4, 8), (8, 10)]:
        sample_cli.write_part(parts, start, images[start:stop], np.arange(start, stop))
    sample_cli.pack(parts, tmp_path / "out.npz", 9)  # a shorter run reuses a prefix
    with np.load(tmp_path / "out.npz") as data:
        assert np.array_equal(data["arr_0"], images[:9]) and data["arr_1"].tolist() == list(range(9))
    (parts / "part-00000004-00000008.npz").unlink()
    with pytest.raises(sample_cli.SampleError, match="missing"):
        sample_cli.pack(parts, tmp_path / "out2.npz", 10)


def test_model_loading(tmp_path, tiny_ckpt) -> None:
    from safetensors.torch import save_file

    from mdt_ds.config import ModelConfig

    cfg = ModelConfig.from_preset("MDTv2-Tiny/2")
    state = torch.load(tiny_ckpt, weights_only=True)
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    model = sample_cli.load_model(tmp_path / "w.safetensors", cfg, torch.device("cpu"))
    assert torch.equal(model.pos_embed, state["pos_embed"])
    (tmp_path / "config.json").write_text(json.dumps({"model": {"preset": "MDTv2-Tiny/2"}, "steps": 5}))
    assert sample_cli.model_config(None, None, tmp_path / "w.safetensors").hidden_size == 64
    with pytest.raises(sample_cli.SampleError, match="--model"):
        sample_cli.load_model(tiny_ckpt, ModelConfig.from_preset("MDTv2-S/2"), torch.device("cpu"))


# --------------------------------------------------------------------------- the CLI
COMMON = [
    "--model",
    "MDTv2-Tiny/2",
    "--vae",
    "tiny-random",
    "--num-samples",
    "10",
    "--batch-size",
    "3",
    "--steps",
    "10",
    "--cfg-scale",
    "2.0",
    "--seed",
    "5",
    "--no-progress",
]


def run_torchrun(ckpt: Path, output: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(REPO / "eval" / "sample_ddp.py"),
        "--ckpt",
        str(ckpt),
        "--output",
        str(output),
        *COMMON,
        *extra,
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_in_process(ckpt: Path, output: Path, *extra: str) -> int:
    """World size 1, in this process, with one thread like the torchrun ranks (bit-exact matmuls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return sample_cli.main(["--ckpt", str(ckpt), "--output", str(output), *COMMON, *extra])
    finally:
        torch.set_num_threads(threads)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def one_rank_run(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ws1") / "samples.npz"
    assert run_in_process(tiny_ckpt, out) == 0
    return out


def test_one_rank_run_writes_an_adm_batch(one_rank_run) -> None:
    with np.load(one_rank_run) as data:
        assert data["arr_0"].shape == (10, 64, 64, 3) and data["arr_0"].dtype == np.uint8
        assert data["arr_1"].tolist() == sample_labels(range(10), 10, 5).tolist()
        assert len({data["arr_0"][i].tobytes() for i in range(10)}) == 10
    summary = json.loads(one_rank_run.with_suffix(".json").read_text())
    assert summary["settings"]["cfg_scale"] == 2.0 and summary["num_samples"] == 10
    assert not one_rank_run.with_name(one_rank_run.name + ".parts").exists()


@pytest.mark.timeout(300)
def test_two_ranks_interrupted_then_resumed_on_one_give_the_same_file(
    tiny_ckpt, one_rank_run, tmp_path, caplog
) -> None:
    """torchrun with 2 ranks stops after one batch each (indices 0-5); the images equal the
    1-rank run's; a stale temporary is cleared; resuming on 1 rank gives a byte-identical npz."""
    out = tmp_path / "samples.npz"
    parts = out.with_name(out.name + ".parts")
    run_torchrun(tiny_ckpt, out, 2, "--max-batches", "1")
    assert not out.exists()
    shards = sorted(parts.glob("part-*.npz"))
    assert [p.name for p in shards] == ["part-00000000-00000003.npz", "part-00000003-00000006.npz"]
    with np.load(one_rank_run) as reference:
        for shard, start in zip(shards, (0, 3)):
            with np.load(shard) as part:
                assert np.array_equal(part["images"], reference["arr_0"][start : start + 3])
    (parts / "part-00000006-00000009.npz.tmp").write_bytes(b"a rank died while writing this")
    with caplog.at_level("INFO", logger="mdt_ds.sample"):
        assert run_in_process(tiny_ckpt, out) == 0
        assert "4 of 10 images to make" in caplog.text
        assert digest(out) == digest(one_rank_run)
        assert run_in_process(tiny_ckpt, out) == 0
        assert "nothing to do" in caplog.text


def test_changed_settings_are_refused(tiny_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "s.npz"
    base = ["--ckpt", str(tiny_ckpt), "--output", str(out), *COMMON, "--num-samples", "4", "--steps", "2"]
    assert sample_cli.main(base + ["--max-batches", "1"]) == 0  # settings bind once a shard exists
    assert sample_cli.main(base + ["--seed", "6"]) == 2
    assert "other settings (seed)" in capsys.readouterr().err


def test_training_grids_are_enlarged_and_their_rows_labelled(tmp_path) -> None:
    """The demo's training grids were 74x182 px (16-px digits at native size) without labels:
    samples under 64 px are enlarged (nearest) to 64-px tiles, and each row starts with its class
    name from the data manifest."""
    import mdt_ds.grids as grids
    from mdt_ds.config import TrainConfig, apply_overrides

    cfg = apply_overrides(TrainConfig(), ["model.preset=MDTv2-Tiny/2", "model.input_size=16", "model.in_channels=1",
                                          "model.num_classes=10", "data.source=mnist16"])
    assert grids.class_names("mnist16") == {c: str(c) for c in range(10)}
    grid = grids.render_grid(cfg, build_model(cfg.model).state_dict(), tmp_path / "g.png", per_class=2,
                             max_classes=3, steps=2)
    tiles = grid[:, -(2 * 66 + 2):]  # 2 per row, 64-px tiles, 2 px padding
    assert grid.shape[0] == 3 * 66 + 2 and grid.shape[1] > tiles.shape[1]
    tile = tiles[2:66, 2:66, 0]
    assert np.array_equal(tile, tile[::4, ::4].repeat(4, 0).repeat(4, 1))  # each pixel a 4x4 block
    column = grid[:, : grid.shape[1] - tiles.shape[1], 0]  # the labels: white on black, one per row
    rows = [column[2 + r * 66 : 2 + r * 66 + 64] for r in range(3)]
    assert all(row.max() > 128 for row in rows) and not np.array_equal(rows[0], rows[1])
    assert (column[:2] == 0).all() and np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).shape == grid.shape


def test_save_grid_row_labels_and_enlarging(tmp_path) -> None:
    images = np.full((4, 8, 8, 1), 200, dtype=np.uint8)
    plain = np.asarray(Image.open(save_grid(images, tmp_path / "a.png", nrow=2)))
    labelled = np.asarray(Image.open(save_grid(images, tmp_path / "b.png", nrow=2, row_labels=["cat", "dog"],
                                               min_tile=64)))
    assert plain.shape == (2 * 10 + 2, 2 * 10 + 2) and labelled.shape[0] == 2 * 66 + 2 and labelled.ndim == 3
    assert labelled.shape[1] > 2 * 66 + 2 and (labelled[:, -(2 * 66 + 2):][2:66, 2:66] == 200).all()


# --------------------------------------------------------------------------- grids and FID on the device
def test_grid_model_codec_and_latents_on_the_given_device(monkeypatch, tmp_path) -> None:
    """render_grid builds the model, loads the codec and samples on the device it is given (the
    trainer passes its engine's device), not on the CPU by default."""
    import mdt_ds.grids as grids
    import mdt_ds.sampling as sampling
    from mdt_ds.config import TrainConfig, apply_overrides
    from mdt_ds.models.codec import VAECodec

    seen: dict[str, object] = {}
    build, load, gen, decode = grids.build_model, grids.load_codec, sampling.generate, VAECodec.decode

    def spy_build(cfg, device=None, **kw):
        seen["build"] = device
        return build(cfg, device=device, **kw)

    def spy_load(name, device="cpu", **kw):
        seen["codec"] = device
        return load(name, device=device, **kw)

    def spy_generate(model, *args, device=None, **kw):
        seen["generate"], seen["model"] = device, next(model.parameters()).device
        return gen(model, *args, device=device, **kw)

    def spy_decode(self, latents):
        seen["latents"], seen["vae"] = latents.device, self.device
        return decode(self, latents)

    monkeypatch.setattr(grids, "build_model", spy_build)
    monkeypatch.setattr(grids, "load_codec", spy_load)
    monkeypatch.setattr(sampling, "generate", spy_generate)
    monkeypatch.setattr(VAECodec, "decode", spy_decode)
    cfg = apply_overrides(TrainConfig(), ["model.preset=MDTv2-Tiny/2", "data.source=tiny-latents"])
    device = torch.device("cpu")
    grid = grids.render_grid(cfg, tiny_model().state_dict(), tmp_path / "g.png", per_class=1, max_classes=2,
                             steps=2, device=device)
    assert grid.ndim == 3 and (tmp_path / "g.png").is_file()
    assert seen == {"build": device, "codec": device, "generate": device, "model": device,
                    "latents": device, "vae": device}


def test_codecs_move_to_a_device() -> None:
    from mdt_ds.models.codec import PixelCodec, load_codec

    pixel = PixelCodec(1)
    assert pixel.to("cpu") is pixel
    vae = load_codec("tiny-random", device="meta")  # meta: proves the weights moved, allocates nothing
    assert vae.device.type == "meta" and all(p.is_meta for p in vae.vae.parameters())
    assert load_codec("tiny-random").to("meta").device.type == "meta"


def test_sampling_tf32_only_on_cuda_and_restored() -> None:
    from mdt_ds.sampling import sampling_tf32

    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    old = flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with sampling_tf32(torch.device("cpu")) as on:
            assert not on and flags() == (False, False)
        with sampling_tf32(None) as on:
            assert not on and flags() == (False, False)
        with sampling_tf32("cuda:0") as on:  # the flags are process-wide: settable without a GPU
            assert on and flags() == (True, True)
        assert flags() == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_in_training_fid_decodes_on_the_device(monkeypatch) -> None:
    """fid_for_model moves the codec to its device, samples there (TF32 scope entered for it) and
    decodes the latents there."""
    import mdt_ds.sampling as sampling
    from mdt_ds.metrics import fid_for_model
    from mdt_ds.metrics.inception import load_extractor
    from mdt_ds.models.codec import VAECodec, load_codec

    codec = load_codec("tiny-random")
    seen: dict[str, list] = {"to": [], "decode": [], "tf32": [], "generate": []}
    to, decode, tf32, gen = VAECodec.to, VAECodec.decode, sampling.sampling_tf32, sampling.generate
    monkeypatch.setattr(VAECodec, "to", lambda self, d: (seen["to"].append(torch.device(d)), to(self, d))[1])
    monkeypatch.setattr(VAECodec, "decode", lambda self, z: (seen["decode"].append(z.device), decode(self, z))[1])
    monkeypatch.setattr(sampling, "sampling_tf32", lambda d: (seen["tf32"].append(torch.device(d)), tf32(d))[1])

    def spy_generate(*args, device=None, **kw):
        seen["generate"].append(device)
        return gen(*args, device=device, **kw)

    monkeypatch.setattr(sampling, "generate", spy_generate)
    extractor = load_extractor("tiny-random")
    dim = extractor(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))["pool"].shape[1]
    ref = {"pool": (np.zeros(dim), np.eye(dim))}
    device = torch.device("cpu")
    options = sampling.SampleOptions(sampler="ddim", steps=2)
    result = fid_for_model(tiny_model(), codec, ref, num_images=4, batch_size=4,
                           options=options, extractor=extractor, device=device)
    assert np.isfinite(result["fid"]) and result["num_images"] == 4
    assert seen == {"to": [device], "decode": [device], "tf32": [device], "generate": [device]}
