"""Data-free extraction (docs/method.md §3): a bundle from a dense state, one shared truncated SVD
per template type."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import weit_cli.core.kron as kron
from weit_cli.core.bundle import Bundle
from weit_cli.core.checks import check_state, natural
from weit_cli.errors import WeitError

if TYPE_CHECKING:
    from torch import Tensor

    from weit_cli.arch.base import Adapter


def from_dense(
    adapter: Adapter, arch: Any, state: dict[str, Tensor], template_size: int | None, num_templates: int | dict[str, int]
) -> tuple[Bundle, dict[str, float]]:
    """Data-free extraction (docs/method.md §3): shared truncated SVD per type; returns the relative error per type."""
    check_state(adapter, arch, state)
    types = adapter.template_types(arch, template_size)
    by_type: dict[str, list[str]] = {t: [] for t in types}
    small = {}
    for k in sorted(state, key=natural):
        t = adapter.template_type_of(k, arch)
        if t is None:
            v = state[k].detach()
            small[k] = (v.float() if v.is_floating_point() else v).clone()  # BN's num_batches_tracked stays int
        else:
            by_type[t].append(k)
    templates, scalers, errors = {}, {}, {}
    limits = {t: tt.p * tt.q * math.prod(tt.kernel) for t, tt in types.items()}
    for t, keys in by_type.items():
        tt = types[t]
        limit = limits[t]
        if isinstance(num_templates, dict):
            n = num_templates[t]
        else:
            # One count for types of different sizes (3×3 and 1×1 convs): each is capped at
            # its own full rank; only a count beyond every type's full rank is an error.
            n = min(num_templates, limit) if num_templates <= max(limits.values()) else num_templates
        if not 1 <= n <= limit:
            raise WeitError(
                f"--num-templates {n} is out of range for {tt.p}×{tt.q} templates",
                f"use 1..{limit} ({limit} reproduces the weights exactly)",
            )
        weights = [state[k].detach().float() for k in keys]
        tmpl, scl = kron.extract_shared(weights, tt.p, tt.q, n)
        templates[t] = tmpl
        scalers.update(dict(zip(keys, scl)))
        errors[t] = kron.relative_error(weights, scl, tmpl)
    return Bundle(adapter, arch, templates, scalers, small), errors
