"""The commands' options, declared once: each field carries its default, its bounds or choices, and
(as `Opt` metadata) the flag and hint its error names. The library's keyword defaults read the module
instances below (FINETUNE, SAMPLE, …), and so do the Typer options in cli.py (tests/test_options.py
checks that the two agree); the library functions check what they received with `check`, so a value
out of range is refused in one line, with the same words, from the CLI and from Python alike.
Quantities several commands share (learning rate, batch size, steps, …) are annotated types written
once here; context checks (batch size vs world size, classes vs data, one option needing another)
stay in the commands. Recipe options live in recipe.py's models.

This module imports nothing heavy (pydantic, no torch): `weit --help` reads it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    Optional,
    TypeVar,
    get_args,
    get_origin,
)

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from weit_cli.errors import WeitError
from weit_cli.limits import MAX_SEED, DepthRule, WidthRule
from weit_cli.section import Section


@dataclass(frozen=True)
class Opt:
    """How an option's error reads. `flag`: its name on the command line (default: `--` + the field
    name with dashes); `hint`: the error's hint, with {flag} and {default} filled in; `rule`: what the
    value must be (default: read from the bounds, e.g. "in 1..1000", "at least 2", "positive and
    finite"); `noun`: what a choice is called ("unknown {noun} 'x'"; default: the flag). Several
    `Opt`s on one field merge, the later winning."""

    flag: str | None = None
    hint: str | None = None
    rule: str | None = None
    noun: str | None = None


# ------------------------------------------------------------------------------ shared quantities
SEED = 0  # every command's --seed
# Each range is written here once; a command that truly needs another bound has its own type, with why.
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), Opt(rule=f"an integer in 0..{MAX_SEED}", hint="e.g. 0")]
TrainSteps = Annotated[int, Field(ge=1, le=10_000_000), Opt(hint="a few hundred steps is typical")]  # optimiser steps
LearningRate = Annotated[float, Field(gt=0), Opt(hint="e.g. {flag} {default}")]
# Images per training step. BatchNorm models train on batch statistics, which need 2 or more images
# (a batch of one normalises every feature to 0); the same holds for --calibrate's batches.
TrainBatch = Annotated[int, Field(ge=2), Opt(hint="e.g. {flag} {default}")]
EvalBatch = Annotated[int, Field(ge=1), Opt(hint="e.g. {flag} {default}")]  # images per inference batch
Temperature = Annotated[float, Field(gt=0), Opt(hint="1.0 is plain KL on the logits")]
WarmupSteps = Annotated[Optional[int], Field(ge=0), Opt(rule="0 or more steps", hint="e.g. {flag} 20")]
CalibrateBatches = Annotated[int, Field(ge=1), Opt(hint="20 batches is typical")]
CheckpointEvery = Annotated[int, Field(ge=0), Opt(rule="0 (never) or more steps", hint="e.g. {flag} {default}")]
Fraction = Annotated[float, Field(ge=0, le=1)]  # a weight or probability in [0, 1]
LabelDropout = Annotated[Fraction, Opt(flag="label dropout", hint="e.g. 0.1, or 0 for no guidance")]
SamplingSteps = Annotated[int, Field(ge=1, le=1000), Opt(hint="e.g. {flag} {default}")]  # DDIM steps; 1000 training steps
Guidance = Annotated[float, Field(ge=0), Opt(rule="a number ≥ 0", hint="1 is no guidance; 2-4 sharpens the classes")]
MAX_SCALE = 64  # the sample grid's largest nearest-neighbour enlargement
Dtype = Literal["float32", "bfloat16", "float16"]  # torch's names: torch is imported once the options are checked
Init = Literal["weit", "random", "weight-selection"]
Schedule = Literal["cosine", "constant"]
MAX_EPOCHS = 100_000  # beyond this a typo, not a plan (the schedule and metrics are per epoch)


class Options(Section):
    """The base of the option models: Section's strictness (no unknown keys, no NaN or ±inf), plus
    no silent conversions (2.5 steps or `True` images are refused, not rounded) and frozen instances."""

    model_config = ConfigDict(strict=True, frozen=True, defer_build=True)  # built at the first check: `weit --help` stays fast
    #: the hint of a field whose type has none
    fallback_hint: ClassVar[str] = "see the command's --help"
    #: field → flag, where a command names a shared field otherwise (e.g. steps → --distill-steps)
    flags: ClassVar[dict[str, str]] = {}


# ---------------------------------------------------------------------------------------- commands
class Resizing(Options):
    """How a bundle becomes a model of another size (docs/method.md §4)."""

    depth_rule: Annotated[DepthRule, Opt(noun="depth rule")] = "auto"
    width_rule: Annotated[WidthRule, Opt(noun="width rule")] = "tile"  # tile: Net2Net, lossless for integer ratios


class MaterializeOptions(Resizing):
    dtype: Annotated[Dtype, Opt(noun="dtype")] = "float32"
    calibrate_batches: CalibrateBatches = 20  # BatchNorm models, with --calibrate DATA
    calibrate_batch_size: TrainBatch = 64
    seed: Seed = SEED


class ExtractOptions(Options):
    num_templates: int = 16  # per template type, capped at each type's full rank
    template_size: Annotated[Optional[int], Field(ge=1), Opt(hint="leave it out for the family's default (e.g. the attention head size)")] = None
    num_heads: Annotated[Optional[int], Field(ge=1), Opt(hint="leave it out to read it from the checkpoint")] = None


class ShortTraining(Options):
    """A few hundred AdamW steps on a small labelled set: `fit-scalers`, and the distillation of
    `extract-templates --data`."""

    steps: TrainSteps = 200
    lr: LearningRate = 1e-3  # peak learning rate (warmup, then cosine)
    batch_size: TrainBatch = 64
    temperature: Temperature = 1.0  # distillation softmax temperature (1: plain KL on the logits)
    seed: Seed = SEED


class DistillOptions(ShortTraining):
    """The distillation of `extract-templates --data`, whose flags say so."""

    flags: ClassVar[dict[str, str]] = {"steps": "--distill-steps", "lr": "--distill-lr"}


class FitScalersOptions(ShortTraining, Resizing):
    distill: Annotated[Fraction, Opt(hint="0 turns distillation off, 0.5 weighs KL and CE equally")] = 0.0  # KL weight
    calibrate_batches: CalibrateBatches = 20  # BatchNorm models: batches that re-estimate the running statistics
    warmup: WarmupSteps = None  # None: a tenth of the steps
    # A checkpoint costs a write of the target's scalers, small parameters and optimizer state, a
    # few times smaller than the bundle; every 50 steps loses at most a quarter of a default fit.
    checkpoint_every: CheckpointEvery = 50


class FinetuneOptions(Options):
    fallback_hint: ClassVar[str] = "see 'weit finetune --help'"

    init: Annotated[Init, Opt(noun="--init")] = "weit"  # weight-selection needs --from
    lr: LearningRate = 5e-4
    warmup: Annotated[float, Field(ge=0), Opt(rule="0 or more epochs")] = 0.0
    schedule: Annotated[Schedule, Opt(noun="--schedule")] = "cosine"
    min_lr_ratio: Fraction = 0.0
    batch_size: TrainBatch = 64  # over all processes
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    grad_clip: Annotated[float, Field(ge=0), Opt(rule="0 (off) or more")] = 1.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    ema: Annotated[float, Field(ge=0, lt=1), Opt(rule="a decay in [0, 1)", hint="e.g. --ema 0.999, or 0 for none")] = 0.0
    seed: Seed = SEED
    data_seed: Seed = SEED


class FinetuneRun(FinetuneOptions):
    """What `finetune` checks: the options, and the epochs it has no default for."""

    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)]


class SampleOptions(Options):
    """`weit sample` and the samples `weit evaluate` draws from a generator."""

    n: Annotated[int, Field(ge=1, le=100_000), Opt(flag="-n", hint="e.g. -n {default}")] = 64  # images
    steps: SamplingSteps = 50  # DDIM steps (η = 0)
    # classifier-free guidance scale (1: none, the conditional ε). 2: on the shipped generation recipe's
    # largest size (4000 steps, 3 seeds) judge FID 72.6 → 26.9 and class accuracy 57.6 → 83.3 % against 1
    # (docs/benchmarks.md, "A budget at which samples are garments")
    guidance: Guidance = 2.0
    batch_size: EvalBatch = 64  # images per sampling batch (the images do not depend on it)
    scale: Annotated[Optional[int], Field(ge=1, le=MAX_SCALE), Opt(hint="e.g. --scale 4, or leave it out for ≥ 112 px per image")] = None
    seed: Seed = SEED


class EvaluateOptions(Options):
    num_samples: Annotated[int, Field(ge=2, le=100_000)] = 1000  # generated (balanced over the classes) and real test images
    batch_size: EvalBatch = 256  # classification: images per evaluation batch
    episodes: Annotated[int, Field(ge=1, le=10_000)] = 10  # control: rollout episodes (episode i resets with seed + i)
    seed: Seed = SEED
    fallback_hint: ClassVar[str] = "e.g. {flag} {default}"


# The defaults, read by the library's keyword defaults and cli.py's options. Built without validation
# (which would build every model's validator at import); tests/test_options.py validates them.
MATERIALIZE = MaterializeOptions.model_construct()
EXTRACT = ExtractOptions.model_construct()
DISTILL = DistillOptions.model_construct()
FIT_SCALERS = FitScalersOptions.model_construct()
FINETUNE = FinetuneOptions.model_construct()
SAMPLE = SampleOptions.model_construct()
EVALUATE = EvaluateOptions.model_construct()

# --------------------------------------------------------------------------------------- the check
M = TypeVar("M", bound=Options)


def check(model: type[M], **values: Any) -> M:
    """`values` (some of `model`'s fields; the rest keep their defaults) validated; a value out of
    range or of the wrong kind raises WeitError, one line naming its flag, with the field's hint."""
    try:
        return model.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        name = err["loc"][0] if err["loc"] else None
        if name not in model.model_fields:
            raise TypeError(f"{model.__name__} has no option {name!r}") from None  # a caller's typo, not a user's
        info = model.model_fields[name]
        opt = _opt(info, Opt(flag=model.flags.get(name), hint=model.fallback_hint))
        raise _error(info, opt, values.get(name), name) from None


_ADAPTERS: dict[int, tuple[Any, TypeAdapter]] = {}  # id(type) → (type, its validator): built once


def check_value(tp: Any, value: Any, flag: str) -> None:
    """One value of an annotated type (e.g. `Seed`) checked outside a model, its error naming `flag`."""
    if id(tp) not in _ADAPTERS:
        _ADAPTERS[id(tp)] = (tp, TypeAdapter(tp, config=ConfigDict(strict=True, allow_inf_nan=False)))
    try:
        _ADAPTERS[id(tp)][1].validate_python(value)
    except ValidationError:
        info = FieldInfo.from_annotation(tp)
        raise _error(info, _opt(info, Opt(flag=flag)), value, flag) from None


def check_seed(seed: int, name: str = "seed") -> None:
    """Seeds are integers in [0, 2**63): torch refuses larger ones with an overflow, not an error."""
    check_value(Seed, seed, f"--{name.replace('_', '-')}")


def _opt(info: FieldInfo, base: Opt) -> Opt:
    """The field's `Opt`s merged over `base` (whose flag, if given, wins: a model renames a shared field)."""
    merged = {f.name: getattr(base, f.name) for f in fields(Opt)}
    for m in info.metadata:
        if isinstance(m, Opt):
            merged.update({k: v for k, v in vars(m).items() if v is not None})
    if base.flag is not None:
        merged["flag"] = base.flag
    return Opt(**merged)


def _error(info: FieldInfo, opt: Opt, value: Any, name: str) -> WeitError:
    flag = opt.flag or "--" + name.replace("_", "-")
    default = info.default if info.default is not None else ""
    hint = (opt.hint or "").format(flag=flag, default=_show(default))
    choices = _choices(info.annotation)
    if choices:
        return WeitError(f"unknown {opt.noun or flag} '{value}'", f"choose one of: {', '.join(choices)}")
    return WeitError(f"{flag} must be {opt.rule or _rule(info)}, got {_show(value)}", hint)


def _choices(annotation: Any) -> tuple[str, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return ()


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _rule(info: FieldInfo) -> str:
    """What a value must be, in words, from the field's bounds: "in 1..1000", "in [0, 1)", "at
    least 2", "0 or more", "positive and finite"."""
    b = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if getattr(m, k, None) is not None}
    whole = int in (info.annotation, *get_args(info.annotation))
    if "ge" in b and ("le" in b or "lt" in b):
        if whole and "le" in b:
            return f"in {b['ge']}..{b['le']}"
        return f"in [{_show(float(b['ge']))}, {_show(float(b.get('le', b.get('lt'))))}{']' if 'le' in b else ')'}"
    if b.get("gt") == 0:
        return "positive and finite"
    if b.get("ge") == 0:
        return "0 or more"
    if "ge" in b:
        return f"at least {b['ge']}"
    return "a whole number" if whole else "a finite number"
