"""What a training loop reports after each step (`StepInfo`), the steps/s and ETA meter, and plain
progress lines for logs. Nothing here prints unless the CLI turns the lines on (`plain_lines`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


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


# ---------------------------------------------------------------------------------------------- plain lines for logs
# When stderr is no terminal (CI, `> log 2>&1`) the CLI has no progress bar to draw; it turns these on
# so that a log gets a line every few seconds and work can be told from a hang. Off (silent) when weit
# is used as a library.
_PLAIN: dict[str, Any] = {"write": None, "interval": 10.0}


def plain_lines(write: Callable[[str], None] | None, interval: float = 10.0) -> None:
    """Send progress lines to `write` (None: silence), a step line at most every `interval` seconds."""
    _PLAIN["write"], _PLAIN["interval"] = write, max(0.1, float(interval))


def interval() -> float:
    return _PLAIN["interval"]


def say(message: str) -> None:
    """One line about a phase starting (`Hopper-v5: training PPO for 120000 steps`), when lines are on."""
    write = _PLAIN["write"]
    if write is not None:
        write(message)


@contextmanager
def heartbeat(label: str) -> Iterator[None]:
    """A long phase that reports no steps (data generation, PPO, a sampler): with lines on,
    `label: N s` every interval while it runs (nothing for a phase shorter than one interval, so a
    command refused at once still writes only its error)."""
    write = _PLAIN["write"]
    if write is None:
        yield
        return
    stop, t0 = threading.Event(), time.monotonic()

    def beat() -> None:
        while not stop.wait(_PLAIN["interval"]):
            write(f"{label}: {time.monotonic() - t0:.0f} s")

    thread = threading.Thread(target=beat, name="weit-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
