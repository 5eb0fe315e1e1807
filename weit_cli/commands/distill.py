"""WAVE-style distillation for `extract-templates` (docs/method.md §3).

The data-free SVD gives the least-squares best templates for the *weights*; with few templates the
constrained model can still compute a rather different function. Distillation trains the constrained
model — templates, scalers and (by default) the small parameters — as the student of the dense source
checkpoint: loss = CE(student, labels) + T²·KL(teacher ‖ student) on temperature-T logits. The forward
pass runs through the real timm module with the composed weights (`fit.composed_forward`), so the
student evaluated here is exactly what `materialize` writes out at the source size.

BatchNorm students run in training mode (batch statistics) and carry their running statistics along,
as in ordinary training; accuracy is measured in eval mode with those statistics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from weit_cli.core.bundle import Bundle
from weit_cli.errors import WeitError
from weit_cli.options import DISTILL, SEED


def check_options(steps: int, lr: float, batch_size: int, temperature: float) -> None:
    if steps < 1:
        raise WeitError(f"--distill-steps must be at least 1, got {steps}", "a few hundred steps is typical")
    if not (lr > 0 and math.isfinite(lr)):
        raise WeitError(f"--distill-lr must be positive, got {lr}", f"e.g. --distill-lr {DISTILL.lr:g}")
    if batch_size < 2:
        raise WeitError(f"--batch-size must be at least 2, got {batch_size}", f"e.g. --batch-size {DISTILL.batch_size}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise WeitError(f"--temperature must be positive, got {temperature}", "1.0 is plain KL on the logits")


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
    (a data.DataSplits, loaded by `task`, the family's); returns the distilled bundle and what happened (held-out accuracies before and
    after, teacher accuracy, losses, time)."""
    from weit_cli.training.batches import Batches
    from weit_cli.training.dist import resolve_device, seed_everything
    from weit_cli.training.loop import Loop, Plan
    from weit_cli.training.nested import composed_forward
    from weit_cli.training.optim import adamw, lr_at

    check_options(steps, lr, batch_size, temperature)
    ad, arch = bundle.adapter, bundle.arch
    classes = task.classes(splits)
    if classes is not None and classes != arch.num_classes:
        raise WeitError(
            f"the data has {classes} classes, the checkpoint's classifier {arch.num_classes}",
            "distil on data with the classes the checkpoint was trained for",
        )
    dev = resolve_device(device)
    seed_everything(seed)

    teacher = ad.build(arch).to(dev)
    with torch.no_grad():
        teacher.load_state_dict({k: v.to(dev) for k, v in teacher_state.items()}, strict=True)
    teacher.eval().requires_grad_(False)
    teacher = ad.task_forward(teacher)

    module = ad.build(arch).to(dev)
    learnable = {n for n, _ in module.named_parameters()}  # the rest are buffers (BatchNorm statistics)
    templates = {t: nn.Parameter(v.detach().clone().float().to(dev)) for t, v in bundle.templates.items()}
    scalers = {k: nn.Parameter(v.detach().clone().float().to(dev)) for k, v in bundle.scalers.items()}
    small: dict[str, Tensor] = {}
    for k, v in bundle.small.items():
        v = v.detach().clone().to(dev)
        small[k] = nn.Parameter(v, requires_grad=train_small) if k in learnable else v
    student = Bundle(ad, arch, templates, scalers, small, dict(bundle.extra))
    forward = composed_forward(module, student)

    trainable = {f"templates.{k}": v for k, v in templates.items()}
    trainable.update({f"scalers.{k}": v for k, v in scalers.items()})
    if train_small:
        trainable.update({f"small.{k}": v for k, v in small.items() if k in learnable})
    # No weight decay: templates and scalers are factors of the weights, decaying them shrinks both.
    opt = adamw(trainable, lr=lr, weight_decay=0.0, no_decay_keys=ad.no_decay)

    held_out = splits.test if splits.test is not None and len(splits.test) else splits.val

    def student_eval():
        frozen = Bundle(ad, arch, {k: v.detach() for k, v in templates.items()}, {k: v.detach() for k, v in scalers.items()},
                        {k: v.detach() for k, v in small.items()})
        module.eval()
        try:
            return task.evaluate(composed_forward(module, frozen), held_out, device=dev)
        finally:
            module.train()

    teacher_score = task.evaluate(teacher, held_out, device=dev)
    before = student_eval()
    batches = Batches(splits.train, batch_size, seed)
    warmup = max(1, steps // 10)

    def loss_step(batch):  # the task's loss + its distance to the teacher (CE + T²·KL; ε-MSE + MSE to the teacher's ε)
        batch = task.prepare(batch)
        with torch.no_grad():
            t_out = task.outputs(teacher, batch)
        out = task.outputs(forward, batch)
        return task.loss(out, batch) + task.distill_loss(out, t_out, batch, temperature)

    plan = Plan(
        steps, lambda step: lr_at(step, base_lr=lr, total_steps=steps, warmup_steps=warmup), 1.0,
        diverged="the loss became {loss} at step {step}", diverged_hint="lower --distill-lr",
    )
    loop = Loop(plan, optimizer=opt, params=trainable, batches=batches, device=dev, loss_step=loss_step, on_step=on_step)
    module.train()
    loop.run()
    seconds, losses = loop.seconds, loop.losses
    after = student_eval()

    out = Bundle(
        ad,
        arch,
        {k: v.detach().cpu().contiguous() for k, v in templates.items()},
        {k: v.detach().cpu().contiguous() for k, v in scalers.items()},
        {k: v.detach().cpu().contiguous() for k, v in small.items()},
        dict(bundle.extra),
    )
    window = max(1, min(20, steps // 5))
    split = "test" if held_out is splits.test else "val"
    report = {
        "steps": steps,
        "lr": lr,
        "batch_size": batches.batch_size,
        "temperature": temperature,
        "train_small": train_small,
        "seed": seed,
        "eval_split": f"{split} ({held_out.tensors[0].shape[0]} {'images' if classes is not None else 'examples'})",
        f"teacher_{task.metric_key}": teacher_score.metric,
        f"student_{task.metric_key}_before": before.metric,
        f"student_{task.metric_key}_after": after.metric,
        "student_loss_before": before.loss,
        "student_loss_after": after.loss,
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "seconds": seconds,
        "data": splits.description,
    }
    return out, report
