"""Part (a)'s numerical checks of benchmarks/device_check.py (the train-and-resume check is in
device_check_train.py), and the flex child that part runs in its own process:

    python benchmarks/device_check_a.py --device cuda --out flex.json

Each check returns a dict with its errors, tolerances and ``ok``; a GPU-only check returns
``{"skipped": True, "reason": ...}`` on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from device_common import TOL, Child, Report, check, guarded, rel_err, skipped, sync  # noqa: E402

from mdt_ds.metrics.inception import no_tf32  # noqa: E402

XL_DEPTH4 = dict(depth=4, decode_layer=2)  # XL/2's width and head dim (72) with every block kind, 4 blocks


# --------------------------------------------------------------------------- models and inputs
def tiny_model(attention: str = "sdpa", seed: int = 0, **overrides: object) -> torch.nn.Module:
    """MDTv2-Tiny/2 with every weight perturbed (adaLN-Zero alone would output zeros)."""
    from mdt_ds.models import build_model

    torch.manual_seed(seed)
    model = build_model("MDTv2-Tiny/2", attention=attention, **overrides)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def tiny_inputs(batch: int = 4, seed: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, 4, 8, 8, generator=gen), "t": torch.randint(0, 1000, (batch,), generator=gen),
            "y": torch.randint(0, 10, (batch,), generator=gen), "mask_noise": torch.rand(batch, 16, generator=gen)}


def both_passes(model: torch.nn.Module, inputs: dict, device: torch.device, dtype=None) -> list[torch.Tensor]:  # noqa: ANN001
    """Full and masked pass (fixed masking: same kept tokens everywhere) on ``device``."""
    x, t, y = (inputs[k].to(device) for k in ("x", "t", "y"))
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        full = model(x, t, y)
        masked = model(x, t, y, enable_mask=True, mask_noise=inputs["mask_noise"].to(device), mask_ratio=0.4)
    return [full.float(), masked.float()]


def perturb_zero_init(model: torch.nn.Module, std: float = 0.02, seed: int = 1) -> None:
    """Fill the zero-initialised tensors (adaLN-Zero modulation, final layer, biases) with
    N(0, std^2), drawn on the model's device: every block then contributes to the output and
    every parameter gets a gradient, at the scale of the release's other inits."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * std)


def model_inputs(model: torch.nn.Module, batch: int, device: torch.device, seed: int = 2) -> dict[str, object]:
    """Latents, timesteps, labels, the masking noise and a fixed random weight per pass's output:
    the loss sum(out * w) hands every precision the same output gradient, so the backward is
    compared on its own."""
    gen = torch.Generator(device=device).manual_seed(seed)
    size, channels = model.input_size, model.in_channels
    out_shape = (batch, model.out_channels, size, size)
    return {"x": torch.randn(batch, channels, size, size, generator=gen, device=device),
            "t": torch.randint(0, 1000, (batch,), generator=gen, device=device),
            "y": torch.randint(0, model.num_classes, (batch,), generator=gen, device=device),
            "mask_noise": torch.rand(batch, model.x_embedder.num_patches, generator=gen, device=device),
            "w": [torch.randn(out_shape, generator=gen, device=device) for _ in range(2)]}


