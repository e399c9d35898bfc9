"""Universal (layout-independent) checkpoint scenarios, one torchrun job per phase. Writes a JSON
of results from rank 0.

    torchrun --nproc_per_node=N tests/universal_worker.py OUT.json WORKDIR PHASE

Phases (run in this order by tests/test_universal.py):
  save2  (2 procs) per case: train 2 steps under ZeRO-2, save universal + a reference of the full
         state (gathered with DeepSpeed's safe_get_full_*, independent of mdt_ds.universal) + the
         state after one more step; then load it under ZeRO-3, save again, load that under ZeRO-1,
         and (fp32) ZeRO-0; each load is compared with the reference and stepped once.
  load1  (1 proc)  load the 2-process ZeRO-2 saves under 1-process ZeRO-2; compare, save, step.
  load2  (2 procs) load the 1-process saves under 2-process ZeRO-2; compare, step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import load_file, save_file

from mdt_ds import dist
from mdt_ds.config import load_config, resolve_batch
from mdt_ds.ema import ShardedEMA
from mdt_ds.engine import build_engine
from mdt_ds.universal import base_optimizer, load_universal, save_universal

BASE = [
    "model.preset=MDTv2-Tiny/2",
    "model.input_size=16",
    "model.in_channels=1",
    "global_batch=8",
    "optim.lr=1e-3",
    "ema_decay=0.9",
]
CASES = {"bf16": ("bf16", "adan"), "fp32": ("fp32", "adan"), "adamw": ("bf16", "adamw")}
CHAIN = {"bf16": (3, 1, 0), "fp32": (3, 1, 0), "adamw": (3,)}  # stages that load in turn after ZeRO-2


def make(case: str, stage: int):
    precision, optimizer = CASES[case]
    cfg = load_config(None, [*BASE, f"zero_stage={stage}", f"precision={precision}", f"optim.name={optimizer}"])
    engine, _ = build_engine(cfg, dist.world_size())
    return cfg, engine, ShardedEMA(engine, decay=cfg.ema_decay)


def train_step(cfg, engine, ema: ShardedEMA, step: int) -> float:
    """One optimizer step on a global batch built from (step, sample index) only, so every world
    size sees the same samples; returns the loss averaged over ranks."""
    micro, accum = resolve_batch(cfg, dist.world_size())
    gen = torch.Generator().manual_seed(1000 + step)
    n, c, s = cfg.global_batch, cfg.model.in_channels, cfg.model.input_size
    x, target = torch.randn(n, c, s, s, generator=gen), torch.randn(n, c, s, s, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    y = torch.randint(0, cfg.model.num_classes, (n,), generator=gen)
    noise = torch.rand(n, (s // 2) ** 2, generator=gen)
    dtype = next(engine.module.parameters()).dtype
    total = torch.zeros(())
    for k in range(accum):
        lo = (k * dist.world_size() + dist.rank()) * micro
        sl = slice(lo, lo + micro)
        out = engine(
            x[sl].to(dtype),
            t[sl],
            y[sl],
            enable_mask=True,
            mask_noise=noise[sl],
            mask_ratio=0.3,
            force_drop_ids=torch.zeros(micro, dtype=torch.long),
        )
        loss = torch.nn.functional.mse_loss(out[:, :c].float(), target[sl])
        engine.backward(loss)
        engine.step()
        total += loss.detach() / accum
    ema.update(step)
    tdist.all_reduce(total)
    return float(total) / dist.world_size()


def full_state(engine, ema: ShardedEMA) -> dict[str, torch.Tensor]:
    """Every trainable parameter's full fp32 master, optimizer state and EMA (collective)."""
    base = base_optimizer(engine)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2: link the fragment views to keys made since (else ranks disagree and hang)
        engine.optimizer._hp_optimizer_states_linked = False
        link()
    ema_full = ema.full_state_dict()
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        master = safe_get_full_fp32_param(p)
        if master is None:  # ZeRO-0: replicated; the fp32 master is the param or fp32_groups' copy
            masters = {
                id(lp): hp
                for lg, hg in zip(
                    getattr(engine.optimizer, "fp16_groups", []), getattr(engine.optimizer, "fp32_groups", [])
                )
                for lp, hp in zip(lg, hg)
            }
            owner = masters.get(id(p), p)
            out[f"{name}/fp32"] = owner.detach().float().clone()
            for key, v in base.state[owner].items():
                if torch.is_tensor(v) and v.shape == owner.shape:
                    out[f"{name}/{key}"] = v.detach().clone()
        else:
            out[f"{name}/fp32"] = master.detach().clone()
            for key in state_keys(base):
                out[f"{name}/{key}"] = safe_get_full_optimizer_state(p, key).detach().clone()
        out[f"{name}/ema"] = ema_full[name].contiguous()
    return {k: v.cpu().contiguous() for k, v in out.items()}


