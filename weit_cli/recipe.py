"""Pretraining recipes: YAML validated by one pydantic model per section (`extra="forbid"`, every
field described), dotted command-line overrides merged before validation, and the resolved recipe
written next to every output.

    recipe = load_recipe(path, ["train.lr=1e-3", "nested.depths=[2,4]"])

The `model` section is the family's own (`Adapter.model_section`, chosen by `model.family`), and the
family checks the nested sizes and template settings (`Adapter.check_recipe`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from weit_cli.arch._registry import adapters, get_adapter, list_families
from weit_cli.errors import InputError, WeitError
from weit_cli.limits import MAX_SEED
from weit_cli.section import Section as _Section


def _default_family() -> str:
    """The family of a recipe whose model section names none."""
    (family,) = [a.family for a in adapters() if a.recipe_default]
    return family


def _family_of(v: Any) -> str:
    default = _default_family()
    return v.get("family", default) if isinstance(v, dict) else getattr(v, "family", default)


def _model_union():
    """Every family's model section, told apart by `family`."""
    sections = [Annotated[a.model_section, Tag(a.family)] for a in adapters()]
    return Annotated[Union[tuple(sections)], Discriminator(_family_of)]


AnyModelSection = _model_union()


class TemplatesSection(_Section):
    size: int | None = Field(
        None, ge=1,
        description=(
            "Template block size p = q; null means the family's default (the attention head size, or "
            "the gcd of every nested conv width, at most 16)."
        ),
    )
    count: int | dict[str, int] = Field(
        32,
        description=(
            "Templates per type: one number for all, or a map of the family's template types (e.g. "
            "{qkv, proj, fc1, fc2: N} or {conv3x3, conv1x1: N}); one number is capped at each type's full rank."
        ),
    )
    init: Literal["timm-svd", "random"] = Field(
        "timm-svd",
        description=(
            "timm-svd: shared SVD of a freshly timm-initialised largest model, scalers rescaled to keep "
            "timm's weight scale; random: templates and scalers drawn so composed weights have std 0.02."
        ),
    )

    def counts(self, types: tuple[str, ...]) -> dict[str, int]:
        if isinstance(self.count, int):
            return {t: self.count for t in types}
        return {t: self.count[t] for t in types}

    @model_validator(mode="after")
    def _count_keys(self):
        values = [self.count] if isinstance(self.count, int) else list(self.count.values())
        if any(n < 1 for n in values):
            raise ValueError("template counts must be at least 1")
        return self


