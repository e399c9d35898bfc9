"""Checkpoints: full training state for resume, and small EMA snapshots for sampling.

Layout of a run directory::

    checkpoints/step_0005000/       DeepSpeed state (model, optimizer, LR schedule) + per-rank EMA
                 universal/          the same state in a world-size-independent form (elastic resume):
                                     every universal_every-th checkpoint, and those of a stop and the end
                 meta.json           written last: step, layout, data position; its presence = complete
    snapshots/ema_0005000.pt         EMA weights, raw state_dict with the official key names
    snapshots/config.json

Publishing order (a crash at any point leaves the previous checkpoint intact and used):
every rank writes into ``step_XXXXXXX.tmp`` and fsyncs its files; the ranks agree that all
writes succeeded; the EMA snapshot of that step is written (so a published checkpoint never
lacks its snapshot); rank 0 writes ``meta.json``, fsyncs, renames the folder and prunes.
Leftover ``.tmp`` folders of a crashed save are removed at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from mdt_ds import dist
from mdt_ds.config import TrainConfig, save_config

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{7,})$")
SNAPSHOT = re.compile(r"^ema_(\d{7,})\.(pt|safetensors)$")
GiB = 1024**3


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed as asked; the message says why and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); the previous one is intact."""


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def find_latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a ``step_*`` directory with ``meta.json``), or None."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return max(done, key=step_of, default=None)


def remove_stale(run_dir: Path) -> list[str]:
    """Rank 0, at start-up (under the run lock): ``.tmp`` leftovers of crashed saves."""
    stale = [p for d in (checkpoint_root(run_dir), run_dir / "snapshots") if d.is_dir() for p in d.iterdir()
             if p.name.endswith(".tmp")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished file(s) of an interrupted save: %s", len(stale),
                 ", ".join(p.name for p in stale))
    return [p.name for p in stale]


# --------------------------------------------------------------------------- disk
def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_bytes(path: Path) -> int:
    path = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(path).free


def estimate_bytes(num_params: int, precision: str, optimizer: str) -> dict[str, int]:
    """What one checkpoint and one snapshot take before the first one is measured: module
    weights, fp32 master, optimizer moments (Adan 4, AdamW 2 per parameter) and EMA in DeepSpeed's
    files and the EMA shards ("checkpoint"), and the fp32 master, moments and EMA again in the
    universal form ("universal", written into some checkpoints only)."""
    low = 2 if precision in ("bf16", "fp16") else 4  # bf16-amp keeps fp32 parameters
    moments = 4 if optimizer == "adan" else 2
    return {"checkpoint": num_params * (low + 4 + 4 * moments + 4), "universal": num_params * 4 * (moments + 2),
            "snapshot": num_params * 4}


def has_universal(path: Path) -> bool:
    """Whether checkpoint ``path`` holds the world-size-independent form (its index is written last)."""
    return (path / "universal" / "index.json").is_file()


def measured_bytes(path: Path) -> dict[str, int]:
    """A written checkpoint's size, its universal form apart."""
    universal = tree_bytes(path / "universal") if has_universal(path) else 0
    return {"checkpoint": tree_bytes(path) - universal, **({"universal": universal} if universal else {})}


class DiskFullError(CheckpointError):
    """The next checkpoint cannot fit; found before a byte is written (the user frees space)."""


def human_bytes(count: float) -> str:
    """Bytes in the unit that shows them with three significant digits: 21.7 MiB, 1.80 GiB."""
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= size:
            return f"{count / size:.3g} {unit}"
    return f"{int(count)} bytes"


def what_exists(run_dir: Path) -> str:
    """What a stop now leaves to resume from, for messages about a save that did not happen."""
    latest = find_latest(run_dir)
    if latest is None:
        return "no checkpoint has been written yet: a stop now loses the run's steps so far"
    return f"the last checkpoint, {latest.name}, is intact and resumable"


