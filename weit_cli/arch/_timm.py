"""What the families built on timm share: the module comes from `timm.create_model` and is exported
as a timm local-dir folder. A family gives its timm architecture name and its config.json."""

from __future__ import annotations

from abc import abstractmethod
from functools import cached_property
from typing import TYPE_CHECKING, Any

from weit_cli.arch.base import Adapter
from weit_cli.io.exporters import Exporter, TimmLocalDir

if TYPE_CHECKING:
    from torch import nn


class TimmFamily(Adapter):
    @abstractmethod
    def timm_architecture(self, arch) -> str:
        """The timm model name `build` and config.json use (its `model_args` override every size)."""

    @abstractmethod
    def timm_config(self, arch) -> dict[str, Any]:
        """config.json for `timm.create_model('local-dir:…', pretrained=True)`."""

    def build(self, arch) -> nn.Module:
        import timm

        return timm.create_model(self.timm_architecture(arch), pretrained=False, **arch.model_args())

    @cached_property
    def exporter(self) -> Exporter:
        return TimmLocalDir(self.timm_config)
