"""Return-conditioned action prediction (Decision Transformer) and its evaluation by rollouts.

`Control` is the task (the Task seam of tasks/base.py): fixed, seeded K-step windows as
TensorDatasets, the action MSE as loss, distillation loss and metric; see its docstring for why
windows are sampled once and how the state statistics travel with a model (`control_config.json`).
`evaluate_rollouts` rolls an exported model folder out, with nothing but that folder.

Pure functions that the control task calls; they know nothing of weit's families or commands:

- `prepare`: a dataset (weit_cli.data.control.OfflineData) as tensors ready for sampling: episode
  bounds, returns-to-go, in-episode timesteps, normalised states;
- `sample_windows`: a batch of context windows of K steps from a seeded torch Generator, laid out as
  in the Decision Transformer paper's gym code (Chen et al. 2021, `experiment.py: get_batch`):
  episodes drawn with probability proportional to their length, a uniform start inside the episode,
  the window cut at the episode's end and padded on the *left* (states 0, actions −10, returns-to-go
  0, timesteps 0, attention mask 0), returns-to-go divided by a scale;
- `action_loss`: the MSE on the actions of unmasked positions;
- `rollout`: a policy run in a gymnasium environment towards a target return, N episodes with
  seeded resets, giving returns, normalised scores, mean and spread, and wall time;
- `ContextPolicy`: any control model as such a policy, given its control config;
  `DecisionTransformerPolicy`: transformers' `DecisionTransformerModel` with statistics at hand.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from weit_cli.data.control import (
    Budget,
    OfflineData,
    env_info,
    make_env,
    normalized_score,
)
from weit_cli.errors import InputError, OutputError, WeitError
from weit_cli.tasks.base import Batch, Forward, Task

#: Returns-to-go are divided by this before they enter the model (the DT paper's MuJoCo setting).
RTG_SCALE = 1000.0
#: Padding of the actions of a window's masked positions (DT's gym code; any value works under the mask).
ACTION_PAD = -10.0
#: Added to the states' standard deviation, as in the DT code, so that constant features stay finite.
STD_EPS = 1e-6

#: A policy: (states (1, T, obs), actions (1, T, act) with the last row still zero, returns-to-go
#: (1, T, 1), timesteps (1, T) int64, attention mask (1, T)) → the action (act,) for step T − 1.
#: Inputs are raw (unnormalised states, unscaled returns); the policy applies its own preprocessing.
Policy = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------------ the data
def episode_bounds(terminals: np.ndarray, timeouts: np.ndarray) -> np.ndarray:
    """(E, 2) [start, end) of each episode; a step with either flag ends one, and so does the end
    of the data (a last episode without a flag)."""
    n = len(terminals)
    ends = np.flatnonzero(np.asarray(terminals, dtype=bool) | np.asarray(timeouts, dtype=bool)) + 1
    if n and (not len(ends) or ends[-1] != n):
        ends = np.append(ends, n)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return np.stack([starts, ends.astype(np.int64)], axis=1) if n else np.zeros((0, 2), dtype=np.int64)


def returns_to_go(rewards: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Undiscounted sum of the rewards from each step to its episode's end (float64 accumulation)."""
    r = np.asarray(rewards, dtype=np.float64)
    out = np.empty_like(r)
    for s, e in bounds:
        out[s:e] = np.cumsum(r[s:e][::-1])[::-1]
    return out.astype(np.float32)


def episode_timesteps(bounds: np.ndarray, n: int) -> np.ndarray:
    """Each step's index inside its episode."""
    t = np.empty(n, dtype=np.int64)
    for s, e in bounds:
        t[s:e] = np.arange(e - s)
    return t


