"""``mdt-eval`` (also ``python eval/evaluator.py``): the ADM evaluator, in PyTorch, distributed.

commands:
    mdt-eval [eval] REF.npz SAMPLE.npz [--out metrics.json]   FID, sFID, IS, precision, recall
    mdt-eval ref SOURCE OUT.npz [--image-size 256]             make an ADM reference batch (+ OUT.json)
    mdt-eval show NPZ [--out PNG] [--nrow 8] [--max 64]        a labelled grid PNG of any ADM .npz
    torchrun --nproc_per_node=8 eval/evaluator.py REF.npz SAMPLE.npz   (features on every GPU)

SOURCE is an ImageNet-style class folder tree (e.g. ``train/``), image tars, or an image .npz.
Inception weights: ``--inception PATH|download|fid-helper`` (see mdt_ds/metrics/inception.py).
``mdt-eval ref --help`` and ``mdt-eval show --help`` list their options.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from mdt_ds import dist
from mdt_ds.clihelp import HelpFormatter

log = logging.getLogger("mdt_ds.metrics")
COMMANDS = ("eval", "ref", "show")


def _parser(prog: str, usage: str | None, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, usage=usage, description=description, formatter_class=HelpFormatter)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inception",
        default=None,
        help="Inception weights: a file, 'download', 'fid-helper' (unset: the first found; see docs)",
    )
    parser.add_argument(
        "--backend",
        choices=("adm", "clean-fid"),
        default="adm",
        help="'clean-fid': clean-fid's legacy_tensorflow features (FID/precision/recall only)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="Inception batch per rank (ADM: 64)")
    parser.add_argument("--device", default="auto", help="'auto' (this rank's GPU, else CPU), 'cpu', 'cuda'")
    parser.add_argument("--timeout-min", type=float, default=dist.DEFAULT_TIMEOUT_MIN,
                        help="minutes a collective may wait for the other ranks")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def eval_parser() -> argparse.ArgumentParser:
    # An explicit usage: argparse's own ends in "ref sample", which reads as the `ref` command.
    usage = (
        "%(prog)s [eval] REF.npz SAMPLE.npz [options]\n"
        "       %(prog)s ref SOURCE OUT.npz [options]   (mdt-eval ref --help)\n"
        "       %(prog)s show NPZ [options]             (mdt-eval show --help)"
    )
    parser = _parser("mdt-eval", usage, __doc__)
    parser.add_argument(
        "ref", metavar="REF.npz", type=Path, help="reference batch (.npz: arr_0 images and/or mu/sigma/mu_s/sigma_s)"
    )
    parser.add_argument("sample", metavar="SAMPLE.npz", type=Path, help="sample batch (.npz: arr_0 uint8 NHWC)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: SAMPLE.metrics.json)")
    parser.add_argument(
        "--fd-method",
        choices=("sqrtm", "eigh"),
        default="sqrtm",
        help="'sqrtm': ADM's exact code; 'eigh': faster eigenvalue form",
    )
    parser.add_argument("--pr-fp32", action="store_true", help="fp32 distances for precision/recall (ADM: fp16)")
    _common(parser)
    return parser


def ref_parser() -> argparse.ArgumentParser:
    description = (
        "Make an ADM reference batch: statistics of all images and a random subset of images for "
        "precision/recall. A summary (image count, size, kept-subset digest, Inception) goes to OUT.json beside it."
    )
    parser = _parser("mdt-eval ref", None, description)
    parser.add_argument("source", metavar="SOURCE", type=Path, help="class folder tree, image tars, or an image .npz")
    parser.add_argument("out", metavar="OUT.npz", type=Path, help="output .npz")
    parser.add_argument("--image-size", type=int, default=256, help="ADM centre crop size (folders and tars)")
    parser.add_argument("--num-images", type=int, default=10_000, help="images kept in arr_0 (ADM: 10,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kept subset")
    parser.add_argument("--workers", type=int, default=4, help="image decoding workers per rank")
    _common(parser)
    return parser


def show_parser() -> argparse.ArgumentParser:
    description = "A grid PNG of any ADM .npz (arr_0 uint8 NHWC), each tile labelled with its class (arr_1)."
    parser = _parser("mdt-eval show", None, description)
    parser.add_argument("npz", metavar="NPZ", type=Path, help="an ADM batch: samples or a reference batch")
    parser.add_argument("--out", type=Path, default=None, help="output PNG (unset: NPZ.grid.png beside it)")
    parser.add_argument("--nrow", type=_positive, default=8, help="images per row")
    parser.add_argument("--max", type=_positive, default=64, help="images shown (the first ones)")
    parser.add_argument("--no-labels", action="store_true", help="do not draw the arr_1 labels")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(spec)


def _setup(timeout_min: float) -> bool:
    """Join the process group when a launcher started several processes."""
    distributed = dist.launcher_env(argv=sys.argv).world_size > 1
    if distributed:
        dist.init(sys.argv, timeout_min=timeout_min)
    if dist.rank() == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return distributed


def _extractor(args: argparse.Namespace, device: torch.device):
    from mdt_ds.metrics.inception import load_extractor

    return load_extractor(args.inception, device, backend=args.backend)


def run_eval(args: argparse.Namespace) -> int:
    from mdt_ds.metrics.checks import protocol_checks
    from mdt_ds.metrics.evaluate import evaluate_batches, format_results
    from mdt_ds.metrics.npz import AdmBatch

    ref, sample = AdmBatch(args.ref, require_images=False), AdmBatch(args.sample)  # fail fast, before Inception
    device = _device(args.device)
    extractor = _extractor(args, device)
    if dist.rank() == 0:  # now, not after an hour of features (metrics.json records them too)
        for warning in protocol_checks(ref, sample, extractor)["warnings"]:
            print(f"mdt-eval: warning: {warning}", file=sys.stderr, flush=True)
    results = evaluate_batches(
        args.ref,
        args.sample,
        extractor,
        batch_size=args.batch_size,
        device=device,
        fd_method=args.fd_method,
        pr_fp16=not args.pr_fp32,
        progress=not args.no_progress,
    )
    if results is not None:
        results.update(
            ref=str(args.ref),
            sample=str(args.sample),
            backend=args.backend,
            world_size=dist.world_size(),
            features=getattr(extractor, "description", {}),
        )
        out = args.out or args.sample.with_name(args.sample.stem + ".metrics.json")
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(format_results(results), flush=True)
        print(f"wrote {out}", flush=True)
    return 0


def run_ref(args: argparse.Namespace) -> int:
    from mdt_ds.metrics.reference import build_reference

    device = _device(args.device)
    extractor = _extractor(args, device)
    summary = build_reference(
        args.source,
        args.out,
        extractor,
        image_size=args.image_size,
        num_images=args.num_images,
        seed=args.seed,
        batch_size=args.batch_size,
        device=device,
        workers=args.workers,
        progress=not args.no_progress,
    )
    if summary is not None:
        summary_path = args.out.with_suffix(".json")  # read back by mdt-eval: the N of the statistics
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2), flush=True)
        print(f"wrote {args.out} and {summary_path}", flush=True)
    return 0


def run_show(args: argparse.Namespace) -> int:
    from mdt_ds.metrics.show import show_npz

    done = show_npz(args.npz, args.out, nrow=args.nrow, max_images=args.max, labels=not args.no_labels)
    labels = "labelled" if done["labels"] else "no labels"
    print(f"wrote {done['output']} ({done['images']} of {done['of']} images, {done['nrow']} per row, {labels})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from mdt_ds.data.imagenet import InputError
    from mdt_ds.metrics.inception import InceptionWeightsError
    from mdt_ds.metrics.npz import NpzFormatError

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    command = argv[0] if argv and argv[0] in COMMANDS else "eval"
    rest = argv[1:] if argv and argv[0] in COMMANDS else argv
    parser, runner = {"eval": (eval_parser, run_eval), "ref": (ref_parser, run_ref), "show": (show_parser, run_show)}[
        command
    ]
    args = parser().parse_args(rest)
    distributed = command != "show" and _setup(args.timeout_min)  # show reads one file on one process
    finished = False
    try:
        code = runner(args)
        finished = True
    except (NpzFormatError, InceptionWeightsError, InputError, FileNotFoundError) as err:
        print(f"mdt-eval: error: {err}", file=sys.stderr)
        code = 2
    finally:
        if distributed:
            dist.teardown(synchronise=finished)
    if distributed:
        dist.exit_launched_rank(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
