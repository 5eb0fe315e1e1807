"""Template bundles: shared templates + per-layer scalers + small parameters, and the operations on
them that every command shares — extraction from a dense model, resizing, composition to dense."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import weit_cli.core.kron as kron
from weit_cli.arch._registry import Adapter, get_adapter
from weit_cli.core.resize import depth_plan, mix_layers, resize_width
from weit_cli.errors import InputError, WeitError
from weit_cli.io.files import (
    KIND_SCALERS,
    KIND_TEMPLATES,
    base_metadata,
    load_weit,
    sha256,
    weit_header,
)

if TYPE_CHECKING:
    from torch import Tensor

#: `Bundle.extra` key (and metadata key) of the JSON files a model needs beside its weights, name →
#: content, which `materialize` and `finetune` write into the model's folder (`io/export.write_model`):
#: a task's record of its training data (the control task's `control_config.json`: state statistics).
#: It rides from the data a bundle or scalers file was trained on to every model composed from it; no
#: module between knows what the files hold.
COMPANIONS = "companion_files"
_COMPANION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.json")
_RESERVED = ("config.json",)


def check_companions(files: Any, source: str) -> dict[str, dict[str, Any]]:
    """`files` if it is name → JSON object with plain file names (no folders, not config.json)."""
    hint = "the file was not written by this weit, or its metadata was edited"
    if not isinstance(files, dict):
        raise InputError(f"{source}: {COMPANIONS} is not a JSON object", hint)
    for name, content in files.items():
        if not isinstance(name, str) or not _COMPANION_NAME.fullmatch(name) or name in _RESERVED:
            raise InputError(f"{source}: {COMPANIONS} names a file {name!r} that may not be written beside a model", hint)
        if not isinstance(content, dict):
            raise InputError(f"{source}: {COMPANIONS}[{name!r}] is not a JSON object", hint)
    return dict(files)


def read_companions(meta: dict[str, str], source: str) -> dict[str, dict[str, Any]]:
    """The companion files recorded in a weit file's metadata ({} for none)."""
    if COMPANIONS not in meta:
        return {}
    try:
        files = json.loads(meta[COMPANIONS])
    except ValueError:
        raise InputError(f"{source} has an unreadable {COMPANIONS} record", "the file is damaged") from None
    return check_companions(files, source)


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
    extra = dict(bundle.extra)
    files = read_companions(meta, str(path))
    if files:  # the fit's own (its data's statistics), not the bundle's
        extra[COMPANIONS] = files
    sized = Bundle(bundle.adapter, target, bundle.templates, scalers, small, extra)
    # The metadata can be right while the tensors are not (a damaged or hand-edited file): check the
    # tensors against the target model too, so a bad file fails here and not in the written model.
    extra = sorted(k for k in tensors if not k.startswith(("scalers.", "small.")))
    problems = tensor_problems(sized) + ([f"unexpected {_few(extra)}"] if extra else [])
    if problems:
        raise InputError(
            f"{path} does not hold a complete set of scalers for this size: {'; '.join(problems)}", "the file is damaged; fit anew"
        )
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
        files = {COMPANIONS: self.extra[COMPANIONS]} if self.extra.get(COMPANIONS) else {}
        return base_metadata(KIND_TEMPLATES, architecture=arch, templates=templates_record(self.templates), provenance=provenance, **files)


def templates_record(templates: dict[str, Tensor]) -> dict[str, dict[str, Any]]:
    """The `templates` metadata of bundles and scalers files: count and block shape per type."""
    return {
        t: {"count": v.shape[0], "p": v.shape[1], "q": v.shape[2], "kernel": list(v.shape[3:])}
        for t, v in templates.items()
    }


def arch_from_meta(meta: dict[str, str], source: str) -> tuple[Adapter, Any]:
    """(family adapter, architecture) from a weit file's `architecture` metadata record."""
    try:
        arch_d = json.loads(meta["architecture"])
        adapter = get_adapter(arch_d["family"])
    except (KeyError, ValueError, TypeError):
        raise InputError(f"{source} has no usable architecture record", "the file was not written by this weit") from None
    return adapter, adapter.arch_from_dict(arch_d)


