"""Defaults of the commands' options, written once: the library's keyword defaults read them, and so
do the Typer options in cli.py (tests/test_options.py checks that the two agree for every option a
command shares with its library function). Recipe defaults live in recipe.py's pydantic models.

This module imports nothing heavy: `weit --help` reads it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resizing:
    """How a bundle becomes a model of another size (docs/method.md §4)."""

    depth_rule: str = "auto"  # auto | prefix | interp | stack | interleave | identity
    width_rule: str = "tile"  # tile (Net2Net, lossless for integer ratios) | tile-nodiv


@dataclass(frozen=True)
class MaterializeOptions(Resizing):
    dtype: str = "float32"  # float32 | bfloat16 | float16
    calibrate_batches: int = 20  # BatchNorm models, with --calibrate DATA
    calibrate_batch_size: int = 64


@dataclass(frozen=True)
class ExtractOptions:
    num_templates: int = 16  # per template type, capped at each type's full rank


@dataclass(frozen=True)
class ShortTraining:
    """A few hundred AdamW steps on a small labelled set: `fit-scalers`, and the distillation of
    `extract-templates --data`."""

    steps: int = 200  # optimiser steps
    lr: float = 1e-3  # peak learning rate (warmup, then cosine)
    batch_size: int = 64  # images per step
    temperature: float = 1.0  # distillation softmax temperature (1: plain KL on the logits)


@dataclass(frozen=True)
class FitScalersOptions(ShortTraining, Resizing):
    distill: float = 0.0  # weight of KL(the bundle's largest model ‖ target) in the loss (0: off)
    calibrate_batches: int = 20  # BatchNorm models: batches that re-estimate the running statistics
    # A checkpoint costs a write of the target's scalers, small parameters and optimizer state, a
    # few times smaller than the bundle; every 50 steps loses at most a quarter of a default fit.
    checkpoint_every: int = 50


@dataclass(frozen=True)
class FinetuneOptions:
    init: str = "weit"  # weit | random | weight-selection
    lr: float = 5e-4
    warmup: float = 0.0  # epochs
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0
    batch_size: int = 64  # over all processes
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # 0: off
    label_smoothing: float = 0.0


SEED = 0  # every command's --seed
MATERIALIZE = MaterializeOptions()
EXTRACT = ExtractOptions()
DISTILL = ShortTraining()
FIT_SCALERS = FitScalersOptions()
FINETUNE = FinetuneOptions()


@dataclass(frozen=True)
class SampleOptions:
    """`weit sample` and the samples `weit evaluate` draws from a generator."""

    n: int = 64  # images
    steps: int = 50  # DDIM steps (η = 0)
    guidance: float = 1.0  # classifier-free guidance scale (1: none, the conditional ε)
    batch_size: int = 64  # images per sampling batch (the images do not depend on it)


@dataclass(frozen=True)
class EvaluateOptions:
    num_samples: int = 1000  # generated (balanced over the classes) and real test images compared
    batch_size: int = 256  # classification: images per evaluation batch
    episodes: int = 10  # control: rollout episodes (episode i resets with seed + i)


SAMPLE = SampleOptions()
EVALUATE = EvaluateOptions()
