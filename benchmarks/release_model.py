"""The MDT release's own model beside ours in a model-only training step (train_step.py's
``--release-src``): the release's ``MDTv2`` is imported from a sail-sg/MDT checkout, never copied."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from mdt_ds.config import TrainConfig
from mdt_ds.engine import PRECISION_DTYPES


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_release_class(src: Path) -> type:
    """The release's MDTv2 class, imported from a checkout of sail-sg/MDT (its file is read from
    there, never copied into this repository)."""
    import importlib.util

    path = Path(src) / "masked_diffusion" / "models.py"
    if not path.is_file():
        raise FileNotFoundError(f"--release-src {src}: no masked_diffusion/models.py there (a sail-sg/MDT checkout)")
    spec = importlib.util.spec_from_file_location("mdt_release_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MDTv2


def release_comparison(cfg: TrainConfig, args: argparse.Namespace, device: torch.device) -> dict:
    """One training step of the model alone (full + masked pass, fwd + bwd, no optimizer) for the
    release's MDTv2 and ours (``cfg``'s model), same sizes and seed, alternating so that both see
    the same load. ``args``: ``release_src``, ``release_reps``, ``release_compiled``, ``batch``."""
    m = cfg.model
    from mdt_ds.models import build_model

    torch.manual_seed(0)
    # eval(): no label-dropout draw (a negligible op), so both models draw exactly the mask ratio
    # and then the token noise from the global generator, and a seed gives both the same K.
    ours = build_model(m).to(device).eval()
    explicit = build_model(m, attention="explicit").to(device).eval()
    explicit.load_state_dict(ours.state_dict())
    release = load_release_class(args.release_src)(
        input_size=m.input_size, patch_size=m.patch_size, in_channels=m.in_channels, hidden_size=m.hidden_size,
        depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, class_dropout_prob=m.class_dropout_prob,
        num_classes=m.num_classes, learn_sigma=m.learn_sigma, mask_ratio=m.mask_ratio, decode_layer=m.decode_layer,
    ).to(device).eval()
    models = {"ours": ours, "ours_explicit": explicit, "release": release}
    if args.release_compiled:
        from mdt_ds.models.compile import compile_blocks

        compiled = build_model(m).to(device).eval()
        compiled.load_state_dict(ours.state_dict())
        compile_blocks(compiled)
        models["ours_compiled"] = compiled
    dtype = PRECISION_DTYPES[cfg.precision]
    n = args.batch
    x = torch.randn(n, m.in_channels, m.input_size, m.input_size, device=device)
    t = torch.randint(0, 1000, (n,), device=device)
    y = torch.randint(0, m.num_classes, (n,), device=device)

    def one(model: torch.nn.Module, rep: int) -> float:
        torch.manual_seed(rep)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, t, y).float().square().mean() + model(x, t, y, enable_mask=True).float().square().mean()
        loss.backward()
        sync(device)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for model in models.values():  # warm-up at two kept lengths: the second compiles the dynamic-K graph
        one(model, 0)
        one(model, 10_000)
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.release_reps):
        for name, model in models.items():
            times[name].append(one(model, rep + 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "what": "model-only step: full + masked pass, forward + backward, alternating, same process, same K",
        "precision": cfg.precision, "batch": n, "src": str(args.release_src),
        "ours_s": med["ours"], "ours_explicit_s": med["ours_explicit"], "release_s": med["release"],
        "release_over_ours": med["release"] / med["ours"],
        "release_over_ours_explicit": med["release"] / med["ours_explicit"], "times_s": times,
    } | ({"ours_compiled_s": med["ours_compiled"], "release_over_ours_compiled": med["release"] / med["ours_compiled"]}
         if "ours_compiled" in med else {})
