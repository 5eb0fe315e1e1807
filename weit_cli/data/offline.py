"""Offline reinforcement-learning data in the D4RL layout, and the readers of users' files.

A dataset is five arrays of equal length N, one row per environment step: `observations` (N, obs)
float32, `actions` (N, act) float32, `rewards` (N,) float32, `terminals` (N,) bool (the episode
ended in the MDP: the hopper fell) and `timeouts` (N,) bool (the episode was cut: time limit, or the
end of the recording). Episodes follow one another; a step with either flag ends one
(`episode_bounds`).

Users bring their own data as `.npz` (read without pickle) or HDF5 in the D4RL layout, or a Minari
dataset folder already on disk (`<id>/data/main_data.hdf5`, one `episode_<i>` group per episode,
read with h5py; `minari` itself is not needed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from weit_cli.data.envs import ENVIRONMENTS, env_info
from weit_cli.errors import InputError, WeitError

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")
#: `timeouts` may be absent (D4RL's v0 files lack it): then only the end of the data cuts an episode.
KEYS = REQUIRED_KEYS + ("timeouts",)


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



def episode_bounds(terminals: np.ndarray, timeouts: np.ndarray) -> np.ndarray:
    """(E, 2) [start, end) of each episode; a step with either flag ends one, and so does the end
    of the data (a last episode without a flag)."""
    n = len(terminals)
    ends = np.flatnonzero(np.asarray(terminals, dtype=bool) | np.asarray(timeouts, dtype=bool)) + 1
    if n and (not len(ends) or ends[-1] != n):
        ends = np.append(ends, n)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return np.stack([starts, ends.astype(np.int64)], axis=1) if n else np.zeros((0, 2), dtype=np.int64)


def episode_returns(arrays: Mapping[str, np.ndarray]) -> list[float]:
    """Undiscounted return of each episode (`episode_bounds`), float64 sums."""
    rewards = np.asarray(arrays["rewards"], dtype=np.float64)
    return [float(rewards[s:e].sum()) for s, e in episode_bounds(arrays["terminals"], arrays["timeouts"])]


# -------------------------------------------------------------------------------------- user files
def load_file(path: Path, env_id: str | None) -> OfflineData:
    """A D4RL-layout .npz or HDF5 file, or a Minari folder (or its main_data.hdf5), validated."""
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