def passes_and_grads(model: torch.nn.Module, inputs: dict, dtype: torch.dtype = torch.float32, autocast: bool = False,
                     ratio: float = 0.3) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Both passes (masked at ``ratio``), the loss sum(out * w) and its parameter gradients."""
    model.zero_grad(set_to_none=True)
    x, t, y = inputs["x"].to(dtype), inputs["t"], inputs["y"]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        full = model(x, t, y)
        masked = model(x, t, y, enable_mask=True, mask_noise=inputs["mask_noise"], mask_ratio=ratio)
    outs = [full.float(), masked.float()]
    sum((o * w).sum() for o, w in zip(outs, inputs["w"])).backward()
    return [o.detach() for o in outs], {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def grad_errors(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], top: int = 3) -> dict:
    """Relative L2 error of all gradients together, of the bias tables together, and the worst
    tensors among those that carry at least 1e-4 of the squared gradient norm (smaller ones are
    rounding-noise sized). Summed per tensor on the device: one copy to the host at the end."""
    names = [n for n in ref if n in grads]
    diff = torch.stack([(grads[n].double() - ref[n].double()).square().sum() for n in names]).cpu()
    norm = torch.stack([ref[n].double().square().sum() for n in names]).cpu()

    def ratio(d: torch.Tensor, r: torch.Tensor) -> float:
        value = float((d.sum() / r.sum().clamp_min(1e-300)).sqrt())
        return value if math.isfinite(value) else float("inf")

    per = (diff / norm.clamp_min(1e-300)).sqrt()
    share = norm / norm.sum().clamp_min(1e-300)
    worst = [i for i in per.argsort(descending=True).tolist() if share[i] >= 1e-4][:top]
    tables = [i for i, n in enumerate(names) if n.endswith("relative_position_bias_table")]
    return {"all": ratio(diff, norm), "bias_tables": ratio(diff[tables], norm[tables]) if tables else None,
            "worst": {names[i]: float(per[i]) for i in worst}, "tensors": len(names), "missing": len(ref) - len(names)}


# --------------------------------------------------------------------------- the checks
def check_cuda_vs_cpu(device: torch.device) -> dict:
    if device.type != "cuda":
        return skipped("needs CUDA: compares the CUDA outputs with the CPU's")
    model, inputs = tiny_model().eval(), tiny_inputs()
    with torch.no_grad(), no_tf32():
        ref = both_passes(model, inputs, torch.device("cpu"))
        out = both_passes(model.to(device), inputs, device)
    err = max(rel_err(o, r) for o, r in zip(out, ref))
    return check(err, TOL["cuda_vs_cpu_fp32"], passes=["full", "masked"], precision="fp32, TF32 off")


def check_precisions(device: torch.device, quick: bool) -> dict:
    """Pure bf16 (``model.to(bfloat16)``, as precision=bf16 trains) and bf16-amp (fp32 parameters
    under autocast) against fp32 with TF32 off, at XL/2 depth (28 blocks: errors compound with
    depth): both passes' outputs and every parameter gradient."""
    from mdt_ds.models import build_model

    preset, batch = ("MDTv2-Tiny/2", 2) if quick else ("MDTv2-XL/2", 4)
    torch.manual_seed(0)
    model = build_model(preset, device=device).eval()  # eval: no label-dropout draws to differ
    perturb_zero_init(model)
    inputs = model_inputs(model, batch, device)
    with no_tf32():
        ref_outs, ref_grads = passes_and_grads(model, inputs)
        amp_outs, amp_grads = passes_and_grads(model, inputs, autocast=True)
    model.zero_grad(set_to_none=True)
    pure = copy.deepcopy(model).to(torch.bfloat16)
    pure_outs, pure_grads = passes_and_grads(pure, inputs, torch.bfloat16)
    out: dict = {"preset": preset, "batch": batch, "mask_ratio": 0.3, "reference": "fp32, TF32 off",
                 "loss": "sum(out * w), w fixed random: the same output gradient for every precision"}
    for name, outs, grads in (("pure_bf16", pure_outs, pure_grads), ("bf16_amp", amp_outs, amp_grads)):
        fwd = {p: rel_err(o, r) for p, o, r in zip(("full", "masked"), outs, ref_outs)}
        errors = grad_errors(grads, ref_grads)
        out[name] = {"forward": check(max(fwd.values()), TOL["bf16_fwd_xl"], per_pass=fwd),
                     "grads": check(errors.pop("all"), TOL["bf16_grad_xl"], **errors)}
    out["ok"] = all(out[n][k]["ok"] for n in ("pure_bf16", "bf16_amp") for k in ("forward", "grads"))
    return out


def logit_grads(bias: torch.Tensor, head_dim: int, gen: torch.Generator) -> torch.Tensor:
    """dL/dS of softmax(q k^T / sqrt(d) + bias) for random q, k, v and output gradient, in fp32,
    rounded to bf16 as a bf16 SDPA backward hands it over. Each row sums to zero: the table
    gradient adds up hundreds of such nearly cancelling terms per entry."""
    b, h, k, _ = bias.shape
    q, kk, v, dout = (torch.randn(b, h, k, head_dim, generator=gen, device=bias.device) for _ in range(4))
    p = (q @ kk.transpose(-2, -1) * head_dim**-0.5 + bias).softmax(-1)
    dp = dout @ v.transpose(-2, -1)
    return (p * (dp - (p * dp).sum(-1, keepdim=True))).to(torch.bfloat16)


