"""Return-conditioned action prediction (Chen et al. 2021, arXiv:2106.01345) and its evaluation by
rollouts.

`Control` is the task (the Task seam of tasks/base.py): fixed, seeded K-step windows as
TensorDatasets, the action MSE as loss, distillation loss and metric; see its docstring for why
windows are sampled once and how the state statistics travel with a model (`control_config.json`).
The pieces it is made of live in modules of one concern each, and their public names are
importable from here too:

- data/trajectories.py: a dataset (data/offline.py `OfflineData`) as tensors ready for sampling
  (`prepare`: episode bounds, returns-to-go, in-episode timesteps, normalised states) and the seeded
  split of its episodes (`split_episodes`, `select_episodes`);
- data/windows.py: context windows of K steps (`sample_windows`, `window_dataset`);
- tasks/control_config.py: the control config, its check and its file (`control_config`,
  `check_control_config`, `save_control_config`, `load_control_config`);
- tasks/rollout.py: `rollout`, `ContextPolicy` (any control model as a policy) and
  `evaluate_rollouts` (an exported model folder rolled out with nothing but that folder).

How a control model is called is its family's business (`Adapter.task_forward` and `Adapter.apply`,
e.g. arch/_control_call.py): the task calls what it is given with the window's five tensors and gets
the predicted actions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from weit_cli.data.control import Budget
from weit_cli.data.envs import check_fits, env_info
from weit_cli.data.trajectories import (
    RTG_SCALE,
    STD_EPS,
    ControlSet,
    episode_bounds,
    episode_timesteps,
    prepare,
    returns_to_go,
    select_episodes,
    split_episodes,
    state_stats,
)
from weit_cli.data.windows import ACTION_PAD, Windows, empty_windows, sample_windows, window_dataset
from weit_cli.errors import WeitError
from weit_cli.tasks.base import Batch, Forward, Metric, Task
from weit_cli.tasks.control_config import (
    CONFIG_FILE,
    CONFIG_KIND,
    CONFIG_VERSION,
    TASK,
    check_control_config,
    control_config,
    load_control_config,
    save_control_config,
)
from weit_cli.tasks.rollout import ContextPolicy, Policy, RolloutResult, evaluate_rollouts, load_control_model, rollout

__all__ = [
    "ACTION_PAD", "CONFIG_FILE", "CONFIG_KIND", "CONFIG_VERSION", "DEFAULT_CONTEXT", "MAX_VAL_WINDOWS",
    "MAX_WINDOWS", "RTG_SCALE", "STD_EPS", "ContextPolicy", "Control", "ControlScore", "ControlSet", "ControlSplits",
    "Policy", "RolloutResult", "Windows", "action_loss", "check_control_config", "check_fits",
    "control_config", "empty_windows", "episode_bounds", "episode_timesteps", "evaluate_rollouts", "load_control_config",
    "load_control_model", "prepare", "returns_to_go", "rollout", "sample_windows",
    "save_control_config", "select_episodes", "split_episodes", "state_stats", "window_dataset",
]

#: Context length K when neither the task nor the model section names one (the DT paper's MuJoCo K).
DEFAULT_CONTEXT = 20
#: Fixed windows per split at most (see `Control`): a window costs K·(obs + act + 3)·4 bytes, so
#: 100 000 HalfCheetah windows of 20 steps take about 220 MB.
MAX_WINDOWS = 100_000
MAX_VAL_WINDOWS = 10_000


def action_loss(predicted: Tensor, target: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean squared error over the action components of unmasked positions (DT's loss)."""
    keep = attention_mask.reshape(-1) > 0
    act = target.shape[-1]
    return torch.nn.functional.mse_loss(predicted.reshape(-1, act)[keep], target.reshape(-1, act)[keep])

@dataclass(frozen=True)
class ControlScore:
    action_mse: float  # mean squared error per action component, over unmasked positions
    loss: float  # the same: the training loss is this MSE
    count: int  # windows

    @property
    def metric(self) -> float:
        return self.action_mse


@dataclass
class ControlSplits:
    """What `Control.load_data` returns: fixed window sets and the control config of the data."""

    train: TensorDataset  # (states, actions, returns-to-go, timesteps, attention mask) per window
    val: TensorDataset
    test: None
    description: str
    config: dict[str, Any]  # `control_config`: what a model trained on these needs at rollout time

    @property
    def env_id(self) -> str:
        return self.config["env_id"]

    @property
    def state_mean(self) -> np.ndarray:
        return np.asarray(self.config["state_mean"], dtype=np.float32)

    @property
    def state_std(self) -> np.ndarray:
        return np.asarray(self.config["state_std"], dtype=np.float32)


