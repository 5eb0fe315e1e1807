"""One library function per subcommand. Each returns a plain dict (what was done and written) that
the CLI renders as a table or as JSON; none of them print."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import __version__, kron
from .arch import detect_family, get_adapter
from .bundle import Bundle, _check_consistent, check_state, from_dense, load_bundle, resize
from .errors import InputError, WeitError
from .resize import DEPTH_RULES, WIDTH_RULES
from .files import (
    KIND_SCALERS,
    KIND_TEMPLATES,
    atomic_dir,
    atomic_file,
    check_output,
    checkpoint_sha256,
    load_dense,
    load_weit,
    one_thread,
    read_header,
    save_tensors,
    sha256,
    write_safetensors,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def extract_templates(
    checkpoint: Path,
    out: Path,
    *,
    template_size: int | None = None,
    num_templates: int = 16,
    num_heads: int | None = None,
    img_size: int | None = None,
    data: str | None = None,
    distill_steps: int | None = None,
    distill_lr: float | None = None,
    batch_size: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    device: str | None = None,
    force: bool = False,
    on_step: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Data-free SVD extraction; with `data`, then WAVE-style distillation (distill.py) from the checkpoint."""
    check_output(out, force)
    if data is None and (distill_steps is not None or distill_lr is not None or batch_size is not None):
        raise WeitError("--distill-steps, --distill-lr and --batch-size need --data", "pass --data DATA to distil, or leave them out")
    if data is not None:
        from .distill import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS, check_options

        distill_steps = DEFAULT_STEPS if distill_steps is None else distill_steps
        distill_lr = DEFAULT_LR if distill_lr is None else distill_lr
        batch_size = DEFAULT_BATCH if batch_size is None else batch_size
        check_options(distill_steps, distill_lr, batch_size, temperature)
        from .train import check_seed, resolve_device

        check_seed(seed)
        resolve_device(device)
    if template_size is not None and template_size < 1:
        raise WeitError(f"--template-size must be at least 1, got {template_size}", "leave it out for the default (ViT: head_dim)")
    if num_heads is not None and num_heads < 1:
        raise WeitError(f"--num-heads must be at least 1, got {num_heads}", "leave it out to read it from the checkpoint")
    state, hints = load_dense(checkpoint)
    if num_heads is not None:
        hints["num_heads"] = num_heads
    if img_size is not None:
        hints["img_size"] = img_size
    adapter = detect_family(state.keys())
    arch = adapter.infer_arch(state, hints)
    bundle, errors = from_dense(adapter, arch, state, template_size, num_templates)
    provenance = {
        "command": "extract-templates",
        "source_sha256": checkpoint_sha256(checkpoint),
        "template_size": template_size,
        "num_templates": num_templates,
        "reconstruction_error": {k: round(v, 8) for k, v in errors.items()},
    }
    report = None
    if data is not None:
        from .data import load_data
        from .distill import distill

        splits = load_data(data, img_size=arch.img_size, in_chans=arch.in_chans, seed=seed)
        bundle, report = distill(
            bundle, state, splits, steps=distill_steps, lr=distill_lr, batch_size=batch_size,
            temperature=temperature, seed=seed, device=device, on_step=on_step,
        )
        report["relative_error_after"] = _relative_errors(bundle, state)
        provenance["distillation"] = {k: v for k, v in report.items() if k != "seconds"}  # same inputs → same bytes
    save_tensors(out, bundle.to_tensors(), bundle.metadata(**provenance), force)
    result = {
        "command": "extract-templates",
        "output": str(out),
        "architecture": arch.to_dict(),
        "templates": {t: list(v.shape) for t, v in bundle.templates.items()},
        "relative_error": errors,
        "params": bundle.param_counts(),
    }
    if report is not None:
        result["distillation"] = report
    return result


