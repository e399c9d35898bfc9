"""Graceful stop on SIGUSR1 / SIGTERM (Slurm's warning signal, preemption, scancel).

The handler only sets a flag; the trainer reads it at the next step boundary, all ranks agree,
a checkpoint is written collectively, and control returns to the launcher, which requeues."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    """Set by a signal; ``install()`` chains nothing and restores the old handlers on ``restore()``."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is None:
            log.warning("received %s: stopping at the next step boundary", signal.Signals(signum).name)
        self.signal = signum

    def install(self) -> StopFlag:
        for sig in SIGNALS:
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