def old_table_grad(table: torch.Tensor, rel_index: torch.Tensor, ids_keep: torch.Tensor,
                   grad: torch.Tensor) -> torch.Tensor:
    """The table gradient as the code before the fix computed it: the table cast to the compute
    dtype FIRST, then gathered, so the gather's backward (a scatter_add) sums in that dtype. Given
    a float64 table and gradient it is the exact reference."""
    leaf = table.detach().clone().requires_grad_(True)
    batch, kept = ids_keep.shape
    rel = rel_index[ids_keep[:, :, None], ids_keep[:, None, :]]  # [B, K, K]
    heads = leaf.shape[1]
    index = rel.reshape(batch, 1, kept * kept).expand(-1, heads, -1)
    bias = torch.gather(leaf.t().unsqueeze(0).expand(batch, -1, -1), 2, index).view(batch, heads, kept, kept)
    bias.backward(grad.to(leaf.dtype))
    return leaf.grad


def check_bias_grad(device: torch.device, quick: bool) -> dict:
    """The relative-position-bias table's gradient at XL/2 width (16 heads, head dim 72, grid 16:
    256 tokens), masked pass (179 kept), batch 32: bf16 as trained now (gathered from fp32, cast
    after: fp32 sums) and the old way (cast, then gathered: bf16 sums), against float64."""
    from mdt_ds.models.layers import SDPA_ROW_ALIGN, RelativePositionBias

    grid, heads, head_dim = 16, 16, 72
    batch = 32 if device.type == "cuda" and not quick else 4
    length = grid * grid
    kept = int(length * (1 - 0.3))
    torch.manual_seed(0)
    rpb = RelativePositionBias(grid, heads).to(device)
    gen = torch.Generator(device=device).manual_seed(3)
    ids_keep = torch.rand(batch, length, generator=gen, device=device).argsort(1)[:, :kept]
    grad = logit_grads(rpb.kept(ids_keep).detach(), head_dim, gen)
    table = rpb.relative_position_bias_table.detach().to(torch.bfloat16)  # as pure-bf16 training holds it
    index = rpb.relative_position_index
    ref = old_table_grad(table.double(), index, ids_keep, grad.double())  # same values, exact sums
    new = {}
    for name, dtype in (("bf16_param", torch.bfloat16), ("fp32_param_amp", torch.float32)):
        rpb.relative_position_bias_table = torch.nn.Parameter(table.to(dtype))
        rpb.kept(ids_keep, torch.bfloat16, SDPA_ROW_ALIGN).backward(grad)
        new[name] = rel_err(rpb.relative_position_bias_table.grad, ref)
    old = rel_err(old_table_grad(table, index, ids_keep, grad), ref)
    return {
        "what": "table gradient rel. L2 error vs float64 (same bf16 table and logit gradients)",
        "batch": batch, "heads": heads, "tokens": length, "kept": kept, "table_rows": table.shape[0],
        "logit_grads_per_table_entry": batch * heads * kept * kept / (table.shape[0] * heads),
        "new_fp32_gather": check(new["bf16_param"], TOL["bias_grad_bf16"], fp32_param_amp=new["fp32_param_amp"]),
        "old_bf16_gather": {"rel_err": old}, "old_over_new": old / max(new["bf16_param"], 1e-30),
        "ok": new["bf16_param"] <= TOL["bias_grad_bf16"],  # old_over_new is the figure the fix is for
    }


