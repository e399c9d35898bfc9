"""The training loop behind ``mdt_ds.train.train``: engine, EMA, data stream, objective,
checkpoints, logging, guards and the graceful stop on preemption signals."""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import torch

from mdt_ds import dist
from mdt_ds.checkpoint import (
    CheckpointError,
    check_free_space,
    estimate_bytes,
    free_bytes,
    has_universal,
    human_bytes,
    load_training_state,
    measured_bytes,
    read_meta,
    save_ema_snapshot,
    save_training_state,
    snapshot_suffixes,
)
from mdt_ds.config import TrainConfig, resolve_batch
from mdt_ds.diffusion import create_diffusion
from mdt_ds.diffusion.loss import MDTv2Loss
from mdt_ds.ema import ShardedEMA
from mdt_ds.engine import COMPUTE_DTYPES, PRECISION_DTYPES, build_engine
from mdt_ds.guards import StepGuard
from mdt_ds.models.flops import train_macs_per_image
from mdt_ds.monitor import Monitor, StepClock, measure_peak_flops, memory_gb
from mdt_ds.preemption import StopFlag
from mdt_ds.resume_point import agreed_resume_point
from mdt_ds.rundir import record_launch

log = logging.getLogger("mdt_ds.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step, the terms and the last checkpoint."""


STOP_WORDS = {"preempted": "stopped (preempted; rerun to resume)",
              "budget": "stopped by time_budget_min (rerun to continue)"}


def summary_interval(log_every: int, steps: int) -> int:
    """Steps between the console's summary lines: every 10th logged step on long runs, and about
    10 lines in all on short ones (which at every-10th would never print one)."""
    log_every = max(1, log_every)
    return log_every * max(1, min(10, steps // (10 * log_every)))


def training_objective(cfg: TrainConfig, device: torch.device) -> MDTv2Loss:
    """The loss the run trains: both MDTv2 passes over the run's diffusion (its number of
    timesteps and Min-SNR weighting), schedules on ``device``."""
    diffusion = create_diffusion(diffusion_steps=cfg.diffusion.num_timesteps, min_snr_gamma=cfg.diffusion.min_snr_gamma)
    return MDTv2Loss(diffusion.to(device), mask_ratio=cfg.model.mask_ratio)


def _nth(every: int) -> str:
    return "checkpoint of a stop and the end" if not every else "checkpoint" if every == 1 else f"{every}th checkpoint"


# "No non-finite step yet" for the device-side record of the first bad step.
NO_BAD_STEP = 2**62


class Trainer:
    def __init__(self, cfg: TrainConfig, env: dist.DistEnv, run_dir: Path, stop: StopFlag):
        self.cfg, self.env, self.run_dir, self.stop = cfg, env, run_dir, stop
        self.micro, self.accum = resolve_batch(cfg, env.world_size)
        # One decision, rank 0's, for every rank (a new layout falls back to a universal checkpoint).
        self.latest = agreed_resume_point(run_dir, env.world_size, cfg.zero_stage)
        self.engine, _ = build_engine(cfg, env.world_size, run_dir, init_state=self._init_state())
        self.device = self.engine.device
        self.dtype = PRECISION_DTYPES[cfg.precision]  # of the module's parameters and inputs
        self.ema = ShardedEMA(self.engine, cfg.ema_decay, cfg.ema_warmup)
        self.resume_meta: dict = {}  # the resumed checkpoint's meta.json
        self.step = self._resume_or_init()
        self.last_ckpt: Path | None = self.latest
        self.disk = self._plan_disk()
        if self.step < cfg.steps:  # the largest save of the run (the last: universal form and snapshot) must fit
            check_free_space(run_dir, sum(self.disk.values()), first=True)
        record_launch(run_dir, env, self.step)
        self.objective = training_objective(cfg, self.device)
        self.loader = self._build_loader(self.step * self.accum)
        self.batches = iter(self.loader)
        self.macs_per_image = train_macs_per_image(self.engine.module)
        self.peak_flops, self.peak_source = self._peak_flops()
        self.monitor = Monitor(run_dir, self.step, cfg.steps, dist.is_main(),
                               summary_every=summary_interval(cfg.log_every, cfg.steps))
        self._reset_guards()

    def _reset_guards(self) -> None:
        """The loop's bookkeeping: finiteness record, stop flags, timing window."""
        # With max_bad_steps > 0 each micro-step's loss is judged before its backward (a bad
        # step must not be applied: in bf16 DeepSpeed does not skip it; see mdt_ds.guards).
        # Otherwise the first non-finite step is recorded on the device and read on logging and
        # checkpoint steps.
        self.check_each_step = self.cfg.max_bad_steps > 0
        self.guard = StepGuard(self.cfg.max_bad_steps, self.cfg.explode_factor)
        self._first_bad = torch.full((), NO_BAD_STEP, dtype=torch.long, device=self.device)
        self._bad_terms: torch.Tensor | None = None
        self._term_keys: list[str] = []
        self._checked_step = self.step  # the last step whose finiteness all ranks agreed on
        self._flags: tuple[bool, bool] | None = None  # (signal, budget) agreed at this step
        self._ema_gathered: tuple[int, dict[str, torch.Tensor]] | None = None
        self.started = time.time()
        self.clock = StepClock(self.device)
        self.last_scalars: dict[str, float] = {}

    # ---------------------------------------------------------------- setup
    def _peak_flops(self) -> tuple[float, str]:
        """The MFU denominator: ``peak_tflops`` if set, else the device's dense peak from the
        table in mdt_ds.monitor (measured on devices it does not list). The measured matmul peak
        is logged beside it: a launch-bound 1024^3 matmul under-reads an H100 3-5x."""
        from mdt_ds.monitor import device_peak_flops

        compute = COMPUTE_DTYPES[self.cfg.precision]  # bf16-amp's matmuls run in bf16
        measured = measure_peak_flops(self.device, compute)
        if self.cfg.peak_tflops:
            peak, source = self.cfg.peak_tflops * 1e12, "peak_tflops from the config"
        else:
            peak, source = device_peak_flops(self.device, compute, measured)  # no second timing
        log.info("MFU peak %.4g TFLOP/s (%s); measured matmul peak %.4g TFLOP/s", peak / 1e12, source,
                 measured / 1e12)
        self.measured_peak_flops = measured
        return peak, source

    def _init_state(self) -> dict[str, torch.Tensor] | None:
        """The ``init_from`` weights for a NEW run (a resume ignores them: the checkpoint wins).
        They go into the model before ``deepspeed.initialize`` (see engine.prepare_model), so the
        fp32 master, the optimizer and the EMA all start from them, under every ZeRO stage."""
        if not self.cfg.init_from or self.latest is not None:
            return None
        from mdt_ds.tools.convert_checkpoint import load_state_dict_file

        return load_state_dict_file(self.cfg.init_from)

    def _resume_or_init(self) -> int:
        latest = self.latest
        if latest is None:
            if self.cfg.init_from:
                log.info("initialised weights from %s (fp32 master and EMA start from them)", self.cfg.init_from)
            return 0
        self.resume_meta = read_meta(latest)
        step = load_training_state(self.engine, self.ema, latest)
        log.info("resumed from %s at step %d", latest, step)
        return step

    def _build_loader(self, start_micro_step: int):
        from mdt_ds.data.loader import build_loader, check_shards

        data = self.cfg.data
        # The data position the resumed checkpoint saved: in split (epoch) mode a new layout
        # finishes the epoch over the samples the old one had not seen (mdt_ds.data.position).
        saved = self.resume_meta.get("data_position")
        what = f"the training data {data.source}"
        # Rank 0 opens and checks every shard once; every rank splits the list it found (so
        # skip_corrupt can never give one node another split than the others).
        checked = dist.load_on_main(lambda: check_shards(data.source, data.skip_corrupt), what)
        loader = dist.load_everywhere(lambda: build_loader(
            data.source, batch_size=self.micro, seed=self.cfg.seed, rank=self.env.rank,
            world_size=self.env.world_size, num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
            resampled=data.resampled, start_step=start_micro_step, skip_corrupt=data.skip_corrupt,
            # Pinned batches make the non_blocking copy below asynchronous; on a CPU-only
            # machine pinning only warns, so only for CUDA.
            pin_memory=self.device.type == "cuda", resume_from=saved, checked=checked,
        ), what)
        if saved is not None and saved["world_size"] != self.env.world_size:
            log.info("data: continuing at global sample %d (saved by %d processes, now %d; %s mode)",
                     saved["samples"], saved["world_size"], self.env.world_size, saved["mode"])
        return loader

    # ---------------------------------------------------------------- one step
    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        # Diffusion maths in fp32; the engine's module runs in the training precision.
        return self.engine(x.to(self.dtype), t, **kwargs).float()

    def _micro_step(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Every random draw of this micro-step is seeded from (seed, rank, micro-step), so a
        # resumed run follows the same trajectory: t, the noises, label dropout and masking from
        # a generator on the device (no copies, no syncs), the mask ratio on the host.
        rank, seed = self.env.rank, self.cfg.seed
        dist.seed_everything(seed, rank, index)
        generator = torch.Generator(device=self.device).manual_seed(dist.derive_seed(seed, rank, index, "device"))
        host_rng = random.Random(dist.derive_seed(seed, rank, index, "host"))
        x, y = next(self.batches)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return self.objective(self._model_fn, x, y, generator=generator, host_rng=host_rng)

    def train_step(self) -> dict[str, torch.Tensor] | None:
        """One optimizer step (``accum`` micro-steps): the mean terms as 0-d device tensors (read
        only when logged). None when a bad step was skipped."""
        total: torch.Tensor | None = None
        for micro in range(self.accum):
            loss, terms = self._micro_step(self.step * self.accum + micro)
            if self.check_each_step:
                verdict, mean = self._loss_verdict(loss)
                if verdict != "ok":
                    return self._bad_step(terms, verdict, mean)
            self._term_keys = sorted(terms)
            stacked = torch.stack([terms[k].float() for k in self._term_keys]) / self.accum  # one kernel, no read
            if not self.check_each_step:
                self._record_finiteness(loss, stacked)
            self.engine.backward(loss)
            self.engine.step()
            total = stacked if total is None else total + stacked
        self.ema.update(self.step)
        self.guard.record(self.step + 1, "ok")
        return dict(zip(self._term_keys, total.unbind())) if total is not None else {}

    def _record_finiteness(self, loss: torch.Tensor, stacked: torch.Tensor) -> None:
        """Keep the first non-finite step and its terms on the device: no sync, no collective."""
        newly = ~torch.isfinite(loss.detach()) & (self._first_bad == NO_BAD_STEP)
        # Steps are numbered from 1, as in stats.jsonl: self.step counts the steps done before this one.
        self._first_bad = torch.where(newly, self.step + 1, self._first_bad)
        self._bad_terms = stacked if self._bad_terms is None else torch.where(newly, stacked, self._bad_terms)

    def _loss_verdict(self, loss: torch.Tensor) -> tuple[str, float]:
        """Every rank's loss judged at once ("ok", "non-finite", "exploding") and their mean: one
        small all-reduce, which also carries the stop flags."""
        value = loss.detach().double().view(1)
        finite = torch.isfinite(value)
        out = self._reduce(values=torch.where(finite, value, torch.zeros_like(value)), bad=(~finite).double())
        mean = out[0] / self.env.world_size
        return self.guard.verdict(mean, finite=out[-1] == 0.0), mean

    def _bad_step(self, terms: dict[str, torch.Tensor], verdict: str, mean: float) -> None:
        step = self.step + 1
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        why = self.guard.describe(verdict, mean)
        if self.guard.record(step, verdict) or self.accum > 1:
            raise self._diverged(step, detail, verdict, why)
        log.warning("skipping step %d (%s; %s); %d of %d bad steps allowed", step, why, detail, self.guard.bad_steps,
                    self.cfg.max_bad_steps)
        return None

    def _diverged(self, step: int, detail: str, verdict: str = "non-finite", why: str = "") -> TrainingDiverged:
        first = self.guard.first_bad_step
        since = f" (published before the first bad step, {first})" if first is not None and first < step else ""
        return TrainingDiverged(
            f"{verdict} loss at step {step} ({detail}{'; ' + why if verdict != 'non-finite' else ''}) on some rank; "
            f"last good checkpoint: {self.last_ckpt or 'none'}{since}. Lower optim.lr, use precision=bf16/fp32, or "
            f"set max_bad_steps (grad_accum 1 only) to skip such steps."
        )

    # ---------------------------------------------------------------- agreement across ranks
    def _reduce(self, values: torch.Tensor | None = None, bad: torch.Tensor | None = None) -> list[float]:
        """ONE all-reduce (sum) of ``[values..., signal, over budget, bad]`` and one read: the
        logged scalars, the stop flags and the finiteness check share it. ``bad`` defaults to
        whether this rank has recorded a non-finite step. Returns the summed list and records
        the stop flags; raises TrainingDiverged when a recorded bad step shows up."""
        over_budget = self.cfg.time_budget_min and time.time() - self.started > 60 * self.cfg.time_budget_min
        host = torch.tensor([float(self.stop.requested), float(bool(over_budget))], dtype=torch.float64)
        recorded = bad is None and not self.check_each_step
        if bad is None:
            bad = (self._first_bad != NO_BAD_STEP).double().view(1) if recorded else torch.zeros(1, dtype=torch.float64)
        parts = [] if values is None else [values.double().reshape(-1).to(self.device)]
        vec = torch.cat([*parts, host.to(self.device), bad.to(self.device)])
        if self.env.world_size > 1:
            torch.distributed.all_reduce(vec)
        out = vec.tolist()  # the one host read of this reduction
        self._flags = (out[-3] > 0, out[-2] > 0)
        if recorded:
            self._checked_step = self.step
            if out[-1] > 0:
                self._raise_recorded()
        return out

    def _raise_recorded(self) -> None:
        """Some rank recorded a non-finite step: agree on the first one (all ranks are here)."""
        first = self._first_bad.clone().view(1)
        if self.env.world_size > 1:
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        step = int(first[0])
        mine = self._bad_terms if int(self._first_bad) == step else None
        detail = "terms on another rank" if mine is None else ", ".join(
            f"{k}={v:.4g}" for k, v in zip(self._term_keys, (mine * self.accum).tolist()))
        raise self._diverged(step, detail)

    def _stop_requested(self) -> str:
        """"signal" (any rank got SIGUSR1/SIGTERM), "budget" (time budget spent) or "": every
        rank takes the same decision at the same step boundary. The flags ride on this step's
        reduction if there was one (logging, finiteness); else they get their own small
        all-reduce every ``stop_check_every`` steps, so most steps run no collective of ours."""
        if self._flags is None and self.step % self.cfg.stop_check_every == 0:
            self._reduce()
        flags, self._flags = self._flags, None
        if flags is None:
            return ""
        return "signal" if flags[0] else "budget" if flags[1] else ""

    # ---------------------------------------------------------------- loop
    def one_step(self) -> str:
        """Train one step, log it when due, and return the agreed stop decision ("" to go on)."""
        cfg = self.cfg
        self._ema_gathered = None  # a full fp32 copy of the model: keep it no longer than a step
        self._flags = None
        terms = self.train_step()
        self.step += 1
        self.clock.tick()
        self.monitor.advance()
        if terms is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
            self.last_scalars = self._log(terms, self.clock.per_step())
            self.clock.restart()
        return self._stop_requested()

    def run(self) -> dict:
        cfg = self.cfg
        if self.step >= cfg.steps:
            # A requeue or a "rerun to be safe" of a finished run: success, and nothing is
            # rewritten (no checkpoint, grid or log line).
            log.info("already at step %d (steps=%d): nothing to train; checkpoint %s", self.step, cfg.steps,
                     self.last_ckpt or "none")
            self.monitor.close()
            return {"step": self.step, "preempted": False, "run_dir": str(self.run_dir), "loss": math.nan,
                    "already_done": True, "zero_stage": self.engine.zero_optimization_stage(),
                    "world_size": self.env.world_size}
        preempted, stop = False, ""
        self.clock.restart()
        while self.step < cfg.steps:
            stop = self.one_step()
            if stop:
                preempted = stop == "signal"
                break
            self._between_steps()
        # A stop writes its EMA snapshot too: the EMA of a run that is stopped and never resumed
        # must not stay locked in the per-rank shards of a checkpoint.
        self.save(snapshot=True, final=True)
        if not preempted and cfg.sample_every and self.step % cfg.sample_every:
            self.sample_grid()
        self.monitor.text(self.final_summary("preempted" if preempted else stop or ""))
        self.monitor.close()
        if preempted:
            log.warning("stopped by signal at step %d after saving %s", self.step, self.last_ckpt)
        return {
            "step": self.step, "preempted": preempted, "run_dir": str(self.run_dir),
            # None: no step logged yet (a budget stop before the first logging step is no failure)
            "loss": self.last_scalars.get("loss"), "zero_stage": self.engine.zero_optimization_stage(),
            "world_size": self.env.world_size,
        }

    def _between_steps(self) -> None:
        """The checkpoint, EMA snapshot, grid and FID evaluation due after this step, outside the
        step clock (img/s and MFU leave them out). A step with none due costs no device sync."""
        cfg, step = self.cfg, self.step
        snapshot_due = bool(self.snapshot_every) and step % self.snapshot_every == 0
        due = []
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
            due.append(lambda: self.save(snapshot=snapshot_due))
        elif snapshot_due and step < cfg.steps:
            due.append(self.snapshot)
        if cfg.sample_every and step % cfg.sample_every == 0:
            due.append(self.sample_grid)
        if cfg.fid_every and step % cfg.fid_every == 0:
            due.append(self.evaluate_fid)
        if due:
            with self.clock.excluded():
                for phase in due:
                    phase()

    def final_summary(self, stop: str = "") -> str:
        """What a person wants at the end of a run: where it stands, why it stopped ("preempted",
        "budget": time_budget_min, or "" for all steps done) and where its outputs are."""
        def newest(folder: str, pattern: str) -> str:
            found = sorted((self.run_dir / folder).glob(pattern))
            return str(found[-1]) if found else "none"

        loss = self.last_scalars.get("loss")
        minutes = (time.time() - self.started) / 60
        return "\n".join([
            f"{STOP_WORDS.get(stop, 'done')}: step {self.step} of {self.cfg.steps}, last loss "
            f"{'n/a' if loss is None else f'{loss:.4f}'}, {minutes:.1f} min in this launch",
            f"  checkpoint   {self.last_ckpt or 'none'}",
            f"  EMA snapshot {newest('snapshots', 'ema_*')}",
            f"  sample grid  {newest('samples', 'step_*.png')}",
            f"  TensorBoard  tensorboard --logdir {self.run_dir / 'tensorboard'}",
        ])

    def _log(self, terms: dict[str, torch.Tensor], step_time: float) -> dict[str, float]:
        """Average the terms over ranks in the step's one reduction and log them (the only host
        reads of a logging step)."""
        keys = sorted(terms)
        values = [terms[k].detach().double().reshape(()) for k in keys]
        grad_norm = self.engine.get_global_grad_norm()
        if isinstance(grad_norm, torch.Tensor):  # equal on every rank: the mean is the value
            keys, values = [*keys, "grad_norm"], [*values, grad_norm.detach().double().reshape(()).to(self.device)]
        summed = self._reduce(torch.stack([v.to(self.device) for v in values]))
        scalars = {k: v / self.env.world_size for k, v in zip(keys, summed)}
        if not isinstance(grad_norm, torch.Tensor):
            scalars["grad_norm"] = float(grad_norm or 0.0)
        images_per_s = self.cfg.global_batch / step_time
        scalars.update(
            lr=self.engine.get_lr()[0],
            step_time=step_time,
            images_per_s=images_per_s,
            mfu=2 * self.macs_per_image * images_per_s / (self.peak_flops * self.env.world_size),
            memory_gb=memory_gb(self.device),
        )
        self.monitor.log(self.step, scalars)
        return scalars

    # ---------------------------------------------------------------- outputs
    def _gathered_ema(self) -> dict[str, torch.Tensor]:
        """The full EMA state_dict at this step (collective), gathered once per step even when a
        checkpoint, a grid and an FID evaluation fall on the same step."""
        if self._ema_gathered is None or self._ema_gathered[0] != self.step:
            self._ema_gathered = (self.step, self.ema.full_state_dict())
        return self._ema_gathered[1]

    def _plan_disk(self) -> dict[str, int]:
        """What a checkpoint and a snapshot take (measured on the latest checkpoint when there is
        one, else estimated), logged at the start with what the kept ones add up to."""
        cfg = self.cfg
        num_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.module.parameters())
        sizes = estimate_bytes(num_params, cfg.precision, cfg.optim.name)
        source = "estimated"
        if self.latest is not None and dist.is_main():
            sizes.update(measured_bytes(self.latest))
            source = f"measured on {self.latest.name}"
        count = cfg.keep_ckpts or max(1, cfg.steps // max(1, cfg.ckpt_every or cfg.steps))
        kept = sizes["checkpoint"] * count + sizes["universal"] * max(1, count // max(1, cfg.universal_every))
        snaps = sizes["snapshot"] * len(snapshot_suffixes(cfg.snapshot_format))
        kept_snaps = snaps * (cfg.keep_snapshots or max(1, cfg.steps // max(1, self.snapshot_every or cfg.steps)))
        log.info(
            "disk: each checkpoint %s (%s), +%s for the world-size-independent form in every %s, each EMA snapshot "
            "%s; kept: %s checkpoints + %s snapshots = about %s; %s free under %s", human_bytes(sizes["checkpoint"]),
            source, human_bytes(sizes["universal"]), _nth(cfg.universal_every), human_bytes(snaps),
            cfg.keep_ckpts or "all", cfg.keep_snapshots or "all", human_bytes(kept + kept_snaps),
            human_bytes(free_bytes(self.run_dir)), self.run_dir,
        )
        return sizes

    @property
    def snapshot_every(self) -> int:
        return self.cfg.snapshot_every or self.cfg.ckpt_every

    def save(self, snapshot: bool = True, final: bool = False) -> None:
        """A checkpoint of this step (collective), and its EMA snapshot when one is due, written
        BEFORE the checkpoint is published: a crash right after publishing never leaves a
        checkpoint without its snapshot. The world-size-independent form goes into every
        ``universal_every``-th checkpoint and into a ``final`` one (a stop, the end)."""
        cfg = self.cfg
        scheduled = cfg.universal_every and cfg.ckpt_every and (self.step // cfg.ckpt_every) % cfg.universal_every == 0
        universal = final or bool(scheduled)
        if self.last_ckpt is not None and self.last_ckpt.name == f"step_{self.step:07d}" and (
                not universal or has_universal(self.last_ckpt)):
            return
        if self._publishing_blocked("checkpoint"):
            return
        if not self.check_each_step and self._checked_step != self.step:
            self._reduce()  # never publish a checkpoint of a diverged run: raises if a step was bad
        need = self.disk["checkpoint"] + (self.disk["universal"] if universal else 0)
        check_free_space(self.run_dir, need + (self.disk["snapshot"] if snapshot else 0))
        state = self._gathered_ema() if snapshot else None  # collective: before the save's own collectives
        written: list[str] = []

        def write_snapshot() -> None:
            if state is not None and dist.is_main():
                written.append(save_ema_snapshot(state, self.cfg, self.run_dir, self.step).name)

        self.last_ckpt = save_training_state(
            self.engine, self.ema, self.run_dir, self.step, keep=self.cfg.keep_ckpts, before_publish=write_snapshot,
            meta=self._checkpoint_meta(), universal=universal,
        )
        if dist.is_main():
            self.disk.update(measured_bytes(self.last_ckpt))
            self.monitor.text(f"step {self.step}: checkpoint {self.last_ckpt.name}"
                              + (f", EMA snapshot {written[0]}" if written else ""))

    def _checkpoint_meta(self) -> dict:
        """What meta.json records besides step and layout: the batch split and the data position."""
        # Collective (every rank builds the meta): the corrupt samples skip_corrupt dropped, all ranks.
        skipped = round(dist.mean_across_ranks({"n": float(self.loader.skipped_samples)})["n"] * self.env.world_size)
        if skipped:
            log.warning("data: %d corrupt samples skipped so far (data.skip_corrupt; counted as read ahead)", skipped)
        return {"micro_batch": self.micro, "grad_accum": self.accum, "global_batch": self.cfg.global_batch,
                "data_position": self.loader.position(self.step * self.accum), "skipped_samples": skipped}

    def _publishing_blocked(self, what: str) -> bool:
        """Bad steps were skipped recently (max_bad_steps > 0): publish nothing, so that the last
        published checkpoint stays one from before them. The same decision on every rank."""
        blocked = self.guard.publish_blocked()
        if blocked:
            log.warning("not writing the %s of step %d: %s; the last good checkpoint stays %s", what, self.step,
                        blocked, self.last_ckpt or "none")
        return blocked is not None

    def snapshot(self) -> None:
        """An EMA snapshot on a step without a checkpoint (``snapshot_every`` apart from ``ckpt_every``)."""
        if self._publishing_blocked("EMA snapshot"):
            return
        state = self._gathered_ema()
        error: CheckpointError | None = None
        if dist.is_main():
            check = free_bytes(self.run_dir) >= self.disk["snapshot"]
            if not check:
                log.warning("skipping the EMA snapshot of step %d: %s free, it needs %s", self.step,
                            human_bytes(free_bytes(self.run_dir)), human_bytes(self.disk["snapshot"]))
            else:
                try:
                    path = save_ema_snapshot(state, self.cfg, self.run_dir, self.step)
                    self.monitor.text(f"step {self.step}: EMA snapshot {path.name}")
                except CheckpointError as err:  # rank 0's alone: the others must not wait at a barrier
                    error = err
        if dist.any_rank(error is not None):  # also the barrier
            raise error or CheckpointError("rank 0 could not write the EMA snapshot (see its log)")

    def evaluate_fid(self) -> dict[str, float]:
        """FID of the EMA model on all ranks (sampling is split across them), logged as eval/fid."""
        from mdt_ds.grids import codec_for_source, sample_options
        from mdt_ds.metrics import fid_for_model
        from mdt_ds.metrics.training import cached_extractor
        from mdt_ds.models import build_model

        cfg = self.cfg
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            model = build_model(cfg.model, device=self.device)  # random init, overwritten at once
        model.load_state_dict(self._gathered_ema(), strict=True)
        options = sample_options(cfg.diffusion, cfg.fid_steps, label_classes=self.loader.num_classes)
        codec, extractor = dist.load_everywhere(lambda: (
            codec_for_source(cfg.data.source, cfg.model.in_channels, device=self.device, vae=cfg.data.vae),
            cached_extractor(cfg.fid_inception or None, self.device),
        ), "the VAE and the Inception network for the in-training FID")
        result = fid_for_model(model.eval(), codec, cfg.fid_ref, num_images=cfg.fid_images, seed=cfg.seed,
                               options=options, extractor=extractor, device=self.device)
        self.monitor.log(self.step, {"fid": result["fid"], "sfid": result["sfid"]}, prefix="eval")
        return result

    def sample_grid(self) -> None:
        """A grid from the EMA model with fixed seeds and classes (collective gather, rank 0 samples)."""
        state = self._gathered_ema()
        if dist.is_main():
            from mdt_ds.grids import render_grid

            try:
                path = self.run_dir / "samples" / f"step_{self.step:07d}.png"
                grid = render_grid(self.cfg, state, path, device=self.device)
                self.monitor.image("samples/ema", grid, self.step)
                self.monitor.text(f"step {self.step}: sample grid {path}")
            except Exception as err:  # noqa: BLE001 - a failed grid must not kill a training run
                log.warning("sample grid at step %d failed: %s", self.step, err)
        dist.barrier()

