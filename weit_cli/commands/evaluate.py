"""`weit evaluate`: scores any materialized model with its family's task: a generator by the Fréchet
distance to real test images in the feature space of weit's judge classifier (tasks/fid.py; *not*
Inception-FID, the judge's sha256 names the scale; its floor and ceilings beside it) and the class
accuracy of its conditional samples as the judge sees them, plus its denoising loss on the test
split; a classifier by top-1 accuracy and loss on the test split; a control model by rollouts.

MODEL is what `materialize` or `finetune` wrote (a folder, or a bare .safetensors), any checkpoint
weit reads, or a hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from weit_cli.commands.sample import _load, sample_images
from weit_cli.errors import InputError, WeitError
from weit_cli.io.hub import resolve as resolve_source
from weit_cli.options import EVALUATE, SAMPLE, SEED, EvaluateOptions, check


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

    check(EvaluateOptions, batch_size=batch_size)
    dev = resolve_device(device)
    adapter, arch, module = _load(model)
    task = task_for(adapter)
    rollout_options = {"--env": env, "--episodes": episodes, "--target-return": target_return, "--max-steps": max_steps}
    if task.rollouts:
        if data is not None:
            raise WeitError("a control model is scored by rollouts in its environment, not on --data", "drop --data; pass --env ENV (default: the environment it was trained on)")
        return evaluate_control(model, adapter, arch, task, env=env, episodes=episodes, target_return=target_return, seed=seed, max_steps=max_steps, device=device)
    given = [k for k, v in rollout_options.items() if v is not None]
    if given:
        raise WeitError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for control models; MODEL is a {adapter.task} model", "drop them, and pass --data")
    if data is None:
        raise WeitError(f"a {adapter.task} model is scored on data: --data is missing", "e.g. --data fashion-mnist")
    splits = task.load_data(data, arch, seed=seed)
    held_out, split = task.held_out(splits, data)
    if splits.num_classes != arch.num_classes:
        raise InputError(f"the data has {splits.num_classes} classes, the model {arch.num_classes}", "evaluate on the data the model was trained for")
    out: dict[str, Any] = {
        "command": "evaluate", "model": str(model), "description": adapter.describe(arch), "task": task.name,
        "data": splits.description, "split": f"{split} ({len(held_out)} {task.examples})",
        **task.evaluate_model(adapter.task_forward(module.to(dev)), held_out, split, batch_size, dev),
    }
    if task.samples:
        out.update(_judged_samples(model, arch, splits, held_out, data=data, num_samples=num_samples, steps=steps,
                                   guidance=guidance, seed=seed, device=device))
    return out


def _judged_samples(model: Path, arch, splits, held_out, *, data, num_samples, steps, guidance, seed, device) -> dict[str, Any]:
    """A generator's samples as weit's judge classifier sees them (tasks/fid.py): the Fréchet distance
    to real held-out images, the class accuracy, and the judge's scale beside them."""
    from weit_cli.tasks.fid import evaluate_samples, in_turn, judge_references, load_judge

    check(EvaluateOptions, num_samples=num_samples)
    judge = load_judge(data, img_size=arch.img_size, in_chans=arch.in_chans)
    fake, labels, info = sample_images(model, n=num_samples, steps=steps, guidance=guidance, seed=seed, device=device, command="evaluate")
    real = held_out.tensors[0][in_turn(held_out.tensors[1], num_samples)]  # every class, as the samples
    out = dict(evaluate_samples(judge, real, fake, labels))
    # The judge's scale: the same numbers for real training images (floor), blank images and noise.
    out["judge_references"] = judge_references(judge, real, *splits.train.tensors[:2])
    out.update(steps=steps, guidance=guidance, seed=seed, scheduler=info["scheduler"])
    return out


def evaluate_control(model: Path, adapter, arch, task, *, env: str | None, episodes: int | None, target_return: float | None,
                     seed: int, max_steps: int | None, device: str | None) -> dict[str, Any]:
    """Rollouts of a control model folder (`tasks.control.evaluate_rollouts`): per-episode returns,
    normalised scores (0 random, 100 expert) with mean and spread, wall time. `env` defaults to the
    environment of the model's `control_config.json`; rollouts run on the CPU unless `device` says
    otherwise (one step at a time: a GPU waits more than it computes)."""
    from weit_cli.data.control import env_info
    from weit_cli.tasks.control import evaluate_rollouts, load_control_config

    episodes = EVALUATE.episodes if episodes is None else episodes
    check(EvaluateOptions, episodes=episodes, seed=seed)
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
        "command": "evaluate", "model": str(model), "description": adapter.describe(arch), "task": task.name,
        "scored_by": "rollouts", **r.summary(), "seed": seed, "max_steps": max_steps,
    }
