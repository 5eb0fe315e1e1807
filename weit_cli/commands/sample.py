"""`weit sample` and `weit evaluate`: what a trained model does, for people and for numbers.

`sample` draws a seeded PNG grid from a materialized generator (DDIM, optional classifier-free
guidance; tasks/diffusion.py). `evaluate` scores any materialized model with its family's task:
a generator by the Fréchet distance to real test images in the feature space of weit's judge
classifier (tasks/fid.py; *not* Inception-FID, the judge's sha256 names the scale) and the class
accuracy of its conditional samples as the judge sees them, plus its denoising loss on the test
split; a classifier by top-1 accuracy and loss on the test split.

MODEL is what `materialize` or `finetune` wrote (a folder, or a bare .safetensors) or any checkpoint
weit reads. A folder's `scheduler_config.json` decides the noise process; a bare file uses weit's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weit_cli.errors import InputError, WeitError
from weit_cli.io.hub import resolve as resolve_source
from weit_cli.options import EVALUATE, SAMPLE, SEED

GENERATION = "generation"  # the task name (tasks/generation.py) whose models sample
CONTROL = "control"  # the task name (tasks/control.py) whose models are scored by rollouts


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
    if adapter.task != GENERATION:
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


def _check_sampling(n: int, steps: int, guidance: float, batch_size: int, seed: int) -> None:
    import math

    from weit_cli.limits import check_seed

    check_seed(seed)
    if not 1 <= n <= 100_000:
        raise WeitError(f"-n must be in 1..100000, got {n}", f"e.g. -n {SAMPLE.n}")
    if not 1 <= steps <= 1000:
        raise WeitError(f"--steps must be in 1..1000, got {steps}", f"e.g. --steps {SAMPLE.steps}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise WeitError(f"--guidance must be a number ≥ 0, got {guidance}", "1 is no guidance; 2-4 sharpens the classes")
    if batch_size < 1:
        raise WeitError(f"--batch-size must be at least 1, got {batch_size}", f"e.g. --batch-size {SAMPLE.batch_size}")


def sample_images(model: Path, *, cls: int | None = None, n: int = SAMPLE.n, steps: int = SAMPLE.steps,
                  guidance: float = SAMPLE.guidance, seed: int = SEED, batch_size: int = SAMPLE.batch_size,
                  device: str | None = None, command: str = "sample") -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Seeded DDIM samples of MODEL: (images in [-1, 1], their labels, what was done)."""
    from weit_cli.tasks.diffusion import sample
    from weit_cli.training.dist import resolve_device

    _check_sampling(n, steps, guidance, batch_size, seed)
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
    from weit_cli.tasks.diffusion import MAX_SCALE, default_scale, save_grid

    out = Path(out)
    check_output(out, force)
    if out.suffix.lower() != ".png":
        raise WeitError(f"the grid is a PNG; {out} does not end in .png", "e.g. -o grid.png")
    if scale is not None and not 1 <= scale <= MAX_SCALE:
        raise WeitError(f"--scale must be in 1..{MAX_SCALE}, got {scale}", "e.g. --scale 4, or leave it out for ≥ 112 px per image")
    model, hub = resolve_source(model)
    images, _, info = sample_images(model, cls=cls, n=n, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, device=device)
    classes = info["num_classes"]
    nrow = classes if cls is None and n >= classes else math.ceil(math.sqrt(n))  # all classes: one column each
    scale = default_scale(images.shape[-1]) if scale is None else scale
    save_grid(images, out, nrow=nrow, force=force, scale=scale)
    return {"command": "sample", "output": str(out), "sha256": sha256(out), **info, "scale": scale, **({"source": hub} if hub else {})}


