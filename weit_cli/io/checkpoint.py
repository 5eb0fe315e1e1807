"""Resumable training checkpoints: parameters, optimizer state and every RNG state in one
self-describing safetensors file (no pickle), written atomically, plus a readable JSON sidecar."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from weit_cli.errors import InputError

if TYPE_CHECKING:
    from torch import Tensor

CHECKPOINT_FORMAT = "weit.checkpoint.1"


# ---------------------------------------------------------------------------------------------- processes
def checkpoint_paths(path: Path) -> tuple[Path, Path]:
    """`path` is the tensors file (…ckpt.safetensors); the sidecar is the same name + .json."""
    path = Path(path)
    return path, path.with_name(path.name + ".json")


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    import torch

    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.uint32).view(np.int32).copy())
    py = random.getstate()
    meta = {
        "numpy": {"name": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py[0], "state": list(py[1]), "gauss_next": py[2]},
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    n = meta["numpy"]
    keys = tensors["rng.numpy.keys"].numpy().view(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def save_checkpoint(
    path: Path,
    *,
    params: dict[str, Tensor],
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> None:
    """Write a resumable checkpoint: `params`, the optimizer's tensors and the RNG states in one
    safetensors file whose metadata also holds the JSON-able `state` (step, data position, …), the
    optimizer hyper-parameters and the Python/numpy RNG states. That file, renamed into place, *is*
    the checkpoint: a kill at any moment leaves the previous checkpoint or this one, whole. The
    `.json` sidecar written after it is a readable copy (it names the tensors file's sha256); a kill
    between the two renames leaves an older sidecar, which loading ignores."""
    import torch

    from weit_cli.io.files import atomic_file, sha256, write_safetensors

    tpath, jpath = checkpoint_paths(path)
    tensors = {f"param.{k}": v.detach().cpu() for k, v in params.items()}
    groups = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        for idx, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu() if torch.is_tensor(v) else torch.tensor(v)
        groups = sd["param_groups"]
    rng_t, rng_m = rng_state()
    tensors.update(rng_t)
    side = {"format": CHECKPOINT_FORMAT, "state": state, "optimizer_groups": groups, "rng": rng_m}
    specs = [(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in sorted(tensors.items())]
    with atomic_file(tpath) as tmp:
        write_safetensors(tmp, specs, {"format": "pt", "kind": CHECKPOINT_FORMAT, "checkpoint": json.dumps(side, sort_keys=True)})
        digest = sha256(tmp)
    with atomic_file(jpath) as jtmp:
        jtmp.write_text(json.dumps({**side, "tensors_sha256": digest}, sort_keys=True) + "\n")


def checkpoint_exists(path: Path) -> bool:
    """Whether a resumable checkpoint is at `path` (its tensors file; the sidecar may lag behind)."""
    return checkpoint_paths(path)[0].is_file()


def load_checkpoint(
    path: Path,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save_checkpoint`; loads the optimizer in place, restores RNG
    states, and returns (params, state)."""
    from weit_cli.io.files import load_safetensors, sha256

    tpath, jpath = checkpoint_paths(path)
    if not tpath.is_file():
        raise InputError(f"no checkpoint at {tpath}", "start without --resume, or point to the run's output")
    tensors, meta = load_safetensors(tpath)
    if "checkpoint" in meta:  # self-describing (see save_checkpoint); the sidecar is only a copy
        try:
            side = json.loads(meta["checkpoint"])
        except ValueError:
            raise InputError(f"{tpath} holds an unreadable checkpoint record", "the checkpoint is corrupt; start without --resume") from None
    else:  # an older checkpoint: the state lives in the sidecar only
        try:
            side = json.loads(jpath.read_text())
        except (OSError, ValueError):
            raise InputError(f"{jpath} is missing or not valid JSON", "the checkpoint is corrupt; start without --resume") from None
        if sha256(tpath) != side.get("tensors_sha256"):
            raise InputError(f"{tpath} does not match its sidecar {jpath.name}", "the checkpoint is corrupt; start without --resume")
    if not isinstance(side, dict) or side.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{tpath} is not a weit checkpoint", "start without --resume")
    params = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    if optimizer is not None:
        groups = side.get("optimizer_groups")
        if groups is None:
            raise InputError(f"{tpath} holds no optimizer state", "start without --resume")
        state: dict[int, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        for g in groups:
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        try:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError) as e:
            raise InputError(f"{tpath} does not fit this run's parameters: {e}", "resume with the same recipe") from None
    if restore_rng:
        set_rng_state(tensors, side["rng"])
    return params, side["state"]




def checkpoint_for(output: Path) -> Path:
    """The checkpoint of an unfinished run writing `output`: bundle.safetensors → bundle.ckpt.safetensors."""
    output = Path(output)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + ".ckpt.safetensors")
