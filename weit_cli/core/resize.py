"""Resizing rules (docs/method.md §4), architecture-agnostic.

Depth rules map a target layer index to source layers; width rules map target channels (or scaler
block rows/columns) to source ones. Both are index maps plus weights, so they are differentiable and
serve pretraining's nested prefixes as well as `materialize`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from weit_cli.errors import WeitError

if TYPE_CHECKING:
    from torch import Tensor

DepthRule = Literal["auto", "prefix", "interp", "stack", "interleave", "identity"]
WidthRule = Literal["tile", "tile-nodiv"]
DEPTH_RULES = ("auto", "prefix", "interp", "stack", "interleave", "identity")
WIDTH_RULES = ("tile", "tile-nodiv")


@dataclass(frozen=True)
class LayerSource:
    """Target layer = Σ weight·source layer; `zero_residual` marks a new identity block."""

    sources: tuple[tuple[int, float], ...]
    zero_residual: bool = False


def depth_plan(old: int, new: int, rule: str) -> list[LayerSource]:
    """Which source layers each of `new` target layers comes from."""
    if new < 1:
        raise WeitError(f"depth must be at least 1, got {new}", "pass --depth 1 or more")
    if rule == "auto":
        rule = "prefix" if new <= old else "interp"
    if rule == "prefix":
        if new > old:
            raise WeitError(
                f"depth rule 'prefix' cannot grow {old} layers to {new}",
                "use --depth-rule interp, stack, interleave or identity to grow",
            )
        return [LayerSource(((i, 1.0),)) for i in range(new)]
    if rule == "interp":
        out = []
        for i in range(new):
            pos = 0.0 if new == 1 else i * (old - 1) / (new - 1)
            lo = int(pos)
            frac = pos - lo
            if frac < 1e-9 or lo + 1 >= old:
                out.append(LayerSource(((min(lo, old - 1), 1.0),)))
            else:
                out.append(LayerSource(((lo, 1.0 - frac), (lo + 1, frac))))
        return out
    if rule == "stack":
        return [LayerSource(((i % old, 1.0),)) for i in range(new)]
    if rule == "interleave":
        return [LayerSource(((i * old // new, 1.0),)) for i in range(new)]
    if rule == "identity":
        if new <= old:
            return depth_plan(old, new, "prefix")
        # Each source layer keeps its place; the added blocks follow the layer they copy, with their
        # residual branches zeroed, so the grown network computes the same function.
        plan, prev = [], None
        for i in range(new):
            src = i * old // new
            plan.append(LayerSource(((src, 1.0),), zero_residual=src == prev))
            prev = src
        return plan
    raise WeitError(f"unknown depth rule '{rule}'", f"choose one of: {', '.join(DEPTH_RULES)}")


def mix_layers(tensors: list[Tensor], src: LayerSource) -> Tensor:
    out = None
    for idx, w in src.sources:
        term = tensors[idx] if w == 1.0 else tensors[idx] * w
        out = term if out is None else out + term
    return out


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


def width_index(old: int, new: int, runs: int = 1) -> Tensor:
    """Target position → source position: prefix when shrinking, cyclic tiling when growing."""
    import torch

    base = torch.arange(new) % old
    return torch.cat([base + r * old for r in range(runs)]) if runs > 1 else base


def resize_axis(x: Tensor, dim: int, old: int, new: int, *, runs: int = 1, divide: bool = False) -> Tensor:
    """Resize one dimension holding `runs` runs of `old` units to runs of `new` units."""
    import torch

    if old == new:
        return x
    if x.shape[dim] != runs * old:
        raise ValueError(f"dimension {dim} has {x.shape[dim]} entries, expected {runs}×{old}")
    idx = width_index(old, new, runs).to(x.device)
    out = x.index_select(dim, idx)
    if divide and new > old:
        counts = torch.bincount(idx, minlength=runs * old).to(x.dtype)[idx]
        shape = [1] * x.dim()
        shape[dim] = -1
        out = out / counts.reshape(shape)
    return out


def resize_width(
    x: Tensor,
    axes: list[Axis],
    old: dict[str, int],
    new: dict[str, int],
    rule: str = "tile",
    unit: dict[int, int] | None = None,
) -> Tensor:
    """Resize every listed axis of `x`. `unit[dim]` is how many channels one index spans (a scaler
    grid's block size); sizes in `old`/`new` are in channels."""
    if rule not in WIDTH_RULES:
        raise WeitError(f"unknown width rule '{rule}'", f"choose one of: {', '.join(WIDTH_RULES)}")
    unit = unit or {}
    for ax in axes:
        u = unit.get(ax.dim, 1)
        o, n = old[ax.name] // u, new[ax.name] // u
        x = resize_axis(x, ax.dim, o, n, runs=ax.runs, divide=ax.role == "in" and rule == "tile")
    return x