def evaluate(model: Path, *, data: str | None = None, num_samples: int = EVALUATE.num_samples, steps: int = SAMPLE.steps,
             guidance: float = SAMPLE.guidance, seed: int = SEED, batch_size: int = EVALUATE.batch_size,
             device: str | None = None, env: str | None = None, episodes: int | None = None,
             target_return: float | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """`weit evaluate`: the family's task's numbers for MODEL (a folder, a file or a hub id) on `data`
    (see the module doc); a control model by rollouts in `env` instead (`evaluate_control`)."""
    model, hub = resolve_source(model)
    out = _evaluate(model, data=data, num_samples=num_samples, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                    device=device, env=env, episodes=episodes, target_return=target_return, max_steps=max_steps)
    return {**out, "source": hub} if hub else out


def _evaluate(model: Path, *, data, num_samples, steps, guidance, seed, batch_size, device, env, episodes, target_return,
              max_steps) -> dict[str, Any]:
    from weit_cli.tasks._registry import task_for
    from weit_cli.training.dist import resolve_device

    if batch_size < 1:
        raise WeitError(f"--batch-size must be at least 1, got {batch_size}", f"e.g. --batch-size {EVALUATE.batch_size}")
    dev = resolve_device(device)
    adapter, arch, module = _load(model)
    rollout_options = {"--env": env, "--episodes": episodes, "--target-return": target_return, "--max-steps": max_steps}
    if adapter.task == CONTROL:
        if data is not None:
            raise WeitError("a control model is scored by rollouts in its environment, not on --data", "drop --data; pass --env ENV (default: the environment it was trained on)")
        return evaluate_control(model, adapter, arch, env=env, episodes=episodes, target_return=target_return, seed=seed, max_steps=max_steps, device=device)
    given = [k for k, v in rollout_options.items() if v is not None]
    if given:
        raise WeitError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for control models; MODEL is a {adapter.task} model", "drop them, and pass --data")
    if data is None:
        raise WeitError(f"a {adapter.task} model is scored on data: --data is missing", "e.g. --data fashion-mnist")
    task = task_for(adapter)
    splits = task.load_data(data, arch, seed=seed)
    held_out, split = (splits.test, "test") if splits.test is not None and len(splits.test) else (splits.val, "val")
    if len(held_out) == 0:
        raise InputError(f"{data} has no test or validation images to evaluate on", "pass a data set with a test split")
    if splits.num_classes != arch.num_classes:
        raise InputError(f"the data has {splits.num_classes} classes, the model {arch.num_classes}", "evaluate on the data the model was trained for")
    score = task.evaluate(adapter.task_forward(module.to(dev)), held_out, batch_size, dev)
    out: dict[str, Any] = {
        "command": "evaluate", "model": str(model), "description": adapter.describe(arch), "task": task.name,
        "data": splits.description, "split": f"{split} ({len(held_out)} images)",
        f"{split}_{task.metric_key}": score.metric, f"{split}_loss": score.loss,
    }
    if adapter.task != GENERATION:
        return out
    from weit_cli.tasks.fid import evaluate_samples, judge_references, load_judge

    if not 2 <= num_samples <= 100_000:
        raise WeitError(f"--num-samples must be in 2..100000, got {num_samples}", f"e.g. --num-samples {EVALUATE.num_samples}")
    judge = load_judge(data, img_size=arch.img_size, in_chans=arch.in_chans)
    fake, labels, info = sample_images(model, n=num_samples, steps=steps, guidance=guidance, seed=seed, device=device, command="evaluate")
    real = held_out.tensors[0][:num_samples]
    metrics = evaluate_samples(judge, real, fake, labels)
    out.update({k: v for k, v in metrics.items()})
    # The judge's scale: the same numbers for real training images (floor), blank images and noise.
    out["judge_references"] = judge_references(judge, real, *splits.train.tensors[:2])
    out.update(steps=steps, guidance=guidance, seed=seed, scheduler=info["scheduler"])
    return out


def evaluate_control(model: Path, adapter, arch, *, env: str | None, episodes: int | None, target_return: float | None,
                     seed: int, max_steps: int | None, device: str | None) -> dict[str, Any]:
    """Rollouts of a control model folder (`tasks.control.evaluate_rollouts`): per-episode returns,
    normalised scores (0 random, 100 expert) with mean and spread, wall time. `env` defaults to the
    environment of the model's `control_config.json`; rollouts run on the CPU unless `device` says
    otherwise (one step at a time: a GPU waits more than it computes)."""
    from weit_cli.data.control import env_info
    from weit_cli.limits import check_seed
    from weit_cli.tasks.control import evaluate_rollouts, load_control_config

    check_seed(seed)
    episodes = EVALUATE.episodes if episodes is None else episodes
    if isinstance(episodes, bool) or not 1 <= episodes <= 10_000:
        raise WeitError(f"--episodes must be in 1..10000, got {episodes}", f"e.g. --episodes {EVALUATE.episodes}")
    if env is not None:
        env_info(env)  # an unknown id is refused before the model folder is read any further
    if not Path(model).is_dir():
        raise InputError(f"{model} is not a model folder; a control model is rolled out from the folder materialize writes",
                         "pass the folder (config.json, model.safetensors, control_config.json), not a bare weights file")
    env = env or load_control_config(model).get("env_id")
    if env is None:
        raise WeitError(f"{model}'s control config names no environment", "pass --env, e.g. --env Hopper-v5")
    r = evaluate_rollouts(model, env, target_return=target_return, episodes=episodes, seed=seed, max_steps=max_steps, device=device or "cpu")
    return {
        "command": "evaluate", "model": str(model), "description": adapter.describe(arch), "task": CONTROL,
        **r.summary(), "seed": seed, "max_steps": max_steps,
    }
