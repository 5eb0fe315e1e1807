"""Image classification, the first task: labelled image folders and sets (data/images.py), cross-entropy
(with optional label smoothing), top-1 accuracy, and distillation by KL on temperature-softened logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from weit_cli.tasks.base import Batch, Forward, Metric, Task
from weit_cli.training.dist import device_autocast


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # fraction in [0, 1]
    loss: float  # mean cross-entropy
    count: int

    @property
    def metric(self) -> float:
        return self.accuracy


class Classification(Task):
    """A batch is (images, labels); the model maps images to logits."""

    name = "classification"
    metric = Metric("acc", "accuracy", higher_is_better=True, percent=True, short="acc")

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    @classmethod
    def from_options(cls, *, label_smoothing: float = 0.0, label_dropout: float | None = None) -> Classification:
        if label_dropout is not None:
            return super().from_options(label_dropout=label_dropout)  # refused: a generation option
        return cls(label_smoothing)

    def load_data(self, source: str, arch: Any, *, seed: int = 0, val_fraction: float = 0.1,
                  train_subset: float | int | None = None):
        from weit_cli.data.images import load_data

        return load_data(source, img_size=arch.img_size, in_chans=arch.in_chans, seed=seed,
                         val_fraction=val_fraction, train_subset=train_subset)

    def outputs(self, forward: Forward, batch: Batch) -> Tensor:
        return forward(batch[0]).float()

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return nn.functional.cross_entropy(outputs.float(), batch[1], label_smoothing=self.label_smoothing)

    def distill_loss(self, outputs: Tensor, teacher_outputs: Tensor, batch: Batch, temperature: float) -> Tensor:
        return kl_to_teacher(outputs, teacher_outputs, temperature)

    def evaluate(self, forward: Forward, dataset, batch_size: int = 256, device: torch.device | str | None = None) -> EvalResult:
        return evaluate(forward, dataset, batch_size, device)


@torch.no_grad()
def evaluate(model: nn.Module | Callable[[Tensor], Tensor], dataset, batch_size: int = 256, device: torch.device | str | None = None) -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of `model` (a module or any x → logits) on `dataset`."""
    if device is None:
        device = next(model.parameters()).device if isinstance(model, nn.Module) and any(True for _ in model.parameters()) else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    x_all, y_all = dataset.tensors[0], dataset.tensors[1]
    correct, loss_sum, n = 0, 0.0, len(x_all)
    try:
        for i in range(0, n, batch_size):
            x = x_all[i : i + batch_size].to(device, non_blocking=True)
            y = y_all[i : i + batch_size].to(device, non_blocking=True)
            with device_autocast(device):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
    finally:
        if was_training:
            model.train()
    if n == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    return EvalResult(correct / n, loss_sum / n, n)


def kl_to_teacher(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T²·KL(teacher ‖ student) on temperature-softened logits (Hinton et al.); batch mean."""
    t = temperature
    kl = torch.nn.functional.kl_div(
        torch.nn.functional.log_softmax(logits / t, -1),
        torch.nn.functional.log_softmax(teacher_logits / t, -1),
        log_target=True,
        reduction="batchmean",
    )
    return kl * (t * t)
