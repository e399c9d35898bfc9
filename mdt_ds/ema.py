"""EMA of the fp32 master weights, sharded exactly like the optimizer state.

Each rank keeps the EMA of the slice of fp32 master weights it owns, so an update costs no
communication (ZeRO-3: ``safe_get_local_fp32_param``; ZeRO-1/2: each parameter's ``_hp_mapping``
fragment of the optimizer's flat fp32 partition; bf16/fp16 ZeRO-0: the fp32 copies that DeepSpeed's
``FP16_UnfusedOptimizer`` keeps in ``fp32_groups``, which set no ``_hp_mapping``; fp32 ZeRO-0: the
parameters themselves). Gathering happens only when a snapshot is saved (a collective: every rank
calls it). A step that DeepSpeed skipped (fp16 overflow) leaves the EMA unchanged.
"""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_fp32_param


class ShardedEMA:
    def __init__(self, engine: deepspeed.DeepSpeedEngine, decay: float = 0.9999, warmup: bool = False):
        self.engine = engine
        self.decay = decay
        self.warmup = warmup
        self.stage = engine.zero_optimization_stage()
        self.named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        self.skipped = 0  # updates left out because DeepSpeed skipped the optimizer step
        self.bind()
        self.shadow = [s.detach().float().clone() for s in self.sources]

    # ---------------------------------------------------------------- local fp32 views
    def _masters(self) -> dict[int, torch.Tensor]:
        """ZeRO-0 with bf16/fp16: low-precision parameter -> its fp32 master copy. DeepSpeed's
        FP16_UnfusedOptimizer (engine.py ``_configure_fp16_optimizer``, used for both fp16 and
        bf16 at stage 0) keeps them as ``fp32_groups`` parallel to ``fp16_groups``; its
        ``load_state_dict`` copies into these same tensors, so the views stay valid on resume."""
        optimizer = getattr(self.engine, "optimizer", None)
        low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
        if not isinstance(low, list) or not isinstance(high, list):
            return {}
        return {id(lp): hp for lg, hg in zip(low, high) for lp, hp in zip(lg, hg) if hp.dtype == torch.float32}

    def _local_fp32(self, param: torch.nn.Parameter, masters: dict[int, torch.Tensor]) -> torch.Tensor:
        if self.stage == 3:
            return safe_get_local_fp32_param(param)
        if hasattr(param, "_hp_mapping"):
            mapping = param._hp_mapping
            # None: this rank owns no slice of the parameter.
            return mapping.get_hp_fragment() if mapping is not None else torch.empty(0)
        if param.dtype == torch.float32:
            return param.data
        if id(param) in masters:
            return masters[id(param)]
        # An EMA of the bf16 weights would lose the small updates that an EMA exists to average.
        raise RuntimeError(
            f"EMA: no fp32 master copy of a {param.dtype} parameter found in DeepSpeed's "
            f"{type(getattr(self.engine, 'optimizer', None)).__name__} (ZeRO stage {self.stage}); "
            "use zero_stage=1 or 2 (the same memory per GPU on one process), or precision=fp32"
        )

    def bind(self) -> None:
        """(Re)bind the views of the fp32 master slices (after engine init or a checkpoint load)."""
        masters = self._masters() if self.stage == 0 else {}
        self.sources = [self._local_fp32(p, masters) for _, p in self.named]

    def decay_at(self, step: int) -> float:
        """``decay``, or ``min(decay, (1 + step) / (10 + step))`` with warm-up (short runs)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """shadow <- decay * shadow + (1 - decay) * master, one multi-tensor op, no collective.
        Nothing moves when DeepSpeed skipped the step (fp16 overflow): ``was_step_applied()``
        returns a Python bool that DeepSpeed set during ``step()``, so reading it costs no sync."""
        if not self.engine.was_step_applied():
            self.skipped += 1
            return
        weight = 1.0 - self.decay_at(step)
        pairs = [(s, m) for s, m in zip(self.shadow, self.sources) if s.numel()]
        if pairs:
            shadows, masters = zip(*pairs)
            torch._foreach_lerp_(list(shadows), [m.float() for m in masters], weight)

    def fragments(self) -> list[tuple[str, int, torch.Tensor]]:
        """(name, flat start, 1-D view of the shadow) per parameter slice this rank owns, in the
        coordinates of the full flattened parameter: what the world-size-independent checkpoint
        (mdt_ds/universal.py) writes and reads, so the EMA survives a change of layout. Writing
        into a view writes the shadow. ZeRO-3: the local partition ``ds_tensor`` covers
        ``[rank * partition_numel, ...)``, cut at ``ds_numel`` (the last rank's tail is padding,
        deepspeed/runtime/zero/partition_parameters.py); ZeRO-1/2: ``_hp_mapping.lp_fragment_address``
        (deepspeed/utils/tensor_fragment.py); ZeRO-0: the whole parameter."""
        out = []
        for (name, param), shadow in zip(self.named, self.shadow):
            flat = shadow.view(-1)
            if self.stage == 3:
                part = param.ds_tensor.ds_numel
                start = part * dist.get_rank(group=getattr(param, "ds_process_group", None))
                numel = max(0, min(part, param.ds_numel - start))
            elif hasattr(param, "_hp_mapping"):
                mapping = param._hp_mapping
                if mapping is None:
                    continue
                start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            else:
                start, numel = 0, flat.numel()
            if numel:
                out.append((name, start, flat[:numel]))
        return out

    # ---------------------------------------------------------------- save / resume
    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's parameters")
        for dst, src in zip(self.shadow, state["shadow"]):
            dst.copy_(src)
        self.bind()

    def _gather(self, param: torch.nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
        """The full fp32 tensor of one parameter from the ranks' slices (collective)."""
        group = getattr(param, "_dp_group", None) or getattr(param, "ds_process_group", None)
        if self.stage == 3:
            parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, shard.contiguous(), group=group)
            return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)
        if not hasattr(param, "_hp_mapping"):
            return shard.view_as(param).clone()
        buffer = torch.zeros(param.numel(), dtype=torch.float32, device=shard.device if shard.numel() else param.device)
        if param._hp_mapping is not None:
            address = param._hp_mapping.lp_fragment_address
            buffer.narrow(0, address.start, address.numel).copy_(shard)
        dist.all_reduce(buffer, group=group)
        return buffer.view_as(param)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA model as a plain state_dict with the official key names (fp32, on CPU).
        Every rank must call it; all ranks get the result."""
        module = self.engine.module
        out: dict[str, torch.Tensor] = {}
        ema = {name: self._gather(p, s) for (name, p), s in zip(self.named, self.shadow)}
        for name, param in module.named_parameters():
            if name in ema:
                out[name] = ema[name].detach().cpu()
            elif self.stage == 3:  # frozen and partitioned: gather it
                with deepspeed.zero.GatheredParameters([param]):
                    out[name] = param.detach().float().cpu().clone()
            else:
                out[name] = param.detach().float().cpu().clone()
        for name, buf in module.named_buffers():
            out[name] = buf.detach().cpu().clone()
        return out
