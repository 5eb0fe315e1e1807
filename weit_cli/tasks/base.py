"""The Task seam: what one kind of problem needs, from a data source to a score.

A task turns a data source string and the architecture's input settings into train/val/test splits,
a batch into a training loss (and a distillation loss against a teacher), and a model into a score.
The training loop and the commands know only this interface. Two choices keep it open to problems
unlike image classification:

- **A batch is an opaque tuple of tensors** (one row of each tensor of the split's TensorDataset).
  Only its task reads it: (images, labels) for classification; (latents, class labels) for
  diffusion; (returns-to-go, states, actions, timesteps) for return-conditioned control.
- **How the model is called is the task's business** (`outputs(forward, batch)`): x → logits for
  classification; (noised latents, timestep, labels) → predicted noise for diffusion; the
  interleaved sequence → predicted actions for control. A task that draws randomness per batch
  (diffusion's noise and timesteps) does it in `prepare`, once, so that a student and its teacher
  see the same noised input, and in the loss step, so that the draw order is the loop's.

Generation (generation.py: ε-prediction MSE, scored by its loss) and control (action MSE) are files
beside `classification.py`; a family names its task (`Adapter.task`), `_registry.task_for` builds it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from weit_cli.tasks.metric import Metric

__all__ = ["Batch", "Forward", "Metric", "Score", "Splits", "Task"]

Batch = tuple[Tensor, ...]
Forward = Callable[..., Any]


class Splits(Protocol):
    """What a task's data loading returns (data/images.py's DataSplits for classification)."""

    train: Any  # a TensorDataset: one tensor per batch field
    val: Any
    test: Any | None
    description: str  # provenance: source, split sizes, seed, preprocessing


class Score(Protocol):
    """What `Task.evaluate` returns: the task's metric, its mean loss, and how many examples."""

    @property
    def metric(self) -> float: ...

    loss: float
    count: int


class Task(ABC):
    """One kind of problem: data, loss, distillation loss, metric. Options of the loss (label
    smoothing, a noise schedule) are the task object's own state.

    What a task can do beyond scoring on data is a capability the commands ask of it, never its
    name: `samples` (its models draw images: `weit sample`, judged samples in `weit evaluate`) and
    `rollouts` (its models are scored by acting in an environment rather than on `--data`)."""

    name: ClassVar[str]
    #: The score (`Metric`); a subclass that sets only the legacy `metric_key`, `metric_name` and
    #: `higher_is_better` gets one made from them (`__init_subclass__`), and the other way round.
    metric: ClassVar[Metric]
    metric_name: ClassVar[str]  # legacy: the results' "metric" string ("accuracy")
    metric_key: ClassVar[str] = "acc"  # legacy: `metric.name`, the metric's short name in result keys
    higher_is_better: ClassVar[bool] = True  # which checkpoint is "best"
    #: What the data's examples are called in reports ("images", "windows").
    examples: ClassVar[str] = "images"
    samples: ClassVar[bool] = False
    rollouts: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "metric" in cls.__dict__:
            cls.metric_key, cls.higher_is_better = cls.metric.name, cls.metric.higher_is_better
            cls.metric_name = cls.__dict__.get("metric_name", cls.metric.label)
        elif "metric_key" in cls.__dict__ or "metric_name" in cls.__dict__ or "higher_is_better" in cls.__dict__:
            label = getattr(cls, "metric_name", cls.metric_key)
            cls.metric = Metric(cls.metric_key, label, cls.higher_is_better)

    @classmethod
    def from_options(cls, *, label_smoothing: float = 0.0, label_dropout: float | None = None) -> Task:
        """The task with the commands' options (tasks/_registry.task_for); refuses, in one line, an
        option it does not have that is set. Default: a task with none of them."""
        from weit_cli.errors import WeitError

        if label_smoothing:
            raise WeitError(f"label smoothing ({label_smoothing}) is a classification option; this model's task is {cls.name}", "leave it at 0")
        if label_dropout is not None:
            raise WeitError(f"label dropout ({label_dropout}) is a generation option; this model's task is {cls.name}", "leave train.label_dropout unset")
        return cls()

    @abstractmethod
    def load_data(self, source: str, arch: Any, *, seed: int = 0, val_fraction: float = 0.1,
                  train_subset: float | int | None = None) -> Splits:
        """`source` as splits shaped for `arch`'s inputs (image size and channels, sequence length …)."""

    def classes(self, splits: Splits) -> int | None:
        """The data's class count, which sizes a model's classifier (or its class table); None for a
        task without classes (control), whose models take no class count."""
        return splits.num_classes

    def companion_files(self, splits: Splits) -> dict[str, dict[str, Any]]:
        """JSON files a model trained on `splits` needs beside its weights, name → content; they ride
        in the bundle (`core/bundle.COMPANIONS`) and are written into every exported folder. None by
        default; control: `control_config.json` (the training split's state statistics)."""
        return {}

    def companions_of(self, model_path: Any) -> dict[str, dict[str, Any]]:
        """The companion files a model already has (e.g. beside a folder `extract-templates` reads),
        checked; {} for none."""
        return {}

    def adopt(self, files: dict[str, dict[str, Any]]) -> None:
        """Take a trained model's input conventions from its companion files before `load_data`, so
        that data for a model that exists (fit-scalers, finetune, distillation) is prepared as it was
        trained on (control: the context, the state statistics, the returns-to-go scale). Nothing by
        default."""

    def prepare(self, batch: Batch) -> Batch:
        """Per-batch randomness (diffusion: noise and timesteps), drawn once per step; none by default."""
        return batch

    @abstractmethod
    def outputs(self, forward: Forward, batch: Batch) -> Tensor:
        """The model's output on `batch`; `forward` is called with whatever inputs the task defines."""

    @abstractmethod
    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        """The training loss of `outputs` against the batch's targets (a scalar)."""

    @abstractmethod
    def distill_loss(self, outputs: Tensor, teacher_outputs: Tensor, batch: Batch, temperature: float) -> Tensor:
        """How far the student's outputs are from the teacher's (a scalar)."""

    def train_loss(self, forward: Forward, batch: Batch) -> Tensor:
        return self.loss(self.outputs(forward, batch), batch)

    @abstractmethod
    def evaluate(self, forward: Forward, dataset: Any, batch_size: int = 256,
                 device: torch.device | str | None = None) -> Score:
        """The metric and mean loss of `forward` (a module or a function) on `dataset`, in eval mode."""

    def held_out(self, splits: Splits, source: str) -> tuple[Any, str]:
        """(the split a finished model is scored on, its name): the test split, else the validation
        split; InputError when `source` (the data's name, for the message) holds neither."""
        from weit_cli.errors import InputError

        held_out, split = (splits.test, "test") if splits.test is not None and len(splits.test) else (splits.val, "val")
        if len(held_out) == 0:
            raise InputError(f"{source} has no test or validation {self.examples} to evaluate on", "pass a data set with a test split")
        return held_out, split

    def evaluate_model(self, forward: Forward, held_out: Any, split: str, batch_size: int = 256,
                       device: torch.device | str | None = None) -> dict[str, Any]:
        """`weit evaluate`'s scores of a model on `held_out` (named `split`): the metric under its
        legacy and its role key (`test_acc`, `test_metric`), the mean loss (`test_loss`) and the
        metric's description (`metric_info`)."""
        score = self.evaluate(forward, held_out, batch_size, device)
        return {
            f"{split}_{self.metric.name}": score.metric, f"{split}_loss": score.loss,
            f"{split}_metric": score.metric, "metric_info": self.metric.to_dict(),
        }