class NestedSection(_Section):
    depths: list[int | list[int]] = Field(
        description=(
            "Depths trained as prefixes of the largest: blocks; for families with stages, blocks per "
            "stage (one number for every stage, or one per stage)."
        )
    )
    widths: list[int] = Field(
        description=(
            "Widths trained as prefixes of the largest: the embedding width, a multiple of head_dim; for "
            "families with stages, stage-1 channels (the others by model.stage_ratios)."
        )
    )
    sandwich: int = Field(2, ge=0, description="Random in-between sizes per step, besides the largest and the smallest.")
    distill: float = Field(
        0.0, ge=0, le=1, description="In-place distillation: weight of KL(largest ‖ size) in the loss of every smaller size."
    )
    distill_temperature: float = Field(1.0, gt=0, description="Softmax temperature of the distillation term.")
    distill_warmup_steps: int = Field(
        0, ge=0, description="Ramp the in-place distillation weight linearly from 0 to nested.distill over the first N steps."
    )
    shrink_start: float = Field(
        0.0, ge=0, lt=1,
        description=(
            "Delayed shrinking: train the largest size alone for this fraction of train.steps, then every "
            "size as nested.sampling says (0: nested from the first step)."
        ),
    )
    largest_tail: float = Field(
        0.0, ge=0, lt=1,
        description=(
            "Train the largest size alone for this last fraction of train.steps (after the nested steps; "
            "0: nested to the end)."
        ),
    )
    depth_rule: Literal["prefix", "spread"] = Field(
        "prefix",
        description=(
            "Which blocks a smaller depth keeps: prefix, the first ones; spread, evenly spaced ones, the first "
            "and the last kept (DynaBERT, LayerDrop). Recorded in the bundle: materialize's auto takes it."
        ),
    )
    sampling: Literal["sandwich", "one-size"] = Field(
        "sandwich",
        description=(
            "sandwich: largest, smallest and nested.sandwich random sizes every step; one-size: one size per "
            "step, drawn with probability ∝ its training FLOPs ** nested.one_size_power."
        ),
    )
    one_size_power: float = Field(
        1.0, ge=0, le=4, description="nested.sampling=one-size: exponent of a size's FLOPs in its probability (0: uniform)."
    )
    sizes: list[tuple[int | list[int], int]] | None = Field(
        None,
        description=(
            "Train only these [depth, width] pairs of the depths × widths grid, the largest and the smallest "
            "among them (e.g. the diagonal [[1, 32], [2, 64], [3, 96]]; null: every pair)."
        ),
    )

    @model_validator(mode="after")
    def _sorted(self):
        for name in ("depths", "widths"):
            v = getattr(self, name)
            if not v:
                raise ValueError(f"{name} must list at least one size")
            flat = [y for x in v for y in (x if isinstance(x, list) else [x])]
            if any(x < 1 for x in flat) or any(isinstance(x, list) and not x for x in v):
                raise ValueError(f"{name} must be positive")
            if all(isinstance(x, int) for x in v):
                setattr(self, name, sorted(set(v)))
            else:  # per-stage lists: deduplicated, ordered by total then stage by stage
                keyed = {(x,) if isinstance(x, int) else tuple(x): x for x in v}
                setattr(self, name, [keyed[k] for k in sorted(keyed, key=lambda k: (len(k) > 1, sum(k), k))])
        if self.sizes is not None:
            key = lambda d: tuple(d) if isinstance(d, list) else d  # noqa: E731
            grid = [(key(d), w) for d in self.depths for w in self.widths]
            picked = [(key(d), w) for d, w in self.sizes]
            if off := [f"{d}x{w}" for d, w in picked if (d, w) not in grid]:
                raise ValueError(f"sizes {', '.join(off)} are not in the depths × widths grid")
            corners = [(key(self.depths[-1]), self.widths[-1]), (key(self.depths[0]), self.widths[0])]
            if any(c not in picked for c in corners):
                raise ValueError("sizes must list the largest and the smallest pair of the grid")
            listed = dict(zip(picked, self.sizes))  # each pair once, in the grid's order
            self.sizes = [listed[p] for p in grid if p in listed]
        if self.shrink_start + self.largest_tail >= 1:
            raise ValueError("shrink_start + largest_tail must be below 1 (they leave no nested steps)")
        return self


class DataSection(_Section):
    source: str = Field("fashion-mnist", description="fashion-mnist, fashion-mnist:/folder, mnist5k, digits, or an image-folder path.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of the training images held out for validation (seeded).")
    train_subset: float | int | None = Field(None, description="Train on a seeded part only: a fraction in (0, 1] or an image count.")
    batch_size: int = Field(128, ge=1, description="Images per step over all processes (split evenly across DDP ranks).")

    @field_validator("train_subset", mode="before")
    @classmethod
    def _not_bool(cls, v):
        if isinstance(v, bool):  # YAML `true` would otherwise become 1.0, "all of it"
            raise ValueError("must be a fraction in (0, 1] or an image count, not a boolean")
        return v


class LrScales(_Section):
    templates: float = Field(1.0, gt=0, description="Multiplier of train.lr for the templates.")
    scalers: float = Field(1.0, gt=0, description="Multiplier of train.lr for the scalers.")
    small: float = Field(1.0, gt=0, description="Multiplier of train.lr for the small parameters (norms, biases, embeddings, heads).")


class EmaSection(_Section):
    decay: float = Field(
        0.999, gt=0, lt=1,
        description="Largest decay of the exponential moving average of the trained tensors (diffusers' EMAModel); the EMA weights are written.",
    )
    warmup_power: float = Field(
        0.75, ge=0,
        description="EMA warm-up: decay at update k = min(decay, 1 - (1 + k)^-power) (diffusers' use_ema_warmup); 0: diffusers' (1 + k)/(10 + k).",
    )