def _relative_errors(bundle: Bundle, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖W − Σ S⊗T‖/‖W‖ per template type against the source weights."""
    from .kron import relative_error

    by_type: dict[str, list[str]] = {}
    for k in bundle.scalers:
        by_type.setdefault(bundle.adapter.template_type_of(k, bundle.arch), []).append(k)
    return {
        t: relative_error([state[k].float() for k in keys], [bundle.scalers[k] for k in keys], bundle.templates[t])
        for t, keys in by_type.items()
    }


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
    # Per-stage size lists are for families with several layer groups (ResNet stages).
    if len(bundle.adapter.layer_groups(bundle.arch)) == 1:
        for k in ("depth", "width"):
            v = sizes.get(k)
            if isinstance(v, (list, tuple)):
                if len(v) != 1:
                    raise WeitError(
                        f"--{k} {','.join(map(str, v))}: a {bundle.adapter.family} takes one number",
                        "per-stage lists are for ResNets",
                    )
                sizes[k] = v[0]
    # Widths must be whole scaler blocks: validate against the bundle's own template size, which
    # may differ from head_dim (extract-templates --template-size).
    blocks = {int(d) for t in bundle.templates.values() for d in t.shape[1:3]}
    if len(blocks) == 1 and "template_size" not in sizes:
        sizes["template_size"] = blocks.pop()
    return bundle.adapter.target_arch(bundle.arch, **{k: v for k, v in sizes.items() if v is not None})


def materialize(
    bundle_path: Path,
    out: Path,
    *,
    depth: int | list[int] | None = None,
    width: int | list[int] | None = None,
    mlp_ratio: float | None = None,
    num_heads: int | None = None,
    num_classes: int | None = None,
    depth_rule: str = "auto",
    width_rule: str = "tile",
    scalers: Path | None = None,
    dtype: str = "float32",
    calibrate: str | None = None,
    calibrate_batches: int = 20,
    calibrate_batch_size: int = 64,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """`depth`/`width`: one number, or one per stage for families with stages (ResNet). `calibrate`
    names data for re-estimating BatchNorm statistics (see calibrate.py); `progress(batch, total)`."""
    out = Path(out)
    check_output(out, force)
    if dtype not in DTYPES:
        raise WeitError(f"unknown dtype '{dtype}'", f"choose one of: {', '.join(DTYPES)}")
    if depth_rule not in DEPTH_RULES:
        raise WeitError(f"unknown depth rule '{depth_rule}'", f"choose one of: {', '.join(DEPTH_RULES)}")
    if width_rule not in WIDTH_RULES:
        raise WeitError(f"unknown width rule '{width_rule}'", f"choose one of: {', '.join(WIDTH_RULES)}")
    if calibrate is not None and (calibrate_batches < 1 or calibrate_batch_size < 2):
        raise WeitError(
            f"--calibrate needs at least 1 batch of 2 or more images, got {calibrate_batches} × {calibrate_batch_size}",
            "pass --calibrate-batches 1 or more and --calibrate-batch-size 2 or more",
        )
    bundle, bsha = load_bundle(bundle_path)
    target = plan_target(bundle, depth=depth, width=width, mlp_ratio=mlp_ratio, num_heads=num_heads, num_classes=num_classes)
    if scalers is not None:
        sized = load_scalers(scalers, bundle, bsha, target)
    else:
        with torch.no_grad(), one_thread():
            sized = resize(bundle, target, depth_rule, width_rule)
    bn_stats = None
    if calibrate is not None:
        sized, bn_stats = _calibrate(sized, calibrate, calibrate_batches, calibrate_batch_size, seed, progress)
    elif sized.adapter.batchnorm:
        src = "the scalers file's" if scalers is not None else "the bundle's"
        bn_stats = f"{src}, resized (not recalibrated; pass --calibrate DATA to re-estimate them)"
        if scalers is None and target == bundle.arch:
            bn_stats = "the bundle's (same size; not recalibrated)"
            if str(bundle.extra.get("provenance", {}).get("command", "")).startswith("weit pretrain"):
                bn_stats = "the bundle's (same size; re-estimated at the end of pretraining)"
        fitted = _fitted_bn_statistics(scalers) if scalers is not None else None
        if fitted:
            bn_stats = f"the scalers file's, {fitted} by fit-scalers"
    provenance = {
        "command": "materialize",
        "bundle_sha256": bsha,
        "scalers_sha256": sha256(scalers) if scalers else None,
        "depth_rule": depth_rule,
        "width_rule": width_rule,
        "bn_statistics": bn_stats,
    }
    files = write_model(sized, out, DTYPES[dtype], provenance, force)
    return {
        "command": "materialize",
        "output": str(out),
        "files": files,
        "architecture": target.to_dict(),
        "description": sized.adapter.describe(target),
        "timm_architecture": sized.adapter.timm_config(target)["architecture"],
        "timm": sized.adapter.timm_config(target)["model_args"],
        "params": sum(_numel(sized.dense_shape(k)) for k in sized.dense_keys()),
        "bn_statistics": bn_stats,
    }


def _fitted_bn_statistics(path: Path) -> str | None:
    """What fit-scalers recorded about the BatchNorm statistics it stored (None: not recalibrated)."""
    try:
        prov = json.loads((read_header(path).get("__metadata__") or {}).get("provenance", "{}"))
    except ValueError:
        return None
    value = prov.get("bn_statistics") if isinstance(prov, dict) else None
    return value if isinstance(value, str) else None


def _calibrate(sized: Bundle, source: str, batches: int, batch_size: int, seed: int, progress) -> tuple[Bundle, str]:
    """Re-estimate the BatchNorm running statistics of the materialized model on `source`."""
    from .calibrate import STAT_SUFFIXES, recalibrate_bn
    from .data import load_data

    ad, arch = sized.adapter, sized.arch
    if not ad.batchnorm:
        raise WeitError(f"a {ad.family} has no BatchNorm statistics to calibrate", "leave out --calibrate")
    splits = load_data(source, img_size=arch.img_size, in_chans=arch.in_chans, seed=seed)
    model = ad.build(arch)
    with torch.no_grad():
        model.load_state_dict(sized.state_dict())
    used = recalibrate_bn(model, splits.train, batches, batch_size, seed=seed, progress=progress)
    state = model.state_dict()
    small = {k: (state[k].detach().clone() if k.endswith(STAT_SUFFIXES) else v) for k, v in sized.small.items()}
    sized = Bundle(ad, arch, sized.templates, sized.scalers, small, dict(sized.extra))
    return sized, f"recalibrated on {splits.description} ({used['batches']} batches, {used['images']} images, seed {seed})"



def write_model(sized: Bundle, out: Path, dtype: torch.dtype, provenance: dict[str, Any], force: bool) -> list[str]:
    """Stream the composed dense weights to `out` (bare .safetensors, or a timm local-dir folder)."""
    cfg = sized.adapter.timm_config(sized.arch)
    meta = {
        "format": "pt",
        "producer": f"weit {__version__}",
        "family": sized.adapter.family,
        "model_args": json.dumps(cfg["model_args"], sort_keys=True),
        "pretrained_cfg": json.dumps(cfg["pretrained_cfg"], sort_keys=True),  # input size (CNNs are size-agnostic)
        "architecture": cfg["architecture"],
        "provenance": json.dumps(provenance, sort_keys=True),
    }

    def dtype_of(k: str) -> torch.dtype:  # counters (BatchNorm's num_batches_tracked) keep their integer type
        return sized.small[k].dtype if k in sized.small and not sized.small[k].is_floating_point() else dtype

    dense = _Streamer(sized)
    spec_list = [(k, sized.dense_shape(k), dtype_of(k), (lambda k=k: dense(k, dtype_of(k)))) for k in sized.dense_keys()]
    if out.suffix == ".safetensors":
        with atomic_file(out, replace=force) as tmp, one_thread():
            write_safetensors(tmp, spec_list, meta)
        return [str(out)]
    with atomic_dir(out, force) as tmp, one_thread():
        write_safetensors(tmp / "model.safetensors", spec_list, meta)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return [str(out / "model.safetensors"), str(out / "config.json")]


class _Streamer:
    """Composes one dense tensor at a time into reused buffers. write_safetensors writes each tensor
    before it asks for the next, so one output buffer suffices; composing into fresh memory instead
    costs as much in page faults as the matmuls, and this keeps the peak at the largest weight."""

    def __init__(self, b: Bundle):
        self.b = b
        self.size = max((_numel(b.dense_shape(k)) for k in b.scalers), default=0)
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def _buf(self, role: str, dtype: torch.dtype) -> torch.Tensor:
        if (role, dtype) not in self.bufs:
            self.bufs[role, dtype] = torch.empty(self.size, dtype=dtype)
        return self.bufs[role, dtype]

    @torch.no_grad()
    def __call__(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        b = self.b
        if key in b.small:
            return b.small[key].to(dtype)
        s, t = b.scalers[key], b.template_of(key)
        ct = torch.promote_types(s.dtype, t.dtype)
        out = self._buf("out", dtype)[: _numel(b.dense_shape(key))]
        return kron.compose(s.to(ct), t.to(ct), out=out, work=self._buf("work", ct))


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


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
