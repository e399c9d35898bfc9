"""``mdt-sample`` (also ``eval/sample_ddp.py``): the FID-50K sampler, distributed and resumable.

    torchrun --nproc_per_node=8 eval/sample_ddp.py --ckpt mdt_xl2_v2_ckpt.pt --model MDTv2-XL/2 \\
        --num-samples 50000 --cfg-scale 3.8 --cfg-pow 4 --output samples/mdtv2_xl2_cfg3.8.npz
    srun --ntasks-per-node=8 python eval/sample_ddp.py ...            (same flags)

Image i has its own seeds (see mdt_ds/sampling.py), so its noise and label do not depend on
the number of processes or the batch size; batches are cut at multiples of --batch-size, so
files are bit-identical across world sizes (another batch size changes only float rounding). Every rank writes its batches as shard files
(``OUTPUT.parts/part-START-STOP.npz``, atomically); rerunning the same command resumes with no
index duplicated or missing; when all indices exist, rank 0 streams the shards into the ADM
``.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels) one shard at a time and writes ``OUTPUT.json``
with the settings. Defaults follow the release's FID protocol (250-step DDPM, uniformly random
labels, fp32/TF32, truncating quantisation, sd-vae-ft-ema decoder); a run's EMA snapshot decodes
with the codec it was trained on. ``--ckpt hf://OWNER/NAME/FILE`` reads the Hugging Face cache.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mdt_ds import dist
from mdt_ds.clihelp import HelpFormatter
from mdt_ds.config import ConfigError, ModelConfig
from mdt_ds.sampling import SAMPLERS, SPACINGS
from mdt_ds.tools.sample_inputs import (
    SampleError,
    choose_codec,
    load_model,
    load_state,
    model_config,
    run_config_file,
    trained_classes,
    trained_timesteps,
)

__all__ = ["SampleError", "load_model", "main", "model_config"]

log = logging.getLogger("mdt_ds.sample")
PART = re.compile(r"^part-(\d{8})-(\d{8})\.npz$")


# --------------------------------------------------------------------------- shards
def list_parts(parts: Path) -> list[tuple[int, int, Path]]:
    """Complete shards (atomic renames) as sorted (start, stop, path)."""
    found = []
    for p in parts.glob("part-*.npz"):
        m = PART.match(p.name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(found)


def plan_chunks(num_samples: int, done: list[tuple[int, int, Path]], batch_size: int) -> list[tuple[int, int]]:
    """The missing indices as contiguous chunks, cut at multiples of ``batch_size`` (so a resumed
    run batches images exactly as an uninterrupted one did)."""
    have = np.zeros(num_samples, dtype=bool)
    for start, stop, _ in done:
        have[start : min(stop, num_samples)] = True
    chunks, i = [], 0
    while i < num_samples:
        if have[i]:
            i += 1
            continue
        stop = min((i // batch_size + 1) * batch_size, num_samples)
        j = i
        while j < stop and not have[j]:
            j += 1
        chunks.append((i, j))
        i = j
    return chunks


def write_part(parts: Path, start: int, images: np.ndarray, labels: np.ndarray) -> Path:
    from mdt_ds.metrics.npz import NpzWriter

    path = parts / f"part-{start:08d}-{start + len(images):08d}.npz"
    with NpzWriter(path) as writer:
        writer.add("images", images)
        writer.add("labels", labels.astype(np.int64))
    return path


def pack(parts: Path, output: Path, num_samples: int) -> tuple[int, ...]:
    """Stream the shards covering [0, num_samples) into the ADM npz, one shard in memory at a time."""
    from mdt_ds.metrics.npz import NpzWriter

    shards, pos = [], 0
    for start, stop, path in list_parts(parts):
        if start >= num_samples:
            continue
        if start != pos:
            raise SampleError(f"{parts}: indices {pos}..{start - 1} are missing or shards overlap; rerun to fill them")
        shards.append((start, min(stop, num_samples), path))
        pos = min(stop, num_samples)
    if pos != num_samples:
        raise SampleError(f"{parts}: have {pos} of {num_samples} images; rerun the same command to finish")
    with np.load(shards[0][2]) as first:
        shape = (num_samples, *first["images"].shape[1:])
    labels: list[np.ndarray] = []

    def chunks():
        for start, stop, path in shards:
            with np.load(path) as part:
                images = part["images"]
                if len(images) < stop - start or images.shape[1:] != shape[1:]:
                    raise SampleError(
                        f"{path} holds {images.shape}, expected {stop - start} images of "
                        f"{shape[1:]}: delete it and rerun"
                    )
                labels.append(part["labels"][: stop - start])
                yield images[: stop - start]

    with NpzWriter(output) as writer:
        writer.stream("arr_0", shape, np.uint8, chunks())
        writer.add("arr_1", np.concatenate(labels))
    return shape


# --------------------------------------------------------------------------- run
def settings_of(args: argparse.Namespace, cfg: ModelConfig, options) -> dict:
    """What must not change between a run and its resumption (batch size and world size may)."""
    hub = str(args.ckpt).startswith("hf://")
    return {
        "checkpoint": str(args.ckpt) if hub else str(args.ckpt_file.resolve()),
        "checkpoint_bytes": args.ckpt_file.stat().st_size,
        "model": cfg.__dict__,
        "vae": args.vae,
        "seed": args.seed,
        **options.as_dict(),
    }


def check_settings(path: Path, settings: dict) -> None:
    old = json.loads(path.read_text())
    old = old.get("settings", old)
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise SampleError(
            f"{path} was written with other settings ({', '.join(diff)}): rerun with those settings to "
            "resume, pass --overwrite to discard the old samples and start over, or use another --output"
        )


def default_output(args: argparse.Namespace, cfg: ModelConfig) -> Path:
    spacing = "" if args.spacing == "auto" else f"-{args.spacing}"
    interval = f"-t{args.cfg_interval[0]}-{args.cfg_interval[1]}" if args.cfg_interval else ""
    name = (
        f"{cfg.preset.replace('/', '-')}-{args.ckpt_file.stem}-{args.sampler}{args.steps}{spacing}-cfg{args.cfg_scale:g}"
        f"{interval}-pow{args.cfg_pow:g}-seed{args.seed}-n{args.num_samples}.npz"
    )
    return Path("samples") / name


def _broadcast(obj):
    if dist.world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _plan_on_rank0(args: argparse.Namespace, settings: dict, parts: Path) -> list[tuple[int, int]] | None:
    sidecar = args.output.with_suffix(".json")
    if args.output.is_file() and sidecar.is_file() and not args.overwrite:
        check_settings(sidecar, settings)
        if json.loads(sidecar.read_text()).get("num_samples") == args.num_samples:
            return None
    parts.mkdir(parents=True, exist_ok=True)
    run_file = parts / "run.json"
    # Settings bind only once a shard exists: a run that failed before its first shard (a
    # missing VAE, a wrong --model) must not lock --output against the corrected command.
    if run_file.is_file() and list_parts(parts) and not args.overwrite:
        check_settings(run_file, settings)
    else:
        for stale in [*parts.glob("part-*.npz"), run_file]:
            stale.unlink(missing_ok=True)
    for tmp in parts.glob("*.tmp"):  # a rank died while writing
        tmp.unlink()
    return plan_chunks(args.num_samples, list_parts(parts), args.batch_size)


def prepare(args: argparse.Namespace, settings: dict, parts: Path) -> list[tuple[int, int]] | None:
    """Rank 0 checks settings, clears stale temporaries and plans; every rank gets the plan, or
    None when the output is already complete, or the same error."""
    result: tuple = (None, "")
    if dist.rank() == 0:
        try:
            result = (_plan_on_rank0(args, settings, parts), "")
        except SampleError as err:
            result = (None, str(err))
    plan, error = _broadcast(result)
    if error:
        raise SampleError(error)
    return plan


def record_settings(parts: Path, settings: dict) -> None:
    """Rank 0, once the model and the codec have loaded: ``run.json`` binds later shards to these
    settings (written before this rank's first shard, atomically)."""
    run_file = parts / "run.json"
    tmp = run_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings, indent=2) + "\n")
    tmp.replace(run_file)


