"""Offline reinforcement-learning data for the control task, in the D4RL layout.

A dataset is five arrays of equal length N, one row per environment step: `observations` (N, obs)
float32, `actions` (N, act) float32, `rewards` (N,) float32, `terminals` (N,) bool (the episode
ended in the MDP: the hopper fell) and `timeouts` (N,) bool (the episode was cut: time limit, or the
end of the recording). Episodes follow one another; a step with either flag ends one.

Nothing can be downloaded here and no installed package ships offline-RL data, so weit makes its
own, reproducibly (`generate`): for an environment it knows, it trains a behaviour policy with
stable-baselines3 PPO (seeded, CPU, one thread), keeps the policy's weights as safetensors at
checkpoints along training, and records four qualities, named as in D4RL:

- `random`: uniformly random actions (D4RL rolls out a randomly initialised policy instead);
- `medium`: the checkpoint whose return is closest to a third of the way from random to expert
  (D4RL's medium policy reaches about a third of the expert's performance);
- `expert`: the checkpoint with the highest return, i.e. expert *for the training budget*: with a
  few minutes of PPO it is far below D4RL's expert, and its normalised score says so;
- `replay`: the PPO's own training rollouts, as D4RL's medium-replay is the replay buffer.

The result lies in the cache (`$WEIT_CACHE`, else ~/.cache/weit) under a key of (environment, seed,
budget, DATA_VERSION), written atomically, so a second run reuses it. The files are safetensors
(weit's own deterministic writer): the same seed gives the same bytes on the same machine. No SB3
zip (pickle) is ever written or read: policies are rebuilt from their safetensors weights.

Users bring their own data as `.npz` (read without pickle) or HDF5 in the D4RL layout, or a Minari
dataset folder already on disk (`<id>/data/main_data.hdf5`, one `episode_<i>` group per episode,
read with h5py; `minari` itself is not needed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weit_cli.errors import InputError, OutputError, WeitError

#: Bump when generation changes what it writes for the same (environment, seed, budget).
DATA_VERSION = "1"
KIND = "weit.control-data"
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")
#: `timeouts` may be absent (D4RL's v0 files lack it): then only the end of the data cuts an episode.
KEYS = REQUIRED_KEYS + ("timeouts",)
QUALITIES = ("random", "medium", "expert", "replay")

_D4RL = (
    "D4RL reference scores of the v2 tasks (Fu et al. 2020, 'D4RL: Datasets for Deep Data-Driven "
    "Reinforcement Learning', arXiv:2004.07219; d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE and "
    "d4rl/gym_mujoco/__init__.py, github.com/Farama-Foundation/D4RL). They were measured on the "
    "mujoco-py v2 environments; gymnasium's v5 environments differ slightly (model fixes, default "
    "reset noise and contact handling), so a v5 score is comparable to, not identical with, a "
    "published v2 one."
)


@dataclass(frozen=True)
class EnvInfo:
    """What weit needs to know about an environment without building it."""

    env_id: str
    obs_dim: int
    act_dim: int
    max_episode_steps: int
    r_random: float  # return of a random policy: normalised score 0
    r_expert: float  # return of an expert policy: normalised score 100
    reference: str = _D4RL


#: Environments with a built-in data source and fixed reference returns. The sizes are checked
#: against gymnasium in the tests.
ENVIRONMENTS: dict[str, EnvInfo] = {
    e.env_id: e
    for e in (
        EnvInfo("HalfCheetah-v5", 17, 6, 1000, r_random=-280.178953, r_expert=12135.0),
        EnvInfo("Hopper-v5", 11, 3, 1000, r_random=-20.272305, r_expert=3234.3),
        EnvInfo("Walker2d-v5", 17, 6, 1000, r_random=1.629008, r_expert=4592.3),
    )
}


def env_info(env_id: str) -> EnvInfo:
    try:
        return ENVIRONMENTS[env_id]
    except (KeyError, TypeError):
        raise WeitError(f"unknown environment {env_id!r}", f"weit knows {', '.join(ENVIRONMENTS)}") from None


def normalized_score(env_id: str, episode_return: float) -> float:
    """D4RL's normalised score: 0 is a random policy, 100 an expert."""
    e = env_info(env_id)
    return 100.0 * (float(episode_return) - e.r_random) / (e.r_expert - e.r_random)


