"""`fit-scalers` (docs/fit-and-finetune.md): adapt a bundle to one target size with the templates frozen.

The target's scalers (and, unless switched off, its small parameters) start from the resizing rules
of docs/method.md §4 and are trained for a few hundred steps on a small labelled set; optionally the bundle's
own, largest model is a distillation teacher (KL on logits). The forward pass runs through the family's real
module of the target size with the composed weights (`torch.func.functional_call`), so what is
fitted is exactly what `materialize --scalers` writes out.

BatchNorm families: during fitting each batch is normalised with its own statistics; after
the last step the target's running statistics are re-estimated over `calibrate_batches` batches of
the fitting data (`calibrate.recalibrate_bn`, no weight changes) and stored with the scalers, so a
size whose statistics the bundle never observed gets them from its own activations.

The output is a `weit.scalers` file: `scalers.<dense key>` and `small.<dense key>` tensors for the
whole target model, bound to its bundle by the bundle's sha256 and to its size by the target
architecture record; `io.bundle_file.load_scalers` checks both.

A fit is resumable as `pretrain` is: every `checkpoint_every` steps the scalers, small parameters,
optimizer, RNG states and data position go to OUT's stem + `.ckpt.safetensors`; `--resume` continues
from there and writes the very bytes an uninterrupted fit writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weit_cli.core.bundle import COMPANIONS, Bundle
from weit_cli.core.checks import check_state
from weit_cli.core.resize import depth_rule_warnings, resize, trained_depth_rule
from weit_cli.errors import InputError, WeitError
from weit_cli.io.bundle_file import ScalersFile, load_bundle, save_scalers
from weit_cli.io.checkpoint import checkpoint_for, checkpoint_paths
from weit_cli.io.files import check_output, remove_stale_temps
from weit_cli.options import FIT_SCALERS, SEED, FitScalersOptions, check
from weit_cli.training.resume import fingerprint

if TYPE_CHECKING:
    import torch
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
    out = Path(out)
    ckpt = checkpoint_for(out)
    check_output(out, force or resume)  # a resumed fit may replace what it wrote itself (see pretrain)
    warmup = _check_options(steps, lr, batch_size, distill, temperature, depth_rule, width_rule, calibrate_batches, warmup, checkpoint_every, seed)
    # the options are checked (answered before torch is imported): now the training code
    from weit_cli.tasks._registry import task_for
    from weit_cli.training.batches import Batches
    from weit_cli.training.dist import resolve_device, seed_everything
    from weit_cli.training.loop import check_resume
    from weit_cli.training.optim import adamw
    from weit_cli.training.sized import frozen_forward

    check_resume(ckpt, resume, force)
    dev = resolve_device(device)

    bundle, bsha = load_bundle(bundle_path)
    task = task_for(bundle.adapter)
    task.adopt(bundle.extra.get(COMPANIONS) or {})  # data prepared as the bundle was trained on
    splits = task.load_data(data, bundle.arch, seed=seed, train_subset=train_subset)
    target, new_classes = _plan_target(bundle, task, splits, depth, width, mlp_ratio, num_classes, reset_head, distill)
    seed_everything(seed)
    student, new_head = _student(bundle, target, depth_rule, width_rule, train_small, reset_head or new_classes, seed, dev)
    teacher = frozen_forward(bundle.adapter, bundle.arch, bundle.state_dict(), dev) if distill > 0 else None
    trainable = student.trainable(new_head)
    opt = adamw(trainable, lr=lr, weight_decay=weight_decay, no_decay_keys=bundle.adapter.no_decay)

    before = student.evaluate(task, splits.val, dev)
    batches = Batches(splits.train, batch_size, seed)
    provenance = {"command": "fit-scalers", "bundle_sha256": bsha, "data": splits.description, **dict(
        steps=steps, lr=lr, warmup=warmup, batch_size=batch_size, weight_decay=weight_decay, train_small=train_small,
        reset_head=bool(new_head), distill=distill, temperature=temperature, depth_rule=depth_rule, width_rule=width_rule, seed=seed,
    )}
    run = {**provenance, "architecture": target.to_dict(), "calibrate_batches": calibrate_batches}
    run_sha = fingerprint(run)
    loop = _train(
        task, student, teacher, trainable, opt, batches, dev, out, ckpt, run_sha, steps=steps, lr=lr, warmup=warmup,
        distill=distill, temperature=temperature, checkpoint_every=checkpoint_every, resume=resume, on_step=on_step,
    )
    bn_stats = None
    if bundle.adapter.batchnorm:
        bn_stats = _recalibrate(student.module, student.bundle(), student.small, splits, calibrate_batches, batch_size, seed, dev)
    after = student.evaluate(task, splits.val, dev)
    if bn_stats is not None:
        provenance["bn_statistics"] = bn_stats
    save_scalers(out, ScalersFile(student.scalers, student.small), student.arch, bundle, bsha, provenance, task.companion_files(splits), force or resume)
    loop.discard_checkpoint()
    return _summary(out, bundle, bsha, target, task, splits, loop, trainable, before, after, steps=steps, resume=resume,
                    train_small=train_small, new_head=new_head, bn_stats=bn_stats, depth_rule=depth_rule)


def _check_options(steps, lr, batch_size, distill, temperature, depth_rule, width_rule, calibrate_batches, warmup, checkpoint_every, seed) -> int:
    """Refuse an option out of range, in one line (options.FitScalersOptions); returns the warmup (a
    tenth of the steps by default)."""
    check(
        FitScalersOptions, steps=steps, lr=lr, batch_size=batch_size, distill=distill, temperature=temperature, depth_rule=depth_rule,
        width_rule=width_rule, calibrate_batches=calibrate_batches, warmup=warmup, checkpoint_every=checkpoint_every, seed=seed,
    )
    return max(1, steps // 10) if warmup is None else warmup


def _plan_target(bundle: Bundle, task, splits, depth, width, mlp_ratio, num_classes, reset_head: bool, distill: float):
    """(the target architecture, whether its classifier is new): the size asked for, with the data's classes."""
    from weit_cli.core.resize import plan_target

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
    new_classes = classes is not None and target.num_classes != bundle.arch.num_classes
    if distill > 0 and (reset_head or new_classes):
        raise WeitError(
            "distillation needs the bundle's own classes, but the classifier is new (other data or --reset-head)",
            "fit without --distill on data with other classes",
        )
    return target, new_classes