def check_compiled(device: torch.device, quick: bool) -> dict:
    """Regional compile (``compile_blocks``) against eager at three kept lengths of the masked
    pass, one a multiple of 8 (the bias rows are padded to 8 for SDPA): outputs, every gradient,
    and whether a new kept length compiled anything (the token dim is marked dynamic)."""
    if device.type != "cuda" and quick:
        return skipped("--quick on a CPU: inductor compiles for minutes on this CPU (tests/test_core_compile.py)")
    from torch._dynamo.utils import counters

    from mdt_ds.models import build_model
    from mdt_ds.models.compile import compile_blocks

    cuda = device.type == "cuda"
    # bf16 at part (b)'s batch on a GPU: the training precision, and inductor's cache may hold the graphs
    dtype, batch = (torch.bfloat16, 32) if cuda else (torch.float32, 2)
    tol_fwd, tol_grad = (TOL["compiled_fwd"], TOL["compiled_grad"]) if cuda else \
        (TOL["compiled_fwd_fp32"], TOL["compiled_grad_fp32"])
    torch.manual_seed(0)
    eager = build_model("MDTv2-XL/2", device=device, **XL_DEPTH4).eval()
    perturb_zero_init(eager)
    eager = eager.to(dtype)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    inputs = model_inputs(eager, batch, device)
    length, rows = eager.x_embedder.num_patches, []
    for ratio in (0.3, 0.5, 0.4):
        ref_outs, ref_grads = passes_and_grads(eager, inputs, dtype, ratio=ratio)
        frames = counters["frames"]["ok"]
        outs, grads = passes_and_grads(compiled, inputs, dtype, ratio=ratio)
        errors = grad_errors(grads, ref_grads)
        fwd = {p: rel_err(o, r) for p, o, r in zip(("full", "masked"), outs, ref_outs)}
        kept = int(length * (1 - ratio))
        rows.append({"kept": kept, "kept_multiple_of_8": kept % 8 == 0, "frames_compiled": counters["frames"]["ok"] - frames,
                     "forward": check(max(fwd.values()), tol_fwd, per_pass=fwd),
                     "grads": check(errors.pop("all"), tol_grad, **errors)})
    return {"model": "MDTv2-XL/2 width (1152, 16 heads of 72), depth 4, decode_layer 2", "dtype": str(dtype),
            "batch": batch, "rows": rows, "recompiled_for_a_new_kept_length": any(r["frames_compiled"] for r in rows[1:]),
            "ok": all(r["forward"]["ok"] and r["grads"]["ok"] for r in rows)}


def check_fused_adan(device: torch.device, quick: bool) -> dict:
    """Adan's fused update (one compiled kernel per flat partition: Triton on CUDA, C++ on CPU)
    against the multi-tensor one: the same parameters after 4 steps, no host sync in a step
    (CUDA's sync debug mode, which sees into compiled code; a dispatch-mode counter would make
    dynamo fall back to eager), and the time per step of each on a flat partition of 2^26
    elements on CUDA (2^20 on a CPU or in --quick)."""
    from mdt_ds.optim import Adan

    size = 1 << (20 if quick or device.type != "cuda" else 26)
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(size, generator=gen).to(device)
    grads = [torch.randn(size, generator=gen).to(device) for _ in range(4)]
    out: dict = {"elements": size}
    params = {}
    for fused in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = Adan([p], lr=1e-2, weight_decay=0.05, foreach=True, fused=fused)
        for g in grads[:-1]:
            p.grad = g
            opt.step()
        p.grad = grads[-1]
        sync_free = sync_free_step(opt.step, device)
        params[fused] = p.detach().clone()
        sync(device)
        begin = time.perf_counter()
        for _ in range(5):
            opt.step()
        sync(device)
        out["fused" if fused else "multi_tensor"] = {"step_ms": (time.perf_counter() - begin) / 5 * 1e3,
                                                     "sync_free": sync_free}
    out["max_abs_diff"] = float((params[True] - params[False]).abs().max())
    out["tol"] = 1e-5
    out["ok"] = out["max_abs_diff"] <= out["tol"] and out["fused"]["sync_free"] is not False
    return out


def sync_free_step(step: Callable[[], object], device: torch.device) -> bool | None:
    """Run ``step`` under CUDA's sync debug mode set to error: False if it synchronised with the
    host, True if not, None where there is no device to synchronise with (a CPU)."""
    if device.type != "cuda":
        step()
        return None
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return True
    except RuntimeError as err:
        if "synchroniz" not in str(err):
            raise
        return False
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_cuda_only_paths(device: torch.device) -> dict:
    """What the suite skips on CPU: fused AdamW on CUDA parameters, and a training objective
    step (device generator, float mask ratio) with no host sync and no device-to-host copy."""
    if device.type != "cuda":
        return skipped("needs CUDA: fused AdamW and device-to-host copies exist only there")
    from mdt_ds.config import OptimConfig
    from mdt_ds.diffusion import create_diffusion
    from mdt_ds.diffusion.loss import MDTv2Loss
    from mdt_ds.optim import build_optimizer
    from mdt_ds.syncs import count_host_syncs

    model = tiny_model().to(device).train()
    opt = build_optimizer(model.parameters(), OptimConfig(name="adamw", betas=[0.9, 0.999]))
    fused = bool(opt.param_groups[0].get("fused"))
    objective = MDTv2Loss(create_diffusion().to(device), mask_ratio=0.3)
    inputs = tiny_inputs()
    x, y = inputs["x"].to(device), inputs["y"].to(device)
    gen, host_rng = torch.Generator(device=device).manual_seed(0), random.Random(0)  # as the trainer draws
    objective(model, x, y, gen, host_rng)  # warm-up (kernels, caches)
    before = [p.detach().clone() for p in model.parameters()]
    with count_host_syncs() as counter:
        loss, _ = objective(model, x, y, gen, host_rng)
        loss.backward()
    opt.step()
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    return {"fused_adamw": fused, "params_updated": moved, "host_syncs": counter.count,
            "copies_to_host": counter.copies_to_host,
            "ok": fused and moved > 0 and counter.count == 0 and counter.copies_to_host == 0}


