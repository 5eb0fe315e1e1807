"""Architecture families: one module each in this folder, registered in `_registry.py`."""

from weit_cli.arch._registry import detect_family, get_adapter, list_families, register
from weit_cli.arch.base import Adapter, LayerGroup, TemplateType

__all__ = ["Adapter", "LayerGroup", "TemplateType", "register", "get_adapter", "list_families", "detect_family"]
