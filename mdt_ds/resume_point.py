"""Which checkpoint a run resumes: the newest one whose files a resume will read all parse.

A checkpoint counts as complete only if its ``meta.json`` parses (step and layout), and, for a
resume in the same layout, every ``.pt`` archive of DeepSpeed's and the EMA shards opens (a
truncated zip fails on its central directory); for a resume in another layout (world size, ZeRO
stage), its universal form: ``index.json`` parses, covers every parameter, and every rank's
safetensors header holds the fragments the index names. A checkpoint that fails is skipped with a
warning that names the file and why, and left where it is; the newest one that passes is resumed.
Rank 0 decides and broadcasts (:func:`agreed_resume_point`).
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

from mdt_ds import dist
from mdt_ds.checkpoint import (
    STEP_DIR,
    ResumeError,
    checkpoint_root,
    has_universal,
    layout_changed,
    read_meta,
    step_of,
)

log = logging.getLogger(__name__)


def meta_problem(path: Path) -> str | None:
    """Why ``path/meta.json`` cannot be read as a checkpoint's record (None: it can)."""
    file = path / "meta.json"
    try:
        text = file.read_text()
    except OSError as err:
        return f"{file} cannot be read ({err.strerror})"
    if not text.strip():
        return f"{file} is empty"
    try:
        meta = json.loads(text)
    except ValueError as err:
        return f"{file} is not valid JSON ({err}; a truncated write?)"
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("step", "world_size")):
        return f"{file} lacks the step or the world size"
    return None


def archive_problem(path: Path) -> str | None:
    """The first ``.pt`` file of the checkpoint that does not open as a zip archive (torch.save's
    format), or None."""
    files = sorted(path.glob("*.pt"))
    if not files:
        return f"{path} holds no .pt files (DeepSpeed's state)"
    for file in files:
        try:
            with zipfile.ZipFile(file):
                pass
        except (OSError, zipfile.BadZipFile) as err:
            return f"{file} is damaged ({err})"
    return None


def checkpoint_problem(path: Path, world_size: int, zero_stage: int) -> str | None:
    """Why a resume with this layout cannot read checkpoint ``path`` (None: it can)."""
    from mdt_ds.universal import universal_problem

    problem = meta_problem(path)
    if problem is not None:
        return problem
    if layout_changed(read_meta(path), world_size, zero_stage):
        return universal_problem(path) if has_universal(path) else f"{path} has no world-size-independent form"
    return archive_problem(path)


def resume_point(run_dir: Path, world_size: int, zero_stage: int) -> Path | None:
    """The newest checkpoint a resume with this layout can read (None: a new run). Skipped
    ones are named with the reason; one skipped only for want of the universal form (written
    into every universal_every-th checkpoint) is named with the steps given up and how to keep
    them; none readable at all is one ResumeError naming every problem."""
    root = checkpoint_root(run_dir)
    found = sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file()),
                   key=step_of, reverse=True) if root.is_dir() else []
    problems: list[tuple[Path, str]] = []
    for path in found:
        problem = checkpoint_problem(path, world_size, zero_stage)
        if problem is None:
            _explain_skipped(problems, path)
            if not layout_changed(read_meta(path), world_size, zero_stage):
                _check_spare_universal(path)
            return path
        problems.append((path, problem))
    if not problems:
        return None
    raise ResumeError(f"no checkpoint under {root} can be resumed with {world_size} processes and "
                      f"zero_stage={zero_stage}: " + "; ".join(f"{p.name}: {why}" for p, why in problems)
                      + _way_out(problems, run_dir))


def _explain_skipped(problems: list[tuple[Path, str]], chosen: Path) -> None:
    for path, problem in problems:
        given_up = step_of(path) - step_of(chosen)
        if problem.endswith("has no world-size-independent form"):
            meta = read_meta(path)
            log.warning("resuming from %s, the newest checkpoint with the world-size-independent form: %s (step %d) "
                        "has only its %d-process ZeRO-%s layout. To keep its %d steps, resume with %d processes and "
                        "zero_stage=%s instead.", chosen.name, path.name, step_of(path), meta["world_size"],
                        meta.get("zero_stage"), given_up, meta["world_size"], meta.get("zero_stage"))
        else:
            log.warning("skipping %s: %s. Resuming from %s instead (%d steps earlier); the skipped checkpoint is left "
                        "in place for inspection and is replaced when the run reaches step %d again.", path.name,
                        problem, chosen.name, given_up, step_of(path))


def _check_spare_universal(path: Path) -> None:
    """A resume in the same layout does not read the universal form: say now if it is broken,
    not on the day a resume on another number of GPUs needs it."""
    from mdt_ds.universal import universal_problem

    problem = universal_problem(path) if has_universal(path) else None
    if problem is not None:
        log.warning("%s: its world-size-independent form is damaged (%s); a resume on another number of GPUs or "
                    "ZeRO stage would fall back to an older checkpoint", path.name, problem)


def _way_out(problems: list[tuple[Path, str]], run_dir: Path) -> str:
    path = problems[0][0]
    if all(why.endswith("has no world-size-independent form") for _, why in problems):
        meta = read_meta(path)
        return (f". Resume with {meta['world_size']} processes and zero_stage={meta.get('zero_stage')}, or start a "
                f"new run from the weights: `python -m mdt_ds.tools.convert_checkpoint {path} OUT.pt` then "
                "init_from=OUT.pt (optimizer state restarts).")
    return f". Move the damaged checkpoints out of {run_dir / 'checkpoints'} to start the run over."


def agreed_resume_point(run_dir: Path, world_size: int, zero_stage: int) -> Path | None:
    """Collective: rank 0's :func:`resume_point`, the same on every rank. Ranks that each read
    the disk can disagree (a second job publishing meanwhile, a slow shared filesystem), and
    then wait in different collectives until the timeout."""
    name = dist.load_on_main(lambda: _name_of(resume_point(run_dir, world_size, zero_stage)), "the checkpoint to resume")
    return None if name is None else checkpoint_root(run_dir) / name


def _name_of(path: Path | None) -> str | None:
    return None if path is None else path.name
