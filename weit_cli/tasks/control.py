"""Return-conditioned action prediction (Decision Transformer) and its evaluation by rollouts.

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
- `DecisionTransformerPolicy`: transformers' `DecisionTransformerModel` as such a policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from weit_cli.data.control import OfflineData, env_info, make_env, normalized_score
from weit_cli.errors import WeitError


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


def prepare(data: OfflineData, *, rtg_scale: float = RTG_SCALE, max_ep_len: int | None = None) -> ControlSet:
    if not rtg_scale > 0:
        raise WeitError(f"the returns-to-go scale must be positive, got {rtg_scale}", f"e.g. {RTG_SCALE:g}")
    max_ep_len = max_ep_len or env_info(data.env_id).max_episode_steps
    bounds = episode_bounds(data.terminals, data.timeouts)
    mean, std = state_stats(data.observations)
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
        return Windows(*(t.to(device) for t in (self.states, self.actions, self.returns_to_go, self.timesteps, self.attention_mask)))


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


class DecisionTransformerPolicy:
    """transformers' DecisionTransformerModel as a rollout policy: states normalised with the
    training data's statistics, returns-to-go scaled, the last `context` steps left-padded to
    `context` (zeros, mask 0) as in transformers' and the DT paper's `get_action`."""

    def __init__(self, model: torch.nn.Module, state_mean: np.ndarray, state_std: np.ndarray, *, context: int, rtg_scale: float = RTG_SCALE):
        cfg = model.config
        if len(state_mean) != cfg.state_dim or len(state_std) != cfg.state_dim:
            raise WeitError(f"state statistics have {len(state_mean)} features, the model takes {cfg.state_dim}", "use the statistics of the model's training data")
        self.model = model.eval()
        self.mean = torch.as_tensor(state_mean, dtype=torch.float32)
        self.std = torch.as_tensor(state_std, dtype=torch.float32)
        self.context = int(context)
        self.rtg_scale = float(rtg_scale)
        self.max_timestep = int(cfg.max_ep_len) - 1

    @classmethod
    def for_data(cls, model: torch.nn.Module, data: ControlSet, *, context: int) -> DecisionTransformerPolicy:
        check_fits(model.config.state_dim, model.config.act_dim, data.env_id)
        return cls(model, data.state_mean, data.state_std, context=context, rtg_scale=data.rtg_scale)

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
        device = next(self.model.parameters()).device
        w = Windows(states, actions, rtg, steps, mask).to(device)
        return predict_actions(self.model, w)[0, -1].cpu()
