"""What an architecture family provides. A family knows its library's key names and shapes, its
recipe model section, how it is selected from and how it is exported; nothing of training loops.

`Adapter` is an abstract base class: a family that lacks one of the abstract methods cannot be
registered (`@register` instantiates it as the class is defined, so the module fails to import)."""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from weit_cli.core.axes import Axis, ZeroRuns

if TYPE_CHECKING:
    from torch import Tensor, nn

    from weit_cli.io.exporters import Exporter
    from weit_cli.section import Section


@dataclass(frozen=True)
class TemplateType:
    """One set of shared templates: p×q blocks (× a spatial kernel for convolutions)."""

    name: str
    p: int
    q: int
    kernel: tuple[int, ...] = ()


@dataclass(frozen=True)
class LayerGroup:
    """A run of repeated blocks whose count is the 'depth' (an isotropic network: one group; a staged
    one: one per stage).

    Keys of block l start with `prefix.format(l)`; `first` blocks at the start are fixed (never
    resized, e.g. a stage's downsampling block)."""

    prefix: str
    count: int
    first: int = 0


@dataclass(frozen=True)
class Hints:
    """A family's wording in the commands' messages, so that no command names a family's options."""

    #: Options a reader guesses from a checkpoint when its files do not say (e.g. "--img-size");
    #: a checkpoint that does not match its guessed architecture suggests passing them.
    guessed: tuple[str, ...] = ()


