"""The environments the control task knows without building them: sizes, episode caps and D4RL's
reference returns (the normalised score), and a gymnasium builder that never renders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weit_cli.errors import WeitError

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



def check_fits(state_dim: int, act_dim: int, env_id: str, what: str = "the model") -> None:
    """Refuse a model whose state or action size is not the environment's, before any rollout."""
    e = env_info(env_id)
    if (state_dim, act_dim) != (e.obs_dim, e.act_dim):
        raise WeitError(
            f"{what} takes {state_dim} state features and {act_dim} actions; {env_id} has {e.obs_dim} and {e.act_dim}",
            "use a model made for this environment, or set the model's state_dim/act_dim",
        )
