"""``mdt-submit``: submit training (or any module, e.g. the sampler) to Slurm with submitit.

    mdt-submit --nodes 4 --gpus-per-node 8 --partition gpu --time 2-00:00:00 \\
        --config runs/xl.yaml run_dir=runs/xl2

Each task of the job runs :class:`TrainJob`: ``submitit.helpers.TorchDistributedEnvironment().export()``
writes the torchrun variables, then the same ``mdt_ds.train.train(cfg)`` as every other launcher.

Preemption and time limits: submitit asks Slurm for its warning signal (USR2, ``--signal-delay``
seconds before the end; ``scancel --signal``, submitit's ``job._interrupt()`` and Slurm's preemption
send it or SIGTERM too). The job relays it to the trainer's SIGUSR1 handler instead of letting
submitit requeue at once: the trainer finishes its step, the ranks agree, they save a checkpoint
together and ``train`` returns ``preempted``. Rank 0 then requeues the job with ``scontrol requeue``
(only while Slurm still calls it RUNNING: never a cancelled one); it comes back with
``SLURM_RESTART_COUNT`` + 1 and runs the same pickled job, which resumes from ``run_dir``. The job
keeps no state of its own, so its ``checkpoint()`` (what submitit resubmits when its own handler
requeues, e.g. for a signal that arrives before the job function starts) is the job itself. No
result is written for an interrupted attempt: ``job.result()`` returns the finishing attempt's.

Several configs (``--array-config``) or a sweep (``--sweep optim.lr=1e-4,3e-4``) go out as one job
array, one run directory per task.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mdt_ds.clihelp import HelpFormatter
from mdt_ds.slurm_job import EXIT_PREEMPTED, ModuleJob, TrainJob, _submitit, requeue_job

log = logging.getLogger("mdt_ds.launch")

__all__ = ["EXIT_PREEMPTED", "ModuleJob", "SlurmOptions", "TrainJob", "expand_runs", "main", "requeue_job", "submit", "wait"]


# --------------------------------------------------------------------------- options
def parse_time(text: str | int) -> int:
    """Slurm's ``--time`` formats (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``) to whole minutes, rounded up."""
    if isinstance(text, int):
        return text
    value = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value)
    if not match:
        raise ValueError(f"--time {value!r}: use minutes or [D-]HH:MM:SS as sbatch does")
    days, a, b, c = match.groups()
    nums = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (nums + [0, 0])[:3]
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif len(nums) == 1:
        total = nums[0] * 60
    elif len(nums) == 2:  # MM:SS
        total = nums[0] * 60 + nums[1]
    else:
        total = nums[0] * 3600 + nums[1] * 60 + nums[2]
    return max(1, -(-total // 60))


@dataclass
class SlurmOptions:
    """What the job asks Slurm for. ``tasks_per_node`` defaults to one task per GPU (or 1)."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    constraint: str | None = None
    qos: str | None = None
    mem: str | None = None  # sbatch --mem, e.g. "480G"; "0" means all memory of each node
    exclusive: bool = False
    job_name: str = "mdt-train"
    signal_delay_s: int = 180  # warning signal this long before the time limit
    array_parallelism: int = 64
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other sbatch option: {"reservation": "x"}
    srun_args: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load ...)
    env: dict[str, str] = field(default_factory=dict)  # exported in every task
    max_requeues: int = 1000  # preemption requeues before the job fails (resume then by resubmitting)

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def executor_parameters(self, cluster: str = "slurm") -> dict[str, Any]:
        params: dict[str, Any] = {
            "nodes": self.nodes,
            "tasks_per_node": self.ntasks_per_node,
            "timeout_min": parse_time(self.time),
            "name": self.job_name,
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        if cluster != "slurm":
            return params
        # --requeue: scontrol requeue works even where the site's default is JobRequeue=0.
        extra = {"requeue": True, **self.sbatch}
        # srun --wait: when one task dies (a crash), the others are ended 2 minutes later
        # instead of hanging in a collective until the NCCL timeout.
        srun_args = ["--wait=120", *self.srun_args]
        if self.cpus_per_task:
            # Explicitly: several Slurm releases do not pass sbatch's --cpus-per-task on to srun,
            # and each rank would get one core (serial compiles, a starved data loader).
            srun_args.insert(1, f"--cpus-per-task={self.cpus_per_task}")
        params.update(
            slurm_signal_delay_s=self.signal_delay_s,
            slurm_array_parallelism=self.array_parallelism,
            slurm_additional_parameters=extra,
            slurm_srun_args=srun_args,
        )
        setup = list(self.setup) + [f"export {k}={shlex.quote(str(v))}" for k, v in self.env.items()]
        if setup:
            params["slurm_setup"] = setup
        for key in ("partition", "account", "constraint", "qos", "mem"):
            if getattr(self, key) is not None:
                params[f"slurm_{key}"] = getattr(self, key)
        if self.exclusive:
            params["slurm_exclusive"] = True
        return params


def make_executor(folder: str | Path, options: SlurmOptions, cluster: str = "slurm"):
    """A submitit executor for ``options`` (``cluster``: "slurm", or "local"/"debug" to try a job
    on this machine)."""
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(**options.executor_parameters(cluster))
    return executor


# --------------------------------------------------------------------------- submission
@dataclass
class RunSpec:
    """One run of a submission: config files and overrides (its run_dir is resolved from them)."""

    configs: list[str]
    overrides: list[str]
    run_dir: str = ""
    tag: str = ""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")[:80]


def expand_runs(
    configs: Sequence[str], overrides: Sequence[str], array_configs: Sequence[str] = (), sweeps: Sequence[str] = ()
) -> list[RunSpec]:
    """One run per (array config x sweep value combination); with more than one run, each run
    whose run_dir would be shared gets its own sub-directory named after what differs."""
    axes: list[list[tuple[str, list[str], list[str]]]] = []
    if array_configs:
        axes.append([(Path(p).stem, [p], []) for p in array_configs])
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not values:
            raise ValueError(f"--sweep {sweep!r}: use key=value1,value2,...")
        axes.append([(f"{key.split('.')[-1]}={v}", [], [f"{key}={v}"]) for v in values.split(",")])
    runs = []
    for combo in itertools.product(*axes) if axes else [()]:
        tag = ",".join(c[0] for c in combo)
        extra_cfg = [p for c in combo for p in c[1]]
        extra_ovr = [o for c in combo for o in c[2]]
        runs.append(RunSpec([*configs, *extra_cfg], [*overrides, *extra_ovr], tag=tag))
    from mdt_ds.config import load_config

    for run in runs:
        run.run_dir = load_config(run.configs, run.overrides).run_dir
    if len(runs) > 1 and len({r.run_dir for r in runs}) < len(runs):
        for i, run in enumerate(runs):
            run.run_dir = str(Path(run.run_dir) / f"{i:02d}-{_slug(run.tag) or 'run'}")
            run.overrides = [*run.overrides, f"run_dir={run.run_dir}"]
    return runs


def check_runs(runs: Sequence[RunSpec], world_size: int) -> None:
    """Fail before queueing: every config resolves, and its batch fits the job's world size."""
    from mdt_ds.config import load_config, resolve_batch

    for run in runs:
        resolve_batch(load_config(run.configs, run.overrides), world_size)


def default_folder(runs: Sequence[RunSpec]) -> Path:
    if len(runs) == 1:
        return Path(runs[0].run_dir) / "submitit"
    return Path(os.path.commonpath([os.path.abspath(r.run_dir) for r in runs])) / "submitit"


def submit(
    runs: Sequence[RunSpec],
    options: SlurmOptions,
    folder: str | Path | None = None,
    cluster: str = "slurm",
    module: str | None = None,
    module_argv: Sequence[str] = (),
) -> list:
    """Submit one job per run (a job array when there are several); returns submitit jobs."""
    executor = make_executor(folder or default_folder(runs), options, cluster)
    if module:
        fns = [ModuleJob(module, list(module_argv), dict(options.env), options.max_requeues)]
    else:
        fns = [TrainJob(list(r.configs), list(r.overrides), dict(options.env), options.max_requeues) for r in runs]
    if len(fns) == 1:
        return [executor.submit(fns[0])]
    with executor.batch():
        jobs = [executor.submit(fn) for fn in fns]
    return jobs


def job_state(job: Any) -> str:
    try:
        return job.watcher.get_state(job.job_id, mode="force")
    except Exception:  # noqa: BLE001 - sacct hiccups must not end a wait
        return "UNKNOWN"


def wait(jobs: Sequence[Any], timeout_s: float | None = None, poll_s: float = 2.0) -> list[Any]:
    """Wait for every job (asking Slurm every ``poll_s``), at most ``timeout_s``; return the
    rank-0 results. Raises TimeoutError naming the states, or the job's error (a cancelled job:
    submitit's UncompletedJobError with its state and log tail)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not all(job.done(force_check=True) for job in jobs):
        if deadline is not None and time.monotonic() > deadline:
            states = ", ".join(f"{job.job_id}: {job_state(job)}" for job in jobs)
            raise TimeoutError(f"jobs not done after {timeout_s:.0f} s ({states})")
        time.sleep(poll_s)
    return [job.results()[0] for job in jobs]


def describe(job: Any) -> dict[str, str]:
    folder = Path(job.paths.folder)
    return {
        "job_id": str(job.job_id),
        "stdout": str(folder / f"{job.job_id}_0_log.out"),
        "stderr": str(folder / f"{job.job_id}_0_log.err"),
        "folder": str(folder),
    }


# --------------------------------------------------------------------------- CLI
def _key_values(items: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"mdt-submit: {what} {item!r}: use KEY=VALUE")
        out[key.lstrip("-")] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdt-submit",
        formatter_class=HelpFormatter,
        description="Submit MDTv2 training (or a module such as the sampler) to Slurm through submitit. "
        "Extra arguments are training overrides (key=value); after --module/--script, arguments after '--' "
        "go to that program. Preempted or timed-out jobs checkpoint, requeue and resume by themselves.",
    )
    p.add_argument("--config", action="append", default=[], help="run config YAML/JSON; repeatable, later wins")
    p.add_argument(
        "--array-config",
        action="append",
        default=[],
        metavar="FILE",
        help="one array task per file (merged after --config); repeatable",
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="one array task per value (cartesian product over repeated --sweep)",
    )
    p.add_argument("--module", help="run `python -m MODULE ARGS` in each task instead of training")
    p.add_argument("--script", help="run `python SCRIPT ARGS` in each task instead of training")
    g = p.add_argument_group("Slurm resources")
    g.add_argument("--nodes", "-N", type=int, default=1, help="nodes per job")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: none requested)")
    g.add_argument("--tasks-per-node", type=int, default=None, help="default: one per GPU (or 1)")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (default: the cluster's)")
    g.add_argument("--partition", "-p", help="sbatch --partition (default: the cluster's)")
    g.add_argument("--account", "-A", help="sbatch --account (default: yours)")
    g.add_argument("--time", "-t", default="24:00:00", help="time limit: minutes or [D-]HH:MM:SS")
    g.add_argument("--constraint", "-C", help="sbatch --constraint, e.g. a GPU type feature")
    g.add_argument("--qos", "-q", help="sbatch --qos")
    g.add_argument("--mem", help="memory per node, as sbatch --mem (e.g. 480G; 0 = all)")
    g.add_argument("--exclusive", action="store_true", help="whole nodes (sbatch --exclusive)")
    g.add_argument("--job-name", "-J", default=None, help="default: the --module/--script name, else mdt-train")
    g.add_argument("--signal-delay", type=int, default=180, help="seconds of warning before the time limit")
    g.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. --sbatch reservation=big; repeatable",
    )
    g.add_argument("--srun-arg", action="append", default=[], help="extra srun argument; repeatable")
    g.add_argument("--setup", action="append", default=[], help="shell line before srun (module load ...)")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="exported in every task")
    g.add_argument("--array-parallelism", type=int, default=64, help="array tasks running at once")
    g.add_argument("--max-requeues", type=int, default=1000,
                   help="preemption requeues before a job fails (then resume by resubmitting)")
    o = p.add_argument_group("submission")
    o.add_argument("--folder", help="submitit folder (logs, pickles); default RUN_DIR/submitit")
    o.add_argument(
        "--cluster",
        choices=["slurm", "local", "debug"],
        default="slurm",
        help="'local' runs the job on this machine (no Slurm), to try a command",
    )
    o.add_argument("--wait", action="store_true", help="wait for the jobs and print their results")
    o.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    o.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    o.add_argument("--json", action="store_true", help="print one JSON line per job instead of text")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args, extras = build_parser().parse_known_args(argv)
    target = args.module or args.script
    if args.module and args.script:
        raise SystemExit("mdt-submit: give --module or --script, not both")
    if target and extras:
        raise SystemExit(f"mdt-submit: unrecognised arguments {extras}; put {target}'s arguments after '--'")
    overrides = [*extras, *([] if target else passthrough)]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"mdt-submit: unrecognised arguments {bad}; training overrides are key=value")
    options = SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        account=args.account,
        time=args.time,
        constraint=args.constraint,
        qos=args.qos,
        mem=args.mem,
        exclusive=args.exclusive,
        job_name=args.job_name or (Path(target).stem if target else "mdt-train"),
        signal_delay_s=args.signal_delay,
        array_parallelism=args.array_parallelism,
        sbatch=_key_values(args.sbatch, "--sbatch"),
        srun_args=list(args.srun_arg),
        setup=list(args.setup),
        env=_key_values(args.env, "--env"),
        max_requeues=args.max_requeues,
    )
    from mdt_ds.config import ConfigError

    try:
        if target:
            runs = [RunSpec([], [], run_dir=args.folder or "runs", tag=Path(target).stem)]
        else:
            runs = expand_runs(args.config, overrides, args.array_config, args.sweep)
            check_runs(runs, options.world_size)
    except (ConfigError, ValueError) as err:
        print(f"mdt-submit: {err}", file=sys.stderr)
        return 2
    folder = Path(args.folder) if args.folder else default_folder(runs)
    if args.dry_run:
        print(
            json.dumps(
                {
                    "folder": str(folder),
                    "cluster": args.cluster,
                    "executor": options.executor_parameters(args.cluster),
                    "runs": [asdict(r) for r in runs] if not target else [],
                    "module": target,
                    "argv": passthrough if target else [],
                },
                indent=2,
            )
        )
        return 0
    jobs = submit(runs, options, folder, args.cluster, target, passthrough)
    for job, run in zip(jobs, runs if not target else runs * len(jobs)):
        info = {**describe(job), "run_dir": run.run_dir}
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(
                f"submitted job {info['job_id']}  run_dir={info['run_dir']}\n"
                f"  logs: {info['stdout']}\n        {info['stderr']}",
                flush=True,
            )
    if not args.wait:
        return 0
    try:
        results = wait(jobs, args.timeout)
    except Exception as err:  # noqa: BLE001 - report any job failure as the command's failure
        print(f"mdt-submit: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    for job, result in zip(jobs, results):
        print(json.dumps({"job_id": str(job.job_id), "result": result}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