def run_chunks(args, model, diffusion, codec, options, chunks, parts: Path, device: torch.device,
               counted: dict | None = None) -> int:
    """This rank's share of the chunks (chunk j goes to rank j % world), one shard per chunk;
    ``counted`` receives the network calls per image the sampler made."""
    from mdt_ds.sampling import sample_batch

    mine = chunks[dist.rank() :: dist.world_size()]
    if args.max_batches is not None:
        mine = mine[: args.max_batches]
    bar = None
    if dist.rank() == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        total = sum(b - a for a, b in chunks[: len(mine) * dist.world_size()])
        bar = tqdm(total=total, desc="sampling", unit="img", dynamic_ncols=True, smoothing=0.1)
    made = 0
    for start, stop in mine:
        images, labels = sample_batch(model, diffusion, codec, range(start, stop), args.seed, options, device,
                                      stats=counted)
        write_part(parts, start, images, labels)
        made += stop - start
        if bar is not None:
            bar.update((stop - start) * dist.world_size())
    if bar is not None:
        bar.close()
    return made


def finish(args: argparse.Namespace, settings: dict, parts: Path, stats: dict) -> None:
    """Rank 0: pack the npz, write the sidecar JSON, drop the shards unless kept."""
    shape = pack(parts, args.output, args.num_samples)
    summary = {
        "output": str(args.output),
        "num_samples": args.num_samples,
        "shape": list(shape),
        "settings": settings,
        **stats,
    }
    args.output.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.keep_shards:
        shutil.rmtree(parts)
    log.info("wrote %s %s", args.output, tuple(shape))


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """What to sample from: the checkpoint, the model that fits it, the decoder."""
    p.add_argument(
        "--ckpt",
        required=True,
        help="EMA snapshot (.pt/.safetensors), official checkpoint, or hf://OWNER/NAME/FILE from the "
        "Hugging Face Hub (its cache; HF_HUB_OFFLINE=1 stays offline), e.g. hf://shgao/MDT-XL2/mdt_xl2_v2_ckpt.pt",
    )
    p.add_argument(
        "--model",
        nargs="+",
        default=None,
        metavar=("PRESET", "key=value"),
        help="a preset, e.g. MDTv2-XL/2, with optional ModelConfig overrides (--model MDTv2-Tiny/2 "
        "input_size=16). Default: config.json beside --ckpt, else the checkpoint's shapes. Fields the "
        "state_dict determines (hidden size, depth, heads, patch, channels, classes, input size) are "
        "taken from it unless set here; a model equal to no preset is labelled 'custom'",
    )
    p.add_argument("--config", type=Path, default=None, help="a run's config.json (its model section is used)")
    p.add_argument(
        "--vae",
        default=None,
        help="the decoder: 'ema' (sd-vae-ft-ema), 'mse', 'pixel', a hub id or directory ('tiny-random' for "
        "tests). Default: for a run's EMA snapshot, the codec it was trained on (snapshots/config.json -> "
        "the data manifest; if that VAE folder moved, pass its new place here); for official checkpoints 'ema', "
        "the paper's FID decoder",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdt-sample", description=__doc__, formatter_class=HelpFormatter
    )
    _add_input_args(p)
    p.add_argument("--num-samples", type=int, default=50_000, help="images to make (FID-50K: 50000)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward, per rank")
    p.add_argument("--seed", type=int, default=0, help="global seed; image i uses seeds derived from (seed, i)")
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="ddpm",
        help="'ddpm' (release FID protocol), 'ddim', or the ODE solvers 'dpm++2m' (one network call per step) "
        "and 'heun' (2N-1 calls)",
    )
    p.add_argument("--steps", type=int, default=250, help="sampling steps (release: 250 DDPM)")
    p.add_argument(
        "--spacing",
        choices=SPACINGS,
        default="auto",
        help="kept timesteps: 'time' (even over 0..999), 'ddim' (integer stride), 'logsnr' (even in log-SNR); "
        "'auto': ddpm/heun time, ddim ddim, dpm++2m logsnr",
    )
    p.add_argument(
        "--cfg-interval",
        type=int,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="guide only at original timesteps LO..HI (Kynkaanniemi et al. 2024); other steps run the "
        "conditional half alone, one network call instead of two (default: every step)",
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--cfg-scale", type=float, default=3.8, help="guidance scale; 1 = no guidance (release FID: 3.8)")
    p.add_argument("--cfg-pow", type=float, default=4.0, help="power-cosine schedule exponent (release: 4)")
    p.add_argument(
        "--guide-channels",
        choices=("release", "all"),
        default="release",
        help="'release': first min(3, C) eps channels, as released; 'all': every latent channel",
    )
    p.add_argument(
        "--labels",
        choices=("uniform", "balanced"),
        default="uniform",
        help="'uniform': random per image (release); 'balanced': index %% classes",
    )
    p.add_argument(
        "--rounding",
        choices=("truncate", "round"),
        default="truncate",
        help="uint8 quantisation: 'truncate' (release) or 'round' (DiT)",
    )
    p.add_argument(
        "--autocast",
        choices=("none", "bf16", "fp16"),
        default="none",
        help="model forward precision (release: none = fp32/TF32)",
    )
    p.add_argument("--no-tf32", action="store_true", help="disable TF32 matmuls on GPUs (release: enabled)")
    p.add_argument("--output", type=Path, default=None, help="the ADM .npz to write (default: samples/<name>.npz)")
    p.add_argument("--keep-shards", action="store_true", help="keep OUTPUT.parts/ after packing")
    p.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="stop after this many batches per rank (time-limited jobs); rerun to continue",
    )
    p.add_argument("--overwrite", action="store_true", help="discard earlier shards/output of other settings")
    p.add_argument("--device", default="auto", help="'auto' (this rank's GPU, else CPU), 'cpu', 'cuda'")
    p.add_argument("--timeout-min", type=float, default=dist.DEFAULT_TIMEOUT_MIN,
                   help="minutes a collective (the start, the final count) may wait for the other ranks")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _device(args: argparse.Namespace) -> torch.device:
    if args.device != "auto":
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":  # the release samples with TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
    return device


