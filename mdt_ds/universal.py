"""A world-size- and ZeRO-stage-independent form of the training state (elastic resume).

DeepSpeed's own universal checkpoint (deepspeed/checkpoint/ds_to_universal.py) knows Adam's two
moments only, gathers through an offline conversion, and pickles; our Adan keeps four moments
and a step in its param groups. So this module writes, with no gather:

    DIR/universal/rank00000.safetensors   this rank's fragments: "<param>@<start>/<key>" 1-D
                                          fp32 tensors, key = "fp32" (master), every optimizer
                                          state key found (exp_avg, ..., neg_pre_grad), "ema"
    DIR/universal/index.json              rank 0: layout, shapes, who holds which flat range,
                                          per-group scalars (step, lr, betas...), LR schedule

A fragment is a contiguous range ``[start, start + numel)`` of a parameter flattened in C
order, which is what every layout owns: ZeRO-1/2 ``_hp_mapping`` (deepspeed/utils/
tensor_fragment.py), ZeRO-3 ``ds_tensor`` partitions (deepspeed/runtime/zero/stage3.py
``grad_position``), ZeRO-0 whole tensors. On load each rank reads, memory-mapped, only the
slices overlapping the fragments it owns in the new layout. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from mdt_ds.ema import ShardedEMA

FORMAT = 1
SUBDIR = "universal"
MASTER, EMA = "fp32", "ema"
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


class UniversalError(RuntimeError):
    """The universal checkpoint does not fit this model or is incomplete; the message says which."""


@dataclass
class Fragment:
    """One locally owned flat range of a parameter, as writable 1-D views into DeepSpeed's storage."""

    name: str
    group: int  # index into the client optimizer's param_groups
    start: int
    master: torch.Tensor
    state: dict[str, torch.Tensor]

    @property
    def numel(self) -> int:
        return self.master.numel()


# --------------------------------------------------------------------------- local views
def base_optimizer(engine: deepspeed.DeepSpeedEngine) -> torch.optim.Optimizer:
    """The client optimizer (Adan/AdamW): ZeRO, BF16_Optimizer and FP16_UnfusedOptimizer keep it
    as ``.optimizer``; fp32 ZeRO-0 uses it directly (deepspeed/runtime/engine.py _configure_optimizer)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else opt


def state_owners(engine: deepspeed.DeepSpeedEngine) -> list[tuple[int, torch.Tensor]]:
    """(param group index, tensor the client optimizer keys its state by) for every such tensor.
    ZeRO-3 empties ``param_groups[g]["params"]`` outside ``step`` and puts one fp32 sub-group flat
    in at a time (stage3.py ``_optimizer_step``, ``sub_group_to_group_id``); the others keep theirs."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return [(opt.sub_group_to_group_id[i], flat) for i, flat in enumerate(opt.fp32_partitioned_groups_flat)]
    return [(g, p) for g, group in enumerate(base_optimizer(engine).param_groups) for p in group["params"]]


def _group_of(engine: deepspeed.DeepSpeedEngine) -> dict[int, int]:
    return {id(p): g for g, p in state_owners(engine)}


def _state_views(base: torch.optim.Optimizer, owner: torch.Tensor, offset: int, numel: int) -> dict[str, torch.Tensor]:
    """Per-element state of ``owner`` (a flat partition or a ZeRO-0 tensor) narrowed to one
    fragment: every tensor key shaped like its owner, whatever the optimizer calls it."""
    return {
        k: v.detach().view(-1).narrow(0, offset, numel)
        for k, v in base.state.get(owner, {}).items()
        if torch.is_tensor(v) and v.dim() > 0 and v.shape == owner.shape
    }


def _zero0_masters(engine: deepspeed.DeepSpeedEngine) -> dict[int, torch.Tensor]:
    """Low-precision ZeRO-0: FP16_UnfusedOptimizer's ``fp16_groups``/``fp32_groups``
    (deepspeed/runtime/fp16/unfused_optimizer.py); fp32 ZeRO-0: the parameters themselves."""
    opt = engine.optimizer
    low, high = getattr(opt, "fp16_groups", None), getattr(opt, "fp32_groups", None)
    if isinstance(low, list) and isinstance(high, list):
        return {id(lp): hp for lg, hg in zip(low, high) for lp, hp in zip(lg, hg)}
    return {}


