"""The template bundle (docs/method.md §1): shared templates + per-layer scalers + small parameters,
and the dense model they compose to. Reading and writing bundle files is `io/bundle_file.py`;
extraction `core/extract.py`; resizing `core/resize.py`; the layout checks `core/checks.py`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import weit_cli.core.kron as kron

if TYPE_CHECKING:
    from torch import Tensor

    from weit_cli.arch.base import Adapter

#: `Bundle.extra` key (and metadata key) of the JSON files a model needs beside its weights, name →
#: content, which `materialize` and `finetune` write into the model's folder (`io/export.write_model`):
#: a task's record of its training data (the control task's `control_config.json`: state statistics).
#: It rides from the data a bundle or scalers file was trained on to every model composed from it; no
#: module between knows what the files hold.
COMPANIONS = "companion_files"


@dataclass
class Bundle:
    """Everything needed to compose a dense model of `arch`; templates are shared by all sizes."""

    adapter: Adapter
    arch: Any
    templates: dict[str, Tensor]  # type name → (N, p, q, *kernel)
    scalers: dict[str, Tensor]  # dense weight key → (N, a, b)
    small: dict[str, Tensor]  # dense key → tensor
    extra: dict[str, Any] = field(default_factory=dict)  # nested ranges, provenance, …

    # ------------------------------------------------------------------ structure
    def template_of(self, key: str) -> Tensor:
        return self.templates[self.adapter.template_type_of(key, self.arch)]

    def dense_keys(self) -> list[str]:
        return sorted([*self.scalers, *self.small])

    def dense_shape(self, key: str) -> tuple[int, ...]:
        if key in self.small:
            return tuple(self.small[key].shape)
        _, a, b = self.scalers[key].shape
        _, p, q, *k = self.template_of(key).shape
        return (a * p, b * q, *k)

    def dense(self, key: str) -> Tensor:
        if key in self.small:
            return self.small[key]
        return kron.compose(self.scalers[key], self.template_of(key))

    def state_dict(self) -> dict[str, Tensor]:
        return {k: self.dense(k) for k in self.dense_keys()}

    def param_counts(self) -> dict[str, int]:
        return {
            "templates": sum(v.numel() for v in self.templates.values()),
            "scalers": sum(v.numel() for v in self.scalers.values()),
            "small": sum(v.numel() for v in self.small.values()),
            "dense": sum(math.prod(self.dense_shape(k)) for k in self.dense_keys()),
        }

    def to_tensors(self) -> dict[str, Tensor]:
        """The tensors of its file, by name: `templates.<type>`, `scalers.<key>`, `small.<key>`."""
        out = {f"templates.{k}": v for k, v in self.templates.items()}
        out.update({f"scalers.{k}": v for k, v in self.scalers.items()})
        out.update({f"small.{k}": v for k, v in self.small.items()})
        return {k: v.detach().contiguous() for k, v in out.items()}