def check_free_space(run_dir: Path, need: int, first: bool = False) -> None:
    """Collective: refuse a save that cannot fit (on any rank's filesystem), before a byte is
    written, so the previous checkpoint stays the latest and intact. ``first``: the check at
    the start of a run, for the largest save it will make."""
    free = free_bytes(checkpoint_root(run_dir))
    short = free < need
    if dist.any_rank(short):
        where = (f"{checkpoint_root(run_dir)} has {human_bytes(free)} free" if short
                 else "another rank's filesystem has less free")
        what = "this run's checkpoints" if first else "the next checkpoint"
        raise DiskFullError(
            f"not enough disk space for {what}: one needs about {human_bytes(need)} and {where}. Free space, move "
            f"run_dir, or lower keep_ckpts / keep_snapshots; {what_exists(run_dir)}."
        )


def _describe_write_error(err: BaseException, where: Path, what: str = "checkpoint") -> str:
    nospace = isinstance(err, OSError) and err.errno == errno.ENOSPC
    # torch.save's C++ writer reports a full disk as "basic_ios::clear" / "unexpected pos": ask the disk.
    nospace = nospace or free_bytes(where) < 1 << 20
    reason = "no space left on device" if nospace else f"{type(err).__name__}: {err}"
    # ``where`` is RUN_DIR/checkpoints/step_X.tmp or RUN_DIR/snapshots/ema_X.pt.tmp
    return f"writing the {what} under {where} failed ({reason}); {what_exists(where.parent.parent)}"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Per-rank files: DeepSpeed's ZeRO shards ``[bf16_]zero_pp_rank_{r}_mp_rank_00_*.pt``, our
# ``ema_rank{r:05d}.pt`` and ``universal/rank{r:05d}.safetensors``. Everything else (DeepSpeed's
# ``mp_rank_00_model_states.pt``: mp_rank is the model-parallel rank, not ours) is rank 0's.
PER_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_|(?:^|_)rank(\d{5})\.")


def is_own_file(name: str, rank: int) -> bool:
    """Whether this rank wrote the checkpoint file ``name`` (rank 0: also the shared ones)."""
    found = PER_RANK_FILE.search(name)
    if found is None:
        return rank == 0
    return int(found.group(1) or found.group(2)) == rank


def _fsync_own_files(tmp: Path, rank: int) -> None:
    """fsync what this rank wrote: a shared filesystem flushes a file from the client that wrote it."""
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        if is_own_file(path.name, rank):
            fsync_path(path)


# --------------------------------------------------------------------------- save
@contextlib.contextmanager
def _write_errors_kept(engine) -> Iterator[list[BaseException]]:
    """DeepSpeed's ``save_checkpoint`` runs collectives between its writes (tag validation, a
    final barrier). A rank whose write fails would skip them and meet its peers in a different
    collective: on NCCL a hang or wrong results. All of DeepSpeed's checkpoint I/O goes through
    ``engine.checkpoint_engine.save/makedirs`` (``save_latest=False``: no ``latest`` file), so
    the first failure is kept (yielded list), later writes of that save are skipped, and the
    collectives run in order; the caller raises the kept error once DeepSpeed has returned."""
    io, kept = engine.checkpoint_engine, []

    def guarded(write: Callable) -> Callable:
        def call(*args, **kwargs):
            if not kept:
                try:
                    return write(*args, **kwargs)
                except (OSError, RuntimeError) as err:
                    kept.append(err)
            return None

        return call

    for name in ("save", "makedirs"):
        setattr(io, name, guarded(getattr(io, name)))
    try:
        yield kept
    finally:
        for name in ("save", "makedirs"):
            delattr(io, name)  # the class's own method again


def _agree_on(error: BaseException | None, tmp: Path) -> None:
    """Collective: if any rank failed, every rank raises, after the partial folder is removed."""
    if not dist.any_rank(error is not None):
        return
    if isinstance(error, CheckpointError):
        message = str(error)
    else:
        message = _describe_write_error(error, tmp) if error else "another rank failed to write its part (see its log)"
    if dist.is_main():  # every rank is done writing: give the partial folder's space back
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(message) from error