def state_stats(observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (+ STD_EPS) of the states over the whole dataset, float32."""
    obs = np.asarray(observations, dtype=np.float64)
    return obs.mean(0).astype(np.float32), (obs.std(0) + STD_EPS).astype(np.float32)


@dataclass
class ControlSet:
    """A dataset ready for window sampling: per-step tensors and episode bounds."""

    states: Tensor  # (N, obs), normalised with state_mean/state_std
    actions: Tensor  # (N, act)
    returns_to_go: Tensor  # (N,), divided by rtg_scale
    timesteps: Tensor  # (N,) int64, clipped to max_ep_len − 1
    bounds: Tensor  # (E, 2) int64
    state_mean: np.ndarray
    state_std: np.ndarray
    rtg_scale: float
    env_id: str

    @property
    def lengths(self) -> Tensor:
        return self.bounds[:, 1] - self.bounds[:, 0]


def prepare(
    data: OfflineData,
    *,
    rtg_scale: float = RTG_SCALE,
    max_ep_len: int | None = None,
    stats: tuple[np.ndarray, np.ndarray] | None = None,
) -> ControlSet:
    """`data` ready for window sampling; states normalised with `stats` (mean, std) if given — a
    validation split takes its training split's — else with `data`'s own."""
    if not rtg_scale > 0:
        raise WeitError(f"the returns-to-go scale must be positive, got {rtg_scale}", f"e.g. {RTG_SCALE:g}")
    max_ep_len = max_ep_len or env_info(data.env_id).max_episode_steps
    bounds = episode_bounds(data.terminals, data.timeouts)
    mean, std = stats if stats is not None else state_stats(data.observations)
    return ControlSet(
        states=torch.from_numpy((data.observations - mean) / std),
        actions=torch.from_numpy(data.actions),
        returns_to_go=torch.from_numpy(returns_to_go(data.rewards, bounds) / np.float32(rtg_scale)),
        timesteps=torch.from_numpy(np.minimum(episode_timesteps(bounds, len(data)), max_ep_len - 1)),
        bounds=torch.from_numpy(bounds),
        state_mean=mean,
        state_std=std,
        rtg_scale=float(rtg_scale),
        env_id=data.env_id,
    )


@dataclass
class Windows:
    """A batch of K-step context windows, left-padded."""

    states: Tensor  # (B, K, obs)
    actions: Tensor  # (B, K, act)
    returns_to_go: Tensor  # (B, K, 1)
    timesteps: Tensor  # (B, K) int64
    attention_mask: Tensor  # (B, K) float, 1 on real steps

    def to(self, device: torch.device | str) -> Windows:
        return Windows(*(t.to(device) for t in self.batch()))

    def batch(self) -> tuple[Tensor, ...]:
        """The control task's batch: (states, actions, returns-to-go, timesteps, attention mask)."""
        return (self.states, self.actions, self.returns_to_go, self.timesteps, self.attention_mask)


def sample_windows(data: ControlSet, batch_size: int, context: int, generator: torch.Generator) -> Windows:
    """B windows of K steps, drawn as in the DT gym code (see the module docstring)."""
    if batch_size < 1 or context < 1:
        raise WeitError(f"batch size and context must be positive, got {batch_size} and {context}", "e.g. 64 and 20")
    lengths = data.lengths
    episode = torch.multinomial(lengths.double(), batch_size, replacement=True, generator=generator)
    length = lengths[episode]
    offset = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * length).long().clamp_max(length - 1)
    real = torch.minimum(length - offset, torch.tensor(context))  # steps of each window that exist
    pad = context - real
    j = torch.arange(context)
    valid = j[None, :] >= pad[:, None]
    index = data.bounds[episode, 0][:, None] + offset[:, None] + (j[None, :] - pad[:, None])
    index = torch.where(valid, index, torch.zeros_like(index))
    mask = valid.to(torch.float32)
    v = valid[..., None]
    return Windows(
        states=torch.where(v, data.states[index], 0.0),
        actions=torch.where(v, data.actions[index], ACTION_PAD),
        returns_to_go=torch.where(v, data.returns_to_go[index][..., None], 0.0),
        timesteps=torch.where(valid, data.timesteps[index], 0),
        attention_mask=mask,
    )


