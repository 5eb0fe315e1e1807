"""Offline data (data/offline.py) as tensors ready for window sampling (data/windows.py): episode
bounds, returns-to-go, in-episode timesteps, normalised states (`prepare`), and the seeded split of a
dataset's episodes into training and validation (`split_episodes`, `select_episodes`). Pure
functions: they know nothing of weit's families or commands."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from weit_cli.data.envs import env_info
from weit_cli.data.offline import OfflineData, episode_bounds
from weit_cli.errors import InputError, WeitError

__all__ = [
    "RTG_SCALE", "STD_EPS", "ControlSet", "episode_bounds", "episode_timesteps", "prepare", "returns_to_go",
    "select_episodes", "split_episodes", "state_stats",
]

#: Returns-to-go are divided by this before they enter the model (the DT paper's MuJoCo setting).
RTG_SCALE = 1000.0
#: Added to the states' standard deviation, as in the DT code, so that constant features stay finite.
STD_EPS = 1e-6


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
