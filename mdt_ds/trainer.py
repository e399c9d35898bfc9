"""The training loop behind ``mdt_ds.train.train``: engine, EMA, data stream, objective,
checkpoints, logging, guards and the graceful stop on preemption signals."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path

import torch

from mdt_ds import dist
from mdt_ds.checkpoint import (
    check_resumable,
    find_latest,
    load_training_state,
    save_ema_snapshot,
    save_training_state,
)
from mdt_ds.config import TrainConfig, resolve_batch
from mdt_ds.diffusion import create_diffusion
from mdt_ds.diffusion.loss import MDTv2Loss
from mdt_ds.ema import ShardedEMA
from mdt_ds.engine import PRECISION_DTYPES, build_engine
from mdt_ds.models.flops import train_macs_per_image
from mdt_ds.monitor import Monitor, measure_peak_flops, memory_gb
from mdt_ds.preemption import StopFlag

log = logging.getLogger("mdt_ds.train")


def record_launch(run_dir: Path, env: dist.DistEnv, start_step: int) -> None:
    """Every rank appends who and where it is (read by the Slurm tests and by people debugging)."""
    line = {
        "rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank, "host": socket.gethostname(),
        "launcher": env.launcher, "slurm_nodeid": os.environ.get("SLURM_NODEID"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"), "start_step": start_step, "time": time.time(),
    }
    with open(run_dir / "launch.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    log.warning("rank %d/%d on %s (node %s) starts at step %d", env.rank, env.world_size, line["host"],
                line["slurm_nodeid"], start_step)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step, the terms and the last checkpoint."""


