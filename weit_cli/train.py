"""Training utilities shared by pretrain, fit-scalers, distillation and finetune. Nothing here prints:
progress goes through a `StepCallback` that the CLI renders.

- `setup_distributed()`: torchrun-aware process setup (gloo on CPU, nccl on GPU), no-op alone.
- `device_autocast(device)`: bf16 autocast on CUDA, nothing on CPU.
- `adamw()` + `lr_at()` (linear warmup, cosine decay) + `clip_grad()`.
- `Batches`: a deterministic, resumable, DDP-sharded stream of batches (epoch order seeded from
  seed and epoch; its position is part of every checkpoint).
- `evaluate()`: accuracy and mean loss of a model (or any x → logits function) on a dataset.
- `save_checkpoint()` / `load_checkpoint()`: safetensors + JSON sidecar, atomic, no pickle; they
  carry every RNG state (torch, CUDA, numpy, python) so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .errors import InputError, WeitError

CHECKPOINT_FORMAT = "weit.checkpoint.1"


# ---------------------------------------------------------------------------------------------- processes
class Dist(NamedTuple):
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Join the torchrun process group if there is one (env WORLD_SIZE > 1); pick the device.

    `device` overrides the choice ('cpu', 'cuda', 'cuda:1'); by default CUDA when present. Under
    torchrun each rank takes the GPU of its LOCAL_RANK, and the backend is nccl on GPU, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def device_autocast(device: torch.device | str):
    """bf16 autocast on CUDA; a no-op context on CPU (CPU runs stay in exact float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


MAX_SEED = 2**63 - 1


def check_seed(seed: int, name: str = "seed") -> None:
    """Seeds are integers in [0, 2**63): torch refuses larger ones with an overflow, not an error."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise WeitError(f"--{name.replace('_', '-')} must be an integer in 0..{MAX_SEED}, got {seed}", "e.g. 0")


def resolve_device(device: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' … (None: CUDA when present); a bad or absent device is a WeitError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise WeitError(f"unknown device '{device}'", "use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise WeitError(f"device '{device}' is not supported", "use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WeitError("CUDA was requested but no GPU is visible", "leave the device unset to use the CPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise WeitError(f"device {device}: only {torch.cuda.device_count()} GPU(s) visible", "use cuda:0 … or leave it unset")
    return dev


def seed_everything(seed: int) -> None:
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- optimiser
def adamw(
    named_params: dict[str, Tensor] | list[tuple[str, Tensor]],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    no_decay: Callable[[str, Tensor], bool] | None = None,
) -> torch.optim.AdamW:
    """AdamW with two groups; by default vectors (norms, biases), `pos_embed` and `cls_token` get no
    weight decay, as in timm's training scripts. Group 0 decays, group 1 does not."""
    items = list(named_params.items()) if isinstance(named_params, dict) else list(named_params)
    if no_decay is None:
        no_decay = lambda n, p: p.ndim <= 1 or n.endswith(("pos_embed", "cls_token"))  # noqa: E731
    decay = [p for n, p in items if p.requires_grad and not no_decay(n, p)]
    keep = [p for n, p in items if p.requires_grad and no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=False)


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for 0-based `step`: linear warmup to `base_lr`, then cosine down to base·ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def clip_grad(params, max_norm: float) -> float:
    """Clip the global gradient norm to `max_norm` (≤ 0: no clipping); returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    if max_norm and max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))


# ---------------------------------------------------------------------------------------------- data order
def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Tensor:
    """This rank's shuffled indices for `epoch`: a permutation seeded from (seed, epoch), cut to a
    multiple of world_size, every world_size-th element from `rank` (as DistributedSampler)."""
    g = torch.Generator().manual_seed(_mix(seed, epoch))
    perm = torch.randperm(n, generator=g)
    usable = n - n % world_size
    return perm[:usable][rank::world_size]


def _mix(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 12345) % (2**63 - 1)


@dataclass
class Batches:
    """Endless, deterministic batches from a TensorDataset; `state()`/`load_state()` resume exactly.

    Each epoch is `epoch_order(...)` for this rank, cut into full batches (a ragged tail is dropped
    so every step sees the same batch shape). `batch_size` is per rank.
    """

    dataset: Any
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    offset: int = 0  # batches already taken from this epoch
    _order: Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        n = len(self.dataset) // self.world_size
        if n == 0:
            raise InputError("the training split is empty", "check the data source")
        self.batch_size = min(self.batch_size, n)

    @property
    def batches_per_epoch(self) -> int:
        return (len(self.dataset) // self.world_size) // self.batch_size

    def next(self) -> tuple[Tensor, ...]:
        if self.offset >= self.batches_per_epoch:
            self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = epoch_order(len(self.dataset), seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size)
        idx = self._order[self.offset * self.batch_size : (self.offset + 1) * self.batch_size]
        self.offset += 1
        return tuple(t[idx] for t in self.dataset.tensors)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state(self, s: dict[str, int]) -> None:
        for k in ("seed", "batch_size", "world_size"):
            if k in s and s[k] != getattr(self, k):
                raise InputError(
                    f"the checkpoint was made with data {k} {s[k]}, this run uses {getattr(self, k)}",
                    "resume with the same recipe, data and number of processes",
                )
        self.epoch, self.offset, self._order = int(s["epoch"]), int(s["offset"]), None


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # fraction in [0, 1]
    loss: float  # mean cross-entropy
    count: int


@torch.no_grad()
def evaluate(model: nn.Module | Callable[[Tensor], Tensor], dataset, batch_size: int = 256, device: torch.device | str | None = None) -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of `model` (a module or any x → logits) on `dataset`."""
    if device is None:
        device = next(model.parameters()).device if isinstance(model, nn.Module) and any(True for _ in model.parameters()) else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    x_all, y_all = dataset.tensors[0], dataset.tensors[1]
    correct, loss_sum, n = 0, 0.0, len(x_all)
    try:
        for i in range(0, n, batch_size):
            x = x_all[i : i + batch_size].to(device, non_blocking=True)
            y = y_all[i : i + batch_size].to(device, non_blocking=True)
            with device_autocast(device):
                logits = model(x)
            logits = logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
    finally:
        if was_training:
            model.train()
    if n == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    return EvalResult(correct / n, loss_sum / n, n)


# ---------------------------------------------------------------------------------------------- progress
@dataclass(frozen=True)
class StepInfo:
    """What a training loop reports after each step (and after each validation)."""

    step: int  # steps done so far (1-based after the first step)
    total_steps: int
    loss: float
    lr: float
    steps_per_sec: float
    eta_s: float
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. {"val_acc_largest": 0.81}


StepCallback = Callable[[StepInfo], None]


class Throughput:
    """steps/s and ETA over the steps done in this process (a resumed run restarts the clock)."""

    def __init__(self, start_step: int, total: int):
        self.start_step, self.total, self.t0 = start_step, total, time.perf_counter()

    def __call__(self, step: int) -> tuple[float, float]:
        dt = time.perf_counter() - self.t0
        done = step - self.start_step
        sps = done / dt if dt > 0 and done > 0 else 0.0
        eta = (self.total - step) / sps if sps > 0 else float("inf")
        return sps, eta


# ---------------------------------------------------------------------------------------------- checkpoints
def checkpoint_paths(path: Path) -> tuple[Path, Path]:
    """`path` is the tensors file (…ckpt.safetensors); the sidecar is the same name + .json."""
    path = Path(path)
    return path, path.with_name(path.name + ".json")


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
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
    from .files import atomic_file, sha256, write_safetensors

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
    from .files import load_safetensors, sha256

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


def kl_to_teacher(logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T²·KL(teacher ‖ student) on temperature-softened logits (Hinton et al.); batch mean."""
    t = temperature
    kl = torch.nn.functional.kl_div(
        torch.nn.functional.log_softmax(logits / t, -1),
        torch.nn.functional.log_softmax(teacher_logits / t, -1),
        log_target=True,
        reduction="batchmean",
    )
    return kl * (t * t)


def optimizer_step(optimizer, loss: Tensor, params, *, step: int, max_norm: float, hint: str) -> float:
    """zero_grad → backward → clip → step; returns the loss, refusing a non-finite one with `hint`."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_grad(params, max_norm)
    optimizer.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        from .errors import WeitError

        raise WeitError(f"the loss became {value} at step {step + 1}", hint)
    return value