def action_loss(predicted: Tensor, target: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean squared error over the action components of unmasked positions (DT's loss)."""
    keep = attention_mask.reshape(-1) > 0
    act = target.shape[-1]
    return torch.nn.functional.mse_loss(predicted.reshape(-1, act)[keep], target.reshape(-1, act)[keep])


def predict_actions(model: torch.nn.Module, windows: Windows) -> Tensor:
    """The actions a transformers DecisionTransformerModel predicts for each window position."""
    out = model(
        states=windows.states,
        actions=windows.actions,
        returns_to_go=windows.returns_to_go,
        timesteps=windows.timesteps,
        attention_mask=windows.attention_mask,
        return_dict=True,
    )
    return out.action_preds


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
    from weit_cli.limits import check_seed

    check_seed(seed)
    if episodes < 1:
        raise WeitError(f"the number of episodes must be positive, got {episodes}", "e.g. 10")
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


def check_fits(state_dim: int, act_dim: int, env_id: str, what: str = "the model") -> None:
    """Refuse a model whose state or action size is not the environment's, before any rollout."""
    e = env_info(env_id)
    if (state_dim, act_dim) != (e.obs_dim, e.act_dim):
        raise WeitError(
            f"{what} takes {state_dim} state features and {act_dim} actions; {env_id} has {e.obs_dim} and {e.act_dim}",
            "use a model made for this environment, or set the model's state_dim/act_dim",
        )


class ContextPolicy:
    """Any control model as a rollout policy, through the task's own call (`model_inputs`,
    `action_output`): states normalised with the training data's statistics, returns-to-go scaled,
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
        return action_output(self.forward(*model_inputs(batch)))[0, -1].float().cpu()


class DecisionTransformerPolicy(ContextPolicy):
    """transformers' DecisionTransformerModel as a rollout policy, with statistics given directly
    (sizes read from `model.config`); `ContextPolicy` with a control config built on the spot."""

    def __init__(self, model: torch.nn.Module, state_mean: np.ndarray, state_std: np.ndarray, *, context: int, rtg_scale: float = RTG_SCALE):
        cfg = model.config
        if len(state_mean) != cfg.state_dim or len(state_std) != cfg.state_dim:
            raise WeitError(f"state statistics have {len(state_mean)} features, the model takes {cfg.state_dim}", "use the statistics of the model's training data")
        config = {
            "state_dim": int(cfg.state_dim), "act_dim": int(cfg.act_dim),
            "state_mean": [float(x) for x in state_mean], "state_std": [float(x) for x in state_std],
            "context": int(context), "rtg_scale": float(rtg_scale), "max_ep_len": int(cfg.max_ep_len),
        }
        super().__init__(model, config, device=next(model.parameters()).device)
        self.model = model

    @classmethod
    def for_data(cls, model: torch.nn.Module, data: ControlSet, *, context: int) -> DecisionTransformerPolicy:
        check_fits(model.config.state_dim, model.config.act_dim, data.env_id)
        return cls(model, data.state_mean, data.state_std, context=context, rtg_scale=data.rtg_scale)


# -------------------------------------------------------------------------------------- the task
#: A model that returns a mapping (transformers' ModelOutput is one) gives its actions under this key.
ACTIONS_KEY = "action_preds"
#: Context length K when neither the task nor the model section names one (the DT paper's MuJoCo K).
DEFAULT_CONTEXT = 20
#: Fixed windows per split at most (see `Control`): a window costs K·(obs + act + 3)·4 bytes, so
#: 100 000 HalfCheetah windows of 20 steps take about 220 MB.
MAX_WINDOWS = 100_000
MAX_VAL_WINDOWS = 10_000
#: The file beside a control model's config.json that makes it usable without weit's data.
CONFIG_FILE = "control_config.json"
CONFIG_KIND = "weit.control-config"
CONFIG_VERSION = 1


def model_inputs(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A control model's positional inputs for a batch: (states, actions, rewards, returns_to_go,
    timesteps, attention_mask), the order of transformers' `DecisionTransformerModel.forward`.

    The model reads no rewards (that forward takes and ignores them); zeros keep every input a
    tensor, so that a wrapper which moves or casts its inputs (a composed forward, DDP) sees only
    tensors."""
    states, actions, rtg, timesteps, mask = batch
    return states, actions, torch.zeros_like(rtg), rtg, timesteps, mask


def action_output(out) -> Tensor:
    """The predicted actions (B, K, act) in what a control model returned.

    A tensor is the actions themselves (a forward that already reduces its output); a mapping —
    transformers' ModelOutput is an OrderedDict — holds them under `ACTIONS_KEY`. Anything else,
    e.g. the tuple of a `return_dict=False` call, whose order is the model's own, is refused."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get(ACTIONS_KEY), Tensor):
        return out[ACTIONS_KEY]
    what = f"a mapping with keys {', '.join(map(str, out))}" if isinstance(out, Mapping) else f"a {type(out).__name__}"
    raise WeitError(
        f"the model returned {what}, not predicted actions",
        f"a control model returns the actions as a tensor, or a mapping with '{ACTIONS_KEY}' (transformers' ModelOutput)",
    )


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
    """Return-conditioned action prediction (Decision Transformer, Chen et al. 2021).

    A batch is (states, actions, returns-to-go, timesteps, attention mask), one K-step window per
    row, left-padded; the model is called with `model_inputs` and its output reduced with
    `action_output`; the loss is the action MSE on unmasked positions, distillation the same MSE to
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

    name = "control"
    metric_name = "action_mse"
    metric_key = "action_mse"  # val_action_mse, …
    higher_is_better = False

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
        return action_output(forward(*model_inputs(batch))).float()

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


def split_episodes(n_episodes: int, *, val_fraction: float, train_subset: float | int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) episode indices, each sorted: a seeded permutation whose first
    round(val_fraction·E) episodes (at least one when val_fraction > 0) validate; `train_subset`
    (a fraction in (0, 1] or a count) keeps the first of the rest."""
    if not 0 <= val_fraction < 1:
        raise WeitError(f"val_fraction must be in [0, 1), got {val_fraction}", "e.g. 0.1")
    n_val = 0 if val_fraction == 0 else max(1, math.floor(val_fraction * n_episodes + 0.5))
    if n_episodes - n_val < 1:
        raise InputError(
            f"the data hold {n_episodes} episode{'s' * (n_episodes != 1)}: too few to hold {val_fraction:g} of them out for validation",
            "set data.val_fraction=0, or bring more episodes",
        )
    perm = torch.randperm(n_episodes, generator=torch.Generator().manual_seed(seed)).numpy()
    val, train = perm[:n_val], perm[n_val:]
    if train_subset is not None:
        if isinstance(train_subset, bool) or not isinstance(train_subset, (int, float)):
            raise WeitError(f"train_subset must be a fraction in (0, 1] or an episode count, got {train_subset!r}", "e.g. 0.5")
        if isinstance(train_subset, float):
            if not 0 < train_subset <= 1:
                raise WeitError(f"train_subset {train_subset} is not a fraction in (0, 1]", "e.g. 0.5, or a count of episodes")
            k = max(1, math.floor(train_subset * len(train) + 0.5))
        else:
            if not 1 <= train_subset <= len(train):
                raise WeitError(f"train_subset {train_subset} is not a count of the {len(train)} training episodes", f"use 1..{len(train)}")
            k = train_subset
        train = train[:k]
    return np.sort(train), np.sort(val)


def select_episodes(data: OfflineData, bounds: np.ndarray, chosen: np.ndarray) -> OfflineData:
    """The rows of the `chosen` episodes one after the other; an episode that ended with the data
    (no flag) gets a timeout, so that it does not run into the next one."""
    parts = bounds[np.asarray(chosen, dtype=np.int64)]
    idx = np.concatenate([np.arange(s, e) for s, e in parts]) if len(parts) else np.zeros(0, np.int64)
    terminals, timeouts = data.terminals[idx].copy(), data.timeouts[idx].copy()
    ends = np.cumsum(parts[:, 1] - parts[:, 0]) - 1
    timeouts[ends[~(terminals[ends] | timeouts[ends])]] = True
    return OfflineData(
        observations=data.observations[idx], actions=data.actions[idx], rewards=data.rewards[idx],
        terminals=terminals, timeouts=timeouts, env_id=data.env_id, description=data.description, info=data.info,
    )


def window_dataset(data: ControlSet, n: int, context: int, generator: torch.Generator, chunk: int = 4096) -> TensorDataset:
    """`n` windows drawn with `sample_windows` in chunks (one generator: the same windows whatever
    the chunk), as a TensorDataset in the batch order of `Windows.batch`."""
    parts = [sample_windows(data, min(chunk, n - i), context, generator).batch() for i in range(0, n, chunk)]
    return TensorDataset(*(torch.cat(ts) for ts in zip(*parts)))


def empty_windows(obs_dim: int, act_dim: int, context: int) -> TensorDataset:
    k = context
    return TensorDataset(torch.zeros(0, k, obs_dim), torch.zeros(0, k, act_dim), torch.zeros(0, k, 1), torch.zeros(0, k, dtype=torch.int64), torch.zeros(0, k))


# ------------------------------------------------------------------------------ the control config
def control_config(
    *, env_id: str, state_mean, state_std, context: int, rtg_scale: float = RTG_SCALE, max_ep_len: int | None = None,
    target_return: float | None = None, data: str = "",
) -> dict[str, Any]:
    """What a control model needs beside its weights to act: the training split's state statistics
    (float32 values written as exact decimals), the returns-to-go scale, the context, the episode
    cap of the timestep embedding, the environment and a default target return (the best return in
    the training data). Plain JSON: it rides in a bundle's `extra` and lies beside config.json."""
    info = env_info(env_id)
    config = {
        "kind": CONFIG_KIND,
        "version": CONFIG_VERSION,
        "env_id": env_id,
        "state_dim": info.obs_dim,
        "act_dim": info.act_dim,
        "state_mean": [float(x) for x in np.asarray(state_mean, dtype=np.float32)],
        "state_std": [float(x) for x in np.asarray(state_std, dtype=np.float32)],
        "context": int(context),
        "rtg_scale": float(rtg_scale),
        "max_ep_len": int(max_ep_len or info.max_episode_steps),
        "target_return": None if target_return is None else float(target_return),
        "data": data,
    }
    return check_control_config(config)


def check_control_config(config: Any, where: str = "the control config") -> dict[str, Any]:
    """`config` if it is a usable control config; a one-line error naming the first problem."""
    hint = "write it with weit (materialize a control model), or see weit_cli.tasks.control.control_config"
    if not isinstance(config, Mapping):
        raise InputError(f"{where} is not a JSON object", hint)
    missing = [k for k in ("state_dim", "act_dim", "state_mean", "state_std", "context", "rtg_scale", "max_ep_len") if k not in config]
    if missing:
        raise InputError(f"{where} lacks {', '.join(missing)}", hint)
    for k in ("state_dim", "act_dim", "context", "max_ep_len"):
        v = config[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{where}: {k} must be a positive integer, got {v!r}", hint)
    for k in ("state_mean", "state_std"):
        v = config[k]
        if not isinstance(v, list) or len(v) != config["state_dim"] or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
            raise InputError(f"{where}: {k} must be {config['state_dim']} finite numbers (state_dim)", hint)
    if not all(x > 0 for x in config["state_std"]):
        raise InputError(f"{where}: state_std must be positive", hint)
    for k, optional in (("rtg_scale", False), ("target_return", True)):
        v = config.get(k)
        if optional and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (k == "rtg_scale" and v <= 0):
            raise InputError(f"{where}: {k} must be a {'positive ' if k == 'rtg_scale' else ''}finite number, got {v!r}", hint)
    if config.get("env_id") is not None:
        env_info(config["env_id"])
    return dict(config)


def save_control_config(folder, config: Mapping[str, Any]) -> Path:
    """Write `control_config.json` into an existing model folder, atomically."""
    from weit_cli.io.files import atomic_file

    folder = Path(folder)
    if not folder.is_dir():
        raise OutputError(f"{folder} is not a folder", "write the model first, then its control config beside it")
    text = json.dumps(check_control_config(config), indent=1, sort_keys=True) + "\n"
    path = folder / CONFIG_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path


def load_control_config(folder) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise InputError(
            f"{folder} has no {CONFIG_FILE}: the state statistics of the model's training data",
            "materialize the model with weit from a control bundle, or write one with weit_cli.tasks.control.save_control_config",
        )
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{path} is not valid JSON", "fix or re-create it") from None
    return check_control_config(config, str(path))


# --------------------------------------------------------------------------- rollouts of a folder
def load_control_model(model_dir, *, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(module in eval mode, architecture, control config) of a model folder; the family comes
    from the registry (the weights' layout), so any family of the control task loads."""
    from weit_cli.arch._registry import detect_family
    from weit_cli.io.files import load_dense

    folder = Path(model_dir)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a model folder", f"pass the folder a control model was exported to (config.json, weights, {CONFIG_FILE})")
    config = load_control_config(folder)
    state, hints = load_dense(folder)
    adapter = detect_family(state.keys())
    if adapter.task != Control.name:
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
    return module.to(device).eval(), arch, config


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


def pool(results: list[RolloutResult]) -> RolloutResult:
    """Several rollout results of one environment as one (e.g. training seeds × episodes): the
    episodes one after the other, wall times summed; the target return is the first's."""
    if not results or len({r.env_id for r in results}) != 1:
        raise WeitError("pool rollout results of one environment", "pass a non-empty list of one environment's results")
    return RolloutResult(
        env_id=results[0].env_id,
        target_return=results[0].target_return,
        returns=[x for r in results for x in r.returns],
        lengths=[x for r in results for x in r.lengths],
        scores=[x for r in results for x in r.scores],
        wall_s=sum(r.wall_s for r in results),
    )
