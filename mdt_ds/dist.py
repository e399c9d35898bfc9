"""One view of the process group, whatever started us.

torchrun and the deepspeed launcher export RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT
(deepspeed also passes ``--local_rank``); ``srun`` gives SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS
and a node list; submitit's ``TorchDistributedEnvironment().export()`` writes the torchrun
variables; a bare ``python`` has none. :func:`launcher_env` maps each onto the torchrun names,
:func:`init` exports them and starts the process group.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import hashlib
import io
import logging
import os
import re
import socket
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" (also deepspeed, submitit), "slurm" or "none"

    def as_environ(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``"gpu[03-05,9],cpu1"`` -> ``"gpu03"``."""
    match = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port() -> int:
    """A TCP port that is free on this host now (for single-node rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_rank_arg(argv: Sequence[str]) -> int | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            return int(arg.split("=", 1)[1])
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


def launcher_env(environ: Mapping[str, str] | None = None, argv: Sequence[str] = ()) -> DistEnv:
    """Map the launcher's environment (and deepspeed's ``--local_rank``) to one :class:`DistEnv`.
    torchrun-style variables win when present; then Slurm's; else a single process."""
    env = os.environ if environ is None else environ
    arg_local = _local_rank_arg(argv)
    if "RANK" in env and "WORLD_SIZE" in env:
        local = int(env.get("LOCAL_RANK", arg_local if arg_local is not None else 0))
        return DistEnv(
            int(env["RANK"]), local, int(env["WORLD_SIZE"]), env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)), "torchrun",
        )
    # Inside an srun step (SLURM_STEP_ID set); a batch shell alone is one process.
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        # A port every task of the job derives alike: from the job id, away from common ports.
        port = int(env.get("MASTER_PORT", 0)) or 15000 + int(env.get("SLURM_JOB_ID", 0)) % 20000
        return DistEnv(
            int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]),
            env.get("MASTER_ADDR") or first_slurm_host(nodelist), port, "slurm",
        )
    return DistEnv(0, arg_local or 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "none")


def export(env: DistEnv) -> None:
    os.environ.update(env.as_environ())


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(f in record.getMessage() for f in self.fragments)


def quiet_libraries() -> None:
    """Keep what libraries print on every start from burying what matters, before they load:
    DeepSpeed's "Setting accelerator to CPU" (it is: say so), torch's "No CUDA runtime is found"
    when DeepSpeed builds its CPU op, torch's deprecation of the collective DeepSpeed calls
    (printed with a stray source line), and DeepSpeed's "untested optimizer" (Adan is a client
    optimizer on purpose). The shm op's "built successfully" is kept out in :func:`init`."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.all_gather_into_tensor. is deprecated",
                            category=FutureWarning)
    logging.getLogger("DeepSpeed").addFilter(_DropMessages("untested optimizer"))


# Minutes a collective waits before the group aborts (DeepSpeed's default is 10, NCCL's 10 or
# 30 by torch version): long enough for any phase that one rank runs while the others wait.
DEFAULT_TIMEOUT_MIN = 60.0


def init(argv: Sequence[str] = (), backend: str | None = None, use_deepspeed: bool = False,
         timeout_min: float = DEFAULT_TIMEOUT_MIN) -> DistEnv:
    """Normalise the environment and join the process group (gloo on CPU, nccl on GPU), with
    ``timeout_min`` for every collective. A single process joins a group of one too, so
    collectives work everywhere."""
    env = launcher_env(argv=argv)
    export(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_gpu(env.local_rank, torch.cuda.device_count(), shown_one_each=not use_deepspeed))
    if not torch.distributed.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_min)
        if use_deepspeed:
            import deepspeed

            with contextlib.redirect_stdout(io.StringIO()):  # "... shm_comm_op built successfully", every rank
                deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
        else:
            backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
            torch.distributed.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    return env


def local_gpu(local_rank: int, visible: int, shown_one_each: bool = True) -> int:
    """This process's CUDA index: ``LOCAL_RANK`` when all GPUs of the node are visible; 0 when the
    launcher shows each process only its own (``srun --gpus-per-task=1``), if the caller allows
    that (``shown_one_each``; DeepSpeed places itself on ``cuda:LOCAL_RANK`` and cannot). Anything
    else is one clear error instead of CUDA's "invalid device ordinal" from deep inside."""
    if local_rank < visible:
        return local_rank
    if visible == 1 and shown_one_each:
        return 0
    from mdt_ds.config import ConfigError

    binding = "" if shown_one_each else " (training needs all GPUs of its node visible)"
    raise ConfigError(
        f"LOCAL_RANK={local_rank} but this process sees {visible} GPU(s){binding}. Slurm's per-task binding "
        f"(--gpus-per-task, --gpu-bind=single) hides the others: request --gpus-per-node=N as slurm/*.sbatch "
        f"do, and check CUDA_VISIBLE_DEVICES."
    )


