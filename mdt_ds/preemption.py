"""Graceful stop on SIGUSR1 / SIGTERM (Slurm's warning signal, preemption, scancel) and on a
first Ctrl-C (SIGINT).

The handler only sets a flag; the trainer reads it at the next step boundary, all ranks agree,
a checkpoint is written collectively, and control returns to the launcher, which requeues. A
second Ctrl-C stops at once (KeyboardInterrupt), without a checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # what arm_early records before training starts
STOP_SIGNALS = (*SIGNALS, signal.SIGINT)


class StopFlag:
    """Set by a signal; ``install()`` chains nothing and restores the old handlers on ``restore()``."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.interrupts = 0  # Ctrl-Cs so far: the second one stops at once
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            log.warning("Ctrl-C: finishing this step, then a checkpoint and exit 3 (rerun to resume); "
                        "Ctrl-C again stops at once, without a checkpoint")
        elif self.signal is None:
            log.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)
        self.signal = signum

    def install(self) -> StopFlag:
        early = take_early_signal()
        if early is not None and self.signal is None:
            log.warning(
                "received %s before training started: stopping at the first step boundary", signal.Signals(early).name
            )
            self.signal = early
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): no handler
                log.warning("cannot install a %s handler outside the main thread", signal.Signals(sig).name)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal is not None


# --------------------------------------------------------------------------- before train() starts
_early_signal: int | None = None


def _record_early(signum: int, frame: object) -> None:
    global _early_signal
    _early_signal = signum


def arm_early() -> dict[int, object]:
    """Record SIGUSR1/SIGTERM from process start on (``mdt-train``'s ``main`` calls it first),
    so a warning that arrives during imports or DeepSpeed's start-up neither kills the rank
    (USR1's default action) nor is lost: the next :meth:`StopFlag.install` picks it up.
    Returns the previous handlers for :func:`disarm`."""
    previous: dict[int, object] = {}
    for sig in SIGNALS:
        try:
            previous[sig] = signal.signal(sig, _record_early)
        except ValueError:  # not the main thread
            break
    return previous


def disarm(previous: dict[int, object]) -> None:
    """Put back the handlers :func:`arm_early` replaced (a late SIGTERM, e.g. the launcher ending
    the other ranks, then ends the process at once as it expects)."""
    global _early_signal
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    _early_signal = None


def take_early_signal() -> int | None:
    """The signal recorded by :func:`arm_early` since the last call (and forget it)."""
    global _early_signal
    signum, _early_signal = _early_signal, None
    return signum


# --------------------------------------------------------------------------- launcher protocol
EXIT_DIR_VAR = "MDT_EXIT_DIR"  # set by mdt-launch (mdt_ds.supervise) for the workers it supervises
WATCH_VAR = "MDT_WATCH_LAUNCHER"  # 1/0: force the launcher-death watch on/off


def register_worker(rank: int | None = None) -> Path | None:
    """Tell the supervisor (``mdt-launch``) this process is a training worker: it forwards
    warning signals to registered pids only (not to the launcher, nor to data-loader workers,
    for whom SIGUSR1 is fatal). Call after :func:`arm_early`. No supervisor: does nothing."""
    folder = os.environ.get(EXIT_DIR_VAR)
    if not folder:
        return None
    path = Path(folder) / f"pid.{os.getpid()}"
    try:
        _write_atomic(path, f"{rank if rank is not None else os.environ.get('RANK', '')}\n")
    except OSError as err:
        log.warning("cannot register with the launcher supervisor in %s: %s", folder, err)
        return None
    return path


def report_exit(code: int) -> bool:
    """Write this worker's intended exit status for the supervisor: the launchers turn an exit 3
    (preempted) into 1 (torchrun) or lose it when they kill the other ranks; the file keeps it.
    True when the supervisor has it."""
    folder = os.environ.get(EXIT_DIR_VAR)
    if folder:
        try:
            _write_atomic(Path(folder) / f"exit.{os.getpid()}", f"{int(code)}\n")
            return True
        except OSError as err:
            log.warning("cannot report exit status %d to the launcher supervisor: %s", code, err)
    return False


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def under_launcher() -> bool:
    """Whether the parent is a launcher whose death leaves this worker unsupervised (torchrun
    starts workers in their own sessions; the deepspeed launcher's launch.py dies on SIGUSR1)."""
    forced = os.environ.get(WATCH_VAR)
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes", "on")
    return any(name in os.environ for name in ("TORCHELASTIC_RUN_ID", "CROSS_RANK", EXIT_DIR_VAR))


def watch_launcher(interval_s: float = 1.0, sig: int = signal.SIGTERM) -> threading.Thread | None:
    """Stop gracefully when the launcher dies: a daemon thread polls the parent pid and, when
    the process has been re-parented (the launcher is gone: killed by a SIGUSR1 it does not
    handle, OOM, ``kill -9``), sends ``sig`` to this process once, so the trainer checkpoints at
    the next step boundary and exits instead of training on with nobody to collect it. The
    other ranks agree at the same boundary (the stop flag is all-reduced)."""
    parent = os.getppid()
    if parent <= 1:
        return None

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                log.warning("the launcher (pid %d) is gone: stopping at the next step boundary", parent)
                os.kill(os.getpid(), sig)
                return

    thread = threading.Thread(target=watch, name="mdt-launcher-watch", daemon=True)
    thread.start()
    return thread