# --------------------------------------------------------------------------- flex (a child process)
def start_flex_child(work: Path, device: torch.device) -> Child:
    """flex vs SDPA in a child process, started now and collected last: FlexAttention compiles for
    tens of seconds, in parallel with the checks between; a crash or a compile that runs long
    takes only this check down, and what the child saved before that comes back."""
    return Child([str(Path(__file__).resolve()), "--device", str(device)], work / "flex.json")


def flex_vs_sdpa(device: torch.device, head_dim: int) -> dict:
    """A 4-head Tiny model with the given head dim: forward (both passes) and, on CUDA, every
    parameter gradient of flex against SDPA."""
    overrides = {"hidden_size": 4 * head_dim, "num_heads": 4}
    # eval(): no label-dropout draws, which would differ between the two models; gradients still flow.
    sdpa, flex = tiny_model("sdpa", **overrides).to(device).eval(), tiny_model("flex", **overrides).to(device).eval()
    flex.load_state_dict(sdpa.state_dict())
    inputs = tiny_inputs()
    grad_ok = device.type == "cuda"  # FlexAttention has no backward on CPU
    with torch.set_grad_enabled(grad_ok):
        ref, out = both_passes(sdpa, inputs, device), both_passes(flex, inputs, device)
    result = {"forward": check(max(rel_err(o, r) for o, r in zip(out, ref)), TOL["flex_vs_sdpa_fwd"])}
    if not grad_ok:
        result["backward"] = skipped("FlexAttention has no backward on CPU")
        return result
    sum(o.square().mean() for o in ref).backward()
    sum(o.square().mean() for o in out).backward()
    grads = [(p.grad, q.grad) for p, q in zip(flex.parameters(), sdpa.parameters()) if q.grad is not None]
    flat_out, flat_ref = torch.cat([g.flatten() for g, _ in grads]), torch.cat([g.flatten() for _, g in grads])
    result["backward"] = check(rel_err(flat_out, flat_ref), TOL["flex_vs_sdpa_grad"], what="all parameter grads")
    return result


def probe_check_flex(device: torch.device, head_dim: int) -> dict:
    """Whether ``mdt_ds.engine.check_flex`` refuses the head dim, and whether it says what to do."""
    if device.type != "cuda":
        return skipped("check_flex refuses flex on a CPU whatever the head dim (no backward there)")
    from mdt_ds.config import ConfigError
    from mdt_ds.engine import check_flex

    try:
        check_flex(device, head_dim)
    except ConfigError as err:
        return {"refused": True, "message": str(err)[:600], "advises_sdpa": "use model.attention='sdpa'" in str(err)}
    return {"refused": False}


def flex_main(argv: list[str] | None = None) -> dict:
    """The child: head dim 16, then whether check_flex refuses 72, then head dim 72, each saved as
    soon as it is in."""
    p = argparse.ArgumentParser(description="flex vs SDPA (the device check's child)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    device, report = torch.device(args.device), Report(args.out)
    report.put("head_dim_16", guarded(lambda: flex_vs_sdpa(device, 16)))
    report.put("check_flex_refuses_72", guarded(lambda: probe_check_flex(device, 72)))
    report.put("head_dim_72", guarded(lambda: flex_vs_sdpa(device, 72)))
    return report


if __name__ == "__main__":
    flex_main()