def teardown(synchronise: bool = False) -> None:
    """Leave the process group and free it now, while the interpreter is still whole.

    ``synchronise`` (the success path) meets every rank at a barrier first, so that no rank
    closes its gloo pairs while a peer is still inside a collective; an error path skips it,
    as a failed peer may never arrive. The collection frees finished work objects whose
    tensors hold Python references: left to interpreter finalisation, gloo's threads can
    abort a rank that has finished cleanly ("terminate called without an active exception",
    pytorch/pytorch#190489 and the discussion in #179291)."""
    if torch.distributed.is_initialized():
        if synchronise:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    gc.collect()


def exit_launched_rank(code: int) -> NoReturn:
    """End a launched rank that has already left its group, without interpreter finalisation.

    A finished rank has nothing left to finalise but C++ threads (gloo's, pybind11's) that can
    abort it while the interpreter shuts down: CI saw one SIGABRT after a clean two-rank
    sampler run, which torchrun reports as a failed job. For the sampler and the evaluator,
    whose files are closed by now; the trainer keeps a normal exit, which DataLoader and
    compile workers need."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank must call it; one tiny all-reduce)."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def load_everywhere(load: Callable[[], T], what: str) -> T:
    """Collective: ``load()`` on every rank (weights, a codec, the data); if it fails on any rank,
    that rank raises its own error and every other rank a ConfigError saying so, instead of
    waiting in the next collective until the process-group timeout."""
    error: Exception | None = None
    try:
        value = load()
    except Exception as err:  # noqa: BLE001 - whatever it is, every rank must hear of it
        error = err
    if any_rank(error is not None):
        if error is not None:
            raise error
        from mdt_ds.config import ConfigError

        raise ConfigError(f"could not load {what}: it failed on another rank (see its log)")
    return value


def load_on_main(load: Callable[[], T], what: str) -> T:
    """Collective: ``load()`` on rank 0 alone, its result (picklable) on every rank; if it fails,
    rank 0 raises its own error and every other rank a ConfigError saying so."""
    value, failed = None, False
    if is_main():
        try:
            value = load()
        except Exception:
            failed = True
            from_main((None, True))  # the others learn of it first, then the error goes up here
            raise
    value, failed = from_main((value, failed))
    if failed:
        from mdt_ds.config import ConfigError

        raise ConfigError(f"could not load {what}: it failed on rank 0 (see its log)")
    return value


def from_main(value: object) -> object:
    """Rank 0's ``value`` on every rank (every rank must call it): decisions that must not
    differ between ranks (which checkpoint to resume, whether the run directory is free) are
    taken once, on rank 0, instead of by each rank reading a shared disk at its own moment."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return value
    box = [value if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def gather_objects(value: object) -> list[object]:
    """Every rank's ``value``, in rank order, on every rank (every rank must call it; small
    picklable values: records, names)."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return [value]
    out: list[object] = [None] * world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def usable_cpus() -> list[int]:
    """The CPU cores this process may run on (its affinity: what Slurm's binding or taskset left it)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def mean_across_ranks(values: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Average scalars over ranks in one float64 all-reduce (every rank must call it)."""
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if torch.distributed.is_initialized() and world_size() > 1:
        backend = torch.distributed.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        stacked = stacked.to(device)
        torch.distributed.all_reduce(stacked)
        stacked = stacked.cpu() / world_size()
    return dict(zip(keys, stacked.tolist()))


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, rank, step, ...): stable across runs, machines and Python hash
    salts, and uncorrelated between neighbouring inputs."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int, rank: int = 0, step: int = 0) -> int:
    """Seed torch's CPU and CUDA generators from (seed, rank, step); returns the derived seed."""
    derived = derive_seed(seed, rank, step)
    torch.manual_seed(derived)
    return derived
