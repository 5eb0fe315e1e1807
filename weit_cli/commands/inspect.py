"""`weit inspect`: what a bundle, scalers file or dense checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from weit_cli.arch._registry import detect_family, get_adapter
from weit_cli.core.bundle import load_bundle
from weit_cli.errors import InputError, WeitError
from weit_cli.io.files import KIND_SCALERS, KIND_TEMPLATES, load_dense, load_weit, read_header


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
        }
    if kind == KIND_SCALERS:
        tensors, meta = load_weit(path, KIND_SCALERS)
        arch_d = json.loads(meta["architecture"])
        adapter = get_adapter(arch_d["family"])
        arch = adapter.arch_from_dict(arch_d)
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
        }
    if kind:
        raise InputError(f"{path} is of unknown kind '{kind}'", "this weit reads weit.templates and weit.scalers")
    return _inspect_dense(path)


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
    }


