"""Rollouts: a policy run in a gymnasium environment towards a target return, N episodes with seeded
resets, giving returns, normalised scores, mean and spread, and wall time (`rollout`); any control
model as such a policy, given its control config (`ContextPolicy`); an exported model folder rolled
out with nothing but that folder (`evaluate_rollouts`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from weit_cli.data.envs import check_fits, env_info, make_env, normalized_score
from weit_cli.data.windows import Windows
from weit_cli.errors import InputError, WeitError
from weit_cli.tasks.control_config import CONFIG_FILE, TASK, check_control_config, load_control_config

#: A policy: (states (1, T, obs), actions (1, T, act) with the last row still zero, returns-to-go
#: (1, T, 1), timesteps (1, T) int64, attention mask (1, T)) → the action (act,) for step T − 1.
#: Inputs are raw (unnormalised states, unscaled returns); the policy applies its own preprocessing.
Policy = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------------- rollouts
@dataclass
class RolloutResult:
    env_id: str
    target_return: float
    returns: list[float]
    lengths: list[int]
    scores: list[float]  # normalised: 0 random, 100 expert
    wall_s: float

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std_return(self) -> float:
        return _spread(self.returns)

    @property
    def mean_score(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std_score(self) -> float:
        return _spread(self.scores)

    def summary(self) -> dict:
        return {
            "env_id": self.env_id,
            "target_return": self.target_return,
            "episodes": len(self.returns),
            "returns": self.returns,
            "lengths": self.lengths,
            "normalized_scores": self.scores,
            "mean_return": self.mean_return,
            "std_return": self.std_return,
            "mean_score": self.mean_score,
            "std_score": self.std_score,
            "wall_s": self.wall_s,
        }


def _spread(values: list[float]) -> float:
    """Sample standard deviation (ddof 1); 0 for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


@torch.no_grad()
def rollout(
    env_id: str,
    policy: Policy,
    *,
    target_return: float,
    episodes: int,
    seed: int,
    max_steps: int | None = None,
) -> RolloutResult:
    """Run `policy` for `episodes` episodes; episode i resets with seed `seed + i`.

    The returns-to-go start at `target_return` and drop by each reward received, as in the DT
    paper's evaluation. `max_steps` cuts episodes short (tests); by default the environment's
    time limit ends them. Nothing is rendered."""
    from weit_cli.options import EvaluateOptions, check

    check(EvaluateOptions, episodes=episodes, seed=seed)
    info = env_info(env_id)
    horizon = min(max_steps or info.max_episode_steps, info.max_episode_steps)
    env = make_env(env_id)
    returns, lengths = [], []
    start = time.perf_counter()
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            states = torch.zeros(1, horizon, info.obs_dim)
            actions = torch.zeros(1, horizon, info.act_dim)
            rtg = torch.zeros(1, horizon, 1)
            steps = torch.arange(horizon)[None]
            ones = torch.ones(1, horizon)
            total, togo, t = 0.0, float(target_return), 0
            while t < horizon:
                states[0, t] = torch.as_tensor(obs, dtype=torch.float32)
                rtg[0, t, 0] = togo
                n = t + 1
                action = policy(states[:, :n], actions[:, :n], rtg[:, :n], steps[:, :n], ones[:, :n])
                action = action.reshape(-1).float()
                actions[0, t] = action
                obs, reward, terminated, truncated, _ = env.step(action.numpy())
                total += float(reward)
                togo -= float(reward)
                t = n
                if terminated or truncated:
                    break
            returns.append(total)
            lengths.append(t)
    finally:
        env.close()
    return RolloutResult(
        env_id=env_id,
        target_return=float(target_return),
        returns=returns,
        lengths=lengths,
        scores=[normalized_score(env_id, r) for r in returns],
        wall_s=time.perf_counter() - start,
    )


