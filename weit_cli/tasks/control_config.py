"""The control config: what a control model needs beside its weights to act (the training split's
state statistics, the returns-to-go scale, the context, the episode cap, the environment, a default
target return). Plain JSON: it rides in a bundle's `extra` and lies beside an exported model's
config.json as `control_config.json`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from weit_cli.data.envs import env_info
from weit_cli.data.trajectories import RTG_SCALE
from weit_cli.errors import InputError, OutputError

#: The name of the task (`Task.name`) whose models a control config belongs to.
TASK = "control"
#: The file beside a control model's config.json that makes it usable without weit's data.
CONFIG_FILE = "control_config.json"
CONFIG_KIND = "weit.control-config"
CONFIG_VERSION = 1


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


class ControlConfig(BaseModel):
    """The fields a control config must have, and their types (strict: no bool for a number, no
    string for either, no tuple for a list, no NaN or ±inf); other keys (kind, version, env_id,
    data) pass through."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    state_dim: int = Field(ge=1)
    act_dim: int = Field(ge=1)
    context: int = Field(ge=1)
    max_ep_len: int = Field(ge=1)
    state_mean: list[float]
    state_std: list[float]
    rtg_scale: float = Field(gt=0)
    target_return: float | None = None

    @field_validator("state_mean", "state_std")
    @classmethod
    def _one_per_state_feature(cls, v: list[float], info: ValidationInfo) -> list[float]:
        if len(v) != info.data.get("state_dim"):
            raise PydanticCustomError("length", "one number per state feature")
        if info.field_name == "state_std" and not all(x > 0 for x in v):
            raise PydanticCustomError("positive", "state_std must be positive")
        return v


#: The order in which a config's problems are told (the first one is).
_ORDER = ("state_dim", "act_dim", "context", "max_ep_len", "state_mean", "state_std", "rtg_scale", "target_return")


def check_control_config(config: Any, where: str = "the control config") -> dict[str, Any]:
    """`config` if it is a usable control config; a one-line error naming the first problem."""
    hint = "write it with weit (materialize a control model), or see weit_cli.tasks.control.control_config"
    if not isinstance(config, Mapping):
        raise InputError(f"{where} is not a JSON object", hint)
    missing = [k for k in ("state_dim", "act_dim", "state_mean", "state_std", "context", "rtg_scale", "max_ep_len") if k not in config]
    if missing:
        raise InputError(f"{where} lacks {', '.join(missing)}", hint)
    try:
        ControlConfig.model_validate(dict(config))
    except ValidationError as e:
        raise InputError(_problem(e, config, where), hint) from None
    if config.get("env_id") is not None:
        env_info(config["env_id"])
    return dict(config)


def _problem(e: ValidationError, config: Mapping[str, Any], where: str) -> str:
    """The first of `e`'s problems (in `_ORDER`), worded as weit words it."""
    errors = {err["loc"][0]: err for err in reversed(e.errors())}
    k = min(errors, key=_ORDER.index)
    if k in ("state_mean", "state_std") and errors[k]["type"] == "positive":
        return f"{where}: state_std must be positive"
    if k in ("state_mean", "state_std"):
        return f"{where}: {k} must be {config['state_dim']} finite numbers (state_dim)"
    if k in ("rtg_scale", "target_return"):
        return f"{where}: {k} must be a {'positive ' if k == 'rtg_scale' else ''}finite number, got {config.get(k)!r}"
    return f"{where}: {k} must be a positive integer, got {config[k]!r}"


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
