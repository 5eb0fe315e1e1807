"""A bundle at one size as the tensors training updates in place (fit-scalers' and distillation's
student), run through the family's module of that size with their composition (`composed_forward`),
so that what is trained is exactly what `materialize` writes out."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from weit_cli.core.bundle import Bundle


class SizedModel:
    """Templates, scalers and small parameters of a bundle at `arch`'s size on `dev`, and `module`,
    the family's module of that size, which runs them.

    Scalers are always parameters (float32). Templates are parameters (float32) with
    `train_templates`, else frozen. A small tensor that is one of `module`'s parameters (not a buffer
    such as BatchNorm statistics) is a parameter that trains with `train_small` (float32 with
    `float_small`, else in its own dtype); buffers are plain tensors."""

    def __init__(
        self, adapter, arch, templates: dict[str, Tensor], scalers: dict[str, Tensor], small: dict[str, Tensor],
        extra: dict[str, Any], module: nn.Module, dev, *, train_templates: bool, train_small: bool, float_small: bool,
    ):
        self.adapter, self.arch, self.module, self.extra = adapter, arch, module, dict(extra)
        self.train_templates, self.train_small = train_templates, train_small
        self.learnable = {n for n, _ in module.named_parameters()}
        if train_templates:
            self.templates = {t: nn.Parameter(v.detach().clone().float().to(dev)) for t, v in templates.items()}
        else:
            self.templates = {t: v.detach().to(dev) for t, v in templates.items()}
        self.scalers = {k: nn.Parameter(v.detach().clone().float().to(dev)) for k, v in scalers.items()}
        self.small: dict[str, Tensor] = {}
        for k, v in small.items():
            v = v.detach().clone().to(dev)
            self.small[k] = nn.Parameter(v.float() if float_small else v, requires_grad=train_small) if k in self.learnable else v

    def bundle(self) -> Bundle:
        """The live bundle: its tensors are this model's (gradients reach them)."""
        return Bundle(self.adapter, self.arch, self.templates, self.scalers, self.small, self.extra)

    def forward(self):
        """The task's forward on the composed weights (the module's mode is the caller's)."""
        from weit_cli.training.nested import composed_forward

        return composed_forward(self.module, self.bundle())

    def trainable(self, new_head: tuple[str, ...] | list[str] = ()) -> dict[str, Tensor]:
        """What the optimizer updates, by prefixed name: the templates when they train, the scalers,
        the learnable small parameters when they train and those of `new_head` (a new classifier)
        always."""
        out: dict[str, Tensor] = {}
        if self.train_templates:
            out.update({f"templates.{k}": v for k, v in self.templates.items()})
        out.update({f"scalers.{k}": v for k, v in self.scalers.items()})
        out.update({f"small.{k}": v for k, v in self.small.items() if k in self.learnable and (self.train_small or k in new_head)})
        return out

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor that is not frozen, by prefixed name (what a resumable checkpoint holds)."""
        out = {f"templates.{k}": v for k, v in self.templates.items()} if self.train_templates else {}
        out.update({f"scalers.{k}": v for k, v in self.scalers.items()})
        out.update({f"small.{k}": v for k, v in self.small.items()})
        return out

    def evaluate(self, task, dataset, dev):
        """`task`'s score of the model as it is now, in eval mode (the module goes back to training)."""
        from weit_cli.training.nested import composed_forward

        frozen = Bundle(
            self.adapter, self.arch, {k: v.detach() for k, v in self.templates.items()},
            {k: v.detach() for k, v in self.scalers.items()}, {k: v.detach() for k, v in self.small.items()},
        )
        self.module.eval()
        try:
            return task.evaluate(composed_forward(self.module, frozen), dataset, device=dev)
        finally:
            self.module.train()

    def to_bundle(self) -> Bundle:
        """A CPU copy, detached."""
        return Bundle(
            self.adapter,
            self.arch,
            {k: v.detach().cpu().contiguous() for k, v in self.templates.items()},
            {k: v.detach().cpu().contiguous() for k, v in self.scalers.items()},
            {k: v.detach().cpu().contiguous() for k, v in self.small.items()},
            dict(self.extra),
        )


def frozen_forward(adapter, arch, state: dict[str, Tensor], dev) -> nn.Module:
    """The family's module of `arch` with `state` on `dev`, in eval mode with no gradients, as its
    task calls it (`Adapter.task_forward`): a distillation teacher."""
    module = adapter.build(arch).to(dev)
    with torch.no_grad():
        module.load_state_dict({k: v.to(dev) for k, v in state.items()}, strict=True)
    module.eval().requires_grad_(False)
    return adapter.task_forward(module)


def distill_loss_step(task, student, teacher, batch, *, temperature: float, task_weight: float, distill_weight: float) -> Tensor:
    """One step's loss of a student that imitates a frozen teacher: task_weight · the task's loss +
    distill_weight · its distance to the teacher's outputs (`Task.distill_loss`)."""
    batch = task.prepare(batch)
    with torch.no_grad():
        t_out = task.outputs(teacher, batch)
    out = task.outputs(student, batch)
    return task_weight * task.loss(out, batch) + distill_weight * task.distill_loss(out, t_out, batch, temperature)


def loss_window(losses: list[float], steps: int) -> tuple[float, float]:
    """The mean loss of the first and of the last few steps (a fifth of the steps, 1 to 20)."""
    window = max(1, min(20, steps // 5))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window
