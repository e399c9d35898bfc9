"""Runs training scenarios inside ONE torchrun job (2 processes) so the trainer tests pay the
process start and DeepSpeed import once. Writes a JSON of results from rank 0.

    torchrun --nproc_per_node=2 tests/trainer_worker.py OUT.json WORKDIR SCENARIO [SCENARIO ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mdt_ds import dist
from mdt_ds.config import load_config
from mdt_ds.train import train

BASE = [
    "model.preset=MDTv2-Tiny/2", "model.input_size=16", "model.in_channels=1", "data.source=mnist16",
    "data.num_workers=0", "data.shuffle_buffer=64", "global_batch=8", "log_every=1", "ema_decay=0.9",
    "optim.lr=1e-3",
]


def run(workdir: Path, name: str, *overrides: str) -> dict:
    cfg = load_config(None, [*BASE, f"run_dir={workdir / name}", *overrides])
    result = train(cfg)
    stats = [json.loads(line) for line in (workdir / name / "stats.jsonl").read_text().splitlines()]
    result["losses"] = [s["loss"] for s in stats]
    result["steps_logged"] = [s["step"] for s in stats]
    return result


def ema_of(workdir: Path, name: str, step: int) -> dict[str, torch.Tensor]:
    return torch.load(workdir / name / "snapshots" / f"ema_{step:07d}.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def scenario_stages(workdir: Path) -> dict:
    """ZeRO 1/2/3 in bf16 and the fp32 ZeRO-0 baseline: stage used, loss falls, EMA across stages."""
    out = {}
    for stage, precision in ((1, "bf16"), (2, "bf16"), (3, "bf16"), (0, "fp32")):
        name = f"stage{stage}_{precision}"
        out[name] = run(workdir, name, f"zero_stage={stage}", f"precision={precision}", "steps=8", "ckpt_every=0")
    emas = {k: ema_of(workdir, k, 8) for k in out}
    out["ema_diff_vs_stage2"] = {k: max_diff(emas[k], emas["stage2_bf16"]) for k in emas}
    return out


def scenario_resume(workdir: Path) -> dict:
    """Uninterrupted 6 steps vs 3 + resume to 6, with Adan, for ZeRO-2 and ZeRO-3."""
    out = {}
    for stage in (2, 3):
        common = [f"zero_stage={stage}", "precision=bf16", "optim.name=adan", "ckpt_every=3"]
        full = run(workdir, f"full{stage}", *common, "steps=6")
        run(workdir, f"part{stage}", *common, "steps=3")
        resumed = run(workdir, f"part{stage}", *common, "steps=6")
        out[f"stage{stage}"] = {
            "full": full["losses"], "resumed": resumed["losses"], "resumed_steps": resumed["steps_logged"],
            "ema_diff": max_diff(ema_of(workdir, f"full{stage}", 6), ema_of(workdir, f"part{stage}", 6)),
        }
    return out


def engine_facts(engine) -> dict:
    """What the engine was built with: its optimizer wrapper, parameter dtype, autocast, and the
    dtype gradients accumulate in over micro-steps (ZeRO's buffer, or BF16_Optimizer's)."""
    opt = engine.optimizer
    accum = getattr(opt, "gradient_accumulation_dtype", None)
    flat = getattr(opt, "fp32_groups_gradients_flat", None)  # BF16_Optimizer (ZeRO-1 + fp32 accumulation)
    if flat:
        accum = flat[0].dtype
    return {"optimizer": type(opt).__name__, "param_dtype": str(next(engine.module.parameters()).dtype),
            "autocast": bool(engine.torch_autocast_enabled()), "accum_dtype": str(accum)}


def scenario_precision(workdir: Path) -> dict:
    """bf16-amp (fp32 parameters, autocast) under ZeRO-2, and bf16 with 2 micro-steps per step
    under ZeRO-1 and ZeRO-2 (fp32 accumulation): engine facts, and 4 steps uninterrupted vs 2 +
    resume to 4 (bit-exact)."""
    import mdt_ds.trainer as trainer_mod

    built = trainer_mod.build_engine
    facts: list[dict] = []

    def recording(*args, **kwargs):
        engine, ds = built(*args, **kwargs)
        facts.append(engine_facts(engine))
        return engine, ds

    trainer_mod.build_engine = recording
    out = {}
    try:
        for name, common in (("amp2", ["precision=bf16-amp", "zero_stage=2"]),
                             ("accum1", ["precision=bf16", "zero_stage=1", "global_batch=16", "micro_batch=4"]),
                             ("accum2", ["precision=bf16", "zero_stage=2", "global_batch=16", "micro_batch=4"])):
            full = run(workdir, f"{name}_full", *common, "steps=4", "ckpt_every=2")
            run(workdir, f"{name}_part", *common, "steps=2", "ckpt_every=2")
            resumed = run(workdir, f"{name}_part", *common, "steps=4", "ckpt_every=2")
            out[name] = {"facts": facts[0], "full": full["losses"], "resumed": resumed["losses"],
                         "ema_diff": max_diff(ema_of(workdir, f"{name}_full", 4), ema_of(workdir, f"{name}_part", 4))}
            facts.clear()
    finally:
        trainer_mod.build_engine = built
    return out


def scenario_checkpointing(workdir: Path) -> dict:
    """Activation checkpointing (all blocks) gives the same losses as none."""
    common = ["zero_stage=2", "precision=fp32", "steps=4", "ckpt_every=0"]
    plain = run(workdir, "ac_none", *common, "activation_checkpointing=none")
    ckpt = run(workdir, "ac_all", *common, "activation_checkpointing=all")
    return {"none": plain["losses"], "all": ckpt["losses"]}


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier",
               "reduce", "all_to_all_single", "all_reduce_coalesced")


class StepProbe:
    """Counts host syncs and torch.distributed collectives of one step, split into DeepSpeed's
    (inside engine.backward / engine.step) and ours (everything else)."""

    def __init__(self, engine) -> None:
        import torch.distributed as tdist

        self.inside = False
        self.ds_syncs = 0
        self.calls: list[tuple[str, bool]] = []
        for name in ("backward", "step"):
            setattr(engine, name, self._deepspeed(getattr(engine, name)))
        for name in COLLECTIVES:
            if hasattr(tdist, name):
                setattr(tdist, name, self._collective(name, getattr(tdist, name)))

    def _deepspeed(self, fn):
        from mdt_ds.syncs import count_host_syncs

        def wrapped(*args, **kwargs):
            self.inside = True
            try:
                with count_host_syncs() as counter:
                    return fn(*args, **kwargs)
            finally:
                self.inside = False
                self.ds_syncs += counter.count

        return wrapped

    def _collective(self, name: str, fn):
        def wrapped(*args, **kwargs):
            self.calls.append((name, self.inside))
            return fn(*args, **kwargs)

        return wrapped

    def measure(self, step_fn) -> dict:
        from mdt_ds.syncs import count_host_syncs

        self.ds_syncs, self.calls = 0, []
        with count_host_syncs() as counter:
            step_fn()
        return {
            "syncs_total": counter.count, "syncs_deepspeed": self.ds_syncs, "syncs_ours": counter.count - self.ds_syncs,
            "copies_to_host": counter.copies_to_host,  # device-to-host reads (GPU only; 0 on CPU)
            "collectives_ours": [n for n, inside in self.calls if not inside],
            "collectives_deepspeed": len([n for n, inside in self.calls if inside]),
        }


def sync_counts(workdir: Path, name: str, *overrides: str, steps: int = 5) -> list[dict]:
    """Per-step host syncs and collectives of steps 2..``steps`` of a run that logs at step
    ``steps`` only (step 1 pays one-off set-up reads). Restores torch.distributed afterwards."""
    import torch.distributed as tdist

    from mdt_ds.preemption import StopFlag
    from mdt_ds.train import prepare_run_dir
    from mdt_ds.trainer import Trainer

    cfg = load_config(None, [*BASE, f"run_dir={workdir / name}", f"log_every={steps}", f"steps={steps}",
                             "ckpt_every=0", "max_bad_steps=0", *overrides])
    trainer = Trainer(cfg, dist.launcher_env(), prepare_run_dir(cfg), StopFlag())
    saved = {k: getattr(tdist, k) for k in COLLECTIVES if hasattr(tdist, k)}
    try:
        probe = StepProbe(trainer.engine)
        return [probe.measure(trainer.one_step) for _ in range(steps)][1:]
    finally:
        for k, v in saved.items():
            setattr(tdist, k, v)


def scenario_syncs(workdir: Path) -> dict:
    """Host syncs and collectives per step, ZeRO-2, fp32 and bf16, max_bad_steps=0, stop
    checked every 2 steps (so steps 2 and 4 check, 3 does not, 5 logs)."""
    return {p: sync_counts(workdir, f"syncs_{p}", "zero_stage=2", f"precision={p}", "stop_check_every=2")
            for p in ("fp32", "bf16")}


def scenario_compile(workdir: Path) -> dict:
    """Regional torch.compile with activation checkpointing on 2 blocks, ZeRO-1 and ZeRO-2, fp32:
    the losses of the eager and the compiled run, and how many graphs dynamo compiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    out = {}
    for stage in (1, 2):
        common = [f"zero_stage={stage}", "precision=fp32", "steps=4", "ckpt_every=0", "activation_checkpointing=2"]
        eager = run(workdir, f"eager{stage}", *common)
        torch._dynamo.reset()  # count this run's graphs (inductor's disk cache keeps the rebuild cheap)
        counters.clear()
        compiled = run(workdir, f"compiled{stage}", *common, "compile=true")
        out[f"stage{stage}"] = {
            "eager": eager["losses"], "compiled": compiled["losses"],
            "graphs": int(counters["stats"]["unique_graphs"]), "recompiles": int(sum(counters["recompiles"].values())),
        }
    return out


def main() -> None:
    out_path, workdir, *scenarios = sys.argv[1:]
    dist.init(use_deepspeed=True)
    results = {name: globals()[f"scenario_{name}"](Path(workdir)) for name in scenarios}
    if dist.is_main():
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.teardown()


if __name__ == "__main__":
    main()