def save_training_state(
    engine,
    ema,
    run_dir: Path,
    step: int,
    keep: int = 3,
    meta: dict | None = None,
    before_publish: Callable[[], None] | None = None,
    universal: bool = True,
) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint directory. ``meta``
    joins ``meta.json``; ``before_publish`` (every rank) runs once all writes have succeeded;
    ``universal`` adds the world-size-independent form (the fp32 master, moments and EMA again).
    A write error on any rank (or in ``before_publish``) raises CheckpointError on every rank:
    each rank's writes are kept apart from the collectives, so all ranks always run the same
    collectives in the same order."""
    from mdt_ds.universal import write_fragments, write_index

    root = checkpoint_root(run_dir)
    tag = f"step_{step:07d}"
    tmp = root / f"{tag}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    error: BaseException | None = None
    mine: dict = {}
    try:
        with _write_errors_kept(engine) as kept:
            engine.save_checkpoint(str(root), tag=tmp.name, client_state={"step": step}, save_latest=False)
        if kept:
            raise kept[0]
        torch.save(ema.state_dict(), tmp / f"ema_rank{dist.rank():05d}.pt")
        if universal:
            mine = write_fragments(engine, ema, tmp)
    except (OSError, RuntimeError) as err:
        error = err
    _agree_on(error, tmp)
    try:
        if universal:
            write_index(engine, tmp, mine)  # its gather first, then rank 0's index.json
        _fsync_own_files(tmp, dist.rank())
        if before_publish is not None:
            before_publish()
    except (OSError, RuntimeError) as err:  # CheckpointError (the snapshot) is a RuntimeError
        error = err
    _agree_on(error, tmp)
    final = root / tag
    if dist.is_main():
        try:
            _publish(tmp, final, {"step": step, "world_size": dist.world_size(),
                                  "zero_stage": engine.zero_optimization_stage(), "universal": universal,
                                  **(meta or {})})
        except OSError as err:
            error = err
    _agree_on(error, tmp)  # also the barrier: no rank goes on before the checkpoint is published
    if dist.is_main():
        try:
            prune(root, keep)
        except OSError as err:  # the new checkpoint is published: a failed cleanup must not stop the run
            log.warning("could not remove old checkpoints under %s: %s", root, err)
    return final


def _publish(tmp: Path, final: Path, record: dict) -> None:
    """Rank 0: ``meta.json`` last (its presence marks a complete checkpoint), fsync, rename."""
    (tmp / "meta.json").write_text(json.dumps(record) + "\n")
    fsync_path(tmp / "meta.json")
    fsync_path(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(final.parent)


def prune(root: Path, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest complete checkpoints (0: keep all), and never the
    newest one with the universal form while no kept one has it: it is what a resume on another
    number of GPUs falls back to."""
    done = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name)), key=step_of)
    old = done[:-keep] if keep > 0 else []
    if not any(has_universal(p) for p in done[len(old):]):
        old = [p for p in old if p != next((q for q in reversed(old) if has_universal(q)), None)]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in old]


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def layout_changed(meta: dict, world_size: int, zero_stage: int) -> bool:
    return meta["world_size"] != world_size or meta.get("zero_stage", zero_stage) != zero_stage


def _own_files(folder: Path, rank: int) -> list[Path]:
    """The ``.pt`` files of ``folder`` this rank wrote (rank 0: also the shared ones)."""
    return [p for p in sorted(folder.rglob("*.pt")) if is_own_file(p.name, rank)]


