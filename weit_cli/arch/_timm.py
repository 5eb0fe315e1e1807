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

    def arch_from_config(self, config: dict[str, Any], where: Any):
        """A timm config.json (`architecture` and `model_args`, as `timm_config` writes it) built as
        an untrained module, whose key layout names the family (`detect_family`)."""
        import timm

        from weit_cli.arch._registry import detect_family
        from weit_cli.errors import InputError

        name, model_args = config.get("architecture"), config.get("model_args")
        if not isinstance(name, str) or not isinstance(model_args, dict):
            return None
        try:
            shell = timm.create_model(name, pretrained=False, **model_args)
        except Exception as e:  # timm raises many types for bad arguments
            raise InputError(f"{where} does not describe a timm model: {str(e).splitlines()[0][:200]}", "check model_args") from None
        pretrained_cfg = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
        state = shell.state_dict()
        adapter = detect_family(state.keys())
        return adapter, adapter.infer_arch(adapter.loadable(state), {**model_args, "pretrained_cfg": pretrained_cfg})

    @cached_property
    def exporter(self) -> Exporter:
        return TimmLocalDir(self.timm_config)
