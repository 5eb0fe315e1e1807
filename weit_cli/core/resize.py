"""Resizing (docs/method.md §4), architecture-agnostic: the rules, and a bundle resized by them.

Depth rules map a target layer index to source layers; width rules map target channels (or scaler
block rows/columns) to source ones. Both are index maps plus weights, so they are differentiable and
serve pretraining's nested prefixes as well as `materialize`. `plan_target` turns the sizes asked
for into a target architecture; `resize` gives a bundle's parameters at that size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, get_args

from weit_cli.errors import InputError, WeitError
from weit_cli.limits import DepthRule, WidthRule

if TYPE_CHECKING:
    from torch import Tensor

    from weit_cli.core.axes import Axis
    from weit_cli.core.bundle import Bundle

DEPTH_RULES: tuple[str, ...] = get_args(DepthRule)
WIDTH_RULES: tuple[str, ...] = get_args(WidthRule)


@dataclass(frozen=True)
class LayerSource:
    """Target layer = Σ weight·source layer; `zero_residual` marks a new identity block."""

    sources: tuple[tuple[int, float], ...]
    zero_residual: bool = False


def depth_plan(old: int, new: int, rule: str) -> list[LayerSource]:
    """Which source layers each of `new` target layers comes from."""
    if new < 1:
        raise WeitError(f"depth must be at least 1, got {new}", "pass --depth 1 or more")
    if rule == "auto":  # resize() grows by the family's own rule (Adapter.grow_depth_rule)
        rule = "prefix" if new <= old else "interp"
    if rule in ("prefix", "spread") and new > old:
        raise WeitError(
            f"depth rule '{rule}' cannot grow {old} layers to {new}",
            "use --depth-rule interp, stack, interleave or identity to grow",
        )
    if rule == "prefix":
        return [LayerSource(((i, 1.0),)) for i in range(new)]
    if rule == "spread":  # evenly spaced whole layers, the first and the last kept (one layer: the first), rounded half up
        if new == 1:
            return [LayerSource(((0, 1.0),))]
        return [LayerSource((((2 * i * (old - 1) + new - 1) // (2 * (new - 1)), 1.0),)) for i in range(new)]
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


def plan_target(bundle: Bundle, **sizes: Any) -> Any:
    """The target architecture of `bundle` at the sizes asked for (None: keep the bundle's)."""
    # Per-stage size lists are for families with several layer groups (stages).
    if len(bundle.adapter.layer_groups(bundle.arch)) == 1:
        for k in ("depth", "width"):
            v = sizes.get(k)
            if isinstance(v, (list, tuple)):
                if len(v) != 1:
                    raise WeitError(
                        f"--{k} {','.join(map(str, v))}: a {bundle.adapter.family} takes one number",
                        f"give one number, e.g. --{k} {v[0]}",
                    )
                sizes[k] = v[0]
    # Widths must be whole scaler blocks: validate against the bundle's own template size, which
    # may differ from head_dim (extract-templates --template-size).
    blocks = {int(d) for t in bundle.templates.values() for d in t.shape[1:3]}
    if len(blocks) == 1 and "template_size" not in sizes:
        sizes["template_size"] = blocks.pop()
    return bundle.adapter.target_arch(bundle.arch, **{k: v for k, v in sizes.items() if v is not None})


def resize(b: Bundle, target: Any, depth_rule: str = "auto", width_rule: str = "tile") -> Bundle:
    """The bundle's parameters at `target` size (docs/method.md §4). Differentiable: pretraining uses it too."""
    import torch

    scalers, small = dict(b.scalers), dict(b.small)
    ad = b.adapter
    identity, identity_rows = ad.identity_suffixes(target), ad.identity_rows(target)
    for g_old, g_new in zip(ad.layer_groups(b.arch), ad.layer_groups(target)):
        old_n, new_n = g_old.count - g_old.first, g_new.count - g_new.first
        if old_n == new_n:
            continue
        if old_n == 0:
            raise InputError(f"no block after the first of '{g_old.prefix.format('')}' to grow from", "keep its depth")
        # new_n == 0 keeps only the group's fixed first blocks (a stage's downsampling block).
        rule = depth_rule
        if depth_rule == "auto":
            rule = ad.grow_depth_rule if new_n > old_n else trained_depth_rule(b.extra) or "prefix"
        plan = depth_plan(old_n, new_n, rule) if new_n else []
        for store in (scalers, small):
            per_layer: dict[str, list[Tensor]] = {}
            for i in range(old_n):
                pre = g_old.prefix.format(g_old.first + i)
                for k in [k for k in store if k.startswith(pre)]:
                    per_layer.setdefault(k[len(pre) :], []).append(store.pop(k))
            for suffix, layers in per_layer.items():
                if len(layers) != old_n:
                    raise InputError(f"layer parameter '{suffix}' is missing in some blocks", "the bundle is corrupt")
                for j, src in enumerate(plan):
                    w = mix_layers(layers, src)
                    if not layers[0].is_floating_point():  # counters (num_batches_tracked)
                        w = w.round().to(layers[0].dtype)
                    if src.zero_residual and suffix in identity:
                        w = torch.zeros_like(w)
                    elif src.zero_residual and suffix in identity_rows:  # a scaler grid's rows are dim 1
                        w = identity_rows[suffix](w, dim=1 if store is scalers else 0)
                    store[g_new.prefix.format(g_new.first + j) + suffix] = w
    old_sizes, new_sizes = ad.sizes(b.arch), ad.sizes(target)
    if old_sizes != new_sizes:
        for k in list(scalers):
            t = b.template_of(k)
            axes = [replace(ax, dim=ax.dim + 1) for ax in ad.axes(k, b.arch) if ax.dim < 2]
            scalers[k] = resize_width(scalers[k], axes, old_sizes, new_sizes, width_rule, unit={1: t.shape[1], 2: t.shape[2]})
        for k in list(small):
            small[k] = resize_width(small[k], ad.axes(k, b.arch), old_sizes, new_sizes, width_rule)
    if getattr(target, "num_classes", None) != getattr(b.arch, "num_classes", None):
        for k in ad.classifier:
            if k in small:
                v = small.pop(k)
                if target.num_classes > 0:
                    small[k] = torch.zeros(target.num_classes, *v.shape[1:], dtype=v.dtype)
    return replace(b, arch=target, scalers=scalers, small=small, extra=dict(b.extra))


def trained_depth_rule(extra: dict) -> str | None:
    """The depth rule a pretrained bundle's smaller depths were trained with (`nested.depth_rule`, in its
    nested record; prefix when the record has none): what `auto` takes to shrink it. None for a bundle
    without nested sizes (extracted), which `auto` shrinks by prefix."""
    nested = extra.get("nested")
    return nested.get("depth_rule", "prefix") if nested else None


def depth_rule_warnings(source_depth, target_depth, depth_rule: str, trained: str | None = None) -> list[str]:
    """A shallower target taken by another block-picking rule (prefix, spread, interp) than the one the
    bundle's smaller depths were trained with (`trained`, what `auto` takes) keeps other blocks than
    those trained together: say so. Without nested sizes (`trained` None) only interp warns, against
    the prefix a pretrained bundle trains by default. Depths are ints or one per stage."""
    as_list = lambda d: list(d) if isinstance(d, (list, tuple)) else [d]  # noqa: E731
    ref = trained or "prefix"
    picks = depth_rule == "interp" if trained is None else depth_rule in ("prefix", "spread", "interp") and depth_rule != trained
    if not picks or not any(t < s for s, t in zip(as_list(source_depth), as_list(target_depth))):
        return []
    kept = {"prefix": "the first blocks", "spread": "evenly spaced blocks", "interp": "blocks spread over the bundle's depth"}
    return [f"--depth-rule {depth_rule} on a shallower target keeps {kept[depth_rule]}, where a pretrained bundle's smaller "
            f"depths are {kept[ref]} (--depth-rule {ref}); the default, auto, keeps those"]