def _agree_files_are_safe(path: Path) -> None:
    """Collective: each rank opens its own files weights-only (memory-mapped: the pickle is read,
    the tensor bytes are not) before DeepSpeed's load. A refused or unreadable file on one rank
    then stops every rank with the reason, instead of leaving the others waiting in the load's
    collectives until the process-group timeout."""
    from mdt_ds.safe_load import UnsafeCheckpointError, deepspeed_weights_only

    error: Exception | None = None
    try:
        with deepspeed_weights_only():
            for file in _own_files(path, dist.rank()):
                torch.load(file, map_location="cpu", mmap=True)
    except (UnsafeCheckpointError, OSError, RuntimeError) as err:
        error = err
    if dist.any_rank(error is not None):
        if error is not None:
            raise error
        raise ResumeError(f"another rank refused its files of {path} (see its log)")


def load_training_state(engine, ema, path: Path) -> int:
    """Collective: restore model, optimizer, LR schedule and EMA; returns the step to resume at.
    Same layout: DeepSpeed's own files (bit-exact); another layout: the universal form."""
    from mdt_ds.safe_load import deepspeed_weights_only

    meta = read_meta(path)
    if layout_changed(meta, dist.world_size(), engine.zero_optimization_stage()):
        from mdt_ds.universal import load_universal

        summary = load_universal(engine, ema, path)
        log.info("resumed %s in a new layout: %d processes ZeRO-%s -> %d processes ZeRO-%d (%s)", path.name,
                 meta["world_size"], meta.get("zero_stage"), dist.world_size(), engine.zero_optimization_stage(),
                 summary)
        return int(meta["step"])
    _agree_files_are_safe(path)
    with deepspeed_weights_only():
        load_path, client = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if load_path is None:
        raise ResumeError(f"DeepSpeed could not load {path}")
    # The shards hold this rank's fp32 slices; map them straight onto the device the run trains
    # on (not the device they were saved from, which may be another GPU index or absent).
    # (Not shadow[0]'s device: a rank that owns no slice of the first parameter holds an empty CPU
    # placeholder there.)
    device = ema.engine.device
    shard = path / f"ema_rank{dist.rank():05d}.pt"
    ema.load_state_dict(torch.load(shard, map_location=device, weights_only=True))
    return int(client["step"])


# --------------------------------------------------------------------------- snapshots
def snapshot_suffixes(fmt: str) -> tuple[str, ...]:
    return {"pt": (".pt",), "safetensors": (".safetensors",), "both": (".pt", ".safetensors")}[fmt]


def save_ema_snapshot(
    state_dict: dict[str, torch.Tensor], cfg: TrainConfig, run_dir: Path, step: int
) -> Path:
    """Rank 0 only: ``snapshots/ema_XXXXXXX.pt`` (a raw state_dict the official code loads)
    and/or ``.safetensors`` (``snapshot_format``), the run config beside them; written under a
    ``.tmp`` name, fsynced, renamed; then all but the ``keep_snapshots`` newest are deleted."""
    from safetensors.torch import save_file

    out = run_dir / "snapshots"
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state_dict.items()}
    paths = []
    for suffix in snapshot_suffixes(cfg.snapshot_format):
        path = out / f"ema_{step:07d}{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        try:
            if suffix == ".pt":
                torch.save(state, tmp)
            else:
                save_file(state, str(tmp), metadata={"step": str(step)})
            fsync_path(tmp)
        except (OSError, RuntimeError) as err:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(_describe_write_error(err, tmp, "EMA snapshot")) from err
        os.replace(tmp, path)
        paths.append(path)
    fsync_path(out)
    save_config(cfg, out / "config.json")
    prune_snapshots(out, cfg.keep_snapshots)
    return paths[0]


def prune_snapshots(out: Path, keep: int) -> list[str]:
    """All but the ``keep`` newest snapshot steps (every format of a step goes together)."""
    steps = sorted({int(m.group(1)) for p in out.iterdir() if (m := SNAPSHOT.match(p.name))})
    old = set(steps[:-keep]) if keep > 0 else set()
    removed = [p for p in out.iterdir() if (m := SNAPSHOT.match(p.name)) and int(m.group(1)) in old]
    for path in removed:
        path.unlink(missing_ok=True)
    return sorted(p.name for p in removed)