def state_keys(base) -> list[str]:
    return sorted({k for st in base.state.values() for k, v in st.items() if torch.is_tensor(v) and v.dim() > 0})


def scalars(engine) -> dict:
    base = base_optimizer(engine)
    groups = [{k: v for k, v in g.items() if k in ("step", "lr")} for g in base.param_groups]
    steps = sorted({float(v) for st in base.state.values() for k, v in st.items() if k == "step"})
    return {
        "groups": groups,
        "state_steps": steps,
        "global_steps": engine.global_steps,
        "sched_last_epoch": engine.lr_scheduler.last_epoch,
    }


def compare(got: dict, ref: dict) -> dict:
    """Bit-exact comparison of two full states: keys missing either side and unequal tensors."""
    return {
        "missing": sorted(set(ref) - set(got)),
        "extra": sorted(set(got) - set(ref)),
        "unequal": sorted(k for k in ref if k in got and not torch.equal(got[k], ref[k])),
    }


def step_diff(cfg, engine, ema, ref: dict, post: dict, loss_ref: float) -> dict:
    """Train step 3 after a load; compare its loss and the update of every master with the
    uninterrupted run's (relative to the largest update)."""
    loss = train_step(cfg, engine, ema, 3)
    after = full_state(engine, ema)
    worst, scale, err2, norm2 = 0.0, 0.0, 0.0, 0.0
    for k, v in post.items():
        if k.endswith("/fp32"):
            ours, theirs = after[k] - ref[k], v - ref[k]
            worst = max(worst, float((ours - theirs).abs().max()))
            scale = max(scale, float(theirs.abs().max()))
            err2 += float((ours - theirs).square().sum())
            norm2 += float(theirs.square().sum())
    return {
        "loss": loss,
        "loss_ref": loss_ref,
        "update_diff": worst,
        "update_scale": scale,
        "update_rel_norm": (err2 / norm2) ** 0.5,
    }


def load_and_check(work: Path, case: str, stage: int, src: str, save_as: str | None = None) -> dict:
    t0 = time.perf_counter()
    cfg, engine, ema = make(case, stage)
    t1 = time.perf_counter()
    summary = load_universal(engine, ema, work / src)
    t2 = time.perf_counter()
    ref = load_file(str(work / f"ref_{case}.safetensors"))
    post = load_file(str(work / f"post_{case}.safetensors"))
    result = {"summary": summary, "cmp": compare(full_state(engine, ema), ref), "scalars": scalars(engine)}
    if save_as:
        save_universal(engine, ema, work / save_as)
    loss_ref = json.loads((work / f"loss_{case}.json").read_text())
    t3 = time.perf_counter()
    try:  # a state the load left incomplete may break the step: report it, next to the comparison
        result["step"] = step_diff(cfg, engine, ema, ref, post, loss_ref)
    except (ValueError, RuntimeError, KeyError) as err:
        result["step"] = {"error": repr(err)}
    result["seconds"] = {"build": t1 - t0, "load": t2 - t1, "compare_save": t3 - t2, "step": time.perf_counter() - t3}
    return result


def phase_save2(work: Path) -> dict:
    out = {}
    for case in CASES:
        cfg, engine, ema = make(case, 2)
        for step in (1, 2):
            train_step(cfg, engine, ema, step)
        save_universal(engine, ema, work / f"z2_2p_{case}")
        ref = full_state(engine, ema)
        res = {"scalars": scalars(engine)}
        loss = train_step(cfg, engine, ema, 3)
        post = full_state(engine, ema)
        if dist.is_main():
            save_file(ref, str(work / f"ref_{case}.safetensors"))
            save_file(post, str(work / f"post_{case}.safetensors"))
            (work / f"loss_{case}.json").write_text(json.dumps(loss))
        tdist.barrier()
        res["keys"] = sorted({k.split("/")[-1] for k in ref})
        src = f"z2_2p_{case}"
        for stage in CHAIN[case]:
            res[f"zero{stage}"] = load_and_check(work, case, stage, src, save_as=f"z{stage}_2p_{case}")
            src = f"z{stage}_2p_{case}"
        out[case] = res
    return out


def phase_load1(work: Path) -> dict:
    return {case: load_and_check(work, case, 2, f"z2_2p_{case}", save_as=f"z2_1p_{case}") for case in ("bf16", "fp32")}


def phase_load2(work: Path) -> dict:
    return {case: load_and_check(work, case, 2, f"z2_1p_{case}") for case in ("bf16", "fp32")}


def main() -> None:
    out_path, workdir, phase = sys.argv[1:]
    dist.init(use_deepspeed=True)
    result = globals()[f"phase_{phase}"](Path(workdir))
    if dist.is_main():
        Path(out_path).write_text(json.dumps(result, indent=1))
    dist.teardown()


if __name__ == "__main__":
    main()