def bundle_from_tensors(tensors: dict[str, Tensor], meta: dict[str, str], source: str = "file") -> Bundle:
    adapter, arch = arch_from_meta(meta, source)
    parts: dict[str, dict[str, Tensor]] = {"templates": {}, "scalers": {}, "small": {}}
    for k, v in tensors.items():
        head, _, rest = k.partition(".")
        if head not in parts or not rest:
            raise InputError(f"{source} has an unexpected tensor '{k}'", "the file is not a weit bundle")
        parts[head][rest] = v
    b = Bundle(adapter, arch, parts["templates"], parts["scalers"], parts["small"])
    record = json.loads(meta["architecture"])  # known to parse: arch_from_meta read it
    if "nested" in record:
        b.extra["nested"] = record["nested"]
    files = read_companions(meta, source)
    if files:
        b.extra[COMPANIONS] = files
    try:
        record = json.loads(meta["templates"]) if "templates" in meta else None
    except ValueError:
        raise InputError(f"{source} has an unreadable templates record", "the file is damaged") from None
    _check_consistent(b, source, record)
    return b


def load_bundle(path: Path) -> tuple[Bundle, str]:
    """Load a template bundle; returns it and its sha256 (scalers files bind to it)."""
    tensors, meta = load_weit(path, KIND_TEMPLATES)
    b = bundle_from_tensors(tensors, meta, str(path))
    b.extra["provenance"] = _provenance(meta)
    return b, sha256(path)


def bundle_header(path: Path) -> Bundle:
    """A bundle as its safetensors header describes it, its tensors `Shaped` stand-ins: the
    architecture, templates and layout checked as `load_bundle` checks them, no tensor read (what
    `weit inspect` shows; the values are read and checked where they are used)."""
    header = weit_header(path, KIND_TEMPLATES)
    meta = dict(header.get("__metadata__") or {})
    b = bundle_from_tensors(header_tensors(header, str(path)), meta, str(path))
    b.extra["provenance"] = _provenance(meta)
    return b


def _provenance(meta: dict[str, str]) -> dict[str, Any]:
    try:
        return json.loads(meta.get("provenance", "{}"))
    except ValueError:
        return {}


#: safetensors' floating-point dtype names
_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Shaped:
    """A tensor as a safetensors header lists it: shape and dtype, no values. The layout checks
    (`tensor_problems`) and the parameter counts take it as they take a tensor, without reading
    the file's data or importing torch."""

    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, I64, …

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype in _FLOATS


def header_tensors(header: dict[str, Any], source: str) -> dict[str, Shaped]:
    """The tensors of a safetensors header (`read_header`), by name in sorted order as
    safetensors loads them."""
    out = {}
    for k in sorted(k for k in header if k != "__metadata__"):
        try:
            out[k] = Shaped(tuple(int(d) for d in header[k]["shape"]), str(header[k]["dtype"]))
        except (TypeError, KeyError, ValueError):
            raise InputError(f"{source} is not a valid safetensors file (bad entry {k!r})", "the file is corrupt") from None
    return out


def _check_consistent(b: Bundle, source: str, record: dict[str, Any] | None = None) -> None:
    """A bundle's tensors against its own metadata: every templated and small key of its declared
    architecture present with the right shape, nothing extra, and the templates as the `templates`
    record says. A hand-edited or damaged file fails here, not as a checkpoint its library refuses."""
    problems = tensor_problems(b, record)
    if problems:
        raise InputError(
            f"{source} does not match its own architecture ({b.adapter.describe(b.arch)}): {'; '.join(problems)}",
            "the file is damaged or was edited; write it again with the command that made it",
        )


