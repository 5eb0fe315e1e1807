"""Architecture families. Each adapter says which weights are templated, how every other parameter
is resized, and how to build the timm module; `register` puts it in the one registry."""

from __future__ import annotations

from weit_cli.arch.base import Adapter


BUILTIN = ("vit", "resnet")  # modules under weit_cli/arch/ that register a family
_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    _REGISTRY[adapter.family] = adapter
    return adapter


def get_adapter(family: str) -> Adapter:
    from weit_cli.errors import WeitError

    _load_builtin()
    if family not in _REGISTRY:
        raise WeitError(f"unknown architecture family '{family}'", f"known families: {', '.join(list_families())}")
    return _REGISTRY[family]


def list_families() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def detect_family(keys) -> Adapter:
    """The adapter whose key layout matches a dense state dict."""
    from weit_cli.errors import InputError

    _load_builtin()
    for adapter in _REGISTRY.values():
        if adapter.matches(keys):
            return adapter
    raise InputError(
        "the checkpoint's keys match no supported architecture",
        f"weit reads timm models of these families: {', '.join(list_families())}",
    )


def _load_builtin() -> None:
    """Import the built-in families (each registers itself). A family that fails to import is a bug
    to report, not a family to hide: the ImportError propagates."""
    import importlib

    for name in BUILTIN:
        importlib.import_module(f"weit_cli.arch.{name}")