class Control(Task):
    """Return-conditioned action prediction (Chen et al. 2021).

    A batch is (states, actions, returns-to-go, timesteps, attention mask), one K-step window per
    row, left-padded; the model (as its family's `task_forward` or `apply` makes it) maps the five
    tensors to the predicted actions (B, K, act); the loss is the action MSE on unmasked positions, distillation the same MSE to
    the teacher's actions (no temperature: actions are not logits), the validation metric the
    action MSE of held-out episodes (lower is better).

    **Fixed windows.** The DT samples fresh windows every step; weit's loop draws batches from a
    TensorDataset by a seeded permutation per epoch, which makes a run exact and resumable at any
    step. So `load_data` samples the windows once, seeded, with `sample_windows` (episodes in
    proportion to their length, a uniform start): as many training windows as training steps (at
    most `max_windows`), so that an epoch covers each step about K times, and every epoch
    reshuffles the same set. Validation windows come from held-out *episodes* (no step of them is
    trained on), normalised with the training split's statistics.

    **Statistics travel with the model.** States are normalised with the mean and std of the
    training split; they, the returns-to-go scale, the context and the environment form the
    split's `config` (`control_config`), a JSON object that rides in a bundle's `extra` and is
    written beside an exported model's config.json as `control_config.json`
    (`save_control_config`). `evaluate_rollouts` reads only that folder: a model runs without
    weit's data.
    """

    name = TASK
    metric = Metric("action_mse", "action MSE", higher_is_better=False)
    metric_name = "action_mse"  # legacy: the results' "metric" string
    examples = "windows"
    rollouts = True  # scored by acting in its environment (`weit evaluate --env`), not on --data

    def __init__(
        self,
        *,
        context: int | None = None,
        env_id: str | None = None,
        rtg_scale: float = RTG_SCALE,
        data_seed: int = 0,
        budget: Budget | None = None,
        max_windows: int = MAX_WINDOWS,
        max_val_windows: int = MAX_VAL_WINDOWS,
        progress: Callable[[str], None] | None = None,
    ):
        """`context` overrides the model section's; `env_id` names the environment of a file source
        (or write `Hopper-v5:path.npz`); `data_seed` and `budget` choose the built-in data, which
        stays the same whatever seed a training run has, so that runs differ in training only."""
        for what, v in (("context", context), ("max_windows", max_windows), ("max_val_windows", max_val_windows)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise WeitError(f"the control task's {what} must be a positive integer, got {v!r}", "e.g. 20")
        self.context, self.env_id, self.rtg_scale = context, env_id, float(rtg_scale)
        self.data_seed, self.budget, self.progress = data_seed, budget, progress
        self.max_windows, self.max_val_windows = max_windows, max_val_windows
        self.adopted: dict[str, Any] | None = None  # a trained model's control config (`adopt`)

    # ---------------------------------------------------------------------------------- data
    def load_data(self, source: str, arch: Any, *, seed: int = 0, val_fraction: float = 0.1,
                  train_subset: float | int | None = None) -> ControlSplits:
        """`source` (a built-in environment such as `Hopper-v5:medium`, a D4RL-layout file or a
        Minari folder; `ENV:path` names a file's environment) as fixed window sets for `arch` (a
        model section or an architecture with `state_dim`, `act_dim`, optionally `context` and
        `max_ep_len`). `train_subset` keeps a seeded part of the training *episodes*."""
        from weit_cli.data.control import load_control_data

        adopted = self.adopted or {}
        context = self.context or adopted.get("context") or getattr(arch, "context", None) or DEFAULT_CONTEXT
        src, env_id = self._source(source)
        data = load_control_data(src, env_id=env_id, seed=self.data_seed, budget=self.budget, progress=self.progress)
        info = env_info(data.env_id)
        if adopted.get("env_id") not in (None, data.env_id):
            raise WeitError(f"the model was trained on {adopted['env_id']} data; {source} is {data.env_id}'s", f"use {adopted['env_id']} data")
        state_dim, act_dim = getattr(arch, "state_dim", None), getattr(arch, "act_dim", None)
        if state_dim is not None and act_dim is not None:
            check_fits(state_dim, act_dim, data.env_id)
        max_ep_len = int(getattr(arch, "max_ep_len", None) or info.max_episode_steps)
        bounds = episode_bounds(data.terminals, data.timeouts)
        train_eps, val_eps = split_episodes(len(bounds), val_fraction=val_fraction, train_subset=train_subset, seed=seed)
        train_data = select_episodes(data, bounds, train_eps)
        if adopted:  # the model's own input convention, not this split's
            stats = (np.asarray(adopted["state_mean"], np.float32), np.asarray(adopted["state_std"], np.float32))
        else:
            stats = state_stats(train_data.observations)
        train = prepare(train_data, rtg_scale=self.rtg_scale, max_ep_len=max_ep_len, stats=stats)
        n_train = min(len(train_data), self.max_windows)
        train_set = window_dataset(train, n_train, context, torch.Generator().manual_seed(seed))
        if len(val_eps):
            val_data = select_episodes(data, bounds, val_eps)
            val = prepare(val_data, rtg_scale=self.rtg_scale, max_ep_len=max_ep_len, stats=stats)
            n_val = min(len(val_data), self.max_val_windows)
            # its own generator, so that the validation windows do not depend on the training count
            val_set = window_dataset(val, n_val, context, torch.Generator().manual_seed(seed + 1))
        else:
            val_data, val_set = None, empty_windows(info.obs_dim, info.act_dim, context)
        best = float(train.returns_to_go[train.bounds[:, 0]].max()) * self.rtg_scale
        config = control_config(
            env_id=data.env_id, state_mean=stats[0], state_std=stats[1], context=context, rtg_scale=self.rtg_scale,
            max_ep_len=max_ep_len, target_return=best, data=data.description,
        )
        val_text = f"{len(val_eps)} validation episodes ({len(val_data)} steps, {len(val_set)} windows)" if val_data is not None else "no validation"
        description = (
            f"{data.description}; {len(train_eps)} training episodes ({len(train_data)} steps, {len(train_set)} windows of "
            f"{context} steps), {val_text}, split with seed {seed}; states normalised with the training split's mean and std, "
            f"returns-to-go / {self.rtg_scale:g}"
        )
        return ControlSplits(train=train_set, val=val_set, test=None, description=description, config=config)

    def _source(self, source: str) -> tuple[str, str | None]:
        """(data source, environment): `ENV:path` splits into a file and its environment."""
        from pathlib import Path

        from weit_cli.data.control import ENVIRONMENTS

        text = str(source)
        name, sep, rest = text.partition(":")
        if sep and name in ENVIRONMENTS and rest and (Path(rest).exists() or "/" in rest or "\\" in rest or Path(rest).suffix):
            if self.env_id is not None and self.env_id != name:
                raise WeitError(f"data source {text!r} is for {name}, not {self.env_id}", f"use {self.env_id}'s data or environment")
            return rest, name
        return text, self.env_id

    def classes(self, splits: ControlSplits) -> None:
        return None  # actions are continuous: a control model has no class count

    def companion_files(self, splits: ControlSplits) -> dict[str, dict[str, Any]]:
        """`control_config.json`: what a model trained on these windows needs to act (see the class doc)."""
        return {CONFIG_FILE: splits.config}

    def adopt(self, files: dict[str, dict[str, Any]]) -> None:
        """A trained model's `control_config.json`: its context, state statistics and returns-to-go
        scale are used for new data (the model's inputs mean what they meant in training)."""
        if CONFIG_FILE in files:
            self.adopted = check_control_config(files[CONFIG_FILE], f"the model's {CONFIG_FILE}")
            self.rtg_scale = float(self.adopted["rtg_scale"])

    def companions_of(self, model_path) -> dict[str, dict[str, Any]]:
        """A model folder's own `control_config.json` (checked), if it has one."""
        folder = Path(model_path)
        return {CONFIG_FILE: load_control_config(folder)} if (folder / CONFIG_FILE).is_file() else {}

    # ---------------------------------------------------------------------------------- the model
    def outputs(self, forward: Forward, batch: Batch) -> Tensor:
        return forward(*batch).float()

    def loss(self, outputs: Tensor, batch: Batch) -> Tensor:
        return action_loss(outputs.float(), batch[1].float(), batch[4])

    def distill_loss(self, outputs: Tensor, teacher_outputs: Tensor, batch: Batch, temperature: float) -> Tensor:
        """MSE to the teacher's actions on unmasked positions; `temperature` has no meaning here."""
        return action_loss(outputs.float(), teacher_outputs.detach().float(), batch[4])

    @torch.no_grad()
    def evaluate(self, forward: Forward, dataset, batch_size: int = 256, device: torch.device | str | None = None) -> ControlScore:
        """Action MSE over every unmasked position of `dataset`'s windows, in eval mode."""
        from weit_cli.training.dist import device_autocast

        module = forward if isinstance(forward, torch.nn.Module) else None
        if device is None:
            device = next(module.parameters()).device if module is not None and any(True for _ in module.parameters()) else torch.device("cpu")
        device = torch.device(device)
        was_training = module.training if module is not None else None
        if module is not None:
            module.eval()
        n = len(dataset)
        sse, count = 0.0, 0
        try:
            for i in range(0, n, batch_size):
                batch = tuple(t[i : i + batch_size].to(device, non_blocking=True) for t in dataset.tensors)
                with device_autocast(device):
                    pred = self.outputs(forward, batch)
                err = (pred.float() - batch[1].float()).pow(2)[batch[4] > 0]
                sse += float(err.sum(dtype=torch.float64))
                count += err.numel()
        finally:
            if was_training:
                module.train()
        mse = sse / count if count else float("nan")
        return ControlScore(mse, mse, n)
