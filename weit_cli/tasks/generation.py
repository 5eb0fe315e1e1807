"""Class-conditional image generation, the second task: ε-prediction DDPM training (tasks/diffusion.py)
on labelled images, scored by the denoising loss on held-out images (lower is better).

A batch arrives as (images, labels), the same splits as classification (data/images.py: [-1, 1]).
`prepare` turns it into (x_t, t, y, ε): a uniform timestep, Gaussian noise and labels dropped to the
null class with probability `label_dropout` (classifier-free guidance), drawn once per step so that a
student and its teacher — every nested size of a pretraining step — denoise the very same input. The
model is called as forward(x_t, t, y) → ε̂ (a family turns its module into that: `Adapter.apply`).

Randomness: by default the draws come from the global CPU generator (`generator=None`), which the
training loop's checkpoints save and restore, so `--resume` continues with the same draws; they are
made on the CPU, then moved, so a seed means the same noise on every device.

Evaluation is deterministic: one generator seeded with `EVAL_SEED` draws the timesteps and noise of the
whole set at once, so the loss of a model does not depend on the batch size, and two checkpoints
(epochs, init methods) are compared on the same noised images. Labels are kept (conditional ε).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weit_cli.errors import WeitError
from weit_cli.options import LabelDropout, check_value
from weit_cli.tasks.base import Batch, Forward, Metric, Task
from weit_cli.tasks.diffusion import noised, train_scheduler
from weit_cli.training.dist import device_autocast

EVAL_SEED = 0
LABEL_DROPOUT = 0.1  # the diffusion Transformer paper's: 10 % of training labels become 'no class', so guidance has an unconditional ε


@dataclass(frozen=True)
class DenoisingScore:
    loss: float  # mean ε-MSE over the set
    count: int

    @property
    def metric(self) -> float:
        return self.loss


class Generation(Task):
    """A batch is (images, labels) → prepared (x_t, t, y, ε); the model maps (x_t, t, y) to ε̂."""

    name = "generation"
    metric = Metric("loss", "loss", higher_is_better=False)
    samples = True  # its models draw images: `weit sample`, and judged samples in `weit evaluate`

    def __init__(self, label_dropout: float = LABEL_DROPOUT, generator: torch.Generator | None = None, scheduler_config: dict | None = None):
        check_value(LabelDropout, label_dropout, "label dropout")
        self.label_dropout = label_dropout
        self.generator = generator
        self.scheduler = train_scheduler(scheduler_config)
        self.num_classes: int | None = None  # the data's, set by load_data: its index is the null class

    @classmethod
    def from_options(cls, *, label_smoothing: float = 0.0, label_dropout: float | None = None) -> Generation:
        """Label dropout (recipe `train.label_dropout`) is this task's option; None: `LABEL_DROPOUT`."""
        super().from_options(label_smoothing=label_smoothing)  # refuses label smoothing
        return cls(LABEL_DROPOUT if label_dropout is None else label_dropout)

    def load_data(self, source: str, arch: Any, *, seed: int = 0, val_fraction: float = 0.1,
                  train_subset: float | int | None = None):
        from weit_cli.data.images import load_data

        splits = load_data(source, img_size=arch.img_size, in_chans=arch.in_chans, seed=seed,
                           val_fraction=val_fraction, train_subset=train_subset)
        self.num_classes = splits.num_classes
        return splits

    def prepare(self, batch: Batch) -> Batch:
        if self.num_classes is None:
            raise WeitError("the generation task has no class count yet", "load its data first (Task.load_data)")
        x0, y = batch[0], batch[1]
        x_t, t, y, noise = noised(x0, y, self.scheduler, self.generator, num_classes=self.num_classes, label_dropout=self.label_dropout)
        return x_t, t, y, noise

    def outputs(self, forward: Forward, batch: Batch) -> Tensor:
        return forward(batch[0], batch[1], batch[2]).float()

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return F.mse_loss(outputs.float(), batch[3].float())

    def distill_loss(self, outputs: Tensor, teacher_outputs: Tensor, batch: Batch, temperature: float) -> Tensor:
        """MSE to the teacher's ε̂ on the same noised input (the temperature has no meaning here)."""
        return F.mse_loss(outputs.float(), teacher_outputs.float())

    @torch.no_grad()
    def evaluate(self, forward: Forward, dataset, batch_size: int = 256, device: torch.device | str | None = None) -> DenoisingScore:
        if device is None:
            params = list(forward.parameters()) if isinstance(forward, nn.Module) else []
            device = params[0].device if params else torch.device("cpu")
        device = torch.device(device)
        x_all, y_all = dataset.tensors[0], dataset.tensors[1]
        n = len(x_all)
        if n == 0:
            return DenoisingScore(float("nan"), 0)
        g = torch.Generator().manual_seed(EVAL_SEED)
        t_all = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=g)
        noise_all = torch.randn(x_all.shape, generator=g, dtype=torch.float32)
        was_training = forward.training if isinstance(forward, nn.Module) else None
        if isinstance(forward, nn.Module):
            forward.eval()
        total = 0.0
        try:
            for i in range(0, n, batch_size):
                x0 = x_all[i : i + batch_size].to(device).float()
                noise = noise_all[i : i + batch_size].to(device)
                t = t_all[i : i + batch_size].to(device)
                x_t = self.scheduler.add_noise(x0, noise, t)
                with device_autocast(device):
                    eps = forward(x_t, t, y_all[i : i + batch_size].to(device))
                total += float(F.mse_loss(eps.float(), noise, reduction="sum")) / noise[0].numel()
        finally:
            if was_training:
                forward.train()
        return DenoisingScore(total / n, n)
