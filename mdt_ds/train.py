"""``train(cfg)``: the one training function every launcher reaches (python, torchrun, the
deepspeed launcher, srun, submitit). ``python -m mdt_ds.train --config run.yaml key=value ...``.

Rerunning the same command resumes from the latest complete checkpoint in ``run_dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from mdt_ds import dist
from mdt_ds.config import ConfigError, TrainConfig, deepspeed_config, load_config, resolve_batch, save_config, to_dict
from mdt_ds.preemption import StopFlag

log = logging.getLogger("mdt_ds.train")

EXIT_PREEMPTED = 3
EXIT_USAGE = 2  # a user error, named in one line
EXIT_INTERRUPTED = 130  # stopped at once by a second Ctrl-C (the shell's 128 + SIGINT)
# Keys that may change between a run and its resume (how long and how chatty, not what).
# run_dir is where a run lives, not what it is: a moved run directory resumes.
RESUMABLE_CHANGES = {"steps", "log_every", "ckpt_every", "sample_every", "force_resume", "max_bad_steps", "init_from",
                     "time_budget_min", "fid_every", "fid_images", "fid_steps", "fid_inception", "run_dir",
                     "keep_ckpts", "snapshot_every", "keep_snapshots", "snapshot_format", "stop_check_every",
                     "cpu_malloc", "optim.fused", "universal_every", "explode_factor", "data.vae",
                     # how the ranks talk, not what they compute
                     "comm.timeout_min", "comm.reduce_bucket_size", "comm.allgather_bucket_size", "comm.overlap_comm",
                     "comm.multi_rank_bucket_allreduce",
                     # how grids and the in-training FID sample, not what is trained
                     "diffusion.sampler", "diffusion.sample_steps", "diffusion.sample_spacing", "diffusion.cfg_interval",
                     # how the same maths is laid out: a resume converts (universal form, data position)
                     "zero_stage", "activation_checkpointing", "compile", "data.num_workers", "data.skip_corrupt"}


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"data": {"num_workers": 2}}`` -> ``{"data.num_workers": 2}``: changes are named per key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create run_dir and write config.json; refuse (on every rank alike) to continue a run of
    another config."""
    run_dir = Path(cfg.run_dir).resolve()
    if cfg.fid_every and not Path(cfg.fid_ref).is_file():
        raise ConfigError(f"fid_every={cfg.fid_every} needs fid_ref=REF.npz (a reference batch); {cfg.fid_ref!r} "
                          f"is not a file. Make one with `mdt-eval ref IMAGES REF.npz`.")
    problem = None
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        saved = run_dir / "config.json"
        problem = None if cfg.force_resume else config_change(saved, cfg)
        if problem is None:
            save_config(cfg, saved)
    problem = dist.from_main(problem)
    if problem:
        raise ConfigError(problem)
    return run_dir


