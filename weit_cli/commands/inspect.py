"""`weit inspect`: what a bundle, scalers file or dense checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from weit_cli.arch._registry import detect_family, get_adapter
from weit_cli.core.bundle import (
    COMPANIONS,
    Bundle,
    load_bundle,
    read_companions,
    tensor_problems,
)
from weit_cli.errors import InputError, WeitError
from weit_cli.io.files import (
    KIND_SCALERS,
    KIND_TEMPLATES,
    load_dense,
    load_weit,
    read_header,
    weights_file,
)


def inspect(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir() or (path.suffix != ".safetensors" and path.exists()):  # a timm folder, a torch file
        return _inspect_dense(path)
    header = read_header(path)
    meta = dict(header.get("__metadata__") or {})
    kind = meta.get("kind")
    if kind == KIND_TEMPLATES:
        b, bsha = load_bundle(path)
        return {
            "path": str(path),
            "kind": kind,
            "sha256": bsha,
            "weit_format": meta.get("weit_format"),
            "weit_version": meta.get("weit_version"),
            "kron_order": meta.get("kron_order"),
            "architecture": b.arch.to_dict(),
            "description": b.adapter.describe(b.arch),
            "nested": b.extra.get("nested"),
            "templates": {t: list(v.shape) for t, v in b.templates.items()},
            "params": b.param_counts(),
            "provenance": b.extra.get("provenance", {}),
            **_companions(b.extra.get(COMPANIONS)),
        }
    if kind == KIND_SCALERS:
        tensors, meta = load_weit(path, KIND_SCALERS)
        try:
            arch_d = json.loads(meta["architecture"])
            adapter = get_adapter(arch_d["family"])
        except (KeyError, ValueError, TypeError):
            raise InputError(f"{path} has no usable architecture record", "the file was not written by this weit") from None
        arch = adapter.arch_from_dict(arch_d)
        _check_scalers(path, tensors, meta, adapter, arch)
        return {
            "path": str(path),
            "kind": kind,
            "weit_format": meta.get("weit_format"),
            "weit_version": meta.get("weit_version"),
            "bundle_sha256": meta.get("bundle_sha256"),
            "architecture": arch.to_dict(),
            "description": adapter.describe(arch),
            "params": {"scalers+small": sum(v.numel() for v in tensors.values())},
            "provenance": json.loads(meta.get("provenance", "{}")),
            **_companions(read_companions(meta, str(path))),
        }
    if kind:
        raise InputError(f"{path} is of unknown kind '{kind}'", "this weit reads weit.templates and weit.scalers")
    return _inspect_dense(path)


def _companions(files: dict[str, Any] | None) -> dict[str, Any]:
    """The files a model composed from this one gets beside its weights (only when there are any)."""
    return {"companion_files": {name: files[name] for name in sorted(files)}} if files else {}


def _check_scalers(path: Path, tensors: dict[str, Any], meta: dict[str, str], adapter: Any, arch: Any) -> None:
    """The checks `materialize --scalers` makes, without the bundle: its templates stand in as
    shapes on the meta device, from the file's own `templates` record."""
    import torch

    try:
        record = json.loads(meta["templates"])
        templates = {
            t: torch.empty(int(r["count"]), int(r["p"]), int(r["q"]), *map(int, r["kernel"]), device="meta")
            for t, r in record.items()
        }
    except (KeyError, ValueError, TypeError, AttributeError):
        raise InputError(f"{path} has no usable templates record", "the file is damaged; fit anew") from None
    scalers = {k[len("scalers.") :]: v for k, v in tensors.items() if k.startswith("scalers.")}
    small = {k[len("small.") :]: v for k, v in tensors.items() if k.startswith("small.")}
    extra = sorted(k for k in tensors if not k.startswith(("scalers.", "small.")))
    problems = tensor_problems(Bundle(adapter, arch, templates, scalers, small), record)
    if extra:
        problems.append(f"unexpected {', '.join(extra[:4])}" + (f" (+{len(extra) - 4} more)" if len(extra) > 4 else ""))
    if problems:
        raise InputError(
            f"{path} does not hold a complete set of scalers for {adapter.describe(arch)}: {'; '.join(problems)}",
            "the file is damaged; fit anew",
        )


def _inspect_dense(path: Path) -> dict[str, Any]:
    state, hints = load_dense(path)
    try:
        adapter = detect_family(state.keys())
        state = adapter.loadable(state)
        arch = adapter.infer_arch(state, hints)
        arch_d, desc = arch.to_dict(), adapter.describe(arch)
    except WeitError as e:
        arch_d, desc = None, f"unrecognised ({e.message})"
    return {
        "path": str(path),
        "kind": "dense",
        "architecture": arch_d,
        "description": desc,
        "tensors": len(state),
        "params": {"dense": sum(v.numel() for v in state.values())},
        **_written_by(path),
    }


def _written_by(path: Path) -> dict[str, Any]:
    """What materialize and finetune record in the weights file's metadata: the producing weit, and
    the provenance (bundle sha256, rules, command). Empty for files weit did not write."""
    found = weights_file(path) if path.is_dir() else path
    if found is None or found.suffix != ".safetensors":
        return {}
    meta = read_header(found).get("__metadata__") or {}
    out: dict[str, Any] = {}
    if meta.get("producer"):
        out["producer"] = meta["producer"]
    try:
        prov = json.loads(meta.get("provenance", "null"))
    except ValueError:
        prov = None
    if isinstance(prov, dict):
        out["provenance"] = prov
    return out


