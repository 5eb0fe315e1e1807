"""Bundle and scalers files (`kind = weit.templates`, `weit.scalers`; docs/method.md §5): reading them
whole or from their header, checked against their own records; their metadata; the companion files
they carry."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weit_cli.arch._registry import get_adapter
from weit_cli.core.bundle import COMPANIONS, Bundle
from weit_cli.core.checks import check_consistent, few, tensor_problems
from weit_cli.errors import InputError
from weit_cli.io.files import (
    KIND_SCALERS,
    KIND_TEMPLATES,
    base_metadata,
    load_weit,
    save_tensors,
    sha256,
    weit_header,
)

if TYPE_CHECKING:
    from torch import Tensor

    from weit_cli.arch.base import Adapter

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
    check_consistent(b, source, record)
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


def bundle_metadata(b: Bundle, **provenance: Any) -> dict[str, str]:
    """The metadata of a bundle's file (`kind = weit.templates`): its architecture (with the nested
    ranges it was pretrained for), templates record, provenance and companion files."""
    arch = {**b.arch.to_dict(), **{k: v for k, v in b.extra.items() if k == "nested"}}
    files = {COMPANIONS: b.extra[COMPANIONS]} if b.extra.get(COMPANIONS) else {}
    return base_metadata(KIND_TEMPLATES, architecture=arch, templates=templates_record(b.templates), provenance=provenance, **files)


def save_bundle(path: Path, b: Bundle, provenance: dict[str, Any] | None = None, force: bool = False) -> None:
    """Write a bundle's file atomically (`bundle_metadata`: its records and `provenance`)."""
    save_tensors(path, b.to_tensors(), bundle_metadata(b, **(provenance or {})), force)


# ---------------------------------------------------------------------------------------------- scalers files
@dataclass
class ScalersFile:
    """The tensors of a `weit.scalers` file: one size's scalers (`scalers.<dense key>`) and small
    parameters (`small.<dense key>`); `unexpected` names any other tensor the file holds."""

    scalers: dict[str, Any]
    small: dict[str, Any]
    unexpected: list[str] = field(default_factory=list)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any]) -> ScalersFile:
        parts: dict[str, dict[str, Any]] = {"scalers": {}, "small": {}}
        unexpected = []
        for k, v in tensors.items():
            head, dot, rest = k.partition(".")
            if head in parts and dot:
                parts[head][rest] = v
            else:
                unexpected.append(k)
        return cls(parts["scalers"], parts["small"], sorted(unexpected))

    def to_tensors(self) -> dict[str, Tensor]:
        out = {f"scalers.{k}": v.detach().cpu() for k, v in self.scalers.items()}
        out.update({f"small.{k}": v.detach().cpu() for k, v in self.small.items()})
        return out

    def problems(self, b: Bundle, record: dict[str, Any] | None = None) -> list[str]:
        """What is wrong with these tensors as `b`'s scalers at `b.arch` (`b` holds them)."""
        return tensor_problems(b, record) + ([f"unexpected {few(self.unexpected)}"] if self.unexpected else [])


def save_scalers(
    path: Path, f: ScalersFile, arch: Any, bundle: Bundle, bundle_sha: str, provenance: dict[str, Any], files: Any, force: bool = False
) -> None:
    """Write a `weit.scalers` file: `arch`'s scalers and small tensors, bound to its bundle by the
    bundle's sha256 and to its size by the architecture record."""
    meta = base_metadata(
        KIND_SCALERS,
        architecture=arch.to_dict(),
        bundle_sha256=bundle_sha,
        templates=templates_record(bundle.templates),
        provenance=provenance,
        **({COMPANIONS: files} if files else {}),  # the fitting data's record (state statistics): materialize --scalers writes it
    )
    save_tensors(path, f.to_tensors(), meta, force)


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
    f = ScalersFile.from_tensors(tensors)
    extra = dict(bundle.extra)
    files = read_companions(meta, str(path))
    if files:  # the fit's own (its data's statistics), not the bundle's
        extra[COMPANIONS] = files
    sized = Bundle(bundle.adapter, target, bundle.templates, f.scalers, f.small, extra)
    # The metadata can be right while the tensors are not (a damaged or hand-edited file): check the
    # tensors against the target model too, so a bad file fails here and not in the written model.
    problems = f.problems(sized)
    if problems:
        raise InputError(
            f"{path} does not hold a complete set of scalers for this size: {'; '.join(problems)}", "the file is damaged; fit anew"
        )
    return sized


def check_scalers_file(path: Path, tensors: dict[str, Any], meta: dict[str, str], adapter: Adapter, arch: Any) -> None:
    """The checks `load_scalers` makes, without the bundle: its templates stand in as shapes, from
    the file's own `templates` record (`weit inspect --check`)."""
    try:
        record = json.loads(meta["templates"])
        templates = {t: Shaped((int(r["count"]), int(r["p"]), int(r["q"]), *map(int, r["kernel"])), "F32") for t, r in record.items()}
    except (KeyError, ValueError, TypeError, AttributeError):
        raise InputError(f"{path} has no usable templates record", "the file is damaged; fit anew") from None
    f = ScalersFile.from_tensors(tensors)
    problems = f.problems(Bundle(adapter, arch, templates, f.scalers, f.small), record)
    if problems:
        raise InputError(
            f"{path} does not hold a complete set of scalers for {adapter.describe(arch)}: {'; '.join(problems)}",
            "the file is damaged; fit anew",
        )