class TeacherSection(_Section):
    source: str = Field(
        description="A dense checkpoint of the recipe's family and largest size (a timm/diffusers/transformers folder or a weights file)."
    )
    weight: float = Field(
        0.5, ge=0, le=1,
        description="Weight of the distance to the teacher's outputs in every size's loss (the task loss gets 1 - weight; 1: teacher only).",
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of the distillation term (classification).")
    init: bool = Field(True, description="Initialise the templates by the teacher's shared SVD (else by templates.init).")


class TrainSection(_Section):
    steps: int = Field(1000, ge=1, description="Optimiser steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="Final learning rate as a fraction of the peak (cosine).")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on vectors, nor on the family's embeddings such as pos_embed).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1)."
    )
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the task loss.")
    eval_every: int = Field(200, ge=0, description="Validate the largest and smallest sizes every N steps (0: only at the end).")
    eval_samples: int = Field(2000, ge=1, description="Validation images used by the periodic checks (the final check uses all).")
    checkpoint_every: int = Field(100, ge=0, description="Write a resumable checkpoint every N steps (0: never).")
    lr_scales: LrScales = Field(
        default_factory=lambda: LrScales(), description="Learning-rate multipliers of the templates, the scalers and the small parameters."
    )
    # Generation (issue 19): both off by default, and then left out of the resolved recipe (_OFF_WHEN).
    ema: EmaSection | None = Field(None, description="Keep an EMA of the trained tensors and write it instead of the last weights (null: off).")
    label_dropout: float | None = Field(
        None, ge=0, le=1,
        description="Generation: fraction of training labels replaced by 'no class' for classifier-free guidance (null: the task's 0.1).",
    )


class Recipe(_Section):
    model: AnyModelSection = Field(
        default_factory=lambda: get_adapter(_default_family()).model_section(), description="Architecture family and fixed settings."
    )
    templates: TemplatesSection = Field(default_factory=TemplatesSection, description="Template size, count and initialisation.")
    nested: NestedSection = Field(description="Sizes trained together (sandwich rule).")
    data: DataSection = Field(default_factory=DataSection, description="Training data and batch size.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimiser, schedule, validation and checkpoints.")
    teacher: TeacherSection | None = Field(
        None, description="Nested distillation from a dense checkpoint: every trained size learns from its outputs (pretrain --teacher)."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of initialisation, data split, data order and size sampling.")

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def adapter(self):
        return get_adapter(self.family)

    @property
    def template_size(self) -> int:
        if self.templates.size:
            return self.templates.size
        return self.adapter.recipe_template_size(self.model, self.nested.widths)

    def template_counts(self) -> dict[str, int]:
        """Templates per type of this recipe's family; one number is capped at each type's full rank."""
        limits = self.adapter.full_rank(self.template_size)
        counts = self.templates.counts(tuple(limits))
        if isinstance(self.templates.count, int):
            counts = {t: min(n, limits[t]) for t, n in counts.items()}
        return counts

    def depth_options(self) -> list:
        """The nested depths as the adapter takes them (ints, or per-stage tuples)."""
        return self.adapter.recipe_depths(self.nested.depths)

    def largest(self) -> tuple[Any, int]:
        """(depth, width) of the largest nested size (per stage, the most blocks of any listed depth)."""
        return elementwise(max, self.depth_options()), max(self.nested.widths)

    def smallest(self) -> tuple[Any, int]:
        return elementwise(min, self.depth_options()), min(self.nested.widths)

    def size_grid(self) -> list[tuple[Any, int]]:
        """Every trained (depth, width), depth-major: the depths × widths grid, or nested.sizes of it."""
        if self.nested.sizes is None:
            return [(d, w) for d in self.depth_options() for w in self.nested.widths]
        depths = dict(zip(map(repr, self.nested.depths), self.depth_options()))
        return [(depths[repr(d)], w) for d, w in self.nested.sizes]

    @model_validator(mode="after")
    def _sizes(self):
        types = tuple(self.adapter.full_rank(1))
        if isinstance(self.templates.count, dict):
            missing, extra = set(types) - set(self.templates.count), set(self.templates.count) - set(types)
            if missing or extra:
                raise ValueError(f"templates.count map needs exactly the keys {', '.join(types)}")
        self.adapter.check_recipe(self)
        if self.teacher is not None and self.nested.distill > 0:
            raise ValueError("nested.distill (the largest size as teacher) and a teacher checkpoint exclude each other: set nested.distill=0")
        if self.nested.sampling == "one-size" and self.nested.distill > 0:
            raise ValueError("nested.distill needs the largest size in every step: set nested.distill=0 or nested.sampling=sandwich")
        return self


def elementwise(fn, values: list) -> Any:
    if values and isinstance(values[0], tuple):
        return tuple(fn(v[s] for v in values) for s in range(len(values[0])))
    return fn(values)


# ---------------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, validate; errors are one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe {path} does not exist", "see recipes/ for examples")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"recipe {path} is not UTF-8 text", "a recipe is a YAML text file; see recipes/*.yaml") from None
    except OSError as e:
        raise InputError(f"recipe {path} cannot be read: {e.strerror}", "check the path and its permissions") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise InputError(f"recipe {path} is not valid YAML{at}", "fix the syntax") from None
    except RecursionError:
        raise InputError(f"recipe {path} is nested too deeply to be a recipe", "see recipes/*.yaml for the layout") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"recipe {path} must be a mapping of sections", "see recipes/ for examples")
    for item in overrides or []:
        apply_override(raw, item)
    return validate(raw, str(path))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Merge one `a.b.c=value` (value parsed as YAML: numbers, lists, null) into the raw mapping."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise WeitError(f"override '{item}' is not of the form key.sub=value", "e.g. --set train.lr=1e-3")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    except RecursionError:
        raise WeitError(f"override '{item[:60]}': the value is nested too deeply", "e.g. --set nested.depths=[2,4]") from None
    if isinstance(value, str):
        value = _number(value)
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise WeitError(f"override '{item}': {'.'.join(parts[: i + 1])} is not a section", "check the key")
        node = nxt
    node[parts[-1]] = value


def _number(text: str):
    """YAML 1.1 reads '1e-3' as a string; take it as the number the user meant."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def validate(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise WeitError(f"{source}: {_one_line(e)}", "fix the recipe or the --set override; see recipes/*.yaml") from None


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = [x for x in err["loc"] if not (isinstance(x, str) and x.startswith(("function-", "constrained-")))]
        if len(where) > 1 and where[0] == "model" and where[1] in list_families():
            del where[1]  # the family tag of the model-section union
        loc = ".".join(str(x) for x in where)
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif err["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
    seen = list(dict.fromkeys(parts))
    return "; ".join(seen[:4]) + (f" (+{len(seen) - 4} more)" if len(seen) > 4 else "")


# ---------------------------------------------------------------------------------------------- output
def dump(recipe: Recipe, command: str | None = None) -> str:
    """The resolved recipe as YAML, opening with the command that reproduces the run."""
    body = yaml.safe_dump(to_plain(recipe), sort_keys=False, default_flow_style=False, width=100)
    head = "# resolved recipe (every default filled in)\n"
    if command:
        head = f"# {command}\n" + head
    return head + body


# Options added after recipes were first written down: left out of the resolved recipe while they
# are off, so a recipe that does not use them keeps its digest (and its checkpoints stay resumable).
_OFF_WHEN = {
    ("teacher",): None,
    ("train", "lr_scales"): LrScales().model_dump(mode="json"),
    ("nested", "distill_warmup_steps"): 0,
    ("train", "ema"): None,
    ("train", "label_dropout"): None,
    ("nested", "shrink_start"): 0.0,
    ("nested", "largest_tail"): 0.0,
    ("nested", "sampling"): "sandwich",
    ("nested", "depth_rule"): "prefix",
    ("nested", "one_size_power"): 1.0,
    ("nested", "sizes"): None,
}


def to_plain(recipe: Recipe) -> dict[str, Any]:
    d = recipe.model_dump(mode="json")
    for path, off in _OFF_WHEN.items():
        *parents, last = path
        node = d
        for k in parents:
            node = node[k]
        if node.get(last) == off:
            del node[last]
    return d


def digest(recipe: Recipe) -> str:
    """Identity of the resolved recipe (independent of comments, key order and overrides syntax)."""
    return hashlib.sha256(yaml.safe_dump(to_plain(recipe), sort_keys=True).encode()).hexdigest()


def recipe_path_for(output: Path) -> Path:
    """Where the resolved recipe of `output` goes: bundle.safetensors → bundle.recipe.yaml."""
    output = Path(output)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + ".recipe.yaml")
