"""`weit extract-templates`: a template bundle from a dense checkpoint by the shared truncated SVD
(docs/method.md §3), optionally refined by distillation on data (commands/distill.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from weit_cli.core.bundle import COMPANIONS, Bundle
from weit_cli.core.extract import from_dense
from weit_cli.errors import WeitError
from weit_cli.io.dense import read_dense
from weit_cli.io.bundle_file import save_bundle
from weit_cli.io.files import check_output, checkpoint_sha256
from weit_cli.io.hub import resolve as resolve_source
from weit_cli.options import DISTILL, EXTRACT, SEED, DistillOptions, ExtractOptions, check


def extract_templates(
    checkpoint: Path,
    out: Path,
    *,
    template_size: int | None = None,
    num_templates: int = EXTRACT.num_templates,
    num_heads: int | None = None,
    img_size: int | None = None,
    data: str | None = None,
    distill_steps: int | None = None,
    distill_lr: float | None = None,
    batch_size: int | None = None,
    temperature: float = DISTILL.temperature,
    seed: int = SEED,
    device: str | None = None,
    force: bool = False,
    on_step: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Data-free SVD extraction; with `data`, then WAVE-style distillation (distill.py) from the checkpoint."""
    check_output(out, force)
    distill_steps, distill_lr, batch_size = _check_options(
        data, distill_steps, distill_lr, batch_size, temperature, seed, device, num_templates, template_size, num_heads,
    )
    checkpoint, hub = resolve_source(checkpoint)
    overrides = {k: v for k, v in (("num_heads", num_heads), ("img_size", img_size)) if v is not None}
    dense = read_dense(checkpoint, **overrides)
    adapter, arch, state = dense.adapter, dense.arch, dense.state
    from weit_cli.tasks._registry import task_for

    task = task_for(adapter)
    files = task.companions_of(checkpoint)  # e.g. a control model's state statistics, read before any work
    bundle, errors = from_dense(adapter, arch, state, template_size, num_templates)
    provenance = {
        "command": "extract-templates",
        "source_sha256": checkpoint_sha256(checkpoint),
        "template_size": template_size,
        "num_templates": num_templates,
        "reconstruction_error": {k: round(v, 8) for k, v in errors.items()},
    }
    if hub is not None:
        provenance["source"] = hub
    report = None
    if data is not None:
        from weit_cli.commands.distill import distill

        task.adopt(files)  # the teacher's input convention
        splits = task.load_data(data, arch, seed=seed)
        bundle, report = distill(
            bundle, state, splits, task, steps=distill_steps, lr=distill_lr, batch_size=batch_size,
            temperature=temperature, seed=seed, device=device, on_step=on_step,
        )
        report["relative_error_after"] = _relative_errors(bundle, state)
        provenance["distillation"] = _distillation_record(report)
        files = files or task.companion_files(splits)
    if files:  # the source's own record of its data wins: the student imitates the source's function
        bundle.extra[COMPANIONS] = files
    save_bundle(out, bundle, provenance, force)
    return _result(out, arch, bundle, errors, hub, report, data)


def _distillation_record(report: dict[str, Any]) -> dict[str, Any]:
    """The distillation report as the bundle's provenance keeps it: without its wall time (same inputs
    → same bytes) and without the role-keyed aliases of the metric (`student_metric_after`,
    `metric_info`), which results carry for pipelines but files have never held."""
    aliases = {"metric_info", "teacher_metric", "student_metric_before", "student_metric_after"}
    return {k: v for k, v in report.items() if k != "seconds" and k not in aliases}


def _check_options(data, distill_steps, distill_lr, batch_size, temperature, seed, device, num_templates, template_size, num_heads):
    """Refuse an option out of range, in one line; returns the distillation's steps, learning rate and
    batch size with their defaults filled in (when there is `data` to distil on)."""
    if data is None and (distill_steps is not None or distill_lr is not None or batch_size is not None):
        raise WeitError("--distill-steps, --distill-lr and --batch-size need --data", "pass --data DATA to distil, or leave them out")
    if data is not None:
        distill_steps = DISTILL.steps if distill_steps is None else distill_steps
        distill_lr = DISTILL.lr if distill_lr is None else distill_lr
        batch_size = DISTILL.batch_size if batch_size is None else batch_size
        check(DistillOptions, steps=distill_steps, lr=distill_lr, batch_size=batch_size, temperature=temperature, seed=seed)
        from weit_cli.training.dist import resolve_device

        resolve_device(device)
    check(ExtractOptions, num_templates=num_templates, template_size=template_size, num_heads=num_heads)
    return distill_steps, distill_lr, batch_size


def _result(out: Path, arch, bundle: Bundle, errors: dict[str, float], hub, report, data) -> dict[str, Any]:
    result = {
        "command": "extract-templates",
        "output": str(out),
        "architecture": arch.to_dict(),
        "templates": {t: list(v.shape) for t, v in bundle.templates.items()},
        "relative_error": errors,
        "params": bundle.param_counts(),
    }
    if hub is not None:
        result["source"] = hub
    if report is not None:
        result["distillation"] = report
    warning = _poor_reconstruction(errors) if data is None else None
    if warning is not None:
        result["warnings"] = [warning]
    return result


# Above this relative error the bundle's source size computes a different function than the source:
# on real trained weights (all-MiniLM-L6-v2's encoder, 32×32 templates) the data-free SVD leaves 0.95
# at N = 32 and 0.84 at N = 128, barely better than Gaussian matrices of the same shapes (docs/method.md §3).
HIGH_ERROR = 0.5


def _poor_reconstruction(errors: dict[str, float]) -> str | None:
    """A one-line warning (with what to do) when any type reconstructs its weights poorly."""
    bad = {t: e for t, e in errors.items() if e > HIGH_ERROR}
    if not bad:
        return None
    listed = ", ".join(f"{t} {e:.2f}" for t, e in sorted(bad.items(), key=lambda kv: -kv[1]))
    return (
        f"the templates reconstruct the checkpoint poorly (relative error {listed}; above {HIGH_ERROR} the "
        "bundle computes a different function): pass --data DATA to distil them from the checkpoint, "
        "use more templates (--num-templates), or for every size of a range train a nested family from it "
        "with `weit pretrain RECIPE --teacher CHECKPOINT`"
    )


def _relative_errors(bundle: Bundle, state: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖W − Σ S⊗T‖/‖W‖ per template type against the source weights."""
    from weit_cli.core.kron import relative_error

    by_type: dict[str, list[str]] = {}
    for k in bundle.scalers:
        by_type.setdefault(bundle.adapter.template_type_of(k, bundle.arch), []).append(k)
    return {
        t: relative_error([state[k].float() for k in keys], [bundle.scalers[k] for k in keys], bundle.templates[t])
        for t, keys in by_type.items()
    }


