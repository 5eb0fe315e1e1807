"""`fit-scalers` (docs/fit-and-finetune.md): adapt a bundle to one target size with the templates frozen.

The target's scalers (and, unless switched off, its small parameters) start from the resizing rules
of docs/method.md §4 and are trained for a few hundred steps on a small labelled set; optionally the bundle's
own, largest model is a distillation teacher (KL on logits). The forward pass runs through the real
timm module of the target size with the composed weights (`torch.func.functional_call`), so what is
fitted is exactly what `materialize --scalers` writes out.

BatchNorm families: during fitting each batch is normalised with its own statistics; after
the last step the target's running statistics are re-estimated over `calibrate_batches` batches of
the fitting data (`calibrate.recalibrate_bn`, no weight changes) and stored with the scalers, so a
size whose statistics the bundle never observed gets them from its own activations.

The output is a `weit.scalers` file: `scalers.<dense key>` and `small.<dense key>` tensors for the
whole target model, bound to its bundle by the bundle's sha256 and to its size by the target
architecture record; `api.load_scalers` checks both.

A fit is resumable as `pretrain` is: every `checkpoint_every` steps the scalers, small parameters,
optimizer, RNG states and data position go to OUT's stem + `.ckpt.safetensors`; `--resume` continues
from there and writes the very bytes an uninterrupted fit writes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weit_cli.core.bundle import (
    COMPANIONS,
    Bundle,
    check_state,
    load_bundle,
    resize,
    templates_record,
)
from weit_cli.errors import InputError, WeitError
from weit_cli.io.checkpoint import checkpoint_for, checkpoint_paths
from weit_cli.io.files import (
    KIND_SCALERS,
    base_metadata,
    check_output,
    remove_stale_temps,
    save_tensors,
)
from weit_cli.options import FIT_SCALERS, SEED

if TYPE_CHECKING:
    from torch import Tensor, nn


def fit_scalers(
    bundle_path: Path,
    out: Path,
    *,
    data: str,
    depth: int | list[int] | None = None,
    width: int | list[int] | None = None,
    mlp_ratio: float | None = None,
    num_classes: int | None = None,
    steps: int = FIT_SCALERS.steps,
    lr: float = FIT_SCALERS.lr,
    batch_size: int = FIT_SCALERS.batch_size,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    train_subset: float | int | None = None,
    train_small: bool = True,
    reset_head: bool = False,
    distill: float = FIT_SCALERS.distill,
    temperature: float = FIT_SCALERS.temperature,
    depth_rule: str = FIT_SCALERS.depth_rule,
    width_rule: str = FIT_SCALERS.width_rule,
    seed: int = SEED,
    device: str | None = None,
    force: bool = False,
    resume: bool = False,
    checkpoint_every: int = FIT_SCALERS.checkpoint_every,
    on_step: Callable[[Any], None] | None = None,
    calibrate_batches: int = FIT_SCALERS.calibrate_batches,
) -> dict[str, Any]:
    """Fit target-size scalers; returns what was done (losses, accuracies, time) and written.
    `depth`/`width`: one number, or one per stage (families with stages). `resume` continues from the checkpoint
    beside `out` (see the module doc)."""
    from weit_cli.core.bundle import plan_target
    from weit_cli.io.files import sha256
    from weit_cli.tasks._registry import task_for

    out = Path(out)
    ckpt = checkpoint_for(out)
    check_output(out, force or resume)  # a resumed fit may replace what it wrote itself (see pretrain)
    if not 1 <= steps <= 10_000_000:
        raise WeitError(f"--steps must be in 1..10000000, got {steps}", "a few hundred steps is typical")
    if not (lr > 0 and math.isfinite(lr)) or batch_size < 1:
        raise WeitError(f"--lr must be positive and finite and --batch-size at least 1, got {lr:g} and {batch_size}", "e.g. --lr 1e-3 --batch-size 64")
    if not 0.0 <= distill <= 1.0:
        raise WeitError(f"--distill must be in [0, 1], got {distill}", "0 turns distillation off, 0.5 weighs KL and CE equally")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise WeitError(f"--temperature must be positive, got {temperature}", "1.0 is plain KL on the logits")
    from weit_cli.core.resize import check_rules

    check_rules(depth_rule, width_rule)
    if calibrate_batches < 1:
        raise WeitError(f"--calibrate-batches must be at least 1, got {calibrate_batches}", "20 batches is typical")
    warmup = max(1, steps // 10) if warmup is None else warmup
    if warmup < 0:
        raise WeitError(f"--warmup must be 0 or more steps, got {warmup}", "e.g. --warmup 20")
    if checkpoint_every < 0:
        raise WeitError(f"--checkpoint-every must be 0 (never) or more steps, got {checkpoint_every}", f"e.g. --checkpoint-every {FIT_SCALERS.checkpoint_every}")
    # the options are checked: now torch and the training code
    import torch
    from torch import nn

    from weit_cli.training.batches import Batches
    from weit_cli.training.dist import resolve_device, seed_everything
    from weit_cli.training.loop import Loop, Plan, check_resume
    from weit_cli.training.nested import composed_forward
    from weit_cli.training.optim import adamw, lr_at

    check_resume(ckpt, resume, force)
    dev = resolve_device(device)

    bundle, bsha = load_bundle(bundle_path)
    arch0 = bundle.arch
    task = task_for(bundle.adapter)
    task.adopt(bundle.extra.get(COMPANIONS) or {})  # data prepared as the bundle was trained on
    splits = task.load_data(data, arch0, seed=seed, train_subset=train_subset)
    classes = task.classes(splits)
    if classes is None and (num_classes is not None or reset_head):
        raise WeitError(f"--num-classes and --reset-head are for classifiers; a {bundle.adapter.family} has no classes", "leave them out")
    if num_classes is None:
        num_classes = classes
    if num_classes != classes:
        raise WeitError(
            f"--num-classes {num_classes} but the data has {classes} classes",
            f"leave --num-classes out or pass --num-classes {classes}",
        )
    target = plan_target(bundle, depth=depth, width=width, mlp_ratio=mlp_ratio, num_classes=num_classes)
    new_classes = classes is not None and target.num_classes != arch0.num_classes
    if distill > 0 and (reset_head or new_classes):
        raise WeitError(
            "distillation needs the bundle's own classes, but the classifier is new (other data or --reset-head)",
            "fit without --distill on data with other classes",
        )

    seed_everything(seed)
    with torch.no_grad():
        init = resize(bundle, target, depth_rule, width_rule)
    module = bundle.adapter.build(target).to(dev)
    learnable = {n for n, _ in module.named_parameters()}  # small tensors that are not buffers (BatchNorm stats)
    templates = {t: v.detach().to(dev) for t, v in bundle.templates.items()}
    scalers = {k: nn.Parameter(v.detach().clone().float().to(dev)) for k, v in init.scalers.items()}
    small: dict[str, Tensor] = {}
    for k, v in init.small.items():
        v = v.detach().clone().to(dev)
        small[k] = nn.Parameter(v.float(), requires_grad=train_small) if k in learnable else v
    new_head: list[str] = []
    if reset_head or new_classes:  # a new classifier: timm's init, always trained
        head = _fresh_head(bundle.adapter, target, seed, dev)
        small.update(head)
        new_head = sorted(head)
    sized = Bundle(bundle.adapter, target, templates, scalers, small, dict(bundle.extra))
    check_state(bundle.adapter, target, {k: v.detach() for k, v in sized.state_dict().items()})
    module.train()
    student = composed_forward(module, sized)

    teacher = None
    if distill > 0:
        teacher_mod = bundle.adapter.build(arch0).to(dev).eval()
        with torch.no_grad():
            teacher_mod.load_state_dict(bundle.state_dict(), strict=True)
        teacher_mod.requires_grad_(False)
        teacher = bundle.adapter.task_forward(teacher_mod)

    trainable = {f"scalers.{k}": v for k, v in scalers.items()}
    trainable.update({f"small.{k}": v for k, v in small.items() if k in learnable and (train_small or k in new_head)})
    opt = adamw(trainable, lr=lr, weight_decay=weight_decay, no_decay_keys=bundle.adapter.no_decay)

    def frozen_eval(dataset):
        frozen = Bundle(
            bundle.adapter, target, templates,
            {k: v.detach() for k, v in scalers.items()}, {k: v.detach() for k, v in small.items()},
        )
        module.eval()
        try:
            return task.evaluate(composed_forward(module, frozen), dataset, device=dev)
        finally:
            module.train()

    before = frozen_eval(splits.val)
    batches = Batches(splits.train, batch_size, seed)
    provenance = {
        "command": "fit-scalers",
        "bundle_sha256": bsha,
        "data": splits.description,
        "steps": steps,
        "lr": lr,
        "warmup": warmup,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "train_small": train_small,
        "reset_head": bool(new_head),
        "distill": distill,
        "temperature": temperature,
        "depth_rule": depth_rule,
        "width_rule": width_rule,
        "seed": seed,
    }
    run = {**provenance, "architecture": target.to_dict(), "calibrate_batches": calibrate_batches}
    run_sha = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()

    def loss_step(batch):
        batch = task.prepare(batch)
        out = task.outputs(student, batch)
        loss = task.loss(out, batch)
        if teacher is not None:
            with torch.no_grad():
                t_out = task.outputs(teacher, batch)
            loss = (1 - distill) * loss + distill * task.distill_loss(out, t_out, batch, temperature)
        return loss

    plan = Plan(
        steps, lambda step: lr_at(step, base_lr=lr, total_steps=steps, warmup_steps=warmup), 1.0,
        checkpoint_every=checkpoint_every, diverged="the loss became {loss} at step {step}", diverged_hint="lower --lr",
    )
    everything = {f"scalers.{k}": v for k, v in scalers.items()}  # a checkpoint holds all of the fit's tensors
    everything.update({f"small.{k}": v for k, v in small.items()})
    loop = Loop(
        plan, optimizer=opt, params=trainable, batches=batches, device=dev, loss_step=loss_step, checkpoint=ckpt,
        tensors=lambda: everything, state=lambda: {"run_sha256": run_sha, "losses": loop.losses}, on_step=on_step,
    )
    if resume:
        for p in (out, *checkpoint_paths(ckpt)):  # what a killed writer left half-written
            remove_stale_temps(p)

        def same_fit(state):
            if state.get("run_sha256") != run_sha:
                raise InputError(
                    f"{ckpt} was written by a fit with other options, data or bundle",
                    "resume with the same command, or start over with --force",
                )

        loop.losses = [float(v) for v in loop.resume(same_fit)["losses"]]
    loop.run()
    fit_time, losses = loop.seconds, loop.losses
    bn_stats = None
    if bundle.adapter.batchnorm:
        bn_stats = _recalibrate(module, sized, small, splits, calibrate_batches, batch_size, seed, dev)
    after = frozen_eval(splits.val)

    tensors = {f"scalers.{k}": v.detach().cpu() for k, v in scalers.items()}
    tensors.update({f"small.{k}": v.detach().cpu() for k, v in small.items()})
    templates_meta = templates_record(bundle.templates)
    if bn_stats is not None:
        provenance["bn_statistics"] = bn_stats
    files = task.companion_files(splits)  # the fitting data's record (state statistics): materialize --scalers writes it
    meta = base_metadata(
        KIND_SCALERS,
        architecture=target.to_dict(),
        bundle_sha256=bsha,
        templates=templates_meta,
        provenance=provenance,
        **({COMPANIONS: files} if files else {}),
    )
    save_tensors(out, tensors, meta, force or resume)
    loop.discard_checkpoint()
    window = max(1, min(20, steps // 5))
    return {
        "command": "fit-scalers",
        "output": str(out),
        "sha256": sha256(out),
        "bundle_sha256": bsha,
        "architecture": target.to_dict(),
        "description": bundle.adapter.describe(target),
        "size_options": bundle.adapter.size_options(target),  # for 'materialize --scalers'
        "steps": steps,
        "resumed_from": loop.start if resume else None,
        "trained": ["scalers", "small"] if train_small else ["scalers", *(["classifier"] if new_head else [])],
        "params": sum(v.numel() for v in trainable.values()),
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        f"val_{task.metric_key}_before": before.metric,
        f"val_{task.metric_key}_after": after.metric,
        "metric": task.metric_name,
        "val_count": after.count,
        "fit_seconds": fit_time,
        "data": splits.description,
        "bn_statistics": bn_stats,
    }


def _recalibrate(module: nn.Module, sized: Bundle, small: dict[str, Tensor], splits, batches: int, batch_size: int, seed: int, dev) -> str:
    """Re-estimate the fitted model's BatchNorm statistics on the fitting data; updates `small` in place."""
    import torch

    from weit_cli.training.calibrate import recalibrate_bn, recalibrated

    with torch.no_grad():
        stats, used = recalibrated(
            module, sized.state_dict(), lambda m: recalibrate_bn(m, splits.train, batches, max(2, batch_size), seed=seed, device=dev),
        )
    small.update({k: stats[k] for k in small if k in stats})
    module.train()
    return f"recalibrated on the fitting data ({used['batches']} batches, {used['images']} images, seed {seed})"


def _fresh_head(adapter, arch, seed: int, dev: torch.device) -> dict[str, nn.Parameter]:
    from torch import nn

    from weit_cli.core.selection import random_init

    fresh = random_init(adapter, arch, seed)
    return {k: nn.Parameter(fresh[k].float().to(dev)) for k in adapter.classifier if k in fresh}