class ContextPolicy:
    """Any control model as a rollout policy, given as the task calls it (`forward`: the window's
    five tensors → actions, what its family's `Adapter.task_forward` makes of the module): states normalised with the training data's statistics, returns-to-go scaled,
    the last `context` steps left-padded to `context` (zeros, mask 0) as in transformers' and the DT
    paper's `get_action`. `config` is a control config (`control_config`)."""

    def __init__(self, forward: Callable, config: dict, *, device: torch.device | str = "cpu"):
        cfg = check_control_config(config)
        self.forward = forward
        self.mean = torch.tensor(cfg["state_mean"], dtype=torch.float32)
        self.std = torch.tensor(cfg["state_std"], dtype=torch.float32)
        self.context = int(cfg["context"])
        self.rtg_scale = float(cfg["rtg_scale"])
        self.max_timestep = int(cfg["max_ep_len"]) - 1
        self.device = torch.device(device)
        if isinstance(forward, torch.nn.Module):
            forward.eval()

    @torch.no_grad()
    def __call__(self, states: Tensor, actions: Tensor, returns_to_go: Tensor, timesteps: Tensor, attention_mask: Tensor) -> Tensor:
        k = self.context
        states = (states[:, -k:] - self.mean) / self.std
        actions, rtg = actions[:, -k:], returns_to_go[:, -k:] / self.rtg_scale
        steps, mask = timesteps[:, -k:].clamp_max(self.max_timestep), attention_mask[:, -k:].float()
        pad = k - states.shape[1]
        if pad:
            states, actions, rtg = (torch.cat([x.new_zeros(1, pad, x.shape[2]), x], dim=1) for x in (states, actions, rtg))
            steps = torch.cat([steps.new_zeros(1, pad), steps], dim=1)
            mask = torch.cat([mask.new_zeros(1, pad), mask], dim=1)
        batch = Windows(states, actions, rtg, steps, mask).to(self.device).batch()
        return self.forward(*batch)[0, -1].float().cpu()


# --------------------------------------------------------------------------- rollouts of a folder
def load_control_model(model_dir, *, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(the model as its task calls it — its family's `task_forward` of the module — in eval mode,
    architecture, control config) of a model folder; the family comes from the registry (the
    weights' layout), so any family of the control task loads."""
    from weit_cli.arch._registry import detect_family
    from weit_cli.io.files import load_dense

    folder = Path(model_dir)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a model folder", f"pass the folder a control model was exported to (config.json, weights, {CONFIG_FILE})")
    config = load_control_config(folder)
    state, hints = load_dense(folder)
    adapter = detect_family(state.keys())
    # The task's own name, not `task_class(adapter).rollouts`: the registry imports this module's task
    # (tasks/control.py imports this module), so asking it from here would be an import cycle.
    if adapter.task != TASK:
        raise InputError(f"{folder} holds a model of the {adapter.task} task, not of control", "evaluate rollouts of a control model")
    state = adapter.loadable(state)
    arch = adapter.infer_arch(state, hints)
    module = adapter.build(arch)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"{folder}'s weights do not fit its config: {str(e).splitlines()[0]}", "re-export the model") from None
    dims = (getattr(arch, "state_dim", None), getattr(arch, "act_dim", None))
    if dims != (config["state_dim"], config["act_dim"]):
        raise InputError(
            f"{folder}: the model takes {dims[0]} state features and {dims[1]} actions, its {CONFIG_FILE} says {config['state_dim']} and {config['act_dim']}",
            "put the control config of the model's own training data beside it",
        )
    return adapter.task_forward(module).to(device).eval(), arch, config


def evaluate_rollouts(
    model_dir,
    env_id: str,
    *,
    target_return: float | None = None,
    episodes: int = 10,
    seed: int = 0,
    max_steps: int | None = None,
    device: torch.device | str = "cpu",
) -> RolloutResult:
    """Roll an exported control model out in `env_id`: per-episode returns, normalised scores with
    their mean and spread, wall time. Episode i resets with seed `seed + i` (`rollout`); the policy
    is deterministic (the predicted action, no sampling), so the same seed gives the same returns
    on the same machine. `target_return` defaults to the config's (the best return in the training
    data). Refused in one line, before any episode: an unknown environment, a model whose sizes do
    not fit it, a model trained on another environment's data."""
    info = env_info(env_id)
    module, arch, config = load_control_model(model_dir, device=device)
    check_fits(getattr(arch, "state_dim", -1), getattr(arch, "act_dim", -1), env_id, what=f"the model in {model_dir}")
    if config.get("env_id") not in (None, env_id):
        raise WeitError(f"the model in {model_dir} was trained on {config['env_id']} data, not {env_id}'s", f"evaluate it in {config['env_id']}")
    target = config.get("target_return") if target_return is None else target_return
    if target is None:
        raise WeitError(f"{model_dir}'s control config names no target return", f"pass a target return, e.g. the expert's {info.r_expert:g}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise WeitError(f"the target return must be a finite number, got {target!r}", "e.g. 3600")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise WeitError(f"max_steps must be a positive integer, got {max_steps!r}", "leave it out for the environment's time limit")
    policy = ContextPolicy(module, config, device=device)
    return rollout(env_id, policy, target_return=float(target), episodes=episodes, seed=seed, max_steps=max_steps)

