"""Defaults of the training commands' options, written once: the library's keyword defaults read them,
and so do the Typer options in cli.py. (Recipe defaults live in recipe.py's pydantic models.)"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShortTraining:
    """A few hundred AdamW steps on a small labelled set: `fit-scalers`, and the distillation of
    `extract-templates --data`."""

    steps: int = 200  # optimiser steps
    lr: float = 1e-3  # peak learning rate (warmup, then cosine)
    batch_size: int = 64  # images per step
    temperature: float = 1.0  # distillation softmax temperature (1: plain KL on the logits)


@dataclass(frozen=True)
class FitScalersOptions(ShortTraining):
    calibrate_batches: int = 20  # BatchNorm models: batches that re-estimate the running statistics
    # A checkpoint costs a write of the target's scalers, small parameters and optimizer state, a
    # few times smaller than the bundle; every 50 steps loses at most a quarter of a default fit.
    checkpoint_every: int = 50


@dataclass(frozen=True)
class FinetuneOptions:
    lr: float = 5e-4
    batch_size: int = 64  # over all processes
    weight_decay: float = 0.05
    grad_clip: float = 1.0  # 0: off


DISTILL = ShortTraining()
FIT_SCALERS = FitScalersOptions()
FINETUNE = FinetuneOptions()
