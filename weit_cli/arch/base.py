"""What an architecture adapter provides. Adapters know timm's key names and shapes, nothing of
training or files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from weit_cli.core.resize import Axis


@dataclass(frozen=True)
class TemplateType:
    """One set of shared templates: p×q blocks (× a spatial kernel for convolutions)."""

    name: str
    p: int
    q: int
    kernel: tuple[int, ...] = ()


@dataclass(frozen=True)
class LayerGroup:
    """A run of repeated blocks whose count is the 'depth' (ViT: one group; ResNet: one per stage).

    Keys of block l start with `prefix.format(l)`; `first` blocks at the start are fixed (never
    resized, e.g. a ResNet stage's downsampling block)."""

    prefix: str
    count: int
    first: int = 0


class Adapter:
    """Base class; one subclass per family."""

    family: ClassVar[str]
    #: Keys (suffixes within a block) whose weights are zeroed to make an added block the identity.
    identity_zero: ClassVar[tuple[str, ...]] = ()
    #: Dense keys of the classifier, re-initialised when the number of classes changes.
    classifier: ClassVar[tuple[str, ...]] = ()
    #: Whether the family has BatchNorm running statistics (resized statistics may need recalibration).
    batchnorm: ClassVar[bool] = False

    # --- architecture -------------------------------------------------------------------------
    def arch_from_dict(self, d: dict[str, Any]):
        raise NotImplementedError

    def matches(self, keys) -> bool:
        raise NotImplementedError

    def infer_arch(self, state: dict[str, Tensor], hints: dict[str, Any]):
        raise NotImplementedError

    def target_arch(self, arch, **changes):
        """A new architecture of the same family; raises WeitError on impossible sizes."""
        raise NotImplementedError

    def arch_for_recipe(self, model, *, depth, width, num_classes: int):
        """The architecture a pretraining recipe's `model` section describes at one nested size."""
        raise NotImplementedError

    def build(self, arch) -> nn.Module:
        raise NotImplementedError

    def timm_config(self, arch) -> dict[str, Any]:
        """config.json for `timm.create_model('local-dir:…', pretrained=True)`."""
        raise NotImplementedError

    def describe(self, arch) -> str:
        raise NotImplementedError

    # --- structure ----------------------------------------------------------------------------
    def template_types(self, arch, template_size: int | None = None) -> dict[str, TemplateType]:
        raise NotImplementedError

    def template_type_of(self, key: str, arch=None) -> str | None:
        """The template type of a dense weight key, or None for a small parameter. Families whose
        key names alone are ambiguous (a ResNet's conv1 is 3×3 or 1×1 by block type) need `arch`."""
        raise NotImplementedError

    def identity_suffixes(self, arch) -> tuple[str, ...]:
        """Keys within a block zeroed to make an added block the identity (default: `identity_zero`)."""
        return self.identity_zero

    def layer_groups(self, arch) -> list[LayerGroup]:
        raise NotImplementedError

    def sizes(self, arch) -> dict[str, int]:
        """Channel count of every named width axis."""
        raise NotImplementedError

    def axes(self, key: str, arch) -> list[Axis]:
        """Resizable dimensions of the dense tensor stored under `key`."""
        raise NotImplementedError

    # --- helpers for subclasses ---------------------------------------------------------------
    @staticmethod
    def _match(patterns: list[tuple[str, Any]], key: str):
        for pat, val in patterns:
            if re.fullmatch(pat, key):
                return val
        return None


def to_float_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


__all__ = ["Adapter", "TemplateType", "LayerGroup", "Axis", "to_float_state", "torch"]
