"""Pretraining recipes: YAML validated by one pydantic model per section (`extra="forbid"`, every
field described), dotted command-line overrides merged before validation, and the resolved recipe
written next to every output.

    recipe = load_recipe("recipes/vit-fashion.yaml", ["train.lr=1e-3", "nested.depths=[2,4]"])
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from weit_cli.errors import InputError, WeitError

TYPES = ("qkv", "proj", "fc1", "fc2")  # ViT
RESNET_TYPES = ("conv3x3", "conv1x1")
TYPES_BY_FAMILY = {"vit": TYPES, "resnet": RESNET_TYPES}
MAX_SEED = 2**63 - 1  # torch, numpy (mod 2**32) and random all take it
RESNET_STEMS = {"deep": "deep", "deep_tiered": "deep_tiered", "7x7": ""}  # recipe name → timm stem_type


class _Section(BaseModel):
    # NaN and ±inf are never meant (`lr: .inf` would train straight into NaN): refuse them everywhere.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class ModelSection(_Section):
    family: Literal["vit"] = Field("vit", description="Architecture family (timm VisionTransformer).")
    img_size: int = Field(28, ge=4, description="Input image side in pixels; data is resized to it.")
    patch_size: int = Field(4, ge=1, description="Patch side in pixels; must divide img_size.")
    in_chans: Literal[1, 3] = Field(1, description="Input channels: 1 (gray) or 3 (RGB); data is converted.")
    head_dim: int = Field(64, ge=1, description="Channels per attention head, fixed across sizes (ViT-Tiny: 64).")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / width.")
    global_pool: Literal["token", "avg"] = Field("token", description="Classifier input: class token or mean of patch tokens.")

    @model_validator(mode="after")
    def _patches(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide img_size {self.img_size}")
        return self


class ResNetModelSection(_Section):
    """timm ResNet. Depth = blocks per stage, width = stage-1 channels (the other stages follow
    `stage_ratios`). A deep stem is tied to stage 1 (its output is stage 1's width, so stage 1 has
    no projection shortcut) and is nested with it."""

    family: Literal["resnet"] = Field(description="Architecture family (timm ResNet: resnet18-style basic or resnet50-style bottleneck blocks).")
    block: Literal["basic", "bottleneck"] = Field("basic", description="Residual block type (bottleneck: 4x expansion, 1x1-3x3-1x1 convs).")
    img_size: int = Field(28, ge=8, description="Input image side in pixels; data is resized to it (the network itself is size-agnostic).")
    in_chans: Literal[1, 3] = Field(1, description="Input channels: 1 (gray) or 3 (RGB); data is converted.")
    stem_type: Literal["deep", "deep_tiered", "7x7"] = Field(
        "deep", description="deep / deep_tiered: three 3x3 convs whose output width is tied to stage 1; 7x7: timm's fixed 64-channel stem."
    )
    stage_ratios: list[int] = Field([1, 2, 4, 8], description="Channels of stages 1-4 as multiples of the nested width (resnet18: 1, 2, 4, 8).")
    avg_down: bool = Field(False, description="Average-pool shortcuts (the '-d' variants) instead of strided 1x1 projections.")
    bn_calibration_batches: int = Field(
        20, ge=1,
        description=(
            "BatchNorm statistics: after the last step the largest size's running statistics are "
            "re-estimated over this many training batches (also before every validation of a size)."
        ),
    )

    @model_validator(mode="after")
    def _ratios(self):
        if len(self.stage_ratios) != 4 or any(r < 1 for r in self.stage_ratios):
            raise ValueError(f"stage_ratios {self.stage_ratios} must be 4 positive integers (a timm ResNet has 4 stages)")
        return self


def _family_of(v: Any) -> str:
    return v.get("family", "vit") if isinstance(v, dict) else getattr(v, "family", "vit")


AnyModelSection = Annotated[
    Union[Annotated[ModelSection, Tag("vit")], Annotated[ResNetModelSection, Tag("resnet")]],
    Discriminator(_family_of),
]


class TemplatesSection(_Section):
    size: int | None = Field(
        None, ge=1,
        description=(
            "Template block size p = q; null means head_dim (ViT; must divide it) or the gcd of every "
            "nested conv width, at most 16 (ResNet)."
        ),
    )
    count: int | dict[str, int] = Field(
        32,
        description=(
            "Templates per type: one number for all, or a map (ViT {qkv, proj, fc1, fc2: N}; ResNet "
            "{conv3x3, conv1x1: N}; one number is capped at each ResNet type's full rank)."
        ),
    )
    init: Literal["timm-svd", "random"] = Field(
        "timm-svd",
        description=(
            "timm-svd: shared SVD of a freshly timm-initialised largest model, scalers rescaled to keep "
            "timm's weight scale; random: templates and scalers drawn so composed weights have std 0.02."
        ),
    )

    def counts(self, types: tuple[str, ...] = TYPES) -> dict[str, int]:
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
            "Depths trained as prefixes of the largest: blocks (ViT); blocks per stage (ResNet: one "
            "number for every stage, or a list of 4)."
        )
    )
    widths: list[int] = Field(
        description=(
            "Widths trained as prefixes of the largest: embedding width, a multiple of head_dim (ViT); "
            "stage-1 channels, the others by model.stage_ratios (ResNet)."
        )
    )
    sandwich: int = Field(2, ge=0, description="Random in-between sizes per step, besides the largest and the smallest.")
    distill: float = Field(
        0.0, ge=0, le=1, description="In-place distillation: weight of KL(largest ‖ size) in the loss of every smaller size."
    )
    distill_temperature: float = Field(1.0, gt=0, description="Softmax temperature of the distillation term.")

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
            else:  # per-stage lists (ResNet): deduplicated, ordered by total then stage by stage
                keyed = {(x,) if isinstance(x, int) else tuple(x): x for x in v}
                setattr(self, name, [keyed[k] for k in sorted(keyed, key=lambda k: (len(k) > 1, sum(k), k))])
        return self


class DataSection(_Section):
    source: str = Field("fashion-mnist", description="fashion-mnist, fashion-mnist:/folder, mnist5k, digits, or an image-folder path.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of the training images held out for validation (seeded).")
    train_subset: float | int | None = Field(None, description="Train on a seeded part only: a fraction in (0, 1] or an image count.")

    @field_validator("train_subset", mode="before")
    @classmethod
    def _not_bool(cls, v):
        if isinstance(v, bool):  # YAML `true` would otherwise become 1.0, "all of it"
            raise ValueError("must be a fraction in (0, 1] or an image count, not a boolean")
        return v
    batch_size: int = Field(128, ge=1, description="Images per step over all processes (split evenly across DDP ranks).")


class TrainSection(_Section):
    steps: int = Field(1000, ge=1, description="Optimiser steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="Final learning rate as a fraction of the peak (cosine).")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on vectors, pos_embed or cls_token).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1)."
    )
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the task loss.")
    eval_every: int = Field(200, ge=0, description="Validate the largest and smallest sizes every N steps (0: only at the end).")
    eval_samples: int = Field(2000, ge=1, description="Validation images used by the periodic checks (the final check uses all).")
    checkpoint_every: int = Field(100, ge=0, description="Write a resumable checkpoint every N steps (0: never).")


class Recipe(_Section):
    model: AnyModelSection = Field(default_factory=ModelSection, description="Architecture family and fixed settings.")
    templates: TemplatesSection = Field(default_factory=TemplatesSection, description="Template size, count and initialisation.")
    nested: NestedSection = Field(description="Sizes trained together (sandwich rule).")
    data: DataSection = Field(default_factory=DataSection, description="Training data and batch size.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimiser, schedule, validation and checkpoints.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of initialisation, data split, data order and size sampling.")

    @property
    def family(self) -> str:
        return self.model.family

    @property
    def template_size(self) -> int:
        if self.templates.size:
            return self.templates.size
        if self.family == "resnet":
            g = 16
            for w in self.nested.widths:
                g = math.gcd(g, *(w * r for r in self.model.stage_ratios))
            return g
        return self.model.head_dim

    def template_counts(self) -> dict[str, int]:
        """Templates per type of this recipe's family; one ResNet number is capped at each type's full rank."""
        counts = self.templates.counts(TYPES_BY_FAMILY[self.family])
        if self.family == "resnet" and isinstance(self.templates.count, int):
            p = self.template_size
            counts = {t: min(n, p * p * (9 if t == "conv3x3" else 1)) for t, n in counts.items()}
        return counts

    def depth_options(self) -> list:
        """The nested depths as the adapter takes them: ints (ViT), 4-tuples of blocks per stage (ResNet)."""
        if self.family == "vit":
            return list(self.nested.depths)
        return [tuple(d) if isinstance(d, list) else (d,) * 4 for d in self.nested.depths]

    def largest(self) -> tuple[Any, int]:
        """(depth, width) of the largest nested size (per stage, the most blocks of any listed depth)."""
        return elementwise(max, self.depth_options()), max(self.nested.widths)

    def smallest(self) -> tuple[Any, int]:
        return elementwise(min, self.depth_options()), min(self.nested.widths)

    @model_validator(mode="after")
    def _sizes(self):
        types = TYPES_BY_FAMILY[self.family]
        if isinstance(self.templates.count, dict):
            missing, extra = set(types) - set(self.templates.count), set(self.templates.count) - set(types)
            if missing or extra:
                raise ValueError(f"templates.count map needs exactly the keys {', '.join(types)}")
        if self.family == "resnet":
            return self._resnet_sizes()
        if any(isinstance(d, list) for d in self.nested.depths):
            raise ValueError("nested.depths: per-stage lists are for ResNets; a ViT depth is one number")
        hd, p = self.model.head_dim, self.template_size
        if hd % p:
            raise ValueError(f"templates.size {p} must divide model.head_dim {hd}")
        step = math.lcm(hd, p)
        bad = [w for w in self.nested.widths if w % step]
        if bad:
            raise ValueError(f"nested.widths {bad} are not multiples of head_dim {hd}")
        for w in self.nested.widths:
            hidden = w * self.model.mlp_ratio
            if hidden != int(hidden) or int(hidden) % p:
                raise ValueError(f"width {w} × mlp_ratio {self.model.mlp_ratio:g} is not a multiple of the template size {p}")
        limit = p * p
        over = {t: n for t, n in self.templates.counts().items() if n > limit}
        if over:
            raise ValueError(f"templates.count {over} exceeds {limit} = size² (the most {p}×{p} templates can span)")
        return self

    def _resnet_sizes(self):
        """Every nested size must be a valid prefix of the largest: checked by the ResNet adapter itself."""
        from weit_cli.arch._registry import get_adapter

        if any(isinstance(d, list) and len(d) != 4 for d in self.nested.depths):
            raise ValueError("nested.depths: a per-stage depth lists 4 numbers (a timm ResNet has 4 stages)")
        p = self.template_size
        largest, smallest = self.largest(), self.smallest()
        for name, (d, _) in (("largest", largest), ("smallest", smallest)):
            if d not in self.depth_options():
                raise ValueError(
                    f"nested.depths: the per-stage {name} {list(d)} must be listed (every stage's "
                    f"{'most' if name == 'largest' else 'fewest'} blocks)"
                )
        adapter = get_adapter("resnet")
        try:
            arch = adapter.arch_for_recipe(self.model, depth=largest[0], width=largest[1], num_classes=10)
            adapter.template_types(arch, p)
            for d in self.depth_options():
                for w in self.nested.widths:
                    adapter.target_arch(arch, depth=d, width=w, template_size=p)
        except WeitError as e:
            raise ValueError(f"nested sizes: {e.message}") from None
        limits = {"conv3x3": 9 * p * p, "conv1x1": p * p}
        counts = self.templates.counts(RESNET_TYPES)
        if isinstance(self.templates.count, int):
            over = {t: n for t, n in counts.items() if n > max(limits.values())}
        else:
            over = {t: n for t, n in counts.items() if n > limits[t]}
        if over:
            raise ValueError(f"templates.count {over} exceeds the full rank of {p}×{p} templates (conv3x3 {limits['conv3x3']}, conv1x1 {limits['conv1x1']})")
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
        if len(where) > 1 and where[0] == "model" and where[1] in TYPES_BY_FAMILY:
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


def to_plain(recipe: Recipe) -> dict[str, Any]:
    d = recipe.model_dump(mode="json")
    return d


def sha256(recipe: Recipe) -> str:
    """Identity of the resolved recipe (independent of comments, key order and overrides syntax)."""
    return hashlib.sha256(yaml.safe_dump(to_plain(recipe), sort_keys=True).encode()).hexdigest()


def recipe_path_for(output: Path) -> Path:
    """Where the resolved recipe of `output` goes: bundle.safetensors → bundle.recipe.yaml."""
    output = Path(output)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + ".recipe.yaml")
