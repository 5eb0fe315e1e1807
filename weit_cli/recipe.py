"""Pretraining recipes: YAML validated by one pydantic model per section (`extra="forbid"`, every
field described), dotted command-line overrides merged before validation, and the resolved recipe
written next to every output.

    recipe = load_recipe("recipes/vit-fashion.yaml", ["train.lr=1e-3", "nested.depths=[2,4]"])
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError, WeitError

TYPES = ("qkv", "proj", "fc1", "fc2")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


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


class TemplatesSection(_Section):
    size: int | None = Field(None, ge=1, description="Template block size p = q; null means head_dim. Must divide head_dim.")
    count: int | dict[str, int] = Field(
        32, description="Templates per matrix type: one number for all, or a map {qkv, proj, fc1, fc2: N}."
    )
    init: Literal["timm-svd", "random"] = Field(
        "timm-svd",
        description=(
            "timm-svd: shared SVD of a freshly timm-initialised largest model, scalers rescaled to keep "
            "timm's weight scale; random: templates and scalers drawn so composed weights have std 0.02."
        ),
    )

    def counts(self) -> dict[str, int]:
        if isinstance(self.count, int):
            return {t: self.count for t in TYPES}
        return {t: self.count[t] for t in TYPES}

    @model_validator(mode="after")
    def _count_keys(self):
        if isinstance(self.count, dict):
            missing, extra = set(TYPES) - set(self.count), set(self.count) - set(TYPES)
            if missing or extra:
                raise ValueError(f"count map needs exactly the keys {', '.join(TYPES)}")
        if any(n < 1 for n in self.counts().values()):
            raise ValueError("template counts must be at least 1")
        return self


class NestedSection(_Section):
    depths: list[int] = Field(description="Depths trained as prefixes of the largest (number of blocks).")
    widths: list[int] = Field(description="Widths trained as head-aligned prefixes of the largest (multiples of head_dim).")
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
            if any(x < 1 for x in v):
                raise ValueError(f"{name} must be positive")
            setattr(self, name, sorted(set(v)))
        return self


class DataSection(_Section):
    source: str = Field("fashion-mnist", description="fashion-mnist, fashion-mnist:/folder, mnist5k, digits, or an image-folder path.")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="Fraction of the training images held out for validation (seeded).")
    train_subset: float | int | None = Field(None, description="Train on a seeded part only: a fraction in (0, 1] or an image count.")
    batch_size: int = Field(128, ge=1, description="Images per step over all processes (split evenly across DDP ranks).")


class TrainSection(_Section):
    steps: int = Field(1000, ge=1, description="Optimiser steps.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="Final learning rate as a fraction of the peak (cosine).")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (not on vectors, pos_embed or cls_token).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the task loss.")
    eval_every: int = Field(200, ge=0, description="Validate the largest and smallest sizes every N steps (0: only at the end).")
    eval_samples: int = Field(2000, ge=1, description="Validation images used by the periodic checks (the final check uses all).")
    checkpoint_every: int = Field(100, ge=0, description="Write a resumable checkpoint every N steps (0: never).")


class Recipe(_Section):
    model: ModelSection = Field(default_factory=ModelSection, description="Architecture family and fixed settings.")
    templates: TemplatesSection = Field(default_factory=TemplatesSection, description="Template size, count and initialisation.")
    nested: NestedSection = Field(description="Sizes trained together (sandwich rule).")
    data: DataSection = Field(default_factory=DataSection, description="Training data and batch size.")
    train: TrainSection = Field(default_factory=TrainSection, description="Optimiser, schedule, validation and checkpoints.")
    seed: int = Field(0, ge=0, description="Seed of initialisation, data split, data order and size sampling.")

    @property
    def template_size(self) -> int:
        return self.templates.size or self.model.head_dim

    @model_validator(mode="after")
    def _sizes(self):
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


# ---------------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, validate; errors are one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe {path} does not exist", "see recipes/ for examples")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise InputError(f"recipe {path} is not valid YAML{at}", "fix the syntax") from None
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
        loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and x.startswith(("function-", "constrained-"))))
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
