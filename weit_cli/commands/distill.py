"""WAVE-style distillation for `extract-templates` (docs/method.md §3).

The data-free SVD gives the least-squares best templates for the *weights*; with few templates the
constrained model can still compute a rather different function. Distillation trains the constrained
model — templates, scalers and (by default) the small parameters — as the student of the dense source
checkpoint: loss = CE(student, labels) + T²·KL(teacher ‖ student) on temperature-T logits. The forward
pass runs through the family's real module with the composed weights (training/sized.py), so the
student evaluated here is exactly what `materialize` writes out at the source size.

BatchNorm students run in training mode (batch statistics) and carry their running statistics along,
as in ordinary training; accuracy is measured in eval mode with those statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from weit_cli.core.bundle import Bundle
from weit_cli.errors import WeitError
from weit_cli.options import DISTILL, SEED, DistillOptions, check


def distill(
    bundle: Bundle,
    teacher_state: dict[str, Tensor],
    splits,
    task,
    *,
    steps: int = DISTILL.steps,
    lr: float = DISTILL.lr,
    batch_size: int = DISTILL.batch_size,
    temperature: float = DISTILL.temperature,
    train_small: bool = True,
    seed: int = SEED,
    device: str | torch.device | None = None,
    on_step: Callable[[Any], None] | None = None,
) -> tuple[Bundle, dict[str, Any]]:
    """Train `bundle` (templates + scalers [+ small]) to imitate the dense `teacher_state` on `splits`
    (loaded by `task`, the family's); returns the distilled bundle and what happened (held-out
    scores before and after, the teacher's score, losses, time)."""
    from weit_cli.training.batches import Batches
    from weit_cli.training.dist import resolve_device, seed_everything
    from weit_cli.training.loop import Loop, Plan
    from weit_cli.training.optim import adamw, lr_at
    from weit_cli.training.sized import SizedModel, distill_loss_step, frozen_forward

    check(DistillOptions, steps=steps, lr=lr, batch_size=batch_size, temperature=temperature, seed=seed)
    ad, arch = bundle.adapter, bundle.arch
    classes = task.classes(splits)
    if classes is not None and classes != arch.num_classes:
        raise WeitError(
            f"the data has {classes} classes, the checkpoint's classifier {arch.num_classes}",
            "distil on data with the classes the checkpoint was trained for",
        )
    dev = resolve_device(device)
    seed_everything(seed)
    teacher = frozen_forward(ad, arch, teacher_state, dev)
    student = SizedModel(
        ad, arch, bundle.templates, bundle.scalers, bundle.small, bundle.extra, ad.build(arch).to(dev), dev,
        train_templates=True, train_small=train_small, float_small=False,
    )
    forward = student.forward()
    trainable = student.trainable()
    # No weight decay: templates and scalers are factors of the weights, decaying them shrinks both.
    opt = adamw(trainable, lr=lr, weight_decay=0.0, no_decay_keys=ad.no_decay)

    held_out = splits.test if splits.test is not None and len(splits.test) else splits.val
    teacher_score = task.evaluate(teacher, held_out, device=dev)
    before = student.evaluate(task, held_out, dev)
    batches = Batches(splits.train, batch_size, seed)
    warmup = max(1, steps // 10)

    def loss_step(batch):  # the task's loss + its distance to the teacher (CE + T²·KL; ε-MSE + MSE to the teacher's ε)
        return distill_loss_step(task, forward, teacher, batch, temperature=temperature, task_weight=1.0, distill_weight=1.0)

    plan = Plan(
        steps, lambda step: lr_at(step, base_lr=lr, total_steps=steps, warmup_steps=warmup), 1.0,
        diverged="the loss became {loss} at step {step}", diverged_hint="lower --distill-lr",
    )
    loop = Loop(plan, optimizer=opt, params=trainable, batches=batches, device=dev, loss_step=loss_step, on_step=on_step)
    student.module.train()
    loop.run()
    after = student.evaluate(task, held_out, dev)
    scores = {"teacher": teacher_score, "before": before, "after": after}
    report = _report(task, splits, held_out, scores, loop, classes=classes, steps=steps, lr=lr, batch_size=batches.batch_size,
                     temperature=temperature, train_small=train_small, seed=seed)
    return student.to_bundle(), report


def _report(task, splits, held_out, scores, loop, *, classes, steps, lr, batch_size, temperature, train_small, seed) -> dict[str, Any]:
    from weit_cli.training.sized import loss_window

    first, last = loss_window(loop.losses, steps)
    split = "test" if held_out is splits.test else "val"
    what = "images" if classes is not None else "examples"
    return {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "temperature": temperature,
        "train_small": train_small,
        "seed": seed,
        "eval_split": f"{split} ({held_out.tensors[0].shape[0]} {what})",
        **task.metric.entries("teacher_{}", scores["teacher"].metric),
        **task.metric.entries("student_{}_before", scores["before"].metric),
        **task.metric.entries("student_{}_after", scores["after"].metric),
        "metric_info": task.metric.to_dict(),
        "student_loss_before": scores["before"].loss,
        "student_loss_after": scores["after"].loss,
        "loss_first": first,
        "loss_last": last,
        "seconds": loop.seconds,
        "data": splits.description,
    }
