"""The optimiser and its schedule: AdamW with a no-decay group, linear warmup + cosine, gradient clipping,
and one optimiser step (training/loop.py refuses a non-finite loss)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def adamw(
    named_params: dict[str, Tensor] | list[tuple[str, Tensor]],
    *,
    lr: float,
    weight_decay: float,
    no_decay_keys: tuple[str, ...],
    betas: tuple[float, float] = (0.9, 0.999),
    lr_scale: Callable[[str], float] | None = None,
) -> torch.optim.AdamW:
    """AdamW with two groups, as in timm's training scripts: group 0 decays; group 1 does not — every
    vector (norms, biases) and every name ending in one of `no_decay_keys` (the family's
    `Adapter.no_decay`, e.g. its position embedding). Required, so that no caller forgets it.

    `lr_scale(name)` gives parameters their own multiple of the learning rate: each of the two groups
    is split by it, and a split-off group carries its `lr_scale`, which `set_lr` applies."""
    items = list(named_params.items()) if isinstance(named_params, dict) else list(named_params)
    no_decay = lambda n, p: p.ndim <= 1 or n.endswith(tuple(no_decay_keys))  # noqa: E731
    scale = lr_scale or (lambda n: 1.0)
    groups: list[dict] = []
    for decays, wd in ((True, weight_decay), (False, 0.0)):
        by_scale: dict[float, list[Tensor]] = {1.0: []}  # the plain group first, even when empty (as before)
        for n, p in items:
            if p.requires_grad and no_decay(n, p) != decays:
                by_scale.setdefault(float(scale(n)), []).append(p)
        for s, params in by_scale.items():
            if s == 1.0:
                groups.append({"params": params, "weight_decay": wd})
            elif params:
                groups.append({"params": params, "weight_decay": wd, "lr_scale": s})
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=False)


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for 0-based `step`: linear warmup to `base_lr`, then cosine down to base·ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_grad(params, max_norm: float) -> None:
    """Clip the global gradient norm to `max_norm` (≤ 0: no clipping, and no norm computed: nothing
    reads it)."""
    if not max_norm or max_norm <= 0:
        return
    params = [p for p in params if p.grad is not None]
    if params:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)


def optimizer_step(optimizer, loss: Tensor, params, *, max_norm: float) -> float:
    """zero_grad → backward → clip → step; returns the loss (the caller refuses a non-finite one)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_grad(params, max_norm)
    optimizer.step()
    return float(loss.detach())