class Trainer:
    def __init__(self, cfg: TrainConfig, env: dist.DistEnv, run_dir: Path, stop: StopFlag):
        self.cfg, self.env, self.run_dir, self.stop = cfg, env, run_dir, stop
        self.micro, self.accum = resolve_batch(cfg, env.world_size)
        self.engine, _ = build_engine(cfg, env.world_size, run_dir)
        self.device = self.engine.device
        self.dtype = PRECISION_DTYPES[cfg.precision]
        self.ema = ShardedEMA(self.engine, cfg.ema_decay, cfg.ema_warmup)
        self.step = self._resume_or_init()
        record_launch(run_dir, env, self.step)
        self.objective = MDTv2Loss(create_diffusion(min_snr_gamma=cfg.diffusion.min_snr_gamma))
        self.batches = iter(self._build_loader(self.step * self.accum))
        self.macs_per_image = train_macs_per_image(self.engine.module)
        peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else None
        self.peak_flops = peak or measure_peak_flops(self.device, self.dtype)
        self.monitor = Monitor(run_dir, self.step, cfg.steps, dist.is_main(), summary_every=cfg.log_every * 10)
        self.bad_steps = 0
        self._ema_gathered: tuple[int, dict[str, torch.Tensor]] | None = None
        self.started = time.time()
        self.last_ckpt: Path | None = find_latest(run_dir)

    # ---------------------------------------------------------------- setup
    def _resume_or_init(self) -> int:
        latest = find_latest(self.run_dir)
        if latest is None:
            if self.cfg.init_from:
                self._load_init_weights()
            return 0
        check_resumable(latest, self.env.world_size, self.cfg.zero_stage)
        step = load_training_state(self.engine, self.ema, latest)
        log.info("resumed from %s at step %d", latest, step)
        return step

    def _load_init_weights(self) -> None:
        """A new run from given weights (e.g. converted from a run of another world size)."""
        from mdt_ds.tools.convert_checkpoint import load_state_dict_file

        state = load_state_dict_file(self.cfg.init_from)
        if self.engine.zero_optimization_stage() == 3:
            raise ValueError("init_from is not supported with zero_stage=3; start at stage 2, or convert first")
        missing = self.engine.module.load_state_dict(state, strict=True)
        log.info("initialised weights from %s (%s)", self.cfg.init_from, missing)
        self.ema = ShardedEMA(self.engine, self.cfg.ema_decay, self.cfg.ema_warmup)

    def _build_loader(self, start_micro_step: int):
        from mdt_ds.data.loader import build_loader

        data = self.cfg.data
        return build_loader(
            data.source, batch_size=self.micro, seed=self.cfg.seed, rank=self.env.rank,
            world_size=self.env.world_size, num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
            resampled=data.resampled, start_step=start_micro_step, skip_corrupt=data.skip_corrupt,
        )

    # ---------------------------------------------------------------- one step
    def _model_fn(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        # Diffusion maths in fp32; the engine's module runs in the training precision.
        return self.engine(x.to(self.dtype), t, **kwargs).float()

    def _micro_step(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Every random draw of this micro-step (t, noise, masks, label dropout) is seeded from
        # (seed, rank, micro-step), so a resumed run follows the same trajectory.
        dist.seed_everything(self.cfg.seed, self.env.rank, index)
        x, y = next(self.batches)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return self.objective(self._model_fn, x, y)

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step (``accum`` micro-steps). None when a bad step was skipped."""
        sums: dict[str, float] = {}
        for micro in range(self.accum):
            loss, terms = self._micro_step(self.step * self.accum + micro)
            if not self._all_finite(loss):
                return self._bad_step(terms)
            self.engine.backward(loss)
            self.engine.step()
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value) / self.accum
        self.ema.update(self.step)
        return sums

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
        if torch.distributed.get_world_size() > 1:
            flag = flag.to(self.device) if self.device.type == "cuda" else flag
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return float(flag) == 0.0

    def _bad_step(self, terms: dict[str, torch.Tensor]) -> None:
        self.bad_steps += 1
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        if self.bad_steps > self.cfg.max_bad_steps or self.accum > 1:
            raise TrainingDiverged(
                f"non-finite loss at step {self.step} ({detail}) on some rank; last good checkpoint: "
                f"{self.last_ckpt or 'none'}. Lower optim.lr, use precision=bf16/fp32, or set max_bad_steps "
                f"(grad_accum 1 only) to skip such steps."
            )
        log.warning("skipping non-finite step %d (%s); %d of %d allowed", self.step, detail, self.bad_steps,
                    self.cfg.max_bad_steps)
        return None

    # ---------------------------------------------------------------- loop
    def run(self) -> dict:
        cfg = self.cfg
        last: dict[str, float] = {}
        preempted = False
        window_start, window_steps = time.perf_counter(), 0
        while self.step < cfg.steps:
            self._ema_gathered = None  # a full fp32 copy of the model: keep it no longer than a step
            terms = self.train_step()
            self.step += 1
            window_steps += 1
            self.monitor.advance()
            if terms is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                elapsed = time.perf_counter() - window_start
                last = self._log(terms, elapsed / window_steps)
                window_start, window_steps = time.perf_counter(), 0
            stop = self._stop_requested()
            if stop:
                preempted = stop == "signal"
                break
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self.save()
            if cfg.sample_every and self.step % cfg.sample_every == 0:
                self.sample_grid()
            if cfg.fid_every and self.step % cfg.fid_every == 0:
                self.evaluate_fid()
        self.save()
        if not preempted and cfg.sample_every and self.step % cfg.sample_every:
            self.sample_grid()
        self.monitor.close()
        if preempted:
            log.warning("stopped by signal at step %d after saving %s", self.step, self.last_ckpt)
        return {
            "step": self.step, "preempted": preempted, "run_dir": str(self.run_dir), "loss": last.get("loss", math.nan),
            "zero_stage": self.engine.zero_optimization_stage(), "world_size": self.env.world_size,
        }

    def _stop_requested(self) -> str:
        """"signal" (any rank got SIGUSR1/SIGTERM), "budget" (time budget spent) or "": every
        rank takes the same decision at the same step boundary."""
        over_budget = self.cfg.time_budget_min and time.time() - self.started > 60 * self.cfg.time_budget_min
        flags = torch.tensor([float(self.stop.requested), float(bool(over_budget))])
        if self.device.type == "cuda":
            flags = flags.to(self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return "signal" if flags[0] > 0 else "budget" if flags[1] > 0 else ""

    def _log(self, terms: dict[str, float], step_time: float) -> dict[str, float]:
        scalars = dist.mean_across_ranks(terms)
        images_per_s = self.cfg.global_batch / step_time
        scalars.update(
            grad_norm=float(self.engine.get_global_grad_norm() or 0.0),
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

    def save(self) -> None:
        if self.last_ckpt is not None and self.last_ckpt.name == f"step_{self.step:07d}":
            return
        self.last_ckpt = save_training_state(self.engine, self.ema, self.run_dir, self.step)
        state = self._gathered_ema()
        if dist.is_main():
            path = save_ema_snapshot(state, self.cfg, self.run_dir, self.step)
            self.monitor.text(f"step {self.step}: checkpoint {self.last_ckpt.name}, EMA snapshot {path.name}")
        dist.barrier()

    def evaluate_fid(self) -> dict[str, float]:
        """FID of the EMA model on all ranks (sampling is split across them), logged as eval/fid."""
        from mdt_ds.grids import codec_for_source
        from mdt_ds.metrics import fid_for_model
        from mdt_ds.models import build_model
        from mdt_ds.sampling import SampleOptions

        cfg = self.cfg
        model = build_model(cfg.model)
        model.load_state_dict(self._gathered_ema(), strict=True)
        options = SampleOptions(
            sampler="ddim", steps=cfg.fid_steps, cfg_scale=max(cfg.diffusion.cfg_scale, 1.0),
            cfg_pow=cfg.diffusion.cfg_pow, guide_channels=cfg.diffusion.guide_channels,
        )
        result = fid_for_model(
            model.to(self.device).eval(), codec_for_source(cfg.data.source, cfg.model.in_channels), cfg.fid_ref,
            num_images=cfg.fid_images, seed=cfg.seed, options=options, inception=cfg.fid_inception or None,
            device=self.device,
        )
        self.monitor.log(self.step, {"fid": result["fid"], "sfid": result["sfid"]}, prefix="eval")
        return result

    def sample_grid(self) -> None:
        """A grid from the EMA model with fixed seeds and classes (collective gather, rank 0 samples)."""
        state = self._gathered_ema()
        if dist.is_main():
            from mdt_ds.grids import render_grid

            try:
                grid = render_grid(self.cfg, state, self.run_dir / "samples" / f"step_{self.step:07d}.png")
                self.monitor.image("samples/ema", grid, self.step)
            except Exception as err:  # noqa: BLE001 - a failed grid must not kill a training run
                log.warning("sample grid at step %d failed: %s", self.step, err)
        dist.barrier()