class Adapter(ABC):
    """One subclass per family, registered with `@register` (weit_cli/arch/_registry.py)."""

    family: ClassVar[str]
    #: The recipe `model` section of this family (a `Section` with `family: Literal[<family>]`).
    model_section: ClassVar[type[Section]]
    #: Whether a recipe whose model section names no family means this one (exactly one family).
    recipe_default: ClassVar[bool] = False
    #: How a composed model of this family is written (`materialize`, `finetune`): an
    #: `io.exporters.Exporter` (the family-neutral layouts, below the families).
    exporter: ClassVar[Exporter]
    #: Keys (suffixes within a block) whose weights are zeroed to make an added block the identity.
    identity_zero: ClassVar[tuple[str, ...]] = ()
    #: The depth rule `auto` grows by (deeper than the bundle; shrinking is always `prefix`).
    grow_depth_rule: ClassVar[str] = "interp"
    #: Dense keys of the classifier, re-initialised when the number of classes changes.
    classifier: ClassVar[tuple[str, ...]] = ()
    #: Parameter names (suffixes) that get no weight decay besides every vector (norms, biases).
    no_decay: ClassVar[tuple[str, ...]] = ()
    #: Keys (regular expressions) the family's own library skips when it loads a checkpoint, such as
    #: buffers that older versions of it saved; `loadable` drops them before weit reads a state dict.
    ignored_keys: ClassVar[tuple[str, ...]] = ()
    #: Whether the family has BatchNorm running statistics (resized statistics may need recalibration).
    batchnorm: ClassVar[bool] = False
    hints: ClassVar[Hints] = Hints()
    #: The task (`tasks.base.Task.name`) that trains this family's models; every command gets it
    #: from here (`tasks._registry.task_for`).
    task: ClassVar[str] = "classification"

    # --- architecture -------------------------------------------------------------------------
    @abstractmethod
    def arch_from_dict(self, d: dict[str, Any]):
        """The architecture a bundle's or model's JSON record describes."""

    @abstractmethod
    def matches(self, keys) -> bool:
        """Whether a dense state dict's keys have this family's layout (`detect_family`)."""

    def loadable(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """`state` without the keys its library would skip on load (`ignored_keys`), so that a
        checkpoint the library itself loads is not refused for them."""
        if not self.ignored_keys:
            return state
        skip = re.compile("|".join(f"(?:{p})" for p in self.ignored_keys))
        return {k: v for k, v in state.items() if not skip.fullmatch(k)}

    @abstractmethod
    def infer_arch(self, state: dict[str, Tensor], hints: dict[str, Any]):
        """The architecture of a dense state dict; `hints` are what its files or options say."""

    @abstractmethod
    def target_arch(self, arch, **changes):
        """A new architecture of the same family; raises WeitError on impossible sizes."""

    @abstractmethod
    def build(self, arch) -> nn.Module:
        """The freshly initialised module of `arch` (its library's own initialisation)."""

    @abstractmethod
    def state_shapes(self, arch) -> dict[str, tuple[int, ...]]:
        """Every key of `arch`'s state dict with its shape, in the module's order, from the family's
        own layout (no module built, no library imported): the truth every file check compares with.
        tests/test_state_shapes.py holds it to the library's own module over many architectures."""

    @abstractmethod
    def describe(self, arch) -> str:
        """One line for people: the family's name and sizes."""

    @abstractmethod
    def param_count(self, arch) -> int:
        """Parameters of `arch` in closed form, so an absurd size is refused before anything is built."""

    # --- structure ----------------------------------------------------------------------------
    @abstractmethod
    def default_template_size(self, arch) -> int:
        """The template block size p when none is given."""

    @abstractmethod
    def template_types(self, arch, template_size: int | None = None) -> dict[str, TemplateType]:
        """The templated types of `arch`; raises WeitError when p does not divide their widths."""

    @abstractmethod
    def template_type_of(self, key: str, arch=None) -> str | None:
        """The template type of a dense weight key, or None for a small parameter. Families whose
        key names alone are ambiguous (a conv named alike in two block types) need `arch`."""

    def identity_suffixes(self, arch) -> tuple[str, ...]:
        """Keys within a block zeroed to make an added block the identity (default: `identity_zero`)."""
        return self.identity_zero

    def identity_rows(self, arch) -> dict[str, ZeroRuns]:
        """Keys within a block of which only some row runs are zeroed to make an added block the
        identity (e.g. adaLN-Zero's gates); the rest of the tensor keeps the copied block's values."""
        return {}

    @abstractmethod
    def layer_groups(self, arch) -> list[LayerGroup]:
        """The runs of repeated blocks whose counts the depth rules change."""

    @abstractmethod
    def sizes(self, arch) -> dict[str, int]:
        """Channel count of every named width axis."""

    @abstractmethod
    def axes(self, key: str, arch) -> list[Axis]:
        """Resizable dimensions of the dense tensor stored under `key`."""

    def size_options(self, arch) -> list[str]:
        """The command-line options that ask `materialize` for `arch`'s size."""
        return ["--depth", _option(arch.depth), "--width", _option(arch.width)]

    def arch_from_config(self, config: dict[str, Any], where: Any):
        """(adapter, architecture) of a model folder that holds this family's library config (the
        parsed `config`, read from the file `where`) but no weights — enough for `finetune --init
        random | weight-selection`; None when the config is not of this family's library. The
        adapter may be a sibling family on the same library, found by the layout the config's
        module has (arch/_timm.py). Default: None (the family reads no weightless folders)."""
        return None

    # --- the task's call (tasks/) ---------------------------------------------------------------
    def apply(self, call, *inputs):
        """The task's output from `call`, which runs this family's module (plain, or with composed
        weights through `torch.func.functional_call`) on positional and keyword arguments. Default:
        the module's own output on the task's inputs (x → logits)."""
        return call(*inputs)

    def task_forward(self, module: nn.Module) -> nn.Module:
        """`module` as its task calls it (`Task.outputs`, `Task.evaluate`); by default itself."""
        return module

    # --- weight selection (core/selection.py) -------------------------------------------------
    @abstractmethod
    def selection_indices(self, src, dst) -> dict[str, Tensor]:
        """The source indices each named axis of `dst` keeps; raises WeitError for a target that is
        not a selection of the source (larger, or of another structure)."""

    @abstractmethod
    def selection_axes(self, key: str, arch) -> dict[int, str] | None:
        """Dimension → axis name (a key of `selection_indices`) of `key`'s tensor; None for a key
        this family cannot select."""

    def selection_missing(self, key: str) -> Exception:
        """The error for a target tensor the source lacks or this family cannot select."""
        from weit_cli.errors import WeitError

        return WeitError(f"weight selection has no source tensor for '{key}'", "select from a checkpoint of the same structure")

    # --- recipes (recipe.py) ------------------------------------------------------------------
    @abstractmethod
    def full_rank(self, p: int) -> dict[str, int]:
        """The template types a recipe trains, each with the most independent p×p templates (its
        full rank): a template count is refused above it, and one number for all is capped at it."""

    @abstractmethod
    def arch_for_recipe(self, model, *, depth, width, num_classes: int):
        """The architecture a pretraining recipe's `model` section describes at one nested size."""

    @abstractmethod
    def recipe_template_size(self, model, widths: list[int]) -> int:
        """The template size of a recipe that sets none, from its model section and nested widths."""

    @abstractmethod
    def recipe_depths(self, depths: list) -> list:
        """A recipe's `nested.depths` as `target_arch` takes them."""

    @abstractmethod
    def check_recipe(self, recipe) -> None:
        """Refuse (ValueError, worded for the recipe) nested sizes and template settings that do
        not make a model of this family."""

    # --- helpers for subclasses ---------------------------------------------------------------
    @staticmethod
    def _match(patterns: list[tuple[str, Any]], key: str):
        for pat, val in patterns:
            if re.fullmatch(pat, key):
                return val
        return None


def _option(v: Any) -> str:
    """A size as the command line takes it: one number, or a comma list (one per stage)."""
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


__all__ = ["Adapter", "Axis", "ZeroRuns", "Hints", "LayerGroup", "TemplateType"]


class KeyTables:
    """For families whose layout is a few regex tables (a mixin placed before `Adapter`): templated
    types as key patterns with p×p templates (full rank p·p), the width axes of every key, and extra
    axes for weight selection (attention heads). A family sets the tables and the wording for a key
    no table knows; the four lookups below are then the same for every such family."""

    #: template type → the pattern of its dense keys
    templated: ClassVar[dict[str, str]]
    #: key pattern → the width axes of its tensor (`axes`)
    axes_table: ClassVar[list[tuple[str, list[Axis]]]]
    #: key pattern → {dimension: selection axis name} added to the width axes (`selection_axes`)
    selection_table: ClassVar[list[tuple[str, dict[int, str]]]] = []
    #: (message with {key}, hint) for a key no table knows
    unsupported: ClassVar[tuple[str, str]]

    def template_type_of(self, key: str, arch=None) -> str | None:
        for t, pat in self.templated.items():
            if re.fullmatch(pat, key):
                return t
        return None

    def axes(self, key: str, arch) -> list[Axis]:
        axes = Adapter._match(self.axes_table, key)
        if axes is None:
            from weit_cli.errors import InputError

            raise InputError(self.unsupported[0].format(key=key), self.unsupported[1])
        return axes

    def selection_axes(self, key: str, arch) -> dict[int, str] | None:
        axes = Adapter._match(self.axes_table, key)
        if axes is None:
            return None
        return {**{ax.dim: ax.name for ax in axes}, **(Adapter._match(self.selection_table, key) or {})}

    def full_rank(self, p: int) -> dict[str, int]:
        return {t: p * p for t in self.templated}


def check_head_sizes(depth: int, width: int, head_dim: int, p: int, num_heads: int | None,
                     extra: tuple[tuple[str, int], ...] = ()) -> None:
    """The size checks every transformer family with a fixed head_dim makes in `target_arch`: at
    least one block, a width that is whole heads and whole template blocks (and any `extra`
    (name, divisor) the family's layout needs), and --num-heads consistent with both."""
    from weit_cli.errors import WeitError

    if depth < 1:
        raise WeitError(f"depth must be at least 1, got {depth}", "pass --depth 1 or more")
    step = math.lcm(head_dim, p, *(d for _, d in extra))
    if width < 1 or width % step:
        lo = max(step, width // step * step)
        near = sorted({lo, lo + step if lo < width else lo})
        why = ", ".join([f"head_dim {head_dim}", f"template size {p}", *(f"{name} {d}" for name, d in extra)])
        raise WeitError(f"width {width} is not a multiple of {step} ({why})", f"nearest valid widths: {', '.join(map(str, near))}")
    if num_heads is not None and num_heads * head_dim != width:
        raise WeitError(
            f"--num-heads {num_heads} gives head_dim {width / num_heads:g}, but the templates fix head_dim at {head_dim}",
            f"use --num-heads {width // head_dim} or leave it out",
        )


def batchnorm_shapes(name: str, channels: int) -> dict[str, tuple[int, ...]]:
    """A BatchNorm's state dict (`state_shapes`): scale, shift, running statistics, scalar batch counter."""
    return {f"{name}.{leaf}": (channels,) for leaf in ("weight", "bias", "running_mean", "running_var")} | {f"{name}.num_batches_tracked": ()}


def check_param_count(adapter: Adapter, arch, what: str) -> None:
    """Refuse a size no machine could hold, counted in closed form before anything is allocated."""
    from weit_cli.errors import WeitError
    from weit_cli.limits import MAX_PARAMS

    n = adapter.param_count(arch)
    if n > MAX_PARAMS:
        raise WeitError(f"{what} would have {n / 1e9:.0f}B parameters", "pick a smaller size")



def check_selection_same(src, dst, names: tuple[str, ...], hint: str, quote: bool = False) -> None:
    """Weight selection keeps the input/output format: refuse the first of `names` that differs."""
    from weit_cli.errors import WeitError

    for name in names:
        a, b = getattr(src, name), getattr(dst, name)
        if a != b:
            a, b = (repr(a), repr(b)) if quote else (a, b)
            raise WeitError(f"weight selection needs the same {name.replace('_', ' ')} (source {a}, target {b})", hint)


def check_selection_smaller(problems: list[str]) -> None:
    """Weight selection only shrinks: refuse with every dimension of the target that is larger."""
    from weit_cli.errors import WeitError

    if problems:
        raise WeitError(
            "weight selection only initialises smaller models: target " + ", ".join(problems),
            "select from a larger checkpoint, or grow with 'weit extract-templates' + 'weit materialize'",
        )