def local_fragments(engine: deepspeed.DeepSpeedEngine) -> list[Fragment]:
    """Every fragment of a trainable parameter that this rank owns, in the engine's layout."""
    opt, base = engine.optimizer, base_optimizer(engine)
    groups = _group_of(engine)
    flats = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_groups_flat_partition", None)
    masters = _zero0_masters(engine)
    out = []
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3: stage3.py _get_fp32_opt_state_partition
            sub, offset, part = opt.grad_position[opt.get_param_id(p)]
            owner = opt.fp32_partitioned_groups_flat[sub]
            start = part * opt._get_param_partition_rank(p)
            numel = max(0, min(part, p.ds_numel - start))
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, BF16_Optimizer: tensor_fragment.py
            if p._hp_mapping is None:
                continue
            mapping = p._hp_mapping
            owner = flats[mapping.param_group_index]
            offset, numel = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
            start = mapping.lp_fragment_address.start
        else:
            owner = masters.get(id(p), p)
            if owner.dtype != torch.float32:
                raise UniversalError(f"{name}: no fp32 master of this {owner.dtype} parameter in {type(opt).__name__}")
            offset, start, numel = 0, 0, p.numel()
        if numel:
            master = owner.detach().view(-1).narrow(0, offset, numel)  # detach: same storage, no autograd
            out.append(Fragment(name, groups[id(owner)], start, master, _state_views(base, owner, offset, numel)))
    return out