def make_env(env_id: str, **kwargs: Any):
    """A gymnasium environment that never renders on screen (render_mode stays None)."""
    env_info(env_id)
    try:
        import gymnasium as gym
    except ImportError:
        raise WeitError("the control task needs gymnasium[mujoco]", "pip install 'weit[control]'") from None
    try:
        _route_mujoco_warnings()
        return gym.make(env_id, **kwargs)
    except (ImportError, gym.error.DependencyNotInstalled) as e:
        raise WeitError(f"cannot build {env_id}: {str(e).splitlines()[0]}", "pip install 'weit[control]'") from None


def _route_mujoco_warnings() -> None:
    """MuJoCo's default warning handler appends to MUJOCO_LOG.TXT in the working directory (gymnasium's
    HalfCheetah XML triggers a deprecation warning on every load): send its warnings to Python's
    `warnings` instead, unless someone installed a handler already."""
    import warnings

    import mujoco

    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(lambda msg: warnings.warn(f"MuJoCo: {msg}", RuntimeWarning, stacklevel=2))


# --------------------------------------------------------------------------------------- the data
@dataclass
class OfflineData:
    """A validated dataset in the D4RL layout, with where it came from."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    env_id: str
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # e.g. returns per quality of a built-in set

    def __len__(self) -> int:
        return len(self.rewards)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in KEYS}


def validate(arrays: Mapping[str, Any], env_id: str, where: str, description: str = "") -> OfflineData:
    """Check a D4RL-layout mapping against `env_id` and convert it to weit's dtypes.

    Every problem is one line naming the file and the key; nothing is silently fixed except shapes
    that mean the same ((N, 1) rewards, (N,) actions of a one-dimensional action space)."""
    e = env_info(env_id)
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise InputError(
            f"{where} lacks {', '.join(repr(k) for k in missing)}",
            f"a D4RL-layout dataset holds {', '.join(REQUIRED_KEYS)} and optionally timeouts, one row per step",
        )
    out = {k: _numeric(arrays[k], k, where) for k in KEYS if k in arrays}
    n = len(out["rewards"]) if out["rewards"].ndim else 0
    if "timeouts" not in out:
        out["timeouts"] = np.zeros(n, dtype=bool)
    lengths = {k: (len(v) if v.ndim else 0) for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise InputError(
            f"{where} has arrays of different lengths: {', '.join(f'{k} {v}' for k, v in lengths.items())}",
            "every key needs one row per environment step",
        )
    if n == 0:
        raise InputError(f"{where} holds no steps", "record some data first")
    for k, dim in (("observations", e.obs_dim), ("actions", e.act_dim)):
        v = out[k]
        if v.ndim == 1 and dim == 1:
            v = out[k] = v[:, None]
        if v.ndim != 2 or v.shape[1] != dim:
            raise InputError(
                f"{where}: {k} have shape {tuple(v.shape)}, {env_id} needs (N, {dim})",
                "pass the environment the data was recorded in",
            )
    for k in ("rewards", "terminals", "timeouts"):
        v = out[k]
        if v.ndim == 2 and v.shape[1] == 1:
            v = out[k] = v[:, 0]
        if v.ndim != 1:
            raise InputError(f"{where}: {k} have shape {tuple(v.shape)}, expected (N,)", "one value per step")
    for k in ("observations", "actions", "rewards"):
        bad = ~np.isfinite(out[k])
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise InputError(f"{where}: {k} hold NaN or Inf (first at step {row})", "drop or repair those steps")
    for k in ("terminals", "timeouts"):
        v = out[k]
        if v.dtype != bool and not np.isin(v, (0, 1)).all():
            raise InputError(f"{where}: {k} hold values other than 0/1", "flags are booleans, one per step")
    return OfflineData(
        observations=np.ascontiguousarray(out["observations"], dtype=np.float32),
        actions=np.ascontiguousarray(out["actions"], dtype=np.float32),
        rewards=np.ascontiguousarray(out["rewards"], dtype=np.float32),
        terminals=np.ascontiguousarray(out["terminals"], dtype=bool),
        timeouts=np.ascontiguousarray(out["timeouts"], dtype=bool),
        env_id=env_id,
        description=description or where,
    )


def _numeric(value: Any, key: str, where: str) -> np.ndarray:
    v = np.asarray(value)
    if v.dtype.kind not in "biuf":
        raise InputError(f"{where}: {key} is not numeric (dtype {v.dtype})", "store plain number arrays")
    return v


# -------------------------------------------------------------------------------------- user files
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
        return _load_file(path, env_id)
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


def _load_file(path: Path, env_id: str | None) -> OfflineData:
    if path.is_dir():
        found = next((p for p in (path / "data" / "main_data.hdf5", path / "main_data.hdf5") if p.is_file()), None)
        if found is None:
            raise InputError(f"{path} is a folder without data/main_data.hdf5", "point to a Minari dataset folder or a D4RL .npz/.hdf5 file")
        return _load_minari(found, env_id)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _load_npz(path, _need_env(env_id, path))
    if suffix in (".h5", ".hdf5"):
        h5py = _h5py()
        try:
            with h5py.File(path, "r") as f:
                if "episode_0" in f:
                    minari = True
                else:
                    minari = False
                    arrays = {k: f[k][()] for k in KEYS if isinstance(f.get(k), h5py.Dataset)}
        except OSError as e:
            raise InputError(f"{path} could not be read as HDF5: {str(e).splitlines()[0]}", "the file is corrupt or of another format") from None
        if minari:
            return _load_minari(path, env_id)
        env_id = _need_env(env_id, path)
        return validate(arrays, env_id, str(path), f"{path} (D4RL-layout HDF5, {env_id})")
    raise InputError(f"{path} is neither .npz nor .h5/.hdf5", "save the data in the D4RL layout as .npz or HDF5")


def _name_env_hint(path: Path) -> str:
    first = next(iter(ENVIRONMENTS))
    return f"name it before the path, e.g. --data {first}:{path} (environments: {', '.join(ENVIRONMENTS)})"


def _need_env(env_id: str | None, path: Path) -> str:
    if env_id is None:
        raise WeitError(f"{path} does not say which environment it was recorded in", _name_env_hint(path))
    env_info(env_id)
    return env_id


def _load_npz(path: Path, env_id: str) -> OfflineData:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in KEYS if k in z.files}
    except ValueError as e:
        why = "it holds pickled Python objects, which weit never unpickles" if "pickle" in str(e) else str(e).splitlines()[0]
        raise InputError(f"{path} could not be read: {why}", "store plain number arrays (np.savez)") from None
    except (OSError, EOFError) as e:
        raise InputError(f"{path} could not be read as .npz: {str(e).splitlines()[0] or type(e).__name__}", "the file is corrupt or of another format") from None
    return validate(arrays, env_id, str(path), f"{path} (D4RL-layout npz, {env_id})")


def _h5py():
    try:
        import h5py
    except ImportError:
        raise WeitError("reading HDF5 datasets needs h5py", "pip install 'weit[control]'") from None
    return h5py


def _load_minari(main: Path, env_id: str | None) -> OfflineData:
    """Minari's HDF5 storage: `episode_<i>` groups holding observations (T+1 rows: the last
    observation after the final step is included), actions, rewards, terminations, truncations
    (T rows). The environment is in `metadata.json` beside the file (Minari ≥ 0.4) or in the file's
    attributes (older), as a gymnasium EnvSpec in JSON."""
    h5py = _h5py()
    meta: dict[str, Any] = {}
    meta_file = main.parent / "metadata.json"
    try:
        if meta_file.is_file():
            meta = json.loads(meta_file.read_text())
        if meta.get("data_format", "hdf5") != "hdf5":
            raise InputError(f"{main.parent} holds Minari data in {meta['data_format']!r} format", "weit reads Minari's hdf5 format only")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in KEYS}
        with h5py.File(main, "r") as f:
            if not meta:
                meta = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            names = sorted((k for k in f if k.startswith("episode_")), key=lambda k: int(k.split("_", 1)[1]))
            if not names:
                raise InputError(f"{main} holds no episode_<i> groups", "is it a Minari dataset?")
            for name in names:
                ep = f[name]
                missing = [k for k in ("observations", "actions", "rewards", "terminations", "truncations") if not isinstance(ep.get(k), h5py.Dataset)]
                if missing:
                    kind = "a dictionary observation space" if isinstance(ep.get("observations"), h5py.Group) else "missing data"
                    raise InputError(f"{main}: {name} lacks {', '.join(missing)} ({kind})", "weit reads Minari datasets with Box observations and actions")
                obs = ep["observations"][()]
                steps = len(ep["rewards"])
                parts["observations"].append(obs[:steps])
                parts["actions"].append(ep["actions"][()])
                parts["rewards"].append(ep["rewards"][()])
                parts["terminals"].append(ep["terminations"][()])
                trunc = np.asarray(ep["truncations"][()], dtype=bool).copy()
                if steps and not (trunc[-1] or ep["terminations"][-1]):
                    trunc[-1] = True  # an episode that stops without a flag was cut
                parts["timeouts"].append(trunc)
    except OSError as e:
        raise InputError(f"{main} could not be read as HDF5: {str(e).splitlines()[0]}", "the file is corrupt or of another format") from None
    except (ValueError, AttributeError) as e:
        raise InputError(f"{main.parent} has unreadable Minari metadata: {str(e).splitlines()[0]}", "the dataset is corrupt") from None
    found = _minari_env(meta)
    if env_id is None:
        if found is None:
            raise WeitError(f"{main} does not say which environment it was recorded in", _name_env_hint(main.parent))
        env_id = found
    elif found is not None and found != env_id:
        raise InputError(f"{main} was recorded in {found}, not {env_id}", f"use {found}, or data from {env_id}")
    try:
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
    except ValueError:
        raise InputError(f"{main}: episodes have different observation or action sizes", "the dataset is corrupt") from None
    return validate(arrays, env_id, str(main), f"{main} (Minari, {len(names)} episodes, {env_id})")


def _minari_env(meta: Mapping[str, Any]) -> str | None:
    spec = meta.get("env_spec")
    if isinstance(spec, str):
        spec = json.loads(spec)
    return spec.get("id") if isinstance(spec, dict) else None


# ------------------------------------------------------------------------------------ the cache
@dataclass(frozen=True)
class Budget:
    """How much work generation does; `ppo_steps=0` records the random quality only (tests).

    Generation runs on one thread, where PPO manages about 700 steps/s: the defaults take about
    four minutes for Hopper-v5 on an idle core (10 minutes on the shared, loaded 2-core test
    machine), and reach a return of about 650 — an expert for this budget only (D4RL's: 3234)."""

    ppo_steps: int = 120_000  # PPO environment steps; also the size of the replay quality
    checkpoints: int = 6  # policies kept along training, evaluated to pick medium and expert
    steps_per_quality: int = 30_000  # steps recorded for random, medium and expert each
    eval_episodes: int = 3  # episodes that score each checkpoint

    def check(self) -> None:
        for k, v in asdict(self).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise WeitError(f"data budget {k} must be a non-negative integer, got {v!r}", "e.g. Budget()")
        if self.steps_per_quality < 1:
            raise WeitError("data budget steps_per_quality must be at least 1", "e.g. 30000")
        if self.ppo_steps and (self.checkpoints < 1 or self.eval_episodes < 1):
            raise WeitError("with PPO steps, checkpoints and eval_episodes must be at least 1", "e.g. Budget()")


def cache_root() -> Path:
    return Path(os.environ.get("WEIT_CACHE") or Path.home() / ".cache" / "weit")


def builtin_key(env_id: str, seed: int, budget: Budget) -> str:
    ident = {"env": env_id, "seed": seed, "budget": asdict(budget), "data_version": DATA_VERSION, "ppo": PPO_ARGS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def builtin_dir(env_id: str, seed: int, budget: Budget) -> Path:
    return cache_root() / "control" / f"{env_id}-seed{seed}-{builtin_key(env_id, seed, budget)}"


def generate(
    env_id: str,
    *,
    seed: int = 0,
    budget: Budget = Budget(),
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The cache folder of `env_id`'s built-in data, generating it first if needed."""
    from weit_cli.limits import check_seed

    env_info(env_id)
    check_seed(seed)
    budget.check()
    folder = builtin_dir(env_id, seed, budget)
    if (folder / "info.json").is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the cache folder {folder.parent}: {e.strerror}", "set WEIT_CACHE to a writable folder") from None
    from weit_cli.io.files import atomic_dir, one_thread

    from weit_cli.training import progress as lines

    say = progress or lines.say
    try:
        with atomic_dir(folder, force=False) as tmp, one_thread(), lines.heartbeat(f"{env_id}: generating behaviour data (cached afterwards)"):
            _generate_into(tmp, env_id, seed, budget, say)
    except OutputError:
        if (folder / "info.json").is_file():  # another process generated the same data meanwhile
            return folder
        raise
    return folder


def read_builtin(folder: Path, qualities: tuple[str, ...] = QUALITIES) -> OfflineData:
    """Built-in data from its cache folder: the chosen qualities one after the other."""
    info = json.loads((folder / "info.json").read_text())
    missing = [q for q in qualities if q not in info["qualities"]]
    if missing:
        raise WeitError(
            f"{info['env_id']}'s built-in data (budget {info['budget']}) has no {', '.join(missing)} quality",
            "give the data budget PPO steps, or ask for the random quality",
        )
    if qualities == QUALITIES:
        qualities = tuple(q for q in QUALITIES if q in info["qualities"])
    parts = [read_dataset(folder / f"{q}.safetensors") for q in qualities]
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in KEYS}
    returns = ", ".join(f"{q} {info['qualities'][q]['mean_return']:.0f}" for q in qualities)
    desc = f"built-in {info['env_id']} {'+'.join(qualities)} (seed {info['seed']}, mean returns {returns}; {folder})"
    data = validate(arrays, info["env_id"], str(folder), desc)
    data.info = info
    return data


def write_dataset(path: Path, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> None:
    """One quality as a safetensors file (deterministic bytes, no pickle), at an already-temp path."""
    import torch

    from weit_cli.io.files import write_safetensors

    tensors = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in KEYS}
    meta = {"kind": KIND, "data_version": DATA_VERSION}
    meta.update({k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()})
    specs = [(k, tuple(t.shape), t.dtype, (lambda t=t: t)) for k, t in sorted(tensors.items())]
    write_safetensors(path, specs, meta)


def read_dataset(path: Path) -> dict[str, np.ndarray]:
    from weit_cli.io.files import load_safetensors, read_header

    meta = read_header(path).get("__metadata__") or {}
    if meta.get("kind") != KIND or meta.get("data_version") != DATA_VERSION:
        raise InputError(f"{path} is not weit control data of version {DATA_VERSION}", "delete the cache folder to regenerate it")
    tensors, _ = load_safetensors(path)
    return {k: tensors[k].numpy() for k in KEYS}


# ------------------------------------------------------------------------------------ generation
#: PPO settings (stable-baselines3 defaults but for the rollout length, which follows the budget so
#: that small budgets still update). Part of the cache key.
PPO_ARGS: dict[str, Any] = {"n_steps": 2048, "batch_size": 64, "n_epochs": 10, "learning_rate": 3e-4, "gamma": 0.99}


def _generate_into(tmp: Path, env_id: str, seed: int, budget: Budget, say: Callable[[str], None]) -> None:
    from weit_cli.io.files import write_safetensors

    meta = {"env_id": env_id, "seed": str(seed), "budget": asdict(budget)}
    qualities: dict[str, dict[str, Any]] = {}

    def keep(quality: str, arrays: dict[str, np.ndarray], **extra: Any) -> None:
        write_dataset(tmp / f"{quality}.safetensors", arrays, {**meta, "quality": quality, **extra})
        rets = episode_returns(arrays)
        qualities[quality] = {"steps": len(arrays["rewards"]), "episodes": len(rets), "mean_return": float(np.mean(rets)), **extra}

    say(f"{env_id}: recording {budget.steps_per_quality} random steps")
    rng = np.random.default_rng(seed)
    keep("random", record(env_id, lambda _obs: rng.uniform(-1.0, 1.0, env_info(env_id).act_dim), budget.steps_per_quality, seed))
    checkpoints: list[dict[str, Any]] = []
    if budget.ppo_steps:
        say(f"{env_id}: training PPO for {budget.ppo_steps} steps")
        snapshots, replay = _train_ppo(env_id, seed, budget)
        keep("replay", replay)
        for steps, state in snapshots:
            name = f"policy-{steps:09d}.safetensors"
            write_safetensors(tmp / name, [(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in sorted(state.items())], {"kind": "weit.sb3-policy", "env_id": env_id, "steps": str(steps)})
            policy = load_policy(tmp / name, env_id)
            say(f"{env_id}: evaluating the policy after {steps} steps")
            ret = float(np.mean(episode_returns(record(env_id, _sampler(policy, seed), None, seed + 1, episodes=budget.eval_episodes))))
            checkpoints.append({"steps": steps, "file": name, "eval_return": ret})
        best = max(checkpoints, key=lambda c: (c["eval_return"], c["steps"]))
        goal = qualities["random"]["mean_return"] + (best["eval_return"] - qualities["random"]["mean_return"]) / 3
        others = [c for c in checkpoints if c is not best] or [best]
        medium = min(others, key=lambda c: (abs(c["eval_return"] - goal), c["steps"]))
        for quality, chosen in (("medium", medium), ("expert", best)):
            say(f"{env_id}: recording {budget.steps_per_quality} {quality} steps (policy after {chosen['steps']} steps)")
            policy = load_policy(tmp / chosen["file"], env_id)
            keep(quality, record(env_id, _sampler(policy, seed + 2), budget.steps_per_quality, seed + 2), policy_steps=chosen["steps"])
    info = {
        "kind": KIND,
        "data_version": DATA_VERSION,
        "env_id": env_id,
        "seed": seed,
        "budget": asdict(budget),
        "ppo": PPO_ARGS,
        "qualities": qualities,
        "checkpoints": checkpoints,
        "reference": {"r_random": env_info(env_id).r_random, "r_expert": env_info(env_id).r_expert, "source": env_info(env_id).reference},
    }
    (tmp / "info.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def record(
    env_id: str,
    act: Callable[[np.ndarray], np.ndarray],
    steps: int | None,
    seed: int,
    *,
    episodes: int | None = None,
) -> dict[str, np.ndarray]:
    """Run `act` for `steps` steps (or whole `episodes`) from a reset seeded with `seed`.

    A recording that stops mid-episode marks its last step as a timeout, as D4RL does."""
    env = make_env(env_id)
    try:
        obs, _ = env.reset(seed=seed)
        rows: dict[str, list] = {k: [] for k in KEYS}
        done_episodes = 0
        while (steps is None or len(rows["rewards"]) < steps) and (episodes is None or done_episodes < episodes):
            action = np.asarray(act(obs), dtype=np.float32)
            nobs, reward, terminated, truncated, _ = env.step(action)
            for k, v in zip(KEYS, (obs, action, reward, terminated, truncated)):
                rows[k].append(v)
            obs = nobs
            if terminated or truncated:
                done_episodes += 1
                obs, _ = env.reset()
    finally:
        env.close()
    out = {
        "observations": np.asarray(rows["observations"], dtype=np.float32),
        "actions": np.asarray(rows["actions"], dtype=np.float32),
        "rewards": np.asarray(rows["rewards"], dtype=np.float32),
        "terminals": np.asarray(rows["terminals"], dtype=bool),
        "timeouts": np.asarray(rows["timeouts"], dtype=bool),
    }
    if len(out["rewards"]) and not (out["terminals"][-1] or out["timeouts"][-1]):
        out["timeouts"][-1] = True
    return out


def episode_returns(arrays: Mapping[str, np.ndarray]) -> list[float]:
    """Undiscounted return of each episode (a step with terminals or timeouts set ends one)."""
    ends = np.flatnonzero(np.asarray(arrays["terminals"]) | np.asarray(arrays["timeouts"]))
    rewards = np.asarray(arrays["rewards"], dtype=np.float64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [float(rewards[s : e + 1].sum()) for s, e in zip(starts, ends)]


def _ppo_args(budget: Budget) -> dict[str, Any]:
    """Rollouts no longer than one checkpoint interval, so every checkpoint follows an update."""
    n_steps = max(64, min(PPO_ARGS["n_steps"], budget.ppo_steps // max(1, budget.checkpoints)))
    return {**PPO_ARGS, "n_steps": n_steps, "batch_size": min(PPO_ARGS["batch_size"], n_steps)}


def _train_ppo(env_id: str, seed: int, budget: Budget):
    """Train PPO; return (steps, policy state) snapshots and the training rollouts (replay)."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback

    every = math.ceil(budget.ppo_steps / budget.checkpoints)

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
            model = PPO("MlpPolicy", env, seed=seed, device="cpu", verbose=0, **_ppo_args(budget))
            model.learn(total_timesteps=budget.ppo_steps, callback=rec, progress_bar=False)
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


def _sampler(policy, seed: int) -> Callable[[np.ndarray], np.ndarray]:
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
