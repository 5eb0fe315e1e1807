"""weit's own offline data, made reproducibly because nothing can be downloaded here and no installed
package ships offline-RL data (`generate`): for an environment it knows, weit trains a behaviour
policy with stable-baselines3 PPO (data/ppo.py: seeded, CPU, one thread), keeps the policy's weights
as safetensors at checkpoints along training, and records four qualities, named as in D4RL:

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
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weit_cli.data.envs import env_info, make_env
from weit_cli.data.offline import KEYS, OfflineData, episode_returns, validate
from weit_cli.data.ppo import PPO_ARGS, load_policy, sampler, train_ppo
from weit_cli.errors import InputError, OutputError, WeitError

#: Bump when generation changes what it writes for the same (environment, seed, budget).
DATA_VERSION = "1"
KIND = "weit.control-data"
QUALITIES = ("random", "medium", "expert", "replay")


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
    from weit_cli.options import check_seed

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
        snapshots, replay = train_ppo(env_id, seed, budget.ppo_steps, budget.checkpoints)
        keep("replay", replay)
        for steps, state in snapshots:
            name = f"policy-{steps:09d}.safetensors"
            write_safetensors(tmp / name, [(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in sorted(state.items())], {"kind": "weit.sb3-policy", "env_id": env_id, "steps": str(steps)})
            policy = load_policy(tmp / name, env_id)
            say(f"{env_id}: evaluating the policy after {steps} steps")
            ret = float(np.mean(episode_returns(record(env_id, sampler(policy, seed), None, seed + 1, episodes=budget.eval_episodes))))
            checkpoints.append({"steps": steps, "file": name, "eval_return": ret})
        best = max(checkpoints, key=lambda c: (c["eval_return"], c["steps"]))
        goal = qualities["random"]["mean_return"] + (best["eval_return"] - qualities["random"]["mean_return"]) / 3
        others = [c for c in checkpoints if c is not best] or [best]
        medium = min(others, key=lambda c: (abs(c["eval_return"] - goal), c["steps"]))
        for quality, chosen in (("medium", medium), ("expert", best)):
            say(f"{env_id}: recording {budget.steps_per_quality} {quality} steps (policy after {chosen['steps']} steps)")
            policy = load_policy(tmp / chosen["file"], env_id)
            keep(quality, record(env_id, sampler(policy, seed + 2), budget.steps_per_quality, seed + 2), policy_steps=chosen["steps"])
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