def tensor_problems(b: Bundle, record: dict[str, Any] | None = None) -> list[str]:
    """What is wrong with `b`'s tensors for `b.arch` (empty: nothing), named as in the file
    (`templates.qkv`, `scalers.blocks.0.attn.qkv.weight`, `small.norm.weight`). `record` is the
    file's `templates` metadata ({type: {count, p, q, kernel}}), checked when given."""
    ad, arch = b.adapter, b.arch
    missing: list[str] = []
    unexpected: list[str] = []
    shapes: list[str] = []
    other: list[str] = []
    record = record if isinstance(record, dict) and all(isinstance(r, dict) for r in record.values()) else None
    # Templates: the family's types at the file's template size, with the recorded counts.
    sizes = {r.get("p") for r in record.values()} if record else {int(t.shape[1]) for t in b.templates.values() if t.dim() >= 3}
    try:
        types = ad.template_types(arch, sizes.pop() if len(sizes) == 1 else None)
    except WeitError as e:
        return [e.message]
    for t, v in sorted(b.templates.items()):
        want = types.get(t)
        if want is None or (record is not None and t not in record):
            unexpected.append(f"templates.{t}")
            continue
        n = record[t].get("count") if record is not None else (v.shape[0] if v.dim() else 0)
        expect = (n, want.p, want.q, *want.kernel)
        if tuple(v.shape) != expect:
            shapes.append(f"templates.{t} {tuple(v.shape)}≠{expect}")
        elif not v.is_floating_point():
            other.append(f"templates.{t} is not floating point")
    if record is not None:
        missing += [f"templates.{t}" for t in record if t not in b.templates]
    # Dense keys: those of the module of `arch`; templated ones as scalers, the rest as small.
    ref = reference_shapes(ad, arch)
    for k in sorted(ref, key=_natural):
        t = ad.template_type_of(k, arch)
        store, name = (b.scalers, f"scalers.{k}") if t is not None else (b.small, f"small.{k}")
        if k not in store:
            missing.append(name)
        elif t is None:
            if tuple(store[k].shape) != ref[k]:
                shapes.append(f"{name} {tuple(store[k].shape)}≠{ref[k]}")
        elif t not in b.templates:
            missing.append(f"templates.{t}")
        else:
            s, tmpl = store[k], b.templates[t]
            if s.dim() != 3 or tmpl.dim() < 3 or s.shape[0] != tmpl.shape[0]:
                shapes.append(f"{name} {tuple(s.shape)} (templates.{t} {tuple(tmpl.shape)})")
            elif b.dense_shape(k) != ref[k]:
                shapes.append(f"{name} {tuple(s.shape)} (dense {b.dense_shape(k)}≠{ref[k]})")
            elif not s.is_floating_point():
                other.append(f"{name} is not floating point")
    unexpected += [f"scalers.{k}" for k in sorted(b.scalers, key=_natural) if k not in ref or ad.template_type_of(k, arch) is None]
    unexpected += [f"small.{k}" for k in sorted(b.small, key=_natural) if k not in ref or ad.template_type_of(k, arch) is not None]
    out = []
    if missing:
        out.append(f"missing {_few(list(dict.fromkeys(missing)))}")
    if unexpected:
        out.append(f"unexpected {_few(unexpected)}")
    if shapes:
        out.append(f"wrong shape {_few(shapes)}")
    return out + other


def reference_shapes(adapter: Adapter, arch: Any) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the module of `arch`, the truth every check compares with: the family's
    own layout (`Adapter.state_shapes`), so no module is built and no model library imported
    (building an 86M-parameter model on the meta device cost ~3 s of a 7 s materialize, mostly importing its library)."""
    return dict(adapter.state_shapes(arch))


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
    parts = state_problems(adapter, arch, {k: tuple(v.shape) for k, v in state.items()})
    if parts:
        raise InputError(
            f"checkpoint does not match {adapter.describe(arch)}: {'; '.join(parts)}",
            f"pass {'/'.join(adapter.hints.guessed)} if they were guessed wrong, or check the file" if adapter.hints.guessed else "check the file",
        )


def state_problems(adapter: Adapter, arch: Any, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Every missing, unexpected and mis-shaped key of a dense state (key → shape) at once."""
    ref = reference_shapes(adapter, arch)
    missing = sorted(set(ref) - set(shapes), key=_natural)
    unexpected = sorted(set(shapes) - set(ref), key=_natural)
    wrong = [k for k in ref if k in shapes and tuple(ref[k]) != tuple(shapes[k])]
    parts = []
    if missing:
        parts.append(f"missing {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected {_few(unexpected)}")
    if wrong:
        parts.append("wrong shape " + _few([f"{k} {tuple(shapes[k])}≠{tuple(ref[k])}" for k in wrong]))
    return parts


def _few(xs: list[str], n: int = 4) -> str:
    return ", ".join(xs[:n]) + (f" (+{len(xs) - n} more)" if len(xs) > n else "")


def _natural(k: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", k)]


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
