"""`weit sample`: a seeded PNG grid from a materialized generator (DDIM, optional classifier-free
guidance; tasks/diffusion.py), and the model loading and sampling that `weit evaluate`
(commands/evaluate.py) shares.

MODEL is what `materialize` or `finetune` wrote (a folder, or a bare .safetensors) or any checkpoint
weit reads. A folder's `scheduler_config.json` decides the noise process; a bare file uses weit's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weit_cli.errors import InputError, WeitError
from weit_cli.io.hub import resolve as resolve_source
from weit_cli.options import SAMPLE, SEED, SampleOptions, check


def _load(model: Path):
    """(adapter, arch, module in eval mode, scheduler config or None) of a materialized model."""
    from weit_cli.commands.finetune import read_model

    model = Path(model)
    if not model.exists():
        raise InputError(f"MODEL {model} does not exist", "pass a folder written by 'weit materialize' or 'weit finetune'")
    adapter, arch, weights = read_model(model, need_weights=True)
    module = adapter.build(arch)
    with torch.no_grad():
        module.load_state_dict(weights, strict=True)
    module.eval().requires_grad_(False)
    return adapter, arch, module


def _scheduler_config(model: Path, adapter) -> tuple[dict | None, str]:
    from weit_cli.tasks.diffusion import SCHEDULER_FILE, load_scheduler_config

    if Path(model).is_dir():
        return load_scheduler_config(model), f"{Path(model) / SCHEDULER_FILE}"
    return None, "weit's default (a bare weights file carries no scheduler config)"


def _refuse_non_generator(adapter, arch, command: str) -> None:
    from weit_cli.tasks._registry import task_class

    if not task_class(adapter).samples:
        raise WeitError(
            f"'weit {command}' samples images from a generator; MODEL is a {adapter.task} model ({adapter.describe(arch)})",
            "pass a model of an image-generation family (see 'weit list-archs')",
        )


def _labels(num_classes: int, n: int, cls: int | None) -> torch.Tensor:
    if cls is None:
        return torch.arange(n) % num_classes  # every class in turn: a grid row per class
    if not 0 <= cls < num_classes:
        raise WeitError(f"--class {cls} is not one of the model's classes 0..{num_classes - 1}", f"pass --class 0..{num_classes - 1}, or leave it out for all")
    return torch.full((n,), cls, dtype=torch.int64)


def sample_images(model: Path, *, cls: int | None = None, n: int = SAMPLE.n, steps: int = SAMPLE.steps,
                  guidance: float = SAMPLE.guidance, seed: int = SEED, batch_size: int = SAMPLE.batch_size,
                  device: str | None = None, command: str = "sample") -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Seeded DDIM samples of MODEL: (images in [-1, 1], their labels, what was done)."""
    from weit_cli.tasks.diffusion import sample
    from weit_cli.training.dist import resolve_device

    check(SampleOptions, n=n, steps=steps, guidance=guidance, batch_size=batch_size, seed=seed)
    dev = resolve_device(device)
    adapter, arch, module = _load(model)
    _refuse_non_generator(adapter, arch, command)
    labels = _labels(arch.num_classes, n, cls)
    conf, scheduler_from = _scheduler_config(model, adapter)
    denoiser = adapter.task_forward(module.to(dev))
    images = sample(
        denoiser, labels, shape=(arch.in_chans, arch.img_size, arch.img_size), num_classes=arch.num_classes,
        steps=steps, guidance_scale=guidance, seed=seed, batch_size=batch_size, scheduler_config=conf, device=dev,
    )
    info = {
        "model": str(model), "description": adapter.describe(arch), "num_classes": arch.num_classes, "n": n, "class": cls, "steps": steps,
        "guidance": guidance, "seed": seed, "scheduler": scheduler_from, "device": str(dev),
    }
    return images, labels, info


def sample_grid(model: Path, out: Path, *, cls: int | None = None, n: int = SAMPLE.n, steps: int = SAMPLE.steps,
                guidance: float = SAMPLE.guidance, seed: int = SEED, batch_size: int = SAMPLE.batch_size,
                device: str | None = None, force: bool = False, scale: int | None = None) -> dict[str, Any]:
    """`weit sample`: a PNG grid (one column per class when no --class is given), written atomically;
    the same seed gives the same bytes. `scale`: nearest-neighbour enlargement of the grid (None: so
    that an image is at least 112 px wide, `diffusion.default_scale`: ×4 for 28 px)."""
    import math

    from weit_cli.io.files import check_output, sha256
    from weit_cli.tasks.diffusion import default_scale, save_grid

    out = Path(out)
    check_output(out, force)
    if out.suffix.lower() != ".png":
        raise WeitError(f"the grid is a PNG; {out} does not end in .png", "e.g. -o grid.png")
    check(SampleOptions, scale=scale)
    model, hub = resolve_source(model)
    images, _, info = sample_images(model, cls=cls, n=n, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, device=device)
    classes = info["num_classes"]
    nrow = classes if cls is None and n >= classes else math.ceil(math.sqrt(n))  # all classes: one column each
    scale = default_scale(images.shape[-1]) if scale is None else scale
    save_grid(images, out, nrow=nrow, force=force, scale=scale)
    return {"command": "sample", "output": str(out), "sha256": sha256(out), **info, "scale": scale, **({"source": hub} if hub else {})}
