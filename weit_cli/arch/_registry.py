"""The one registry of architecture families (as timm's `_registry.py`). Every module or package of
weit_cli/arch/ other than `base` and the private ones is a family that registers itself with
`@register`; adding a family is adding a module (or a package, as `resnet/`) there."""

from __future__ import annotations

from weit_cli.arch.base import Adapter

_REGISTRY: dict[str, Adapter] = {}
_NOT_FAMILIES = ("base",)  # modules of weit_cli/arch/ that hold no family
_loaded = False


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: instantiates the family (an abstract method left out fails here, as the
    class is defined) and makes it known by its `family` name."""
    missing = [a for a in ("family", "model_section", "exporter") if not hasattr(cls, a)]
    if missing:
        raise TypeError(f"family adapter {cls.__name__} does not declare {', '.join(missing)}")
    adapter = cls()
    old = _REGISTRY.get(adapter.family)
    if old is not None and (type(old).__module__, type(old).__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"two families are named '{adapter.family}'")
    _REGISTRY[adapter.family] = adapter
    return cls


def get_adapter(family: str) -> Adapter:
    from weit_cli.errors import WeitError

    _load_families()
    if family not in _REGISTRY:
        raise WeitError(f"unknown architecture family '{family}'", f"known families: {', '.join(list_families())}")
    return _REGISTRY[family]


def list_families() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def adapters() -> list[Adapter]:
    """Every registered family, in `list_families` order."""
    return [_REGISTRY[f] for f in list_families()]


def detect_family(keys) -> Adapter:
    """The adapter whose key layout matches a dense state dict."""
    from weit_cli.errors import InputError

    _load_families()
    for adapter in _REGISTRY.values():
        if adapter.matches(keys):
            return adapter
    raise InputError(
        "the checkpoint's keys match no supported architecture",
        f"weit reads models of these families: {', '.join(list_families())}",
    )


def arch_from_config(cfg) -> tuple[Adapter, object]:
    """(adapter, architecture) of a weightless model folder's config.json `cfg`: the first family
    that reads it (`Adapter.arch_from_config`)."""
    import json

    from weit_cli.errors import InputError

    try:
        config = json.loads(cfg.read_text())
    except (ValueError, OSError):
        config = None
    for adapter in adapters() if isinstance(config, dict) else ():
        found = adapter.arch_from_config(config, cfg)
        if found is not None:
            return found
    raise InputError(f"{cfg} has no usable 'architecture' and 'model_args'", "write it with 'weit materialize'")


def family_modules() -> list[str]:
    """The modules that define families: every public module or package of weit_cli/arch/ but `base`."""
    import pkgutil
    from pathlib import Path

    here = str(Path(__file__).parent)
    names = [m.name for m in pkgutil.iter_modules([here]) if not m.name.startswith("_") and m.name not in _NOT_FAMILIES]
    return [f"weit_cli.arch.{name}" for name in sorted(names)]


def family_module_of(module: str) -> str | None:
    """The family module that `module` is or belongs to (a family package's submodules belong to
    it: `weit_cli.arch.resnet.layout` → `weit_cli.arch.resnet`); None for any other module."""
    for name in family_modules():
        if module == name or module.startswith(name + "."):
            return name
    return None


def _load_families() -> None:
    """Import every family module (each registers itself). A family that fails to import is a bug
    to report, not a family to hide: the ImportError propagates, and the next call tries again."""
    global _loaded
    if _loaded:
        return
    import importlib

    for name in family_modules():
        importlib.import_module(name)
    _loaded = True
