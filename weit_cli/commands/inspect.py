"""`weit inspect`: what a bundle, scalers file or dense checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from weit_cli.arch._registry import detect_family
from weit_cli.core.bundle import COMPANIONS
from weit_cli.io.bundle_file import (
    arch_from_meta,
    bundle_header,
    check_scalers_file,
    header_tensors,
    load_bundle,
    read_companions,
)
from weit_cli.errors import InputError, WeitError
from weit_cli.io.files import (
    KIND_SCALERS,
    KIND_TEMPLATES,
    load_dense,
    load_weit,
    read_header,
    sha256,
    weights_file,
    weit_header,
)

#: What `--check` adds to the answer from the header, which checks the layout already.
CHECKED = "passed: {n} tensors read, their shapes those of the architecture, every value finite"


def inspect(path: Path, check: bool = False) -> dict[str, Any]:
    """What a file holds. A bundle or scalers file answers from its safetensors header alone (kind,
    architecture, templates, tensor layout, parameter counts: no tensor read, no torch); `check`
    also reads every tensor and checks its values, as materialize and fit-scalers do before use."""
    from weit_cli.io.hub import is_hub_id, resolve

    if is_hub_id(path):  # a dense model in the Hugging Face cache, by its hub id
        folder, hub = resolve(path)
        return {**_inspect_dense(folder, check), "source": hub}
    path = Path(path)
    if path.is_dir() or (path.suffix != ".safetensors" and path.exists()):  # a timm folder, a torch file
        return _inspect_dense(path, check)
    header = read_header(path)
    meta = dict(header.get("__metadata__") or {})
    kind = meta.get("kind")
    if kind == KIND_TEMPLATES:
        return _inspect_bundle(path, meta, check)
    if kind == KIND_SCALERS:
        return _inspect_scalers(path, check)
    if kind:
        raise InputError(f"{path} is of unknown kind '{kind}'", "this weit reads weit.templates and weit.scalers")
    return _inspect_dense(path, check)


def _inspect_bundle(path: Path, meta: dict[str, str], check: bool) -> dict[str, Any]:
    b = bundle_header(path)
    out = {
        "path": str(path),
        "kind": KIND_TEMPLATES,
        "sha256": sha256(path),
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
    if check:
        full, _ = load_bundle(path)
        out["check"] = CHECKED.format(n=len(full.templates) + len(full.scalers) + len(full.small))
    return out


def _inspect_scalers(path: Path, check: bool) -> dict[str, Any]:
    header = weit_header(path, KIND_SCALERS)
    meta = dict(header.get("__metadata__") or {})
    adapter, arch = arch_from_meta(meta, str(path))
    tensors = header_tensors(header, str(path))
    check_scalers_file(path, tensors, meta, adapter, arch)
    out = {
        "path": str(path),
        "kind": KIND_SCALERS,
        "weit_format": meta.get("weit_format"),
        "weit_version": meta.get("weit_version"),
        "bundle_sha256": meta.get("bundle_sha256"),
        "architecture": arch.to_dict(),
        "description": adapter.describe(arch),
        "params": {"scalers+small": sum(v.numel() for v in tensors.values())},
        "provenance": json.loads(meta.get("provenance", "{}")),
        **_companions(read_companions(meta, str(path))),
    }
    if check:
        full, meta = load_weit(path, KIND_SCALERS)
        check_scalers_file(path, full, meta, adapter, arch)
        out["check"] = CHECKED.format(n=len(full))
    return out


def _companions(files: dict[str, Any] | None) -> dict[str, Any]:
    """The files a model composed from this one gets beside its weights (only when there are any)."""
    return {"companion_files": {name: files[name] for name in sorted(files)}} if files else {}


def _inspect_dense(path: Path, check: bool = False) -> dict[str, Any]:
    """A dense checkpoint is read whole (its family is told from its keys), so `check` adds nothing
    to what loading it checks already (readable, every value finite)."""
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
        **({"check": f"passed: {len(state)} tensors read, every value finite"} if check else {}),
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


