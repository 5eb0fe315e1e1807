"""The vocabulary a family declares its widths in (docs/method.md §4): which tensor dimensions follow
which size (`Axis`), and which runs of a dimension a new identity block zeroes (`ZeroRuns`). The
families (`arch/`) import it; the resizing rules (`core/resize.py`) read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Axis:
    """One resizable tensor dimension: which size it follows and how.

    `name` keys the size table (e.g. 'embed', 'hidden'); `runs` splits the dimension into equal runs
    resized separately (qkv rows: q, k, v); `role='in'` marks an input axis, divided by its copy count
    when tiled (Net2Net), which keeps integer-ratio growth lossless.
    """

    dim: int
    name: str
    role: Literal["in", "out"] = "out"
    runs: int = 1


@dataclass(frozen=True)
class ZeroRuns:
    """Zero some of the `runs` equal runs of one dimension of a tensor: for a block whose residual
    branches are closed by part of a tensor rather than all of it (adaLN-Zero's gate chunks of the
    modulation matrix, whose shift and scale chunks an added block keeps). Equal runs of the dense rows
    are equal runs of a scaler grid's rows too, so one spec serves both."""

    runs: int
    zero: tuple[int, ...]

    def __call__(self, x: Tensor, dim: int = 0) -> Tensor:
        import torch

        if x.shape[dim] % self.runs:
            raise ValueError(f"dimension {dim} has {x.shape[dim]} entries, not {self.runs} equal runs")
        parts = list(x.split(x.shape[dim] // self.runs, dim))
        for r in self.zero:
            parts[r] = torch.zeros_like(parts[r])
        return torch.cat(parts, dim)
