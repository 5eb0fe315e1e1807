"""Architecture families. Each adapter says which weights are templated, how every other parameter
is resized, and how to build the timm module; `register` puts it in the one registry."""

from __future__ import annotations

from .base import Adapter, TemplateType

_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    _REGISTRY[adapter.family] = adapter
    return adapter


def get_adapter(family: str) -> Adapter:
    from ..errors import WeitError

    _load_builtin()
    if family not in _REGISTRY:
        raise WeitError(f"unknown architecture family '{family}'", f"known families: {', '.join(list_families())}")
    return _REGISTRY[family]


def list_families() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def detect_family(keys) -> Adapter:
    """The adapter whose key layout matches a dense state dict."""
    from ..errors import InputError

    _load_builtin()
    for adapter in _REGISTRY.values():
        if adapter.matches(keys):
            return adapter
    raise InputError(
        "the checkpoint's keys match no supported architecture",
        f"weit reads timm models of these families: {', '.join(list_families())}",
    )


def _load_builtin() -> None:
    from . import vit  # noqa: F401  (registers itself)

    try:
        from . import resnet  # noqa: F401
    except ImportError:
        pass


__all__ = ["Adapter", "TemplateType", "register", "get_adapter", "list_families", "detect_family"]
