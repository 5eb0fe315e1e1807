"""`weit materialize`: a bundle (optionally with fitted scalers) resized to a target size and written as
an ordinary checkpoint; BatchNorm statistics can be re-estimated on data."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from weit_cli.core.bundle import Bundle
from weit_cli.core.resize import depth_rule_warnings, plan_target, resize, trained_depth_rule
from weit_cli.io.bundle_file import load_bundle, load_scalers
from weit_cli.errors import WeitError
from weit_cli.io.export import exporter_for, write_model
from weit_cli.io.files import check_output, one_thread, read_header, sha256
from weit_cli.options import MATERIALIZE, SEED, Dtype, MaterializeOptions, check

DTYPES = get_args(Dtype)  # torch's names: torch is imported once the arguments are checked


def materialize(
    bundle_path: Path,
    out: Path,
    *,
    depth: int | list[int] | None = None,
    width: int | list[int] | None = None,
    mlp_ratio: float | None = None,
    num_heads: int | None = None,
    num_classes: int | None = None,
    depth_rule: str = MATERIALIZE.depth_rule,
    width_rule: str = MATERIALIZE.width_rule,
    scalers: Path | None = None,
    dtype: str = MATERIALIZE.dtype,
    calibrate: str | None = None,
    calibrate_batches: int = MATERIALIZE.calibrate_batches,
    calibrate_batch_size: int = MATERIALIZE.calibrate_batch_size,
    seed: int = SEED,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """`depth`/`width`: one number, or one per stage for families with stages. `calibrate`
    names data for re-estimating BatchNorm statistics (see calibrate.py); `progress(batch, total)`."""
    out = Path(out)
    check_output(out, force)
    calibration = dict(calibrate_batches=calibrate_batches, calibrate_batch_size=calibrate_batch_size) if calibrate is not None else {}
    check(MaterializeOptions, depth_rule=depth_rule, width_rule=width_rule, dtype=dtype, seed=seed, **calibration)
    bundle, bsha = load_bundle(bundle_path)  # a missing or foreign file is refused before torch is imported
    target = plan_target(bundle, depth=depth, width=width, mlp_ratio=mlp_ratio, num_heads=num_heads, num_classes=num_classes)
    import torch

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
    files = write_model(sized, out, getattr(torch, dtype), provenance, force)
    export = exporter_for(sized.adapter, out).summary(target, out)
    warnings = depth_rule_warnings(bundle.arch.depth, target.depth, depth_rule, trained_depth_rule(bundle.extra)) if scalers is None else []
    return {
        "command": "materialize",
        "output": str(out),
        "files": files,
        "architecture": target.to_dict(),
        "description": sized.adapter.describe(target),
        # the keys of results before the export seam (the summary's format-specific fields)
        "timm_architecture": export.get("architecture"),
        "timm": export.get("model_args"),
        "export": export,
        "params": sum(math.prod(sized.dense_shape(k)) for k in sized.dense_keys()),
        "bn_statistics": bn_stats,
        **({"warnings": warnings} if warnings else {}),
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
    import torch

    from weit_cli.data.images import load_data
    from weit_cli.training.calibrate import recalibrate_bn, recalibrated

    ad, arch = sized.adapter, sized.arch
    if not ad.batchnorm:
        raise WeitError(f"a {ad.family} has no BatchNorm statistics to calibrate", "leave out --calibrate")
    splits = load_data(source, img_size=arch.img_size, in_chans=arch.in_chans, seed=seed)
    with torch.no_grad():
        stats, used = recalibrated(
            ad.build(arch), sized.state_dict(),
            lambda model: recalibrate_bn(model, splits.train, batches, batch_size, seed=seed, progress=progress),
        )
    small = {k: stats.get(k, v) for k, v in sized.small.items()}
    sized = Bundle(ad, arch, sized.templates, sized.scalers, small, dict(sized.extra))
    return sized, f"recalibrated on {splits.description} ({used['batches']} batches, {used['images']} images, seed {seed})"



