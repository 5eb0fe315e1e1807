"""Template bundles: shared templates + per-layer scalers + small parameters, and the operations on
them that every command shares — extraction from a dense model, resizing, composition to dense."""

from __future__ import annotations

import math

import json
from pathlib import Path
from typing import Any
import torch
import weit_cli.core.kron as kron
from weit_cli.arch._registry import get_adapter
from weit_cli.errors import InputError, WeitError
from weit_cli.io.files import KIND_SCALERS, KIND_TEMPLATES, load_weit, sha256
import re
from dataclasses import dataclass, field, replace
from torch import Tensor
from weit_cli.arch._registry import Adapter
from weit_cli.io.files import base_metadata
from weit_cli.core.resize import depth_plan, mix_layers, resize_width


def load_scalers(path: Path, bundle: Bundle, bundle_sha: str, target: Any) -> Bundle:
    """A scalers file from fit-scalers, checked against its bundle and the requested size."""
    tensors, meta = load_weit(path, KIND_SCALERS)
    if meta.get("bundle_sha256") != bundle_sha:
        raise InputError(
            f"{path} was fitted for another bundle (sha256 {meta.get('bundle_sha256', '?')[:12]}…, this one {bundle_sha[:12]}…)",
            "fit scalers for this bundle with 'weit fit-scalers'",
        )
    fitted = bundle.adapter.arch_from_dict(json.loads(meta["architecture"]))
    if fitted != target:
        size = lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
        raise InputError(
            f"{path} holds scalers for {bundle.adapter.describe(fitted)}, not {bundle.adapter.describe(target)}",
            f"materialize with the size it was fitted for (--depth {size(fitted.depth)} --width {size(fitted.width)}) or fit anew",
        )
    scalers = {k[len("scalers.") :]: v for k, v in tensors.items() if k.startswith("scalers.")}
    small = {k[len("small.") :]: v for k, v in tensors.items() if k.startswith("small.")}
    sized = Bundle(bundle.adapter, target, bundle.templates, scalers, small, dict(bundle.extra))
    # The metadata can be right while the tensors are not (a damaged or hand-edited file): check the
    # tensors against the target model too, so a bad file fails here and not in the written model.
    try:
        _check_consistent(sized, str(path))
        shapes = {k: torch.empty(sized.dense_shape(k), device="meta") for k in sized.dense_keys()}
        check_state(sized.adapter, target, shapes)
    except (InputError, KeyError, ValueError) as e:
        detail = e.message if isinstance(e, InputError) else f"unexpected tensor {e}"
        raise InputError(f"{path} does not hold a complete set of scalers for this size: {detail}", "the file is damaged; fit anew") from None
    return sized


def plan_target(bundle: Bundle, **sizes: Any) -> Any:
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


@dataclass
class Bundle:
    """Everything needed to compose a dense model of `arch`; templates are shared by all sizes."""

    adapter: Adapter
    arch: Any
    templates: dict[str, Tensor]  # type name → (N, p, q, *kernel)
    scalers: dict[str, Tensor]  # dense weight key → (N, a, b)
    small: dict[str, Tensor]  # dense key → tensor
    extra: dict[str, Any] = field(default_factory=dict)  # nested ranges, provenance, …

    # ------------------------------------------------------------------ structure
    def template_of(self, key: str) -> Tensor:
        return self.templates[self.adapter.template_type_of(key, self.arch)]

    def dense_keys(self) -> list[str]:
        return sorted([*self.scalers, *self.small])

    def dense_shape(self, key: str) -> tuple[int, ...]:
        if key in self.small:
            return tuple(self.small[key].shape)
        _, a, b = self.scalers[key].shape
        _, p, q, *k = self.template_of(key).shape
        return (a * p, b * q, *k)

    def dense(self, key: str) -> Tensor:
        if key in self.small:
            return self.small[key]
        return kron.compose(self.scalers[key], self.template_of(key))

    def state_dict(self) -> dict[str, Tensor]:
        return {k: self.dense(k) for k in self.dense_keys()}

    def num_templates(self) -> dict[str, int]:
        return {t: v.shape[0] for t, v in self.templates.items()}

    def param_counts(self) -> dict[str, int]:
        return {
            "templates": sum(v.numel() for v in self.templates.values()),
            "scalers": sum(v.numel() for v in self.scalers.values()),
            "small": sum(v.numel() for v in self.small.values()),
            "dense": sum(math.prod(self.dense_shape(k)) for k in self.dense_keys()),
        }

    # ------------------------------------------------------------------ files
    def to_tensors(self) -> dict[str, Tensor]:
        out = {f"templates.{k}": v for k, v in self.templates.items()}
        out.update({f"scalers.{k}": v for k, v in self.scalers.items()})
        out.update({f"small.{k}": v for k, v in self.small.items()})
        return {k: v.detach().contiguous() for k, v in out.items()}

    def metadata(self, **provenance: Any) -> dict[str, str]:
        arch = {**self.arch.to_dict(), **{k: v for k, v in self.extra.items() if k == "nested"}}
        templates = {
            t: {"count": v.shape[0], "p": v.shape[1], "q": v.shape[2], "kernel": list(v.shape[3:])}
            for t, v in self.templates.items()
        }
        return base_metadata(KIND_TEMPLATES, architecture=arch, templates=templates, provenance=provenance)


