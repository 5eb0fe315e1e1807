"""The behaviour policy of the built-in data (data/builtin.py): stable-baselines3 PPO, trained seeded
on CPU, its policies kept and rebuilt as safetensors weights (never an SB3 zip: pickle). The only
module of weit that imports stable-baselines3."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from weit_cli.data.envs import make_env
from weit_cli.data.offline import KEYS
from weit_cli.errors import InputError

#: PPO settings (stable-baselines3 defaults but for the rollout length, which follows the budget so
#: that small budgets still update). Part of the cache key.
PPO_ARGS: dict[str, Any] = {"n_steps": 2048, "batch_size": 64, "n_epochs": 10, "learning_rate": 3e-4, "gamma": 0.99}


def ppo_args(ppo_steps: int, checkpoints: int) -> dict[str, Any]:
    """Rollouts no longer than one checkpoint interval, so every checkpoint follows an update."""
    n_steps = max(64, min(PPO_ARGS["n_steps"], ppo_steps // max(1, checkpoints)))
    return {**PPO_ARGS, "n_steps": n_steps, "batch_size": min(PPO_ARGS["batch_size"], n_steps)}


def train_ppo(env_id: str, seed: int, ppo_steps: int, checkpoints: int):
    """Train PPO; return (steps, policy state) snapshots and the training rollouts (replay)."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback

    every = math.ceil(ppo_steps / checkpoints)

    class Recorder(BaseCallback):
        def __init__(self):
            super().__init__()
            self.rows: dict[str, list] = {k: [] for k in KEYS}
            self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []

        def snapshot(self) -> None:
            if not self.snapshots or self.snapshots[-1][0] != self.num_timesteps:
                state = {k: v.detach().clone().contiguous() for k, v in self.model.policy.state_dict().items()}
                self.snapshots.append((self.num_timesteps, state))

        def _on_rollout_start(self) -> None:
            if self.num_timesteps >= every * (len(self.snapshots) + 1):
                self.snapshot()

        def _on_step(self) -> bool:
            info = self.locals["infos"][0]
            truncated = bool(info.get("TimeLimit.truncated", False))
            done = bool(self.locals["dones"][0])
            values = (self.model._last_obs[0], self.locals["clipped_actions"][0], float(self.locals["rewards"][0]), done and not truncated, truncated)
            for k, v in zip(KEYS, values):
                self.rows[k].append(np.array(v, copy=True))
            return True

    env = make_env(env_id)
    rec = Recorder()
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng():  # SB3 seeds the global generators; give them back afterwards
            model = PPO("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **ppo_args(ppo_steps, checkpoints))
            model.learn(total_timesteps=ppo_steps, callback=rec, progress_bar=False)
            rec.snapshot()
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        env.close()
    replay = {
        "observations": np.asarray(rec.rows["observations"], dtype=np.float32),
        "actions": np.asarray(rec.rows["actions"], dtype=np.float32),
        "rewards": np.asarray(rec.rows["rewards"], dtype=np.float32),
        "terminals": np.asarray(rec.rows["terminals"], dtype=bool),
        "timeouts": np.asarray(rec.rows["timeouts"], dtype=bool),
    }
    if not (replay["terminals"][-1] or replay["timeouts"][-1]):
        replay["timeouts"][-1] = True
    return rec.snapshots, replay


def load_policy(path: Path, env_id: str):
    """Rebuild a PPO MlpPolicy from its safetensors weights (never from an SB3 zip: pickle)."""
    from stable_baselines3.common.policies import ActorCriticPolicy

    from weit_cli.io.files import load_safetensors

    state, _ = load_safetensors(path)
    env = make_env(env_id)
    try:
        policy = ActorCriticPolicy(env.observation_space, env.action_space, lr_schedule=lambda _: 0.0)
    finally:
        env.close()
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"{path} does not fit a PPO MlpPolicy for {env_id}: {str(e).splitlines()[0]}", "delete the cache folder to regenerate it") from None
    return policy.eval()


def sampler(policy, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Actions sampled from the policy's Gaussian with a generator of its own, so that recording
    is reproducible and leaves torch's global random state alone. Every built-in environment's
    actions lie in [-1, 1] (checked in the tests); PPO's samples are clipped to it, as in training."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            dist = policy.get_distribution(torch.as_tensor(obs, dtype=torch.float32)[None]).distribution
            action = dist.mean + dist.stddev * torch.randn(dist.mean.shape, generator=gen)
        return np.clip(action[0].numpy(), -1.0, 1.0)

    return act