def _student(bundle: Bundle, target, depth_rule: str, width_rule: str, train_small: bool, fresh_head: bool, seed: int, dev):
    """(the student at `target`'s size, the keys of its new classifier): the bundle resized by the
    rules, templates frozen; with `fresh_head` a new classifier (timm's init, always trained)."""
    import torch

    from weit_cli.training.sized import SizedModel

    with torch.no_grad():
        init = resize(bundle, target, depth_rule, width_rule)
    module = bundle.adapter.build(target).to(dev)
    student = SizedModel(
        bundle.adapter, target, bundle.templates, init.scalers, init.small, bundle.extra, module, dev,
        train_templates=False, train_small=train_small, float_small=True,
    )
    new_head: list[str] = []
    if fresh_head:
        head = _fresh_head(bundle.adapter, target, seed, dev)
        student.small.update(head)
        new_head = sorted(head)
    check_state(bundle.adapter, target, {k: v.detach() for k, v in student.bundle().state_dict().items()})
    module.train()
    return student, new_head


def _train(task, student, teacher, trainable, opt, batches, dev, out: Path, ckpt: Path, run_sha: str, *, steps, lr, warmup,
           distill, temperature, checkpoint_every, resume, on_step):
    """The fit's loop, run (continued from the checkpoint with `resume`); returns it, for its losses and time."""
    from weit_cli.training.loop import Loop, Plan
    from weit_cli.training.optim import lr_at
    from weit_cli.training.resume import same_run
    from weit_cli.training.sized import distill_loss_step

    forward = student.forward()

    def loss_step(batch):
        if teacher is not None:
            return distill_loss_step(task, forward, teacher, batch, temperature=temperature, task_weight=1 - distill, distill_weight=distill)
        batch = task.prepare(batch)
        return task.loss(task.outputs(forward, batch), batch)

    plan = Plan(
        steps, lambda step: lr_at(step, base_lr=lr, total_steps=steps, warmup_steps=warmup), 1.0,
        checkpoint_every=checkpoint_every, diverged="the loss became {loss} at step {step}", diverged_hint="lower --lr",
    )
    everything = student.tensors()  # a checkpoint holds all of the fit's tensors
    loop = Loop(
        plan, optimizer=opt, params=trainable, batches=batches, device=dev, loss_step=loss_step, checkpoint=ckpt,
        tensors=lambda: everything, state=lambda: {"run_sha256": run_sha, "losses": loop.losses}, on_step=on_step,
    )
    if resume:
        for p in (out, *checkpoint_paths(ckpt)):  # what a killed writer left half-written
            remove_stale_temps(p)

        def other_fit(diff: list[str], recorded) -> InputError:
            return InputError(f"{ckpt} was written by a fit with other options, data or bundle", "resume with the same command, or start over with --force")

        loop.losses = [float(v) for v in loop.resume(same_run({"run_sha256": run_sha}, other_fit))["losses"]]
    loop.run()
    return loop


def _summary(out: Path, bundle: Bundle, bsha: str, target, task, splits, loop, trainable, before, after, *, steps, resume,
             train_small, new_head, bn_stats, depth_rule: str) -> dict[str, Any]:
    from weit_cli.io.files import sha256
    from weit_cli.training.sized import loss_window

    first, last = loss_window(loop.losses, steps)
    warnings = depth_rule_warnings(bundle.arch.depth, target.depth, depth_rule, trained_depth_rule(bundle.extra))
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
        "loss_first": first,
        "loss_last": last,
        **task.metric.entries("val_{}_before", before.metric),
        **task.metric.entries("val_{}_after", after.metric),
        "metric": task.metric_name,  # legacy string; `metric_info` describes the metric
        "metric_info": task.metric.to_dict(),
        "val_count": after.count,
        "val_examples": task.examples,
        "fit_seconds": loop.seconds,
        "data": splits.description,
        "bn_statistics": bn_stats,
        **({"warnings": warnings} if warnings else {}),
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
