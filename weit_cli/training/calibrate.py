"""BatchNorm recalibration: a materialized size whose running statistics were never observed gets them
from a short pass over data, as universally slimmable networks do (Yu & Huang, 2019).

Resizing copies, tiles or mixes the bundle's running statistics; they are exact for lossless growth
(integer width tiling, identity depth) but wrong wherever the activations change (shrinking, depth
interpolation, `tile-nodiv`, fitted scalers). Recalibration replaces them with the cumulative average
over a few training-mode forward passes; no weight changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from weit_cli.errors import InputError, WeitError

STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    dataset,
    batches: int = 20,
    batch_size: int = 64,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain average over
    `batches` seeded random batches of `dataset` (images first in each item). Only the BatchNorms run
    in training mode (dropout and drop-path stay off); the model is left in eval mode.

    Returns how many batches and images were used."""
    if batches < 1 or batch_size < 2:
        raise WeitError(
            f"calibration needs at least 1 batch of 2 or more images, got {batches} × {batch_size}",
            "pass --calibrate-batches 1 or more",
        )
    bns = batchnorms(model)
    if not bns:
        raise WeitError("the model has no BatchNorm statistics to calibrate", "leave out --calibrate")
    n = len(dataset)
    if n < 2:
        raise InputError(f"the calibration data has {n} image(s)", "BatchNorm statistics need at least 2 images per batch")
    size = min(batch_size, n)
    # Full batches only: a short last batch would weigh as much as a full one in the average.
    steps = min(batches, max(1, n // size))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    images = dataset.tensors[0] if hasattr(dataset, "tensors") else None
    device = torch.device(device) if device is not None else next(model.parameters()).device
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
        m.train()
    try:
        for i in range(steps):
            idx = order[i * size : (i + 1) * size]
            x = images[idx] if images is not None else torch.stack([dataset[int(j)][0] for j in idx])
            model(x.to(device))
            if progress is not None:
                progress(i + 1, steps)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return {"batches": steps, "images": steps * size}


@torch.no_grad()
def recalibrated(module: nn.Module, state: dict[str, Tensor], calibrate: Callable[[nn.Module], Any]) -> tuple[dict[str, Tensor], Any]:
    """Load `state` into `module`, re-estimate its BatchNorm statistics with `calibrate(module)` (e.g.
    `recalibrate_bn` with its data bound), and return copies of the new statistics and what
    `calibrate` returned. The one place materialize, fit-scalers and pretrain get fresh statistics."""
    module.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    used = calibrate(module)
    return {k: v.detach().clone() for k, v in running_stats(module).items()}, used


def running_stats(model: nn.Module) -> dict[str, Tensor]:
    """The state-dict entries of every BatchNorm's running statistics."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(STAT_SUFFIXES)}
