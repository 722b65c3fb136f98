"""The stepped learning-rate schedule: ``[epoch, lr]`` pairs, an optional linear warm-up.

The position is the number of completed epochs, fractional: step ``s`` of an epoch of ``n`` steps is at
``s / n``. ``[[0, 3e-4], [7, 1e-4]]`` gives 3e-4 for the first 7 epochs and 1e-4 from the first step of
the 8th epoch ("1e-4 after epoch 7"). The lr is a pure function of the step, so resuming needs only the
step count.
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence


class StepSchedule:
    def __init__(self, table: Sequence[Sequence[float]], steps_per_epoch: int, warmup_epochs: float = 0.0,
                 warmup_start: float = 0.1):
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1")
        self.steps_per_epoch = steps_per_epoch
        # Boundaries in steps (integers), so that epoch boundaries are exact, fractional epochs too.
        self.bounds = [round(float(e) * steps_per_epoch) for e, _ in table]
        self.lrs = [float(lr) for _, lr in table]
        self.warmup_steps = int(math.ceil(warmup_epochs * steps_per_epoch))
        self.warmup_start = warmup_start

    def lr_at(self, step: int) -> float:
        """The lr used by the optimizer step that follows ``step`` completed steps."""
        i = bisect.bisect_right(self.bounds, step) - 1
        lr = self.lrs[max(i, 0)]
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            lr *= self.warmup_start + (1.0 - self.warmup_start) * frac
        return lr

    def total_steps(self, epochs: float) -> int:
        return int(round(epochs * self.steps_per_epoch))