def _label_classes(run_file: Path | None, cfg: ModelConfig) -> int:
    """The classes to draw labels from: those the run trained on when its model has more label
    rows (data.untrained_classes), said in the log; else 0 (every row)."""
    trained = trained_classes(run_file)
    if trained is None or trained >= cfg.num_classes:
        return 0
    log.info("labels: drawn from the %d classes the run trained on (its model has %d label rows; the others are "
             "untrained)", trained, cfg.num_classes)
    return trained


def _options(args: argparse.Namespace, num_timesteps: int = 1000, label_classes: int = 0):
    from mdt_ds.sampling import SampleOptions

    return SampleOptions(
        cfg_scale=args.cfg_scale,
        cfg_pow=args.cfg_pow,
        guide_channels=args.guide_channels,
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        spacing=args.spacing,
        cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
        labels=args.labels,
        rounding=args.rounding,
        autocast=args.autocast,
        num_timesteps=num_timesteps,
        label_classes=label_classes,
    )


def sample_main(args: argparse.Namespace) -> Callable[[], None] | None:
    """Sample this rank's share. Returns, on rank 0 once every index exists, the pack of the
    npz: run after the process group is left, so the other ranks need not wait in a collective
    (whose timeout a 50K pack of large images can outlast) and end as soon as their shards are in."""
    from mdt_ds.models.codec import check_vae, load_codec
    from mdt_ds.tools.convert_checkpoint import resolve_weights_path

    device = _device(args)
    hub = str(args.ckpt).startswith("hf://")
    args.ckpt_file = resolve_weights_path(args.ckpt)
    run_file = run_config_file(args.model, args.config, args.ckpt_file, hub)
    args.vae = choose_codec(args.vae, run_file)
    check_vae(args.vae, "--vae DIR")  # a moved VAE folder fails now, in one line, not after the model loads
    state = load_state(args.ckpt_file)  # before anything is written: a bad file fails first
    cfg = model_config(args.model, args.config, args.ckpt_file, state, hub=hub)
    try:
        options = _options(args, trained_timesteps(run_file), _label_classes(run_file, cfg))
    except ValueError as err:  # e.g. --cfg-interval beyond a run trained on fewer timesteps
        raise SampleError(f"{err} (the checkpoint's run has diffusion.num_timesteps="
                          f"{trained_timesteps(run_file)})") from None
    args.output = args.output or default_output(args, cfg)
    parts = args.output.with_name(args.output.name + ".parts")
    settings = settings_of(args, cfg, options)
    chunks = prepare(args, settings, parts)
    if chunks is None:
        log.info("%s is complete (%d images); nothing to do", args.output, args.num_samples)
        return None
    model = load_model(state, cfg, device)
    del state
    codec = load_codec(args.vae, device, channels=cfg.in_channels)
    if dist.rank() == 0:
        record_settings(parts, settings)
    todo = sum(b - a for a, b in chunks)
    interval = f" on t in {list(options.cfg_interval)}" if options.cfg_interval else ""
    how = (f"{cfg.preset}, {args.sampler} {args.steps} steps, cfg {args.cfg_scale:g} pow {args.cfg_pow:g}{interval}, "
           f"{options.network_calls()} network calls per image")
    log.info(
        "%d of %d images to make on %d ranks (%s); shards in %s", todo, args.num_samples, dist.world_size(), how, parts
    )
    start = time.time()
    counted: dict = {}
    made = run_chunks(args, model, options.diffusion(), codec, options, chunks, parts, device, counted)
    seconds = time.time() - start
    totals = dist.mean_across_ranks({"made": made, "seconds": seconds})  # also: every rank's shards are in
    rate = totals["made"] * dist.world_size() / max(totals["seconds"], 1e-9)
    log.info("made %d images in %.1f s (%.2f images/s over all ranks)", made * dist.world_size(), seconds, rate)
    if args.max_batches is not None and len(chunks) > args.max_batches * dist.world_size():
        log.info("stopped after --max-batches %d; rerun the same command to continue", args.max_batches)
        return None
    stats = {"world_size": dist.world_size(), "images_per_second": rate, "last_run_seconds": seconds,
             # as counted while sampling (planned, where this rank made no batch in this launch)
             "network_calls_per_image": counted.get("network_calls_per_image", options.network_calls())}
    return functools.partial(finish, args, settings, parts, stats) if dist.rank() == 0 else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _options(args).network_calls()  # an impossible sampler setting is a usage error, before any file is read
    except ValueError as err:
        parser.error(str(err))
    distributed = dist.launcher_env(argv=sys.argv).world_size > 1
    if distributed:
        dist.init(sys.argv, timeout_min=args.timeout_min)
    if dist.rank() == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from mdt_ds.models.codec import CodecError
    from mdt_ds.safe_load import UnsafeCheckpointError

    user_errors = (SampleError, ConfigError, CodecError, UnsafeCheckpointError, FileNotFoundError)
    finished, code, pack = False, 2, None
    try:
        pack = sample_main(args)
        finished, code = True, 0
    except user_errors as err:
        _report(err)
    finally:
        if distributed:
            dist.teardown(synchronise=finished)
    if pack is not None:  # rank 0 alone, outside the group: no collective is left to time out
        try:
            pack()
        except SampleError as err:
            _report(err)
            code = 2
    if distributed:
        dist.exit_launched_rank(code)
    return code


def _report(err: Exception) -> None:
    """One line, as argparse's own errors: the message names the file and the fix."""
    print(f"mdt-sample: error: {' '.join(str(err).split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
