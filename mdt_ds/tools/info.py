"""``mdt-info``: what a run will cost, before it starts.

    mdt-info --model MDTv2-XL/2 --gpus 8 --micro-batch 32 --zero-stage 2 --gpu H100
    mdt-info --model MDTv2-B/2 --gpus 1 --micro-batch 64 --zero-stage 0 --json

Prints parameters, MACs per training image (both MDTv2 passes, as the trainer counts them), memory
per GPU (weights, gradients, fp32 master, optimizer moments and EMA, sharded per ZeRO stage as in
the ZeRO paper, plus an activation ESTIMATE), the disk of each checkpoint and EMA snapshot, the
time at an MFU (images/s, hours per 100K steps, GPU-hours to the paper's 4600K steps x 256) and
the time to extract ImageNet's latents. Nothing is allocated: the model is built on the meta device.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from mdt_ds.checkpoint import GiB, estimate_bytes, snapshot_suffixes
from mdt_ds.clihelp import HelpFormatter
from mdt_ds.config import PRECISIONS, ConfigError, TrainConfig, checkpointing_scope, resolve_batch
from mdt_ds.models import MDTv2, build_model
from mdt_ds.models.checkpointing import checkpointed_blocks
from mdt_ds.models.flops import count_macs, count_params, train_macs_per_image
from mdt_ds.monitor import PEAK_PARTS, table_peak_flops

# No MFU has been measured on a GPU yet (README "Speed, GPUs and the device check"), so the
# default is an assumption, said so in every report: 0.35 is what well-tuned DiT-size trainers
# reach in bf16 (the project's goal is 0.5 on an H100).
DEFAULT_MFU = 0.35
# Gao et al., "MDTv2: Masked Diffusion Transformer is a Strong Image Synthesizer" (2023): the
# published FID 1.58 of MDTv2-XL/2 is at 4600K steps x 256.
PAPER_STEPS, PAPER_BATCH = 4_600_000, 256
PAPER_SOURCE = ('Gao et al. 2023, "MDTv2: Masked Diffusion Transformer is a Strong Image Synthesizer": '
                "MDTv2-XL/2 FID 1.58 at 4600K steps x batch 256")
RELEASE_ANCHOR = (
    "the official release (github.com/sail-sg/MDT; fp32, VAE online every step) reports about 200K steps "
    "a day for XL/2 on 32 A100-40GB, about 19 img/s per GPU"
)
IMAGENET_TRAIN_IMAGES = 1_281_167
# SD-VAE encodes per second and GPU at 256 px in bf16: an assumption (no GPU has measured it here;
# benchmarks/device_check.sh part (d) and mdt-extract-latents' final log line do).
DEFAULT_VAE_IMGS_PER_S = 500.0
# Per-GPU bandwidth of the data-parallel collectives across nodes: an assumption, stated in the report.
DEFAULT_BANDWIDTH_GBS = 50.0
BANDWIDTH_NOTE = "one 400 Gb/s InfiniBand NDR link per GPU, as on 8-GPU H100 nodes; NVLink within a node is faster"
# Activations stored per token by one transformer block, in elements (Korthikanti et al. 2022,
# "Reducing Activation Recomputation in Large Transformer Models", without dropout: attention 5h
# plus the softmax a*s, MLP 9h, the two LayerNorm inputs 2h; adaLN adds the two modulate outputs and
# the two gated branches, 4h; a skip block also keeps its concatenated [x, skip] input, 2h).
BLOCK_ELEMENTS_PER_TOKEN, SKIP_ELEMENTS_PER_TOKEN = 20, 2


# --------------------------------------------------------------------------- model
def model_costs(model: MDTv2) -> dict[str, Any]:
    """Parameter counts and MACs per image (forward full/masked at the trainer's 0.4, training)."""
    counts = count_params(model)
    return {
        "params": counts["all"],
        "params_inference": counts["inference"],
        "params_paper_table1": counts["paper_table1"],
        "forward_macs_full": count_macs(model),
        "forward_macs_masked": count_macs(model, 0.4),
        "train_macs_per_image": train_macs_per_image(model),
    }


# --------------------------------------------------------------------------- memory
def state_bytes(num_params: int, precision: str, zero_stage: int, gpus: int, optimizer: str) -> dict[str, float]:
    """Model and optimizer state per GPU (the ZeRO paper's model): weights in the training
    precision (sharded by ZeRO-3), gradients (ZeRO-2, 3), fp32 master, moments (Adan 4, AdamW 2)
    and this project's EMA (ZeRO-1, 2, 3; see mdt_ds/ema.py: the EMA shadows the master's slices)."""
    low = param_bytes(precision)
    moments = 4 if optimizer == "adan" else 2
    shard = {name: gpus if zero_stage >= stage else 1 for name, stage in (("p", 3), ("g", 2), ("os", 1))}
    # A run with fp32 parameters (fp32, bf16-amp) keeps no separate master at ZeRO-0 (the
    # optimizer steps the parameters) nor at ZeRO-3 (stage3.py reuses the fp32 partition);
    # ZeRO-1/2 clone their fp32 partition.
    master = 0 if low == 4 and zero_stage in (0, 3) else 4
    return {
        "weights": num_params * low / shard["p"],
        "gradients": num_params * low / shard["g"],
        "fp32_master": num_params * master / shard["os"],
        "optimizer_moments": num_params * 4 * moments / shard["os"],
        "ema": num_params * 4 / shard["os"],
    }


def param_bytes(precision: str) -> int:
    """Bytes per parameter (and per weight gradient) in the training precision: bf16-amp keeps
    fp32 parameters; its matmuls run in bf16."""
    return 2 if precision in ("bf16", "fp16") else 4


def _block_tokens(model: MDTv2) -> list[tuple[Any, int, bool]]:
    """(block, tokens, is a skip block) for each block run in a training step: the full pass over
    all but the side block, then the masked pass at the LOWEST ratio of the drawn range (the most
    kept tokens: the peak), encoder on the kept tokens, side and decoder blocks on all."""
    length = model.x_embedder.num_patches
    encoder = [*model.en_inblocks, *model.en_outblocks]
    runs = [(b, length) for b in encoder + list(model.de_blocks)]
    if model.mask_ratio is not None:
        kept = int(length * (1 - model.mask_ratio))
        runs += [(b, kept) for b in encoder] + [(b, length) for b in [*model.sideblocks, *model.de_blocks]]
    return [(b, n, b.skip_linear is not None) for b, n in runs]


def activation_bytes(model: MDTv2, micro_batch: int, precision: str, scope: str | list[int]) -> dict[str, int]:
    """An ESTIMATE of the activations kept for backward per GPU (both passes live until the one
    backward) with activation checkpointing ``scope``: a checkpointed block keeps only its input,
    and backward recomputes one such block at a time."""
    elem = 4 if precision == "fp32" else 2  # bf16-amp: the matmul inputs and outputs are bf16
    hidden, heads = model.hidden_size, model.num_heads
    wrapped = {id(b) for b in checkpointed_blocks(model, scope)}
    kept = recompute = 0
    for block, tokens, skip in _block_tokens(model):
        per_token = (BLOCK_ELEMENTS_PER_TOKEN + (SKIP_ELEMENTS_PER_TOKEN if skip else 0)) * hidden + heads * tokens
        full = micro_batch * tokens * per_token * elem
        if id(block) in wrapped:
            kept += micro_batch * tokens * hidden * elem
            recompute = max(recompute, full)
        else:
            kept += full
    return {"bytes": kept + recompute, "checkpointed_blocks": len(wrapped)}


def activation_report(model: MDTv2, micro_batch: int, precision: str, scope: str | list[int]) -> dict[str, Any]:
    """The chosen scope's estimate beside the named scopes', so the option's effect shows."""
    return {
        **activation_bytes(model, micro_batch, precision, scope),
        "by_scope": {
            name: activation_bytes(model, micro_batch, precision, name)["bytes"] for name in ("none", "encoder", "all")
        },
        "blocks": len(model.blocks()),
        "note": "an estimate (Korthikanti et al. 2022 per-block counts, softmax stored, masked pass at its "
        "lowest ratio); checkpointed blocks cost one more forward in backward (about +1/3 of their MACs)",
    }


# --------------------------------------------------------------------------- disk and time
def disk_bytes(
    num_params: int, precision: str, optimizer: str, keep_ckpts: int, keep_snapshots: int, snapshot_format: str,
    universal_every: int = 4,
) -> dict[str, Any]:
    """Each checkpoint (its universal form apart: in every ``universal_every``-th only) and
    snapshot (checkpoint.estimate_bytes, the trainer's own estimate), and what the kept ones add
    up to, at most one in ``universal_every`` of them with the universal form (at least one);
    None where keep=0 keeps them all (the total grows with the run)."""
    sizes = estimate_bytes(num_params, precision, optimizer)
    snapshot = sizes["snapshot"] * len(snapshot_suffixes(snapshot_format))
    with_universal = max(1, -(-keep_ckpts // universal_every)) if universal_every else 1
    ckpts = sizes["checkpoint"] * keep_ckpts + sizes["universal"] * with_universal if keep_ckpts else None
    snaps = snapshot * keep_snapshots if keep_snapshots else None
    return {
        "checkpoint": sizes["checkpoint"],
        "universal": sizes["universal"],
        "universal_every": universal_every,
        "snapshot": snapshot,
        "keep_ckpts": keep_ckpts,
        "keep_snapshots": keep_snapshots,
        "kept_total": None if ckpts is None or snaps is None else ckpts + snaps,
    }


def communication(
    num_params: int, zero_stage: int, gpus: int, grad_accum: int, grad_bytes: int, weight_bytes: int,
    bandwidth_gbs: float, compute_s: float,
) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step, and their time at ``bandwidth_gbs`` GB/s, beside
    the step's compute time. Ring collectives move ``(N-1)/N`` of the data per GPU (the ZeRO
    paper's volumes, Rajbhandari et al. 2020, section 7): ZeRO-0 all-reduces the gradients once
    per step (2x), ZeRO-1 reduce-scatters them once per step, ZeRO-2 at every micro-step (its
    gradients are partitioned as they are made), and ZeRO-1/2 all-gather the updated weights;
    ZeRO-3 all-gathers the weights twice (forward, backward) and reduce-scatters the gradients
    at every micro-step. Assumes DeepSpeed overlaps none of it: the time is an upper bound."""
    ring = (gpus - 1) / gpus
    grads = {0: 2.0, 1: 1.0, 2: float(grad_accum), 3: float(grad_accum)}[zero_stage] * grad_bytes
    weights = {0: 0.0, 1: 1.0, 2: 1.0, 3: 2.0 * grad_accum}[zero_stage] * weight_bytes
    volume = ring * num_params * (grads + weights)
    seconds = volume / (bandwidth_gbs * 1e9)
    return {"bytes_per_gpu": volume, "seconds": seconds, "bandwidth_gbs": bandwidth_gbs, "compute_seconds": compute_s,
            "comm_over_compute": seconds / compute_s if compute_s else 0.0}


def reduce_bytes(precision: str, grad_reduce_dtype: str) -> int:
    """Bytes per gradient element on the wire: ``grad_reduce_dtype``, else DeepSpeed's choice (the
    training precision; bf16-amp reduces its Linear and Conv weights, most of the model, in bf16)."""
    if grad_reduce_dtype != "auto":
        return 4 if grad_reduce_dtype == "fp32" else 2
    return 4 if precision == "fp32" else 2


def speed(train_macs: int, peak_flops: float, mfu: float, gpus: int, global_batch: int) -> dict[str, float]:
    """Images/s from ``MFU = 2 x MACs/image x images/s / peak`` (README "Speed"), hours per 100K
    steps at ``global_batch``, and GPU-hours and wall hours to the paper's training length."""
    per_gpu = mfu * peak_flops / (2 * train_macs)
    total = per_gpu * gpus
    paper_gpu_hours = PAPER_STEPS * PAPER_BATCH / per_gpu / 3600
    return {
        "imgs_per_s_per_gpu": per_gpu,
        "imgs_per_s": total,
        "steps_per_s": total / global_batch,
        "hours_per_100k_steps": 100_000 * global_batch / total / 3600,
        "paper_gpu_hours": paper_gpu_hours,
        "paper_wall_hours": paper_gpu_hours / gpus,
    }


def extraction(vae_imgs_per_s: float, gpus: int) -> dict[str, float]:
    """ImageNet train through the VAE: each image is encoded twice (it and its flip)."""
    encodes = 2 * IMAGENET_TRAIN_IMAGES
    return {
        "images": IMAGENET_TRAIN_IMAGES,
        "encodes": encodes,
        "vae_imgs_per_s_per_gpu": vae_imgs_per_s,
        "hours": encodes / (vae_imgs_per_s * gpus) / 3600,
    }


# --------------------------------------------------------------------------- the report
def peak(args: argparse.Namespace) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): --peak-tflops, else the datasheet table."""
    half = {"bf16": "bf16", "bf16-amp": "bf16", "fp16": "fp16"}
    kind = half.get(args.precision) or ("tf32" if args.tf32 else "fp32")
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"--peak-tflops {args.peak_tflops:g}"
    found = table_peak_flops(args.gpu, kind)
    if found is None and table_peak_flops(args.gpu, "fp16") is not None:  # known, without bf16 (V100)
        raise ConfigError(f"--gpu {args.gpu!r} has no bf16 tensor cores: use --precision fp16 (what a V100 "
                          "trains in), or pass --peak-tflops with the rate you expect")
    if found is None:
        raise ConfigError(
            f"--gpu {args.gpu!r} is not in the peak table (known: {', '.join(PEAK_PARTS)}); "
            "pass --peak-tflops with its dense peak"
        )
    return found[0], f"{found[1]} dense {kind} peak from NVIDIA's datasheet (mdt_ds.monitor table)"


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the report shows, as one JSON-able dict (ConfigError on bad input)."""
    model = build_model(args.model, device="meta")
    scope = checkpointing_scope(args.activation_checkpointing)
    try:
        checkpointed_blocks(model, scope)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    cfg = TrainConfig(global_batch=args.global_batch, micro_batch=args.micro_batch)
    micro, accum = resolve_batch(cfg, args.gpus)
    costs = model_costs(model)
    states = state_bytes(costs["params"], args.precision, args.zero_stage, args.gpus, args.optimizer)
    acts = activation_report(model, micro, args.precision, scope)
    flops, source = peak(args)
    mfu = args.mfu if args.mfu is not None else DEFAULT_MFU
    rate = speed(costs["train_macs_per_image"], flops, mfu, args.gpus, args.global_batch)
    comm = communication(costs["params"], args.zero_stage, args.gpus, accum, reduce_bytes(args.precision,
                         args.grad_reduce_dtype), param_bytes(args.precision), args.bandwidth_gbs,
                         micro * accum / rate["imgs_per_s_per_gpu"])
    return {
        "model": args.model,
        **costs,
        "run": {
            "gpus": args.gpus,
            "micro_batch": micro,
            "grad_accum": accum,
            "global_batch": args.global_batch,
            "zero_stage": args.zero_stage,
            "precision": args.precision,
            "optimizer": args.optimizer,
            "activation_checkpointing": args.activation_checkpointing,
            "grad_reduce_dtype": args.grad_reduce_dtype,
        },
        "memory_per_gpu": {
            **states,
            "states_total": sum(states.values()),
            "activations_estimate": acts,
            "total_estimate": sum(states.values()) + acts["bytes"],
        },
        "disk": disk_bytes(
            costs["params"], args.precision, args.optimizer, args.keep_ckpts, args.keep_snapshots, args.snapshot_format,
            args.universal_every,
        ),
        "communication": {**comm, "bandwidth_source": "given (--bandwidth-gbs)" if args.bandwidth_gbs !=
                          DEFAULT_BANDWIDTH_GBS else f"assumed {DEFAULT_BANDWIDTH_GBS:g} GB/s per GPU: {BANDWIDTH_NOTE}"},
        "speed": {
            "gpu": args.gpu,
            "peak_flops": flops,
            "peak_source": source,
            "mfu": mfu,
            "mfu_source": "given (--mfu)"
            if args.mfu is not None
            else f"assumed {DEFAULT_MFU} (no MFU measured on a GPU yet; pass --mfu)",
            **rate,
            "paper_length": PAPER_SOURCE,
            "release_anchor": RELEASE_ANCHOR,
        },
        "extraction": {
            **extraction(args.vae_imgs_per_s, args.gpus),
            "gpus": args.gpus,
            "vae_source": "given (--vae-imgs-per-s)"
            if args.vae_imgs_per_s != DEFAULT_VAE_IMGS_PER_S
            else f"assumed {DEFAULT_VAE_IMGS_PER_S:g} encodes/s per GPU (SD-VAE, 256 px, bf16)",
        },
    }


def _gib(value: float | None) -> str:
    return "all kept (keep=0): grows with the run" if value is None else f"{value / GiB:.2f} GiB"


def format_report(r: dict[str, Any]) -> str:
    """The human-readable report."""
    run, mem, acts, disk, sp, ex, comm = (
        r["run"],
        r["memory_per_gpu"],
        r["memory_per_gpu"]["activations_estimate"],
        r["disk"],
        r["speed"],
        r["extraction"],
        r["communication"],
    )
    every = disk["universal_every"]
    ckpt = run["activation_checkpointing"]
    lines = [
        f"{r['model']}: {r['params'] / 1e6:.2f}M parameters ({r['params_inference'] / 1e6:.2f}M at inference, "
        f"{r['params_paper_table1'] / 1e6:.2f}M as the paper's Table 1 counts)",
        f"MACs per image: forward {r['forward_macs_full'] / 1e9:.2f} G full, {r['forward_macs_masked'] / 1e9:.2f} G "
        f"masked (r=0.4); training {r['train_macs_per_image'] / 1e9:.1f} G = 3 x (full + masked), "
        f"{2 * r['train_macs_per_image'] / 1e12:.3f} TFLOP",
        "",
        f"Memory per GPU: {run['gpus']} GPU(s), micro-batch {run['micro_batch']} (grad accumulation "
        f"{run['grad_accum']}, global batch {run['global_batch']}), ZeRO-{run['zero_stage']}, {run['precision']}, "
        f"{run['optimizer']}",
        *(
            f"  {name:<20} {_gib(mem[key])}"
            for name, key in (
                ("weights", "weights"),
                ("gradients", "gradients"),
                ("fp32 master", "fp32_master"),
                ("optimizer moments", "optimizer_moments"),
                ("EMA (fp32)", "ema"),
                ("states total", "states_total"),
            )
        ),
        f"  {'activations':<20} {_gib(acts['bytes'])} with activation_checkpointing={ckpt!r} "
        f"({acts['checkpointed_blocks']} of {acts['blocks']} blocks recomputed) -- an ESTIMATE",
        "  "
        + " " * 21
        + ", ".join(f"{name}: {_gib(v)}" for name, v in acts["by_scope"].items())
        + "; a recomputed block costs one more forward (about +1/3 of its MACs)",
        f"  {'total (estimate)':<20} {_gib(mem['total_estimate'])} (activation_checkpointing={ckpt!r}); not counted: "
        "CUDA context, DeepSpeed's communication buckets, allocator fragmentation",
        "",
        f"Disk: each checkpoint {_gib(disk['checkpoint'])} (DeepSpeed's files and the EMA shards), "
        f"+{_gib(disk['universal'])} for the world-size-independent form in "
        f"{'the checkpoints of a stop and the end' if not every else f'every {every}th checkpoint and the last'}; "
        f"each EMA snapshot {_gib(disk['snapshot'])}; kept ({disk['keep_ckpts']} checkpoints + "
        f"{disk['keep_snapshots']} snapshots): {_gib(disk['kept_total'])}",
        "",
        f"Communication per step and GPU (ZeRO-{run['zero_stage']}, gradients reduced as "
        f"grad_reduce_dtype={run['grad_reduce_dtype']!r}): {comm['bytes_per_gpu'] / 1e9:.2f} GB, "
        f"{comm['seconds'] * 1e3:.0f} ms at {comm['bandwidth_gbs']:g} GB/s ({comm['bandwidth_source']}) against "
        f"{comm['compute_seconds'] * 1e3:.0f} ms of compute at the MFU below: {comm['comm_over_compute']:.2f}x, "
        "hidden only as far as it overlaps the backward (comm.overlap_comm, comm.reduce_bucket_size)",
        "",
        f"Time on {run['gpus']} x {sp['gpu']}: peak {sp['peak_flops'] / 1e12:.0f} TFLOP/s ({sp['peak_source']}), "
        f"MFU {sp['mfu']:.2f} ({sp['mfu_source']})",
        f"  {sp['imgs_per_s_per_gpu']:.0f} img/s per GPU, {sp['imgs_per_s']:.0f} img/s in all, "
        f"{sp['hours_per_100k_steps']:.1f} h per 100K steps at global batch {run['global_batch']}",
        f"  paper length ({sp['paper_length']}): {sp['paper_gpu_hours']:.0f} GPU-hours, "
        f"{sp['paper_wall_hours']:.0f} h ({sp['paper_wall_hours'] / 24:.1f} days) on {run['gpus']} GPU(s)",
        f"  for scale: {sp['release_anchor']}",
        "",
        f"Latent extraction: {ex['images']:,} ImageNet train images, {ex['encodes']:,} VAE encodes (image + flip) "
        f"at {ex['vae_imgs_per_s_per_gpu']:g}/s per GPU ({ex['vae_source']}) on {ex['gpus']} GPU(s): "
        f"{ex['hours']:.2f} h",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, no usage block: the message says what to fix."""
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _number(kind: type, low: float, high: float | None = None, low_open: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        bad = value <= low if low_open else value < low
        if bad or (high is not None and value > high):
            rule = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{text} must be {rule}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TrainConfig()
    p = _Parser(prog="mdt-info", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="MDTv2-XL/2", help="model preset (mdt_ds/config.py MODEL_PRESETS)")
    p.add_argument("--gpus", type=_number(int, 1), default=8, help="GPUs (data-parallel ranks)")
    p.add_argument("--micro-batch", type=_number(int, 1), default=32, help="images per GPU per forward")
    p.add_argument("--global-batch", type=_number(int, 1), default=d.global_batch, help="images per step (paper: 256)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=d.zero_stage,
                   help="DeepSpeed ZeRO stage: what is sharded over the GPUs (the run's zero_stage)")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="training precision (the run's precision); fp16 on V100s, which lack bf16")
    p.add_argument("--grad-reduce-dtype", choices=("auto", "fp32", "bf16"), default=d.grad_reduce_dtype,
                   help="dtype of the gradient reduction (auto: DeepSpeed's, the training precision)")
    p.add_argument("--bandwidth-gbs", type=_number(float, 0, low_open=True), default=DEFAULT_BANDWIDTH_GBS,
                   help="per-GPU bandwidth of the collectives in GB/s, for the communication time")
    p.add_argument("--universal-every", type=_number(int, 0), default=d.universal_every,
                   help="the world-size-independent form in every Nth checkpoint (0: only at stops and the end)")
    p.add_argument("--optimizer", choices=("adan", "adamw"), default=d.optim.name,
                   help="optimizer state per parameter: Adan keeps 4 fp32 tensors, AdamW 2")
    p.add_argument(
        "--activation-checkpointing",
        default=d.activation_checkpointing,
        help="'none', 'encoder', 'all', a block count N or indices '0,3,5'",
    )
    p.add_argument("--gpu", default="H100", help=f"GPU type for the peak table: {', '.join(PEAK_PARTS)}")
    p.add_argument(
        "--peak-tflops", type=_number(float, 0), default=0.0, help="dense peak TFLOP/s of the GPU (0: the table's)"
    )
    p.add_argument("--tf32", action="store_true", help="fp32 runs with TF32 matmuls (the TF32 peak)")
    p.add_argument(
        "--mfu",
        type=_number(float, 0, 1, low_open=True),
        default=None,
        help=f"model FLOP utilisation (default None: an assumed {DEFAULT_MFU}, stated in the report)",
    )
    p.add_argument("--keep-ckpts", type=_number(int, 0), default=d.keep_ckpts, help="full checkpoints kept (0: all)")
    p.add_argument(
        "--keep-snapshots", type=_number(int, 0), default=d.keep_snapshots, help="EMA snapshots kept (0: all)"
    )
    p.add_argument("--snapshot-format", choices=("pt", "safetensors", "both"), default=d.snapshot_format,
                   help="EMA snapshot files written (both: twice the disk)")
    p.add_argument(
        "--vae-imgs-per-s",
        type=_number(float, 0, low_open=True),
        default=DEFAULT_VAE_IMGS_PER_S,
        help="SD-VAE encodes per second per GPU for the extraction time (an assumption unless measured)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad argument (2, its one line already printed)
        return int(exit_.code or 0)
    try:
        report = estimate(args)
    except ConfigError as err:
        print(f"mdt-info: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