# --------------------------------------------------------------------------- scalars
def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _numeric(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_numeric(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def group_scalars(engine: deepspeed.DeepSpeedEngine) -> list[dict]:
    """Per param group: hyper-parameters and counters (timm Adan keeps ``step`` here) and the
    scalar state entries (torch AdamW keeps a 0-d ``step`` tensor per state owner). Owners of
    one group share one value: the optimizer steps them together."""
    base, owners = base_optimizer(engine), state_owners(engine)
    out = []
    for g, group in enumerate(base.param_groups):
        hyper = {k: v for k, v in group.items() if k != "params" and _jsonable(v)}
        scalars: dict[str, dict] = {}
        for p in (p for i, p in owners if i == g):
            for k, v in base.state.get(p, {}).items():
                if torch.is_tensor(v) and v.dim() == 0:
                    entry = {
                        "value": v.item(),
                        "dtype": str(v.dtype).removeprefix("torch."),
                        "cpu": v.device.type == "cpu",
                    }
                    if scalars.setdefault(k, entry)["value"] != entry["value"]:
                        raise UniversalError(f"optimizer state {k!r} differs within param group ({entry['value']})")
                elif not torch.is_tensor(v) and _jsonable(v):
                    scalars.setdefault(k, {"value": v})
        out.append({"hyper": hyper, "state": scalars})
    return out


def _restore_scalars(engine: deepspeed.DeepSpeedEngine, groups: list[dict], keys: dict[str, str]) -> None:
    """Put back group hyper-parameters and scalar state, and create the per-element state
    (zeros, overwritten next) that a fresh engine has not made yet: the optimizer builds it
    lazily at its first step, and DeepSpeed ZeRO-1/2 links its fragment views to it lazily too
    (stage_1_and_2.py ``_lazy_init_hp_params_optimizer_state``)."""
    base = base_optimizer(engine)
    if len(groups) != len(base.param_groups):
        raise UniversalError(
            f"the checkpoint has {len(groups)} optimizer param groups, this run {len(base.param_groups)}"
        )
    for group, saved in zip(base.param_groups, groups):
        # numbers only (step, lr, betas, eps, weight_decay): booleans such as fused/foreach/
        # capturable describe this run's device and implementation, not the training state
        group.update({k: v for k, v in saved["hyper"].items() if _numeric(v)})
    for g, p in state_owners(engine):
        saved, state = groups[g], base.state[p]
        for key, dtype in keys.items():
            if key not in state:
                state[key] = torch.zeros(p.shape, dtype=getattr(torch, dtype), device=p.device)
        for key, entry in saved["state"].items():
            if "dtype" in entry:
                device = "cpu" if entry["cpu"] else p.device
                state[key] = torch.tensor(entry["value"], dtype=getattr(torch, entry["dtype"]), device=device)
            else:
                state[key] = entry["value"]


# --------------------------------------------------------------------------- save
def _ema_views(ema: ShardedEMA, frags: list[Fragment]) -> list[torch.Tensor]:
    """The EMA shadow of each fragment: ShardedEMA owns the same slices as the fp32 master."""
    views = {(name, start): view for name, start, view in ema.fragments()}
    out = []
    for f in frags:
        view = views.get((f.name, f.start))
        if view is None or view.numel() != f.numel:
            raise UniversalError(f"{f.name}: the EMA shard does not match the fp32 master fragment at {f.start}")
        out.append(view)
    return out


def save_universal(engine: deepspeed.DeepSpeedEngine, ema: ShardedEMA, directory: Path) -> None:
    """Collective. Each rank writes its own fragments (fp32 master, every optimizer state key,
    EMA) to ``directory/universal/rank{r:05d}.safetensors``; rank 0 writes ``index.json`` from the
    small per-rank fragment lists (all_gather_object: names and offsets, no tensors)."""
    write_index(engine, directory, write_fragments(engine, ema, directory))
    dist.barrier()


def write_fragments(engine: deepspeed.DeepSpeedEngine, ema: ShardedEMA, directory: Path) -> dict:
    """This rank's part of :func:`save_universal`, no collective: its fragments' file. Returns
    what :func:`write_index` gathers. A write error raises here, before any collective."""
    out = Path(directory) / SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    frags = local_fragments(engine)
    tensors: dict[str, torch.Tensor] = {}
    for f, shadow in zip(frags, _ema_views(ema, frags)):
        # a copy (one, also from a GPU): safetensors refuses views that share storage
        for key, view in ((MASTER, f.master), *f.state.items(), (EMA, shadow)):
            tensors[f"{f.name}@{f.start}/{key}"] = view.detach().to("cpu", torch.float32, copy=True)
    path = out / f"rank{dist.get_rank():05d}.safetensors"
    save_file(tensors, str(path), metadata={"format": str(FORMAT)})
    # Part of "complete": the header of what was written reads back with every fragment in it
    # (a resume in another layout reads these files only on the day it is needed).
    problem = _file_problem(path, set(tensors))
    if problem is not None:
        raise OSError(f"re-reading the universal form written: {problem}")
    del tensors
    return {
        "fragments": [(f.name, f.start, f.numel) for f in frags],
        "keys": {k: str(v.dtype).removeprefix("torch.") for f in frags for k, v in f.state.items()},
    }


def write_index(engine: deepspeed.DeepSpeedEngine, directory: Path, mine: dict) -> None:
    """Collective, the gather first: every rank reaches it, then rank 0 writes ``index.json``
    (an error there is rank 0's alone; the caller agrees on it)."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if dist.get_rank() == 0:
        _write_index(engine, Path(directory) / SUBDIR, everyone)


def _write_index(engine: deepspeed.DeepSpeedEngine, out: Path, everyone: list[dict]) -> None:
    base = base_optimizer(engine)
    params: dict[str, dict] = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            shape = list(getattr(p, "ds_shape", p.shape))
            params[name] = {"shape": shape, "numel": math.prod(shape), "fragments": []}
    for r, mine in enumerate(everyone):
        for name, start, numel in mine["fragments"]:
            params[name]["fragments"].append([start, numel, r])
    keys: dict[str, str] = {}
    for mine in everyone:
        keys.update(mine["keys"])
    sched = getattr(engine, "lr_scheduler", None)
    sched_state = {k: v for k, v in sched.state_dict().items() if _jsonable(v)} if sched is not None else None
    index = {
        "format": FORMAT,
        "layout": {
            "world_size": len(everyone),
            "zero_stage": engine.zero_optimization_stage(),
            "optimizer": type(base).__name__,
            "wrapper": type(engine.optimizer).__name__,
        },
        "state_keys": keys,
        "groups": group_scalars(engine),
        "scheduler": sched_state,
        "engine": {k: getattr(engine, k) for k in ENGINE_COUNTERS if hasattr(engine, k)},
        "params": params,
    }
    (out / "index.json").write_text(json.dumps(index) + "\n")


# --------------------------------------------------------------------------- load
def read_index(directory: Path) -> dict:
    path = Path(directory) / SUBDIR / "index.json"
    if not path.is_file():
        raise UniversalError(f"{path} is missing: this checkpoint has no universal form (save with save_universal)")
    try:
        index = json.loads(path.read_text())
    except ValueError as err:
        raise UniversalError(f"{path} is not valid JSON ({err}; a truncated write?)") from None
    if not isinstance(index, dict) or not isinstance(index.get("params"), dict):
        raise UniversalError(f"{path} is not a universal checkpoint index (no parameter table)")
    if index.get("format") != FORMAT:
        raise UniversalError(f"{path}: format {index.get('format')}, this code reads format {FORMAT}")
    return index


def _file_problem(path: Path, keys: set[str]) -> str | None:
    """Why the safetensors file at ``path`` does not hold ``keys`` (None: it does). Only the
    header is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            missing = keys - set(f.keys())
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for garbage
        return f"{path} is not a readable safetensors file ({type(err).__name__}: {err})"
    if missing:
        return f"{path} lacks {len(missing)} of the fragments the index names (e.g. {sorted(missing)[0]})"
    return None


def universal_problem(directory: Path) -> str | None:
    """Why a resume cannot read ``directory``'s universal form (None: it can): the index parses
    and covers every parameter, and every rank's file header holds the fragments it names."""
    try:
        index = read_index(directory)
        check_coverage(index)
    except (OSError, ValueError, KeyError, TypeError, UniversalError) as err:
        return f"{Path(directory) / SUBDIR / 'index.json'} is unreadable or incomplete ({err})"
    keys = [MASTER, EMA, *index.get("state_keys", {})]
    wanted: dict[int, set[str]] = {}
    for name, info in index["params"].items():
        for start, _, rank in info["fragments"]:
            wanted.setdefault(rank, set()).update(f"{name}@{start}/{key}" for key in keys)
    for rank, names in sorted(wanted.items()):
        problem = _file_problem(Path(directory) / SUBDIR / f"rank{rank:05d}.safetensors", names)
        if problem is not None:
            return problem
    return None


def check_coverage(index: dict) -> None:
    """Every parameter's fragments must tile ``[0, numel)`` exactly: a gap (a rank's file lost
    from the index) or an overlap would load garbage silently."""
    for name, info in index["params"].items():
        end = 0
        for start, numel, rank in sorted(info["fragments"]):
            if start != end:
                kind = "a gap" if start > end else "an overlap"
                raise UniversalError(
                    f"universal checkpoint: parameter {name} has {kind} at elements "
                    f"[{min(start, end)}, {max(start, end)}) (rank {rank}'s fragment)"
                )
            end = start + numel
        if end != info["numel"]:
            raise UniversalError(f"universal checkpoint: parameter {name} covers {end} of {info['numel']} elements")


def _check_model(index: dict, engine: deepspeed.DeepSpeedEngine) -> None:
    mine = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters() if p.requires_grad}
    saved = {n: info["shape"] for n, info in index["params"].items()}
    for name in sorted(set(mine) | set(saved)):
        if mine.get(name) != saved.get(name):
            raise UniversalError(
                f"universal checkpoint does not fit the model: parameter {name} has shape "
                f"{saved.get(name)} in the checkpoint and {mine.get(name)} here"
            )


def _fill(frag: Fragment, shadow: torch.Tensor, info: dict, keys: list[str], files: dict, folder: Path) -> None:
    """Copy the saved ranges overlapping ``frag`` (memory-mapped ``get_slice``: only those bytes are read)."""
    lo, hi = frag.start, frag.start + frag.numel
    targets = {MASTER: frag.master, EMA: shadow, **{k: frag.state[k] for k in keys}}
    for start, numel, rank in info["fragments"]:
        a, b = max(lo, start), min(hi, start + numel)
        if a >= b:
            continue
        if rank not in files:
            path = folder / f"rank{rank:05d}.safetensors"
            try:
                files[rank] = safe_open(str(path), framework="pt")
            except Exception as err:  # noqa: BLE001 - safetensors' own error types for garbage
                raise UniversalError(f"{path} is not a readable safetensors file ({err})") from None
        for key, dst in targets.items():
            src = files[rank].get_slice(f"{frag.name}@{start}/{key}")[a - start : b - start]
            dst[a - lo : b - lo].copy_(src)


def _refresh_low_precision(engine: deepspeed.DeepSpeedEngine) -> None:
    """Copy the loaded fp32 masters into the module's weights that the next forward uses. ZeRO-1/2
    and BF16_Optimizer: ``update_lp_params`` (copy + all-gather, as engine.py load_checkpoint does
    for universal checkpoints); ZeRO-3: the fp16 flat partitions and their unflattened views, as
    stage3.py ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``; ZeRO-0: ``fp16_groups``."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        for sub, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
            if fp32.numel():
                opt.fp16_partitioned_groups_flat[sub].data.copy_(fp32.data)
            flat, parts = opt.fp16_partitioned_groups_flat[sub], opt.fp16_partitioned_groups[sub]
            for part, q in zip(parts, opt.unflatten(flat, parts)):
                part.data = q.data
    elif hasattr(opt, "update_lp_params"):
        opt.update_lp_params()
    else:
        with torch.no_grad():
            for lg, hg in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
                for lp, hp in zip(lg, hg):
                    lp.data.copy_(hp.data)


@torch.no_grad()
def load_universal(engine: deepspeed.DeepSpeedEngine, ema: ShardedEMA, directory: Path) -> dict:
    """Collective. Load fp32 masters, every optimizer state key, per-group scalars, the LR
    schedule and the EMA into ``engine``/``ema`` (any world size and ZeRO stage), bit-exactly,
    then refresh the low-precision weights. Returns a summary for a log line."""
    folder = Path(directory) / SUBDIR
    index = read_index(directory)
    _check_model(index, engine)
    check_coverage(index)
    base = base_optimizer(engine)
    stage3 = engine.zero_optimization_stage() == 3
    if stage3:  # partition every parameter (persistent ones too) before writing their partitions
        engine.optimizer.checkpoint_event_prologue()
    _restore_scalars(engine, index["groups"], index["state_keys"])
    frags = local_fragments(engine)
    keys = sorted(index["state_keys"])
    files: dict[int, Any] = {}
    for frag, shadow in zip(frags, _ema_views(ema, frags)):
        missing = sorted(set(keys) - set(frag.state))
        if missing:
            raise UniversalError(f"{frag.name}: optimizer state {missing} not materialised in {type(base).__name__}")
        _fill(frag, shadow, index["params"][frag.name], keys, files, folder)
    files.clear()
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2: point the _hp_mapping optimizer views at the state (safe_get_*)
        engine.optimizer._hp_optimizer_states_linked = False
        link()
    _refresh_low_precision(engine)
    if stage3:
        engine.optimizer.checkpoint_event_epilogue()  # re-gathers the persistent parameters
    if index["scheduler"] is not None and getattr(engine, "lr_scheduler", None) is not None:
        engine.lr_scheduler.load_state_dict({**engine.lr_scheduler.state_dict(), **index["scheduler"]})
    for key, value in index["engine"].items():
        setattr(engine, key, value)
    ema.bind()
    dist.barrier()
    old = index["layout"]
    return {
        "fragments": len(frags),
        "state_keys": keys,
        "step": index["engine"].get("global_steps"),
        "from": f"{old['world_size']}x ZeRO-{old['zero_stage']}",
        "to": f"{dist.get_world_size()}x ZeRO-{engine.zero_optimization_stage()}",
    }
