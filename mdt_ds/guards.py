"""Bad-step bookkeeping for ``max_bad_steps > 0``: which steps are bad, and when the run may
publish again.

A step is bad when its loss is NaN/inf on some rank, or *exploding*: its mean over the ranks is
more than ``explode_factor`` times the median of the last :data:`HISTORY` good steps' losses (a
diverging run can stay finite for a step or two while it wrecks the weights: at lr 1e6 the
second step's loss was 5.5e14). Bad steps are skipped (never applied). After one, the run is
"pending" until :data:`RECOVERY_STEPS` good steps in a row have passed: no checkpoint or EMA
snapshot is published meanwhile, so the last published checkpoint is always one saved before
the streak, and the divergence message can call it the last good one.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

HISTORY = 50  # good steps whose losses make the running median
RECOVERY_STEPS = 50  # good steps in a row after a bad one before the run publishes again


class StepGuard:
    """The verdict on each step's loss and the publishing block that bad steps leave."""

    def __init__(self, max_bad_steps: int, explode_factor: float):
        self.max_bad_steps = max_bad_steps
        self.explode_factor = explode_factor
        self.recent: deque[float] = deque(maxlen=HISTORY)
        self.bad_steps = 0
        self.first_bad_step: int | None = None
        self.good_in_a_row = RECOVERY_STEPS  # nothing pending at the start

    def verdict(self, mean_loss: float, finite: bool) -> str:
        """"ok", "non-finite" or "exploding"; an ok loss joins the running median."""
        if not finite or not math.isfinite(mean_loss):
            return "non-finite"
        if self.explode_factor and self.recent and mean_loss > self.explode_factor * self.median():
            return "exploding"
        self.recent.append(mean_loss)
        return "ok"

    def median(self) -> float:
        return statistics.median(self.recent)

    def record(self, step: int, verdict: str) -> bool:
        """Count step ``step``'s verdict; True when the bad steps exceed ``max_bad_steps``."""
        if verdict == "ok":
            self.good_in_a_row += 1
            return False
        self.bad_steps += 1
        self.good_in_a_row = 0
        if self.first_bad_step is None:
            self.first_bad_step = step
        return self.bad_steps > self.max_bad_steps

    def describe(self, verdict: str, mean_loss: float) -> str:
        if verdict == "exploding":
            return (f"exploding: loss {mean_loss:.4g} is {mean_loss / self.median():.3g}x the median "
                    f"{self.median():.4g} of the last {len(self.recent)} good steps (explode_factor={self.explode_factor:g})")
        return "non-finite"

    def publish_blocked(self) -> str | None:
        """Why nothing may be published now (None: it may)."""
        if self.good_in_a_row >= RECOVERY_STEPS:
            return None
        return (f"{self.bad_steps} bad step(s) skipped, the last {self.good_in_a_row} step(s) ago; checkpoints and "
                f"EMA snapshots are published again after {RECOVERY_STEPS} good steps in a row")