def config_change(saved: Path, cfg: TrainConfig) -> str | None:
    """Why ``cfg`` may not continue the run saved in ``saved`` (None: it may). A key the saved
    config lacks (added by a later version) is unchanged when it has its default: the old run
    ran with that behaviour."""
    if not saved.is_file():
        return None
    old, new = _flat(json.loads(saved.read_text())), _flat(to_dict(cfg))
    for key, default in _flat(to_dict(TrainConfig())).items():
        old.setdefault(key, default)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if not changed:
        return None
    return (f"{saved.parent} holds a run with a different config (changed: {', '.join(changed)}). Use another "
            f"run_dir, or pass force_resume=true to continue it with the new config.")


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) the run described by ``cfg``. Returns the final step, whether the run
    stopped for a preemption signal, the run directory and the last logged loss."""
    stop = StopFlag().install()  # first: a warning signal during imports/init must not kill the rank
    try:
        from mdt_ds.checkpoint import remove_stale
        from mdt_ds.data.compat import fit_model_to_data
        from mdt_ds.grids import check_decoder
        from mdt_ds.rundir import lock_run_dir
        from mdt_ds.trainer import Trainer

        env = dist.init(argv=sys.argv, use_deepspeed=True, timeout_min=cfg.comm.timeout_min)
        setup_logging(env.rank)
        cfg = fit_model_to_data(cfg)  # before anything is built; config.json keeps the resolved values
        check_decoder(cfg)  # grids and the FID decode: a moved VAE is one line now, not a failed grid later
        lock = lock_run_dir(Path(cfg.run_dir).resolve())
        try:
            run_dir = prepare_run_dir(cfg)
            if dist.is_main():
                remove_stale(run_dir)  # under the lock: no other job can be mid-save
            trainer = Trainer(cfg, env, run_dir, stop)
            return trainer.run()
        finally:
            lock.release()
    finally:
        stop.restore()


def config_sections_help() -> str:
    """The config's sections and keys with their defaults, for --help (from the dataclasses)."""
    import dataclasses

    cfg = TrainConfig()
    top, lines = [], ["config sections (section.key=value; defaults shown):"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys = ", ".join(f"{k.name}={getattr(value, k.name)!r}" for k in dataclasses.fields(value))
            lines.append(f"  {f.name}: {keys}")
        else:
            top.append(f"{f.name}={value!r}")
    lines.append("  top level: " + ", ".join(top))
    lines.append("Every resolved value, and the DeepSpeed JSON derived from them: mdt-train [overrides] --dry-run")
    lines.append("(model.input_size / in_channels / num_classes = auto take them from the data's manifest).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    from mdt_ds.clihelp import HelpFormatter

    parser = argparse.ArgumentParser(
        prog="mdt-train", description="Train MDTv2 with DeepSpeed. Extra arguments are overrides: key=value "
        "or --section.key=value (e.g. model.preset=MDTv2-XL/2 optim.lr=3e-4).",
        epilog=config_sections_help(), formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", action="append", default=[], help="YAML/JSON run config; repeatable, later wins")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed JSON, exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    """``mdt-train``: 0 done, 1 failed (non-finite loss, a checkpoint that could not be written), 2
    a user error named in one line (config, data, a checkpoint file refused or unreadable), 3 preempted or
    stopped by a first Ctrl-C (a checkpoint was written; rerun to resume), 130 stopped at once by a second Ctrl-C.
    Under ``mdt-launch`` the code is also written to the supervisor's exit folder, since torchrun
    reports any worker failure as 1 and the launchers kill the other ranks."""
    from mdt_ds import preemption

    previous = preemption.arm_early()  # before the heavy imports: a USR1 now must not kill the rank
    dist.quiet_libraries()
    preemption.register_worker()
    if preemption.under_launcher():
        preemption.watch_launcher()
    code = 1  # an exception escapes: the launcher sees 1 too
    reported = False
    try:
        code = _main(argv)
    finally:
        reported = preemption.report_exit(code)
        preemption.disarm(previous)
    # Under mdt-launch the code travels in the exit file. Exiting 0 for these two (every rank
    # meets them alike: agreed stops, agreed config checks) keeps torchrun and the deepspeed
    # launcher from printing their failure report over the one-line message.
    return 0 if reported and code in (EXIT_USAGE, EXIT_PREEMPTED) else code


def _user_errors() -> dict[type, int]:
    """The project's own errors, which a CLI reports in one line (no traceback), and their codes:
    2 for what the user can fix (config, data, files), 1 for a run that failed."""
    from mdt_ds.checkpoint import CheckpointError, DiskFullError, ResumeError
    from mdt_ds.data.shards import ShardError
    from mdt_ds.metrics.inception import InceptionWeightsError
    from mdt_ds.models.codec import CodecError
    from mdt_ds.safe_load import UnsafeCheckpointError
    from mdt_ds.trainer import TrainingDiverged
    from mdt_ds.universal import UniversalError

    return {ConfigError: 2, UnsafeCheckpointError: 2, ResumeError: 2, UniversalError: 2, ShardError: 2,
            CodecError: 2, InceptionWeightsError: 2, TrainingDiverged: 1, DiskFullError: 2, CheckpointError: 1}


def _report(err: Exception) -> None:
    """One line on stderr. A config error is the same on every rank (each rank checks the same
    config, and run-dir checks are agreed from rank 0): only rank 0 prints it. Any other error may
    hit one rank alone (a bad shard, a full disk), so that rank prints it, naming itself."""
    env = dist.launcher_env(argv=sys.argv)
    if isinstance(err, ConfigError):
        if env.rank == 0:
            print(f"mdt-train: config error: {err}", file=sys.stderr)
        elif env.world_size > 1:
            # torchrun ends the other workers as soon as one exits: let rank 0 print first.
            time.sleep(3)
        return
    where = f" (rank {env.rank})" if env.world_size > 1 else ""
    print(f"mdt-train: error{where}: {' '.join(str(err).split())}", file=sys.stderr)


def _main(argv: list[str] | None) -> int:
    args, overrides = parse_args(argv)
    finished, cfg = False, None
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            from mdt_ds.data.compat import fit_model_to_data

            world = dist.launcher_env(argv=sys.argv).world_size
            resolve_batch(cfg, world)
            cfg = fit_model_to_data(cfg)
            print(json.dumps({"config": to_dict(cfg), "deepspeed": deepspeed_config(cfg, world)}, indent=2))
            return 0
        result = train(cfg)
        finished = True
    except KeyboardInterrupt:  # a second Ctrl-C (the first one checkpoints: preemption.StopFlag)
        where = f" in {cfg.run_dir}" if cfg is not None else ""
        print(f"mdt-train: stopped at once (Ctrl-C twice), without a checkpoint of the last steps; rerun to resume "
              f"from the latest checkpoint{where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        codes = [code for kind, code in _user_errors().items() if isinstance(err, kind)]
        if not codes:
            raise  # a bug: the traceback is for us
        _report(err)
        return codes[0]
    finally:
        dist.teardown(synchronise=finished)
    if result["preempted"]:
        return EXIT_PREEMPTED
    if result.get("already_done"):
        return 0
    loss = result.get("loss")
    return 0 if loss is None or math.isfinite(loss) else 1


if __name__ == "__main__":
    sys.exit(main())