def bundle_from_tensors(tensors: dict[str, Tensor], meta: dict[str, str], source: str = "file") -> Bundle:
    try:
        arch_d = json.loads(meta["architecture"])
        adapter = get_adapter(arch_d["family"])
    except (KeyError, ValueError, TypeError):
        raise InputError(f"{source} has no usable architecture record", "the file was not written by this weit") from None
    arch = adapter.arch_from_dict(arch_d)
    parts: dict[str, dict[str, Tensor]] = {"templates": {}, "scalers": {}, "small": {}}
    for k, v in tensors.items():
        head, _, rest = k.partition(".")
        if head not in parts or not rest:
            raise InputError(f"{source} has an unexpected tensor '{k}'", "the file is not a weit bundle")
        parts[head][rest] = v
    b = Bundle(adapter, arch, parts["templates"], parts["scalers"], parts["small"])
    if "nested" in arch_d:
        b.extra["nested"] = arch_d["nested"]
    _check_consistent(b, source)
    return b


def load_bundle(path: Path) -> tuple[Bundle, str]:
    """Load a template bundle; returns it and its sha256 (scalers files bind to it)."""
    tensors, meta = load_weit(path, KIND_TEMPLATES)
    b = bundle_from_tensors(tensors, meta, str(path))
    try:
        b.extra["provenance"] = json.loads(meta.get("provenance", "{}"))
    except ValueError:
        b.extra["provenance"] = {}
    return b, sha256(path)


def _check_consistent(b: Bundle, source: str) -> None:
    for key, s in b.scalers.items():
        t = b.adapter.template_type_of(key, b.arch)
        if t not in b.templates:
            raise InputError(f"{source}: scalers '{key}' have no templates", "the file is corrupt")
        if s.dim() != 3 or s.shape[0] != b.templates[t].shape[0]:
            raise InputError(f"{source}: scalers '{key}' do not match templates '{t}'", "the file is corrupt")


# ---------------------------------------------------------------------------------------------- extraction
def from_dense(
    adapter: Adapter, arch: Any, state: dict[str, Tensor], template_size: int | None, num_templates: int | dict[str, int]
) -> tuple[Bundle, dict[str, float]]:
    """Data-free extraction (docs/method.md §3): shared truncated SVD per type; returns the relative error per type."""
    check_state(adapter, arch, state)
    types = adapter.template_types(arch, template_size)
    by_type: dict[str, list[str]] = {t: [] for t in types}
    small = {}
    for k in sorted(state, key=_natural):
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
            from weit_cli.errors import WeitError

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


def check_state(adapter: Adapter, arch: Any, state: dict[str, Tensor]) -> None:
    """Strict: list every missing, unexpected or mis-shaped key at once."""
    ref = adapter.build(arch).state_dict()
    missing = sorted(set(ref) - set(state), key=_natural)
    unexpected = sorted(set(state) - set(ref), key=_natural)
    shapes = [k for k in ref if k in state and tuple(ref[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        if shapes:
            parts.append("wrong shape " + _few([f"{k} {tuple(state[k].shape)}≠{tuple(ref[k].shape)}" for k in shapes]))
        raise InputError(
            f"checkpoint does not match {adapter.describe(arch)}: {'; '.join(parts)}",
            f"pass {'/'.join(adapter.hints.guessed)} if they were guessed wrong, or check the file" if adapter.hints.guessed else "check the file",
        )


def _few(xs: list[str], n: int = 4) -> str:
    return ", ".join(xs[:n]) + (f" (+{len(xs) - n} more)" if len(xs) > n else "")


def _natural(k: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", k)]


def resize(b: Bundle, target: Any, depth_rule: str = "auto", width_rule: str = "tile") -> Bundle:
    """The bundle's parameters at `target` size (docs/method.md §4). Differentiable: pretraining uses it too."""
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
        plan = depth_plan(old_n, new_n, depth_rule) if new_n else []
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
    return Bundle(ad, target, b.templates, scalers, small, dict(b.extra))
