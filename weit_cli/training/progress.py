"""What a training loop reports after each step (`StepInfo`), and the steps/s and ETA meter. Nothing
here prints: the CLI renders the callbacks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepInfo:
    """What a training loop reports after each step (and after each validation)."""

    step: int  # steps done so far (1-based after the first step)
    total_steps: int
    loss: float
    lr: float
    steps_per_sec: float
    eta_s: float
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"val_acc_largest": 0.81}


StepCallback = Callable[[StepInfo], None]


class Throughput:
    """steps/s and ETA over the steps done in this process (a resumed run restarts the clock)."""

    def __init__(self, start_step: int, total: int):
        self.start_step, self.total, self.t0 = start_step, total, time.perf_counter()

    def __call__(self, step: int) -> tuple[float, float]:
        dt = time.perf_counter() - self.t0
        done = step - self.start_step
        sps = done / dt if dt > 0 and done > 0 else 0.0
        eta = (self.total - step) / sps if sps > 0 else float("inf")
        return sps, eta
