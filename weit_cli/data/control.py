"""Offline reinforcement-learning data for the control task, in the D4RL layout: `load_control_data`
reads any supported source. The pieces live in modules of one concern each:

- data/envs.py: the environments weit knows (sizes, episode caps, D4RL reference returns) and a
  gymnasium builder;
- data/offline.py: the D4RL layout (`OfflineData`, `validate`, episode bounds and returns) and the
  readers of users' `.npz` / HDF5 files and Minari folders;
- data/builtin.py: weit's own data, generated reproducibly into the cache (`generate`, `Budget`,
  `read_builtin`);
- data/ppo.py: the behaviour policy of the built-in data (stable-baselines3 PPO, isolated there).

The names the tests and benchmarks use are importable from here too.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable

from weit_cli.data.builtin import QUALITIES, Budget, generate, read_builtin
from weit_cli.data.envs import ENVIRONMENTS, EnvInfo, env_info, make_env, normalized_score
from weit_cli.data.offline import KEYS, REQUIRED_KEYS, OfflineData, episode_returns, load_file, validate
from weit_cli.data.ppo import load_policy
from weit_cli.errors import InputError, WeitError

__all__ = [
    "ENVIRONMENTS", "KEYS", "QUALITIES", "REQUIRED_KEYS", "Budget", "EnvInfo", "OfflineData", "env_info", "episode_returns",
    "generate", "load_control_data", "load_policy", "make_env", "normalized_score", "read_builtin", "validate",
]


def load_control_data(
    source: str | os.PathLike,
    *,
    env_id: str | None = None,
    seed: int = 0,
    budget: Budget | None = None,
    progress: Callable[[str], None] | None = None,
) -> OfflineData:
    """Any supported source as validated data.

    `source` is a built-in environment (`Hopper-v5`: all qualities one after the other;
    `Hopper-v5:medium`, `Hopper-v5:medium+expert`: those qualities), generated on first use with
    `seed` and `budget`; or a `.npz` / `.h5` / `.hdf5` file in the D4RL layout, or a Minari dataset
    folder (or its `main_data.hdf5`) — these need `env_id` unless Minari's metadata names it."""
    text = os.fspath(source)
    path = Path(text)
    if path.exists():
        return load_file(path, env_id)
    name, _, qualities = text.partition(":")
    if name in ENVIRONMENTS:
        if env_id is not None and env_id != name:
            raise WeitError(f"data source {text!r} is for {name}, not {env_id}", f"use {env_id}'s data or environment")
        wanted = _qualities(qualities, text)
        folder = generate(name, seed=seed, budget=budget or Budget(), progress=progress)
        return read_builtin(folder, wanted)
    if any(c in text for c in "/\\") or path.suffix:
        raise InputError(f"{text} does not exist", "check the path")
    raise WeitError(
        f"unknown control data source {text!r}",
        f"use a built-in environment ({', '.join(ENVIRONMENTS)}, optionally ':medium' etc.), an .npz/.hdf5 file or a Minari folder",
    )


def _qualities(spec: str, text: str) -> tuple[str, ...]:
    if not spec:
        return QUALITIES
    wanted = tuple(spec.split("+"))
    bad = [q for q in wanted if q not in QUALITIES]
    if bad or len(set(wanted)) != len(wanted):
        raise WeitError(f"bad data quality in {text!r}", f"qualities are {', '.join(QUALITIES)}, joined with '+'")
    return wanted

